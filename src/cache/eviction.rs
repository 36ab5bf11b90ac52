//! Eviction: the explicit last resort when space must be found. A stream's durable,
//! unuploaded records are dropped (its upload cursor jumps to its last durable record in
//! META) and the stream is marked resync required — never silently: the caller gets an
//! [`EvictReport`], the log a warning, the operator a [`CacheEvent::StreamEvicted`]. Run on
//! request (`Cache::evict_stream`) or by the reclaimer under
//! `EvictionPolicy::LargestBacklog` at the hard watermark ([`evict_for_space`]). In a file
//! of its own so that the one place data is dropped on purpose is easy to find and review.

use std::sync::atomic::Ordering;

use super::error::StreamError;
use super::options::EvictionPolicy;
use super::state::Inner;
use super::types::{CacheEvent, EvictReport, SpaceState, StreamId};

/// Under `EvictionPolicy::LargestBacklog` and at the hard watermark, evicts the stream with
/// the largest backlog (stored bytes). Returns the stream evicted, if any.
pub(crate) fn evict_for_space(inner: &Inner) -> Result<Option<StreamId>, StreamError> {
    if inner.space_state().1 != SpaceState::Full || inner.opts.eviction != EvictionPolicy::LargestBacklog {
        return Ok(None);
    }
    let victim = {
        let log = inner.log.read();
        log.streams
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.index.is_empty())
            .max_by_key(|(_, s)| s.index.stored_bytes())
            .map(|(i, _)| StreamId(i as u32))
    };
    let Some(stream) = victim else {
        return Ok(None);
    };
    evict(inner, stream, "hard watermark reached and reclaim could not free space (eviction policy LargestBacklog)")?;
    Ok(Some(stream))
}

/// Drops every durable, unuploaded record of `stream` and marks it resync required.
pub(crate) fn evict(inner: &Inner, stream: StreamId, reason: &str) -> Result<EvictReport, StreamError> {
    if inner.opts.read_only {
        return Err(StreamError::ReadOnly);
    }
    let mut generation = inner.meta_lock.lock();
    let (report, machine, disk) = {
        let log = inner.log.read();
        let st = log.streams.get(stream.0 as usize).ok_or(StreamError::UnknownStream(stream))?;
        let report = EvictReport {
            stream,
            first_seq: st.index.uploaded_upto() + 1,
            last_seq: st.index.durable_upto(),
            records: st.index.len() as u64,
            logical_bytes: st.index.logical_bytes(),
        };
        (report, st.machine.clone(), st.disk.clone())
    };
    inner
        .write_meta(&mut generation, |m| {
            let s = &mut m.streams[stream.0 as usize];
            s.uploaded_upto = report.last_seq;
            s.resync_required = true;
            s.evicted_upto = s.evicted_upto.max(report.last_seq);
        })
        .map_err(StreamError::Io)?;
    {
        let mut log = inner.log.write();
        log.release_upto(stream.0, report.last_seq);
        let st = &mut log.streams[stream.0 as usize];
        st.resync_required = true;
        st.evicted_upto = st.evicted_upto.max(report.last_seq);
    }
    drop(generation);
    inner.counters.evictions.fetch_add(1, Ordering::Relaxed);
    inner.push_event(CacheEvent::StreamEvicted {
        stream,
        machine,
        disk,
        first_seq: report.first_seq,
        last_seq: report.last_seq,
        logical_bytes: report.logical_bytes,
        reason: reason.to_string(),
    });
    inner.wake_reclaimer();
    Ok(report)
}
