//! Write capture for NBD exports ([`super::nbd`]): every write, trim and write-zeroes
//! goes to the backing file and, in the same global order, into a **bounded** in-memory
//! queue that the replication task ([`replicate`]) empties into the agent's connection.
//!
//! The NBD side never waits for the network. When an item does not fit in the queue,
//! its range is recorded in a per-export dirty bitmap instead, and from then on every
//! write is recorded there until the bitmap has drained ("overflow"). The replication
//! task sends what is queued first, then catches up: it takes a run of dirty chunks,
//! reads them from the backing file **under the same lock the writers hold**, so the
//! bytes it sends are the file's content at one instant of the global order, and sends
//! them (all-zero runs as `Zero` frames). Once the bitmap is empty, writes go to the
//! queue again. A write after a chunk was read either re-dirties it or is queued after
//! it, so the process server always applies the same sequence of states the file went
//! through, only coarser during catch-up.
//!
//! Points: after a FLUSH, once `point_interval` has passed since the last point, a point
//! marker joins the queue while the lock is held (nothing can come between the flush's
//! fdatasync and the marker). It is crash-consistent when no bitmap holds anything then:
//! everything before it in the stream is exactly the file at that flush. Otherwise it is
//! tagged [`PointKind::NotCrashConsistent`]. An initial copy (and a full copy the server
//! asks for) is a catch-up over the whole disk, so points during it are not
//! crash-consistent either.
//!
//! **Persistence** (with `--state-dir`, [`super::dirty_file`]): besides the bitmap of
//! chunks awaiting catch-up, the agent tracks which chunks were written since each point
//! marker it queued ("epochs"). The union of those with the catch-up bitmap is every chunk
//! the process server may not yet hold durably; it is kept on disk, set before each write
//! reaches the backing file and fdatasynced before the FLUSH covering it returns, and
//! shrinks when the server acknowledges a point durable (the epochs up to that point
//! drop out). A restarted agent loads it as its catch-up bitmap and sends only those
//! chunks: no full copy.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::dirty_file::{DirtyFile, DirtyHeader};
use super::{Agent, AgentError};
use crate::protocol::{PointKind, WRITE_DATA_MAX, ZERO_LEN_MAX};

/// Granularity of the dirty bitmap, bytes.
pub const CHUNK: u64 = 64 << 10;
/// Point markers not yet durable on the server that keep their own record of the chunks
/// written before them; past this the two oldest merge (their chunks then stay recorded
/// until the later of the two is durable), which bounds the memory to this many bitmaps.
pub const EPOCHS_MAX: usize = 8;
/// Recent point markers whose queue time, and recent points whose age at upload, are kept.
pub const AGES_KEPT: usize = 4096;

/// One exported disk.
pub struct Export {
    pub id: String,
    pub file: File,
    pub size: u64,
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Bytes of write data the queue holds at most (each item counts at least 64).
    pub queue_bytes: usize,
    /// A point follows the first FLUSH after this long since the previous point.
    pub point_interval: Duration,
    /// Where the persistent dirty bitmaps live (none: an agent restart copies every
    /// export in full).
    pub persist: Option<PersistConfig>,
}

impl Default for CaptureConfig {
    fn default() -> CaptureConfig {
        CaptureConfig { queue_bytes: 64 << 20, point_interval: Duration::from_secs(5), persist: None }
    }
}

/// The state directory and the identity its dirty bitmaps are kept under.
#[derive(Clone, Debug)]
pub struct PersistConfig {
    pub dir: PathBuf,
    pub machine: String,
    /// SHA-256 naming the server whose history the bitmaps are relative to.
    pub server: [u8; 32],
}

/// What the replication task sends, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Write {
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        disk: u16,
        offset: u64,
        len: u64,
    },
    /// A recovery point over every export; `seq` numbers the markers of this run.
    Point {
        consistent: bool,
        seq: u64,
    },
}

impl Item {
    fn cost(&self) -> usize {
        match self {
            Item::Write { data, .. } => data.len().max(64),
            _ => 64,
        }
    }
}

/// Dirty chunks of one export, one bit each.
#[derive(Clone, Debug)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    chunks: u64,
    count: u64,
    /// Where the next catch-up scan starts (a word index).
    cursor: usize,
}

impl DirtyBitmap {
    pub fn new(size: u64) -> DirtyBitmap {
        let chunks = size.div_ceil(CHUNK);
        DirtyBitmap { words: vec![0; chunks.div_ceil(64) as usize], chunks, count: 0, cursor: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Dirty chunks.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Marks every chunk overlapping `offset..offset + len` (clipped to the disk).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / CHUNK;
        let last = (offset.saturating_add(len - 1) / CHUNK).min(self.chunks.saturating_sub(1));
        for c in first..=last {
            let (w, b) = ((c / 64) as usize, c % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                self.count += 1;
            }
        }
    }

    pub fn mark_all(&mut self) {
        for c in 0..self.chunks {
            let (w, b) = ((c / 64) as usize, c % 64);
            self.words[w] |= 1 << b;
        }
        self.count = self.chunks;
    }

    /// A bitmap with these words (one bit per chunk; bits past the end must be clear).
    pub fn from_words(size: u64, words: Vec<u64>) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(size);
        assert_eq!(words.len(), b.words.len(), "one bit per chunk");
        b.count = words.iter().map(|w| w.count_ones() as u64).sum();
        debug_assert!(b.count <= b.chunks);
        b.words = words;
        b
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Adds every chunk of `other` (the same disk).
    pub fn union(&mut self, other: &DirtyBitmap) {
        debug_assert_eq!(self.words.len(), other.words.len());
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            self.count += (o & !*w).count_ones() as u64;
            *w |= o;
        }
    }

    /// Clears chunk `c`; whether it was set.
    pub fn clear(&mut self, c: u64) -> bool {
        let (w, b) = ((c / 64) as usize, c % 64);
        let was = self.words[w] & (1 << b) != 0;
        if was {
            self.words[w] &= !(1 << b);
            self.count -= 1;
        }
        was
    }

    /// Clears and returns the next run of at most `max` dirty chunks: (first, count).
    pub fn take_run(&mut self, max: u64) -> Option<(u64, u64)> {
        if self.count == 0 || max == 0 {
            return None;
        }
        let n = self.words.len();
        let w = (0..n).map(|i| (self.cursor + i) % n).find(|&w| self.words[w] != 0)?;
        let first = w as u64 * 64 + self.words[w].trailing_zeros() as u64;
        let mut c = first;
        while c < self.chunks && c - first < max && self.words[(c / 64) as usize] & (1 << (c % 64)) != 0 {
            self.words[(c / 64) as usize] &= !(1 << (c % 64));
            self.count -= 1;
            c += 1;
        }
        self.cursor = ((c / 64) as usize).min(n - 1);
        Some((first, c - first))
    }
}

/// Counters, for the agent's JSON lines and the tests.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CaptureStatus {
    pub writes: u64,
    pub zeroes: u64,
    pub flushes: u64,
    /// Full copies started (the first copy of an export without a usable persistent
    /// bitmap, and copies the server asked for).
    pub full_copies: u64,
    /// Chunks a persistent bitmap held when the agent started (sent as catch-up instead
    /// of a full copy).
    pub resumed_chunks: u64,
    /// Exports without a usable persistent bitmap compared with the server's block
    /// hashes instead of copied in full ([`super::delta`]).
    pub delta_resyncs: u64,
    /// Chunks those comparisons found equal to what the server holds (not sent).
    pub delta_equal_chunks: u64,
    /// Times the queue was full and capture fell back to the bitmap.
    pub overflows: u64,
    /// Crash-consistent points tagged after the fact for a flush state that had none
    /// (its flush came during catch-up or before the point interval had passed, and
    /// nothing was written since).
    pub settle_points: u64,
    pub dirty_chunks: u64,
    pub queued_bytes: usize,
    pub catchup_bytes: u64,
    pub points_consistent: u64,
    pub points_not_consistent: u64,
    /// The newest point tagged on the process server: (id, crash-consistent).
    pub last_point: Option<(u64, bool)>,
    /// The newest crash-consistent point the process server reported uploaded.
    pub last_uploaded_consistent: Option<u64>,
    /// That point's age when the agent learnt it was uploaded: from the FLUSH it
    /// follows (its last write) to the server's report, milliseconds. The RPO achieved.
    pub last_upload_age_ms: Option<u64>,
    /// The replication task's latest error, while it retries.
    pub last_error: Option<String>,
}

struct State {
    queue: VecDeque<Item>,
    queued: usize,
    /// Per export: chunks waiting for catch-up.
    dirty: Vec<DirtyBitmap>,
    /// Per export: chunks written (or read for catch-up) since the last point marker.
    since_point: Vec<DirtyBitmap>,
    /// Point markers not yet acknowledged durable, oldest first: the marker's `seq` and,
    /// per export, the chunks written before it since the marker before it.
    epochs: VecDeque<(u64, Vec<DirtyBitmap>)>,
    next_seq: u64,
    /// When each recent point marker was queued (its FLUSH), by seq; the newest
    /// [`AGES_KEPT`].
    marker_times: VecDeque<(u64, Instant)>,
    /// Ages at upload of the most recent crash-consistent points, ms (the newest
    /// [`AGES_KEPT`]).
    upload_ages_ms: VecDeque<u64>,
    /// Per export: its persistent bitmap (with a state directory, while it can be kept).
    persist: Vec<Option<DirtyFile>>,
    last_point: Option<Instant>,
    /// Writes and zeroings so far (a generation: the image changes with each).
    write_gen: u64,
    /// The newest FLUSH that completed with no write after it within the flush: the
    /// generation it made durable, and when.
    flushed: Option<(u64, Instant)>,
    /// The generation the newest crash-consistent point marker stands for.
    pointed: Option<u64>,
    status: CaptureStatus,
}

impl State {
    fn overflowing(&self) -> bool {
        self.dirty.iter().any(|d| !d.is_empty())
    }

    /// Before `offset..offset + len` of `disk` is written: records it since the last
    /// point and sets it in the persistent bitmap. An error means the write must not
    /// happen (the bitmap could not record it and could not be removed either).
    fn record(&mut self, disk: usize, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.since_point[disk].mark(offset, len);
        if let Some(f) = &mut self.persist[disk] {
            let (first, last) = (offset / CHUNK, offset.saturating_add(len - 1) / CHUNK);
            if let Err(e) = f.set(first, last) {
                self.drop_persist(disk, e)?;
            }
        }
        Ok(())
    }

    /// The persistent bitmap of `disk` cannot be kept current (`why`): removes it, so a
    /// restart copies the disk in full instead of trusting it. Fails only when it cannot
    /// be removed either.
    fn drop_persist(&mut self, disk: usize, why: std::io::Error) -> std::io::Result<()> {
        let Some(f) = self.persist[disk].take() else { return Ok(()) };
        tracing::warn!(path = %f.path().display(), error = %why,
            "cannot update the persistent dirty bitmap: removing it (an agent restart copies this export in full)");
        match std::fs::remove_file(f.path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                tracing::error!(path = %f.path().display(), error = %e, "cannot remove the dirty bitmap either");
                self.persist[disk] = Some(f);
                Err(e)
            }
        }
    }

    /// How long until a point is due (zero: due now).
    fn point_wait(&self, interval: Duration) -> Duration {
        self.last_point.map_or(Duration::ZERO, |t| interval.saturating_sub(t.elapsed()))
    }

    /// The newest flush state that has no crash-consistent point, nothing written after
    /// it and nothing dirty: when its FLUSH was, and how long until its point is due.
    fn settle_wait(&self, interval: Duration) -> Option<(Instant, Duration)> {
        let (gen, at) = self.flushed?;
        if gen != self.write_gen || self.pointed == Some(gen) || self.overflowing() {
            return None;
        }
        Some((at, self.point_wait(interval)))
    }

    /// Queues a point marker (behind everything queued so far) and starts a new epoch;
    /// `at` is the FLUSH it follows.
    fn push_point(&mut self, at: Instant) {
        let consistent = !self.overflowing();
        if consistent {
            self.pointed = Some(self.write_gen);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let fresh = self.since_point.iter().map(|b| DirtyBitmap::new(b.chunks * CHUNK)).collect();
        let ended = std::mem::replace(&mut self.since_point, fresh);
        self.epochs.push_back((seq, ended));
        if self.epochs.len() > EPOCHS_MAX {
            let (_, oldest) = self.epochs.pop_front().expect("more than one");
            for (next, old) in self.epochs[0].1.iter_mut().zip(&oldest) {
                next.union(old);
            }
        }
        self.queued += 64;
        self.queue.push_back(Item::Point { consistent, seq });
        self.marker_times.push_back((seq, at));
        if self.marker_times.len() > AGES_KEPT {
            self.marker_times.pop_front();
        }
    }

    /// Whether the server may not hold chunk-word `w` of `disk` durably: its bits.
    fn unsettled_word(&self, disk: usize, w: usize) -> u64 {
        let mut bits = self.dirty[disk].words()[w] | self.since_point[disk].words()[w];
        for (_, e) in &self.epochs {
            bits |= e[disk].words()[w];
        }
        bits
    }

    /// Queues `item`, or records `range` of `disk` as dirty when the queue is full or
    /// catch-up is under way.
    fn push_or_dirty(&mut self, item: Item, disk: usize, offset: u64, len: u64, limit: usize) {
        if !self.overflowing() && self.queued + item.cost() <= limit {
            self.queued += item.cost();
            self.queue.push_back(item);
        } else {
            if !self.overflowing() {
                self.status.overflows += 1;
                tracing::warn!("replication queue full: recording dirty regions until the agent catches up");
            }
            self.dirty[disk].mark(offset, len);
        }
    }
}

/// What the replication task takes next.
#[derive(Debug, PartialEq, Eq)]
pub enum Work {
    Item(Item),
    /// `data` is the content of `disk` at `offset` now (read under the lock).
    CatchUp {
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    },
}

pub struct Capture {
    exports: Vec<Export>,
    cfg: CaptureConfig,
    full_copy: Vec<bool>,
    state: Mutex<State>,
    notify: tokio::sync::Notify,
}

impl Capture {
    /// With `cfg.persist`, loads each export's persistent bitmap as its catch-up bitmap
    /// (see [`Capture::needs_full_copy`]); a missing or unusable one is replaced by a new
    /// one with every chunk set (warning when one was there).
    pub fn new(exports: Vec<Export>, cfg: CaptureConfig) -> Capture {
        let mut dirty: Vec<DirtyBitmap> = exports.iter().map(|e| DirtyBitmap::new(e.size)).collect();
        let since_point = exports.iter().map(|e| DirtyBitmap::new(e.size)).collect();
        let mut persist: Vec<Option<DirtyFile>> = exports.iter().map(|_| None).collect();
        let mut full_copy = vec![true; exports.len()];
        let mut status = CaptureStatus::default();
        if let Some(p) = &cfg.persist {
            for (d, e) in exports.iter().enumerate() {
                let header = DirtyHeader {
                    machine: p.machine.clone(),
                    disk: e.id.clone(),
                    server: p.server,
                    disk_size: e.size,
                    chunk_size: CHUNK as u32,
                };
                match DirtyFile::open(&p.dir, &header) {
                    Ok(Some(o)) => {
                        if o.torn_pages > 0 {
                            tracing::warn!(export = %e.id, pages = o.torn_pages,
                                "torn pages in the persistent dirty bitmap: every chunk they cover is sent again");
                        }
                        dirty[d] = DirtyBitmap::from_words(e.size, o.file.words().to_vec());
                        status.resumed_chunks += dirty[d].count();
                        persist[d] = Some(o.file);
                        full_copy[d] = false;
                        continue;
                    }
                    Ok(None) => {}
                    Err(why) => tracing::warn!(export = %e.id, error = %why,
                        "the persistent dirty bitmap is not usable: copying this export in full"),
                }
                let mut all = DirtyBitmap::new(e.size);
                all.mark_all();
                match DirtyFile::create(&p.dir, &header, all.words().to_vec()) {
                    Ok(f) => persist[d] = Some(f),
                    Err(why) => tracing::warn!(export = %e.id, error = %why,
                        "cannot create a persistent dirty bitmap: an agent restart copies this export in full"),
                }
            }
        }
        Capture {
            exports,
            cfg,
            full_copy,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued: 0,
                dirty,
                since_point,
                epochs: VecDeque::new(),
                next_seq: 0,
                marker_times: VecDeque::new(),
                upload_ages_ms: VecDeque::new(),
                persist,
                last_point: None,
                write_gen: 0,
                flushed: None,
                pointed: None,
                status,
            }),
            notify: tokio::sync::Notify::new(),
        }
    }

    /// Whether export `d` starts with a full copy (no persistent bitmap said which of its
    /// chunks the server may lack).
    pub fn needs_full_copy(&self, d: usize) -> bool {
        self.full_copy[d]
    }

    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    pub fn status(&self) -> CaptureStatus {
        let s = self.state.lock();
        let mut st = s.status.clone();
        st.dirty_chunks = s.dirty.iter().map(|d| d.count()).sum();
        st.queued_bytes = s.queued;
        st
    }

    pub fn read(&self, disk: usize, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.exports[disk].file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Writes to the backing file and captures the write; with `fua`, returns after
    /// fdatasync.
    pub fn write(&self, disk: usize, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        if !data.is_empty() {
            let mut s = self.state.lock();
            s.record(disk, offset, data.len() as u64)?;
            if let Err(e) = self.exports[disk].file.write_all_at(&data, offset) {
                // Part of it may be in the file: catch-up sends whatever is there.
                s.dirty[disk].mark(offset, data.len() as u64);
                return Err(e);
            }
            s.status.writes += 1;
            s.write_gen += 1;
            let len = data.len() as u64;
            s.push_or_dirty(Item::Write { disk: disk as u16, offset, data }, disk, offset, len, self.cfg.queue_bytes);
        }
        self.notify.notify_one();
        if fua {
            self.exports[disk].file.sync_data()?;
        }
        Ok(())
    }

    /// TRIM and WRITE_ZEROES: the range reads back as zeros (a punched hole where the
    /// file system can, written zeros where not) and is replicated as a zero run.
    pub fn zero(&self, disk: usize, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        if len > 0 {
            let mut s = self.state.lock();
            s.record(disk, offset, len)?;
            if let Err(e) = zero_range(&self.exports[disk].file, offset, len) {
                s.dirty[disk].mark(offset, len);
                return Err(e);
            }
            s.status.zeroes += 1;
            s.write_gen += 1;
            s.push_or_dirty(Item::Zero { disk: disk as u16, offset, len }, disk, offset, len, self.cfg.queue_bytes);
        }
        self.notify.notify_one();
        if fua {
            self.exports[disk].file.sync_data()?;
        }
        Ok(())
    }

    /// FLUSH: the persistent bitmap's fdatasync (it covers every write before this
    /// flush), then the backing file's; then, when a point is due, a point marker right
    /// behind everything the flush made durable. A flush state left without a
    /// crash-consistent point (not due yet, or catch-up under way) gets one later from
    /// [`Capture::next`] if nothing is written before then.
    pub fn flush(&self, disk: usize) -> std::io::Result<()> {
        self.sync_bitmap(disk)?;
        let due = |s: &State| s.point_wait(self.cfg.point_interval).is_zero();
        let gen = {
            let s = self.state.lock();
            (!due(&s)).then_some(s.write_gen)
        };
        if let Some(gen) = gen {
            self.exports[disk].file.sync_data()?;
            let mut s = self.state.lock();
            s.status.flushes += 1;
            if s.write_gen == gen {
                s.flushed = Some((gen, Instant::now()));
                drop(s);
                self.notify.notify_one();
            }
            return Ok(());
        }
        let mut s = self.state.lock();
        self.exports[disk].file.sync_data()?;
        s.status.flushes += 1;
        let now = Instant::now();
        s.flushed = Some((s.write_gen, now));
        if due(&s) {
            s.last_point = Some(now);
            s.push_point(now);
        }
        drop(s);
        self.notify.notify_one();
        Ok(())
    }

    /// How long until the newest flush state, which has no crash-consistent point yet
    /// and nothing written after it, is due one (`None`: no such state).
    pub fn settle_point_wait(&self) -> Option<Duration> {
        self.state.lock().settle_wait(self.cfg.point_interval).map(|(_, wait)| wait)
    }

    /// fdatasyncs `disk`'s persistent bitmap when it has unsynced pages (outside the
    /// lock: writers go on meanwhile, and their pages are the next flush's business).
    fn sync_bitmap(&self, disk: usize) -> std::io::Result<()> {
        let Some((file, upto)) = self.state.lock().persist[disk].as_ref().and_then(|f| f.unsynced()) else {
            return Ok(());
        };
        let r = file.sync_data();
        let mut s = self.state.lock();
        match r {
            Ok(()) => {
                if let Some(f) = &mut s.persist[disk] {
                    f.note_synced(upto);
                }
                Ok(())
            }
            // After a failed fdatasync nothing says which pages reached the disk.
            Err(e) => s.drop_persist(disk, e),
        }
    }

    /// The server acknowledged the point marker `seq` durable (and so everything before
    /// it): the chunks written before it no longer need to be resent after a restart, and
    /// leave the persistent bitmap unless written again since.
    pub fn point_durable(&self, seq: u64) {
        let mut s = self.state.lock();
        let mut settled: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); self.exports.len()];
        while s.epochs.front().is_some_and(|(q, _)| *q <= seq) {
            let (_, bitmaps) = s.epochs.pop_front().expect("front");
            for (d, b) in bitmaps.iter().enumerate() {
                settled[d].extend(b.words().iter().enumerate().filter(|(_, &w)| w != 0).map(|(i, _)| i));
            }
        }
        for (d, words) in settled.into_iter().enumerate() {
            if words.is_empty() || s.persist[d].is_none() {
                continue;
            }
            let keep: Vec<(usize, u64)> = words.into_iter().map(|w| (w, s.unsettled_word(d, w))).collect();
            let r = s.persist[d].as_mut().expect("checked").clear(keep);
            if let Err(e) = r {
                // Stale set bits only cost a resend; a file that cannot be written goes.
                if let Err(e) = s.drop_persist(d, e) {
                    tracing::error!(error = %e, "a stale persistent dirty bitmap remains");
                }
            }
        }
    }

    /// Delta resync of export `disk`, whose persistent bitmap was lost (so every chunk
    /// was marked dirty): the chunks whose content hashes to the server's `hashes` (one
    /// per [`CHUNK`], [`super::delta`]) are no longer dirty. Reads under the capture's
    /// lock, 1 MiB at a time, so no write lands between the read and the clearing (a
    /// write since the start is queued, or dirty and read again). Returns the chunks
    /// cleared. Blocking: call it off the async workers.
    pub fn settle_equal_chunks(&self, disk: usize, hashes: &[u128]) -> std::io::Result<u64> {
        let export = &self.exports[disk];
        let chunks = export.size.div_ceil(CHUNK);
        assert_eq!(hashes.len() as u64, chunks, "one hash per chunk");
        const GROUP: u64 = 16;
        let mut buf = vec![0u8; (GROUP * CHUNK) as usize];
        let mut cleared = 0u64;
        let mut first = 0u64;
        while first < chunks {
            let n = (chunks - first).min(GROUP);
            let offset = first * CHUNK;
            let len = (n * CHUNK).min(export.size - offset) as usize;
            let mut s = self.state.lock();
            export.file.read_exact_at(&mut buf[..len], offset)?;
            for (i, chunk) in buf[..len].chunks(CHUNK as usize).enumerate() {
                let c = first + i as u64;
                if xxhash_rust::xxh3::xxh3_128(chunk) == hashes[c as usize] && s.dirty[disk].clear(c) {
                    cleared += 1;
                }
            }
            drop(s);
            first += n;
        }
        // The persistent bitmap follows (stale set bits would only cost a resend).
        let mut s = self.state.lock();
        if s.persist[disk].is_some() {
            let keep: Vec<(usize, u64)> =
                (0..chunks.div_ceil(64) as usize).map(|w| (w, s.unsettled_word(disk, w))).collect();
            if let Err(e) = s.persist[disk].as_mut().expect("checked").clear(keep) {
                if let Err(e) = s.drop_persist(disk, e) {
                    tracing::error!(error = %e, "a stale persistent dirty bitmap remains");
                }
            }
        }
        s.status.delta_resyncs += 1;
        s.status.delta_equal_chunks += cleared;
        drop(s);
        self.notify.notify_one();
        Ok(cleared)
    }

    /// The whole of `disk` must be sent again (the first copy, or a full copy the process
    /// server asked for): every chunk becomes dirty, and points already queued are no
    /// longer crash-consistent (they would follow the resync base).
    pub fn mark_all_dirty(&self, disk: usize) {
        let mut s = self.state.lock();
        s.dirty[disk].mark_all();
        if let Some(f) = &mut s.persist[disk] {
            if let Err(e) = f.set(0, u64::MAX) {
                if let Err(e) = s.drop_persist(disk, e) {
                    tracing::error!(error = %e, "a stale persistent dirty bitmap remains");
                }
            }
        }
        for item in s.queue.iter_mut() {
            if let Item::Point { consistent, .. } = item {
                *consistent = false;
            }
        }
        s.pointed = None;
        drop(s);
        self.notify.notify_one();
    }

    /// The next thing to send: queued items first, then a run of dirty chunks (at most
    /// one write frame's worth), read from the backing file under the lock; then, when
    /// everything is sent, a due crash-consistent point for a flush state that has none.
    pub fn next(&self) -> std::io::Result<Option<Work>> {
        let mut s = self.state.lock();
        if let Some(mut item) = s.queue.pop_front() {
            s.queued -= item.cost();
            // Consecutive writes that continue each other go as one frame (a sequential
            // writer's 4 KiB requests become one 1 MiB write): same bytes, same order.
            if let Item::Write { disk, offset, data } = &mut item {
                while let Some(Item::Write { disk: d, offset: o, data: next }) = s.queue.front() {
                    if *d != *disk || *o != *offset + data.len() as u64 || data.len() + next.len() > WRITE_DATA_MAX {
                        break;
                    }
                    if data.capacity() < WRITE_DATA_MAX {
                        // One allocation for the whole merged frame, not one per doubling.
                        data.reserve_exact(WRITE_DATA_MAX - data.len());
                    }
                    let Some(next) = s.queue.pop_front() else { break };
                    s.queued -= next.cost();
                    if let Item::Write { data: more, .. } = next {
                        data.extend_from_slice(&more);
                    }
                }
            }
            return Ok(Some(Work::Item(item)));
        }
        for d in 0..self.exports.len() {
            if let Some((first, n)) = s.dirty[d].take_run(WRITE_DATA_MAX as u64 / CHUNK) {
                let offset = first * CHUNK;
                let len = (n * CHUNK).min(self.exports[d].size - offset) as usize;
                let mut data = vec![0u8; len];
                if let Err(e) = self.exports[d].file.read_exact_at(&mut data, offset) {
                    s.dirty[d].mark(offset, len as u64);
                    return Err(e);
                }
                s.status.catchup_bytes += len as u64;
                // Sent now, durable only with the next point: recorded until then.
                s.since_point[d].mark(offset, len as u64);
                if !s.overflowing() {
                    tracing::info!("dirty bitmap drained: streaming again");
                }
                return Ok(Some(Work::CatchUp { disk: d as u16, offset, data }));
            }
        }
        // Nothing queued or dirty: the stream so far is exactly the image, and when no
        // write came after the newest flush, that is the flush state.
        if let Some((at, Duration::ZERO)) = s.settle_wait(self.cfg.point_interval) {
            s.last_point = Some(Instant::now());
            s.status.settle_points += 1;
            s.push_point(at);
            let item = s.queue.pop_front().expect("just queued");
            s.queued -= item.cost();
            return Ok(Some(Work::Item(item)));
        }
        Ok(None)
    }

    fn note_point(&self, id: u64, consistent: bool) {
        let mut s = self.state.lock();
        s.status.last_point = Some((id, consistent));
        if consistent {
            s.status.points_consistent += 1;
        } else {
            s.status.points_not_consistent += 1;
        }
    }

    /// The server reported crash-consistent point `id` (marker `seq`) uploaded.
    fn note_uploaded(&self, id: u64, seq: u64) {
        let mut s = self.state.lock();
        if s.status.last_uploaded_consistent.is_some_and(|o| o > id) {
            return; // an older one, reported late
        }
        s.status.last_uploaded_consistent = Some(id);
        let Some(&(_, at)) = s.marker_times.iter().find(|(q, _)| *q == seq) else { return };
        let age = at.elapsed().as_millis() as u64;
        s.status.last_upload_age_ms = Some(age);
        s.upload_ages_ms.push_back(age);
        if s.upload_ages_ms.len() > AGES_KEPT {
            s.upload_ages_ms.pop_front();
        }
    }

    /// Ages at upload (ms) of the recent crash-consistent points, oldest first.
    pub fn upload_ages_ms(&self) -> Vec<u64> {
        self.state.lock().upload_ages_ms.iter().copied().collect()
    }

    fn note_error(&self, e: Option<String>) {
        self.state.lock().status.last_error = e;
    }
}

/// Makes `offset..offset + len` of `file` read as zeros: punches a hole (the size is
/// kept), or writes zeros where the file system cannot.
fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    if fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// After a replication error: reports it, waits `delay` (or until stop), doubles it.
async fn back_off(
    capture: &Capture,
    e: AgentError,
    delay: &mut Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) {
    capture.note_error(Some(e.to_string()));
    tracing::warn!(error = %e, "replication: retrying (capture goes on into the bitmap)");
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {}
        _ = stop.changed() => {}
    }
    *delay = (*delay * 2).min(Duration::from_secs(5));
}

/// Whether `data` is all zeros (compared a page at a time: memcmp, not a byte loop).
fn is_zero(data: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// One frame's worth of work for the agent.
enum Op {
    Write { disk: u16, offset: u64, data: bytes::Bytes },
    Zero { disk: u16, offset: u64, len: u64 },
    Point { consistent: bool, seq: u64 },
}

fn ops(work: Work) -> Vec<Op> {
    let write = |disk: u16, offset: u64, data: Vec<u8>| -> Vec<Op> {
        let data = bytes::Bytes::from(data);
        (0..data.len())
            .step_by(WRITE_DATA_MAX)
            .map(|at| Op::Write {
                disk,
                offset: offset + at as u64,
                data: data.slice(at..(at + WRITE_DATA_MAX).min(data.len())),
            })
            .collect()
    };
    match work {
        Work::Item(Item::Write { disk, offset, data }) => write(disk, offset, data),
        Work::Item(Item::Zero { disk, offset, len }) => {
            let mut out = Vec::new();
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(ZERO_LEN_MAX);
                out.push(Op::Zero { disk, offset: at, len: n });
                at += n;
            }
            out
        }
        Work::Item(Item::Point { consistent, seq }) => vec![Op::Point { consistent, seq }],
        Work::CatchUp { disk, offset, data } if is_zero(&data) => {
            vec![Op::Zero { disk, offset, len: data.len() as u64 }]
        }
        Work::CatchUp { disk, offset, data } => write(disk, offset, data),
    }
}

/// The replication task: sends a full copy of every export first (a resync base, then a
/// catch-up over the whole disk), then the captured stream, for ever. Network trouble
/// is retried (the NBD side meanwhile fills the bitmap); it returns only when `stop`
/// fires (what is still queued or dirty then is not sent).
pub async fn replicate(
    capture: Arc<Capture>,
    agent: &mut Agent,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let mut pending: VecDeque<Op> = VecDeque::new();
    let disks = capture.exports().len();
    let mut resync: VecDeque<u16> = (0..disks as u16).filter(|&d| capture.needs_full_copy(d as usize)).collect();
    // Exports whose bitmap was lost try a delta resync before a full copy (once).
    let mut delta_first: Vec<bool> = (0..disks).map(|d| capture.needs_full_copy(d)).collect();
    let mut delay = Duration::from_millis(100);
    // Crash-consistent points sent and not yet reported uploaded: (point id, marker seq).
    let mut awaiting_upload: Vec<(u64, u64)> = Vec::new();
    // Point markers sent and not yet acknowledged durable: (point id, marker seq).
    let mut awaiting_durable: VecDeque<(u64, u64)> = VecDeque::new();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        // What the server said meanwhile (acknowledgements, uploads), without waiting.
        if let Err(e) = agent.take_arrived() {
            back_off(&capture, e, &mut delay, &mut stop).await;
            continue;
        }
        awaiting_upload.retain(|&(id, seq)| {
            if agent.take_uploaded(id) {
                capture.note_uploaded(id, seq);
                return false;
            }
            !agent.take_lost(id)
        });
        let durable = agent.durable_point();
        while let Some(&(id, seq)) = awaiting_durable.front().filter(|(id, _)| *id <= durable) {
            debug_assert!(id <= durable);
            awaiting_durable.pop_front();
            capture.point_durable(seq);
        }
        for d in agent.take_resync_requests() {
            if !resync.contains(&d) {
                resync.push_back(d);
            }
        }
        let result = async {
            if let Some(&d) = resync.front() {
                // Without a usable bitmap, first ask the server what it holds: only the
                // chunks that differ are then sent (a delta resync).
                if delta_first[d as usize] && agent.cfg.block_size as u64 == CHUNK {
                    let size = capture.exports()[d as usize].size;
                    // An error (the server unreachable) leaves the delta to be tried again.
                    let answer = agent.delta_resync(d as usize, size).await?;
                    delta_first[d as usize] = false;
                    if let Some(hashes) = answer {
                        let c = capture.clone();
                        let settled = tokio::task::spawn_blocking(move || c.settle_equal_chunks(d as usize, &hashes))
                            .await
                            .map_err(|e| AgentError::Disk("delta resync".into(), std::io::Error::other(e.to_string())))?
                            .map_err(|e| AgentError::Disk("delta resync read".into(), e))?;
                        tracing::info!(
                            disk = d,
                            equal_chunks = settled,
                            "delta resync: only the differing chunks follow"
                        );
                        resync.pop_front();
                        return Ok(true);
                    }
                }
                // The base first: what follows it rebuilds the disk from zeros.
                agent.stream_resync(d).await?;
                capture.state.lock().status.full_copies += 1;
                capture.mark_all_dirty(d as usize);
                resync.pop_front();
                return Ok(true);
            }
            if pending.is_empty() {
                match capture.next() {
                    Ok(Some(work)) => pending.extend(ops(work)),
                    Ok(None) => return Ok(false),
                    Err(e) => return Err(AgentError::Disk("catch-up read".into(), e)),
                }
            }
            while let Some(op) = pending.front() {
                match op {
                    Op::Write { disk, offset, data } => agent.stream_write(*disk, *offset, data.clone()).await?,
                    Op::Zero { disk, offset, len } => agent.stream_zero(*disk, *offset, *len).await?,
                    Op::Point { consistent, seq } => {
                        let kind = if *consistent { PointKind::CrashConsistent } else { PointKind::NotCrashConsistent };
                        let id = agent.tag_point(kind).await?;
                        awaiting_durable.push_back((id, *seq));
                        capture.note_point(id, *consistent);
                        if *consistent {
                            awaiting_upload.push((id, *seq));
                        }
                    }
                }
                pending.pop_front();
            }
            Ok::<bool, AgentError>(true)
        };
        let result = tokio::select! {
            r = result => r,
            _ = stop.changed() => return Ok(()),
        };
        match result {
            Ok(true) => {
                delay = Duration::from_millis(100);
                capture.note_error(None);
            }
            Ok(false) => {
                // Idle: read the server's acknowledgements while frames or uploads are
                // outstanding; wake on new work or stop.
                // A point the server no longer watches (its session ended) is never
                // reported: only the newest few are waited for.
                if awaiting_upload.len() > 64 {
                    awaiting_upload.drain(..awaiting_upload.len() - 64);
                }
                let waiting = agent.pending_frames() > 0 || !awaiting_upload.is_empty();
                // A flush state without a crash-consistent point gets one when it is due.
                let settle = capture.settle_point_wait();
                tokio::select! {
                    _ = capture.notify.notified() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(settle.unwrap_or_default()), if settle.is_some() => {}
                    r = agent.poll(), if waiting => {
                        if let Err(e) = r {
                            capture.note_error(Some(e.to_string()));
                            tracing::warn!(error = %e, "replication: retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
            Err(e) => back_off(&capture, e, &mut delay, &mut stop).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(size: u64, queue_bytes: usize) -> (tempfile::TempDir, Capture) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(size).unwrap();
        let cfg = CaptureConfig { queue_bytes, point_interval: Duration::ZERO, persist: None };
        (dir, Capture::new(vec![Export { id: "d".into(), file, size }], cfg))
    }

    #[test]
    fn bitmap_marks_and_takes_runs() {
        let mut b = DirtyBitmap::new(10 * CHUNK + 5);
        assert_eq!(b.take_run(4), None);
        b.mark(CHUNK - 1, 2); // chunks 0 and 1
        b.mark(10 * CHUNK, 100); // the partial last chunk
        b.mark(9 * CHUNK, u64::MAX); // clipped
        assert_eq!(b.count(), 4);
        assert_eq!(b.take_run(8), Some((0, 2)));
        assert_eq!(b.take_run(1), Some((9, 1)));
        assert_eq!(b.take_run(8), Some((10, 1)));
        assert!(b.is_empty());
        b.mark_all();
        assert_eq!(b.count(), 11);
        assert_eq!(b.take_run(16), Some((0, 11)));
        let mut big = DirtyBitmap::new(200 * CHUNK);
        big.mark(130 * CHUNK, 1);
        big.mark(3 * CHUNK, 1);
        let mut got = vec![big.take_run(4).unwrap(), big.take_run(4).unwrap()];
        got.sort();
        assert_eq!(got, vec![(3, 1), (130, 1)]);
    }

    #[test]
    fn a_full_queue_falls_back_to_the_bitmap_and_catches_up_in_order() {
        let (_dir, c) = capture(4 << 20, 256 << 10);
        // Fits: queued.
        c.write(0, 0, vec![1; 128 << 10], false).unwrap();
        c.flush(0).unwrap();
        // Does not fit: the bitmap takes it, and everything after it until drained.
        c.write(0, 1 << 20, vec![2; 200 << 10], false).unwrap();
        c.write(0, 3 << 20, vec![3; 512], false).unwrap();
        c.zero(0, 0, 4096, false).unwrap();
        c.flush(0).unwrap();
        let st = c.status();
        assert_eq!(st.overflows, 1);
        assert!(st.dirty_chunks >= 5, "{st:?}");
        // Replay what the replication task would send onto a replica.
        let mut replica = vec![0u8; 4 << 20];
        let mut points = Vec::new();
        while let Some(w) = c.next().unwrap() {
            match w {
                Work::Item(Item::Write { offset, data, .. }) | Work::CatchUp { offset, data, .. } => {
                    replica[offset as usize..offset as usize + data.len()].copy_from_slice(&data)
                }
                Work::Item(Item::Zero { offset, len, .. }) => replica[offset as usize..(offset + len) as usize].fill(0),
                Work::Item(Item::Point { consistent, .. }) => points.push(consistent),
            }
        }
        // The point during overflow is not crash-consistent; once caught up, that flush
        // state (nothing was written after it) gets a crash-consistent one.
        assert_eq!(points, vec![true, false, true]);
        assert_eq!(c.status().settle_points, 1);
        assert!(replica == c.read(0, 0, 4 << 20).unwrap());
        // Drained: streaming again, and the next point is crash-consistent.
        c.write(0, 8192, vec![4; 100], false).unwrap();
        c.flush(0).unwrap();
        assert_eq!(c.next().unwrap(), Some(Work::Item(Item::Write { disk: 0, offset: 8192, data: vec![4; 100] })));
        assert_eq!(c.next().unwrap(), Some(Work::Item(Item::Point { consistent: true, seq: 3 })));
        assert_eq!(c.next().unwrap(), None);
    }

    #[test]
    fn a_full_copy_makes_queued_points_inconsistent() {
        let (_dir, c) = capture(1 << 20, 1 << 20);
        c.write(0, 0, vec![9; 10], false).unwrap();
        c.flush(0).unwrap();
        c.mark_all_dirty(0);
        assert!(matches!(c.next().unwrap(), Some(Work::Item(Item::Write { .. }))));
        assert_eq!(c.next().unwrap(), Some(Work::Item(Item::Point { consistent: false, seq: 0 })));
        let Some(Work::CatchUp { offset: 0, data, .. }) = c.next().unwrap() else { panic!("catch-up") };
        assert_eq!(data.len(), 1 << 20);
        assert_eq!(&data[..11], &[9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0]);
        // Caught up, and still at the flush state: a crash-consistent point for it.
        assert_eq!(c.next().unwrap(), Some(Work::Item(Item::Point { consistent: true, seq: 1 })));
        assert_eq!(c.next().unwrap(), None);
    }

    #[test]
    fn a_flush_state_without_a_point_gets_one_only_if_nothing_was_written_since() {
        let (_dir, c) = capture(1 << 20, 1 << 20);
        c.mark_all_dirty(0);
        c.write(0, 0, vec![1; 10], false).unwrap(); // during catch-up: into the bitmap
        c.flush(0).unwrap();
        c.write(0, 4096, vec![2; 10], false).unwrap(); // after the flush
        assert_eq!(c.next().unwrap(), Some(Work::Item(Item::Point { consistent: false, seq: 0 })));
        assert!(matches!(c.next().unwrap(), Some(Work::CatchUp { .. })));
        assert_eq!(c.next().unwrap(), None, "the image is no flush state: no point");
        assert_eq!(c.settle_point_wait(), None);
        c.flush(0).unwrap(); // streaming again: a point at once
        assert_eq!(c.next().unwrap(), Some(Work::Item(Item::Point { consistent: true, seq: 1 })));
        assert_eq!(c.next().unwrap(), None);
        assert_eq!(c.settle_point_wait(), None, "that state has its point");
        assert_eq!(c.status().settle_points, 0);
    }

    #[test]
    fn a_flush_before_the_point_interval_gets_its_point_when_the_interval_ends() {
        let dir = tempfile::tempdir().unwrap();
        let file = tempfile::tempfile_in(dir.path()).unwrap();
        file.set_len(1 << 20).unwrap();
        let cfg = CaptureConfig { queue_bytes: 1 << 20, point_interval: Duration::from_secs(3600), persist: None };
        let c = Capture::new(vec![Export { id: "d".into(), file, size: 1 << 20 }], cfg);
        c.write(0, 0, vec![1; 10], false).unwrap();
        c.flush(0).unwrap(); // the first point
        c.write(0, 0, vec![2; 10], false).unwrap();
        c.flush(0).unwrap(); // not due
        assert!(matches!(c.next().unwrap(), Some(Work::Item(Item::Write { .. }))));
        assert_eq!(c.next().unwrap(), Some(Work::Item(Item::Point { consistent: true, seq: 0 })));
        assert!(matches!(c.next().unwrap(), Some(Work::Item(Item::Write { .. }))));
        assert_eq!(c.next().unwrap(), None, "not due yet");
        let wait = c.settle_point_wait().expect("a flush state waits for its point");
        assert!(wait > Duration::from_secs(3000) && wait <= Duration::from_secs(3600), "{wait:?}");
        c.state.lock().last_point = Some(Instant::now() - Duration::from_secs(3600));
        assert_eq!(c.settle_point_wait(), Some(Duration::ZERO));
        assert_eq!(c.next().unwrap(), Some(Work::Item(Item::Point { consistent: true, seq: 1 })));
        assert_eq!(c.status().settle_points, 1);
    }

    /// The chunks a fresh capture over the same state directory would catch up.
    fn resumed(dir: &std::path::Path, size: u64) -> Vec<u64> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("d.img")).unwrap();
        let c = Capture::new(vec![Export { id: "d".into(), file, size }], persisted(dir));
        assert!(!c.needs_full_copy(0), "the bitmap was usable");
        let s = c.state.lock();
        (0..size.div_ceil(CHUNK)).filter(|&k| s.dirty[0].words()[(k / 64) as usize] & (1 << (k % 64)) != 0).collect()
    }

    fn persisted(dir: &std::path::Path) -> CaptureConfig {
        let persist = PersistConfig { dir: dir.to_path_buf(), machine: "vm".into(), server: [3; 32] };
        CaptureConfig { queue_bytes: 64 << 20, point_interval: Duration::ZERO, persist: Some(persist) }
    }

    #[test]
    fn the_persistent_bitmap_keeps_exactly_what_no_durable_point_covers() {
        let size = 64 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create_new(dir.path().join("d.img")).unwrap();
        file.set_len(size).unwrap();
        drop(file);
        let file = std::fs::OpenOptions::new().read(true).write(true).open(dir.path().join("d.img")).unwrap();
        let c = Capture::new(vec![Export { id: "d".into(), file, size }], persisted(dir.path()));
        assert!(c.needs_full_copy(0), "no bitmap yet");
        assert_eq!(resumed(dir.path(), size).len(), 64, "until the first copy is durable, all of it");

        // The first copy: sent by catch-up, then a point makes it durable.
        c.mark_all_dirty(0);
        while c.next().unwrap().is_some() {}
        c.flush(0).unwrap(); // point 0
        assert!(matches!(c.next().unwrap(), Some(Work::Item(Item::Point { seq: 0, .. }))));
        assert_eq!(resumed(dir.path(), size).len(), 64, "sent is not durable");
        c.point_durable(0);
        assert_eq!(resumed(dir.path(), size), Vec::<u64>::new());

        c.write(0, 3 * CHUNK, vec![1; 10], false).unwrap();
        c.zero(0, 7 * CHUNK + 5, CHUNK, false).unwrap(); // chunks 7 and 8
        c.flush(0).unwrap(); // point 1 covers 3, 7, 8
        c.write(0, 3 * CHUNK + 100, vec![2; 10], false).unwrap(); // 3 again, after point 1
        c.write(0, 10 * CHUNK, vec![3; 10], false).unwrap();
        assert_eq!(resumed(dir.path(), size), vec![3, 7, 8, 10], "a kill -9 now resends these");
        c.point_durable(1);
        assert_eq!(resumed(dir.path(), size), vec![3, 10], "written after point 1: kept");

        // More markers than EPOCHS_MAX: merged epochs clear late, never early.
        for k in 0..2 * EPOCHS_MAX as u64 {
            c.write(0, (20 + k) * CHUNK, vec![4; 10], false).unwrap();
            c.flush(0).unwrap(); // points 2..
        }
        c.point_durable(1 + EPOCHS_MAX as u64);
        let left = resumed(dir.path(), size);
        let after: Vec<u64> = (20 + EPOCHS_MAX as u64..20 + 2 * EPOCHS_MAX as u64).collect();
        assert!(after.iter().all(|k| left.contains(k)), "chunks after the durable point stay: {left:?}");
        c.point_durable(2 + 2 * EPOCHS_MAX as u64);
        assert_eq!(resumed(dir.path(), size), Vec::<u64>::new(), "every point durable: nothing to resend");
        assert!(c.state.lock().persist[0].as_ref().unwrap().unsynced().is_some(), "clearing is not synced eagerly");
        c.write(0, 0, vec![5; 1], false).unwrap();
        c.flush(0).unwrap();
        assert!(c.state.lock().persist[0].as_ref().unwrap().unsynced().is_none(), "a FLUSH syncs the bitmap");
    }

    #[test]
    fn a_damaged_or_foreign_bitmap_means_a_full_copy() {
        let size = 8 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create_new(dir.path().join("d.img")).unwrap().set_len(size).unwrap();
        let open = |cfg: CaptureConfig| {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(dir.path().join("d.img")).unwrap();
            Capture::new(vec![Export { id: "d".into(), file, size }], cfg)
        };
        drop(open(persisted(dir.path())));
        assert!(!open(persisted(dir.path())).needs_full_copy(0), "a good bitmap is used");
        let mut other = persisted(dir.path());
        other.persist.as_mut().unwrap().server = [4; 32];
        assert!(open(other).needs_full_copy(0), "another server's history");
        // That replaced the file with one for the other server: ours is gone.
        assert!(open(persisted(dir.path())).needs_full_copy(0));
        let path = DirtyFile::path_for(dir.path(), "d");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1; // the header
        std::fs::write(&path, &bytes).unwrap();
        assert!(open(persisted(dir.path())).needs_full_copy(0), "a damaged header");
    }

    #[test]
    fn zeroing_reads_back_zeros() {
        let (_dir, c) = capture(1 << 20, 1 << 20);
        c.write(0, 0, vec![7; 1 << 20], false).unwrap();
        c.zero(0, 4096, 70_000, true).unwrap();
        let back = c.read(0, 0, 1 << 20).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 7));
        assert!(back[4096..4096 + 70_000].iter().all(|&b| b == 0));
        assert!(back[4096 + 70_000..].iter().all(|&b| b == 7));
    }
}
