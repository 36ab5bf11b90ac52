//! `churnlog bench recover`: how long opening an existing cache takes.

use std::path::Path;
use std::time::Instant;

use crate::cache::{Cache, Options};

#[derive(Clone, Debug, serde::Serialize)]
pub struct RecoverResult {
    pub open_seconds: f64,
    pub records: u64,
    pub index_bytes: u64,
    pub index_bytes_per_record: f64,
    pub segments: usize,
    pub segments_scanned: usize,
    pub metadata_bytes_read: u64,
    pub scanned_bytes_read: u64,
    pub cached_logical_bytes: u64,
}

pub fn run(dir: &Path, options: Options) -> anyhow::Result<RecoverResult> {
    anyhow::ensure!(dir.join("META").exists(), "{} holds no churnlog cache (no META)", dir.display());
    let started = Instant::now();
    let cache = Cache::open(dir, options)?;
    let open_seconds = started.elapsed().as_secs_f64();
    let stats = cache.stats();
    let report = cache.recovery_report().clone();
    let cached: u64 = cache.streams().iter().map(|s| s.logical_bytes).sum();
    drop(cache);
    Ok(RecoverResult {
        open_seconds,
        records: stats.index_records,
        index_bytes: stats.index_bytes,
        index_bytes_per_record: if stats.index_records > 0 {
            stats.index_bytes as f64 / stats.index_records as f64
        } else {
            0.0
        },
        segments: report.segments,
        segments_scanned: report.segments_scanned.len(),
        metadata_bytes_read: report.metadata_bytes_read,
        scanned_bytes_read: report.scanned_bytes_read,
        cached_logical_bytes: cached,
    })
}
impl std::fmt::Display for RecoverResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recover: opened in {:.3} s: {} records ({} MiB cached), index {} bytes ({:.1} per record), {} segments, {} scanned",
            self.open_seconds,
            self.records,
            self.cached_logical_bytes >> 20,
            self.index_bytes,
            self.index_bytes_per_record,
            self.segments,
            self.segments_scanned
        )
    }
}
