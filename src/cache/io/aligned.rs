//! A byte buffer whose contents start at a [`BLOCK_SIZE`]-aligned address, as O_DIRECT
//! needs, without `unsafe`: a `Vec` over-allocated by one block and used from its first
//! aligned byte. It never grows past its capacity, so it never moves.

use std::ops::{Deref, DerefMut};

use crate::cache::format::BLOCK_SIZE;

const ALIGN: usize = BLOCK_SIZE as usize;

pub struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    pub fn with_capacity(capacity: usize) -> AlignedBuf {
        let mut vec: Vec<u8> = Vec::with_capacity(capacity + ALIGN);
        let start = vec.as_ptr().align_offset(ALIGN);
        assert!(start < ALIGN, "an allocation is always alignable within one block");
        vec.resize(start, 0);
        AlignedBuf { vec, start }
    }

    pub fn capacity(&self) -> usize {
        self.vec.capacity() - self.start
    }

    /// Heap bytes the buffer holds, alignment slack included (the same for every buffer
    /// of one requested capacity, unlike [`AlignedBuf::capacity`]).
    pub fn pinned_bytes(&self) -> usize {
        self.vec.capacity()
    }

    pub fn len(&self) -> usize {
        self.vec.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check_room(&self, new_len: usize) {
        assert!(new_len <= self.capacity(), "AlignedBuf would grow past its capacity and move");
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.check_room(self.len() + bytes.len());
        self.vec.extend_from_slice(bytes);
    }

    pub fn resize(&mut self, new_len: usize, value: u8) {
        self.check_room(new_len);
        self.vec.resize(self.start + new_len, value);
    }

    pub fn truncate(&mut self, len: usize) {
        self.vec.truncate(self.start + len);
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec[self.start..]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..]
    }
}

/// True when `buf` and `offset` satisfy O_DIRECT: address, length and offset aligned.
pub fn is_direct_io_aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(ALIGN)
        && buf.len().is_multiple_of(ALIGN)
        && offset.is_multiple_of(BLOCK_SIZE)
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
    #[should_panic(expected = "capacity")]
    fn refuses_to_grow() {
        let mut b = AlignedBuf::with_capacity(10);
        b.resize(b.capacity() + 1, 0);
    }
}
