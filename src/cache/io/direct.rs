//! O_DIRECT backend: aligned writes bypass the page cache (no copy into it, no writeback
//! storm at fdatasync time); anything unaligned (META, seals) and every read go through a
//! second, buffered descriptor of the same file. Linux keeps the two coherent.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::aligned::is_direct_io_aligned;
use super::std_fs::{fallocate, StdStorage};
use super::{Storage, StorageFile};

pub struct DirectStorage {
    dir: PathBuf,
    inner: StdStorage,
}

impl DirectStorage {
    /// Opens `dir` for O_DIRECT, or fails when the file system refuses O_DIRECT (tmpfs
    /// and some overlay file systems do).
    pub fn probe(dir: impl AsRef<Path>) -> io::Result<DirectStorage> {
        let inner = StdStorage::new(dir.as_ref())?;
        let probe = dir.as_ref().join(".direct-probe");
        let result = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&probe)
            .and_then(|f| {
                let buf = super::aligned::AlignedBuf::with_capacity(4096);
                let mut buf = buf;
                buf.resize(4096, 0);
                f.write_all_at(&buf, 0)
            });
        let _ = std::fs::remove_file(&probe);
        result?;
        Ok(DirectStorage { dir: dir.as_ref().to_path_buf(), inner })
    }
}

/// A file open twice: for O_DIRECT writes and for everything else.
pub(crate) struct DirectFile {
    pub(crate) direct: File,
    pub(crate) buffered: File,
}

impl DirectFile {
    pub(crate) fn open(path: &Path, create: bool) -> io::Result<DirectFile> {
        let buffered = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        let direct =
            OpenOptions::new().write(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32).open(path)?;
        Ok(DirectFile { direct, buffered })
    }
}

impl StorageFile for DirectFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.buffered.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_direct_io_aligned(buf, offset) {
            self.direct.write_all_at(buf, offset)
        } else {
            self.buffered.write_all_at(buf, offset)
        }
    }
    fn sync_data(&self) -> io::Result<()> {
        // One fdatasync covers both descriptors: it is per inode.
        self.buffered.sync_data()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        fallocate(&self.buffered, len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.buffered.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.buffered.set_len(len)
    }
}

impl Storage for DirectStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(DirectFile::open(&self.dir.join(name), create)?))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.inner.sync_dir()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        self.inner.lock()
    }
    fn backend_name(&self) -> &'static str {
        "direct"
    }
}
