//! Per-stream in-memory index: where each live (durable, not yet uploaded) record is.
//! Records of a stream are contiguous in sequence, so the index is a deque of locations
//! whose position is the sequence number: 16 bytes per cached record, nothing per key.

use std::collections::VecDeque;

/// Where a record lives: 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub segment: u32,
    /// Offset of the record header inside the segment.
    pub offset: u32,
    pub stored_len: u32,
    pub logical_len: u32,
}
const _: () = assert!(std::mem::size_of::<Loc>() == 16);

#[derive(Debug)]
pub struct StreamIndex {
    /// Every record with `seq <= uploaded_upto` is uploaded; `locs[0]` is `uploaded_upto + 1`.
    uploaded_upto: u64,
    locs: VecDeque<Loc>,
    logical_bytes: u64,
    stored_bytes: u64,
}

impl StreamIndex {
    pub fn new(uploaded_upto: u64) -> StreamIndex {
        StreamIndex { uploaded_upto, locs: VecDeque::new(), logical_bytes: 0, stored_bytes: 0 }
    }

    /// An index sized for exactly `records` entries (recovery knows the count up front,
    /// so memory stays at 16 bytes per record instead of up to twice that).
    pub fn with_capacity(uploaded_upto: u64, records: usize) -> StreamIndex {
        StreamIndex { uploaded_upto, locs: VecDeque::with_capacity(records), logical_bytes: 0, stored_bytes: 0 }
    }

    pub fn uploaded_upto(&self) -> u64 {
        self.uploaded_upto
    }

    /// Highest durable sequence number (`uploaded_upto` when nothing is cached).
    pub fn durable_upto(&self) -> u64 {
        self.uploaded_upto + self.locs.len() as u64
    }

    pub fn len(&self) -> usize {
        self.locs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locs.is_empty()
    }

    pub fn logical_bytes(&self) -> u64 {
        self.logical_bytes
    }

    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    pub fn heap_bytes(&self) -> usize {
        self.locs.capacity() * std::mem::size_of::<Loc>()
    }

    pub fn get(&self, seq: u64) -> Option<Loc> {
        let i = seq.checked_sub(self.uploaded_upto + 1)?;
        self.locs.get(usize::try_from(i).ok()?).copied()
    }

    /// Appends the next record; `seq` must follow the last one exactly.
    pub fn push(&mut self, seq: u64, loc: Loc) {
        assert_eq!(seq, self.durable_upto() + 1, "stream index must stay gap-free");
        self.logical_bytes += u64::from(loc.logical_len);
        self.stored_bytes += u64::from(loc.stored_len);
        self.locs.push_back(loc);
    }

    /// Moves a live record (compaction); returns the old location when `seq` is still live
    /// and was in `from_segment`.
    pub fn relocate(&mut self, seq: u64, from_segment: u32, loc: Loc) -> Option<Loc> {
        let i = usize::try_from(seq.checked_sub(self.uploaded_upto + 1)?).ok()?;
        let slot = self.locs.get_mut(i)?;
        if slot.segment != from_segment {
            return None;
        }
        debug_assert_eq!((slot.stored_len, slot.logical_len), (loc.stored_len, loc.logical_len));
        Some(std::mem::replace(slot, loc))
    }

    /// Drops every record up to `upto` (clamped to what is durable) and returns them.
    pub fn release_upto(&mut self, upto: u64) -> impl Iterator<Item = Loc> + '_ {
        let upto = upto.min(self.durable_upto());
        let n = upto.saturating_sub(self.uploaded_upto) as usize;
        self.uploaded_upto = self.uploaded_upto.max(upto);
        for loc in self.locs.range(..n) {
            self.logical_bytes -= u64::from(loc.logical_len);
            self.stored_bytes -= u64::from(loc.stored_len);
        }
        self.locs.drain(..n)
    }

    /// Shrinks the deque when it holds far less than it has room for.
    pub fn shrink_if_sparse(&mut self) {
        if self.locs.capacity() > 64 && self.locs.len() * 4 < self.locs.capacity() {
            self.locs.shrink_to(self.locs.len() * 2);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, Loc)> + '_ {
        let base = self.uploaded_upto + 1;
        self.locs.iter().enumerate().map(move |(i, l)| (base + i as u64, *l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(n: u32) -> Loc {
        Loc { segment: n, offset: n * 100, stored_len: 10, logical_len: 20 }
    }

    #[test]
    fn push_get_release() {
        let mut ix = StreamIndex::new(5);
        for s in 6..=10 {
            ix.push(s, loc(s as u32));
        }
        assert_eq!(ix.get(5), None);
        assert_eq!(ix.get(6), Some(loc(6)));
        assert_eq!(ix.durable_upto(), 10);
        assert_eq!(ix.release_upto(8).count(), 3);
        assert_eq!(ix.get(8), None);
        assert_eq!(ix.get(9), Some(loc(9)));
        assert_eq!(ix.logical_bytes(), 40);
        assert_eq!(ix.release_upto(100).count(), 2);
        assert_eq!(ix.uploaded_upto(), 10);
        assert!(ix.is_empty());
    }

    #[test]
    #[should_panic(expected = "gap-free")]
    fn gaps_are_refused() {
        let mut ix = StreamIndex::new(0);
        ix.push(2, loc(2));
    }

    #[test]
    fn relocate_only_from_the_named_segment() {
        let mut ix = StreamIndex::new(0);
        ix.push(1, loc(1));
        let moved = Loc { segment: 9, ..loc(1) };
        assert_eq!(ix.relocate(1, 2, moved), None);
        assert_eq!(ix.relocate(1, 1, moved), Some(loc(1)));
        assert_eq!(ix.get(1), Some(moved));
    }
}
