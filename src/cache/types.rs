//! The engine's public value types: stream ids, stored records, operator events and the
//! reports the API hands out (space, streams, stats, evictions). Plain data with no
//! behaviour, kept apart from the engine's state so every role file can name them without
//! importing the facade (`mod.rs`) that in turn imports every role file.

use super::format;

/// A cached record as stored: its codec, its logical length and its (CRC-checked) bytes.
#[derive(Clone, Copy, Debug)]
pub struct StoredRecord<'a> {
    pub codec: format::Codec,
    pub logical_len: u32,
    pub bytes: &'a [u8],
    /// CRC-32/IEEE of `bytes`, already checked against them.
    pub crc: u32,
}

impl StoredRecord<'_> {
    /// The record's logical bytes, decompressed into `out` (replacing its contents).
    pub fn decode_into(&self, out: &mut Vec<u8>) -> Result<(), String> {
        super::compress::decode_into(self.codec, self.bytes, self.logical_len as usize, out)
    }
}

/// One stream: one disk of one protected machine. Numbered densely from 0 in creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct StreamId(pub u32);

/// Something an operator must hear about; kept in a bounded list and logged.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CacheEvent {
    /// A stream's unuploaded records were dropped; it needs a full resync.
    StreamEvicted {
        stream: StreamId,
        machine: String,
        disk: String,
        first_seq: u64,
        last_seq: u64,
        logical_bytes: u64,
        reason: String,
    },
    /// Recovery found damage and salvaged the stream by evicting it.
    StreamSalvaged { stream: StreamId, machine: String, disk: String, missing: Vec<(u64, u64)> },
    /// An fsync failed: nothing more is accepted until the cache is reopened.
    Poisoned { reason: String },
}

/// Space as the watermarks see it.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct SpaceReport {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub segments_in_use: u64,
    pub segments_recycled: u64,
    pub usage_ratio: f64,
    pub soft_watermark: f64,
    pub hard_watermark: f64,
    pub state: SpaceState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SpaceState {
    Normal,
    /// Between the watermarks: appends are slowed.
    Throttling,
    /// At or above the hard watermark: appends get `Backpressure`.
    Full,
}

/// A stream as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StreamInfo {
    pub id: StreamId,
    pub machine: String,
    pub disk: String,
    /// Records with `seq <= uploaded_upto` are uploaded (or evicted).
    pub uploaded_upto: u64,
    /// Highest durable sequence number (equal to `uploaded_upto` when nothing is cached).
    pub durable_upto: u64,
    pub records: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub resync_required: bool,
    /// Highest sequence number dropped without upload (eviction or salvage); 0: never.
    pub evicted_upto: u64,
    /// Sequence number of the record that began the latest resync; 0: none.
    pub resync_base: u64,
}

impl StreamInfo {
    /// Whether the records `..=seq` of this stream form an unbroken history in the
    /// cache's own terms: nothing was ever dropped, or a resync began after the last drop
    /// and before `seq`. Conservative: a later eviction makes it false even for a `seq`
    /// that was uploaded whole before the drop.
    pub fn history_whole_upto(&self, seq: u64) -> bool {
        self.evicted_upto == 0 || (self.resync_base > self.evicted_upto && self.resync_base < seq)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub batches: u64,
    pub records: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    /// Bytes written to segment files: batches, summaries, trailers.
    pub device_bytes: u64,
    /// META rewrites (stream registration, upload acknowledgements, evictions, resyncs)
    /// and their bytes, counted in whole 4 KiB blocks as the file system writes them.
    pub meta_writes: u64,
    pub meta_bytes: u64,
    pub syncs: u64,
    pub throttled_appends: u64,
    pub backpressure_refusals: u64,
    pub rewritten_records: u64,
    pub segments_freed: u64,
    pub evictions: u64,
    /// Record bytes read back served from the tail cache, and from the device.
    pub read_bytes_memory: u64,
    pub read_bytes_device: u64,
    /// Memory the tail cache pins now.
    pub tail_cache_bytes: u64,
    /// Heap bytes held by the per-stream indexes.
    pub index_bytes: u64,
    pub index_records: u64,
    /// LZ4 acceleration in use now (1 = standard LZ4; see `Options::lz4_acceleration_max`).
    pub lz4_acceleration: u32,
}

/// What [`Cache::evict_stream`](super::Cache::evict_stream) dropped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EvictReport {
    pub stream: StreamId,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub logical_bytes: u64,
}
