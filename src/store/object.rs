//! The format of an uploaded data object: a run of one stream's records, in order, each
//! in the form the cache stored it (LZ4-compressed records stay compressed: the drain
//! neither decompresses nor uploads the bytes compression saved).
//!
//! ```text
//! magic "CLO1" | version u16 (2) | reserved u16 | count u32 | first_seq u64 | last_seq u64
//! count × ( seq u64 | codec u8 | reserved [u8; 3] | logical_len u32 | stored_len u32 | bytes[stored_len] )
//! crc32 u32 (CRC-32/IEEE of everything before it)
//! ```
//!
//! Version 1 objects (`seq u64 | len u32 | bytes[len]`, always uncompressed) are still read.

use crate::cache::{decode_stored as decode_into, Codec};
use crate::protocol::WRITE_DATA_MAX;

const MAGIC: &[u8; 4] = b"CLO1";
const VERSION: u16 = 2;
const HEADER_LEN: usize = 28;
const RECORD_HEAD_V1: usize = 12;
const RECORD_HEAD_V2: usize = 20;
/// Largest object accepted on read.
pub const OBJECT_LEN_MAX: usize = 256 << 20;
const RECORD_LEN_MAX: usize = WRITE_DATA_MAX + 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("object is {0} bytes: outside the accepted range")]
    Length(usize),
    #[error("object has a bad magic or version")]
    Header,
    #[error("object checksum mismatch")]
    Checksum,
    #[error("object record table is inconsistent: {0}")]
    Records(&'static str),
    #[error("object record {seq} does not decompress: {what}")]
    Decompress { seq: u64, what: String },
}

/// Builds an object record by record, straight into its final buffer.
pub struct ObjectBuilder {
    out: Vec<u8>,
    /// CRC of everything after the header, combined record by record from the CRCs the
    /// cache already verified, so the payload bytes are not hashed a second time.
    body_crc: crc32fast::Hasher,
    count: u32,
    first: u64,
    last: u64,
}

impl ObjectBuilder {
    pub fn with_capacity(bytes: usize) -> ObjectBuilder {
        let mut out = Vec::with_capacity(HEADER_LEN + 4 + bytes);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.resize(HEADER_LEN, 0); // count, first, last: set by finish
        ObjectBuilder { out, body_crc: crc32fast::Hasher::new(), count: 0, first: 0, last: 0 }
    }

    /// Appends the uncompressed record `seq` (one more than the previous).
    #[cfg(test)]
    pub fn push(&mut self, seq: u64, bytes: &[u8]) {
        self.push_stored(seq, Codec::Raw, bytes.len() as u32, bytes, crc32fast::hash(bytes));
    }

    /// Appends record `seq` (one more than the previous) in its stored form; `stored_crc`
    /// is the CRC-32 of `stored`, as checked by the cache on read.
    pub fn push_stored(&mut self, seq: u64, codec: Codec, logical_len: u32, stored: &[u8], stored_crc: u32) {
        debug_assert!(self.count == 0 || seq == self.last + 1, "records must be consecutive");
        debug_assert!(stored.len() <= RECORD_LEN_MAX && logical_len as usize <= RECORD_LEN_MAX);
        debug_assert!(codec != Codec::Raw || stored.len() == logical_len as usize);
        if self.count == 0 {
            self.first = seq;
        }
        self.last = seq;
        self.count += 1;
        debug_assert_eq!(crc32fast::hash(stored), stored_crc);
        let head_at = self.out.len();
        self.out.extend_from_slice(&seq.to_le_bytes());
        self.out.extend_from_slice(&[codec as u8, 0, 0, 0]);
        self.out.extend_from_slice(&logical_len.to_le_bytes());
        self.out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        self.body_crc.update(&self.out[head_at..]);
        self.body_crc.combine(&crc32fast::Hasher::new_with_initial_len(stored_crc, stored.len() as u64));
        self.out.extend_from_slice(stored);
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Records pushed so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// (first_seq, last_seq) so far.
    pub fn range(&self) -> (u64, u64) {
        (self.first, self.last)
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out[8..12].copy_from_slice(&self.count.to_le_bytes());
        self.out[12..20].copy_from_slice(&self.first.to_le_bytes());
        self.out[20..28].copy_from_slice(&self.last.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.out[..HEADER_LEN]);
        crc.combine(&self.body_crc);
        let crc = crc.finalize();
        debug_assert_eq!(crc, crc32fast::hash(&self.out));
        self.out.extend_from_slice(&crc.to_le_bytes());
        debug_assert!(self.out.len() <= OBJECT_LEN_MAX);
        self.out
    }
}

#[cfg(test)]
pub fn encode(records: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut b = ObjectBuilder::with_capacity(records.iter().map(|r| RECORD_HEAD_V2 + r.1.len()).sum());
    for (seq, bytes) in records {
        b.push(*seq, bytes);
    }
    b.finish()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8"))
}

/// A checked object: its length, CRC, header and whole record table were validated
/// before the first record is handed out, so a reader never applies part of a bad object.
/// Records are then decompressed one at a time into the caller's buffer (memory: the
/// object plus one record).
pub struct ObjectRecords<'a> {
    body: &'a [u8],
    version: u16,
    at: usize,
    left: u32,
}

/// One record's place in an object's table.
struct TableEntry<'a> {
    seq: u64,
    codec: Codec,
    logical_len: usize,
    stored: &'a [u8],
}

fn table_entry(body: &[u8], version: u16, at: usize) -> Result<(TableEntry<'_>, usize), ObjectError> {
    let head_len = if version == 1 { RECORD_HEAD_V1 } else { RECORD_HEAD_V2 };
    let head = body.get(at..at + head_len).ok_or(ObjectError::Records("truncated record header"))?;
    let seq = u64_at(head, 0);
    let (codec, logical_len, stored_len) = if version == 1 {
        let len = u32_at(head, 8) as usize;
        (Codec::Raw, len, len)
    } else {
        let codec = match head[8] {
            0 => Codec::Raw,
            1 => Codec::Lz4,
            _ => return Err(ObjectError::Records("unknown codec")),
        };
        if head[9..12] != [0, 0, 0] {
            return Err(ObjectError::Records("reserved bytes are not zero"));
        }
        (codec, u32_at(head, 12) as usize, u32_at(head, 16) as usize)
    };
    if logical_len > RECORD_LEN_MAX || stored_len > RECORD_LEN_MAX {
        return Err(ObjectError::Records("record too long"));
    }
    let stored = body.get(at + head_len..at + head_len + stored_len).ok_or(ObjectError::Records("truncated record"))?;
    Ok((TableEntry { seq, codec, logical_len, stored }, at + head_len + stored_len))
}

impl<'a> ObjectRecords<'a> {
    /// Validates the object whole (length, CRC, header, record table) without
    /// decompressing anything.
    pub fn check(b: &'a [u8]) -> Result<ObjectRecords<'a>, ObjectError> {
        if b.len() < HEADER_LEN + 4 || b.len() > OBJECT_LEN_MAX {
            return Err(ObjectError::Length(b.len()));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4")) {
            return Err(ObjectError::Checksum);
        }
        let version = u16::from_le_bytes([body[4], body[5]]);
        if &body[..4] != MAGIC || !(version == 1 || version == 2) {
            return Err(ObjectError::Header);
        }
        let count = u32_at(body, 8);
        let (first, last) = (u64_at(body, 12), u64_at(body, 20));
        let (mut at, mut prev) = (HEADER_LEN, None::<u64>);
        let mut seen_first = None;
        for _ in 0..count {
            let (entry, next) = table_entry(body, version, at)?;
            if prev.is_some_and(|p| p.checked_add(1) != Some(entry.seq)) {
                return Err(ObjectError::Records("sequence numbers are not consecutive"));
            }
            seen_first.get_or_insert(entry.seq);
            prev = Some(entry.seq);
            at = next;
        }
        if at != body.len() || seen_first.unwrap_or(0) != first || prev.unwrap_or(0) != last {
            return Err(ObjectError::Records("header disagrees with the records"));
        }
        Ok(ObjectRecords { body, version, at: HEADER_LEN, left: count })
    }

    /// Records not yet handed out.
    pub fn remaining(&self) -> u32 {
        self.left
    }

    /// The next record's sequence number, its logical bytes decoded into `out`.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> Option<Result<u64, ObjectError>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The table was validated by `check`: this cannot fail, but is not trusted to.
        let (entry, next) = match table_entry(self.body, self.version, self.at) {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        self.at = next;
        let seq = entry.seq;
        Some(
            decode_into(entry.codec, entry.stored, entry.logical_len, out)
                .map(|()| seq)
                .map_err(|what| ObjectError::Decompress { seq, what }),
        )
    }
}

/// Checks an object whole (length, CRC, header, record table) and returns its records,
/// decompressed.
pub fn decode(b: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, ObjectError> {
    let mut records = ObjectRecords::check(b)?;
    let mut out = Vec::with_capacity(records.remaining().min(1 << 16) as usize);
    let mut data = Vec::new();
    while let Some(seq) = records.next_into(&mut data) {
        out.push((seq?, std::mem::take(&mut data)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version 1 object, as the previous release wrote it.
    fn encode_v1(records: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(records.len() as u32).to_le_bytes());
        out.extend_from_slice(&records[0].0.to_le_bytes());
        out.extend_from_slice(&records[records.len() - 1].0.to_le_bytes());
        for (seq, bytes) in records {
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn compressed_records_travel_compressed_and_decode_whole() {
        let mut page = vec![0u8; 64 << 10];
        // Incompressible bytes (a xorshift stream), then zeros.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in &mut page[..8 << 10] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let packed = lz4_flex::block::compress(&page);
        let mut b = ObjectBuilder::with_capacity(packed.len() + 64);
        b.push_stored(5, Codec::Lz4, page.len() as u32, &packed, crc32fast::hash(&packed));
        b.push(6, b"tail");
        let bytes = b.finish();
        assert!(bytes.len() < page.len() / 4, "object is {} bytes", bytes.len());
        assert_eq!(decode(&bytes).unwrap(), vec![(5, page.clone()), (6, b"tail".to_vec())]);

        // A compressed record whose stated logical length is wrong is reported, with its seq.
        let mut b = ObjectBuilder::with_capacity(packed.len() + 64);
        b.push_stored(9, Codec::Lz4, page.len() as u32 - 1, &packed, crc32fast::hash(&packed));
        assert!(matches!(decode(&b.finish()), Err(ObjectError::Decompress { seq: 9, .. })));
    }

    proptest! {
        #[test]
        fn round_trips_and_detects_any_flip(start in 1u64..1000, lens in proptest::collection::vec(0usize..300, 1..20), flip in any::<prop::sample::Index>()) {
            let records: Vec<(u64, Vec<u8>)> = lens.iter().enumerate().map(|(i, &l)| (start + i as u64, vec![i as u8; l])).collect();
            let mut bytes = encode(&records);
            prop_assert_eq!(decode(&bytes).unwrap(), records.clone());
            prop_assert_eq!(decode(&encode_v1(&records)).unwrap(), records);
            let at = flip.index(bytes.len());
            bytes[at] ^= 0x10;
            prop_assert!(decode(&bytes).is_err());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }
    }
}
