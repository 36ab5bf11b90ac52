//! A fault-injecting in-memory backend that models a page cache, for crash and fault
//! tests. Writes land in a volatile view; `sync_data` makes a file's writes durable and
//! `sync_dir` makes names durable. [`FaultStorage::crash`] throws the volatile state away
//! the way a power cut does: each unsynced write may survive whole, survive torn at any
//! 512-byte sector boundary (any subset of its sectors), or vanish, independently of the
//! others (so writes reorder); unsynced directory operations survive as a prefix.
//! Calls can be made to fail with EIO or ENOSPC, the device can "lose power" after the
//! N-th mutating call, and bits can be flipped in durable bytes.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Storage, StorageFile};

pub const SECTOR_SIZE: usize = 512;

/// Which calls a fault rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write,
    Sync,
    Allocate,
    Rename,
    Remove,
    SyncDir,
    Read,
}

#[derive(Clone, Copy, Debug)]
struct FailRule {
    op: Op,
    /// Calls of this kind to let pass before failing.
    skip: u64,
    /// How many calls to fail once it triggers.
    times: u64,
    kind: io::ErrorKind,
}

#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Default, Clone)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
}

#[derive(Clone, Debug)]
enum DirOp {
    Link(String, u64),
    Unlink(String),
}

#[derive(Default)]
struct State {
    /// Ordered, so that `crash` draws its random outcomes in the same order every run.
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    dir: BTreeMap<String, u64>,
    dir_durable: BTreeMap<String, u64>,
    dir_pending: Vec<DirOp>,
    epoch: u64,
    locked: bool,
    space_limit: Option<u64>,
    mutating_ops: u64,
    power_cut_after: Option<u64>,
    powered_off: bool,
    rules: Vec<FailRule>,
    syncs: u64,
    read_hook: Option<ReadHook>,
    /// A running hash of every mutating call that passed (kind, file, offset, length):
    /// two runs with the same trace did the same storage work in the same order.
    trace: u64,
}

/// Called at the start of every positioned read (offset, length), on the reading thread
/// and with no lock held, before any byte is copied: lets a test hold a reader between
/// "location taken" and "bytes read" to force an interleaving.
pub type ReadHook = Arc<dyn Fn(u64, usize) + Send + Sync>;

impl State {
    fn used_bytes(&self) -> u64 {
        self.inodes.values().map(|i| i.current.len() as u64).sum()
    }

    /// `what` identifies the call's file and range (for the trace; 0 for reads).
    fn check(&mut self, op: Op, epoch: Option<u64>, what: u64) -> io::Result<()> {
        if self.powered_off || epoch.is_some_and(|e| e != self.epoch) {
            return Err(io::Error::other("fault: device lost power"));
        }
        for rule in self.rules.iter_mut().filter(|r| r.op == op && r.times > 0) {
            if rule.skip > 0 {
                rule.skip -= 1;
            } else {
                rule.times -= 1;
                let kind = rule.kind;
                self.rules.retain(|r| r.times > 0);
                return Err(io::Error::new(kind, format!("fault: injected {kind:?} on {op:?}")));
            }
        }
        if op != Op::Read {
            self.mutating_ops += 1;
            if self.power_cut_after.is_some_and(|n| self.mutating_ops > n) {
                self.powered_off = true;
                return Err(io::Error::other("fault: device lost power"));
            }
            for word in [op as u64, what] {
                self.trace = (self.trace ^ word).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
            }
        }
        Ok(())
    }

    fn grow_check(&self, ino: u64, new_len: u64) -> io::Result<()> {
        let Some(limit) = self.space_limit else {
            return Ok(());
        };
        let cur = self.inodes.get(&ino).map_or(0, |i| i.current.len() as u64);
        if new_len > cur && self.used_bytes() + (new_len - cur) > limit {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }
}

fn apply(buf: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*offset as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

/// A cheap deterministic generator (xorshift64*), so a crash is reproducible by seed.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// The in-memory device. Cloning gives another handle to the same device, so a test keeps
/// one across the engine's death and reopen.
#[derive(Clone, Default)]
pub struct FaultStorage {
    state: Arc<Mutex<State>>,
}

impl FaultStorage {
    pub fn new() -> FaultStorage {
        FaultStorage::default()
    }

    /// Total bytes the files may hold; growing past it fails with ENOSPC.
    pub fn set_space_limit(&self, limit: Option<u64>) {
        self.state.lock().space_limit = limit;
    }

    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used_bytes()
    }

    /// Fails `times` calls of kind `op` with `kind`, after letting `skip` of them pass.
    pub fn fail(&self, op: Op, skip: u64, times: u64, kind: io::ErrorKind) {
        self.state.lock().rules.push(FailRule { op, skip, times, kind });
    }

    /// Like [`FaultStorage::fail`] with a raw OS error code (e.g. 28 = ENOSPC, 5 = EIO).
    pub fn fail_os(&self, op: Op, skip: u64, times: u64, code: i32) {
        let kind = io::Error::from_raw_os_error(code).kind();
        self.fail(op, skip, times, kind);
    }

    /// After `n` more mutating calls the device loses power: every call fails from then
    /// on until [`FaultStorage::crash`].
    pub fn power_cut_after(&self, n: u64) {
        let mut s = self.state.lock();
        s.power_cut_after = Some(s.mutating_ops + n);
    }

    pub fn powered_off(&self) -> bool {
        self.state.lock().powered_off
    }

    pub fn mutating_ops(&self) -> u64 {
        self.state.lock().mutating_ops
    }

    /// The hash of every mutating call so far, in order (see `State::trace`).
    pub fn trace(&self) -> u64 {
        self.state.lock().trace
    }

    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Installs (or, with `None`, removes) the hook every file read calls first.
    pub fn set_read_hook(&self, hook: Option<ReadHook>) {
        self.state.lock().read_hook = hook;
    }

    /// Simulates power loss and restart: volatile state is lost or partly persisted as
    /// described in the module docs, every open handle dies, the lock is released.
    pub fn crash(&self, seed: u64) {
        let mut rng = Rng::new(seed);
        let mut s = self.state.lock();
        for inode in s.inodes.values_mut() {
            let pending = std::mem::take(&mut inode.pending);
            for op in &pending {
                match rng.below(3) {
                    0 => {}
                    1 => apply(&mut inode.durable, op),
                    _ => match op {
                        Pending::Write { offset, data } => {
                            // Torn: an arbitrary subset of the write's sectors persists.
                            let mut at = 0usize;
                            while at < data.len() {
                                let sector_end = ((*offset as usize + at) / SECTOR_SIZE + 1) * SECTOR_SIZE;
                                let len = (sector_end - (*offset as usize + at)).min(data.len() - at);
                                if rng.below(2) == 0 {
                                    let part = Pending::Write {
                                        offset: *offset + at as u64,
                                        data: data[at..at + len].to_vec(),
                                    };
                                    apply(&mut inode.durable, &part);
                                }
                                at += len;
                            }
                        }
                        Pending::SetLen(_) => apply(&mut inode.durable, op),
                    },
                }
            }
            inode.current = inode.durable.clone();
        }
        let keep = rng.below(s.dir_pending.len() as u64 + 1) as usize;
        let ops: Vec<DirOp> = s.dir_pending.drain(..).take(keep).collect();
        let mut dir = s.dir_durable.clone();
        for op in ops {
            match op {
                DirOp::Link(name, ino) => {
                    dir.insert(name, ino);
                }
                DirOp::Unlink(name) => {
                    dir.remove(&name);
                }
            }
        }
        s.dir = dir.clone();
        s.dir_durable = dir;
        let live: std::collections::HashSet<u64> = s.dir.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        s.epoch += 1;
        s.locked = false;
        s.powered_off = false;
        s.power_cut_after = None;
        s.rules.clear();
    }

    /// Flips one bit of a file's durable (and volatile) bytes: media corruption.
    pub fn flip_bit(&self, name: &str, offset: u64, bit: u8) {
        let mut s = self.state.lock();
        let ino = *s.dir.get(name).expect("flip_bit: no such file");
        let inode = s.inodes.get_mut(&ino).expect("inode");
        inode.durable[offset as usize] ^= 1 << (bit % 8);
        inode.current[offset as usize] ^= 1 << (bit % 8);
    }

    /// Cuts a file's durable and volatile bytes to `len`.
    pub fn truncate(&self, name: &str, len: u64) {
        let mut s = self.state.lock();
        let ino = *s.dir.get(name).expect("truncate: no such file");
        let inode = s.inodes.get_mut(&ino).expect("inode");
        inode.durable.truncate(len as usize);
        inode.current.truncate(len as usize);
        inode.pending.clear();
    }

    /// Durable bytes of a file, as a crash right now would leave them at best.
    pub fn durable_bytes(&self, name: &str) -> Option<Vec<u8>> {
        let s = self.state.lock();
        let ino = s.dir.get(name)?;
        Some(s.inodes[ino].durable.clone())
    }

    /// A new device holding a copy of this one's durable state (what a crash now would
    /// leave at the least), for trying many damages from one starting point.
    pub fn snapshot(&self) -> FaultStorage {
        let s = self.state.lock();
        let inodes = s
            .inodes
            .iter()
            .filter(|(ino, _)| s.dir_durable.values().any(|i| i == *ino))
            .map(|(&ino, i)| {
                (ino, Inode { durable: i.durable.clone(), current: i.durable.clone(), pending: Vec::new() })
            })
            .collect();
        let copy = State {
            inodes,
            next_ino: s.next_ino,
            dir: s.dir_durable.clone(),
            dir_durable: s.dir_durable.clone(),
            ..State::default()
        };
        FaultStorage { state: Arc::new(Mutex::new(copy)) }
    }

    pub fn names(&self) -> Vec<String> {
        self.state.lock().dir.keys().cloned().collect()
    }
}

struct FaultFile {
    state: Arc<Mutex<State>>,
    ino: u64,
    epoch: u64,
}

impl StorageFile for FaultFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Outside the lock: the hook may block while other threads use the device.
        let hook = self.state.lock().read_hook.clone();
        if let Some(hook) = hook {
            hook(offset, buf.len());
        }
        let mut s = self.state.lock();
        s.check(Op::Read, Some(self.epoch), 0)?;
        let inode = s.inodes.get(&self.ino).ok_or_else(|| io::Error::other("fault: stale inode"))?;
        let end = offset as usize + buf.len();
        if end > inode.current.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "fault: read past end"));
        }
        buf.copy_from_slice(&inode.current[offset as usize..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(Op::Write, Some(self.epoch), self.ino ^ offset << 16 ^ (buf.len() as u64) << 40)?;
        s.grow_check(self.ino, offset + buf.len() as u64)?;
        let inode = s.inodes.get_mut(&self.ino).ok_or_else(|| io::Error::other("fault: stale inode"))?;
        let op = Pending::Write { offset, data: buf.to_vec() };
        apply(&mut inode.current, &op);
        inode.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        if let Err(e) = s.check(Op::Sync, Some(self.epoch), self.ino) {
            // As Linux does after a failed fsync: the dirty pages are marked clean and
            // their data is lost to the disk, and the error is reported once (a later
            // sync succeeds without them). Reads still see them until a crash.
            if !s.powered_off {
                if let Some(inode) = s.inodes.get_mut(&self.ino) {
                    inode.pending.clear();
                }
            }
            return Err(e);
        }
        s.syncs += 1;
        let inode = s.inodes.get_mut(&self.ino).ok_or_else(|| io::Error::other("fault: stale inode"))?;
        for op in std::mem::take(&mut inode.pending) {
            apply(&mut inode.durable, &op);
        }
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(Op::Allocate, Some(self.epoch), self.ino ^ len << 16)?;
        s.grow_check(self.ino, len)?;
        let inode = s.inodes.get_mut(&self.ino).ok_or_else(|| io::Error::other("fault: stale inode"))?;
        if (inode.current.len() as u64) < len {
            let op = Pending::SetLen(len);
            apply(&mut inode.current, &op);
            inode.pending.push(op);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        let mut s = self.state.lock();
        s.check(Op::Read, Some(self.epoch), 0)?;
        Ok(s.inodes.get(&self.ino).map_or(0, |i| i.current.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(Op::Allocate, Some(self.epoch), !(self.ino ^ len << 16))?;
        s.grow_check(self.ino, len)?;
        let inode = s.inodes.get_mut(&self.ino).ok_or_else(|| io::Error::other("fault: stale inode"))?;
        let op = Pending::SetLen(len);
        apply(&mut inode.current, &op);
        inode.pending.push(op);
        Ok(())
    }
}

/// FNV-1a of a file name, for the trace.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

struct FaultLock(Arc<Mutex<State>>, u64);
impl Drop for FaultLock {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        if s.epoch == self.1 {
            s.locked = false;
        }
    }
}

impl Storage for FaultStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let mut s = self.state.lock();
        let epoch = s.epoch;
        let ino = match s.dir.get(name) {
            Some(&ino) => ino,
            None if create => {
                s.check(Op::Rename, None, name_hash(name))?;
                s.next_ino += 1;
                let ino = s.next_ino;
                s.inodes.insert(ino, Inode::default());
                s.dir.insert(name.to_string(), ino);
                s.dir_pending.push(DirOp::Link(name.to_string(), ino));
                ino
            }
            None => return Err(io::Error::new(io::ErrorKind::NotFound, format!("fault: {name}"))),
        };
        Ok(Arc::new(FaultFile { state: self.state.clone(), ino, epoch }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(Op::Remove, None, name_hash(name))?;
        let ino = s.dir.remove(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        s.dir_pending.push(DirOp::Unlink(name.to_string()));
        // Space is given back at once; the durable directory may still name the inode
        // until the next sync_dir, so its bytes are kept until nothing names it.
        if !s.dir_durable.values().any(|&i| i == ino) {
            s.inodes.remove(&ino);
        } else if let Some(inode) = s.inodes.get_mut(&ino) {
            inode.current = Vec::new();
            inode.pending.clear();
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(Op::Rename, None, name_hash(from) ^ name_hash(to).rotate_left(32))?;
        let ino = s.dir.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if let Some(old) = s.dir.insert(to.to_string(), ino) {
            if old != ino && !s.dir_durable.values().any(|&i| i == old) {
                s.inodes.remove(&old);
            }
        }
        s.dir_pending.push(DirOp::Unlink(from.to_string()));
        s.dir_pending.push(DirOp::Link(to.to_string(), ino));
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(Op::SyncDir, None, 0)?;
        s.dir_pending.clear();
        s.dir_durable = s.dir.clone();
        let live: std::collections::HashSet<u64> = s.dir.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut s = self.state.lock();
        s.check(Op::Read, None, 0)?;
        Ok(s.dir.keys().cloned().collect())
    }

    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        let mut s = self.state.lock();
        if s.locked {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "fault: LOCK is held by another opener"));
        }
        s.locked = true;
        Ok(Box::new(FaultLock(self.state.clone(), s.epoch)))
    }

    fn backend_name(&self) -> &'static str {
        "fault"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_writes_survive_a_crash_and_unsynced_names_may_not() {
        let st = FaultStorage::new();
        let f = st.open("a", true).unwrap();
        st.sync_dir().unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b"XXXXX", 0).unwrap();
        let _g = st.open("b", true).unwrap();
        st.crash(7);
        let f = st.open("a", false).unwrap();
        let mut buf = [0u8; 5];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf == *b"hello" || buf == *b"XXXXX", "got {buf:?}");
    }

    #[test]
    fn torn_writes_tear_at_sector_boundaries() {
        let mut seen_torn = false;
        for seed in 0..64 {
            let st = FaultStorage::new();
            let f = st.open("a", true).unwrap();
            st.sync_dir().unwrap();
            f.write_all_at(&[1u8; 4096], 0).unwrap();
            st.crash(seed);
            let d = st.durable_bytes("a").unwrap();
            for sector in d.chunks(SECTOR_SIZE) {
                assert!(sector.iter().all(|&b| b == sector[0]), "tear inside a sector");
            }
            if d.len() == 4096 && d.contains(&0) && d.contains(&1) {
                seen_torn = true;
            }
        }
        assert!(seen_torn, "no seed produced a torn write");
    }

    #[test]
    fn injected_errors_and_space_limit() {
        let st = FaultStorage::new();
        let f = st.open("a", true).unwrap();
        st.fail_os(Op::Sync, 0, 1, 5);
        assert!(f.sync_data().is_err());
        assert!(f.sync_data().is_ok());
        st.set_space_limit(Some(100));
        assert_eq!(f.allocate(200).unwrap_err().raw_os_error(), Some(28));
        st.power_cut_after(1);
        f.write_all_at(b"x", 0).unwrap();
        assert!(f.write_all_at(b"y", 1).is_err());
        assert!(st.powered_off());
    }
}
