//! The read path: a live record's location is taken from the index under the log's read
//! lock, the bytes are read after it is released (from the tail cache of just-written
//! batches where it holds them, from the segment file otherwise) and every record is
//! checked (header against the index, payload CRC) before anyone sees it. The facade's
//! `Cache::read*` methods and verification call these; compaction uses [`check_record`]
//! on what it copies. Kept apart from the write side: a reader takes only the log's
//! read lock and the tail cache's lock, never the append lock.
//!
//! Because the read happens after the lock is released, the segment read may meanwhile be
//! compacted, recycled and overwritten. The checks keep wrong bytes from being served; a
//! failed check is reported as corruption only if the record is still where it was read
//! (`moved_since_read`), otherwise it is read again from its new place.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::compress;
use super::error::ReadError;
use super::format::{self, RecordHeader, RECORD_HEADER_LEN};
use super::index::Loc;
use super::io::StorageFile;
use super::recent;
use super::state::Inner;
use super::types::{StoredRecord, StreamId};

/// Reads record `seq` of `stream` into `out` (cleared first), verified (header, CRC,
/// length) and decompressed.
pub(crate) fn read_into(inner: &Inner, stream: StreamId, seq: u64, out: &mut Vec<u8>) -> Result<(), ReadError> {
    let mut raw = Vec::new();
    read_stored_with(inner, stream, seq, &mut raw, |stored| {
        compress::decode_into(stored.codec, stored.bytes, stored.logical_len as usize, out)
    })?
    .map_err(|what| corruption(inner, stream, seq, what))
}

/// Reads record `seq` of `stream` verified (header, CRC, lengths) but not decompressed,
/// and hands its stored form to `f`. `scratch` holds the raw bytes (reused across calls).
pub(crate) fn read_stored_with<R>(
    inner: &Inner,
    stream: StreamId,
    seq: u64,
    scratch: &mut Vec<u8>,
    f: impl FnOnce(StoredRecord<'_>) -> R,
) -> Result<R, ReadError> {
    let (mut f, mut out) = (Some(f), None);
    read_stored_run(inner, stream, seq, seq, usize::MAX, scratch, |_, stored| {
        out = f.take().map(|f| f(stored));
        false
    })?;
    Ok(out.expect("a run of one record reads that record or fails"))
}

/// Reads records `from..=upto` of `stream` in their stored form, several per system
/// call: records that sit close together in one segment (gaps of at most
/// `RUN_GAP_MAX` bytes, a span of at most `span_bytes_max`) are read with one
/// positioned read, then checked one by one exactly as [`read_stored_with`]
/// checks them and handed to `f` in order. `f` returns false to stop. Returns how many
/// records `f` accepted. The drain reads a whole object's worth this way.
pub(crate) fn read_stored_run(
    inner: &Inner,
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
    let mut rereads = 0;
    'runs: while seq <= upto {
        // The run: locations gathered under the lock, read after it is released.
        let (file, segment, locs) = {
            let log = inner.log.read();
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
        if let Err(source) = read_span(inner, u64::from(segment), &*file, start, scratch) {
            // A recycled file may have been cut or removed under the reader.
            if moved_since_read(inner, stream, seq, &locs[0], &mut rereads) {
                continue 'runs;
            }
            return Err(ReadError::Io { stream, seq, source });
        }
        for loc in &locs {
            let at = (u64::from(loc.offset) - start) as usize;
            let raw = &scratch[at..at + RECORD_HEADER_LEN + loc.stored_len as usize];
            let header = match check_record(raw, stream.0, seq, loc) {
                Ok(header) => header,
                // Records from `seq` on are read again from where the index says now.
                Err(_) if moved_since_read(inner, stream, seq, loc, &mut rereads) => continue 'runs,
                Err(what) => {
                    return Err(ReadError::Corruption {
                        stream,
                        seq,
                        segment: u64::from(segment),
                        offset: u64::from(loc.offset),
                        what,
                    })
                }
            };
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

/// Re-reads allowed in one call because a record moved while it was being read. Each one
/// needs that record to have been compacted away (and its old segment freed) during the
/// read, so more than one is rare; the bound only keeps a pathological case finite.
const MOVED_REREADS_MAX: u32 = 4;

/// Whether record `seq`, read at `read_at` with a failed check, has since left that place
/// (compacted elsewhere, or acknowledged or evicted), within the re-read budget. A reader
/// holds no lock while it reads, so the segment it read can meanwhile be compacted,
/// recycled and overwritten: what failed then is the read, not the record, and the
/// caller reads again from the index's current location (or reports what a fresh read
/// would: not available). Segment ids are never reused, so an unchanged location means
/// the segment was not recycled and the bytes there are really damaged.
fn moved_since_read(inner: &Inner, stream: StreamId, seq: u64, read_at: &Loc, rereads: &mut u32) -> bool {
    if *rereads >= MOVED_REREADS_MAX {
        return false;
    }
    let now = inner.log.read().streams.get(stream.0 as usize).and_then(|st| st.index.get(seq));
    let moved = now.is_none_or(|l| (l.segment, l.offset) != (read_at.segment, read_at.offset));
    if moved {
        *rereads += 1;
        tracing::debug!(?stream, seq, segment = read_at.segment, "record moved while read: reading it again");
    }
    moved
}

/// A corruption found after the checks of [`read_stored_with`] (decompression),
/// reported with the record's location in the cache.
pub(crate) fn corruption(inner: &Inner, stream: StreamId, seq: u64, what: String) -> ReadError {
    let (segment, offset) =
        locate(inner, stream, seq).map_or((0, 0), |(l, _)| (u64::from(l.segment), u64::from(l.offset)));
    ReadError::Corruption { stream, seq, segment, offset, what }
}

/// Location of a live durable record and a handle on its segment file.
fn locate(inner: &Inner, stream: StreamId, seq: u64) -> Result<(Loc, Arc<dyn StorageFile>), ReadError> {
    let log = inner.log.read();
    let st = log.streams.get(stream.0 as usize).ok_or(ReadError::UnknownStream(stream))?;
    let loc = st.live_loc(stream, seq)?;
    let seg = log.segments.get(&u64::from(loc.segment)).expect("index points at a live segment");
    Ok((loc, seg.file.clone()))
}

/// Where a live record sits: (segment id, offset of its record header, stored length).
pub(crate) fn record_location(inner: &Inner, stream: StreamId, seq: u64) -> Option<(u64, u64, u32)> {
    locate(inner, stream, seq).ok().map(|(loc, _)| (u64::from(loc.segment), u64::from(loc.offset), loc.stored_len))
}

/// Reads `buf.len()` bytes at `offset` of `segment`: from the tail cache where it holds
/// them, from `file` otherwise.
fn read_span(inner: &Inner, segment: u64, file: &dyn StorageFile, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let pieces = inner.recent.lock().overlapping(segment, offset, offset + buf.len() as u64);
    let from_memory = recent::fill_span(buf, offset, &pieces, |at, part| file.read_exact_at(part, at))?;
    inner.counters.read_bytes_memory.fetch_add(from_memory as u64, Ordering::Relaxed);
    inner.counters.read_bytes_device.fetch_add((buf.len() - from_memory) as u64, Ordering::Relaxed);
    Ok(())
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
