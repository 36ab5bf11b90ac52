//! The format of an uploaded data object: a run of one stream's records, in order.
//!
//! ```text
//! magic "CLO1" | version u16 | reserved u16 | count u32 | first_seq u64 | last_seq u64
//! count × ( seq u64 | len u32 | bytes[len] )           -- the cache record, as stored by the engine's caller
//! crc32 u32 (CRC-32/IEEE of everything before it)
//! ```

use crate::protocol::WRITE_DATA_MAX;

const MAGIC: &[u8; 4] = b"CLO1";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 28;
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
}

/// Builds an object record by record, straight into its final buffer.
pub struct ObjectBuilder {
    out: Vec<u8>,
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
        ObjectBuilder { out, count: 0, first: 0, last: 0 }
    }

    /// Appends the record `seq` (one more than the previous).
    pub fn push(&mut self, seq: u64, bytes: &[u8]) {
        debug_assert!(self.count == 0 || seq == self.last + 1, "records must be consecutive");
        debug_assert!(bytes.len() <= RECORD_LEN_MAX);
        if self.count == 0 {
            self.first = seq;
        }
        self.last = seq;
        self.count += 1;
        self.out.extend_from_slice(&seq.to_le_bytes());
        self.out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.out.extend_from_slice(bytes);
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// (first_seq, last_seq) so far.
    pub fn range(&self) -> (u64, u64) {
        (self.first, self.last)
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out[8..12].copy_from_slice(&self.count.to_le_bytes());
        self.out[12..20].copy_from_slice(&self.first.to_le_bytes());
        self.out[20..28].copy_from_slice(&self.last.to_le_bytes());
        let crc = crc32fast::hash(&self.out);
        self.out.extend_from_slice(&crc.to_le_bytes());
        debug_assert!(self.out.len() <= OBJECT_LEN_MAX);
        self.out
    }
}

pub fn encode(records: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut b = ObjectBuilder::with_capacity(records.iter().map(|r| 12 + r.1.len()).sum());
    for (seq, bytes) in records {
        b.push(*seq, bytes);
    }
    b.finish()
}

pub fn decode(b: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, ObjectError> {
    if b.len() < HEADER_LEN + 4 || b.len() > OBJECT_LEN_MAX {
        return Err(ObjectError::Length(b.len()));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4")) {
        return Err(ObjectError::Checksum);
    }
    if &body[..4] != MAGIC || u16::from_le_bytes([body[4], body[5]]) != VERSION {
        return Err(ObjectError::Header);
    }
    let count = u32::from_le_bytes(body[8..12].try_into().expect("4")) as usize;
    let first = u64::from_le_bytes(body[12..20].try_into().expect("8"));
    let last = u64::from_le_bytes(body[20..28].try_into().expect("8"));
    let mut at = HEADER_LEN;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let head = body.get(at..at + 12).ok_or(ObjectError::Records("truncated record header"))?;
        let seq = u64::from_le_bytes(head[..8].try_into().expect("8"));
        let len = u32::from_le_bytes(head[8..12].try_into().expect("4")) as usize;
        if len > RECORD_LEN_MAX {
            return Err(ObjectError::Records("record too long"));
        }
        let bytes = body.get(at + 12..at + 12 + len).ok_or(ObjectError::Records("truncated record"))?;
        if out.last().is_some_and(|(prev, _): &(u64, Vec<u8>)| *prev + 1 != seq) {
            return Err(ObjectError::Records("sequence numbers are not consecutive"));
        }
        out.push((seq, bytes.to_vec()));
        at += 12 + len;
    }
    if at != body.len() || out.first().map_or(0, |r| r.0) != first || out.last().map_or(0, |r| r.0) != last {
        return Err(ObjectError::Records("header disagrees with the records"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips_and_detects_any_flip(start in 1u64..1000, lens in proptest::collection::vec(0usize..300, 1..20), flip in any::<prop::sample::Index>()) {
            let records: Vec<(u64, Vec<u8>)> = lens.iter().enumerate().map(|(i, &l)| (start + i as u64, vec![i as u8; l])).collect();
            let mut bytes = encode(&records);
            prop_assert_eq!(decode(&bytes).unwrap(), records);
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
