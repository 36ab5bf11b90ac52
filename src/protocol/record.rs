//! The stored-record format: the bytes the process server appends to a disk's cache
//! stream for each tagged frame (`docs/protocol.md` §3.1), which the drain uploads and
//! restore replays.

use super::codec::{self, FrameError};
use super::{PointKind, WRITE_DATA_MAX, ZERO_LEN_MAX};

/// Bytes before a Write record's data: the kind byte and the offset.
pub const RECORD_HEADER_LEN: usize = 1 + 8;

/// Contents of one cache record of a disk stream (the engine stores these bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamRecord {
    /// `data` was written at byte `offset` of the disk.
    Write { offset: u64, data: Vec<u8> },
    /// A recovery point: everything before it in this stream belongs to it.
    Point { point_id: u64, kind: PointKind, unix_ms: u64, disk_size: u64 },
    /// `len` bytes from `offset` are zeros.
    Zero { offset: u64, len: u64 },
    /// A full copy of the disk begins after this record: an image at a later point is
    /// built from zeros and the records after it alone.
    ResyncBase { unix_ms: u64 },
}

const REC_WRITE: u8 = 1;
const REC_POINT: u8 = 2;
const REC_ZERO: u8 = 3;
const REC_RESYNC_BASE: u8 = 4;

/// Turns a Write frame held in `buf` (type byte first, as `read_frame_bytes` leaves it)
/// into the cache record it stands for, in place, without copying the data: the record
/// `[1][offset][data]` is the frame's last `RECORD_HEADER_LEN + d` bytes once the byte before the offset
/// (the tag's last) is overwritten. Checks what `Frame::decode` checks. Returns (disk,
/// tag, offset, record).
pub fn write_frame_as_record(buf: &mut [u8]) -> Result<(u16, u64, u64, &[u8]), FrameError> {
    use codec::{T_WRITE, WRITE_HEADER_LEN};
    if buf.first() != Some(&T_WRITE) || buf.len() < WRITE_HEADER_LEN {
        return Err(FrameError::Field("write frame"));
    }
    let data_len = buf.len() - WRITE_HEADER_LEN;
    if data_len == 0 || data_len > WRITE_DATA_MAX {
        return Err(FrameError::Field("write data length"));
    }
    let disk = u16::from_le_bytes([buf[1], buf[2]]);
    let tag = u64::from_le_bytes(buf[3..11].try_into().expect("8"));
    let offset = u64::from_le_bytes(buf[11..19].try_into().expect("8"));
    buf[10] = REC_WRITE;
    Ok((disk, tag, offset, &buf[10..]))
}

impl StreamRecord {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            StreamRecord::Write { offset, data } => {
                let mut out = Vec::with_capacity(RECORD_HEADER_LEN + data.len());
                out.push(REC_WRITE);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(data);
                out
            }
            StreamRecord::Point { point_id, kind, unix_ms, disk_size } => {
                let mut out = Vec::with_capacity(26);
                out.push(REC_POINT);
                out.extend_from_slice(&point_id.to_le_bytes());
                out.push(*kind as u8);
                out.extend_from_slice(&unix_ms.to_le_bytes());
                out.extend_from_slice(&disk_size.to_le_bytes());
                out
            }
            StreamRecord::Zero { offset, len } => {
                let mut out = Vec::with_capacity(17);
                out.push(REC_ZERO);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out
            }
            StreamRecord::ResyncBase { unix_ms } => {
                let mut out = Vec::with_capacity(9);
                out.push(REC_RESYNC_BASE);
                out.extend_from_slice(&unix_ms.to_le_bytes());
                out
            }
        }
    }

    pub fn decode(b: &[u8]) -> Result<StreamRecord, FrameError> {
        let u64_at = |at: usize| -> Result<u64, FrameError> {
            b.get(at..at + 8).map(|s| u64::from_le_bytes(s.try_into().expect("8"))).ok_or(FrameError::Truncated)
        };
        match b.first() {
            Some(&REC_WRITE) => {
                let offset = u64_at(1)?;
                let data = b[RECORD_HEADER_LEN..].to_vec();
                if data.is_empty() || data.len() > WRITE_DATA_MAX {
                    return Err(FrameError::Field("write data length"));
                }
                Ok(StreamRecord::Write { offset, data })
            }
            Some(&REC_POINT) if b.len() == 26 => Ok(StreamRecord::Point {
                point_id: u64_at(1)?,
                kind: PointKind::from_u8(b[9]).ok_or(FrameError::Field("point kind"))?,
                unix_ms: u64_at(10)?,
                disk_size: u64_at(18)?,
            }),
            Some(&REC_ZERO) if b.len() == 17 => {
                let (offset, len) = (u64_at(1)?, u64_at(9)?);
                if len == 0 || len > ZERO_LEN_MAX {
                    return Err(FrameError::Field("zero run length"));
                }
                Ok(StreamRecord::Zero { offset, len })
            }
            Some(&REC_RESYNC_BASE) if b.len() == 9 => Ok(StreamRecord::ResyncBase { unix_ms: u64_at(1)? }),
            _ => Err(FrameError::Field("stream record kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{write_frame, Frame};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn stream_records_round_trip(offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 1..2000),
                                     id in any::<u64>(), ms in any::<u64>(), size in any::<u64>(), k in 1u8..=3) {
            let w = StreamRecord::Write { offset, data };
            prop_assert_eq!(StreamRecord::decode(&w.encode()).unwrap(), w);
            let kind = PointKind::from_u8(k).unwrap();
            let p = StreamRecord::Point { point_id: id, kind, unix_ms: ms, disk_size: size };
            prop_assert_eq!(StreamRecord::decode(&p.encode()).unwrap(), p);
            let r = StreamRecord::ResyncBase { unix_ms: ms };
            prop_assert_eq!(StreamRecord::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn a_write_frame_becomes_its_record_in_place(disk in any::<u16>(), tag in any::<u64>(), offset in any::<u64>(),
                                                     data in proptest::collection::vec(any::<u8>(), 1..3000)) {
            let mut bytes = Vec::new();
            Frame::Write { disk, tag, offset, data: data.clone().into() }.encode(&mut bytes);
            let mut buf = bytes[4..].to_vec();
            let (d, t, o, record) = write_frame_as_record(&mut buf).unwrap();
            prop_assert_eq!((d, t, o), (disk, tag, offset));
            prop_assert_eq!(record.to_vec(), StreamRecord::Write { offset, data: data.clone() }.encode());
            // The async writer's fast path sends the same bytes as encode.
            let mut sent = Vec::new();
            futures::executor::block_on(write_frame(&mut sent, &Frame::Write { disk, tag, offset, data: data.into() })).unwrap();
            prop_assert_eq!(sent, bytes);
        }

        #[test]
        fn stream_record_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = StreamRecord::decode(&bytes);
        }
    }
}
