//! The recoverer: rebuilds the cache's state on open.
//!
//! Decision table (compare TigerBeetle's journal recovery):
//!
//! | where                      | what is found                              | verdict                     |
//! |----------------------------|--------------------------------------------|-----------------------------|
//! | sealed segment             | valid trailer + summary                    | index from summary, no data read |
//! | sealed segment             | trailer bad, batches chain to a summary    | index from scan; metadata damage noted |
//! | sealed segment             | a batch does not validate                  | damage (acknowledged data)  |
//! | newest file, no trailer    | no batch of its own at all                 | the preparer's spare: recycled; the file before it is the newest |
//! | newest segment, no trailer | batches validate to offset X, then invalid | torn tail at X, truncated … |
//! |                            | … unless a valid batch anywhere later says X was durable (`durable_end > X`) | damage |
//! | any                        | a stream's sequence has a hole             | damaged stream (missing range) |
//!
//! Damage fails the open under [`RecoveryMode::FailOnCorruption`] and evicts the affected
//! streams (marking them resync required) under [`RecoveryMode::SalvageMarkResync`]. The
//! segment left open by a crash is sealed here (its summary written after its last valid
//! batch), so stale bytes past that point are never scanned again and new writes start in
//! a fresh segment.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use super::error::OpenError;
use super::format::{
    align_up, batch_crc_start, crc32, segment_seed, trailer_offset, BatchHeader, BatchKind, RecordHeader, SummaryEntry,
    Trailer, BATCH_HEADER_LEN, BLOCK_SIZE, RECORD_HEADER_LEN, SUMMARY_ENTRY_LEN, TRAILER_LEN,
};
use super::index::{Loc, StreamIndex};
use super::io::{read_all, write_atomic, Storage, StorageFile};
use super::meta::{Meta, META_FILE};
use super::options::{Options, RecoveryMode};
use super::segment::{parse_recycle_name, parse_segment_name, recycle_name, seal_segment, segment_name, OpenSegment};
use super::state::{LogState, SegmentState, StreamState};
use super::types::{CacheEvent, StreamId};

pub use super::recovery_report::{Damage, DamagedStream, RecoveryReport, TornTail};

/// Best effort: the streams named by the record headers of the (invalid) batch at
/// `offset`, parsed without trusting its checksum.
fn suspect_streams(file: &dyn StorageFile, segment_size: u64, offset: u64) -> Option<Vec<u32>> {
    let mut head = [0u8; BATCH_HEADER_LEN];
    file.read_exact_at(&mut head, offset).ok()?;
    let h = BatchHeader::decode(&head, segment_size).ok()?;
    if h.kind != BatchKind::Records {
        return None;
    }
    let mut buf = vec![0u8; h.batch_len as usize];
    file.read_exact_at(&mut buf, offset).ok()?;
    let mut at = BATCH_HEADER_LEN;
    let mut streams = Vec::new();
    for _ in 0..h.count {
        let rh = RecordHeader::decode(buf.get(at..)?).ok()?;
        if !streams.contains(&rh.stream) {
            streams.push(rh.stream);
        }
        at += RECORD_HEADER_LEN + rh.stored_len as usize;
    }
    Some(streams)
}

pub(crate) struct Recovered {
    pub salt: u64,
    pub meta_generation: u64,
    pub log: LogState,
    pub next_seq: Vec<u64>,
    pub last_batch_no: u64,
    pub next_segment_id: u64,
    pub report: RecoveryReport,
    pub events: Vec<CacheEvent>,
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> OpenError {
    move |source| OpenError::Io { op, source }
}

/// A record found on disk.
#[derive(Clone, Copy)]
struct Found {
    stream: u32,
    seq: u64,
    loc: Loc,
}

/// One validated batch.
struct ValidBatch {
    header: BatchHeader,
    found: Vec<Found>,
}

/// Reads and fully validates the batch at `offset`: header, seeded CRC over the header and
/// every record header, and every payload CRC (a torn payload must not pass for durable).
fn read_batch(
    file: &dyn StorageFile,
    id: u64,
    seed: u32,
    segment_size: u64,
    offset: u64,
    bytes_read: &mut u64,
) -> Result<ValidBatch, String> {
    let mut head = [0u8; BATCH_HEADER_LEN];
    file.read_exact_at(&mut head, offset).map_err(|e| format!("read: {e}"))?;
    *bytes_read += BATCH_HEADER_LEN as u64;
    let header = BatchHeader::decode(&head, segment_size).map_err(|e| e.to_string())?;
    if header.segment_id != id || u64::from(header.offset) != offset {
        return Err("batch header names another segment or offset".into());
    }
    let mut buf = vec![0u8; header.batch_len as usize];
    file.read_exact_at(&mut buf, offset).map_err(|e| format!("read: {e}"))?;
    *bytes_read += buf.len() as u64;
    let mut crc = batch_crc_start(seed, &buf);
    let mut found = Vec::new();
    match header.kind {
        BatchKind::Records => {
            let mut at = BATCH_HEADER_LEN;
            let mut payloads = Vec::with_capacity(header.count as usize);
            for _ in 0..header.count {
                if at + RECORD_HEADER_LEN > buf.len() {
                    return Err("record header past batch end".into());
                }
                let rh = RecordHeader::decode(&buf[at..]).map_err(|e| e.to_string())?;
                crc.update(&buf[at..at + RECORD_HEADER_LEN]);
                let end = at + RECORD_HEADER_LEN + rh.stored_len as usize;
                if end > buf.len() {
                    return Err("record payload past batch end".into());
                }
                payloads.push((at, rh));
                at = end;
            }
            if at != buf.len() {
                return Err("batch length disagrees with its records".into());
            }
            if crc.finalize() != BatchHeader::stored_crc(&buf) {
                return Err("batch checksum mismatch".into());
            }
            for (at, rh) in payloads {
                let payload = &buf[at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + rh.stored_len as usize];
                if crc32(payload) != rh.payload_crc {
                    return Err(format!("payload checksum mismatch (stream {} seq {})", rh.stream, rh.seq));
                }
                let loc = Loc {
                    segment: id as u32,
                    offset: (offset + at as u64) as u32,
                    stored_len: rh.stored_len,
                    logical_len: rh.logical_len,
                };
                found.push(Found { stream: rh.stream, seq: rh.seq, loc });
            }
        }
        BatchKind::Summary => {
            if BATCH_HEADER_LEN + header.count as usize * SUMMARY_ENTRY_LEN != buf.len() {
                return Err("summary length disagrees with its count".into());
            }
            crc.update(&buf[BATCH_HEADER_LEN..]);
            if crc.finalize() != BatchHeader::stored_crc(&buf) {
                return Err("summary checksum mismatch".into());
            }
            for i in 0..header.count as usize {
                let e = SummaryEntry::decode(&buf[BATCH_HEADER_LEN + i * SUMMARY_ENTRY_LEN..], segment_size)
                    .map_err(|e| e.to_string())?;
                let loc =
                    Loc { segment: id as u32, offset: e.offset, stored_len: e.stored_len, logical_len: e.logical_len };
                found.push(Found { stream: e.stream, seq: e.seq, loc });
            }
        }
    }
    Ok(ValidBatch { header, found })
}

/// Indexes a sealed segment from its trailer and summary alone.
fn read_summary(
    file: &dyn StorageFile,
    id: u64,
    seed: u32,
    segment_size: u64,
    bytes_read: &mut u64,
) -> Result<(Vec<Found>, u64), String> {
    let mut block = [0u8; TRAILER_LEN];
    file.read_exact_at(&mut block, trailer_offset(segment_size)).map_err(|e| format!("read trailer: {e}"))?;
    *bytes_read += TRAILER_LEN as u64;
    let t = Trailer::decode(&block, seed, segment_size).map_err(|e| format!("trailer: {e}"))?;
    if t.segment_id != id {
        return Err("trailer names another segment".into());
    }
    let batch = read_batch(file, id, seed, segment_size, u64::from(t.summary_offset), bytes_read)?;
    if batch.header.kind != BatchKind::Summary || batch.header.count != t.count {
        return Err("trailer does not point at a matching summary".into());
    }
    Ok((batch.found, t.last_batch_no))
}

/// Result of walking a segment's batch chain from offset 0.
struct Scan {
    found: Vec<Found>,
    /// Aligned end of the last valid records batch.
    end: u64,
    /// First offset that did not validate, and why (None when the segment is full).
    stopped: Option<(u64, String)>,
    /// The chain ended on bytes that are not a batch header of this segment: zeros, the
    /// end of the file, or a recycled file's old contents.
    clean_end: bool,
    hit_summary: bool,
    last_batch_no: u64,
    /// Valid batches found past `stopped`: (offset, durable_end, aligned end, records).
    later: Vec<(u64, u64, u64, Vec<Found>)>,
}

impl Scan {
    /// A file that never held a batch of its own: the chain ends cleanly at offset 0 and
    /// nothing further on validates (zeros, or a recycled file's old bytes).
    fn is_empty_spare(&self) -> bool {
        self.found.is_empty()
            && !self.hit_summary
            && self.end == 0
            && self.clean_end
            && self.later.is_empty()
            && self.stopped.as_ref().is_none_or(|(at, _)| *at == 0)
    }
}

fn scan_segment(file: &dyn StorageFile, id: u64, seed: u32, segment_size: u64, bytes_read: &mut u64) -> Scan {
    // A file cut short (truncated, or never fully allocated) ends the search early.
    let limit = trailer_offset(segment_size).min(file.size().unwrap_or(0));
    let mut scan = Scan {
        found: Vec::new(),
        end: 0,
        stopped: None,
        clean_end: true,
        hit_summary: false,
        last_batch_no: 0,
        later: Vec::new(),
    };
    let mut off = 0u64;
    while off < limit {
        match read_batch(file, id, seed, segment_size, off, bytes_read) {
            Ok(b) if b.header.kind == BatchKind::Summary => {
                scan.hit_summary = true;
                scan.found = b.found;
                return scan;
            }
            Ok(b) => {
                scan.last_batch_no = scan.last_batch_no.max(b.header.batch_no);
                scan.found.extend(b.found);
                off += align_up(u64::from(b.header.batch_len), BLOCK_SIZE);
                scan.end = off;
            }
            Err(reason) => {
                // A tear shows as this segment's own header over bytes that do not check
                // out. Anything else there — zeros, the file's end, a recycled file's old
                // bytes — is a clean end of the chain.
                let mut head = [0u8; BATCH_HEADER_LEN];
                let ours = file.read_exact_at(&mut head, off).is_ok()
                    && head[..4] == super::format::BATCH_MAGIC
                    && head[super::format::BATCH_SEGMENT_AT..super::format::BATCH_SEGMENT_AT + 8] == id.to_le_bytes();
                let partial = file.size().is_ok_and(|len| len > off && len < off + BATCH_HEADER_LEN as u64);
                scan.clean_end = !(ours || partial);
                scan.stopped = Some((off, reason));
                break;
            }
        }
    }
    // Past the first invalid batch, look at every block boundary up to the trailer block
    // for valid batches: they tell a torn tail (nothing later claims the bad bytes were
    // durable) from damage. The search is not bounded by any option (batch sizes can
    // change between runs, and a run of bad batches can be any length), and it follows the
    // chain from each batch it finds, skipping further bad stretches the same way, up to
    // the segment's summary (its last link) or its end. A clean open never gets here: it
    // only happens once a chain has stopped short (a crash or damage).
    let Some((bad, _)) = scan.stopped else {
        return scan;
    };
    let mut at = bad + BLOCK_SIZE;
    let mut chunk = vec![0u8; 1 << 20];
    'search: while at < limit {
        let len = chunk.len().min((limit - at) as usize) / BLOCK_SIZE as usize * BLOCK_SIZE as usize;
        if len == 0 {
            break;
        }
        if file.read_exact_at(&mut chunk[..len], at).is_err() {
            break; // a short (truncated) file: nothing more to find
        }
        *bytes_read += len as u64;
        let end = at + len as u64;
        let mut off = at;
        while off < end {
            let block = (off - at) as usize;
            if chunk[block..block + 4] != super::format::BATCH_MAGIC {
                off += BLOCK_SIZE;
                continue;
            }
            let Ok(b) = read_batch(file, id, seed, segment_size, off, bytes_read) else {
                off += BLOCK_SIZE;
                continue;
            };
            if b.header.kind == BatchKind::Summary {
                // The chain's last link: nothing past it is part of the segment.
                break 'search;
            }
            scan.last_batch_no = scan.last_batch_no.max(b.header.batch_no);
            let next = off + align_up(u64::from(b.header.batch_len), BLOCK_SIZE);
            scan.later.push((off, u64::from(b.header.durable_end), next, b.found));
            // Follow the chain: the next batch, if any, starts where this one ends.
            off = next;
        }
        at = off;
    }
    scan
}

type SummaryResult = (Arc<dyn StorageFile>, Result<(Vec<Found>, u64), String>, u64);

/// Opens every segment and reads its trailer and summary, several at a time: on a cold
/// cache these small reads are latency-bound, and the device serves them in parallel.
fn read_summaries(
    storage: &dyn Storage,
    ids: &[u64],
    salt: u64,
    segment_size: u64,
) -> Result<Vec<SummaryResult>, OpenError> {
    const READERS_MAX: usize = 8;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<parking_lot::Mutex<Option<Result<SummaryResult, std::io::Error>>>> =
        ids.iter().map(|_| parking_lot::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..READERS_MAX.min(ids.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&id) = ids.get(i) else { break };
                let result = storage.open(&segment_name(id), false).map(|file| {
                    let mut bytes_read = 0;
                    let summary = read_summary(&*file, id, segment_seed(salt, id), segment_size, &mut bytes_read);
                    (file, summary, bytes_read)
                });
                *slots[i].lock() = Some(result);
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| slot.into_inner().expect("every slot filled").map_err(io_err("open segment")))
        .collect()
}

fn random_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish()
}

pub(crate) fn recover(storage: &dyn Storage, opts: &mut Options) -> Result<Recovered, OpenError> {
    let started = Instant::now();
    let mut report = RecoveryReport::default();
    let mut events = Vec::new();

    // 1. META: salt, segment size, streams and their upload cursors.
    let mut meta = match read_all(storage, META_FILE) {
        Ok(bytes) => Meta::decode(&bytes).map_err(|e| OpenError::MetaCorrupt(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Segments without META: the salt that validates them is gone. Starting a new
            // cache here would silently treat acknowledged data as garbage.
            let names = storage.list().map_err(io_err("list cache directory"))?;
            if names.iter().any(|n| parse_segment_name(n).is_some()) {
                return Err(OpenError::MetaCorrupt(
                    "META is missing but segment files exist; refusing to start over".into(),
                ));
            }
            if opts.read_only {
                return Err(OpenError::Io { op: "read META (is this a churnlog cache?)", source: e });
            }
            let meta =
                Meta { salt: random_salt(), segment_size: opts.segment_size, generation: 0, streams: Vec::new() };
            write_atomic(storage, META_FILE, &meta.encode()).map_err(io_err("create META"))?;
            meta
        }
        Err(e) => return Err(OpenError::Io { op: "read META", source: e }),
    };
    if meta.segment_size != opts.segment_size {
        tracing::info!(stored = meta.segment_size, asked = opts.segment_size, "using the cache's own segment size");
        opts.segment_size = meta.segment_size;
        opts.validate().map_err(OpenError::InvalidOptions)?;
    }
    let segment_size = opts.segment_size;
    for (i, s) in meta.streams.iter().enumerate() {
        if s.id as usize != i {
            return Err(OpenError::MetaCorrupt(format!("stream ids are not dense at {i}")));
        }
    }

    // 2. Files.
    let names = storage.list().map_err(io_err("list cache directory"))?;
    let mut segment_ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    segment_ids.sort_unstable();
    let mut recycled: Vec<u64> = names.iter().filter_map(|n| parse_recycle_name(n)).collect();
    recycled.sort_unstable();
    if !opts.read_only {
        if names.iter().any(|n| n == "META.tmp") {
            let _ = storage.remove("META.tmp");
        }
        super::meta::ensure_reserve(storage, meta.encode().len());
    }

    // 3. Segments: summaries for sealed ones, a scan for the one left open.
    let mut found: Vec<Found> = Vec::new();
    let mut files: BTreeMap<u64, Arc<dyn StorageFile>> = BTreeMap::new();
    let mut last_batch_no = 0u64;
    let mut open_tail: Option<OpenSegment> = None;
    if let Some(&id) = segment_ids.iter().find(|&&id| id >= u64::from(u32::MAX)) {
        return Err(OpenError::MetaCorrupt(format!("segment id {id} out of range")));
    }
    let mut summaries = read_summaries(storage, &segment_ids, meta.salt, segment_size)?;
    // The newest file, when unsealed, is scanned here once: it is either the segment left
    // open or a spare the preparer made ahead of rotation (no batch of its own, so nothing
    // acknowledged is in it). A spare goes back to the recycled files.
    let mut newest_scan = None;
    if let (Some(&id), Some((file, Err(_), _))) = (segment_ids.last(), summaries.last()) {
        let scan = scan_segment(&**file, id, segment_seed(meta.salt, id), segment_size, &mut report.scanned_bytes_read);
        if scan.is_empty_spare() {
            segment_ids.pop();
            let (_, _, bytes_read) = summaries.pop().expect("one result per segment");
            report.metadata_bytes_read += bytes_read;
            report.spare_segment = Some(id);
            if !opts.read_only {
                let name = segment_name(id);
                storage.rename(&name, &recycle_name(id)).map_err(io_err("recycle spare segment"))?;
                recycled.push(id);
            }
        } else {
            newest_scan = Some(scan);
        }
    }
    report.segments = segment_ids.len();
    let newest = segment_ids.last().copied();
    for (&id, (file, summary, bytes_read)) in segment_ids.iter().zip(summaries) {
        report.metadata_bytes_read += bytes_read;
        let seed = segment_seed(meta.salt, id);
        match summary {
            Ok((f, last)) => {
                report.segments_from_summary += 1;
                last_batch_no = last_batch_no.max(last);
                found.extend(f);
            }
            Err(why) => {
                report.segments_scanned.push(id);
                let scanned_already = if Some(id) == newest { newest_scan.take() } else { None };
                let scan = scanned_already
                    .unwrap_or_else(|| scan_segment(&*file, id, seed, segment_size, &mut report.scanned_bytes_read));
                last_batch_no = last_batch_no.max(scan.last_batch_no);
                if Some(id) == newest && !scan.hit_summary {
                    let mut tail_found = scan.found.clone();
                    let mut tail_end = scan.end;
                    if let Some((bad, reason)) = &scan.stopped {
                        let proof = scan.later.iter().find(|(_, durable_end, _, _)| *durable_end > *bad);
                        if let Some((off, _, _, _)) = proof {
                            report.damage.push(Damage {
                                segment: id,
                                offset: *bad,
                                what: format!("{reason}; the batch at {off} shows it was durable"),
                                suspect_streams: suspect_streams(&*file, segment_size, *bad),
                            });
                            // Keep what validates past the hole; the summary goes after it.
                            for (_, _, end, f) in &scan.later {
                                tail_found.extend(f.iter().copied());
                                tail_end = *end;
                            }
                        } else if !scan.clean_end {
                            report.torn_tail = Some(TornTail { segment: id, offset: *bad, reason: reason.clone() });
                        }
                    }
                    found.extend(tail_found.iter().copied());
                    open_tail = Some(OpenSegment {
                        id,
                        file: file.clone(),
                        seed,
                        write_offset: tail_end,
                        summary: tail_found
                            .iter()
                            .map(|f| SummaryEntry {
                                stream: f.stream,
                                offset: f.loc.offset,
                                seq: f.seq,
                                stored_len: f.loc.stored_len,
                                logical_len: f.loc.logical_len,
                            })
                            .collect(),
                        last_batch_no: scan.last_batch_no,
                    });
                } else {
                    if scan.hit_summary {
                        report.notes.push(format!("segment {id}: {why}; indexed from a scan instead"));
                    } else {
                        let (off, reason) =
                            scan.stopped.clone().unwrap_or((scan.end, "segment ends without a summary".into()));
                        report.damage.push(Damage {
                            segment: id,
                            offset: off,
                            what: format!("sealed segment: {reason}"),
                            suspect_streams: suspect_streams(&*file, segment_size, off),
                        });
                        for (_, _, _, f) in &scan.later {
                            found.extend(f.iter().copied());
                        }
                    }
                    found.extend(scan.found);
                }
            }
        }
        files.insert(id, file);
    }

    // 4. Per stream: newest copy of each record wins (compaction rewrites forward), records
    //    already uploaded are dead, and what is left must be gap-free from the cursor.
    // Dense per-stream lists (stream ids are dense), each sorted on its own: the entries
    // arrive nearly in order, so these sorts are cheap.
    let mut by_stream: Vec<Vec<Found>> = vec![Vec::new(); meta.streams.len()];
    let mut unknown: HashMap<u32, Vec<Found>> = HashMap::new();
    for f in found {
        match by_stream.get_mut(f.stream as usize) {
            Some(list) => list.push(f),
            None => unknown.entry(f.stream).or_default().push(f),
        }
    }
    // Streams with any live record in a damaged segment may have lost their newest
    // records, which no hole shows: they count as damaged too.
    let damaged_segments: std::collections::HashSet<u32> = report.damage.iter().map(|d| d.segment as u32).collect();
    let mut touched_damaged = std::collections::HashSet::new();
    for (list, m) in by_stream.iter_mut().zip(&meta.streams) {
        list.sort_unstable_by_key(|f| (f.seq, f.loc.segment));
        // Newest copy of each record wins (compaction rewrites forward).
        list.dedup_by(|later, earlier| {
            if later.seq == earlier.seq {
                *earlier = *later;
                true
            } else {
                false
            }
        });
        if !damaged_segments.is_empty()
            && list.iter().any(|f| f.seq > m.uploaded_upto && damaged_segments.contains(&f.loc.segment))
        {
            touched_damaged.insert(m.id);
        }
    }
    let mut streams = Vec::with_capacity(meta.streams.len());
    let mut next_seq = Vec::with_capacity(meta.streams.len());
    let mut by_key = HashMap::new();
    let mut salvaged = false;
    for m in meta.streams.iter_mut() {
        let list = std::mem::take(&mut by_stream[m.id as usize]);
        let live = list.iter().filter(|f| f.seq > m.uploaded_upto).count();
        let mut index = StreamIndex::with_capacity(m.uploaded_upto, live);
        let mut missing = Vec::new();
        let mut max_seen = m.uploaded_upto;
        for f in list {
            if f.seq <= m.uploaded_upto {
                continue;
            }
            if f.seq > max_seen + 1 {
                missing.push((max_seen + 1, f.seq - 1));
            }
            if missing.is_empty() {
                index.push(f.seq, f.loc);
            }
            max_seen = f.seq;
        }
        let in_damaged_segment = touched_damaged.contains(&m.id);
        let suspected = report.damage.iter().any(|d| d.suspect_streams.as_ref().is_none_or(|s| s.contains(&m.id)));
        if !missing.is_empty() || in_damaged_segment || suspected {
            let damaged = DamagedStream {
                stream: StreamId(m.id),
                machine: m.machine.clone(),
                disk: m.disk.clone(),
                missing,
                last_seen: max_seen,
            };
            if opts.recovery_mode == RecoveryMode::SalvageMarkResync {
                index = StreamIndex::new(max_seen);
                m.uploaded_upto = max_seen;
                m.resync_required = true;
                m.evicted_upto = m.evicted_upto.max(max_seen);
                salvaged = true;
                events.push(CacheEvent::StreamSalvaged {
                    stream: StreamId(m.id),
                    machine: m.machine.clone(),
                    disk: m.disk.clone(),
                    missing: damaged.missing.clone(),
                });
            }
            report.damaged_streams.push(damaged);
        }
        report.records += index.len() as u64;
        next_seq.push(max_seen + 1);
        by_key.insert((m.machine.clone(), m.disk.clone()), m.id);
        streams.push(StreamState {
            machine: m.machine.clone(),
            disk: m.disk.clone(),
            resync_required: m.resync_required,
            evicted_upto: m.evicted_upto,
            resync_base: m.resync_base,
            index,
        });
    }
    for (stream, list) in unknown {
        report.damage.push(Damage {
            segment: u64::from(list[0].loc.segment),
            offset: u64::from(list[0].loc.offset),
            what: format!("{} record(s) of stream {stream}, which META does not know", list.len()),
            suspect_streams: Some(Vec::new()),
        });
    }

    let damaged = !report.damage.is_empty() || !report.damaged_streams.is_empty();
    if damaged && opts.recovery_mode == RecoveryMode::FailOnCorruption && !opts.read_only {
        report.open_seconds = started.elapsed().as_secs_f64();
        return Err(OpenError::Corruption(Box::new(report)));
    }

    // 5. Segment states with live counts.
    let mut segments: BTreeMap<u64, SegmentState> = files
        .into_iter()
        .map(|(id, file)| (id, SegmentState { file, sealed: true, live_records: 0, live_stored_bytes: 0 }))
        .collect();
    for st in &streams {
        for (_, loc) in st.index.iter() {
            let seg = segments.get_mut(&u64::from(loc.segment)).expect("found in a listed segment");
            seg.live_records += 1;
            seg.live_stored_bytes += u64::from(loc.stored_len);
        }
    }

    // Index consistency: no segment holds more than it can, and every stream continues
    // after its last indexed record.
    super::assert::strict_assert!(segments.values().all(|s| s.live_stored_bytes <= segment_size));
    super::assert::strict_assert!(
        streams.iter().zip(&next_seq).all(|(s, &next)| next > s.index.durable_upto()),
        "a stream would reuse a sequence number"
    );

    // 6. Changes on disk (never in read-only mode): persist salvage decisions, then seal
    //    the segment a crash left open. The salvage decision is persisted first: sealing writes a summary that the next
    //    open trusts without scanning, so sealing first and then failing (crash, ENOSPC)
    //    before META would erase the evidence of the damage.
    let mut meta_generation = meta.generation;
    if salvaged && !opts.read_only {
        meta.generation += 1;
        meta_generation = meta.generation;
        let bytes = meta.encode();
        super::meta::write_with_reserve(storage, &bytes)
            .map_err(|f| OpenError::Io { op: "write META after salvage", source: f.into_error() })?;
    }
    if let Some(tail) = open_tail {
        if opts.read_only {
            if let Some(s) = segments.get_mut(&tail.id) {
                s.sealed = false;
            }
        } else {
            seal_segment(&tail, segment_size)
                .map_err(|(_, e)| OpenError::Io { op: "seal the segment left open", source: e })?;
        }
    }

    let next_segment_id = segment_ids.last().copied().max(recycled.last().copied()).map_or(1, |m| m + 1);
    report.open_seconds = started.elapsed().as_secs_f64();
    Ok(Recovered {
        salt: meta.salt,
        meta_generation,
        log: LogState { streams, by_key, segments, recycled: recycled.into_iter().map(recycle_name).collect() },
        next_seq,
        last_batch_no,
        next_segment_id,
        report,
        events,
    })
}
