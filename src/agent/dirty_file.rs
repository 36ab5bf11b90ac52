//! The persistent dirty bitmap of an NBD export (`capture-<disk>.dirty` in the agent's
//! `--state-dir`): one bit per 64 KiB chunk, set for every chunk whose content the
//! process server may not hold durably — written since the last point the server
//! acknowledged durable, or waiting for catch-up. A restarted agent reads it and sends
//! only those chunks instead of a full copy. Byte map: `docs/format.md` §11.3.
//!
//! The file is a header page and then bit pages of 4096 bytes, each with its own CRC32,
//! so a bit is set by rewriting one page in place (no whole-file rewrite per write).
//! Bits are set **before** the write they cover reaches the backing file (a `kill -9`
//! between the two leaves the bit set, never the data unrecorded), and the file is
//! fdatasynced before a FLUSH covering those writes returns (power loss). Bits are
//! cleared lazily, when a later point is acknowledged durable.
//!
//! A page whose CRC fails (a write torn by power loss) cannot be trusted either way, so
//! every chunk it covers counts as dirty: the cost is resending up to 2 GiB, not a full
//! copy. A bad header, length or identity (machine, disk, size, server) makes the whole
//! file unusable: the agent then copies the disk in full and starts a new file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::state::StateError;
use crate::protocol::NAME_LEN_MAX;

pub const DIRTY_MAGIC: [u8; 8] = *b"CLDIRTY1";
pub const DIRTY_VERSION: u16 = 1;
/// Bytes of every page (the header and each bit page).
pub const PAGE_LEN: usize = 4096;
/// Bitmap words in one bit page (then the page index and the CRC32).
pub const PAGE_WORDS: usize = 511;
/// Chunks one bit page covers.
pub const PAGE_CHUNKS: u64 = PAGE_WORDS as u64 * 64;
/// Most chunks a dirty file describes (16 TiB at 64 KiB chunks; a 32 MiB file).
pub const DIRTY_CHUNKS_MAX: u64 = 1 << 28;

/// Whose bitmap a file is: a file naming anything else is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyHeader {
    pub machine: String,
    pub disk: String,
    /// SHA-256 naming the server whose history the bits are relative to.
    pub server: [u8; 32],
    pub disk_size: u64,
    pub chunk_size: u32,
}

impl DirtyHeader {
    pub fn chunks(&self) -> u64 {
        self.disk_size.div_ceil(self.chunk_size.max(1) as u64)
    }

    fn pages(&self) -> usize {
        self.chunks().div_ceil(PAGE_CHUNKS) as usize
    }

    pub fn encode(&self) -> [u8; PAGE_LEN] {
        let mut p = [0u8; PAGE_LEN];
        p[..8].copy_from_slice(&DIRTY_MAGIC);
        p[8..10].copy_from_slice(&DIRTY_VERSION.to_le_bytes());
        p[10..14].copy_from_slice(&self.chunk_size.to_le_bytes());
        p[14..22].copy_from_slice(&self.disk_size.to_le_bytes());
        p[22..30].copy_from_slice(&self.chunks().to_le_bytes());
        p[30..62].copy_from_slice(&self.server);
        let mut at = 62;
        for name in [&self.machine, &self.disk] {
            debug_assert!(name.len() <= NAME_LEN_MAX);
            p[at..at + 2].copy_from_slice(&(name.len() as u16).to_le_bytes());
            p[at + 2..at + 2 + name.len()].copy_from_slice(name.as_bytes());
            at += 2 + name.len();
        }
        let crc = crc32fast::hash(&p[..PAGE_LEN - 4]);
        p[PAGE_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        p
    }

    pub fn decode(p: &[u8]) -> Result<DirtyHeader, StateError> {
        if p.len() != PAGE_LEN {
            return Err(StateError::Length(p.len()));
        }
        let stored = u32::from_le_bytes(p[PAGE_LEN - 4..].try_into().expect("4"));
        let computed = crc32fast::hash(&p[..PAGE_LEN - 4]);
        if stored != computed {
            return Err(StateError::Crc { stored, computed });
        }
        if p[..8] != DIRTY_MAGIC {
            return Err(StateError::Magic);
        }
        if u16::from_le_bytes([p[8], p[9]]) != DIRTY_VERSION {
            return Err(StateError::Field("version"));
        }
        let chunk_size = u32::from_le_bytes(p[10..14].try_into().expect("4"));
        let disk_size = u64::from_le_bytes(p[14..22].try_into().expect("8"));
        let chunks = u64::from_le_bytes(p[22..30].try_into().expect("8"));
        if chunk_size == 0 || chunks > DIRTY_CHUNKS_MAX || chunks != disk_size.div_ceil(chunk_size as u64) {
            return Err(StateError::Field("chunk count"));
        }
        let server: [u8; 32] = p[30..62].try_into().expect("32");
        let mut at = 62;
        let mut names = Vec::with_capacity(2);
        for what in ["machine name", "disk name"] {
            let len = u16::from_le_bytes([p[at], p[at + 1]]) as usize;
            if len == 0 || len > NAME_LEN_MAX {
                return Err(StateError::Field(what));
            }
            let name = std::str::from_utf8(&p[at + 2..at + 2 + len]).map_err(|_| StateError::Field(what))?;
            names.push(name.to_string());
            at += 2 + len;
        }
        if p[at..PAGE_LEN - 4].iter().any(|&b| b != 0) {
            return Err(StateError::Field("header padding"));
        }
        let disk = names.pop().expect("two names");
        let machine = names.pop().expect("two names");
        Ok(DirtyHeader { machine, disk, server, disk_size, chunk_size })
    }

    fn check(&self, expected: &DirtyHeader) -> Result<(), StateError> {
        let mismatch = |what, found: String, expected: String| Err(StateError::Mismatch { what, found, expected });
        if self.machine != expected.machine {
            return mismatch("machine", self.machine.clone(), expected.machine.clone());
        }
        if self.disk != expected.disk {
            return mismatch("disk", self.disk.clone(), expected.disk.clone());
        }
        if self.server != expected.server {
            return mismatch("server", hex::encode(&self.server[..8]), hex::encode(&expected.server[..8]));
        }
        if self.disk_size != expected.disk_size || self.chunk_size != expected.chunk_size {
            let shape = |h: &DirtyHeader| format!("{} bytes in {}-byte chunks", h.disk_size, h.chunk_size);
            return mismatch("disk size", shape(self), shape(expected));
        }
        Ok(())
    }
}

/// Bit page `index` holding `words` (at most [`PAGE_WORDS`]; the rest are zero).
pub fn encode_page(index: u32, words: &[u64]) -> [u8; PAGE_LEN] {
    debug_assert!(words.len() <= PAGE_WORDS);
    let mut p = [0u8; PAGE_LEN];
    for (i, w) in words.iter().enumerate() {
        p[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    p[PAGE_WORDS * 8..PAGE_WORDS * 8 + 4].copy_from_slice(&index.to_le_bytes());
    let crc = crc32fast::hash(&p[..PAGE_LEN - 4]);
    p[PAGE_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    p
}

/// The words of bit page `index`, or None when its CRC, index or unused bits are wrong.
/// `chunks` is how many chunks the page covers (the last page covers fewer).
pub fn decode_page(p: &[u8], index: u32, chunks: u64) -> Option<Vec<u64>> {
    debug_assert!(p.len() == PAGE_LEN && chunks <= PAGE_CHUNKS);
    let stored = u32::from_le_bytes(p[PAGE_LEN - 4..].try_into().expect("4"));
    if stored != crc32fast::hash(&p[..PAGE_LEN - 4]) {
        return None;
    }
    if u32::from_le_bytes(p[PAGE_WORDS * 8..PAGE_WORDS * 8 + 4].try_into().expect("4")) != index {
        return None;
    }
    let words: Vec<u64> =
        p[..PAGE_WORDS * 8].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect();
    // Bits past the last chunk are never set.
    let valid = |w: usize| {
        let first = w as u64 * 64;
        match chunks.saturating_sub(first) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    };
    if words.iter().enumerate().any(|(w, &bits)| bits & !valid(w) != 0) {
        return None;
    }
    Some(words)
}

/// A dirty file open for updates; `words` mirrors what the file says.
pub struct DirtyFile {
    path: PathBuf,
    file: Arc<File>,
    chunks: u64,
    words: Vec<u64>,
    /// Page writes so far, and how many of them an fdatasync has covered.
    written: u64,
    synced: u64,
}

/// What [`DirtyFile::open`] found.
pub struct Opened {
    pub file: DirtyFile,
    /// Bit pages whose CRC failed: every chunk they cover is set.
    pub torn_pages: usize,
}

impl DirtyFile {
    pub fn path_for(dir: &Path, disk: &str) -> PathBuf {
        dir.join(format!("capture-{disk}.dirty"))
    }

    /// Writes a new file with `words` set (whole, through a temporary file, fdatasync,
    /// rename and directory fsync), replacing any old one.
    pub fn create(dir: &Path, h: &DirtyHeader, words: Vec<u64>) -> std::io::Result<DirtyFile> {
        let chunks = h.chunks();
        if chunks > DIRTY_CHUNKS_MAX || h.machine.len() > NAME_LEN_MAX || h.disk.len() > NAME_LEN_MAX {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "disk too large for a dirty bitmap"));
        }
        assert_eq!(words.len() as u64, chunks.div_ceil(64), "one bit per chunk");
        let path = Self::path_for(dir, &h.disk);
        let tmp = path.with_extension("tmp");
        let file = std::fs::OpenOptions::new().create(true).read(true).write(true).truncate(true).open(&tmp)?;
        let mut bytes = Vec::with_capacity((1 + h.pages()) * PAGE_LEN);
        bytes.extend_from_slice(&h.encode());
        for (i, page) in words.chunks(PAGE_WORDS).enumerate() {
            bytes.extend_from_slice(&encode_page(i as u32, page));
        }
        file.write_all_at(&bytes, 0)?;
        file.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()?;
        Ok(DirtyFile { path, file: Arc::new(file), chunks, words, written: 0, synced: 0 })
    }

    /// Opens the file `expected` names. Ok(None): there is none. Err: it is there but
    /// not usable (the caller says so and starts a new one).
    pub fn open(dir: &Path, expected: &DirtyHeader) -> Result<Option<Opened>, StateError> {
        let path = Self::path_for(dir, &expected.disk);
        let file = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(_) => return Err(StateError::Field("unreadable file")),
        };
        let len = file.metadata().map_err(|_| StateError::Field("unreadable file"))?.len();
        let pages = expected.pages();
        if expected.chunks() > DIRTY_CHUNKS_MAX || len != ((1 + pages) * PAGE_LEN) as u64 {
            return Err(StateError::Length(len.min(usize::MAX as u64) as usize));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0).map_err(|_| StateError::Field("unreadable file"))?;
        DirtyHeader::decode(&bytes[..PAGE_LEN])?.check(expected)?;
        let chunks = expected.chunks();
        let mut words = vec![0u64; chunks.div_ceil(64) as usize];
        let mut torn_pages = 0;
        for (i, page) in bytes[PAGE_LEN..].chunks_exact(PAGE_LEN).enumerate() {
            let first_chunk = i as u64 * PAGE_CHUNKS;
            let page_chunks = (chunks - first_chunk).min(PAGE_CHUNKS);
            let mine = &mut words[i * PAGE_WORDS..((i + 1) * PAGE_WORDS).min(chunks.div_ceil(64) as usize)];
            match decode_page(page, i as u32, page_chunks) {
                Some(w) => mine.copy_from_slice(&w[..mine.len()]),
                None => {
                    torn_pages += 1;
                    for c in 0..page_chunks {
                        mine[(c / 64) as usize] |= 1 << (c % 64);
                    }
                }
            }
        }
        let mut file = DirtyFile { path, file: Arc::new(file), chunks, words, written: 0, synced: 0 };
        if torn_pages > 0 {
            // Rewrite the damaged pages as what they now mean (every chunk set).
            for i in 0..pages {
                file.write_page(i).map_err(|_| StateError::Field("unwritable file"))?;
            }
        }
        Ok(Some(Opened { file, torn_pages }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bits the file holds, one per chunk.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    fn write_page(&mut self, page: usize) -> std::io::Result<()> {
        let end = ((page + 1) * PAGE_WORDS).min(self.words.len());
        let bytes = encode_page(page as u32, &self.words[page * PAGE_WORDS..end]);
        self.file.write_all_at(&bytes, ((1 + page) * PAGE_LEN) as u64)?;
        self.written += 1;
        Ok(())
    }

    /// Sets chunks `first..=last` (clipped to the disk), rewriting the pages that change.
    pub fn set(&mut self, first: u64, last: u64) -> std::io::Result<()> {
        let last = last.min(self.chunks.saturating_sub(1));
        let mut changed_page = None;
        for c in first..=last {
            let (w, b) = ((c / 64) as usize, c % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                let page = w / PAGE_WORDS;
                if changed_page.is_some_and(|p| p != page) {
                    self.write_page(changed_page.expect("some"))?;
                }
                changed_page = Some(page);
            }
        }
        if let Some(p) = changed_page {
            self.write_page(p)?;
        }
        Ok(())
    }

    /// Clears in word `w` every bit not in `keep`, for each `(w, keep)`; rewrites the
    /// pages that change. Never sets a bit.
    pub fn clear(&mut self, words: impl IntoIterator<Item = (usize, u64)>) -> std::io::Result<()> {
        let mut pages = std::collections::BTreeSet::new();
        for (w, keep) in words {
            let now = self.words[w] & keep;
            if now != self.words[w] {
                self.words[w] = now;
                pages.insert(w / PAGE_WORDS);
            }
        }
        for p in pages {
            self.write_page(p)?;
        }
        Ok(())
    }

    /// The file to fdatasync and the writes that covers, when any are not yet synced.
    pub fn unsynced(&self) -> Option<(Arc<File>, u64)> {
        (self.written > self.synced).then(|| (self.file.clone(), self.written))
    }

    pub fn note_synced(&mut self, upto: u64) {
        self.synced = self.synced.max(upto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(disk_size: u64) -> DirtyHeader {
        DirtyHeader { machine: "vm".into(), disk: "d0".into(), server: [7; 32], disk_size, chunk_size: 64 << 10 }
    }

    #[test]
    fn set_clear_reopen_and_a_torn_page_marks_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        // Three bit pages, the last one partial.
        let h = header((2 * PAGE_CHUNKS + 100) * (64 << 10) - 1);
        let words = vec![0u64; h.chunks().div_ceil(64) as usize];
        let mut f = DirtyFile::create(dir.path(), &h, words).unwrap();
        f.set(5, 9).unwrap();
        f.set(PAGE_CHUNKS + 3, PAGE_CHUNKS + 3).unwrap();
        f.set(h.chunks() - 1, h.chunks() + 50).unwrap(); // clipped
        f.clear([(0, 1 << 7)]).unwrap(); // keeps chunk 7 of 5..=9
        assert!(f.unsynced().is_some());
        let set = |f: &DirtyFile| -> Vec<u64> {
            (0..h.chunks()).filter(|&c| f.words()[(c / 64) as usize] & (1 << (c % 64)) != 0).collect()
        };
        let before = set(&f);
        assert_eq!(before, vec![7, PAGE_CHUNKS + 3, h.chunks() - 1]);
        drop(f);
        let o = DirtyFile::open(dir.path(), &h).unwrap().unwrap();
        assert_eq!((set(&o.file), o.torn_pages), (before.clone(), 0));

        // Tear page 1: every chunk it covers comes back set, the others as they were.
        let path = DirtyFile::path_for(dir.path(), "d0");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[2 * PAGE_LEN + 17] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let o = DirtyFile::open(dir.path(), &h).unwrap().unwrap();
        assert_eq!(o.torn_pages, 1);
        let mut want: Vec<u64> = vec![7];
        want.extend(PAGE_CHUNKS..2 * PAGE_CHUNKS);
        want.push(h.chunks() - 1);
        assert_eq!(set(&o.file), want);
        drop(o);
        // The damaged page was rewritten: it now reads cleanly with every chunk set.
        let o = DirtyFile::open(dir.path(), &h).unwrap().unwrap();
        assert_eq!((set(&o.file), o.torn_pages), (want, 0));
    }

    #[test]
    fn another_identity_size_or_a_bad_header_or_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let h = header(1 << 30);
        assert!(DirtyFile::open(dir.path(), &h).unwrap().is_none(), "no file yet");
        DirtyFile::create(dir.path(), &h, vec![0; h.chunks().div_ceil(64) as usize]).unwrap();
        let refused = |e: &DirtyHeader| DirtyFile::open(dir.path(), e).err().expect("refused");
        let mut other = h.clone();
        other.machine = "vm2".into();
        assert!(matches!(refused(&other), StateError::Mismatch { what: "machine", .. }));
        let mut other = h.clone();
        other.server = [8; 32];
        assert!(matches!(refused(&other), StateError::Mismatch { what: "server", .. }));
        let mut other = h.clone();
        other.disk_size += 1 << 20; // same page count, another size
        assert!(matches!(refused(&other), StateError::Mismatch { what: "disk size", .. }));
        let path = DirtyFile::path_for(dir.path(), "d0");
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[3] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(refused(&h), StateError::Crc { .. }));
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(matches!(refused(&h), StateError::Length(_)));
    }

    proptest! {
        #[test]
        fn pages_round_trip_and_reject_every_bit_flip(
            words in proptest::collection::vec(any::<u64>(), 0..=PAGE_WORDS),
            index in any::<u32>(),
            flip in 0..PAGE_LEN * 8,
        ) {
            let chunks = words.len() as u64 * 64;
            let p = encode_page(index, &words);
            let mut want = words.clone();
            want.resize(PAGE_WORDS, 0);
            prop_assert_eq!(decode_page(&p, index, chunks), Some(want));
            prop_assert_eq!(decode_page(&p, index.wrapping_add(1), chunks), None);
            let mut bad = p;
            bad[flip / 8] ^= 1 << (flip % 8);
            prop_assert_eq!(decode_page(&bad, index, chunks), None);
        }

        #[test]
        fn header_round_trips_and_decode_never_panics(
            disk_size in 1u64..(1 << 44),
            machine in "[a-z0-9-]{1,64}",
            junk in proptest::collection::vec(any::<u8>(), PAGE_LEN..=PAGE_LEN),
        ) {
            let h = DirtyHeader { machine, disk: "disk0".into(), server: [1; 32], disk_size, chunk_size: 64 << 10 };
            prop_assert_eq!(DirtyHeader::decode(&h.encode()), Ok(h));
            let _ = DirtyHeader::decode(&junk);
        }
    }
}
