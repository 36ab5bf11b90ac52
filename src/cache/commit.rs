//! Group commit, in one place. Producers copy encoded records into the pending batch
//! ([`enqueue`], under the append lock, which also assigns each data record its sequence
//! number); the flusher takes the whole batch, writes and syncs it, and then resolves it
//! ([`resolve`]) in [`CommitState`], where tickets read their outcome. Kept apart from the
//! flusher (which only writes) and the ticket (which only waits), and built on the
//! locks and condition variables it is handed rather than on `Inner`, so that the engine
//! state can hold these types without an import loop.

use std::collections::VecDeque;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::error::AppendError;
use super::format::{self, Codec, RecordHeader, RecordKind, BATCH_HEADER_LEN, RECORD_HEADER_LEN};
use super::io::aligned::AlignedBuf;
use super::types::StreamId;

/// A record the producer has copied into the pending batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingRecord {
    pub stream: u32,
    pub seq: u64,
    pub kind: RecordKind,
    /// Offset of the record header inside the batch buffer.
    pub offset_in_batch: u32,
    pub stored_len: u32,
    pub logical_len: u32,
    /// For rewrites: the segment the record is being moved out of.
    pub from_segment: u32,
}

/// The batch being filled, and what producers need to fill it.
pub(crate) struct AppendState {
    pub buf: AlignedBuf,
    pub records: Vec<PendingRecord>,
    /// Number the pending batch will carry.
    pub batch_no: u64,
    pub next_seq: Vec<u64>,
    /// Set when closing or poisoned: nothing more is accepted.
    pub refuse: Option<AppendError>,
    /// The flusher has been asked to stop once the pending batch is written.
    pub closing: bool,
    /// Holds on starting a batch ([`crate::cache::Cache::hold_commits`]).
    pub held: u32,
    /// Producers waiting for room in a full batch: a held batch is started for them.
    pub room_waiters: u32,
}

impl AppendState {
    /// Whether the flusher may take the pending batch now: it holds records, and nobody
    /// holds commits (or a producer needs the room, or the cache is closing or poisoned).
    pub fn batch_ready(&self, poisoned: bool) -> bool {
        !self.records.is_empty() && (self.held == 0 || self.room_waiters > 0 || self.closing || poisoned)
    }
}

impl AppendState {
    pub fn fresh_buffer(commit_bytes_max: u32) -> AlignedBuf {
        let mut buf = AlignedBuf::with_capacity(commit_bytes_max as usize + format::BLOCK_SIZE as usize);
        // Faulted in here (by the flusher, or at open), outside the append lock, not by
        // the producers that fill it under the lock.
        buf.populate();
        buf.resize(BATCH_HEADER_LEN, 0);
        buf
    }
}

/// A record encoded by its producer, ready to be copied into a batch.
#[derive(Clone, Copy)]
pub(crate) struct Encoded<'a> {
    pub codec: Codec,
    pub stored: &'a [u8],
    pub logical_len: u32,
    pub payload_crc: u32,
}

/// Resolution of group-committed batches, for tickets.
pub(crate) struct CommitState {
    /// Every batch numbered at most this is resolved (durable or failed).
    pub completed: u64,
    /// Failed batch-number ranges (inclusive) and why; bounded, oldest dropped first.
    /// Adjacent ranges failing for the same reason are merged, so a sustained error
    /// takes one entry.
    pub failures: VecDeque<(u64, u64, AppendError)>,
    /// Failure ranges up to this batch were dropped from `failures`: a batch at or below
    /// it with no entry may have failed, so its outcome is reported as forgotten, never
    /// guessed as durable.
    pub failures_forgotten_upto: u64,
    /// Tasks waiting, by the parity of the batch they wait for (see `Inner::commit_cv`).
    pub wakers: [Vec<std::task::Waker>; 2],
    /// When the latest resolutions happened: (every batch up to this one resolved, at),
    /// oldest first, at most [`RESOLUTIONS_KEPT`].
    pub resolutions: VecDeque<(u64, Instant)>,
    /// Batches up to this one were resolved at a time no longer kept (or before open).
    pub resolutions_forgotten_upto: u64,
}

/// Resolution times kept, so a ticket looked at late still tells when it became durable.
pub(crate) const RESOLUTIONS_KEPT: usize = 256;

impl CommitState {
    pub fn new(completed: u64) -> CommitState {
        CommitState {
            completed,
            failures: VecDeque::new(),
            failures_forgotten_upto: 0,
            wakers: [Vec::new(), Vec::new()],
            resolutions: VecDeque::with_capacity(RESOLUTIONS_KEPT),
            resolutions_forgotten_upto: completed,
        }
    }

    /// Records that batches `lo..=hi` failed with `error`. Bounded: the oldest range is
    /// dropped first, and the batches it covered become "forgotten".
    pub fn note_failure(&mut self, lo: u64, hi: u64, error: AppendError) {
        debug_assert!(lo <= hi);
        debug_assert!(self.failures.back().is_none_or(|&(_, last_hi, _)| last_hi < lo));
        if let Some(last) = self.failures.back_mut() {
            if last.1 + 1 == lo && last.2 == error {
                last.1 = hi;
                return;
            }
        }
        if self.failures.len() == FAILURES_KEPT_MAX {
            if let Some((_, dropped_hi, _)) = self.failures.pop_front() {
                self.failures_forgotten_upto = self.failures_forgotten_upto.max(dropped_hi);
            }
        }
        self.failures.push_back((lo, hi, error));
    }

    /// The outcome of batch `batch_no`: `None` while in flight. Success is reported only
    /// when the batch is known not to have failed.
    pub fn outcome(&self, batch_no: u64) -> Option<Result<(), AppendError>> {
        if self.completed < batch_no {
            return None;
        }
        for (lo, hi, e) in self.failures.iter().rev() {
            if (*lo..=*hi).contains(&batch_no) {
                return Some(Err(e.clone()));
            }
            if *hi < batch_no {
                break;
            }
        }
        if batch_no <= self.failures_forgotten_upto {
            return Some(Err(AppendError::OutcomeForgotten { batch_no }));
        }
        Some(Ok(()))
    }

    /// Which of the two waiting lists a ticket of `batch_no` uses.
    pub fn parity(batch_no: u64) -> usize {
        (batch_no % 2) as usize
    }

    /// Notes that every batch up to `upto` was resolved `at`.
    pub fn note_resolution(&mut self, upto: u64, at: Instant) {
        if self.resolutions.len() == RESOLUTIONS_KEPT {
            if let Some((forgotten, _)) = self.resolutions.pop_front() {
                self.resolutions_forgotten_upto = forgotten;
            }
        }
        debug_assert!(self.resolutions.back().is_none_or(|&(last, _)| last < upto));
        self.resolutions.push_back((upto, at));
    }

    /// When batch `batch_no` was resolved: None while in flight, or if that was more than
    /// [`RESOLUTIONS_KEPT`] resolutions ago.
    pub fn resolved_at(&self, batch_no: u64) -> Option<Instant> {
        if batch_no <= self.resolutions_forgotten_upto {
            return None;
        }
        let first = self.resolutions.partition_point(|&(upto, _)| upto < batch_no);
        self.resolutions.get(first).map(|&(_, at)| at)
    }
}

pub(crate) const FAILURES_KEPT_MAX: usize = 1024;

/// Where [`enqueue`] put a record: its sequence number and the batch it rides in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Enqueued {
    pub seq: u64,
    pub batch_no: u64,
}

/// Copies an encoded record into the pending batch, waiting on `room_cv` for room when it
/// is full, and wakes the flusher (`work_cv`) when the batch was empty. Sequence numbers
/// of data records are assigned here, under the same lock, so a stream's order in the log
/// is its sequence order. `rewrite`: (sequence, segment moved out of) of a compaction copy.
pub(crate) fn enqueue(
    append: &Mutex<AppendState>,
    room_cv: &Condvar,
    work_cv: &Condvar,
    commit_bytes_max: u32,
    stream: u32,
    rewrite: Option<(u64, u32)>,
    rec: Encoded<'_>,
) -> Result<Enqueued, AppendError> {
    let Encoded { codec, stored, logical_len, payload_crc } = rec;
    let kind = if rewrite.is_some() { RecordKind::Rewrite } else { RecordKind::Data };
    let need = RECORD_HEADER_LEN + stored.len();
    let mut st = append.lock();
    loop {
        if let Some(e) = &st.refuse {
            return Err(e.clone());
        }
        // Closing: the flusher exits once the pending batch is empty, so a record
        // taken now (a compaction copy racing close) would never resolve.
        if st.closing {
            return Err(AppendError::Closed);
        }
        if st.records.is_empty() || st.buf.len() + need <= commit_bytes_max as usize {
            break;
        }
        st.room_waiters += 1;
        if st.held > 0 {
            // A held flusher waits for this: the full batch is started after all.
            work_cv.notify_one();
        }
        room_cv.wait(&mut st);
        st.room_waiters -= 1;
    }
    let seq = match rewrite {
        Some((seq, _)) => seq,
        None => {
            let next = st.next_seq.get_mut(stream as usize).ok_or(AppendError::UnknownStream(StreamId(stream)))?;
            let seq = *next;
            *next += 1;
            seq
        }
    };
    let offset_in_batch = st.buf.len();
    let header = RecordHeader { stream, kind, codec, seq, stored_len: stored.len() as u32, logical_len, payload_crc };
    st.buf.resize(offset_in_batch + RECORD_HEADER_LEN, 0);
    header.encode(&mut st.buf[offset_in_batch..]);
    st.buf.extend_from_slice(stored);
    st.records.push(PendingRecord {
        stream,
        seq,
        kind,
        offset_in_batch: offset_in_batch as u32,
        stored_len: stored.len() as u32,
        logical_len,
        from_segment: rewrite.map_or(0, |(_, seg)| seg),
    });
    let batch_no = st.batch_no;
    let first = st.records.len() == 1;
    drop(st);
    if first {
        work_cv.notify_one();
    }
    Ok(Enqueued { seq, batch_no })
}

/// Marks every batch up to `upto` resolved and wakes their waiters (threads on
/// `commit_cv`, tasks by waker). One batch wakes the waiters of its parity only; a jump of
/// two or more wakes both lists. Called by the flusher once a batch is durable and
/// indexed, or has failed.
pub(crate) fn resolve(commit: &Mutex<CommitState>, commit_cv: &[Condvar; 2], upto: u64) {
    let now = Instant::now();
    let (parities, wakers) = {
        let mut c = commit.lock();
        debug_assert!(upto > c.completed || c.completed == 0);
        let parities =
            if upto == c.completed + 1 { CommitState::parity(upto)..=CommitState::parity(upto) } else { 0..=1 };
        c.completed = c.completed.max(upto);
        c.note_resolution(upto, now);
        let mut wakers = Vec::new();
        for p in parities.clone() {
            wakers.append(&mut c.wakers[p]);
        }
        (parities, wakers)
    };
    for p in parities {
        commit_cv[p].notify_all();
    }
    for w in wakers {
        w.wake();
    }
}
