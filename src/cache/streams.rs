//! Streams and their durable cursors: registering a stream, acknowledging uploads (which
//! is what gives space back), and clearing a resync mark. Each is a crash-atomic rewrite of
//! META ([`Inner::write_meta`], serialized by `meta_lock`) made before the in-memory state
//! changes, so a crash never leaves memory ahead of disk. Eviction writes META the same way
//! (see `eviction.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::error::{IoFailure, StreamError};
use super::format;
use super::index::StreamIndex;
use super::io;
use super::meta::{self, Meta, MetaStream};
use super::state::{Inner, StreamState};
use super::types::StreamId;

impl Inner {
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
}

/// The stream for (`machine`, `disk`), created (and made durable in META) when new.
pub(crate) fn register(inner: &Inner, machine: &str, disk: &str) -> Result<StreamId, StreamError> {
    for part in [machine, disk] {
        if part.is_empty() || part.len() > format::STREAM_KEY_LEN_MAX {
            return Err(StreamError::BadKey(part.to_string()));
        }
    }
    let key = (machine.to_string(), disk.to_string());
    if let Some(&id) = inner.log.read().by_key.get(&key) {
        return Ok(StreamId(id));
    }
    if inner.opts.read_only {
        return Err(StreamError::ReadOnly);
    }
    let mut generation = inner.meta_lock.lock();
    if let Some(&id) = inner.log.read().by_key.get(&key) {
        return Ok(StreamId(id));
    }
    let id = inner.log.read().streams.len() as u32;
    if id >= format::STREAMS_MAX {
        return Err(StreamError::TooMany(format::STREAMS_MAX));
    }
    inner
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
    let mut append = inner.append.lock();
    let mut log = inner.log.write();
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

/// Acknowledges uploads of several streams with one META write: all are checked first and
/// either every cursor moves or none does. An uploader that finishes several streams
/// at once pays one atomic rewrite (two fsyncs) instead of one per stream. Pairs that
/// move nothing are skipped (nothing is written if none moves); a stream named twice
/// moves to the higher of the two.
pub(crate) fn ack_many(inner: &Inner, acks: &[(StreamId, u64)]) -> Result<(), StreamError> {
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

/// Marks `stream` resync-required without dropping anything: what is cached still
/// uploads, and the agent is asked for a full copy (the control plane asks for this when
/// data for the machine was lost on another process server). A no-op when already marked.
pub(crate) fn mark_resync_required(inner: &Inner, stream: StreamId) -> Result<(), StreamError> {
    if inner.opts.read_only {
        return Err(StreamError::ReadOnly);
    }
    let mut generation = inner.meta_lock.lock();
    {
        let log = inner.log.read();
        let st = log.streams.get(stream.0 as usize).ok_or(StreamError::UnknownStream(stream))?;
        if st.resync_required {
            return Ok(());
        }
    }
    inner
        .write_meta(&mut generation, |m| m.streams[stream.0 as usize].resync_required = true)
        .map_err(StreamError::Io)?;
    inner.log.write().streams[stream.0 as usize].resync_required = true;
    Ok(())
}

/// Records that a resync of `stream` began with its record `base_seq` (which must be
/// durable and later than every dropped record) and clears the resync-required mark.
pub(crate) fn clear_resync(inner: &Inner, stream: StreamId, base_seq: u64) -> Result<(), StreamError> {
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
