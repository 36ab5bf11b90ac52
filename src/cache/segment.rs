//! Segments as files: their names (`seg-<id>.log`, `recycle-<id>.log`) and how a name is
//! parsed back, making a segment's file (a recycled file renamed, or a new one allocated,
//! then the directory synced), and sealing a segment (summary batch + trailer + sync).
//! The flusher rotates and seals, the preparer makes files ahead of rotation, recovery
//! parses names and seals the segment a crash left open, and the reclaimer recycles: each
//! of them uses this file, which uses none of them (they used to import each other).

use std::sync::Arc;

use super::format::{
    align_up, batch_crc_start, seal_batch_crc, trailer_offset, BatchHeader, BatchKind, SummaryEntry, Trailer,
    BATCH_HEADER_LEN, BLOCK_SIZE, SUMMARY_ENTRY_LEN,
};
use super::io::StorageFile;
use super::state::Inner;

const SEGMENT_PREFIX: &str = "seg-";
const RECYCLE_PREFIX: &str = "recycle-";

pub(crate) fn segment_name(id: u64) -> String {
    format!("{SEGMENT_PREFIX}{id:016x}.log")
}

pub(crate) fn recycle_name(id: u64) -> String {
    format!("{RECYCLE_PREFIX}{id:016x}.log")
}

/// The name of segment `id`'s file, for tests and tools that inspect a cache directory.
#[doc(hidden)]
pub fn segment_file_name(id: u64) -> String {
    segment_name(id)
}

/// The id of a segment file's name (`seg-<16 hex digits>.log`).
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    parse_name(name, SEGMENT_PREFIX)
}

/// The id of a recycled file's name (`recycle-<16 hex digits>.log`).
pub(crate) fn parse_recycle_name(name: &str) -> Option<u64> {
    parse_name(name, RECYCLE_PREFIX)
}

fn parse_name(name: &str, prefix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The segment being appended to.
pub(crate) struct OpenSegment {
    pub id: u64,
    pub file: Arc<dyn StorageFile>,
    pub seed: u32,
    /// Where the next batch goes; everything before it is durable.
    pub write_offset: u64,
    pub summary: Vec<SummaryEntry>,
    pub last_batch_no: u64,
}

/// Seals `seg`: writes its summary batch at the end of its data and its trailer in its
/// last block, then syncs. Used by the flusher on rotation and close, and by recovery for
/// a segment left open by a crash.
pub(crate) fn seal_segment(seg: &OpenSegment, segment_size: u64) -> Result<(), (bool, std::io::Error)> {
    let summary_len = BATCH_HEADER_LEN + seg.summary.len() * SUMMARY_ENTRY_LEN;
    let aligned = align_up(summary_len as u64, BLOCK_SIZE) as usize;
    assert!(seg.write_offset + aligned as u64 <= trailer_offset(segment_size), "summary space was reserved");
    let mut buf = vec![0u8; aligned];
    let header = BatchHeader {
        kind: BatchKind::Summary,
        batch_len: summary_len as u32,
        segment_id: seg.id,
        batch_no: seg.last_batch_no,
        offset: seg.write_offset as u32,
        durable_end: seg.write_offset as u32,
        count: seg.summary.len() as u32,
    };
    header.encode(&mut buf);
    for (i, e) in seg.summary.iter().enumerate() {
        e.encode(&mut buf[BATCH_HEADER_LEN + i * SUMMARY_ENTRY_LEN..]);
    }
    let mut crc = batch_crc_start(seg.seed, &buf);
    crc.update(&buf[BATCH_HEADER_LEN..summary_len]);
    seal_batch_crc(&mut buf, crc.finalize());
    seg.file.write_all_at(&buf, seg.write_offset).map_err(|e| (false, e))?;
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    Trailer {
        summary_offset: seg.write_offset as u32,
        summary_len: summary_len as u32,
        count: seg.summary.len() as u32,
        segment_id: seg.id,
        last_batch_no: seg.last_batch_no,
    }
    .encode(seg.seed, &mut block);
    seg.file.write_all_at(&block, trailer_offset(segment_size)).map_err(|e| (false, e))?;
    seg.file.sync_data().map_err(|e| (true, e))
}

/// Why a segment file could not be made.
pub(crate) enum PrepareError {
    NoSpace(String),
    Io(&'static str, std::io::Error),
    /// The directory sync failed: whether the name is durable is unknown.
    DirSync(std::io::Error),
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrepareError::NoSpace(why) => write!(f, "no space: {why}"),
            PrepareError::Io(op, e) => write!(f, "{op}: {e}"),
            PrepareError::DirSync(e) => write!(f, "fsync directory: {e}"),
        }
    }
}

/// Makes the file of segment `id`: a recycled file renamed, or a new one allocated, then
/// the directory synced so the name survives a crash.
pub(crate) fn make_segment_file(inner: &Inner, id: u64) -> Result<Arc<dyn StorageFile>, PrepareError> {
    if id >= u64::from(u32::MAX) {
        return Err(PrepareError::NoSpace("segment id space exhausted".into()));
    }
    let (in_use, recycled) = {
        let mut log = inner.log.write();
        (log.segments.len() as u64, log.recycled.pop())
    };
    // `in_use` counts the open segment; this file becomes the next one.
    if in_use + 1 > inner.opts.segment_count_max() {
        if let Some(r) = recycled {
            inner.log.write().recycled.push(r);
        }
        return Err(PrepareError::NoSpace(format!(
            "capacity of {} segments is in use",
            inner.opts.segment_count_max()
        )));
    }
    let name = segment_name(id);
    let file = match recycled {
        Some(old) => {
            if let Err(e) = inner.storage.rename(&old, &name) {
                inner.log.write().recycled.push(old);
                return Err(PrepareError::Io("rename recycled segment", e));
            }
            inner.storage.open(&name, false).map_err(|e| PrepareError::Io("open segment", e))?
        }
        None => {
            let file = inner.storage.open(&name, true).map_err(|e| PrepareError::Io("create segment", e))?;
            if let Err(e) = file.allocate(inner.opts.segment_size) {
                let _ = inner.storage.remove(&name);
                return Err(PrepareError::Io("allocate segment", e));
            }
            file
        }
    };
    inner.storage.sync_dir().map_err(PrepareError::DirSync)?;
    Ok(file)
}
