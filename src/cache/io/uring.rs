//! io_uring + O_DIRECT backend: a batch's aligned write is split into 1 MiB writes that
//! are all in flight at once (the device sees queue depth, not one request at a time),
//! and the flush is an `IORING_OP_FSYNC` with `DATASYNC` over exactly the range the batch
//! covers. Reads, and the rare unaligned writes (META, seals), use a buffered descriptor.
//! One ring serves the whole cache: only the flusher writes on the hot path.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;

use super::aligned::{is_direct_io_aligned, AlignedBuf};
use super::direct::{DirectFile, DirectStorage};
use super::{Storage, StorageFile};

/// Largest single write submitted; a 4 MiB batch goes as four writes in flight.
const CHUNK_LEN: usize = 1 << 20;
const RING_ENTRIES: u32 = 64;
/// Attempts at draining completions after a failed submit before giving up for good.
const DRAIN_ATTEMPTS_MAX: usize = 1000;

pub struct UringStorage {
    dir: PathBuf,
    inner: DirectStorage,
    ring: Arc<Mutex<IoUring>>,
}

impl UringStorage {
    /// Sets up a ring and proves it can write and fdatasync an O_DIRECT file in `dir`;
    /// fails where io_uring is blocked (seccomp in many containers) or O_DIRECT refused.
    pub fn probe(dir: impl AsRef<Path>) -> io::Result<UringStorage> {
        let inner = DirectStorage::probe(dir.as_ref())?;
        let ring = Arc::new(Mutex::new(IoUring::new(RING_ENTRIES)?));
        let storage = UringStorage { dir: dir.as_ref().to_path_buf(), inner, ring };
        let name = ".uring-probe";
        let result = storage.open(name, true).and_then(|f| {
            let mut buf = AlignedBuf::with_capacity(4096);
            buf.resize(4096, 0);
            f.write_all_at(&buf, 0)?;
            f.sync_data_range(0, 4096)
        });
        let _ = storage.inner.remove(name);
        result.map(|()| storage)
    }
}

/// An O_DIRECT file whose aligned writes and syncs go through the ring.
struct UringFile {
    file: DirectFile,
    ring: Arc<Mutex<IoUring>>,
}

fn pack(start: usize, end: usize) -> u64 {
    ((start as u64) << 32) | end as u64
}

fn unpack(data: u64) -> (usize, usize) {
    ((data >> 32) as usize, (data & 0xFFFF_FFFF) as usize)
}

impl UringFile {
    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        assert!(buf.len() < (1 << 32), "one write is below 4 GiB");
        let fd = types::Fd(self.file.direct.as_raw_fd());
        let mut todo: VecDeque<(usize, usize)> =
            (0..buf.len()).step_by(CHUNK_LEN).map(|s| (s, (s + CHUNK_LEN).min(buf.len()))).collect();
        let mut ring = self.ring.lock();
        let mut inflight = 0usize;
        let mut failure: Option<io::Error> = None;
        while inflight > 0 || (!todo.is_empty() && failure.is_none()) {
            while failure.is_none() && inflight < RING_ENTRIES as usize {
                let Some((start, end)) = todo.pop_front() else { break };
                let entry = opcode::Write::new(fd, buf[start..].as_ptr(), (end - start) as u32)
                    .offset(offset + start as u64)
                    .build()
                    .user_data(pack(start, end));
                // SAFETY: the entry points into `buf`, which this function borrows until it
                // returns, and it does not return while any submitted entry is still in
                // flight (the loop runs until `inflight` is zero; a failed submit is
                // retried until completions drain, else the process aborts).
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    todo.push_front((start, end));
                    break;
                }
                inflight += 1;
            }
            let mut attempts = 0;
            while let Err(e) = ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    attempts += 1;
                    failure.get_or_insert(e);
                    if attempts > DRAIN_ATTEMPTS_MAX {
                        // Returning now would free `buf` under in-flight writes.
                        std::process::abort();
                    }
                }
            }
            for cqe in ring.completion() {
                inflight -= 1;
                let (start, end) = unpack(cqe.user_data());
                let res = cqe.result();
                if res < 0 {
                    failure.get_or_insert(io::Error::from_raw_os_error(-res));
                } else if (res as usize) < end - start {
                    let done = start + res as usize;
                    if is_direct_io_aligned(&buf[done..end], offset + done as u64) {
                        todo.push_back((done, end));
                    } else {
                        failure
                            .get_or_insert(io::Error::new(io::ErrorKind::WriteZero, "unaligned short O_DIRECT write"));
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    fn fsync(&self, offset: u64, len: u64) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(self.file.buffered.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .offset(offset)
            .len(u32::try_from(len).unwrap_or(0))
            .build()
            .user_data(u64::MAX);
        let mut ring = self.ring.lock();
        // SAFETY: an fsync entry references no memory of ours.
        unsafe { ring.submission().push(&entry) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let cqe = ring.completion().next().ok_or_else(|| io::Error::other("io_uring: no completion"))?;
        debug_assert_eq!(cqe.user_data(), u64::MAX);
        match cqe.result() {
            r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            _ => Ok(()),
        }
    }
}

impl StorageFile for UringFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_direct_io_aligned(buf, offset) {
            self.write_direct(buf, offset)
        } else {
            self.file.write_all_at(buf, offset)
        }
    }
    fn sync_data(&self) -> io::Result<()> {
        self.fsync(0, 0)
    }
    fn sync_data_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len >= 1 << 32 {
            return self.fsync(0, 0);
        }
        self.fsync(offset, len)
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.file.allocate(len)
    }
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

impl Storage for UringStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(UringFile { file: DirectFile::open(&self.dir.join(name), create)?, ring: self.ring.clone() }))
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
        "uring"
    }
}
