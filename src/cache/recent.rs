//! Recently written batches, kept in memory. Segments are written with O_DIRECT, so the
//! page cache does not hold them; the drain follows close behind the writer and would
//! otherwise read every byte back from the device, competing with the writes (reads are
//! slower than writes on many cloud disks). The newest batches, up to `tail_cache_bytes`,
//! are kept here and reads of them are served from memory; the bytes are the very ones
//! written, and readers check their CRCs as they do after a device read.
//!
//! Entries are in write order, which is (segment id, offset) order, since segment ids
//! only grow. A big batch is kept by moving its buffer in (no copy); the buffer goes back
//! to the writer's pool when it falls out, unless a reader still holds it.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Arc;

use super::io::aligned::AlignedBuf;

/// The bytes of one batch as written at `offset` of `segment`.
pub(crate) enum Held {
    /// The writer's own buffer, moved in.
    Batch(AlignedBuf),
    /// A small batch, copied so that its large buffer can be reused at once.
    Copy(Vec<u8>),
}

impl Deref for Held {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Held::Batch(b) => b,
            Held::Copy(v) => v,
        }
    }
}

impl Held {
    /// Memory this entry pins.
    fn cost(&self) -> usize {
        match self {
            Held::Batch(b) => b.pinned_bytes(),
            Held::Copy(v) => v.capacity(),
        }
    }
}

struct Entry {
    segment: u64,
    offset: u64,
    held: Arc<Held>,
}

/// A piece of a batch that overlaps a requested span.
pub(crate) struct Piece {
    /// Offset in the segment of `held[0]`.
    pub offset: u64,
    pub held: Arc<Held>,
}

pub(crate) struct RecentBatches {
    entries: VecDeque<Entry>,
    bytes: usize,
    bytes_max: usize,
}

impl RecentBatches {
    pub fn new(bytes_max: usize) -> RecentBatches {
        RecentBatches { entries: VecDeque::new(), bytes: 0, bytes_max }
    }

    /// Keeps the batch `buf` written at `offset` of `segment` (durable already). Returns
    /// the buffers that may be reused by the writer: `buf` itself when it was copied or
    /// is not kept, and those of evicted entries no reader holds.
    pub fn keep(&mut self, segment: u64, offset: u64, buf: AlignedBuf) -> Vec<AlignedBuf> {
        let mut free = Vec::new();
        if self.bytes_max == 0 || buf.is_empty() {
            free.push(buf);
            return free;
        }
        debug_assert!(
            self.entries.back().is_none_or(|e| (e.segment, e.offset + e.held.len() as u64) <= (segment, offset)),
            "batches are kept in write order"
        );
        let held = if buf.len() < buf.capacity() / 8 {
            let copy = Held::Copy(buf.to_vec());
            free.push(buf);
            copy
        } else {
            Held::Batch(buf)
        };
        self.bytes += held.cost();
        self.entries.push_back(Entry { segment, offset, held: Arc::new(held) });
        while self.bytes > self.bytes_max {
            let Some(old) = self.entries.pop_front() else { break };
            self.bytes -= old.held.cost();
            if let Ok(Held::Batch(b)) = Arc::try_unwrap(old.held) {
                free.push(b);
            }
        }
        free
    }

    /// The kept batches overlapping `[start, end)` of `segment`, in offset order.
    pub fn overlapping(&self, segment: u64, start: u64, end: u64) -> Vec<Piece> {
        // First entry that ends after `start` in this segment.
        let from = self.entries.partition_point(|e| (e.segment, e.offset + e.held.len() as u64) <= (segment, start));
        self.entries
            .range(from..)
            .take_while(|e| e.segment == segment && e.offset < end)
            .map(|e| Piece { offset: e.offset, held: e.held.clone() })
            .collect()
    }

    /// Memory pinned now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Fills `out` (whose length is the span) with the bytes at `start..` of a segment:
/// from `pieces` where they cover it, from `read_device(offset, buf)` for the holes.
/// Returns how many bytes came from memory.
pub(crate) fn fill_span(
    out: &mut [u8],
    start: u64,
    pieces: &[Piece],
    mut read_device: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<usize> {
    let end = start + out.len() as u64;
    let mut at = start;
    let mut from_memory = 0;
    for p in pieces {
        let p_end = p.offset + p.held.len() as u64;
        if p_end <= at || p.offset >= end {
            continue;
        }
        if p.offset > at {
            read_device(at, &mut out[(at - start) as usize..(p.offset - start) as usize])?;
            at = p.offset;
        }
        let n = (p_end.min(end) - at) as usize;
        let src = (at - p.offset) as usize;
        out[(at - start) as usize..(at - start) as usize + n].copy_from_slice(&p.held[src..src + n]);
        from_memory += n;
        at += n as u64;
    }
    if at < end {
        read_device(at, &mut out[(at - start) as usize..])?;
    }
    Ok(from_memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(fill: u8, len: usize, capacity: usize) -> AlignedBuf {
        let mut b = AlignedBuf::with_capacity(capacity);
        b.resize(len, fill);
        b
    }

    #[test]
    fn keeps_the_newest_within_the_bound_and_gives_buffers_back() {
        // Room for three of these batches (a buffer costs the heap bytes it pins).
        let cost = batch(0, 8192, 8192).pinned_bytes();
        let mut r = RecentBatches::new(3 * cost);
        assert!(r.keep(1, 0, batch(1, 8192, 8192)).is_empty());
        assert!(r.keep(1, 8192, batch(2, 8192, 8192)).is_empty());
        assert!(r.keep(1, 16384, batch(3, 8192, 8192)).is_empty());
        // A fourth pushes the first out, and its buffer comes back.
        let freed = r.keep(2, 0, batch(4, 8192, 8192));
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0][0], 1);
        assert!(r.bytes() <= 3 * cost);
        assert!(r.overlapping(1, 0, 8192).is_empty());
        let p = r.overlapping(1, 8000, 20000);
        assert_eq!(p.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![8192, 16384]);
        assert_eq!(r.overlapping(2, 100, 200).len(), 1);
        // A held piece is not handed back for reuse while a reader has it.
        let held = r.overlapping(1, 8192, 8193);
        let freed = r.keep(2, 8192, batch(5, 8192, 8192));
        assert!(freed.is_empty(), "the reader's buffer must not be reused");
        assert_eq!(held[0].held[0], 2);
    }

    #[test]
    fn small_batches_are_copied_and_zero_disables() {
        let mut r = RecentBatches::new(1 << 20);
        let freed = r.keep(1, 0, batch(7, 4096, 1 << 16));
        assert_eq!(freed.len(), 1, "a small batch is copied and its buffer reused at once");
        assert_eq!(r.overlapping(1, 0, 4096)[0].held.len(), 4096);
        let mut off = RecentBatches::new(0);
        assert_eq!(off.keep(1, 0, batch(7, 8192, 8192)).len(), 1);
        assert!(off.overlapping(1, 0, 8192).is_empty());
    }

    #[test]
    fn fill_span_mixes_memory_and_device() {
        let mut r = RecentBatches::new(1 << 20);
        r.keep(3, 4096, batch(0xAA, 4096, 4096));
        r.keep(3, 12288, batch(0xBB, 4096, 4096));
        let mut out = vec![0u8; 16384];
        let mut device_reads = Vec::new();
        let from_memory = fill_span(&mut out, 2048, &r.overlapping(3, 2048, 18432), |at, buf| {
            device_reads.push((at, buf.len()));
            buf.fill(0x11);
            Ok(())
        })
        .unwrap();
        assert_eq!(from_memory, 8192);
        assert_eq!(device_reads, vec![(2048, 2048), (8192, 4096), (16384, 2048)]);
        assert!(out[..2048].iter().all(|&b| b == 0x11));
        assert!(out[2048..6144].iter().all(|&b| b == 0xAA));
        assert!(out[6144..10240].iter().all(|&b| b == 0x11));
        assert!(out[10240..14336].iter().all(|&b| b == 0xBB));
        assert!(out[14336..].iter().all(|&b| b == 0x11));
    }
}
