//! Append tickets: resolve when the record's batch is durable (or has failed). Waiting
//! allocates nothing per record: threads block on a condition variable and tasks leave a
//! waker, both chosen by the parity of the record's batch, so the flusher wakes only the
//! waiters of the batch it has just resolved. The group commit itself (enqueueing,
//! resolving, outcomes) is in `commit.rs`; `Inner::enqueue` here wraps a record's place
//! in a batch into the ticket that waits for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::commit::{self, CommitState, Encoded};
use super::error::AppendError;
use super::state::Inner;
use super::types::StreamId;

/// A record's claim on durability. `seq` is known at once; the result is not.
#[must_use = "a record is acknowledged only once its ticket resolves"]
pub struct AppendTicket {
    pub(crate) inner: Arc<Inner>,
    pub stream: StreamId,
    pub seq: u64,
    pub(crate) batch_no: u64,
}

impl std::fmt::Debug for AppendTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendTicket").field("stream", &self.stream).field("seq", &self.seq).finish()
    }
}

fn resolution(c: &CommitState, batch_no: u64) -> Option<Result<(), AppendError>> {
    c.outcome(batch_no)
}

impl AppendTicket {
    /// Blocks until the record is durable; returns its sequence number.
    pub fn wait(self) -> Result<u64, AppendError> {
        let (_, r) = self.block();
        r
    }

    /// Non-blocking: `None` while the record's batch is still in flight.
    pub fn try_result(&self) -> Option<Result<u64, AppendError>> {
        resolution(&self.inner.commit.lock(), self.batch_no).map(|r| r.map(|()| self.seq))
    }

    /// Like [`AppendTicket::try_result`], with the moment the record became durable (or
    /// failed), exact however late the ticket is looked at. That moment is `None` when
    /// the batch was resolved more than 256 resolutions ago and is no longer kept.
    pub fn try_result_at(&self) -> Option<(Result<u64, AppendError>, Option<Instant>)> {
        let c = self.inner.commit.lock();
        let r = resolution(&c, self.batch_no)?;
        Some((r.map(|()| self.seq), c.resolved_at(self.batch_no)))
    }

    /// Like [`AppendTicket::wait`], with the moment the record became durable (or failed),
    /// as in [`AppendTicket::try_result_at`].
    pub fn wait_at(self) -> (Result<u64, AppendError>, Option<Instant>) {
        let (c, r) = self.block();
        (r, c.resolved_at(self.batch_no))
    }

    /// Blocks until the record's batch is resolved; returns the commit state, still
    /// locked (so [`AppendTicket::wait_at`] reads the time under the same lock), and the
    /// result. A plain wait does no time lookup.
    fn block(&self) -> (parking_lot::MutexGuard<'_, CommitState>, Result<u64, AppendError>) {
        let mut c = self.inner.commit.lock();
        loop {
            if let Some(r) = resolution(&c, self.batch_no) {
                return (c, r.map(|()| self.seq));
            }
            // One batch in flight and one filling: parity tells the two apart. Briefly
            // one more: when the batch in flight fails, the flusher fails the pending one
            // with it and a new batch starts filling before both are resolved (that
            // resolution jumps by two and wakes both parities, so no waiter is missed).
            debug_assert!(self.batch_no <= c.completed + 3, "ticket of a batch not yet taken");
            self.inner.commit_cv[CommitState::parity(self.batch_no)].wait(&mut c);
        }
    }
}

impl Future for AppendTicket {
    type Output = Result<u64, AppendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut c = self.inner.commit.lock();
        match resolution(&c, self.batch_no) {
            Some(r) => Poll::Ready(r.map(|()| self.seq)),
            None => {
                c.wakers[CommitState::parity(self.batch_no)].push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Inner {
    /// Copies an encoded record into the pending batch ([`commit::enqueue`]) and returns
    /// the ticket that resolves with its batch. `rewrite`: (sequence, segment moved out of)
    /// of a compaction copy; `None` assigns the stream's next sequence number.
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        stream: u32,
        rewrite: Option<(u64, u32)>,
        rec: Encoded<'_>,
    ) -> Result<AppendTicket, AppendError> {
        let enqueued = commit::enqueue(
            &self.append,
            &self.room_cv,
            &self.work_cv,
            self.opts.commit_bytes_max,
            stream,
            rewrite,
            rec,
        )?;
        Ok(AppendTicket {
            inner: self.clone(),
            stream: StreamId(stream),
            seq: enqueued.seq,
            batch_no: enqueued.batch_no,
        })
    }
}
