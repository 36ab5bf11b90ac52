//! A byte buffer whose contents start at a [`BLOCK_LEN`]-aligned address, as O_DIRECT
//! needs, without `unsafe`: an anonymous memory mapping (zero-filled by the kernel, so
//! every byte is initialized) used from its first aligned byte. It never grows past its
//! capacity, so it never moves.
//!
//! Buffers of at least [`HUGE_PAGE_LEN`] start on a huge-page boundary and ask for
//! transparent huge pages (`MADV_HUGEPAGE`). A batch buffer is handed to the kernel for
//! every O_DIRECT write, which pins its pages one by one; on 4 KiB pages that pinning
//! (`get_user_pages` and the release after the write) cost about 5 % of the CPU of a
//! 2:1 ingest run, and a 2 MiB page is pinned as one. Where THP is off (`never`) the
//! advice is ignored, where it is compiled out it is refused; either way the buffer works
//! on small pages. The slack mapped for the alignment is never touched, so it costs
//! address space only, and it is advised `MADV_NOHUGEPAGE`: under THP `always` a touch of
//! the last partial 2 MiB would otherwise fault in a whole huge page.

use std::ops::{Deref, DerefMut};

use memmap2::{Advice, MmapMut};

/// The alignment O_DIRECT asks of addresses, lengths and offsets: the format's block size
/// (`format::BLOCK_SIZE`, asserted equal there), stated here so I/O imports nothing from
/// the engine above it.
pub const BLOCK_LEN: u64 = 4096;
const ALIGN: usize = BLOCK_LEN as usize;
/// Size (and alignment) of a transparent huge page on x86-64 and most arm64 kernels.
pub const HUGE_PAGE_LEN: usize = 2 << 20;
const PAGE_LEN: usize = 4096;
// A mapping starts on a page boundary, which is all the alignment small buffers get.
const _: () = assert!(ALIGN <= PAGE_LEN);

pub struct AlignedBuf {
    map: MmapMut,
    /// Offset in `map` of the first byte of the buffer.
    start: usize,
    capacity: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn with_capacity(capacity: usize) -> AlignedBuf {
        // Whole pages: the rest of the last page is usable anyway.
        let capacity = capacity.max(1).next_multiple_of(PAGE_LEN);
        let align = if capacity >= HUGE_PAGE_LEN { HUGE_PAGE_LEN } else { ALIGN };
        let map_len = capacity + align.saturating_sub(PAGE_LEN);
        let map = match MmapMut::map_anon(map_len) {
            Ok(m) => m,
            Err(e) => panic!("cannot map {map_len} bytes for an I/O buffer: {e}"),
        };
        let start = map.as_ptr().align_offset(align);
        assert!(start + capacity <= map.len(), "the mapping has room for the alignment");
        let huge_len = capacity / HUGE_PAGE_LEN * HUGE_PAGE_LEN;
        if huge_len > 0 {
            // Advice only: refused where THP is compiled out, and then small pages serve.
            let _ = map.advise_range(Advice::HugePage, start, huge_len);
            let _ = map.advise_range(Advice::NoHugePage, start + huge_len, map.len() - start - huge_len);
        }
        AlignedBuf { map, start, capacity, len: 0 }
    }

    /// Faults every page of the buffer in now (`MADV_POPULATE_WRITE`, or a write per page
    /// where the kernel lacks it), so that whoever fills it later takes no page fault. A
    /// fresh batch buffer is filled by producers under the append lock: on huge pages each
    /// first touch zeroes 2 MiB there, and a newly opened cache under load then stalled
    /// for tens of milliseconds while its first buffers were faulted in.
    pub fn populate(&mut self) {
        if self.map.advise_range(Advice::PopulateWrite, self.start, self.capacity).is_err() {
            self.touch_pages();
        }
    }

    /// `populate` for kernels without `MADV_POPULATE_WRITE` (before Linux 5.14).
    fn touch_pages(&mut self) {
        for page in (self.start..self.start + self.capacity).step_by(PAGE_LEN) {
            // Rewrites the byte that is there: the contents do not change.
            self.map[page] = std::hint::black_box(self.map[page]);
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Memory the buffer holds resident once filled: its capacity, in whole pages (the
    /// same for every buffer of one requested capacity).
    pub fn pinned_bytes(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check_room(&self, new_len: usize) {
        assert!(new_len <= self.capacity, "AlignedBuf would grow past its capacity and move");
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        self.check_room(end);
        let at = self.start + self.len;
        self.map[at..at + bytes.len()].copy_from_slice(bytes);
        self.len = end;
    }

    pub fn resize(&mut self, new_len: usize, value: u8) {
        self.check_room(new_len);
        if new_len > self.len {
            self.map[self.start + self.len..self.start + new_len].fill(value);
        }
        self.len = new_len;
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }
}

/// True when `buf` and `offset` satisfy O_DIRECT: address, length and offset aligned.
pub fn is_direct_io_aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(ALIGN) && buf.len().is_multiple_of(ALIGN) && offset.is_multiple_of(BLOCK_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_aligned_and_in_place() {
        for cap in [1usize, 4096, 100_000] {
            let mut b = AlignedBuf::with_capacity(cap);
            let p = b.as_ptr();
            assert!((p as usize).is_multiple_of(ALIGN));
            b.resize(cap, 7);
            b.truncate(1);
            b.extend_from_slice(&[1, 2]);
            assert_eq!(&b[..], &[7, 1, 2]);
            assert_eq!(b.as_ptr(), p);
        }
    }

    #[test]
    fn large_buffers_start_on_a_huge_page_boundary() {
        let cap = (4 << 20) + 4096;
        let mut b = AlignedBuf::with_capacity(cap);
        assert!((b.as_ptr() as usize).is_multiple_of(HUGE_PAGE_LEN), "{:p}", b.as_ptr());
        assert_eq!(b.capacity(), cap);
        assert_eq!(b.pinned_bytes(), cap);
        b.resize(cap, 9);
        assert!(b.iter().all(|&x| x == 9));
        b.truncate(4096);
        b.resize(8192, 1);
        assert_eq!((b[4095], b[4096], b.len()), (9, 1, 8192));
    }

    #[test]
    fn populate_keeps_contents_and_place() {
        let mut b = AlignedBuf::with_capacity(3 << 20);
        b.resize(100, 5);
        let p = b.as_ptr();
        b.populate();
        assert_eq!((b.len(), b.as_ptr()), (100, p));
        assert!(b.iter().all(|&x| x == 5));
        b.touch_pages();
        assert_eq!((b.len(), b.as_ptr()), (100, p));
        assert!(b.iter().all(|&x| x == 5));
    }

    #[test]
    #[should_panic(expected = "capacity")]
    fn refuses_to_grow() {
        let mut b = AlignedBuf::with_capacity(10);
        b.resize(b.capacity() + 1, 0);
    }
}
