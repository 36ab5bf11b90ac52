//! Untrusted bytes on the cache disk: a cache directory (META and segment files) built
//! from the fuzzer's input, in the fault-injecting in-memory storage. Opening it, in
//! strict and in salvage mode, must succeed or fail with a typed error, never panic; once
//! open, every record read back is served only after its checks (verify reads them all).
//!
//! Input: a sequence of files, each `kind u8 | len u16 LE | bytes[len]`; kind 0 is META,
//! kind k > 0 is segment k. A segment shorter than the segment size is zero-filled to it,
//! so seeds keep only the bytes that matter.
#![no_main]

use std::sync::Arc;

use churnlog::cache::flusher_test_support::segment_file_name;
use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::io::Storage;
use churnlog::cache::{Cache, Options, RecoveryMode};
use libfuzzer_sys::fuzz_target;

pub const SEGMENT_SIZE: u64 = 64 << 10;

fn options(mode: RecoveryMode) -> Options {
    Options {
        segment_size: SEGMENT_SIZE,
        capacity_bytes: 16 * SEGMENT_SIZE,
        commit_bytes_max: 16 << 10,
        record_size_max: 8 << 10,
        background_reclaim: false,
        // No preparer thread and one LZ4 effort: the same input does the same storage
        // work every run (what libFuzzer assumes), and one thread fewer per open.
        segment_preparer_thread: false,
        lz4_acceleration_max: 1,
        recovery_mode: mode,
        ..Options::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let storage = FaultStorage::new();
    let mut at = 0usize;
    while at + 3 <= data.len() {
        let kind = data[at];
        let len = u16::from_le_bytes([data[at + 1], data[at + 2]]) as usize;
        at += 3;
        let bytes = &data[at..(at + len).min(data.len())];
        at += len;
        let name = if kind == 0 { "META".to_string() } else { segment_file_name(u64::from(kind % 8)) };
        let Ok(file) = storage.open(&name, true) else { return };
        if file.write_all_at(bytes, 0).is_err() {
            return;
        }
        if kind != 0 && (bytes.len() as u64) < SEGMENT_SIZE && file.set_len(SEGMENT_SIZE).is_err() {
            return;
        }
        let _ = file.sync_data();
    }
    let _ = storage.sync_dir();
    for mode in [RecoveryMode::FailOnCorruption, RecoveryMode::SalvageMarkResync] {
        // Each mode opens its own copy: salvage may rewrite what it found.
        let copy = storage.snapshot();
        if let Ok(cache) = Cache::open_with_storage(Arc::new(copy), options(mode)) {
            let report = cache.verify();
            for s in &report.streams {
                // What verify found corrupt must not be served by a plain read either.
                for &(lo, hi) in &s.corrupt_ranges {
                    for seq in lo..=hi.min(lo + 16) {
                        assert!(cache.read(s.stream, seq).is_err(), "a corrupt record was served");
                    }
                }
            }
            let _ = cache.close();
        }
    }
});
