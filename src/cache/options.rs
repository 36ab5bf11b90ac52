//! Engine options, with the checks that keep them inside the format's limits.

use std::time::Duration;

use super::format::{BLOCK_SIZE, RECORD_SIZE_CAP, SEGMENT_SIZE_CAP, SEGMENT_SIZE_MIN};
pub use super::io::IoBackend;

/// What recovery does with damage it finds on open. Compare RocksDB's WAL recovery modes.
///
/// A torn tail — bytes of the newest segment that a crash cut short and that were never
/// acknowledged — is not damage: every mode truncates it. Damage is anything that was
/// acknowledged and no longer reads back: a bad checksum in a sealed segment, or a bad
/// batch in the newest segment that a later valid batch proves was durable.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Refuse to open: `OpenError::Corruption` carries the report (streams and sequence
    /// ranges affected). Nothing is changed on disk. The default: a process server must
    /// not quietly continue over lost acknowledged data.
    #[default]
    FailOnCorruption,
    /// Open anyway: every damaged stream — one with a hole in its sequence, or with records
    /// in a damaged segment — is evicted (its unuploaded records dropped, as
    /// `evict_stream` does) and marked *resync required* (persisted, listed in the report
    /// and in the cache's events). The operator's way forward after a media error.
    SalvageMarkResync,
}

/// Last-resort space policy, applied only at the hard watermark once reclaim and
/// compaction cannot free enough.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Never drop unuploaded data on the engine's own initiative: producers get
    /// `Backpressure` until the drain catches up or an operator calls `evict_stream`.
    #[default]
    Never,
    /// Evict the stream holding the most unuploaded bytes and mark it resync required.
    LargestBacklog,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub io_backend: IoBackend,
    /// Upper bound on the bytes of segment files the cache keeps.
    pub capacity_bytes: u64,
    /// Size of each preallocated segment file (a new cache only; an existing one keeps its own).
    pub segment_size: u64,
    /// Largest record a producer may append (logical bytes).
    pub record_size_max: u32,
    /// Group commit: a batch closes once it holds this many bytes.
    pub commit_bytes_max: u32,
    /// Group commit: when the last batch held several records (producers are busy), the
    /// flusher may wait up to this long for a batch to fill. A lone write is never delayed.
    pub commit_window_us: u64,
    /// Usage fraction at which appends are slowed down.
    pub soft_watermark: f64,
    /// Usage fraction at which appends fail with `Backpressure`.
    pub hard_watermark: f64,
    /// Longest sleep imposed on one append between the soft and hard watermarks.
    pub throttle_delay_us_max: u64,
    pub recovery_mode: RecoveryMode,
    pub eviction: EvictionPolicy,
    /// Sealed segments with at most this fraction of live bytes are compacted...
    pub compact_live_ratio_max: f64,
    /// ...once usage reaches this fraction of capacity (compaction costs write bandwidth).
    pub compact_usage_min: f64,
    /// Freed segment files kept for reuse instead of deleted (saves allocation).
    pub segments_recycle_max: usize,
    /// Memory for the newest written batches, so a reader close behind the writer (the
    /// drain) is served from RAM rather than the device; 0 turns it off.
    pub tail_cache_bytes: usize,
    /// LZ4 a record only when it shrinks to at most this fraction.
    pub compress_ratio_max: f64,
    /// Highest LZ4 acceleration the effort controller may use when the CPU, not the disk,
    /// is the bottleneck (1 = always standard LZ4, the best ratio). Measured on 64 KiB
    /// records of source code and of binaries, 4 stores 7–8 % more bytes than 1 for about
    /// a quarter more speed; on data with incompressible stretches (the 2:1 benchmark data)
    /// it is about 2× faster at the same ratio. See `docs/performance.md`.
    pub lz4_acceleration_max: u32,
    /// Run the background reclaimer; tests switch it off and call `reclaim` themselves.
    pub background_reclaim: bool,
    /// Make the next segment's file on a thread of its own, ahead of rotation (the
    /// default). Off: the flusher makes it itself right after opening a segment, so the
    /// same files appear on disk in a fixed order (the power-loss simulation relies on
    /// this to replay a seed exactly).
    pub segment_preparer_thread: bool,
    pub reclaim_interval: Duration,
    /// Open for inspection only: no file is created, changed or removed.
    pub read_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            io_backend: IoBackend::Auto,
            capacity_bytes: 16 << 30,
            segment_size: 128 << 20,
            record_size_max: 1 << 20,
            commit_bytes_max: 4 << 20,
            commit_window_us: 0,
            soft_watermark: 0.80,
            hard_watermark: 0.95,
            throttle_delay_us_max: 5_000,
            recovery_mode: RecoveryMode::default(),
            eviction: EvictionPolicy::default(),
            compact_live_ratio_max: 0.25,
            compact_usage_min: 0.50,
            segments_recycle_max: 4,
            tail_cache_bytes: 64 << 20,
            compress_ratio_max: 0.90,
            lz4_acceleration_max: 4,
            background_reclaim: true,
            segment_preparer_thread: true,
            reclaim_interval: Duration::from_millis(200),
            read_only: false,
        }
    }
}

impl Options {
    /// Small segments and batches: for tests and examples that want many seals.
    pub fn small_for_tests() -> Options {
        Options {
            capacity_bytes: 64 << 20,
            segment_size: 256 << 10,
            record_size_max: 32 << 10,
            commit_bytes_max: 64 << 10,
            background_reclaim: false,
            ..Options::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let seg = self.segment_size;
        if !(SEGMENT_SIZE_MIN..=SEGMENT_SIZE_CAP).contains(&seg) || !seg.is_multiple_of(BLOCK_SIZE) {
            return Err(format!(
                "segment_size {seg} must be a multiple of {BLOCK_SIZE} in {SEGMENT_SIZE_MIN}..={SEGMENT_SIZE_CAP}"
            ));
        }
        if self.record_size_max == 0 || self.record_size_max > RECORD_SIZE_CAP {
            return Err(format!("record_size_max must be in 1..={RECORD_SIZE_CAP}"));
        }
        let min_batch = self.record_size_max as u64 + 96;
        if (self.commit_bytes_max as u64) < min_batch {
            return Err(format!("commit_bytes_max must hold one largest record ({min_batch} bytes)"));
        }
        if self.commit_bytes_max as u64 * 4 > seg {
            return Err("commit_bytes_max must be at most a quarter of segment_size".into());
        }
        if self.capacity_bytes < seg * 4 {
            return Err(format!("capacity_bytes must hold at least 4 segments ({} bytes)", seg * 4));
        }
        let fractions = [
            ("soft_watermark", self.soft_watermark),
            ("hard_watermark", self.hard_watermark),
            ("compact_live_ratio_max", self.compact_live_ratio_max),
            ("compact_usage_min", self.compact_usage_min),
            ("compress_ratio_max", self.compress_ratio_max),
        ];
        for (name, v) in fractions {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be a fraction in 0..=1, got {v}"));
            }
        }
        super::effort::check_acceleration_max(self.lz4_acceleration_max)?;
        if self.soft_watermark > self.hard_watermark {
            return Err("soft_watermark must not exceed hard_watermark".into());
        }
        Ok(())
    }

    /// Whole segments the capacity allows.
    pub fn segment_count_max(&self) -> u64 {
        self.capacity_bytes / self.segment_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_out_of_range_values_are_refused_by_name() {
        assert_eq!(Options::default().validate(), Ok(()));
        assert_eq!(Options::small_for_tests().validate(), Ok(()));
        for bad in [0, super::super::effort::LZ4_ACCELERATION_CAP + 1] {
            let o = Options { lz4_acceleration_max: bad, ..Options::default() };
            assert!(o.validate().unwrap_err().contains("lz4_acceleration_max"), "{bad}");
        }
        let o = Options { compress_ratio_max: 1.5, ..Options::default() };
        assert!(o.validate().unwrap_err().contains("compress_ratio_max"));
        let o = Options { commit_bytes_max: 1 << 30, ..Options::default() };
        assert!(o.validate().unwrap_err().contains("commit_bytes_max"));
    }
}
