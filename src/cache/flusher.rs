//! The flusher: the log's single writer. It takes the pending batch the moment it is idle
//! (a lone write is never held back to grow a batch), writes it with one positioned write
//! at the segment's end, makes it durable with one `fdatasync`, updates the index and only
//! then resolves the batch's tickets (`commit::resolve`). While it writes, producers fill
//! the next batch: that overlap is the group commit (`commit.rs`).
//!
//! Segments rotate when the next batch and the summary that must follow it would not fit:
//! the old one is sealed with its summary and trailer (`segment::seal_segment`), then the
//! next file is taken from the [`super::preparer`], which made it (created or recycled,
//! directory synced) while the old one filled; when it is not ready it is made here. If
//! that fails for want of space the batch fails and the next one tries again; the log stays
//! valid in between.
//!
//! Failures: a failed write or allocation fails the in-flight and pending batches with a
//! typed error and rolls every stream's next sequence back to its last durable record, so
//! streams stay gap-free and the engine carries on when the cause goes away. A failed
//! fsync poisons the engine (fsync is never retried: the kernel may have dropped the dirty
//! pages and a second fsync could "succeed" over lost data).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::commit::{self, AppendState, PendingRecord};
use super::effort::EffortController;
use super::error::{is_no_space, AppendError, CloseError, IoFailure};
use super::format::{
    align_up, batch_crc_start, seal_batch_crc, segment_seed, trailer_offset, BatchHeader, BatchKind, RecordKind,
    SummaryEntry, BATCH_HEADER_LEN, BLOCK_SIZE, RECORD_HEADER_LEN, SUMMARY_ENTRY_LEN,
};
use super::index::Loc;
use super::io::aligned::AlignedBuf;
use super::io::StorageFile;
use super::preparer::Preparer;
use super::segment::{make_segment_file, recycle_name, seal_segment, segment_name, OpenSegment, PrepareError};
use super::state::{Inner, SegmentState};
use super::types::CacheEvent;

/// A failure while writing, and whether it poisons the engine.
struct WriteFailure {
    error: AppendError,
    poison: bool,
}

fn write_error(op: &'static str, e: &std::io::Error) -> WriteFailure {
    let error = if is_no_space(e) {
        AppendError::NoSpace(format!("{op}: {e}"))
    } else {
        AppendError::Io(IoFailure::new(op, e))
    };
    WriteFailure { error, poison: false }
}

fn sync_error(op: &'static str, e: &std::io::Error) -> WriteFailure {
    WriteFailure { error: AppendError::Poisoned(format!("{op}: {e}")), poison: true }
}

pub(crate) struct Writer {
    inner: Arc<Inner>,
    seg: Option<OpenSegment>,
    next_segment_id: u64,
    last_batch_records: usize,
    effort: EffortController,
    preparer: Preparer,
    /// Emptied batch buffers (with their record lists) for the next swap.
    free_buffers: Vec<(AlignedBuf, Vec<PendingRecord>)>,
}

impl Writer {
    pub fn new(inner: Arc<Inner>, next_segment_id: u64) -> Writer {
        let effort = EffortController::new(inner.opts.lz4_acceleration_max);
        let preparer = Preparer::start(inner.clone());
        Writer { inner, seg: None, next_segment_id, last_batch_records: 0, effort, preparer, free_buffers: Vec::new() }
    }

    pub fn run(mut self) -> Result<(), CloseError> {
        let inner = self.inner.clone();
        loop {
            // Taken before the lock: a new buffer is a mapping made outside it.
            let (nbuf, nrec) = self
                .free_buffers
                .pop()
                .unwrap_or_else(|| (AppendState::fresh_buffer(inner.opts.commit_bytes_max), Vec::new()));
            let (mut buf, mut records, batch_no) = {
                let mut st = inner.append.lock();
                loop {
                    let poisoned = inner.poisoned.load(Ordering::Acquire);
                    if st.batch_ready(poisoned) {
                        break;
                    }
                    if st.records.is_empty() && (st.closing || poisoned) {
                        // Leaving: every later append must be refused (`Inner::poison`
                        // sets both under this lock), or its ticket would never resolve.
                        debug_assert!(st.closing || st.refuse.is_some(), "poisoned, yet appends are accepted");
                        drop(st);
                        return self.finish();
                    }
                    inner.work_cv.wait(&mut st);
                }
                self.maybe_wait_for_more(&mut st);
                let buf = std::mem::replace(&mut st.buf, nbuf);
                let records = std::mem::replace(&mut st.records, nrec);
                let batch_no = st.batch_no;
                st.batch_no += 1;
                (buf, records, batch_no)
            };
            inner.room_cv.notify_all();
            self.last_batch_records = records.len();
            let io_started = Instant::now();
            let written = self.write_batch(&mut buf, &records, batch_no);
            let io_time = io_started.elapsed();
            let mut free = match written {
                Ok((segment, base)) => {
                    self.commit(segment, base, &records, batch_no);
                    // Durable and indexed: keep it for readers close behind (the drain).
                    inner.recent.lock().keep(segment, base, buf)
                }
                Err(f) => {
                    self.fail(batch_no, f);
                    vec![buf]
                }
            };
            records.clear();
            // After the tickets are resolved, so the controller's work delays no ack.
            self.effort.observe(io_time, &inner.effort);
            // The writer's own pool: returning buffers takes no lock, so a crowd of
            // producers on the append lock cannot hold the writer up here.
            let mut records = Some(records);
            for mut b in free.drain(..) {
                b.truncate(BATCH_HEADER_LEN);
                self.free_buffers.push((b, records.take().unwrap_or_default()));
            }
        }
    }

    /// When producers are busy (the last batch held several records) and a window is set,
    /// let the batch fill for up to `commit_window_us`. A lone write never waits.
    fn maybe_wait_for_more(&self, st: &mut parking_lot::MutexGuard<'_, AppendState>) {
        let window = self.inner.opts.commit_window_us;
        if window == 0 || self.last_batch_records <= 1 {
            return;
        }
        let deadline = Instant::now() + Duration::from_micros(window);
        let enough = self.inner.opts.commit_bytes_max as usize * 3 / 4;
        while st.buf.len() < enough && !st.closing {
            if self.inner.work_cv.wait_until(st, deadline).timed_out() {
                break;
            }
        }
    }

    /// Writes and syncs one batch; returns (segment id, offset of the batch).
    fn write_batch(
        &mut self,
        buf: &mut AlignedBuf,
        records: &[PendingRecord],
        batch_no: u64,
    ) -> Result<(u64, u64), WriteFailure> {
        if self.inner.is_poisoned() {
            // Poisoned elsewhere (a directory or META fsync): acknowledge nothing more.
            return Err(WriteFailure {
                error: AppendError::Poisoned("an earlier fsync failed; reopen the cache".into()),
                poison: true,
            });
        }
        let batch_len = buf.len();
        let aligned = align_up(batch_len as u64, BLOCK_SIZE);
        self.place(aligned, records.len())?;
        let seg = self.seg.as_mut().expect("placed");
        let header = BatchHeader {
            kind: BatchKind::Records,
            batch_len: batch_len as u32,
            segment_id: seg.id,
            batch_no,
            offset: seg.write_offset as u32,
            durable_end: seg.write_offset as u32,
            count: records.len() as u32,
        };
        header.encode(buf);
        let mut crc = batch_crc_start(seg.seed, buf);
        for r in records {
            let at = r.offset_in_batch as usize;
            crc.update(&buf[at..at + RECORD_HEADER_LEN]);
        }
        seal_batch_crc(buf, crc.finalize());
        buf.resize(aligned as usize, 0);
        let base = seg.write_offset;
        // Batch bounds: block-aligned, inside the data area, batch numbers increasing.
        super::assert::strict_assert!(base.is_multiple_of(BLOCK_SIZE) && buf.len() as u64 == aligned);
        super::assert::strict_assert!(base + aligned <= trailer_offset(self.inner.opts.segment_size));
        super::assert::strict_assert!(batch_no > seg.last_batch_no, "batch {batch_no} after {}", seg.last_batch_no);
        seg.file.write_all_at(buf, base).map_err(|e| write_error("write batch", &e))?;
        seg.file.sync_data_range(base, aligned).map_err(|e| sync_error("fdatasync batch", &e))?;
        seg.write_offset += aligned;
        seg.last_batch_no = batch_no;
        let c = &self.inner.counters;
        c.syncs.fetch_add(1, Ordering::Relaxed);
        c.device_bytes.fetch_add(aligned, Ordering::Relaxed);
        Ok((seg.id, base))
    }

    /// Makes sure the open segment has room for `aligned` more bytes plus the summary
    /// entries of `count` more records; rotates to a new segment otherwise.
    fn place(&mut self, aligned: u64, count: usize) -> Result<(), WriteFailure> {
        let segment_size = self.inner.opts.segment_size;
        if let Some(seg) = &self.seg {
            let summary =
                align_up((BATCH_HEADER_LEN + (seg.summary.len() + count) * SUMMARY_ENTRY_LEN) as u64, BLOCK_SIZE);
            if seg.write_offset + aligned + summary <= trailer_offset(segment_size) {
                return Ok(());
            }
        }
        // Seal before creating the next file: only the newest segment may ever be
        // unsealed, which is what lets recovery scan that one alone.
        if let Some(old) = self.seg.take() {
            if let Err((poison, e)) = seal_segment(&old, segment_size) {
                self.seg = Some(old);
                return Err(if poison { sync_error("fdatasync seal", &e) } else { write_error("write seal", &e) });
            }
            self.inner.log.write().segments.get_mut(&old.id).expect("open segment is registered").sealed = true;
            self.inner.counters.device_bytes.fetch_add(
                align_up((BATCH_HEADER_LEN + old.summary.len() * SUMMARY_ENTRY_LEN) as u64, BLOCK_SIZE) + BLOCK_SIZE,
                Ordering::Relaxed,
            );
            self.inner.wake_reclaimer();
        }
        let (id, file) = self.prepare_next()?;
        {
            let mut log = self.inner.log.write();
            log.segments
                .insert(id, SegmentState { file: file.clone(), sealed: false, live_records: 0, live_stored_bytes: 0 });
            self.inner.segments_in_use.store(log.segments.len() as u64, Ordering::Relaxed);
        }
        let seed = segment_seed(self.inner.salt, id);
        self.seg = Some(OpenSegment { id, file, seed, write_offset: 0, summary: Vec::new(), last_batch_no: 0 });
        self.preparer.request(self.next_segment_id);
        Ok(())
    }

    /// The file for the next segment: the preparer's spare when it is ready, otherwise
    /// made here (a recycled file renamed, or a new one allocated).
    fn prepare_next(&mut self) -> Result<(u64, Arc<dyn StorageFile>), WriteFailure> {
        let id = self.next_segment_id;
        let file = match self.preparer.take(id) {
            Some(file) => file,
            None => make_segment_file(&self.inner, id).map_err(|e| match e {
                PrepareError::NoSpace(why) => WriteFailure { error: AppendError::NoSpace(why), poison: false },
                PrepareError::Io(op, e) => write_error(op, &e),
                PrepareError::DirSync(e) => sync_error("fsync directory", &e),
            })?,
        };
        self.next_segment_id += 1;
        Ok((id, file))
    }

    fn commit(&mut self, segment: u64, base: u64, records: &[PendingRecord], batch_no: u64) {
        let inner = &self.inner;
        let seg = self.seg.as_mut().expect("batch was placed");
        debug_assert_eq!(seg.id, segment);
        let (mut logical, mut stored) = (0u64, 0u64);
        {
            let mut guard = inner.log.write();
            let log = &mut *guard;
            for r in records {
                let loc = Loc {
                    segment: segment as u32,
                    offset: (base + u64::from(r.offset_in_batch)) as u32,
                    stored_len: r.stored_len,
                    logical_len: r.logical_len,
                };
                seg.summary.push(SummaryEntry {
                    stream: r.stream,
                    offset: loc.offset,
                    seq: r.seq,
                    stored_len: r.stored_len,
                    logical_len: r.logical_len,
                });
                let moved_in = match r.kind {
                    RecordKind::Data => {
                        log.streams[r.stream as usize].index.push(r.seq, loc);
                        logical += u64::from(r.logical_len);
                        stored += u64::from(r.stored_len);
                        true
                    }
                    RecordKind::Rewrite => {
                        match log.streams[r.stream as usize].index.relocate(r.seq, r.from_segment, loc) {
                            Some(old) => {
                                let from =
                                    log.segments.get_mut(&u64::from(old.segment)).expect("live record's segment");
                                from.live_records -= 1;
                                from.live_stored_bytes -= u64::from(old.stored_len);
                                true
                            }
                            None => false,
                        }
                    }
                };
                if moved_in {
                    let s = log.segments.get_mut(&segment).expect("open segment");
                    s.live_records += 1;
                    s.live_stored_bytes += u64::from(r.stored_len);
                }
            }
        }
        let c = &inner.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.records.fetch_add(records.len() as u64, Ordering::Relaxed);
        c.logical_bytes.fetch_add(logical, Ordering::Relaxed);
        c.stored_bytes.fetch_add(stored, Ordering::Relaxed);
        commit::resolve(&inner.commit, &inner.commit_cv, batch_no);
    }

    fn fail(&mut self, batch_no: u64, f: WriteFailure) {
        let inner = &self.inner;
        tracing::error!(error = %f.error, batch_no, "batch failed");
        let hi = {
            let mut st = inner.append.lock();
            if f.poison {
                if !inner.poisoned.swap(true, Ordering::AcqRel) {
                    inner.push_event(CacheEvent::Poisoned { reason: f.error.to_string() });
                }
                st.refuse = Some(f.error.clone());
            }
            // The pending batch holds later records of the same streams: it fails too.
            let hi = if st.records.is_empty() {
                batch_no
            } else {
                let hi = st.batch_no;
                st.batch_no += 1;
                st.buf.truncate(BATCH_HEADER_LEN);
                st.records.clear();
                hi
            };
            let log = inner.log.read();
            for (next, stream) in st.next_seq.iter_mut().zip(&log.streams) {
                *next = stream.index.durable_upto() + 1;
            }
            hi
        };
        inner.room_cv.notify_all();
        inner.commit.lock().note_failure(batch_no, hi, f.error);
        commit::resolve(&inner.commit, &inner.commit_cv, hi);
    }

    /// On close: seal the open segment so the next open reads summaries only.
    fn finish(mut self) -> Result<(), CloseError> {
        if let Some((id, _file)) = self.preparer.stop() {
            // Unused: back to the recycled files (without this, the next open would).
            let to = recycle_name(id);
            match self.inner.storage.rename(&segment_name(id), &to) {
                Ok(()) => self.inner.log.write().recycled.push(to),
                Err(e) => tracing::warn!(segment = id, error = %e, "could not retire the spare segment file"),
            }
        }
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(seg) = self.seg.take() {
            seal_segment(&seg, self.inner.opts.segment_size)
                .map_err(|(_, e)| CloseError::Io(IoFailure::new("seal open segment", &e)))?;
            if let Some(s) = self.inner.log.write().segments.get_mut(&seg.id) {
                s.sealed = true;
            }
        }
        Ok(())
    }
}
