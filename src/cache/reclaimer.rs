//! The reclaimer: gives space back. A sealed segment whose records are all uploaded is
//! freed (recycled for reuse, or deleted). Once usage passes `compact_usage_min`, old
//! sealed segments that are mostly dead are compacted: their few live records are copied
//! to the head of the log (same stream, sequence and bytes) so a slow stream cannot pin
//! the disk. At the hard watermark the eviction policy may drop a stream (`eviction.rs`);
//! what it shared with others is then compacted and freed here.
//! [`blockers`] tells an operator which streams hold the oldest segments.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::commit::Encoded;
use super::error::{IoFailure, ReclaimError};
use super::eviction;
use super::format::RECORD_HEADER_LEN;
use super::read::check_record;
use super::segment::{recycle_name, segment_name};
use super::state::Inner;
use super::types::StreamId;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimReport {
    pub segments_freed: u64,
    pub segments_compacted: u64,
    pub records_rewritten: u64,
    pub streams_evicted: Vec<StreamId>,
}

/// A segment still in use and who keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SegmentBlockers {
    pub segment: u64,
    pub live_records: u64,
    pub live_stored_bytes: u64,
    /// (stream, machine, disk, live records in this segment), most records first.
    pub streams: Vec<(StreamId, String, String, u64)>,
}

/// Frees every sealed segment with no live record. Safe without a directory sync: a
/// removal lost in a crash brings back a segment whose records META already says are
/// uploaded, and it is freed again.
pub(crate) fn free_dead_segments(inner: &Inner) -> Result<u64, IoFailure> {
    let dead: Vec<u64> =
        inner.log.read().segments.iter().filter(|(_, s)| s.sealed && s.live_records == 0).map(|(&id, _)| id).collect();
    let mut freed = 0;
    for id in dead {
        let recycle = {
            let mut log = inner.log.write();
            // Whoever takes it out of the map frees the file.
            let Some(removed) = log.segments.remove(&id) else {
                continue;
            };
            // Sealed segments never gain records, so "dead" cannot have changed.
            super::assert::strict_assert!(removed.sealed && removed.live_records == 0, "freeing live segment {id}");
            super::assert::strict_assert_eq!(removed.live_stored_bytes, 0, "segment {id}");
            inner.segments_in_use.store(log.segments.len() as u64, Ordering::Relaxed);
            log.recycled.len() < inner.opts.segments_recycle_max
        };
        let name = segment_name(id);
        if recycle {
            let to = recycle_name(id);
            inner.storage.rename(&name, &to).map_err(|e| IoFailure::new("recycle segment", &e))?;
            inner.log.write().recycled.push(to);
        } else {
            inner.storage.remove(&name).map_err(|e| IoFailure::new("remove segment", &e))?;
        }
        freed += 1;
    }
    inner.counters.segments_freed.fetch_add(freed, Ordering::Relaxed);
    Ok(freed)
}

pub(crate) fn reclaim_pass(inner: &Arc<Inner>) -> Result<ReclaimReport, ReclaimError> {
    if inner.opts.read_only {
        return Err(ReclaimError::ReadOnly);
    }
    // One pass at a time: two compactions of one segment would copy its records twice.
    let _pass = inner.reclaim_pass_lock.lock();
    let mut report =
        ReclaimReport { segments_freed: free_dead_segments(inner).map_err(ReclaimError::Io)?, ..Default::default() };
    let usage = inner.used_bytes() as f64 / inner.opts.capacity_bytes as f64;
    if usage >= inner.opts.compact_usage_min && !inner.shutdown.load(Ordering::Acquire) {
        compact(inner, &mut report)?;
        report.segments_freed += free_dead_segments(inner).map_err(ReclaimError::Io)?;
    }
    if let Some(stream) = eviction::evict_for_space(inner).map_err(|e| {
        ReclaimError::Io(IoFailure { op: "evict", kind: std::io::ErrorKind::Other, message: e.to_string() })
    })? {
        report.streams_evicted.push(stream);
        report.segments_freed += free_dead_segments(inner).map_err(ReclaimError::Io)?;
        // What the evicted stream shared with others is now sparse: move it on.
        compact(inner, &mut report)?;
        report.segments_freed += free_dead_segments(inner).map_err(ReclaimError::Io)?;
    }
    Ok(report)
}

/// Copies the live records of sparse old segments to the head of the log, at most about
/// half a segment of live bytes per pass.
fn compact(inner: &Arc<Inner>, report: &mut ReclaimReport) -> Result<(), ReclaimError> {
    let segment_size = inner.opts.segment_size;
    let budget = segment_size / 2;
    let candidates: Vec<u64> = {
        let log = inner.log.read();
        let mut spent = 0u64;
        log.segments
            .iter()
            .filter(|(_, s)| {
                s.sealed
                    && s.live_records > 0
                    && s.live_stored_bytes as f64 <= inner.opts.compact_live_ratio_max * segment_size as f64
            })
            .take_while(|(_, s)| {
                spent += s.live_stored_bytes;
                spent <= budget
            })
            .map(|(&id, _)| id)
            .collect()
    };
    for segment in candidates {
        // Between segments, not mid-segment: every copy enqueued is waited for.
        if inner.shutdown.load(Ordering::Acquire) {
            break;
        }
        let (file, live) = {
            let log = inner.log.read();
            let Some(seg) = log.segments.get(&segment) else {
                continue;
            };
            let mut live = Vec::new();
            for (sid, st) in log.streams.iter().enumerate() {
                live.extend(
                    st.index
                        .iter()
                        .filter(|(_, l)| u64::from(l.segment) == segment)
                        .map(|(seq, l)| (sid as u32, seq, l)),
                );
            }
            (seg.file.clone(), live)
        };
        let mut tickets = Vec::with_capacity(live.len());
        let mut raw = Vec::new();
        // The segment's copies are committed together, in as few batches (and fsyncs) as
        // their bytes need, not one batch per copy the flusher happens to wake for.
        let hold = super::CommitHold::new(inner);
        for (stream, seq, loc) in &live {
            raw.resize(RECORD_HEADER_LEN + loc.stored_len as usize, 0);
            file.read_exact_at(&mut raw, u64::from(loc.offset))
                .map_err(|e| ReclaimError::Io(IoFailure::new("read for compaction", &e)))?;
            let header = check_record(&raw, *stream, *seq, loc).map_err(|what| {
                ReclaimError::Corruption(format!("segment {segment} stream {stream} seq {seq}: {what}"))
            })?;
            let ticket = inner
                .enqueue(
                    *stream,
                    Some((*seq, segment as u32)),
                    Encoded {
                        codec: header.codec,
                        stored: &raw[RECORD_HEADER_LEN..],
                        logical_len: header.logical_len,
                        payload_crc: header.payload_crc,
                    },
                )
                .map_err(ReclaimError::Rewrite)?;
            tickets.push(ticket);
        }
        drop(hold);
        for t in tickets {
            t.wait().map_err(ReclaimError::Rewrite)?;
        }
        inner.counters.rewritten_records.fetch_add(live.len() as u64, Ordering::Relaxed);
        report.segments_compacted += 1;
        report.records_rewritten += live.len() as u64;
    }
    Ok(())
}

pub(crate) fn blockers(inner: &Inner, segments_max: usize) -> Vec<SegmentBlockers> {
    let log = inner.log.read();
    let oldest: Vec<u64> = log
        .segments
        .iter()
        .filter(|(_, s)| s.sealed && s.live_records > 0)
        .take(segments_max)
        .map(|(&id, _)| id)
        .collect();
    let mut per: BTreeMap<u64, BTreeMap<u32, u64>> = oldest.iter().map(|&id| (id, BTreeMap::new())).collect();
    for (sid, st) in log.streams.iter().enumerate() {
        for (_, loc) in st.index.iter() {
            if let Some(m) = per.get_mut(&u64::from(loc.segment)) {
                *m.entry(sid as u32).or_default() += 1;
            }
        }
    }
    per.into_iter()
        .map(|(segment, streams)| {
            let seg = &log.segments[&segment];
            let mut streams: Vec<_> = streams
                .into_iter()
                .map(|(sid, n)| {
                    let st = &log.streams[sid as usize];
                    (StreamId(sid), st.machine.clone(), st.disk.clone(), n)
                })
                .collect();
            streams.sort_by_key(|s| std::cmp::Reverse(s.3));
            SegmentBlockers {
                segment,
                live_records: seg.live_records,
                live_stored_bytes: seg.live_stored_bytes,
                streams,
            }
        })
        .collect()
}

/// The background reclaimer: a pass whenever woken (acks, seals, pressure) or every
/// `reclaim_interval`.
pub(crate) fn run(inner: Arc<Inner>) {
    loop {
        {
            let mut woken = inner.reclaim_wake.lock();
            if !*woken && !inner.shutdown.load(Ordering::Acquire) {
                inner.reclaim_cv.wait_for(&mut woken, inner.opts.reclaim_interval);
            }
            *woken = false;
        }
        if inner.shutdown.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = reclaim_pass(&inner) {
            tracing::warn!(error = %e, "reclaim pass failed");
        }
    }
}
