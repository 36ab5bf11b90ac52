//! The agent's persistent block state (`--state-dir`): per disk, the xxh3-128 hash of
//! every block as of the last recovery point the process server acknowledged durable, so
//! that a restarted agent sends only the blocks that differ instead of a full copy.
//!
//! Two files per disk, byte maps in `docs/format.md` §11:
//! - `blocks-<disk>.state`: the hashes of point P. Written whole to a temporary file,
//!   fdatasynced, renamed over the old one, then the directory fsynced. A header (magic,
//!   version, block size, disk size, block count, point id, the process server's
//!   identity, machine and disk names) and a CRC32 over everything.
//! - `blocks-<disk>.sent`: the journal of the blocks sent since P (ranges of block
//!   indices), each entry appended and fdatasynced *before* its blocks are sent. Without
//!   it a restart would trust P's hash of a block that was sent with other content after
//!   P and then changed back (a block written, then trimmed back to zeros): the next
//!   point would keep the other content. Blocks named in the journal count as unknown
//!   and are sent again.
//!
//! **Why durable, not uploaded.** The state is committed once point P is durable on the
//! process server, not once it is uploaded: what is durable there is uploaded unless the
//! server drops it first (cache eviction), and then the server keeps a persistent
//! resync-required flag for the disk, asks the agent for a full copy (`ResyncRequired`)
//! and reports the point lost (`PointLost`) — on a new session too, so a restarted agent
//! copies fully anyway. Waiting for upload instead would make every restart between
//! durable and uploaded resend everything since the previous uploaded point, for no
//! additional safety.
//!
//! A file that fails any check (length, CRC, magic, version, names, sizes, the server's
//! identity, the journal's entries) is reported with a warning and treated as lost: the
//! agent then copies the disk in full. Nothing read from here is trusted unchecked.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Agent, AgentError};
use crate::protocol::NAME_LEN_MAX;

/// The state file's magic.
pub const STATE_MAGIC: [u8; 8] = *b"CLBLKST1";
/// The journal's magic.
pub const JOURNAL_MAGIC: [u8; 8] = *b"CLBLKSN1";
pub const STATE_VERSION: u16 = 1;
/// Most blocks a state file describes (16 TiB at 64 KiB blocks; a 4 GiB file). A larger
/// disk keeps no persistent state (a warning), and is copied in full after a restart.
pub const STATE_BLOCKS_MAX: u64 = 1 << 28;
/// Largest block size the state records.
pub const BLOCK_SIZE_MAX: u32 = 1 << 20;
/// Bytes of the fixed part of the state header (before the two names).
const STATE_FIXED_LEN: usize = 8 + 2 + 4 + 8 + 8 + 8 + 32;
/// Bytes of the journal's header (magic, version, point id, CRC32).
pub const JOURNAL_HEADER_LEN: usize = 8 + 2 + 8 + 4;
/// Bytes of one journal entry (first block, block count, CRC32).
pub const JOURNAL_ENTRY_LEN: usize = 8 + 8 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("{0} bytes: not a length a state file can have")]
    Length(usize),
    #[error("CRC32 mismatch (stored {stored:08x}, computed {computed:08x})")]
    Crc { stored: u32, computed: u32 },
    #[error("bad magic")]
    Magic,
    #[error("version {0}, this build reads {STATE_VERSION}")]
    Version(u16),
    #[error("bad field: {0}")]
    Field(&'static str),
    #[error("written for {what} {found:?}, not {expected:?}")]
    Mismatch { what: &'static str, found: String, expected: String },
    #[error("journal entry {index}: {why}")]
    JournalEntry { index: usize, why: &'static str },
}

/// Why the state directory could not be written.
#[derive(Debug, thiserror::Error)]
#[error("state directory {path}: {what}: {source}")]
pub struct StateIoError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// The hashes of one disk at one acknowledged recovery point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    pub machine: String,
    pub disk: String,
    /// SHA-256 naming the process server (or configuration server) the point was
    /// acknowledged by: state kept for another server's history is not used.
    pub server: [u8; 32],
    pub disk_size: u64,
    pub block_size: u32,
    pub point_id: u64,
    pub hashes: Vec<u128>,
}

/// Blocks of `block_size` covering `disk_size` bytes.
pub fn block_count(disk_size: u64, block_size: u32) -> u64 {
    disk_size.div_ceil(block_size.max(1) as u64)
}

impl BlockState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(STATE_FIXED_LEN + 2 + self.machine.len() + self.disk.len() + self.hashes.len() * 16 + 4);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.point_id.to_le_bytes());
        out.extend_from_slice(&self.server);
        for name in [&self.machine, &self.disk] {
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
        }
        for h in &self.hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a state file: its exact length, CRC32, magic, version, sizes
    /// and names. Consistency with the disk and the server is [`BlockState::check`]'s.
    pub fn decode(b: &[u8]) -> Result<BlockState, StateError> {
        if b.len() < STATE_FIXED_LEN + 2 + 4 {
            return Err(StateError::Length(b.len()));
        }
        let (body, tail) = b.split_at(b.len() - 4);
        let stored = u32::from_le_bytes(tail.try_into().expect("4"));
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(StateError::Crc { stored, computed });
        }
        if body[..8] != STATE_MAGIC {
            return Err(StateError::Magic);
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
        let version = u16::from_le_bytes([body[8], body[9]]);
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let block_size = u32::from_le_bytes(body[10..14].try_into().expect("4"));
        if block_size == 0 || block_size > BLOCK_SIZE_MAX {
            return Err(StateError::Field("block size"));
        }
        let disk_size = u64_at(14);
        let blocks = u64_at(22);
        if blocks > STATE_BLOCKS_MAX || blocks != block_count(disk_size, block_size) {
            return Err(StateError::Field("block count"));
        }
        let point_id = u64_at(30);
        let server: [u8; 32] = body[38..70].try_into().expect("32");
        let mut at = STATE_FIXED_LEN;
        let mut names = Vec::with_capacity(2);
        for what in ["machine name", "disk name"] {
            let len = *body.get(at).ok_or(StateError::Length(b.len()))? as usize;
            let name = body.get(at + 1..at + 1 + len).ok_or(StateError::Length(b.len()))?;
            if len == 0 || len > NAME_LEN_MAX {
                return Err(StateError::Field(what));
            }
            names.push(std::str::from_utf8(name).map_err(|_| StateError::Field(what))?.to_string());
            at += 1 + len;
        }
        let hash_bytes = &body[at..];
        if hash_bytes.len() as u64 != blocks * 16 {
            return Err(StateError::Length(b.len()));
        }
        let hashes = hash_bytes.chunks_exact(16).map(|c| u128::from_le_bytes(c.try_into().expect("16"))).collect();
        let disk = names.pop().expect("two names");
        let machine = names.pop().expect("two names");
        Ok(BlockState { machine, disk, server, disk_size, block_size, point_id, hashes })
    }

    /// Whether this state describes `disk` of `machine` as acknowledged by `server`, with
    /// the disk's size and block size unchanged.
    pub fn check(
        &self,
        machine: &str,
        disk: &str,
        server: &[u8; 32],
        disk_size: u64,
        block_size: u32,
    ) -> Result<(), StateError> {
        let mismatch = |what, found: String, expected: String| Err(StateError::Mismatch { what, found, expected });
        if self.machine != machine {
            return mismatch("machine", self.machine.clone(), machine.into());
        }
        if self.disk != disk {
            return mismatch("disk", self.disk.clone(), disk.into());
        }
        if &self.server != server {
            return mismatch("server", hex::encode(&self.server[..8]), hex::encode(&server[..8]));
        }
        if self.disk_size != disk_size {
            return mismatch("disk size", self.disk_size.to_string(), disk_size.to_string());
        }
        if self.block_size != block_size {
            return mismatch("block size", self.block_size.to_string(), block_size.to_string());
        }
        Ok(())
    }
}

/// The journal's header for base point `point_id`.
pub fn journal_header(point_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(JOURNAL_HEADER_LEN);
    out.extend_from_slice(&JOURNAL_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&point_id.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn entry_crc(point_id: u64, first: u64, count: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&point_id.to_le_bytes());
    h.update(&first.to_le_bytes());
    h.update(&count.to_le_bytes());
    h.finalize()
}

/// One journal entry: blocks `first..first + count` of the journal of `point_id`.
pub fn journal_entry(point_id: u64, first: u64, count: u64) -> [u8; JOURNAL_ENTRY_LEN] {
    let mut out = [0u8; JOURNAL_ENTRY_LEN];
    out[..8].copy_from_slice(&first.to_le_bytes());
    out[8..16].copy_from_slice(&count.to_le_bytes());
    out[16..].copy_from_slice(&entry_crc(point_id, first, count).to_le_bytes());
    out
}

/// Most entries a journal over `blocks` blocks may hold.
pub fn journal_entries_max(blocks: u64) -> u64 {
    blocks.saturating_mul(4).saturating_add(64)
}

/// What a journal says.
#[derive(Debug, PartialEq, Eq)]
pub enum JournalRead {
    /// The journal of an older point (the state was committed after it): nothing to add.
    Stale,
    /// Block ranges (first, count) sent after `point_id`.
    Ranges(Vec<(u64, u64)>),
}

/// Decodes the journal kept beside the state of `point_id` over `blocks` blocks. Every
/// entry must check (a torn entry cannot be told from a corrupt one, so either makes
/// the state lost), and stay within the disk.
pub fn decode_journal(b: &[u8], point_id: u64, blocks: u64) -> Result<JournalRead, StateError> {
    if b.len() < JOURNAL_HEADER_LEN || !(b.len() - JOURNAL_HEADER_LEN).is_multiple_of(JOURNAL_ENTRY_LEN) {
        return Err(StateError::Length(b.len()));
    }
    let (header, entries) = b.split_at(JOURNAL_HEADER_LEN);
    let stored = u32::from_le_bytes(header[18..22].try_into().expect("4"));
    let computed = crc32fast::hash(&header[..18]);
    if stored != computed {
        return Err(StateError::Crc { stored, computed });
    }
    if header[..8] != JOURNAL_MAGIC {
        return Err(StateError::Magic);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != STATE_VERSION {
        return Err(StateError::Version(version));
    }
    let journal_point = u64::from_le_bytes(header[10..18].try_into().expect("8"));
    if journal_point < point_id {
        return Ok(JournalRead::Stale);
    }
    if journal_point != point_id {
        return Err(StateError::Field("journal of a later point than the state"));
    }
    let count = entries.len() / JOURNAL_ENTRY_LEN;
    // A pass journals each block at most once; a few passes may build on one state
    // (a restart after a crash appends to the journal). Bounds the memory read here.
    if count as u64 > journal_entries_max(blocks) {
        return Err(StateError::Field("journal entries"));
    }
    let mut ranges = Vec::with_capacity(count);
    for (index, e) in entries.chunks_exact(JOURNAL_ENTRY_LEN).enumerate() {
        let first = u64::from_le_bytes(e[..8].try_into().expect("8"));
        let n = u64::from_le_bytes(e[8..16].try_into().expect("8"));
        let crc = u32::from_le_bytes(e[16..].try_into().expect("4"));
        if crc != entry_crc(point_id, first, n) {
            return Err(StateError::JournalEntry { index, why: "CRC32 mismatch" });
        }
        if n == 0 || first.checked_add(n).is_none_or(|end| end > blocks) {
            return Err(StateError::JournalEntry { index, why: "blocks past the disk's end" });
        }
        ranges.push((first, n));
    }
    Ok(JournalRead::Ranges(ranges))
}

/// The value a block's stored hash is replaced with when the journal names it: what the
/// block's content hashes to only on an xxh3-128 collision (which the agent's change
/// detection relies on not happening anyway), so the block counts as changed.
pub fn unknown(hash: u128) -> u128 {
    !hash
}

/// SHA-256 of the bytes naming a server.
pub fn server_identity(kind: &str, id: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(kind.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    h.finalize().into()
}

/// The state directory of one agent: loads each disk's state and keeps it current.
pub struct StateDir {
    dir: PathBuf,
    machine: String,
    server: [u8; 32],
    /// Per disk: the point of the state file on disk that a pass builds on (None: no
    /// valid state there, nothing to journal).
    base: Vec<Option<u64>>,
    /// Per disk: the open journal of that base, once created.
    journals: Vec<Option<File>>,
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StateIoError {
    let path = path.to_path_buf();
    move |source| StateIoError { path, what, source }
}

impl StateDir {
    /// Opens (creating it 0700 when missing) the state directory for `disks` disks.
    pub fn open(dir: &Path, machine: &str, server: [u8; 32], disks: usize) -> Result<StateDir, StateIoError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir, "create"))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
            machine: machine.to_string(),
            server,
            base: vec![None; disks],
            journals: (0..disks).map(|_| None).collect(),
        })
    }

    pub fn state_path(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("blocks-{disk}.state"))
    }

    pub fn journal_path(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("blocks-{disk}.sent"))
    }

    /// Disk `d`'s hashes at its last acknowledged point, with the blocks sent since
    /// marked unknown; None (with a warning when a file was there but not valid) when
    /// there is no usable state.
    pub fn load(&mut self, d: usize, disk: &str, disk_size: u64, block_size: usize) -> Option<Vec<u128>> {
        self.base[d] = None;
        self.journals[d] = None;
        let path = self.state_path(disk);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the block state; copying the disk in full");
                return None;
            }
        };
        let loaded = BlockState::decode(&bytes)
            .and_then(|s| s.check(&self.machine, disk, &self.server, disk_size, block_size as u32).map(|()| s));
        let mut state = match loaded {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "block state not valid: ignored; copying the disk in full");
                return None;
            }
        };
        let journal = self.journal_path(disk);
        match std::fs::read(&journal) {
            Ok(b) => match decode_journal(&b, state.point_id, state.hashes.len() as u64) {
                Ok(JournalRead::Stale) => {}
                Ok(JournalRead::Ranges(ranges)) => {
                    for (first, n) in ranges {
                        for h in &mut state.hashes[first as usize..(first + n) as usize] {
                            *h = unknown(*h);
                        }
                    }
                    // Appended to, not replaced: those blocks may not be sent again before
                    // the next point.
                    match std::fs::OpenOptions::new().append(true).open(&journal) {
                        Ok(f) => self.journals[d] = Some(f),
                        Err(e) => {
                            tracing::warn!(path = %journal.display(), error = %e, "cannot reopen the block journal; copying the disk in full");
                            return None;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %journal.display(), error = %e, "block journal not valid: the block state is ignored; copying the disk in full");
                    return None;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %journal.display(), error = %e, "cannot read the block journal; copying the disk in full");
                return None;
            }
        }
        self.base[d] = Some(state.point_id);
        Some(state.hashes)
    }

    /// Before blocks `ranges` (first, count) of disk `d` are sent: records them durably
    /// in the journal of the state on disk (nothing to do without one).
    pub fn journal(&mut self, d: usize, disk: &str, ranges: &[(u64, u64)]) -> Result<(), StateIoError> {
        let Some(point_id) = self.base[d] else { return Ok(()) };
        if ranges.is_empty() {
            return Ok(());
        }
        let path = self.journal_path(disk);
        if self.journals[d].is_none() {
            let f = self.write_atomic(&path, &journal_header(point_id))?;
            self.journals[d] = Some(f);
        }
        let mut bytes = Vec::with_capacity(ranges.len() * JOURNAL_ENTRY_LEN);
        for &(first, n) in ranges {
            bytes.extend_from_slice(&journal_entry(point_id, first, n));
        }
        let f = self.journals[d].as_mut().expect("opened above");
        f.write_all(&bytes).map_err(io_err(&path, "append to the journal"))?;
        f.sync_data().map_err(io_err(&path, "fdatasync the journal"))
    }

    /// Point `state.point_id` is durable on the process server: its hashes become disk
    /// `d`'s state, and the journal of the previous one goes.
    pub fn commit(&mut self, d: usize, state: &BlockState) -> Result<(), StateIoError> {
        if state.block_size > BLOCK_SIZE_MAX {
            tracing::warn!(disk = %state.disk, block_size = state.block_size, max = BLOCK_SIZE_MAX,
                "block size too large for a persistent block state: a restart copies the disk in full");
            return self.forget(d, &state.disk);
        }
        if state.hashes.len() as u64 > STATE_BLOCKS_MAX {
            tracing::warn!(disk = %state.disk, blocks = state.hashes.len(), max = STATE_BLOCKS_MAX,
                "disk too large for a persistent block state: a restart copies it in full");
            return self.forget(d, &state.disk);
        }
        let path = self.state_path(&state.disk);
        self.write_atomic(&path, &state.encode())?;
        self.base[d] = Some(state.point_id);
        self.journals[d] = None;
        // A stale journal is recognised by its point id; removing it is tidiness.
        let journal = self.journal_path(&state.disk);
        match std::fs::remove_file(&journal) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %journal.display(), error = %e, "cannot remove the old block journal"),
        }
        Ok(())
    }

    /// Removes disk `d`'s state and journal durably (before a full copy, or when they
    /// cannot be kept current). The state file goes first: a journal left alone is
    /// harmless. On failure the base stays as it was, so the blocks sent afterwards are
    /// still journaled against the state that may remain on disk.
    pub fn forget(&mut self, d: usize, disk: &str) -> Result<(), StateIoError> {
        let mut removed = false;
        for path in [self.state_path(disk), self.journal_path(disk)] {
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, "remove")(e)),
            }
        }
        if removed {
            self.sync_dir()?;
        }
        self.base[d] = None;
        self.journals[d] = None;
        Ok(())
    }

    /// Whether disk `d` has a state on disk that a pass builds on.
    pub fn has_base(&self, d: usize) -> bool {
        self.base[d].is_some()
    }

    /// Writes `bytes` to a temporary file, fdatasyncs it, renames it to `path`, fsyncs
    /// the directory; returns the file (open for appending).
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<File, StateIoError> {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_data().map_err(io_err(&tmp, "fdatasync"))?;
        std::fs::rename(&tmp, path).map_err(io_err(path, "rename"))?;
        self.sync_dir()?;
        Ok(f)
    }

    fn sync_dir(&self) -> Result<(), StateIoError> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir, "fsync the directory"))
    }
}

/// Ranges (first block, count) of the blocks of a chunk starting at block `first` whose
/// hashes differ from `previous` (all of them without one): the blocks a pass sends.
pub fn changed_ranges(first: u64, hashes: &[u128], previous: Option<&[u128]>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, h) in hashes.iter().enumerate() {
        let b = first + i as u64;
        let changed = previous.and_then(|p| p.get(b as usize)).is_none_or(|old| old != h);
        if !changed {
            continue;
        }
        match ranges.last_mut() {
            Some((start, n)) if *start + *n == b => *n += 1,
            _ => ranges.push((b, 1)),
        }
    }
    ranges
}

impl Agent {
    /// Before any block of the chunk starting at block `first` of disk `d` is sent:
    /// journals those that will be (those differing from `previous`). If the journal
    /// cannot be written the state goes instead: blocks are never sent unrecorded while
    /// a state on disk would claim otherwise.
    pub(super) fn journal_chunk(
        &mut self,
        d: usize,
        first: u64,
        hashes: &[u128],
        previous: Option<&[u128]>,
    ) -> Result<(), AgentError> {
        let Some(st) = self.state.as_mut().filter(|st| st.has_base(d)) else { return Ok(()) };
        let id = &self.cfg.disks[d].0;
        let ranges = changed_ranges(first, hashes, previous);
        if let Err(e) = st.journal(d, id, &ranges) {
            tracing::warn!(disk = %id, error = %e, "cannot journal the blocks sent: dropping the block state (a restart copies this disk in full)");
            st.forget(d, id)?;
        }
        Ok(())
    }

    /// Point `point_id` is durable on the process server: each disk's hashes (as the
    /// pass sent them) become its state. A disk the server wants copied in full keeps
    /// none. A state that cannot be written is removed (warning); only when that fails
    /// too is it an error.
    pub(super) fn commit_state(&mut self, point_id: u64, sizes: &[(u16, u64)]) -> Result<(), AgentError> {
        let Some(st) = self.state.as_mut() else { return Ok(()) };
        for (d, &(_, disk_size)) in sizes.iter().enumerate() {
            let id = self.cfg.disks[d].0.clone();
            let hashes = match self.hashes[d].take() {
                Some(h) if !self.resync_requested[d] => h,
                other => {
                    self.hashes[d] = other;
                    st.forget(d, &id)?;
                    continue;
                }
            };
            let state = BlockState {
                machine: self.cfg.machine.clone(),
                disk: id,
                server: st.server,
                disk_size,
                block_size: self.cfg.block_size as u32,
                point_id,
                hashes,
            };
            if let Err(e) = st.commit(d, &state) {
                tracing::warn!(disk = %state.disk, error = %e, "cannot write the block state: removing it (a restart copies this disk in full)");
                st.forget(d, &state.disk)?;
            }
            self.hashes[d] = Some(state.hashes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(hashes: Vec<u128>, block_size: u32) -> BlockState {
        // One byte short of whole blocks: the last block is partial.
        let disk_size = hashes.len() as u64 * block_size as u64 - 1;
        BlockState {
            machine: "vm-1".into(),
            disk: "disk0".into(),
            server: server_identity("ps", "cert"),
            disk_size,
            block_size,
            point_id: 1_700_000_000_123,
            hashes,
        }
    }

    proptest! {
        #[test]
        fn state_round_trips_and_rejects_every_truncation_and_bit_flip(
            hashes in proptest::collection::vec(any::<u128>(), 1..24),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let s = sample(hashes, 4096);
            let bytes = s.encode();
            prop_assert_eq!(BlockState::decode(&bytes).unwrap(), s.clone());
            for n in 0..bytes.len() {
                prop_assert!(BlockState::decode(&bytes[..n]).is_err(), "truncated to {} accepted", n);
            }
            let mut bad = bytes.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 1 << bit;
            prop_assert!(BlockState::decode(&bad).is_err(), "bit {} of byte {} flipped accepted", bit, at);
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(BlockState::decode(&longer).is_err());
        }

        #[test]
        fn journal_round_trips_and_rejects_every_truncation_and_bit_flip(
            ranges in proptest::collection::vec((0u64..90, 1u64..10), 1..8),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let point = 42;
            let mut bytes = journal_header(point);
            for &(f, n) in &ranges {
                bytes.extend_from_slice(&journal_entry(point, f, n));
            }
            prop_assert_eq!(decode_journal(&bytes, point, 100).unwrap(), JournalRead::Ranges(ranges.clone()));
            // A torn entry is rejected (the state is then lost, never half-trusted).
            for n in 0..bytes.len() {
                let ok = n >= JOURNAL_HEADER_LEN && (n - JOURNAL_HEADER_LEN).is_multiple_of(JOURNAL_ENTRY_LEN);
                let got = decode_journal(&bytes[..n], point, 100);
                if ok {
                    // Whole entries only: a prefix the agent may legitimately leave.
                    prop_assert!(got.is_ok());
                } else {
                    prop_assert!(got.is_err(), "truncated to {} accepted", n);
                }
            }
            let mut bad = bytes.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 1 << bit;
            // A flip in the header's point id may name an older point (stale) only with a
            // matching CRC, which a single flip cannot give.
            prop_assert!(decode_journal(&bad, point, 100).is_err(), "bit {} of byte {} flipped accepted", bit, at);
        }

        #[test]
        fn state_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = BlockState::decode(&bytes);
            let _ = decode_journal(&bytes, 1, 10);
        }
    }

    #[test]
    fn a_journal_of_an_older_point_is_stale_and_entries_past_the_end_are_refused() {
        let mut bytes = journal_header(5);
        bytes.extend_from_slice(&journal_entry(5, 3, 2));
        assert_eq!(decode_journal(&bytes, 6, 10), Ok(JournalRead::Stale));
        assert!(decode_journal(&bytes, 4, 10).is_err(), "a journal newer than its state");
        assert!(matches!(decode_journal(&bytes, 5, 4), Err(StateError::JournalEntry { .. })));
        // An entry of another point's journal does not check.
        let mut mixed = journal_header(5);
        mixed.extend_from_slice(&journal_entry(4, 3, 2));
        assert!(matches!(decode_journal(&mixed, 5, 10), Err(StateError::JournalEntry { .. })));
    }

    #[test]
    fn check_refuses_another_disk_size_block_size_server_or_machine() {
        let s = sample(vec![1, 2, 3], 4096);
        let srv = s.server;
        assert!(s.check("vm-1", "disk0", &srv, s.disk_size, 4096).is_ok());
        assert!(s.check("vm-2", "disk0", &srv, s.disk_size, 4096).is_err());
        assert!(s.check("vm-1", "disk1", &srv, s.disk_size, 4096).is_err());
        assert!(s.check("vm-1", "disk0", &server_identity("ps", "other"), s.disk_size, 4096).is_err());
        assert!(s.check("vm-1", "disk0", &srv, s.disk_size + 1, 4096).is_err());
        assert!(s.check("vm-1", "disk0", &srv, s.disk_size, 8192).is_err());
    }

    #[test]
    fn state_dir_commit_load_journal_and_forget() {
        let dir = tempfile::tempdir().unwrap();
        let srv = server_identity("ps", "cert");
        let mut sd = StateDir::open(&dir.path().join("st"), "vm-1", srv, 1).unwrap();
        assert_eq!(sd.load(0, "disk0", 4 * 4096, 4096), None);
        let s = BlockState {
            machine: "vm-1".into(),
            disk: "disk0".into(),
            server: srv,
            disk_size: 4 * 4096,
            block_size: 4096,
            point_id: 7,
            hashes: vec![10, 11, 12, 13],
        };
        sd.commit(0, &s).unwrap();
        assert_eq!(sd.load(0, "disk0", 4 * 4096, 4096), Some(vec![10, 11, 12, 13]));
        // Blocks sent after point 7 count as unknown after a restart, and the journal
        // is appended to, not replaced, by the next process.
        sd.journal(0, "disk0", &[(1, 2)]).unwrap();
        let mut again = StateDir::open(&dir.path().join("st"), "vm-1", srv, 1).unwrap();
        assert_eq!(again.load(0, "disk0", 4 * 4096, 4096), Some(vec![10, !11, !12, 13]));
        again.journal(0, "disk0", &[(3, 1)]).unwrap();
        let mut third = StateDir::open(&dir.path().join("st"), "vm-1", srv, 1).unwrap();
        assert_eq!(third.load(0, "disk0", 4 * 4096, 4096), Some(vec![10, !11, !12, !13]));
        // A commit makes the journal stale.
        third.commit(0, &BlockState { point_id: 8, hashes: vec![1, 2, 3, 4], ..s.clone() }).unwrap();
        assert!(!third.journal_path("disk0").exists());
        assert_eq!(third.load(0, "disk0", 4 * 4096, 4096), Some(vec![1, 2, 3, 4]));
        // Another size, block size or server: not used.
        assert_eq!(third.load(0, "disk0", 5 * 4096, 4096), None);
        assert_eq!(third.load(0, "disk0", 4 * 4096, 2048), None);
        let mut other = StateDir::open(&dir.path().join("st"), "vm-1", server_identity("ps", "x"), 1).unwrap();
        assert_eq!(other.load(0, "disk0", 4 * 4096, 4096), None);
        // A corrupt journal loses the state.
        third.load(0, "disk0", 4 * 4096, 4096).unwrap();
        third.journal(0, "disk0", &[(0, 1)]).unwrap();
        let jp = third.journal_path("disk0");
        let mut j = std::fs::read(&jp).unwrap();
        let last = j.len() - 1;
        j[last] ^= 0x10;
        std::fs::write(&jp, j).unwrap();
        assert_eq!(third.load(0, "disk0", 4 * 4096, 4096), None);
        third.forget(0, "disk0").unwrap();
        assert!(!third.state_path("disk0").exists() && !jp.exists());
        assert_eq!(third.load(0, "disk0", 4 * 4096, 4096), None);
    }
}
