//! The engine's shared state: what every role (producers, flusher, preparer, reclaimer,
//! readers, recovery) works on. [`Inner`] holds the locks and their contents — the pending
//! batch (`append`), what is durable and where (`log`: streams, indexes, segments), ticket
//! resolution (`commit`) — plus counters, events and the space arithmetic the watermarks
//! use. Only data and the small helpers every role needs live here; each role's own
//! methods live in that role's file. This file imports only leaf modules and `commit`
//! (whose types it holds), so no role can form a loop through it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use super::commit::{AppendState, CommitState};
use super::error::{AppendError, ReadError};
use super::index::{Loc, StreamIndex};
use super::io::{Storage, StorageFile};
use super::meta::{Meta, MetaStream};
use super::options::Options;
use super::recovery_report::RecoveryReport;
use super::types::{CacheEvent, CacheStats, SpaceReport, SpaceState, StreamId, StreamInfo};
use super::{compress, effort, recent};

pub(crate) struct SegmentState {
    pub file: Arc<dyn StorageFile>,
    pub sealed: bool,
    pub live_records: u64,
    pub live_stored_bytes: u64,
}

pub(crate) struct StreamState {
    pub machine: String,
    pub disk: String,
    pub resync_required: bool,
    pub evicted_upto: u64,
    pub resync_base: u64,
    pub index: StreamIndex,
}

impl StreamState {
    /// This stream as the API reports it.
    pub fn info(&self, id: StreamId) -> StreamInfo {
        StreamInfo {
            id,
            machine: self.machine.clone(),
            disk: self.disk.clone(),
            uploaded_upto: self.index.uploaded_upto(),
            durable_upto: self.index.durable_upto(),
            records: self.index.len() as u64,
            logical_bytes: self.index.logical_bytes(),
            stored_bytes: self.index.stored_bytes(),
            resync_required: self.resync_required,
            evicted_upto: self.evicted_upto,
            resync_base: self.resync_base,
        }
    }

    /// Where the live durable record `seq` of this stream (`stream`) sits.
    pub fn live_loc(&self, stream: StreamId, seq: u64) -> Result<Loc, ReadError> {
        self.index.get(seq).ok_or(ReadError::NotAvailable {
            stream,
            seq,
            first: self.index.uploaded_upto() + 1,
            last: self.index.durable_upto(),
        })
    }
}

/// What is durable and where: streams, their indexes, segments.
pub(crate) struct LogState {
    pub streams: Vec<StreamState>,
    pub by_key: HashMap<(String, String), u32>,
    pub segments: BTreeMap<u64, SegmentState>,
    pub recycled: Vec<String>,
}

impl LogState {
    /// Every stream as the API reports it, in id order.
    pub fn stream_infos(&self) -> Vec<StreamInfo> {
        self.streams.iter().enumerate().map(|(i, st)| st.info(StreamId(i as u32))).collect()
    }

    pub fn meta_snapshot(&self, salt: u64, segment_size: u64, generation: u64) -> Meta {
        Meta {
            salt,
            segment_size,
            generation,
            streams: self
                .streams
                .iter()
                .enumerate()
                .map(|(id, s)| MetaStream {
                    id: id as u32,
                    machine: s.machine.clone(),
                    disk: s.disk.clone(),
                    uploaded_upto: s.index.uploaded_upto(),
                    resync_required: s.resync_required,
                    evicted_upto: s.evicted_upto,
                    resync_base: s.resync_base,
                })
                .collect(),
        }
    }

    /// Drops a stream's index entries up to `upto`, keeping segment live counts true.
    pub fn release_upto(&mut self, stream: u32, upto: u64) {
        let st = &mut self.streams[stream as usize];
        for loc in st.index.release_upto(upto) {
            if let Some(seg) = self.segments.get_mut(&u64::from(loc.segment)) {
                debug_assert!(seg.live_records > 0);
                seg.live_records -= 1;
                seg.live_stored_bytes -= u64::from(loc.stored_len);
            }
        }
        self.streams[stream as usize].index.shrink_if_sparse();
    }
}

/// Counters, readable at any time through [`Cache::stats`](super::Cache::stats).
#[derive(Default)]
pub(crate) struct Counters {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub logical_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub device_bytes: AtomicU64,
    pub meta_writes: AtomicU64,
    pub meta_bytes: AtomicU64,
    pub syncs: AtomicU64,
    pub throttled_appends: AtomicU64,
    pub backpressure_refusals: AtomicU64,
    pub rewritten_records: AtomicU64,
    pub segments_freed: AtomicU64,
    pub evictions: AtomicU64,
    pub read_bytes_memory: AtomicU64,
    pub read_bytes_device: AtomicU64,
}

const EVENTS_KEPT_MAX: usize = 1024;

pub(crate) struct Inner {
    pub opts: Options,
    pub storage: Arc<dyn Storage>,
    pub salt: u64,
    pub append: Mutex<AppendState>,
    /// The flusher waits here for work.
    pub work_cv: Condvar,
    /// Producers wait here for room in the pending batch.
    pub room_cv: Condvar,
    pub log: RwLock<LogState>,
    pub commit: Mutex<CommitState>,
    /// Threads waiting for a ticket, by the parity of its batch number. A ticket's batch
    /// is at most two ahead of the last resolved one (one in flight, one filling), so
    /// resolving a batch wakes only its own waiters, not those of the batch behind it:
    /// with one shared condition variable every batch woke every waiting thread.
    pub commit_cv: [Condvar; 2],
    /// Serializes META rewrites; holds the last generation written.
    pub meta_lock: Mutex<u64>,
    pub segments_in_use: AtomicU64,
    pub poisoned: AtomicBool,
    pub shutdown: AtomicBool,
    pub counters: Counters,
    pub events: Mutex<VecDeque<CacheEvent>>,
    pub reclaim_wake: Mutex<bool>,
    pub reclaim_cv: Condvar,
    pub reclaim_pass_lock: Mutex<()>,
    pub recovery: RecoveryReport,
    pub recent: Mutex<recent::RecentBatches>,
    /// LZ4 acceleration producers use now; the flusher adjusts it.
    pub effort: effort::Effort,
    /// Per stream, whether its last record compressed (lets the next skip the sample).
    pub compress_hints: compress::CompressHints,
}

impl Inner {
    pub fn used_bytes(&self) -> u64 {
        self.segments_in_use.load(Ordering::Relaxed) * self.opts.segment_size
    }

    /// Bytes in use at which appends are refused: the hard watermark, but never closer
    /// than two segments to capacity, so compaction always has room to move records to.
    pub fn hard_limit_bytes(&self) -> u64 {
        let cap = self.opts.capacity_bytes;
        ((cap as f64 * self.opts.hard_watermark) as u64).min(cap - 2 * self.opts.segment_size)
    }

    pub fn soft_limit_bytes(&self) -> u64 {
        ((self.opts.capacity_bytes as f64 * self.opts.soft_watermark) as u64).min(self.hard_limit_bytes())
    }

    pub fn space_state(&self) -> (u64, SpaceState) {
        let used = self.used_bytes();
        let state = if used >= self.hard_limit_bytes() {
            SpaceState::Full
        } else if used >= self.soft_limit_bytes() {
            SpaceState::Throttling
        } else {
            SpaceState::Normal
        };
        (used, state)
    }

    pub fn push_event(&self, event: CacheEvent) {
        tracing::warn!(?event, "cache event");
        let mut ev = self.events.lock();
        if ev.len() == EVENTS_KEPT_MAX {
            ev.pop_front();
        }
        ev.push_back(event);
    }

    /// Poisons the engine after a failed fsync anywhere (a batch, a seal, a directory,
    /// META): what that fsync covered may be gone while the kernel reports the next one
    /// clean, so nothing more is accepted or acknowledged, and no fsync is retried, until
    /// the cache is reopened and recovers from what is really on disk.
    ///
    /// The flag and the refusal change together under the append lock: the flusher
    /// exits when it sees the flag with no records pending, so an append must never
    /// find the flag set and the refusal not yet (its record would wait for ever — a
    /// hang the crash simulator met once, the preparer poisoning beside an appender).
    pub fn poison(&self, reason: String) {
        let first = {
            let mut st = self.append.lock();
            if !matches!(st.refuse, Some(AppendError::Poisoned(_))) {
                st.refuse = Some(AppendError::Poisoned(reason.clone()));
            }
            !self.poisoned.swap(true, Ordering::AcqRel)
        };
        self.room_cv.notify_all();
        self.work_cv.notify_all();
        if first {
            tracing::error!(%reason, "engine poisoned");
            self.push_event(CacheEvent::Poisoned { reason });
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn wake_reclaimer(&self) {
        *self.reclaim_wake.lock() = true;
        self.reclaim_cv.notify_one();
    }

    /// Admission of one append by space: below the soft watermark it passes; between the
    /// watermarks it sleeps a little (throttling, longer the closer to the hard one); at
    /// the hard watermark it fails with [`AppendError::Backpressure`]. Either of the last
    /// two wakes the reclaimer.
    pub fn admit_append(&self) -> Result<(), AppendError> {
        match self.space_state() {
            (_, SpaceState::Normal) => {}
            (used, SpaceState::Full) => {
                self.counters.backpressure_refusals.fetch_add(1, Ordering::Relaxed);
                self.wake_reclaimer();
                return Err(AppendError::Backpressure { used_bytes: used, capacity_bytes: self.opts.capacity_bytes });
            }
            (used, SpaceState::Throttling) => {
                self.counters.throttled_appends.fetch_add(1, Ordering::Relaxed);
                self.wake_reclaimer();
                let (soft, hard) = (self.soft_limit_bytes() as f64, self.hard_limit_bytes() as f64);
                let frac = ((used as f64 - soft) / (hard - soft).max(1.0)).clamp(0.05, 1.0);
                std::thread::sleep(Duration::from_micros((self.opts.throttle_delay_us_max as f64 * frac) as u64));
            }
        }
        Ok(())
    }

    /// Space as the watermarks see it.
    pub fn space_report(&self) -> SpaceReport {
        let (used, state) = self.space_state();
        let ratio = used as f64 / self.opts.capacity_bytes as f64;
        SpaceReport {
            capacity_bytes: self.opts.capacity_bytes,
            used_bytes: used,
            segments_in_use: self.segments_in_use.load(Ordering::Relaxed),
            segments_recycled: self.log.read().recycled.len() as u64,
            usage_ratio: ratio,
            soft_watermark: self.opts.soft_watermark,
            hard_watermark: self.opts.hard_watermark,
            state,
        }
    }

    /// The counters, with the index's and tail cache's sizes, read now.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let log = self.log.read();
        let (index_bytes, index_records) = log
            .streams
            .iter()
            .fold((0u64, 0u64), |(b, r), s| (b + s.index.heap_bytes() as u64, r + s.index.len() as u64));
        CacheStats {
            batches: c.batches.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            logical_bytes: c.logical_bytes.load(Ordering::Relaxed),
            stored_bytes: c.stored_bytes.load(Ordering::Relaxed),
            device_bytes: c.device_bytes.load(Ordering::Relaxed),
            meta_writes: c.meta_writes.load(Ordering::Relaxed),
            meta_bytes: c.meta_bytes.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            throttled_appends: c.throttled_appends.load(Ordering::Relaxed),
            backpressure_refusals: c.backpressure_refusals.load(Ordering::Relaxed),
            rewritten_records: c.rewritten_records.load(Ordering::Relaxed),
            segments_freed: c.segments_freed.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            read_bytes_memory: c.read_bytes_memory.load(Ordering::Relaxed),
            read_bytes_device: c.read_bytes_device.load(Ordering::Relaxed),
            tail_cache_bytes: self.recent.lock().bytes() as u64,
            index_bytes,
            index_records,
            lz4_acceleration: self.effort.acceleration(),
        }
    }
}
