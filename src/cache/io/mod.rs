//! The engine's whole view of storage: a directory of named files with positioned reads
//! and writes, data syncs and crash-atomic renames. Small on purpose, so a portable
//! backend ([`std_fs`]), a fault-injecting in-memory one ([`fault`]) and an io_uring one
//! slot in behind it.

use std::io;
use std::sync::Arc;

pub mod aligned;
pub mod direct;
pub mod fault;
pub mod std_fs;
#[allow(unsafe_code)] // io_uring entries point at our buffers: see the SAFETY notes inside.
pub mod uring;

/// Which I/O path the cache uses on a real directory (chosen in `Options::io_backend`;
/// defined here, beside [`open_backend`], so the I/O layer imports nothing from the engine).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// `Direct`, else `Std` (io_uring only when asked for: see [`IoBackend::Uring`]).
    #[default]
    Auto,
    /// Buffered `pwrite` + `fdatasync`: works everywhere.
    Std,
    /// O_DIRECT writes from aligned buffers + `fdatasync`.
    Direct,
    /// io_uring: O_DIRECT writes of a batch in flight together, ranged `IORING_OP_FSYNC`.
    /// Falls back like `Auto` where io_uring or O_DIRECT is unavailable. Slower than
    /// `Direct` on the machine measured (docs/performance.md, "Backends"), so `Auto`
    /// does not choose it.
    Uring,
}

/// One open file. Implementations must be safe to share between threads; positioned
/// calls never move a shared cursor.
pub trait StorageFile: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; a short file is `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`. Not durable until [`StorageFile::sync_data`].
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write to this file durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the writes in `offset..offset + len` durable, and the metadata needed to
    /// read them back. Backends that cannot sync a range sync the whole file.
    fn sync_data_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        self.sync_data()
    }
    /// Reserves `len` bytes so later writes below it cannot fail for want of space.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Current length of the file in bytes.
    fn size(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// A directory. Names are plain file names (no separators).
pub trait Storage: Send + Sync + 'static {
    /// Opens an existing file, or creates it when `create` is set.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Atomically replaces `to` with `from`; durable after [`Storage::sync_dir`].
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable (fsync of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    fn list(&self) -> io::Result<Vec<String>>;
    /// Takes the directory's exclusive lock; held until the returned guard drops.
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>>;
    /// A short name for logs ("std", "uring", "fault").
    fn backend_name(&self) -> &'static str;
}

/// Opens `dir` on the backend `choice` names. `Auto` probes O_DIRECT and falls back to
/// the portable backend; `Uring` probes io_uring and, where it is blocked (seccomp in many
/// containers) or O_DIRECT is refused, falls back the same way. Each fallback is logged
/// with its reason. An explicit `Direct` fails where O_DIRECT is refused: it is the
/// choice of someone measuring that path, who should not get another one silently.
///
/// `Auto` does not pick io_uring: with one writer doing one batch write and one flush at a
/// time, the ring adds thread hand-offs (its fsync always runs on an io-wq worker, and so
/// do O_DIRECT writes into not-yet-written extents) and was slower in every configuration
/// measured (docs/performance.md, "Backends").
pub fn open_backend(dir: &std::path::Path, choice: IoBackend) -> io::Result<Arc<dyn Storage>> {
    match choice {
        IoBackend::Std => Ok(Arc::new(std_fs::StdStorage::new(dir)?)),
        IoBackend::Direct => Ok(Arc::new(direct::DirectStorage::probe(dir)?)),
        IoBackend::Uring => match uring::UringStorage::probe(dir) {
            Ok(s) => Ok(Arc::new(s)),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "io_uring unavailable; trying O_DIRECT");
                direct_else_std(dir)
            }
        },
        _ => direct_else_std(dir),
    }
}

fn direct_else_std(dir: &std::path::Path) -> io::Result<Arc<dyn Storage>> {
    match direct::DirectStorage::probe(dir) {
        Ok(s) => Ok(Arc::new(s)),
        Err(e) => {
            tracing::info!(error = %e, dir = %dir.display(), "O_DIRECT unavailable; using buffered I/O");
            Ok(Arc::new(std_fs::StdStorage::new(dir)?))
        }
    }
}

/// Writes `bytes` to `name` crash-atomically: temp file → fsync → rename → fsync dir.
pub fn write_atomic(storage: &dyn Storage, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_checked(storage, name, bytes).map_err(AtomicWriteFailure::into_error)
}

/// Why [`write_atomic_checked`] failed: before any fsync (safe to retry), or in an fsync
/// (the caller must not retry: after a failed fsync the kernel may have dropped the
/// dirty pages and report the next fsync clean).
#[derive(Debug)]
pub enum AtomicWriteFailure {
    Write(io::Error),
    Sync(io::Error),
}

impl AtomicWriteFailure {
    pub fn error(&self) -> &io::Error {
        match self {
            AtomicWriteFailure::Write(e) | AtomicWriteFailure::Sync(e) => e,
        }
    }

    pub fn into_error(self) -> io::Error {
        match self {
            AtomicWriteFailure::Write(e) | AtomicWriteFailure::Sync(e) => e,
        }
    }
}

/// [`write_atomic`], telling a failed fsync apart from a failed write.
pub fn write_atomic_checked(storage: &dyn Storage, name: &str, bytes: &[u8]) -> Result<(), AtomicWriteFailure> {
    use AtomicWriteFailure::{Sync, Write};
    let tmp = format!("{name}.tmp");
    {
        let f = storage.open(&tmp, true).map_err(Write)?;
        f.set_len(0).map_err(Write)?;
        f.write_all_at(bytes, 0).map_err(Write)?;
        f.sync_data().map_err(Sync)?;
    }
    storage.rename(&tmp, name).map_err(Write)?;
    storage.sync_dir().map_err(Sync)
}

/// Reads a whole small file.
pub fn read_all(storage: &dyn Storage, name: &str) -> io::Result<Vec<u8>> {
    let f = storage.open(name, false)?;
    let len = f.size()?;
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}
