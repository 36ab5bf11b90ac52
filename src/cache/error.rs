//! Typed errors, one enum per operation. Corruption, I/O, no space, backpressure and
//! poisoning are always distinct variants: callers act differently on each.

use std::io;
use std::path::PathBuf;

use super::recovery_report::RecoveryReport;
use super::types::StreamId;

/// An I/O failure reduced to what can be cloned to every waiter of a failed batch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {kind:?}: {message}")]
pub struct IoFailure {
    pub op: &'static str,
    pub kind: io::ErrorKind,
    pub message: String,
}

impl IoFailure {
    pub fn new(op: &'static str, e: &io::Error) -> IoFailure {
        IoFailure { op, kind: e.kind(), message: e.to_string() }
    }
}

pub(crate) fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cache directory is locked by another opener ({path}): {source}")]
    Locked { path: PathBuf, source: io::Error },
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("I/O error during open ({op}): {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("cache metadata is corrupt: {0}")]
    MetaCorrupt(String),
    #[error("acknowledged data is corrupt or missing; refusing to open: {0}")]
    Corruption(Box<RecoveryReport>),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("cache is above its hard watermark ({used_bytes} of {capacity_bytes} bytes): retry later")]
    Backpressure { used_bytes: u64, capacity_bytes: u64 },
    #[error("no space left for a new segment: {0}")]
    NoSpace(String),
    #[error("I/O error: {0}")]
    Io(IoFailure),
    #[error("engine is poisoned after a failed fsync ({0}); reopen it to recover")]
    Poisoned(String),
    #[error("record of {len} bytes exceeds record_size_max {max}")]
    RecordTooLarge { len: usize, max: u32 },
    #[error("empty records are not allowed")]
    EmptyRecord,
    #[error("unknown stream {0:?}")]
    UnknownStream(StreamId),
    #[error("cache is closed or read-only")]
    Closed,
    /// The ticket was looked at so late that its batch's outcome is no longer kept (more
    /// than 1024 failure ranges since). The record may or may
    /// not be durable: it must be treated as not acknowledged, never as durable.
    #[error(
        "outcome of batch {batch_no} is no longer known (looked at too late): treat the record as not acknowledged"
    )]
    OutcomeForgotten { batch_no: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("unknown stream {0:?}")]
    UnknownStream(StreamId),
    #[error("stream {stream:?} has no durable record {seq} (readable: {first}..={last})")]
    NotAvailable { stream: StreamId, seq: u64, first: u64, last: u64 },
    #[error("corrupt record: stream {stream:?} seq {seq} in segment {segment} at {offset}: {what}")]
    Corruption { stream: StreamId, seq: u64, segment: u64, offset: u64, what: String },
    #[error("I/O error reading stream {stream:?} seq {seq}: {source}")]
    Io { stream: StreamId, seq: u64, source: io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream key part {0:?} must be 1..=255 bytes")]
    BadKey(String),
    #[error("too many streams (at most {0})")]
    TooMany(u32),
    #[error("unknown stream {0:?}")]
    UnknownStream(StreamId),
    #[error("ack up to {upto} is beyond the last durable record {durable} of stream {stream:?}")]
    BeyondDurable { stream: StreamId, upto: u64, durable: u64 },
    #[error("a resync base must be a durable record after the last dropped one ({evicted_upto}); got {base_seq}")]
    ResyncBase { base_seq: u64, evicted_upto: u64 },
    #[error("cannot persist cache metadata: {0}")]
    Io(IoFailure),
    #[error("engine is poisoned: {0}")]
    Poisoned(String),
    #[error("cache is read-only")]
    ReadOnly,
}

#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    #[error("I/O error during reclaim: {0}")]
    Io(IoFailure),
    #[error("compaction could not rewrite records: {0}")]
    Rewrite(AppendError),
    #[error("compaction found a corrupt record: {0}")]
    Corruption(String),
    #[error("cache is read-only")]
    ReadOnly,
}

#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error("pending records could not be made durable: {0}")]
    Flush(AppendError),
    #[error("I/O error while sealing the open segment: {0}")]
    Io(IoFailure),
}
