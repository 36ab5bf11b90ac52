//! The drain: per stream, in order, records are packed into objects and uploaded to
//! object storage (`object_store`: local directory, Azure Blob, S3), with a per-stream
//! manifest that tells restore which objects and recovery points exist.
//!
//! What goes where in the store is [`crate::store`]'s; positions dropped before upload are
//! recorded there as gaps.

pub mod drainer;
pub mod handoff;
pub mod ownership;
pub mod throttle;

use crate::cache::{ReadError, StreamError};
use crate::store::StoreError;

pub use drainer::{DrainConfig, DrainStats, Drainer};
pub use handoff::Handoffs;
pub use ownership::Ownership;
pub use throttle::{BandwidthSchedule, WorkHours};

/// Tail cache for a cache that a drain reads from: the drain follows the writer by its
/// objects in flight and its passes over the streams, and a device read-back competes
/// with the writes (the engine's own default is 64 MiB). 256 MiB covers about a second of
/// ingest at this machine's end-to-end rate.
pub const DRAIN_TAIL_CACHE_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("target: {0}")]
    Target(#[from] StoreError),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("cache: {0}")]
    Stream(#[from] StreamError),
    #[error("cache read: {0}")]
    Read(#[from] ReadError),
    #[error("stream {0} vanished from the cache while draining")]
    StreamVanished(u32),
}
