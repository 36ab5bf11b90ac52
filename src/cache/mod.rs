//! The cache engine: one shared, append-only, crash-safe log per cache disk.
//!
//! Producers ([`Cache::append`]) encode their record (LZ4 when it pays, CRC) on their own
//! thread, then copy it into the pending batch under a short lock, which also assigns the
//! stream's next sequence number. One flusher thread ([`flusher`]) writes each batch with
//! one positioned write and one `fdatasync`, updates the index, and only then resolves the
//! records' [`AppendTicket`]s: nothing is acknowledged before it is durable. The drain reads
//! records back in order ([`Cache::read`]) and acknowledges uploads ([`Cache::ack`]); the
//! reclaimer ([`reclaimer`]) frees and compacts, and eviction is the last, explicit resort.
//! [`recover`] rebuilds everything on open from segment summaries. `docs/format.md` maps
//! the bytes.
//!
//! This file is the facade: the module list, the public re-exports, and [`Cache`], whose
//! methods delegate to one file per role — `state` (shared state), `commit` (group
//! commit), `read` (read path), `streams` (stream registry, acknowledgements, META),
//! `segment` (segment files), `eviction`, plus the background roles. No file below
//! imports this one, and none imports another that imports it back.

pub(crate) mod assert;
pub(crate) mod commit;
pub mod compress;
pub(crate) mod effort;
pub mod error;
pub(crate) mod eviction;
pub mod flusher;
pub mod format;
pub mod index;
pub mod io;
pub mod meta;
pub mod options;
pub(crate) mod preparer;
pub(crate) mod read;
pub mod recent;
pub mod reclaimer;
pub mod recover;
pub(crate) mod recovery_report;
pub(crate) mod segment;
pub(crate) mod state;
pub(crate) mod streams;
pub mod ticket;
pub(crate) mod types;
pub mod verify;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

/// Names of on-disk files, for tests and tools that inspect a cache directory. Kept under
/// this name for the tests that use it; the names themselves are `segment.rs`'s.
#[doc(hidden)]
pub mod flusher_test_support {
    pub use super::segment::segment_file_name;
}

pub use compress::decode_into as decode_stored;
pub use error::{AppendError, CloseError, IoFailure, OpenError, ReadError, ReclaimError, StreamError};
pub use format::Codec;
pub use options::{EvictionPolicy, IoBackend, Options, RecoveryMode};
pub use reclaimer::{ReclaimReport, SegmentBlockers};
pub use recover::RecoveryReport;
pub use ticket::AppendTicket;
pub use types::{CacheEvent, CacheStats, EvictReport, SpaceReport, SpaceState, StoredRecord, StreamId, StreamInfo};
pub use verify::{StreamVerify, VerifyReport};

use commit::{AppendState, CommitState, Encoded};
use format::BATCH_HEADER_LEN;
use io::aligned::AlignedBuf;
use io::Storage;
use state::{Counters, Inner};

/// An open cache. Share it between threads with `Arc<Cache>`.
/// See [`Cache::hold_commits`].
#[must_use = "the hold ends when the guard is dropped"]
pub struct CommitHold<'a> {
    inner: &'a Arc<Inner>,
}

impl CommitHold<'_> {
    pub(crate) fn new(inner: &Arc<Inner>) -> CommitHold<'_> {
        inner.append.lock().held += 1;
        CommitHold { inner }
    }
}

impl Drop for CommitHold<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.append.lock();
        st.held -= 1;
        drop(st);
        self.inner.work_cv.notify_all();
    }
}

pub struct Cache {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<Result<(), CloseError>>>,
    reclaimer: Option<JoinHandle<()>>,
    _lock: Box<dyn Send + Sync>,
}

impl Cache {
    /// Opens (recovering) or creates the cache in `dir` on the I/O backend the options
    /// ask for; `Auto` probes the fastest one and falls back, saying so in the log.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Cache, OpenError> {
        let storage = io::open_backend(dir.as_ref(), opts.io_backend)
            .map_err(|source| OpenError::Io { op: "open cache directory", source })?;
        Cache::open_with_storage(storage, opts)
    }

    /// Opens on any [`Storage`] backend (the fault-injecting one in tests).
    pub fn open_with_storage(storage: Arc<dyn Storage>, mut opts: Options) -> Result<Cache, OpenError> {
        opts.validate().map_err(OpenError::InvalidOptions)?;
        let lock = storage.lock().map_err(|source| OpenError::Locked { path: "LOCK".into(), source })?;
        let recovered = recover::recover(&*storage, &mut opts)?;
        let inner = Arc::new(Inner {
            salt: recovered.salt,
            append: Mutex::new(AppendState {
                // A read-only cache takes no append: no batch buffer to map and fault in.
                buf: if opts.read_only {
                    AlignedBuf::with_capacity(BATCH_HEADER_LEN)
                } else {
                    AppendState::fresh_buffer(opts.commit_bytes_max)
                },
                records: Vec::new(),
                batch_no: recovered.last_batch_no + 1,
                next_seq: recovered.next_seq.clone(),
                refuse: opts.read_only.then_some(AppendError::Closed),
                closing: false,
                held: 0,
                room_waiters: 0,
            }),
            work_cv: Condvar::new(),
            room_cv: Condvar::new(),
            segments_in_use: AtomicU64::new(recovered.log.segments.len() as u64),
            log: RwLock::new(recovered.log),
            commit: Mutex::new(CommitState::new(recovered.last_batch_no)),
            commit_cv: [Condvar::new(), Condvar::new()],
            meta_lock: Mutex::new(recovered.meta_generation),
            poisoned: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            counters: Counters::default(),
            events: Mutex::new(recovered.events.into_iter().collect()),
            reclaim_wake: Mutex::new(false),
            reclaim_cv: Condvar::new(),
            reclaim_pass_lock: Mutex::new(()),
            recovery: recovered.report,
            effort: effort::Effort::new(),
            compress_hints: compress::CompressHints::new(),
            recent: Mutex::new(recent::RecentBatches::new(opts.tail_cache_bytes)),
            storage,
            opts,
        });
        let mut cache = Cache { inner: inner.clone(), flusher: None, reclaimer: None, _lock: lock };
        if inner.opts.read_only {
            return Ok(cache);
        }
        // Dead segments left by a crash between an ack and its reclaim go now.
        reclaimer::free_dead_segments(&inner)
            .map_err(|e| OpenError::Io { op: "free dead segments", source: std::io::Error::new(e.kind, e.message) })?;
        let writer = flusher::Writer::new(inner.clone(), recovered.next_segment_id);
        cache.flusher = Some(
            std::thread::Builder::new()
                .name("churnlog-flusher".into())
                .spawn(move || writer.run())
                .map_err(|source| OpenError::Io { op: "spawn flusher", source })?,
        );
        if inner.opts.background_reclaim {
            let inner2 = inner.clone();
            cache.reclaimer = Some(
                std::thread::Builder::new()
                    .name("churnlog-reclaimer".into())
                    .spawn(move || reclaimer::run(inner2))
                    .map_err(|source| OpenError::Io { op: "spawn reclaimer", source })?,
            );
        }
        Ok(cache)
    }

    pub fn options(&self) -> &Options {
        &self.inner.opts
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// This cache's identity: the random salt made when its directory was created. A new
    /// cache directory (a replaced disk, another process server) has a different one.
    pub fn cache_id(&self) -> u64 {
        self.inner.salt
    }

    pub fn backend_name(&self) -> &'static str {
        self.inner.storage.backend_name()
    }

    /// The stream for (`machine`, `disk`), created (and made durable in META) when new.
    pub fn stream(&self, machine: &str, disk: &str) -> Result<StreamId, StreamError> {
        streams::register(&self.inner, machine, disk)
    }

    pub fn find_stream(&self, machine: &str, disk: &str) -> Option<StreamId> {
        self.inner.log.read().by_key.get(&(machine.to_string(), disk.to_string())).map(|&id| StreamId(id))
    }

    /// Appends one record to `stream`. Returns at once with a ticket that resolves when
    /// the record is durable ([`AppendTicket::wait`], or `.await`). Between the watermarks
    /// the call sleeps a little (throttling); at the hard watermark it fails with
    /// [`AppendError::Backpressure`].
    pub fn append(&self, stream: StreamId, data: &[u8]) -> Result<AppendTicket, AppendError> {
        let inner = &self.inner;
        if data.is_empty() {
            return Err(AppendError::EmptyRecord);
        }
        if data.len() > inner.opts.record_size_max as usize {
            return Err(AppendError::RecordTooLarge { len: data.len(), max: inner.opts.record_size_max });
        }
        inner.admit_append()?;
        let (ratio_max, acceleration) = (inner.opts.compress_ratio_max, inner.effort.acceleration());
        let hinted = inner.compress_hints.last_compressed(stream.0);
        compress::encode_hinted(data, ratio_max, acceleration, hinted, |codec, stored, crc| {
            inner.compress_hints.record(stream.0, codec);
            inner.enqueue(stream.0, None, Encoded { codec, stored, logical_len: data.len() as u32, payload_crc: crc })
        })
    }

    /// Holds the flusher from starting a batch until the guard is dropped, so that the
    /// records appended meanwhile are committed together: batch boundaries then depend on
    /// the records alone, not on thread timing (the power-loss simulation replays a seed
    /// exactly this way). A batch too full for the next record is started anyway, and
    /// closing or a poisoning ends the hold. Tickets of held records resolve only after
    /// the guard is dropped: do not wait on one while holding it.
    pub fn hold_commits(&self) -> CommitHold<'_> {
        CommitHold::new(&self.inner)
    }

    /// Reads record `seq` of `stream`, verified (header, CRC, length) and decompressed.
    pub fn read(&self, stream: StreamId, seq: u64) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        self.read_into(stream, seq, &mut out)?;
        Ok(out)
    }

    /// [`Cache::read`] into a caller's buffer (cleared first), to reuse allocations.
    pub fn read_into(&self, stream: StreamId, seq: u64, out: &mut Vec<u8>) -> Result<(), ReadError> {
        read::read_into(&self.inner, stream, seq, out)
    }

    /// Reads record `seq` of `stream` verified (header, CRC, lengths) but not decompressed,
    /// and hands its stored form to `f`. `scratch` holds the raw bytes (reused across
    /// calls). The drain ships records this way, so compressed data stays compressed.
    pub fn read_stored_with<R>(
        &self,
        stream: StreamId,
        seq: u64,
        scratch: &mut Vec<u8>,
        f: impl FnOnce(StoredRecord<'_>) -> R,
    ) -> Result<R, ReadError> {
        read::read_stored_with(&self.inner, stream, seq, scratch, f)
    }

    /// Reads records `from..=upto` of `stream` in their stored form, several per system
    /// call: records that sit close together in one segment are read with one positioned
    /// read, then checked one by one exactly as [`Cache::read_stored_with`] checks them and
    /// handed to `f` in order. `f` returns false to stop. Returns how many records `f`
    /// accepted. The drain reads a whole object's worth this way.
    pub fn read_stored_run(
        &self,
        stream: StreamId,
        from: u64,
        upto: u64,
        span_bytes_max: usize,
        scratch: &mut Vec<u8>,
        f: impl FnMut(u64, StoredRecord<'_>) -> bool,
    ) -> Result<u64, ReadError> {
        read::read_stored_run(&self.inner, stream, from, upto, span_bytes_max, scratch, f)
    }

    /// A corruption found after the checks of [`Cache::read_stored_with`] (decompression),
    /// reported with the record's location in the cache.
    pub(crate) fn corruption(&self, stream: StreamId, seq: u64, what: String) -> ReadError {
        read::corruption(&self.inner, stream, seq, what)
    }

    /// Where a live record sits: (segment id, offset of its record header, stored length).
    /// For tests and forensics.
    #[doc(hidden)]
    pub fn record_location(&self, stream: StreamId, seq: u64) -> Option<(u64, u64, u32)> {
        read::record_location(&self.inner, stream, seq)
    }

    /// Marks every record of `stream` up to `upto` as uploaded, persisting the cursor
    /// crash-atomically before any space is given back.
    pub fn ack(&self, stream: StreamId, upto: u64) -> Result<(), StreamError> {
        self.ack_many(&[(stream, upto)])
    }

    /// [`Cache::ack`] for several streams with one META write: all are checked first and
    /// either every cursor moves or none does. An uploader that finishes several streams
    /// at once pays one atomic rewrite (two fsyncs) instead of one per stream. Pairs that
    /// move nothing are skipped (nothing is written if none moves); a stream named twice
    /// moves to the higher of the two.
    pub fn ack_many(&self, acks: &[(StreamId, u64)]) -> Result<(), StreamError> {
        streams::ack_many(&self.inner, acks)
    }

    /// Drops every durable, unuploaded record of `stream` and marks it resync required:
    /// the explicit last resort when space must be found. Never silent: it returns what
    /// was dropped, logs it, and records a [`CacheEvent::StreamEvicted`].
    pub fn evict_stream(&self, stream: StreamId, reason: &str) -> Result<EvictReport, StreamError> {
        eviction::evict(&self.inner, stream, reason)
    }

    /// The engine's answer to a record of `stream` that failed its checks on read (a
    /// [`ReadError::Corruption`]): such a record can never be served or uploaded, so the
    /// stream's unuploaded records are dropped and a resync is required, loudly (as
    /// [`Cache::evict_stream`]). Readers report corruption; this decides what follows.
    pub fn quarantine_corrupt(&self, stream: StreamId, error: &ReadError) -> Result<EvictReport, StreamError> {
        tracing::error!(stream = stream.0, %error, "corrupt cached record: the stream's cached records are dropped and a resync is required");
        eviction::evict(&self.inner, stream, &format!("corrupt record: {error}"))
    }

    /// Marks `stream` resync-required (crash-atomically in META) without dropping its
    /// cached records: the agent will be asked for a full copy. For the control plane,
    /// when the machine's data was lost elsewhere.
    pub fn mark_resync_required(&self, stream: StreamId) -> Result<(), StreamError> {
        streams::mark_resync_required(&self.inner, stream)
    }

    /// Records that a resync of `stream` began with its record `base_seq` (which must be
    /// durable and later than every dropped record) and clears the resync-required mark.
    pub fn clear_resync(&self, stream: StreamId, base_seq: u64) -> Result<(), StreamError> {
        streams::clear_resync(&self.inner, stream, base_seq)
    }

    /// One reclaim pass now: free fully uploaded segments, compact sparse old ones, and
    /// apply the eviction policy. The background reclaimer runs the same pass.
    pub fn reclaim(&self) -> Result<ReclaimReport, ReclaimError> {
        reclaimer::reclaim_pass(&self.inner)
    }

    /// The oldest segments still in use and which streams keep them (live records).
    pub fn reclaim_blockers(&self, segments_max: usize) -> Vec<SegmentBlockers> {
        reclaimer::blockers(&self.inner, segments_max)
    }

    pub fn stream_info(&self, stream: StreamId) -> Option<StreamInfo> {
        let log = self.inner.log.read();
        log.streams.get(stream.0 as usize).map(|st| st.info(stream))
    }

    pub fn streams(&self) -> Vec<StreamInfo> {
        self.inner.log.read().stream_infos()
    }

    pub fn space(&self) -> SpaceReport {
        self.inner.space_report()
    }

    /// Bytes of segments in use (one atomic load: cheap enough for every append, unlike
    /// [`Cache::space`]).
    pub fn used_bytes(&self) -> u64 {
        self.inner.used_bytes()
    }

    /// LZ4 acceleration producers use now (cheaper than [`Cache::stats`]).
    pub fn lz4_acceleration(&self) -> u32 {
        self.inner.effort.acceleration()
    }

    pub fn stats(&self) -> CacheStats {
        self.inner.stats()
    }

    /// Reads back and checks every cached record (see [`verify`]).
    pub fn verify(&self) -> VerifyReport {
        verify::verify(&self.inner)
    }

    pub fn events(&self) -> Vec<CacheEvent> {
        self.inner.events.lock().iter().cloned().collect()
    }

    pub fn is_poisoned(&self) -> bool {
        self.inner.is_poisoned()
    }

    /// Writes what is pending, seals the open segment (so the next open reads only
    /// summaries) and stops the background threads.
    pub fn close(mut self) -> Result<(), CloseError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), CloseError> {
        self.inner.shutdown.store(true, Ordering::Release);
        {
            let mut st = self.inner.append.lock();
            st.closing = true;
        }
        self.inner.work_cv.notify_all();
        self.inner.wake_reclaimer();
        if let Some(r) = self.reclaimer.take() {
            let _ = r.join();
        }
        match self.flusher.take() {
            Some(f) => f.join().unwrap_or_else(|_| {
                Err(CloseError::Io(IoFailure {
                    op: "join flusher",
                    kind: std::io::ErrorKind::Other,
                    message: "flusher panicked".into(),
                }))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "cache closed with an error");
        }
    }
}
