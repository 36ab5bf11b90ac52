//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod ps_child;
pub mod rig;

use std::sync::Arc;

use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::{Cache, OpenError, Options};

pub fn data(stream: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    churnlog::bench::record_bytes(stream, seq, len, if seq.is_multiple_of(2) { 0.6 } else { 0.0 }, &mut out);
    out
}

/// Small everything, no background threads but the flusher: many seals per test.
pub fn tiny_options() -> Options {
    Options {
        capacity_bytes: 4 << 20,
        segment_size: 64 << 10,
        record_size_max: 4 << 10,
        commit_bytes_max: 16 << 10,
        background_reclaim: false,
        ..Options::default()
    }
}

pub fn open(st: &FaultStorage, opts: &Options) -> Result<Cache, OpenError> {
    Cache::open_with_storage(Arc::new(st.clone()), opts.clone())
}

/// kill -9: the device stops taking writes, the process goes, volatile state is lost.
pub fn kill(st: &FaultStorage, cache: Cache, seed: u64) {
    st.power_cut_after(0);
    drop(cache);
    st.crash(seed);
}

/// Name of the newest segment file.
pub fn newest_segment(st: &FaultStorage) -> String {
    st.names().into_iter().filter(|n| n.starts_with("seg-")).max().expect("a segment")
}

pub fn segments(st: &FaultStorage) -> Vec<String> {
    st.names().into_iter().filter(|n| n.starts_with("seg-")).collect()
}
