//! On-disk byte layouts of the cache engine. `docs/format.md` is the prose twin of this
//! file: every structure here is described there byte by byte, and every offset constant
//! below is derived from the one before it so the two cannot drift apart silently.
//!
//! All integers are little-endian. Checksums are CRC-32/IEEE (the polynomial of zlib and
//! Ethernet, computed by `crc32fast`). Checksums of segment structures are *seeded* with
//! [`segment_seed`]: a CRC of the cache's random salt and the segment id, so bytes left in
//! a recycled file by an earlier segment (or a crafted payload) never validate.

/// Every batch starts at a multiple of this; writes are padded to it (O_DIRECT-ready).
pub const BLOCK_SIZE: u64 = 4096;
// Batches are written straight from aligned buffers: the I/O layer's alignment must be it.
const _: () = assert!(BLOCK_SIZE == super::io::aligned::BLOCK_LEN);
/// Version written in every batch header, trailer and meta file.
pub const FORMAT_VERSION: u16 = 2;

pub const BATCH_MAGIC: [u8; 4] = *b"CLB1";
pub const TRAILER_MAGIC: [u8; 4] = *b"CLT1";
pub const META_MAGIC: [u8; 4] = *b"CLM1";

/// Hard caps: every length read from disk is checked against these before it is used.
pub const RECORD_SIZE_CAP: u32 = 16 << 20;
pub const SEGMENT_SIZE_CAP: u64 = 1 << 32;
pub const SEGMENT_SIZE_MIN: u64 = 64 << 10;
pub const STREAM_KEY_LEN_MAX: usize = 255;
/// With 255-byte names a META entry is at most 530 bytes: 65,536 streams fit the META cap.
pub const STREAMS_MAX: u32 = 1 << 16;
pub const META_BODY_LEN_MAX: u32 = 256 << 20;

pub fn align_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

/// CRC seed of one segment: CRC-32 of `salt (u64 LE) ‖ segment_id (u64 LE)`.
pub fn segment_seed(salt: u64, segment_id: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&segment_id.to_le_bytes());
    h.finalize()
}

pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------------------------------
// Batch header: 64 bytes at a BLOCK_SIZE-aligned offset of a segment.
// ---------------------------------------------------------------------------------------

pub const BATCH_MAGIC_AT: usize = 0;
pub const BATCH_VERSION_AT: usize = BATCH_MAGIC_AT + 4;
pub const BATCH_KIND_AT: usize = BATCH_VERSION_AT + 2;
pub const BATCH_CRC_AT: usize = BATCH_KIND_AT + 2;
pub const BATCH_LEN_AT: usize = BATCH_CRC_AT + 4;
pub const BATCH_SEGMENT_AT: usize = BATCH_LEN_AT + 4;
pub const BATCH_NO_AT: usize = BATCH_SEGMENT_AT + 8;
pub const BATCH_OFFSET_AT: usize = BATCH_NO_AT + 8;
pub const BATCH_DURABLE_END_AT: usize = BATCH_OFFSET_AT + 4;
pub const BATCH_COUNT_AT: usize = BATCH_DURABLE_END_AT + 4;
pub const BATCH_RESERVED_AT: usize = BATCH_COUNT_AT + 4;
pub const BATCH_HEADER_LEN: usize = 64;
const _: () = assert!(BATCH_RESERVED_AT + 20 == BATCH_HEADER_LEN);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum BatchKind {
    /// Data (or rewritten) records follow, each a [`RecordHeader`] then its payload.
    Records = 1,
    /// The summary of a sealed segment: [`SummaryEntry`] array.
    Summary = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub kind: BatchKind,
    /// Bytes from the header's first byte to the end of the last record (padding excluded).
    pub batch_len: u32,
    pub segment_id: u64,
    /// Global, strictly increasing across the cache's life.
    pub batch_no: u64,
    /// This batch's own offset inside its segment (a cross-check against misplaced reads).
    pub offset: u32,
    /// Offset up to which the segment was durable when this batch was issued: a valid batch
    /// whose `durable_end` lies past an invalid one proves the invalid one was acknowledged
    /// (corruption), not torn by a crash.
    pub durable_end: u32,
    pub count: u32,
}

impl BatchHeader {
    /// Encodes into `out[..64]` with the CRC field zeroed; [`seal_batch_crc`] fills it.
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..BATCH_HEADER_LEN];
        out.fill(0);
        out[BATCH_MAGIC_AT..BATCH_MAGIC_AT + 4].copy_from_slice(&BATCH_MAGIC);
        out[BATCH_VERSION_AT..BATCH_VERSION_AT + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[BATCH_KIND_AT..BATCH_KIND_AT + 2].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[BATCH_LEN_AT..BATCH_LEN_AT + 4].copy_from_slice(&self.batch_len.to_le_bytes());
        out[BATCH_SEGMENT_AT..BATCH_SEGMENT_AT + 8].copy_from_slice(&self.segment_id.to_le_bytes());
        out[BATCH_NO_AT..BATCH_NO_AT + 8].copy_from_slice(&self.batch_no.to_le_bytes());
        out[BATCH_OFFSET_AT..BATCH_OFFSET_AT + 4].copy_from_slice(&self.offset.to_le_bytes());
        out[BATCH_DURABLE_END_AT..BATCH_DURABLE_END_AT + 4].copy_from_slice(&self.durable_end.to_le_bytes());
        out[BATCH_COUNT_AT..BATCH_COUNT_AT + 4].copy_from_slice(&self.count.to_le_bytes());
    }

    /// Parses the fixed fields, checking magic, version, kind and length bounds. The CRC
    /// is checked separately because it also covers bytes after the header.
    pub fn decode(b: &[u8], segment_size: u64) -> Result<BatchHeader, FormatError> {
        if b.len() < BATCH_HEADER_LEN {
            return Err(FormatError::Truncated);
        }
        if b[BATCH_MAGIC_AT..BATCH_MAGIC_AT + 4] != BATCH_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = get_u16(b, BATCH_VERSION_AT);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        let kind = match get_u16(b, BATCH_KIND_AT) {
            1 => BatchKind::Records,
            2 => BatchKind::Summary,
            k => return Err(FormatError::Field("batch kind", u64::from(k))),
        };
        let h = BatchHeader {
            kind,
            batch_len: get_u32(b, BATCH_LEN_AT),
            segment_id: get_u64(b, BATCH_SEGMENT_AT),
            batch_no: get_u64(b, BATCH_NO_AT),
            offset: get_u32(b, BATCH_OFFSET_AT),
            durable_end: get_u32(b, BATCH_DURABLE_END_AT),
            count: get_u32(b, BATCH_COUNT_AT),
        };
        if b[BATCH_RESERVED_AT..BATCH_HEADER_LEN].iter().any(|&x| x != 0) {
            return Err(FormatError::Field("batch reserved bytes", 0));
        }
        if (h.batch_len as usize) < BATCH_HEADER_LEN || u64::from(h.offset) + u64::from(h.batch_len) > segment_size {
            return Err(FormatError::Field("batch length", u64::from(h.batch_len)));
        }
        let entry_len = match kind {
            BatchKind::Records => RECORD_HEADER_LEN,
            BatchKind::Summary => SUMMARY_ENTRY_LEN,
        };
        if h.count as usize > (h.batch_len as usize - BATCH_HEADER_LEN) / entry_len {
            return Err(FormatError::Field("batch count", u64::from(h.count)));
        }
        Ok(h)
    }

    pub fn stored_crc(b: &[u8]) -> u32 {
        get_u32(b, BATCH_CRC_AT)
    }
}

/// A CRC hasher for a batch: seeded, fed the header with its CRC field as zeros.
pub fn batch_crc_start(seed: u32, header: &[u8]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    h.update(&header[..BATCH_CRC_AT]);
    h.update(&[0u8; 4]);
    h.update(&header[BATCH_CRC_AT + 4..BATCH_HEADER_LEN]);
    h
}

pub fn seal_batch_crc(header: &mut [u8], crc: u32) {
    header[BATCH_CRC_AT..BATCH_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// Record header: 32 bytes, followed by `stored_len` payload bytes (no padding).
// ---------------------------------------------------------------------------------------

pub const REC_STREAM_AT: usize = 0;
pub const REC_KIND_AT: usize = REC_STREAM_AT + 4;
pub const REC_CODEC_AT: usize = REC_KIND_AT + 1;
pub const REC_RESERVED1_AT: usize = REC_CODEC_AT + 1;
pub const REC_SEQ_AT: usize = REC_RESERVED1_AT + 2;
pub const REC_STORED_LEN_AT: usize = REC_SEQ_AT + 8;
pub const REC_LOGICAL_LEN_AT: usize = REC_STORED_LEN_AT + 4;
pub const REC_PAYLOAD_CRC_AT: usize = REC_LOGICAL_LEN_AT + 4;
pub const REC_RESERVED2_AT: usize = REC_PAYLOAD_CRC_AT + 4;
pub const RECORD_HEADER_LEN: usize = REC_RESERVED2_AT + 4;
const _: () = assert!(RECORD_HEADER_LEN == 32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Appended by a producer.
    Data = 1,
    /// Copied forward by compaction; same stream, sequence and bytes as the original.
    Rewrite = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Lz4 = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub stream: u32,
    pub kind: RecordKind,
    pub codec: Codec,
    pub seq: u64,
    pub stored_len: u32,
    pub logical_len: u32,
    /// CRC-32/IEEE (unseeded) of the stored payload bytes; the record header itself is
    /// covered by its batch's seeded CRC.
    pub payload_crc: u32,
}

impl RecordHeader {
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..RECORD_HEADER_LEN];
        out[REC_STREAM_AT..REC_STREAM_AT + 4].copy_from_slice(&self.stream.to_le_bytes());
        out[REC_KIND_AT] = self.kind as u8;
        out[REC_CODEC_AT] = self.codec as u8;
        out[REC_RESERVED1_AT..REC_RESERVED1_AT + 2].fill(0);
        out[REC_SEQ_AT..REC_SEQ_AT + 8].copy_from_slice(&self.seq.to_le_bytes());
        out[REC_STORED_LEN_AT..REC_STORED_LEN_AT + 4].copy_from_slice(&self.stored_len.to_le_bytes());
        out[REC_LOGICAL_LEN_AT..REC_LOGICAL_LEN_AT + 4].copy_from_slice(&self.logical_len.to_le_bytes());
        out[REC_PAYLOAD_CRC_AT..REC_PAYLOAD_CRC_AT + 4].copy_from_slice(&self.payload_crc.to_le_bytes());
        out[REC_RESERVED2_AT..REC_RESERVED2_AT + 4].fill(0);
    }

    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(FormatError::Truncated);
        }
        let kind = match b[REC_KIND_AT] {
            1 => RecordKind::Data,
            2 => RecordKind::Rewrite,
            k => return Err(FormatError::Field("record kind", u64::from(k))),
        };
        let codec = match b[REC_CODEC_AT] {
            0 => Codec::Raw,
            1 => Codec::Lz4,
            c => return Err(FormatError::Field("record codec", u64::from(c))),
        };
        let h = RecordHeader {
            stream: get_u32(b, REC_STREAM_AT),
            kind,
            codec,
            seq: get_u64(b, REC_SEQ_AT),
            stored_len: get_u32(b, REC_STORED_LEN_AT),
            logical_len: get_u32(b, REC_LOGICAL_LEN_AT),
            payload_crc: get_u32(b, REC_PAYLOAD_CRC_AT),
        };
        if h.logical_len > RECORD_SIZE_CAP || h.logical_len == 0 {
            return Err(FormatError::Field("record logical length", u64::from(h.logical_len)));
        }
        let stored_ok = match codec {
            Codec::Raw => h.stored_len == h.logical_len,
            Codec::Lz4 => h.stored_len > 0 && h.stored_len < h.logical_len,
        };
        if !stored_ok {
            return Err(FormatError::Field("record stored length", u64::from(h.stored_len)));
        }
        if h.seq == 0 {
            return Err(FormatError::Field("record sequence", 0));
        }
        if b[REC_RESERVED1_AT..REC_SEQ_AT] != [0, 0] || b[REC_RESERVED2_AT..RECORD_HEADER_LEN] != [0; 4] {
            return Err(FormatError::Field("record reserved bytes", 0));
        }
        Ok(h)
    }
}

// ---------------------------------------------------------------------------------------
// Summary entry: 24 bytes per record of a sealed segment.
// ---------------------------------------------------------------------------------------

pub const SUM_STREAM_AT: usize = 0;
pub const SUM_OFFSET_AT: usize = SUM_STREAM_AT + 4;
pub const SUM_SEQ_AT: usize = SUM_OFFSET_AT + 4;
pub const SUM_STORED_LEN_AT: usize = SUM_SEQ_AT + 8;
pub const SUM_LOGICAL_LEN_AT: usize = SUM_STORED_LEN_AT + 4;
pub const SUMMARY_ENTRY_LEN: usize = SUM_LOGICAL_LEN_AT + 4;
const _: () = assert!(SUMMARY_ENTRY_LEN == 24);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryEntry {
    pub stream: u32,
    /// Offset of the record header inside the segment.
    pub offset: u32,
    pub seq: u64,
    pub stored_len: u32,
    pub logical_len: u32,
}

impl SummaryEntry {
    pub fn encode(&self, out: &mut [u8]) {
        out[SUM_STREAM_AT..SUM_STREAM_AT + 4].copy_from_slice(&self.stream.to_le_bytes());
        out[SUM_OFFSET_AT..SUM_OFFSET_AT + 4].copy_from_slice(&self.offset.to_le_bytes());
        out[SUM_SEQ_AT..SUM_SEQ_AT + 8].copy_from_slice(&self.seq.to_le_bytes());
        out[SUM_STORED_LEN_AT..SUM_STORED_LEN_AT + 4].copy_from_slice(&self.stored_len.to_le_bytes());
        out[SUM_LOGICAL_LEN_AT..SUM_LOGICAL_LEN_AT + 4].copy_from_slice(&self.logical_len.to_le_bytes());
    }

    pub fn decode(b: &[u8], segment_size: u64) -> Result<SummaryEntry, FormatError> {
        let e = SummaryEntry {
            stream: get_u32(b, SUM_STREAM_AT),
            offset: get_u32(b, SUM_OFFSET_AT),
            seq: get_u64(b, SUM_SEQ_AT),
            stored_len: get_u32(b, SUM_STORED_LEN_AT),
            logical_len: get_u32(b, SUM_LOGICAL_LEN_AT),
        };
        let end = u64::from(e.offset) + RECORD_HEADER_LEN as u64 + u64::from(e.stored_len);
        if e.seq == 0 || e.stored_len > RECORD_SIZE_CAP || e.logical_len > RECORD_SIZE_CAP || end > segment_size {
            return Err(FormatError::Field("summary entry", u64::from(e.offset)));
        }
        Ok(e)
    }
}

// ---------------------------------------------------------------------------------------
// Trailer: 64 bytes at the start of a sealed segment's last block.
// ---------------------------------------------------------------------------------------

pub const TR_MAGIC_AT: usize = 0;
pub const TR_VERSION_AT: usize = TR_MAGIC_AT + 4;
pub const TR_RESERVED1_AT: usize = TR_VERSION_AT + 2;
pub const TR_CRC_AT: usize = TR_RESERVED1_AT + 2;
pub const TR_SUMMARY_OFFSET_AT: usize = TR_CRC_AT + 4;
pub const TR_SUMMARY_LEN_AT: usize = TR_SUMMARY_OFFSET_AT + 4;
pub const TR_COUNT_AT: usize = TR_SUMMARY_LEN_AT + 4;
pub const TR_SEGMENT_AT: usize = TR_COUNT_AT + 4;
pub const TR_LAST_BATCH_AT: usize = TR_SEGMENT_AT + 8;
pub const TR_RESERVED2_AT: usize = TR_LAST_BATCH_AT + 8;
pub const TRAILER_LEN: usize = 64;
const _: () = assert!(TR_RESERVED2_AT + 24 == TRAILER_LEN);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub summary_offset: u32,
    pub summary_len: u32,
    pub count: u32,
    pub segment_id: u64,
    pub last_batch_no: u64,
}

/// Offset of the trailer block inside a segment of `segment_size` bytes.
pub fn trailer_offset(segment_size: u64) -> u64 {
    segment_size - BLOCK_SIZE
}

impl Trailer {
    pub fn encode(&self, seed: u32, out: &mut [u8]) {
        let out = &mut out[..TRAILER_LEN];
        out.fill(0);
        out[TR_MAGIC_AT..TR_MAGIC_AT + 4].copy_from_slice(&TRAILER_MAGIC);
        out[TR_VERSION_AT..TR_VERSION_AT + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[TR_SUMMARY_OFFSET_AT..TR_SUMMARY_OFFSET_AT + 4].copy_from_slice(&self.summary_offset.to_le_bytes());
        out[TR_SUMMARY_LEN_AT..TR_SUMMARY_LEN_AT + 4].copy_from_slice(&self.summary_len.to_le_bytes());
        out[TR_COUNT_AT..TR_COUNT_AT + 4].copy_from_slice(&self.count.to_le_bytes());
        out[TR_SEGMENT_AT..TR_SEGMENT_AT + 8].copy_from_slice(&self.segment_id.to_le_bytes());
        out[TR_LAST_BATCH_AT..TR_LAST_BATCH_AT + 8].copy_from_slice(&self.last_batch_no.to_le_bytes());
        let crc = crc32fast::Hasher::new_with_initial(seed);
        let crc = {
            let mut crc = crc;
            crc.update(out);
            crc.finalize()
        };
        out[TR_CRC_AT..TR_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(b: &[u8], seed: u32, segment_size: u64) -> Result<Trailer, FormatError> {
        if b.len() < TRAILER_LEN {
            return Err(FormatError::Truncated);
        }
        if b[TR_MAGIC_AT..TR_MAGIC_AT + 4] != TRAILER_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let mut copy = [0u8; TRAILER_LEN];
        copy.copy_from_slice(&b[..TRAILER_LEN]);
        copy[TR_CRC_AT..TR_CRC_AT + 4].fill(0);
        let mut h = crc32fast::Hasher::new_with_initial(seed);
        h.update(&copy);
        if h.finalize() != get_u32(b, TR_CRC_AT) {
            return Err(FormatError::Checksum);
        }
        let version = get_u16(b, TR_VERSION_AT);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        let t = Trailer {
            summary_offset: get_u32(b, TR_SUMMARY_OFFSET_AT),
            summary_len: get_u32(b, TR_SUMMARY_LEN_AT),
            count: get_u32(b, TR_COUNT_AT),
            segment_id: get_u64(b, TR_SEGMENT_AT),
            last_batch_no: get_u64(b, TR_LAST_BATCH_AT),
        };
        if b[TR_RESERVED1_AT..TR_CRC_AT] != [0, 0] || b[TR_RESERVED2_AT..TRAILER_LEN].iter().any(|&x| x != 0) {
            return Err(FormatError::Field("trailer reserved bytes", 0));
        }
        let end = u64::from(t.summary_offset) + u64::from(t.summary_len);
        if end > trailer_offset(segment_size)
            || (t.summary_len as usize) < BATCH_HEADER_LEN
            || u64::from(t.summary_offset) % BLOCK_SIZE != 0
        {
            return Err(FormatError::Field("trailer summary range", end));
        }
        Ok(t)
    }
}

/// Why a byte range did not parse. Callers wrap it with where it was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated structure")]
    Truncated,
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported format version {0}")]
    Version(u16),
    #[error("checksum mismatch")]
    Checksum,
    #[error("{0} out of range ({1})")]
    Field(&'static str, u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn batch_header_round_trips(len in 64u32..1_000_000, seg in any::<u64>(), no in any::<u64>(),
                                    off_blocks in 0u32..1000, durable in any::<u32>(), count in 0u32..100) {
            let offset = off_blocks * BLOCK_SIZE as u32;
            let h = BatchHeader { kind: BatchKind::Records, batch_len: len.max(64 + count * 32),
                                  segment_id: seg, batch_no: no, offset, durable_end: durable, count };
            let mut buf = [0u8; 64];
            h.encode(&mut buf);
            prop_assert_eq!(BatchHeader::decode(&buf, 1 << 32).unwrap(), h);
        }

        #[test]
        fn record_header_round_trips(stream in any::<u32>(), seq in 1u64.., logical in 2u32..RECORD_SIZE_CAP,
                                     lz4 in any::<bool>(), crc in any::<u32>()) {
            let (codec, stored) = if lz4 { (Codec::Lz4, logical / 2) } else { (Codec::Raw, logical) };
            let h = RecordHeader { stream, kind: RecordKind::Data, codec, seq, stored_len: stored,
                                   logical_len: logical, payload_crc: crc };
            let mut buf = [0u8; 32];
            h.encode(&mut buf);
            prop_assert_eq!(RecordHeader::decode(&buf).unwrap(), h);
        }

        #[test]
        fn trailer_round_trips_and_rejects_other_seeds(seed in any::<u32>(), other in any::<u32>(),
                                                        blocks in 0u32..100, len in 64u32..4096) {
            let t = Trailer { summary_offset: blocks * 4096, summary_len: len, count: 3,
                              segment_id: 9, last_batch_no: 77 };
            let mut buf = [0u8; 64];
            t.encode(seed, &mut buf);
            prop_assert_eq!(Trailer::decode(&buf, seed, 1 << 30).unwrap(), t);
            if other != seed {
                prop_assert_eq!(Trailer::decode(&buf, other, 1 << 30), Err(FormatError::Checksum));
            }
        }

        #[test]
        fn decoders_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = BatchHeader::decode(&bytes, 1 << 30);
            let _ = RecordHeader::decode(&bytes);
            let _ = Trailer::decode(&bytes, 1, 1 << 30);
            if bytes.len() >= SUMMARY_ENTRY_LEN {
                let _ = SummaryEntry::decode(&bytes, 1 << 30);
            }
        }
    }

    #[test]
    fn seeds_differ_per_segment_and_salt() {
        assert_ne!(segment_seed(1, 1), segment_seed(1, 2));
        assert_ne!(segment_seed(1, 1), segment_seed(2, 1));
    }
}
