//! The cache engine: one shared, append-only, crash-safe log per cache disk.
//!
//! Producers ([`Cache::append`]) encode their record (LZ4 when it pays, CRC) on their own
//! thread, then copy it into the pending batch under a short lock, which also assigns the
//! stream's next sequence number. One flusher thread ([`flusher`]) writes each batch with
//! one positioned write and one `fdatasync`, updates the index, and only then resolves the
//! records' [`AppendTicket`]s: nothing is acknowledged before it is durable. The drain reads
//! records back in order ([`Cache::read`]) and acknowledges uploads ([`Cache::ack`]); the
//! reclaimer ([`reclaimer`]) frees, compacts and — as a last, explicit resort — evicts.
//! [`recover`] rebuilds everything on open from segment summaries. `docs/format.md` maps
//! the bytes.

pub(crate) mod assert;
pub mod compress;
pub(crate) mod effort;
pub mod error;
pub mod flusher;
pub mod format;
pub mod index;
pub mod io;
pub mod meta;
pub mod options;
pub(crate) mod preparer;
pub mod recent;
pub mod reclaimer;
pub mod recover;
pub mod ticket;
pub mod verify;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

/// Names of on-disk files, for tests and tools that inspect a cache directory.
#[doc(hidden)]
pub mod flusher_test_support {
    pub fn segment_file_name(id: u64) -> String {
        super::flusher::segment_name(id)
    }
}

pub use error::{AppendError, CloseError, IoFailure, OpenError, ReadError, ReclaimError, StreamError};
pub use options::{EvictionPolicy, IoBackend, Options, RecoveryMode};
pub use reclaimer::{ReclaimReport, SegmentBlockers};
pub use recover::RecoveryReport;
pub use ticket::AppendTicket;
pub use verify::{StreamVerify, VerifyReport};

/// A cached record as stored: its codec, its logical length and its (CRC-checked) bytes.
#[derive(Clone, Copy, Debug)]
pub struct StoredRecord<'a> {
    pub codec: format::Codec,
    pub logical_len: u32,
    pub bytes: &'a [u8],
    /// CRC-32/IEEE of `bytes`, already checked against them.
    pub crc: u32,
}

use format::{Codec, RecordHeader, RecordKind, BATCH_HEADER_LEN, RECORD_HEADER_LEN};
use index::{Loc, StreamIndex};
use io::aligned::AlignedBuf;
use io::{Storage, StorageFile};
use meta::{Meta, MetaStream};

/// One stream: one disk of one protected machine. Numbered densely from 0 in creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct StreamId(pub u32);

/// A record the producer has copied into the pending batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingRecord {
    pub stream: u32,
    pub seq: u64,
    pub kind: RecordKind,
    /// Offset of the record header inside the batch buffer.
    pub offset_in_batch: u32,
    pub stored_len: u32,
    pub logical_len: u32,
    /// For rewrites: the segment the record is being moved out of.
    pub from_segment: u32,
}

/// The batch being filled, and what producers need to fill it.
pub(crate) struct AppendState {
    pub buf: AlignedBuf,
    pub records: Vec<PendingRecord>,
    /// Number the pending batch will carry.
    pub batch_no: u64,
    pub next_seq: Vec<u64>,
    /// Set when closing or poisoned: nothing more is accepted.
    pub refuse: Option<AppendError>,
    /// The flusher has been asked to stop once the pending batch is written.
    pub closing: bool,
}

impl AppendState {
    pub fn fresh_buffer(commit_bytes_max: u32) -> AlignedBuf {
        let mut buf = AlignedBuf::with_capacity(commit_bytes_max as usize + format::BLOCK_SIZE as usize);
        // Faulted in here (by the flusher, or at open), outside the append lock, not by
        // the producers that fill it under the lock.
        buf.populate();
        buf.resize(BATCH_HEADER_LEN, 0);
        buf
    }
}

pub(crate) struct SegmentState {
    pub file: Arc<dyn StorageFile>,
    pub sealed: bool,
    pub live_records: u64,
    pub live_stored_bytes: u64,
}

pub(crate) struct StreamState {
    pub machine: String,
    pub disk: String,
    pub resync_required: bool,
    pub evicted_upto: u64,
    pub resync_base: u64,
    pub index: StreamIndex,
}

impl StreamState {
    /// Where the live durable record `seq` of this stream (`stream`) sits.
    fn live_loc(&self, stream: StreamId, seq: u64) -> Result<Loc, ReadError> {
        self.index.get(seq).ok_or(ReadError::NotAvailable {
            stream,
            seq,
            first: self.index.uploaded_upto() + 1,
            last: self.index.durable_upto(),
        })
    }
}

/// What is durable and where: streams, their indexes, segments.
pub(crate) struct LogState {
    pub streams: Vec<StreamState>,
    pub by_key: HashMap<(String, String), u32>,
    pub segments: BTreeMap<u64, SegmentState>,
    pub recycled: Vec<String>,
}

impl LogState {
    pub fn meta_snapshot(&self, salt: u64, segment_size: u64, generation: u64) -> Meta {
        Meta {
            salt,
            segment_size,
            generation,
            streams: self
                .streams
                .iter()
                .enumerate()
                .map(|(id, s)| MetaStream {
                    id: id as u32,
                    machine: s.machine.clone(),
                    disk: s.disk.clone(),
                    uploaded_upto: s.index.uploaded_upto(),
                    resync_required: s.resync_required,
                    evicted_upto: s.evicted_upto,
                    resync_base: s.resync_base,
                })
                .collect(),
        }
    }

    /// Drops a stream's index entries up to `upto`, keeping segment live counts true.
    pub fn release_upto(&mut self, stream: u32, upto: u64) {
        let st = &mut self.streams[stream as usize];
        for loc in st.index.release_upto(upto) {
            if let Some(seg) = self.segments.get_mut(&u64::from(loc.segment)) {
                debug_assert!(seg.live_records > 0);
                seg.live_records -= 1;
                seg.live_stored_bytes -= u64::from(loc.stored_len);
            }
        }
        self.streams[stream as usize].index.shrink_if_sparse();
    }
}

/// Resolution of group-committed batches, for tickets.
pub(crate) struct CommitState {
    /// Every batch numbered at most this is resolved (durable or failed).
    pub completed: u64,
    /// Failed batch-number ranges (inclusive) and why; bounded, oldest dropped first.
    /// Adjacent ranges failing for the same reason are merged, so a sustained error
    /// takes one entry.
    pub failures: VecDeque<(u64, u64, AppendError)>,
    /// Failure ranges up to this batch were dropped from `failures`: a batch at or below
    /// it with no entry may have failed, so its outcome is reported as forgotten, never
    /// guessed as durable.
    pub failures_forgotten_upto: u64,
    /// Tasks waiting, by the parity of the batch they wait for (see [`Inner::commit_cv`]).
    pub wakers: [Vec<std::task::Waker>; 2],
    /// When the latest resolutions happened: (every batch up to this one resolved, at),
    /// oldest first, at most [`RESOLUTIONS_KEPT`].
    pub resolutions: VecDeque<(u64, Instant)>,
    /// Batches up to this one were resolved at a time no longer kept (or before open).
    pub resolutions_forgotten_upto: u64,
}

/// Resolution times kept, so a ticket looked at late still tells when it became durable.
pub(crate) const RESOLUTIONS_KEPT: usize = 256;

impl CommitState {
    pub fn new(completed: u64) -> CommitState {
        CommitState {
            completed,
            failures: VecDeque::new(),
            failures_forgotten_upto: 0,
            wakers: [Vec::new(), Vec::new()],
            resolutions: VecDeque::with_capacity(RESOLUTIONS_KEPT),
            resolutions_forgotten_upto: completed,
        }
    }

    /// Records that batches `lo..=hi` failed with `error`. Bounded: the oldest range is
    /// dropped first, and the batches it covered become "forgotten".
    pub fn note_failure(&mut self, lo: u64, hi: u64, error: AppendError) {
        debug_assert!(lo <= hi);
        debug_assert!(self.failures.back().is_none_or(|&(_, last_hi, _)| last_hi < lo));
        if let Some(last) = self.failures.back_mut() {
            if last.1 + 1 == lo && last.2 == error {
                last.1 = hi;
                return;
            }
        }
        if self.failures.len() == FAILURES_KEPT_MAX {
            if let Some((_, dropped_hi, _)) = self.failures.pop_front() {
                self.failures_forgotten_upto = self.failures_forgotten_upto.max(dropped_hi);
            }
        }
        self.failures.push_back((lo, hi, error));
    }

    /// The outcome of batch `batch_no`: `None` while in flight. Success is reported only
    /// when the batch is known not to have failed.
    pub fn outcome(&self, batch_no: u64) -> Option<Result<(), AppendError>> {
        if self.completed < batch_no {
            return None;
        }
        for (lo, hi, e) in self.failures.iter().rev() {
            if (*lo..=*hi).contains(&batch_no) {
                return Some(Err(e.clone()));
            }
            if *hi < batch_no {
                break;
            }
        }
        if batch_no <= self.failures_forgotten_upto {
            return Some(Err(AppendError::OutcomeForgotten { batch_no }));
        }
        Some(Ok(()))
    }

    /// Which of the two waiting lists a ticket of `batch_no` uses.
    pub fn parity(batch_no: u64) -> usize {
        (batch_no % 2) as usize
    }

    /// Notes that every batch up to `upto` was resolved `at`.
    pub fn note_resolution(&mut self, upto: u64, at: Instant) {
        if self.resolutions.len() == RESOLUTIONS_KEPT {
            if let Some((forgotten, _)) = self.resolutions.pop_front() {
                self.resolutions_forgotten_upto = forgotten;
            }
        }
        debug_assert!(self.resolutions.back().is_none_or(|&(last, _)| last < upto));
        self.resolutions.push_back((upto, at));
    }

    /// When batch `batch_no` was resolved: None while in flight, or if that was more than
    /// [`RESOLUTIONS_KEPT`] resolutions ago.
    pub fn resolved_at(&self, batch_no: u64) -> Option<Instant> {
        if batch_no <= self.resolutions_forgotten_upto {
            return None;
        }
        let first = self.resolutions.partition_point(|&(upto, _)| upto < batch_no);
        self.resolutions.get(first).map(|&(_, at)| at)
    }
}

pub(crate) const FAILURES_KEPT_MAX: usize = 1024;

/// Counters, readable at any time through [`Cache::stats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub logical_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub device_bytes: AtomicU64,
    pub meta_writes: AtomicU64,
    pub meta_bytes: AtomicU64,
    pub syncs: AtomicU64,
    pub throttled_appends: AtomicU64,
    pub backpressure_refusals: AtomicU64,
    pub rewritten_records: AtomicU64,
    pub segments_freed: AtomicU64,
    pub evictions: AtomicU64,
    pub read_bytes_memory: AtomicU64,
    pub read_bytes_device: AtomicU64,
}

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

const EVENTS_KEPT_MAX: usize = 1024;

pub(crate) struct Inner {
    pub opts: Options,
    pub storage: Arc<dyn Storage>,
    pub salt: u64,
    pub append: Mutex<AppendState>,
    /// The flusher waits here for work.
    pub work_cv: Condvar,
    /// Producers wait here for room in the pending batch.
    pub room_cv: Condvar,
    pub log: RwLock<LogState>,
    pub commit: Mutex<CommitState>,
    /// Threads waiting for a ticket, by the parity of its batch number. A ticket's batch
    /// is at most two ahead of the last resolved one (one in flight, one filling), so
    /// resolving a batch wakes only its own waiters, not those of the batch behind it:
    /// with one shared condition variable every batch woke every waiting thread.
    pub commit_cv: [Condvar; 2],
    /// Serializes META rewrites; holds the last generation written.
    pub meta_lock: Mutex<u64>,
    pub segments_in_use: AtomicU64,
    pub poisoned: AtomicBool,
    pub shutdown: AtomicBool,
    pub counters: Counters,
    pub events: Mutex<VecDeque<CacheEvent>>,
    pub reclaim_wake: Mutex<bool>,
    pub reclaim_cv: Condvar,
    pub reclaim_pass_lock: Mutex<()>,
    pub recovery: RecoveryReport,
    pub recent: Mutex<recent::RecentBatches>,
    /// LZ4 acceleration producers use now; the flusher adjusts it.
    pub effort: effort::Effort,
    /// Per stream, whether its last record compressed (lets the next skip the sample).
    pub compress_hints: compress::CompressHints,
}

impl Inner {
    /// Reads `buf.len()` bytes at `offset` of `segment`: from the tail cache where it holds
    /// them, from `file` otherwise.
    fn read_span(&self, segment: u64, file: &dyn StorageFile, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let pieces = self.recent.lock().overlapping(segment, offset, offset + buf.len() as u64);
        let from_memory = recent::fill_span(buf, offset, &pieces, |at, part| file.read_exact_at(part, at))?;
        self.counters.read_bytes_memory.fetch_add(from_memory as u64, Ordering::Relaxed);
        self.counters.read_bytes_device.fetch_add((buf.len() - from_memory) as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn used_bytes(&self) -> u64 {
        self.segments_in_use.load(Ordering::Relaxed) * self.opts.segment_size
    }

    /// Bytes in use at which appends are refused: the hard watermark, but never closer
    /// than two segments to capacity, so compaction always has room to move records to.
    pub fn hard_limit_bytes(&self) -> u64 {
        let cap = self.opts.capacity_bytes;
        ((cap as f64 * self.opts.hard_watermark) as u64).min(cap - 2 * self.opts.segment_size)
    }

    pub fn soft_limit_bytes(&self) -> u64 {
        ((self.opts.capacity_bytes as f64 * self.opts.soft_watermark) as u64).min(self.hard_limit_bytes())
    }

    pub fn space_state(&self) -> (u64, SpaceState) {
        let used = self.used_bytes();
        let state = if used >= self.hard_limit_bytes() {
            SpaceState::Full
        } else if used >= self.soft_limit_bytes() {
            SpaceState::Throttling
        } else {
            SpaceState::Normal
        };
        (used, state)
    }

    pub fn push_event(&self, event: CacheEvent) {
        tracing::warn!(?event, "cache event");
        let mut ev = self.events.lock();
        if ev.len() == EVENTS_KEPT_MAX {
            ev.pop_front();
        }
        ev.push_back(event);
    }

    /// Poisons the engine after a failed fsync anywhere (a batch, a seal, a directory,
    /// META): what that fsync covered may be gone while the kernel reports the next one
    /// clean, so nothing more is accepted or acknowledged, and no fsync is retried, until
    /// the cache is reopened and recovers from what is really on disk.
    pub fn poison(&self, reason: String) {
        let first = !self.poisoned.swap(true, Ordering::AcqRel);
        {
            let mut st = self.append.lock();
            if !matches!(st.refuse, Some(AppendError::Poisoned(_))) {
                st.refuse = Some(AppendError::Poisoned(reason.clone()));
            }
        }
        self.room_cv.notify_all();
        self.work_cv.notify_all();
        if first {
            tracing::error!(%reason, "engine poisoned");
            self.push_event(CacheEvent::Poisoned { reason });
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn wake_reclaimer(&self) {
        *self.reclaim_wake.lock() = true;
        self.reclaim_cv.notify_one();
    }

    /// Rewrites META from the current log state, with `edit` applied to the snapshot
    /// first. The caller holds `meta_lock` (passed in as its generation).
    ///
    /// A full file system must never stop an upload acknowledgement (it is what frees
    /// space), so META keeps a preallocated reserve file: on ENOSPC the reserve is removed
    /// and the write retried; it is re-made as soon as there is room again.
    pub fn write_meta(&self, generation: &mut u64, edit: impl FnOnce(&mut Meta)) -> Result<(), IoFailure> {
        if self.opts.read_only {
            return Err(IoFailure {
                op: "write META",
                kind: std::io::ErrorKind::PermissionDenied,
                message: "read-only".into(),
            });
        }
        if self.is_poisoned() {
            return Err(IoFailure {
                op: "write META",
                kind: std::io::ErrorKind::Other,
                message: "engine is poisoned after a failed fsync; reopen it".into(),
            });
        }
        let mut meta = self.log.read().meta_snapshot(self.salt, self.opts.segment_size, *generation + 1);
        edit(&mut meta);
        let bytes = meta.encode();
        let storage = &*self.storage;
        // A failed fsync (of the file or the directory) is never retried: it poisons.
        let poison_on_sync = |f: io::AtomicWriteFailure| -> IoFailure {
            if let io::AtomicWriteFailure::Sync(e) = &f {
                self.poison(format!("fsync META: {e}"));
            }
            IoFailure::new("write META", f.error())
        };
        meta::write_with_reserve(storage, &bytes).map_err(poison_on_sync)?;
        *generation += 1;
        self.counters.meta_writes.fetch_add(1, Ordering::Relaxed);
        self.counters.meta_bytes.fetch_add(format::align_up(bytes.len() as u64, format::BLOCK_SIZE), Ordering::Relaxed);
        meta::ensure_reserve(storage, bytes.len());
        Ok(())
    }

    /// Copies an encoded record into the pending batch, waiting for room when it is full.
    /// Sequence numbers of data records are assigned here, under the same lock, so a
    /// stream's order in the log is its sequence order.
    pub fn enqueue(
        self: &Arc<Self>,
        stream: u32,
        rewrite: Option<(u64, u32)>,
        rec: Encoded<'_>,
    ) -> Result<AppendTicket, AppendError> {
        let Encoded { codec, stored, logical_len, payload_crc } = rec;
        let kind = if rewrite.is_some() { RecordKind::Rewrite } else { RecordKind::Data };
        let need = RECORD_HEADER_LEN + stored.len();
        let mut st = self.append.lock();
        loop {
            if let Some(e) = &st.refuse {
                return Err(e.clone());
            }
            // Closing: the flusher exits once the pending batch is empty, so a record
            // taken now (a compaction copy racing close) would never resolve.
            if st.closing {
                return Err(AppendError::Closed);
            }
            if st.records.is_empty() || st.buf.len() + need <= self.opts.commit_bytes_max as usize {
                break;
            }
            self.room_cv.wait(&mut st);
        }
        let seq = match rewrite {
            Some((seq, _)) => seq,
            None => {
                let next = st.next_seq.get_mut(stream as usize).ok_or(AppendError::UnknownStream(StreamId(stream)))?;
                let seq = *next;
                *next += 1;
                seq
            }
        };
        let offset_in_batch = st.buf.len();
        let header =
            RecordHeader { stream, kind, codec, seq, stored_len: stored.len() as u32, logical_len, payload_crc };
        st.buf.resize(offset_in_batch + RECORD_HEADER_LEN, 0);
        header.encode(&mut st.buf[offset_in_batch..]);
        st.buf.extend_from_slice(stored);
        st.records.push(PendingRecord {
            stream,
            seq,
            kind,
            offset_in_batch: offset_in_batch as u32,
            stored_len: stored.len() as u32,
            logical_len,
            from_segment: rewrite.map_or(0, |(_, seg)| seg),
        });
        let batch_no = st.batch_no;
        let first = st.records.len() == 1;
        drop(st);
        if first {
            self.work_cv.notify_one();
        }
        Ok(AppendTicket { inner: self.clone(), stream: StreamId(stream), seq, batch_no })
    }
}

/// A record encoded by its producer, ready to be copied into a batch.
#[derive(Clone, Copy)]
pub(crate) struct Encoded<'a> {
    pub codec: Codec,
    pub stored: &'a [u8],
    pub logical_len: u32,
    pub payload_crc: u32,
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

/// What [`Cache::evict_stream`] dropped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EvictReport {
    pub stream: StreamId,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub logical_bytes: u64,
}

/// An open cache. Share it between threads with `Arc<Cache>`.
pub struct Cache {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<Result<(), CloseError>>>,
    reclaimer: Option<JoinHandle<()>>,
    _lock: Box<dyn Send + Sync>,
}

impl Cache {
    /// Opens (recovering) or creates the cache in `dir` on the I/O backend the options
    /// ask for; `Auto` probes the fastest one and falls back, saying so in the log.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Cache, OpenError> {
        let storage = io::open_backend(dir.as_ref(), opts.io_backend)
            .map_err(|source| OpenError::Io { op: "open cache directory", source })?;
        Cache::open_with_storage(storage, opts)
    }

    /// Opens on any [`Storage`] backend (the fault-injecting one in tests).
    pub fn open_with_storage(storage: Arc<dyn Storage>, mut opts: Options) -> Result<Cache, OpenError> {
        opts.validate().map_err(OpenError::InvalidOptions)?;
        let lock = storage.lock().map_err(|source| OpenError::Locked { path: "LOCK".into(), source })?;
        let recovered = recover::recover(&*storage, &mut opts)?;
        let inner = Arc::new(Inner {
            salt: recovered.salt,
            append: Mutex::new(AppendState {
                // A read-only cache takes no append: no batch buffer to map and fault in.
                buf: if opts.read_only {
                    AlignedBuf::with_capacity(BATCH_HEADER_LEN)
                } else {
                    AppendState::fresh_buffer(opts.commit_bytes_max)
                },
                records: Vec::new(),
                batch_no: recovered.last_batch_no + 1,
                next_seq: recovered.next_seq.clone(),
                refuse: opts.read_only.then_some(AppendError::Closed),
                closing: false,
            }),
            work_cv: Condvar::new(),
            room_cv: Condvar::new(),
            segments_in_use: AtomicU64::new(recovered.log.segments.len() as u64),
            log: RwLock::new(recovered.log),
            commit: Mutex::new(CommitState::new(recovered.last_batch_no)),
            commit_cv: [Condvar::new(), Condvar::new()],
            meta_lock: Mutex::new(recovered.meta_generation),
            poisoned: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            counters: Counters::default(),
            events: Mutex::new(recovered.events.into_iter().collect()),
            reclaim_wake: Mutex::new(false),
            reclaim_cv: Condvar::new(),
            reclaim_pass_lock: Mutex::new(()),
            recovery: recovered.report,
            effort: effort::Effort::new(),
            compress_hints: compress::CompressHints::new(),
            recent: Mutex::new(recent::RecentBatches::new(opts.tail_cache_bytes)),
            storage,
            opts,
        });
        let mut cache = Cache { inner: inner.clone(), flusher: None, reclaimer: None, _lock: lock };
        if inner.opts.read_only {
            return Ok(cache);
        }
        // Dead segments left by a crash between an ack and its reclaim go now.
        reclaimer::free_dead_segments(&inner)
            .map_err(|e| OpenError::Io { op: "free dead segments", source: std::io::Error::new(e.kind, e.message) })?;
        let writer = flusher::Writer::new(inner.clone(), recovered.next_segment_id);
        cache.flusher = Some(
            std::thread::Builder::new()
                .name("churnlog-flusher".into())
                .spawn(move || writer.run())
                .map_err(|source| OpenError::Io { op: "spawn flusher", source })?,
        );
        if inner.opts.background_reclaim {
            let inner2 = inner.clone();
            cache.reclaimer = Some(
                std::thread::Builder::new()
                    .name("churnlog-reclaimer".into())
                    .spawn(move || reclaimer::run(inner2))
                    .map_err(|source| OpenError::Io { op: "spawn reclaimer", source })?,
            );
        }
        Ok(cache)
    }

    pub fn options(&self) -> &Options {
        &self.inner.opts
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// This cache's identity: the random salt made when its directory was created. A new
    /// cache directory (a replaced disk, another process server) has a different one.
    pub fn cache_id(&self) -> u64 {
        self.inner.salt
    }

    pub fn backend_name(&self) -> &'static str {
        self.inner.storage.backend_name()
    }

    /// The stream for (`machine`, `disk`), created (and made durable in META) when new.
    pub fn stream(&self, machine: &str, disk: &str) -> Result<StreamId, StreamError> {
        for part in [machine, disk] {
            if part.is_empty() || part.len() > format::STREAM_KEY_LEN_MAX {
                return Err(StreamError::BadKey(part.to_string()));
            }
        }
        let key = (machine.to_string(), disk.to_string());
        if let Some(&id) = self.inner.log.read().by_key.get(&key) {
            return Ok(StreamId(id));
        }
        if self.inner.opts.read_only {
            return Err(StreamError::ReadOnly);
        }
        let mut generation = self.inner.meta_lock.lock();
        if let Some(&id) = self.inner.log.read().by_key.get(&key) {
            return Ok(StreamId(id));
        }
        let id = self.inner.log.read().streams.len() as u32;
        if id >= format::STREAMS_MAX {
            return Err(StreamError::TooMany(format::STREAMS_MAX));
        }
        self.inner
            .write_meta(&mut generation, |m| {
                m.streams.push(MetaStream {
                    id,
                    machine: key.0.clone(),
                    disk: key.1.clone(),
                    uploaded_upto: 0,
                    resync_required: false,
                    evicted_upto: 0,
                    resync_base: 0,
                })
            })
            .map_err(StreamError::Io)?;
        let mut append = self.inner.append.lock();
        let mut log = self.inner.log.write();
        append.next_seq.push(1);
        log.streams.push(StreamState {
            machine: key.0.clone(),
            disk: key.1.clone(),
            resync_required: false,
            evicted_upto: 0,
            resync_base: 0,
            index: StreamIndex::new(0),
        });
        log.by_key.insert(key, id);
        Ok(StreamId(id))
    }

    pub fn find_stream(&self, machine: &str, disk: &str) -> Option<StreamId> {
        self.inner.log.read().by_key.get(&(machine.to_string(), disk.to_string())).map(|&id| StreamId(id))
    }

    /// Appends one record to `stream`. Returns at once with a ticket that resolves when
    /// the record is durable ([`AppendTicket::wait`], or `.await`). Between the watermarks
    /// the call sleeps a little (throttling); at the hard watermark it fails with
    /// [`AppendError::Backpressure`].
    pub fn append(&self, stream: StreamId, data: &[u8]) -> Result<AppendTicket, AppendError> {
        let inner = &self.inner;
        if data.is_empty() {
            return Err(AppendError::EmptyRecord);
        }
        if data.len() > inner.opts.record_size_max as usize {
            return Err(AppendError::RecordTooLarge { len: data.len(), max: inner.opts.record_size_max });
        }
        match inner.space_state() {
            (_, SpaceState::Normal) => {}
            (used, SpaceState::Full) => {
                inner.counters.backpressure_refusals.fetch_add(1, Ordering::Relaxed);
                inner.wake_reclaimer();
                return Err(AppendError::Backpressure { used_bytes: used, capacity_bytes: inner.opts.capacity_bytes });
            }
            (used, SpaceState::Throttling) => {
                inner.counters.throttled_appends.fetch_add(1, Ordering::Relaxed);
                inner.wake_reclaimer();
                let (soft, hard) = (inner.soft_limit_bytes() as f64, inner.hard_limit_bytes() as f64);
                let frac = ((used as f64 - soft) / (hard - soft).max(1.0)).clamp(0.05, 1.0);
                std::thread::sleep(Duration::from_micros((inner.opts.throttle_delay_us_max as f64 * frac) as u64));
            }
        }
        let (ratio_max, acceleration) = (inner.opts.compress_ratio_max, inner.effort.acceleration());
        let hinted = inner.compress_hints.last_compressed(stream.0);
        compress::encode_hinted(data, ratio_max, acceleration, hinted, |codec, stored, crc| {
            inner.compress_hints.record(stream.0, codec);
            inner.enqueue(stream.0, None, Encoded { codec, stored, logical_len: data.len() as u32, payload_crc: crc })
        })
    }

    /// Reads record `seq` of `stream`, verified (header, CRC, length) and decompressed.
    pub fn read(&self, stream: StreamId, seq: u64) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        self.read_into(stream, seq, &mut out)?;
        Ok(out)
    }

    /// [`Cache::read`] into a caller's buffer (cleared first), to reuse allocations.
    pub fn read_into(&self, stream: StreamId, seq: u64, out: &mut Vec<u8>) -> Result<(), ReadError> {
        let mut raw = Vec::new();
        self.read_stored_with(stream, seq, &mut raw, |stored| {
            compress::decode_into(stored.codec, stored.bytes, stored.logical_len as usize, out)
        })?
        .map_err(|what| self.corruption(stream, seq, what))
    }

    /// Reads record `seq` of `stream` verified (header, CRC, lengths) but not decompressed,
    /// and hands its stored form to `f`. `scratch` holds the raw bytes (reused across
    /// calls). The drain ships records this way, so compressed data stays compressed.
    pub fn read_stored_with<R>(
        &self,
        stream: StreamId,
        seq: u64,
        scratch: &mut Vec<u8>,
        f: impl FnOnce(StoredRecord<'_>) -> R,
    ) -> Result<R, ReadError> {
        let (mut f, mut out) = (Some(f), None);
        self.read_stored_run(stream, seq, seq, usize::MAX, scratch, |_, stored| {
            out = f.take().map(|f| f(stored));
            false
        })?;
        Ok(out.expect("a run of one record reads that record or fails"))
    }

    /// Reads records `from..=upto` of `stream` in their stored form, several per system
    /// call: records that sit close together in one segment (gaps of at most
    /// `RUN_GAP_MAX` bytes, a span of at most `span_bytes_max`) are read with one
    /// positioned read, then checked one by one exactly as [`Cache::read_stored_with`]
    /// checks them and handed to `f` in order. `f` returns false to stop. Returns how many
    /// records `f` accepted. The drain reads a whole object's worth this way.
    pub fn read_stored_run(
        &self,
        stream: StreamId,
        from: u64,
        upto: u64,
        span_bytes_max: usize,
        scratch: &mut Vec<u8>,
        mut f: impl FnMut(u64, StoredRecord<'_>) -> bool,
    ) -> Result<u64, ReadError> {
        const RUN_GAP_MAX: u64 = 64 << 10;
        let mut seq = from;
        let mut accepted = 0;
        while seq <= upto {
            // The run: locations gathered under the lock, read after it is released.
            let (file, segment, locs) = {
                let log = self.inner.log.read();
                let st = log.streams.get(stream.0 as usize).ok_or(ReadError::UnknownStream(stream))?;
                let first = st.live_loc(stream, seq)?;
                let start = u64::from(first.offset);
                let mut end = start + (RECORD_HEADER_LEN as u64) + u64::from(first.stored_len);
                let mut locs = vec![first];
                let mut next = seq + 1;
                while next <= upto {
                    let Some(l) = st.index.get(next) else { break };
                    let l_end = u64::from(l.offset) + RECORD_HEADER_LEN as u64 + u64::from(l.stored_len);
                    if l.segment != first.segment
                        || u64::from(l.offset) < end
                        || u64::from(l.offset) - end > RUN_GAP_MAX
                        || l_end - start > span_bytes_max as u64
                    {
                        break;
                    }
                    end = l_end;
                    locs.push(l);
                    next += 1;
                }
                let seg = log.segments.get(&u64::from(first.segment)).expect("index points at a live segment");
                (seg.file.clone(), first.segment, locs)
            };
            let start = u64::from(locs[0].offset);
            let last = locs[locs.len() - 1];
            let end = u64::from(last.offset) + RECORD_HEADER_LEN as u64 + u64::from(last.stored_len);
            scratch.clear();
            scratch.resize((end - start) as usize, 0);
            self.inner.read_span(u64::from(segment), &*file, start, scratch).map_err(|source| ReadError::Io {
                stream,
                seq,
                source,
            })?;
            for loc in &locs {
                let at = (u64::from(loc.offset) - start) as usize;
                let raw = &scratch[at..at + RECORD_HEADER_LEN + loc.stored_len as usize];
                let header = check_record(raw, stream.0, seq, loc).map_err(|what| ReadError::Corruption {
                    stream,
                    seq,
                    segment: u64::from(segment),
                    offset: u64::from(loc.offset),
                    what,
                })?;
                let stored = StoredRecord {
                    codec: header.codec,
                    logical_len: header.logical_len,
                    bytes: &raw[RECORD_HEADER_LEN..],
                    crc: header.payload_crc,
                };
                if !f(seq, stored) {
                    return Ok(accepted);
                }
                accepted += 1;
                seq += 1;
            }
        }
        Ok(accepted)
    }

    /// A corruption found after the checks of [`Cache::read_stored_with`] (decompression),
    /// reported with the record's location in the cache.
    pub(crate) fn corruption(&self, stream: StreamId, seq: u64, what: String) -> ReadError {
        let (segment, offset) =
            self.locate(stream, seq).map_or((0, 0), |(l, _)| (u64::from(l.segment), u64::from(l.offset)));
        ReadError::Corruption { stream, seq, segment, offset, what }
    }

    /// Location of a live durable record and a handle on its segment file.
    fn locate(&self, stream: StreamId, seq: u64) -> Result<(Loc, Arc<dyn StorageFile>), ReadError> {
        let log = self.inner.log.read();
        let st = log.streams.get(stream.0 as usize).ok_or(ReadError::UnknownStream(stream))?;
        let loc = st.live_loc(stream, seq)?;
        let seg = log.segments.get(&u64::from(loc.segment)).expect("index points at a live segment");
        Ok((loc, seg.file.clone()))
    }

    /// Where a live record sits: (segment id, offset of its record header, stored length).
    /// For tests and forensics.
    #[doc(hidden)]
    pub fn record_location(&self, stream: StreamId, seq: u64) -> Option<(u64, u64, u32)> {
        self.locate(stream, seq).ok().map(|(loc, _)| (u64::from(loc.segment), u64::from(loc.offset), loc.stored_len))
    }

    /// Marks every record of `stream` up to `upto` as uploaded, persisting the cursor
    /// crash-atomically before any space is given back.
    pub fn ack(&self, stream: StreamId, upto: u64) -> Result<(), StreamError> {
        self.ack_many(&[(stream, upto)])
    }

    /// [`Cache::ack`] for several streams with one META write: all are checked first and
    /// either every cursor moves or none does. An uploader that finishes several streams
    /// at once pays one atomic rewrite (two fsyncs) instead of one per stream. Pairs that
    /// move nothing are skipped (nothing is written if none moves); a stream named twice
    /// moves to the higher of the two.
    pub fn ack_many(&self, acks: &[(StreamId, u64)]) -> Result<(), StreamError> {
        let inner = &self.inner;
        if inner.opts.read_only {
            return Err(StreamError::ReadOnly);
        }
        let mut generation = inner.meta_lock.lock();
        let mut moving: BTreeMap<u32, u64> = BTreeMap::new();
        {
            let log = inner.log.read();
            for &(stream, upto) in acks {
                let st = log.streams.get(stream.0 as usize).ok_or(StreamError::UnknownStream(stream))?;
                let durable = st.index.durable_upto();
                if upto > durable {
                    return Err(StreamError::BeyondDurable { stream, upto, durable });
                }
                if upto > st.index.uploaded_upto() {
                    let to = moving.entry(stream.0).or_insert(upto);
                    *to = (*to).max(upto);
                }
            }
        }
        if moving.is_empty() {
            return Ok(());
        }
        inner
            .write_meta(&mut generation, |m| {
                for (&stream, &upto) in &moving {
                    m.streams[stream as usize].uploaded_upto = upto;
                }
            })
            .map_err(StreamError::Io)?;
        {
            let mut log = inner.log.write();
            for (&stream, &upto) in &moving {
                log.release_upto(stream, upto);
            }
        }
        drop(generation);
        inner.wake_reclaimer();
        Ok(())
    }

    /// Drops every durable, unuploaded record of `stream` and marks it resync required:
    /// the explicit last resort when space must be found. Never silent: it returns what
    /// was dropped, logs it, and records a [`CacheEvent::StreamEvicted`].
    pub fn evict_stream(&self, stream: StreamId, reason: &str) -> Result<EvictReport, StreamError> {
        reclaimer::evict(&self.inner, stream, reason)
    }

    /// Records that a resync of `stream` began with its record `base_seq` (which must be
    /// durable and later than every dropped record) and clears the resync-required mark.
    pub fn clear_resync(&self, stream: StreamId, base_seq: u64) -> Result<(), StreamError> {
        let inner = &self.inner;
        if inner.opts.read_only {
            return Err(StreamError::ReadOnly);
        }
        let mut generation = inner.meta_lock.lock();
        {
            let log = inner.log.read();
            let st = log.streams.get(stream.0 as usize).ok_or(StreamError::UnknownStream(stream))?;
            if base_seq <= st.evicted_upto || base_seq > st.index.durable_upto() {
                return Err(StreamError::ResyncBase { base_seq, evicted_upto: st.evicted_upto });
            }
        }
        inner
            .write_meta(&mut generation, |m| {
                let s = &mut m.streams[stream.0 as usize];
                s.resync_required = false;
                s.resync_base = base_seq;
            })
            .map_err(StreamError::Io)?;
        let mut log = inner.log.write();
        let st = &mut log.streams[stream.0 as usize];
        st.resync_required = false;
        st.resync_base = base_seq;
        Ok(())
    }

    /// One reclaim pass now: free fully uploaded segments, compact sparse old ones, and
    /// apply the eviction policy. The background reclaimer runs the same pass.
    pub fn reclaim(&self) -> Result<ReclaimReport, ReclaimError> {
        reclaimer::reclaim_pass(&self.inner)
    }

    /// The oldest segments still in use and which streams keep them (live records).
    pub fn reclaim_blockers(&self, segments_max: usize) -> Vec<SegmentBlockers> {
        reclaimer::blockers(&self.inner, segments_max)
    }

    pub fn stream_info(&self, stream: StreamId) -> Option<StreamInfo> {
        let log = self.inner.log.read();
        log.streams.get(stream.0 as usize).map(|st| stream_info(stream, st))
    }

    pub fn streams(&self) -> Vec<StreamInfo> {
        let log = self.inner.log.read();
        log.streams.iter().enumerate().map(|(i, st)| stream_info(StreamId(i as u32), st)).collect()
    }

    pub fn space(&self) -> SpaceReport {
        let inner = &self.inner;
        let (used, state) = inner.space_state();
        let ratio = used as f64 / inner.opts.capacity_bytes as f64;
        SpaceReport {
            capacity_bytes: inner.opts.capacity_bytes,
            used_bytes: used,
            segments_in_use: inner.segments_in_use.load(Ordering::Relaxed),
            segments_recycled: inner.log.read().recycled.len() as u64,
            usage_ratio: ratio,
            soft_watermark: inner.opts.soft_watermark,
            hard_watermark: inner.opts.hard_watermark,
            state,
        }
    }

    /// LZ4 acceleration producers use now (cheaper than [`Cache::stats`]).
    pub fn lz4_acceleration(&self) -> u32 {
        self.inner.effort.acceleration()
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let log = self.inner.log.read();
        let (index_bytes, index_records) = log
            .streams
            .iter()
            .fold((0u64, 0u64), |(b, r), s| (b + s.index.heap_bytes() as u64, r + s.index.len() as u64));
        CacheStats {
            batches: c.batches.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            logical_bytes: c.logical_bytes.load(Ordering::Relaxed),
            stored_bytes: c.stored_bytes.load(Ordering::Relaxed),
            device_bytes: c.device_bytes.load(Ordering::Relaxed),
            meta_writes: c.meta_writes.load(Ordering::Relaxed),
            meta_bytes: c.meta_bytes.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            throttled_appends: c.throttled_appends.load(Ordering::Relaxed),
            backpressure_refusals: c.backpressure_refusals.load(Ordering::Relaxed),
            rewritten_records: c.rewritten_records.load(Ordering::Relaxed),
            segments_freed: c.segments_freed.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            read_bytes_memory: c.read_bytes_memory.load(Ordering::Relaxed),
            read_bytes_device: c.read_bytes_device.load(Ordering::Relaxed),
            tail_cache_bytes: self.inner.recent.lock().bytes() as u64,
            index_bytes,
            index_records,
            lz4_acceleration: self.inner.effort.acceleration(),
        }
    }

    /// Reads back and checks every cached record (see [`verify`]).
    pub fn verify(&self) -> VerifyReport {
        verify::verify(self)
    }

    pub fn events(&self) -> Vec<CacheEvent> {
        self.inner.events.lock().iter().cloned().collect()
    }

    pub fn is_poisoned(&self) -> bool {
        self.inner.is_poisoned()
    }

    /// Writes what is pending, seals the open segment (so the next open reads only
    /// summaries) and stops the background threads.
    pub fn close(mut self) -> Result<(), CloseError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), CloseError> {
        self.inner.shutdown.store(true, Ordering::Release);
        {
            let mut st = self.inner.append.lock();
            st.closing = true;
        }
        self.inner.work_cv.notify_all();
        self.inner.wake_reclaimer();
        if let Some(r) = self.reclaimer.take() {
            let _ = r.join();
        }
        match self.flusher.take() {
            Some(f) => f.join().unwrap_or_else(|_| {
                Err(CloseError::Io(IoFailure {
                    op: "join flusher",
                    kind: std::io::ErrorKind::Other,
                    message: "flusher panicked".into(),
                }))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "cache closed with an error");
        }
    }
}

fn stream_info(id: StreamId, st: &StreamState) -> StreamInfo {
    StreamInfo {
        id,
        machine: st.machine.clone(),
        disk: st.disk.clone(),
        uploaded_upto: st.index.uploaded_upto(),
        durable_upto: st.index.durable_upto(),
        records: st.index.len() as u64,
        logical_bytes: st.index.logical_bytes(),
        stored_bytes: st.index.stored_bytes(),
        resync_required: st.resync_required,
        evicted_upto: st.evicted_upto,
        resync_base: st.resync_base,
    }
}

/// Checks a record read back at an index location: header fields, payload CRC.
pub(crate) fn check_record(raw: &[u8], stream: u32, seq: u64, loc: &Loc) -> Result<RecordHeader, String> {
    let header = RecordHeader::decode(raw).map_err(|e| format!("record header: {e}"))?;
    if header.stream != stream || header.seq != seq {
        return Err(format!("header names stream {} seq {}", header.stream, header.seq));
    }
    if header.stored_len != loc.stored_len || header.logical_len != loc.logical_len {
        return Err(format!("header lengths {}/{} differ from the index", header.stored_len, header.logical_len));
    }
    let payload = &raw[RECORD_HEADER_LEN..RECORD_HEADER_LEN + header.stored_len as usize];
    if format::crc32(payload) != header.payload_crc {
        return Err("payload checksum mismatch".into());
    }
    Ok(header)
}
