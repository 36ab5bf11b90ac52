//! Portable backend: `pread`/`pwrite` through `std::os::unix::fs::FileExt`, `fdatasync`
//! through `File::sync_data`, directory fsync by opening the directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Storage, StorageFile};

/// Reserves `len` bytes of real blocks (fallocate): writes into them cannot fail for
/// want of space, and the file system does less allocation work at fdatasync time.
/// File systems without fallocate get a sparse extension instead.
pub(crate) fn fallocate(file: &File, len: u64) -> io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            if file.metadata()?.len() < len {
                file.set_len(len)?;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub struct StdStorage {
    dir: PathBuf,
}

impl StdStorage {
    /// Uses `dir`, creating it (and its parents) when missing.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<StdStorage> {
        fs::create_dir_all(dir.as_ref())?;
        Ok(StdStorage { dir: dir.as_ref().to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

struct StdFile(File);

impl StorageFile for StdFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        fallocate(&self.0, len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Storage for StdStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let f = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(self.dir.join(name))?;
        Ok(Arc::new(StdFile(f)))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.dir.join(from), self.dir.join(to))
    }
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(self.dir.join("LOCK"))?;
        match f.try_lock() {
            Ok(()) => Ok(Box::new(f)),
            Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by another process", self.dir.join("LOCK").display()),
            )),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
    fn backend_name(&self) -> &'static str {
        "std"
    }
}
