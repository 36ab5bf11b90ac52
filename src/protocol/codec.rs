//! Frame encoding and decoding, and async read/write of frames on a stream.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{PointKind, FRAME_LEN_MAX, MAC_LEN, NAME_LEN_MAX, NONCE_LEN, POINT_DISKS_MAX, WRITE_DATA_MAX};

/// One protocol message. Tags number the agent's `Write` and `Point` frames on a
/// connection (strictly increasing); `Durable { upto_tag }` acknowledges every tagged
/// frame up to it as durable on the process server's cache disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        machine: String,
        client_nonce: [u8; NONCE_LEN],
    },
    Challenge {
        version: u16,
        server_nonce: [u8; NONCE_LEN],
    },
    Auth {
        mac: [u8; MAC_LEN],
    },
    AuthOk {
        mac: [u8; MAC_LEN],
    },
    /// Binds connection-local index `disk` to the stream (machine, `name`) and declares
    /// the disk's size: writes and zero runs on it must end within `size_bytes`.
    OpenDisk {
        disk: u16,
        size_bytes: u64,
        name: String,
    },
    Write {
        disk: u16,
        tag: u64,
        offset: u64,
        /// Shared, not copied, between the agent's resend window and the frame sent.
        data: bytes::Bytes,
    },
    /// `len` bytes at `offset` are zeros (cheaper than sending them).
    Zero {
        disk: u16,
        tag: u64,
        offset: u64,
        len: u64,
    },
    /// A recovery point over the listed disks: (disk, disk size in bytes).
    Point {
        tag: u64,
        point_id: u64,
        kind: PointKind,
        unix_ms: u64,
        disks: Vec<(u16, u64)>,
    },
    /// A full copy of `disk` begins here: restore builds later points from this on,
    /// never from what came before (sent after `ResyncRequired`).
    Resync {
        disk: u16,
        tag: u64,
    },
    Durable {
        upto_tag: u64,
    },
    Uploaded {
        point_id: u64,
    },
    /// Records of `disk` were dropped before upload (eviction, salvaged damage): the agent
    /// must send `Resync` and a full copy.
    ResyncRequired {
        disk: u16,
    },
    /// This point can never be restored (records before it were dropped before upload).
    PointLost {
        point_id: u64,
    },
    /// The cache is above its watermark: the server holds writes back for about this long.
    Backpressure {
        retry_after_ms: u32,
    },
    Error {
        code: u16,
        message: String,
    },
    /// Delta resync: the agent has no block state for `disk` (opened on this session) and
    /// asks for the xxh3-128 hash of every `block_size`-byte block of what the server
    /// holds for it (every uploaded record, sized to the declared size). Untagged.
    HashesRequest {
        disk: u16,
        block_size: u32,
    },
    /// Delta resync answer, in order: the hashes of blocks `first_block..` (at most
    /// [`HASHES_PER_FRAME_MAX`]).
    Hashes {
        disk: u16,
        first_block: u64,
        hashes: Vec<u128>,
    },
    /// Delta resync answer: all `blocks` hashes were sent; they describe the stream up
    /// to position `head_seq`.
    HashesEnd {
        disk: u16,
        blocks: u64,
        head_seq: u64,
    },
    /// Delta resync: the answer is being prepared (sent every few seconds while the server
    /// waits for its drain and rebuilds the image), so a waiting agent knows it is alive.
    HashesPending {
        disk: u16,
    },
    /// Delta resync answer: the server cannot tell (no history, an unrestorable one, a
    /// drain that did not catch up): the agent copies the disk in full.
    HashesUnavailable {
        disk: u16,
        reason: String,
    },
}

/// Most block hashes one `Hashes` frame carries (64 KiB of hashes: a session's queue
/// of outgoing frames holds at most 16 MiB of them).
pub const HASHES_PER_FRAME_MAX: usize = 1 << 12;
/// Longest reason in `HashesUnavailable` or message in `Error`, bytes.
pub const MESSAGE_LEN_MAX: usize = 1024;

/// Type byte and fixed fields of a Write frame: type, disk, tag, offset.
pub const WRITE_HEADER_LEN: usize = 1 + 2 + 8 + 8;

pub const T_HELLO: u8 = 0x01;
pub const T_CHALLENGE: u8 = 0x02;
pub const T_AUTH: u8 = 0x03;
pub const T_AUTH_OK: u8 = 0x04;
pub const T_OPEN_DISK: u8 = 0x05;
pub const T_WRITE: u8 = 0x10;
pub const T_POINT: u8 = 0x11;
pub const T_ZERO: u8 = 0x12;
pub const T_RESYNC: u8 = 0x13;
pub const T_DURABLE: u8 = 0x20;
pub const T_UPLOADED: u8 = 0x21;
pub const T_BACKPRESSURE: u8 = 0x22;
pub const T_RESYNC_REQUIRED: u8 = 0x23;
pub const T_POINT_LOST: u8 = 0x24;
pub const T_HASHES_REQUEST: u8 = 0x14;
pub const T_HASHES: u8 = 0x25;
pub const T_HASHES_END: u8 = 0x26;
pub const T_HASHES_UNAVAILABLE: u8 = 0x27;
pub const T_HASHES_PENDING: u8 = 0x28;
pub const T_ERROR: u8 = 0x7F;

/// Error codes carried by `Frame::Error`.
pub const E_VERSION: u16 = 1;
pub const E_AUTH: u16 = 2;
pub const E_PROTOCOL: u16 = 3;
pub const E_SERVER: u16 = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame length {len} out of range (1..={max})")]
    Length { len: u32, max: u32 },
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("frame truncated")]
    Truncated,
    #[error("bad field: {0}")]
    Field(&'static str),
}

/// A u16 length and at most [`MESSAGE_LEN_MAX`] bytes, cut on a character boundary.
fn put_message(out: &mut Vec<u8>, message: &str) {
    let mut n = message.len().min(MESSAGE_LEN_MAX);
    while !message.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&message.as_bytes()[..n]);
}

fn put_name(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= NAME_LEN_MAX);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

impl Frame {
    /// The frame type's name, for messages (a frame's contents may be long).
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Challenge { .. } => "Challenge",
            Frame::Auth { .. } => "Auth",
            Frame::AuthOk { .. } => "AuthOk",
            Frame::OpenDisk { .. } => "OpenDisk",
            Frame::Write { .. } => "Write",
            Frame::Zero { .. } => "Zero",
            Frame::Point { .. } => "Point",
            Frame::Resync { .. } => "Resync",
            Frame::Durable { .. } => "Durable",
            Frame::Uploaded { .. } => "Uploaded",
            Frame::ResyncRequired { .. } => "ResyncRequired",
            Frame::PointLost { .. } => "PointLost",
            Frame::Backpressure { .. } => "Backpressure",
            Frame::Error { .. } => "Error",
            Frame::HashesRequest { .. } => "HashesRequest",
            Frame::Hashes { .. } => "Hashes",
            Frame::HashesEnd { .. } => "HashesEnd",
            Frame::HashesUnavailable { .. } => "HashesUnavailable",
            Frame::HashesPending { .. } => "HashesPending",
        }
    }

    /// Appends `len | type | body` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Hello { version, machine, client_nonce } => {
                out.push(T_HELLO);
                out.extend_from_slice(&version.to_le_bytes());
                put_name(out, machine);
                out.extend_from_slice(client_nonce);
            }
            Frame::Challenge { version, server_nonce } => {
                out.push(T_CHALLENGE);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(server_nonce);
            }
            Frame::Auth { mac } => {
                out.push(T_AUTH);
                out.extend_from_slice(mac);
            }
            Frame::AuthOk { mac } => {
                out.push(T_AUTH_OK);
                out.extend_from_slice(mac);
            }
            Frame::OpenDisk { disk, size_bytes, name } => {
                out.push(T_OPEN_DISK);
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&size_bytes.to_le_bytes());
                put_name(out, name);
            }
            Frame::Write { disk, tag, offset, data } => {
                out.push(T_WRITE);
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(data);
            }
            Frame::Zero { disk, tag, offset, len } => {
                out.push(T_ZERO);
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Frame::Point { tag, point_id, kind, unix_ms, disks } => {
                out.push(T_POINT);
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&point_id.to_le_bytes());
                out.push(*kind as u8);
                out.extend_from_slice(&unix_ms.to_le_bytes());
                out.extend_from_slice(&(disks.len() as u16).to_le_bytes());
                for (disk, size) in disks {
                    out.extend_from_slice(&disk.to_le_bytes());
                    out.extend_from_slice(&size.to_le_bytes());
                }
            }
            Frame::Resync { disk, tag } => {
                out.push(T_RESYNC);
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&tag.to_le_bytes());
            }
            Frame::ResyncRequired { disk } => {
                out.push(T_RESYNC_REQUIRED);
                out.extend_from_slice(&disk.to_le_bytes());
            }
            Frame::PointLost { point_id } => {
                out.push(T_POINT_LOST);
                out.extend_from_slice(&point_id.to_le_bytes());
            }
            Frame::Durable { upto_tag } => {
                out.push(T_DURABLE);
                out.extend_from_slice(&upto_tag.to_le_bytes());
            }
            Frame::Uploaded { point_id } => {
                out.push(T_UPLOADED);
                out.extend_from_slice(&point_id.to_le_bytes());
            }
            Frame::Backpressure { retry_after_ms } => {
                out.push(T_BACKPRESSURE);
                out.extend_from_slice(&retry_after_ms.to_le_bytes());
            }
            Frame::Error { code, message } => {
                out.push(T_ERROR);
                out.extend_from_slice(&code.to_le_bytes());
                put_message(out, message);
            }
            Frame::HashesRequest { disk, block_size } => {
                out.push(T_HASHES_REQUEST);
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&block_size.to_le_bytes());
            }
            Frame::Hashes { disk, first_block, hashes } => {
                debug_assert!(!hashes.is_empty() && hashes.len() <= HASHES_PER_FRAME_MAX);
                out.push(T_HASHES);
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&first_block.to_le_bytes());
                out.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
                for h in hashes {
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            Frame::HashesEnd { disk, blocks, head_seq } => {
                out.push(T_HASHES_END);
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&blocks.to_le_bytes());
                out.extend_from_slice(&head_seq.to_le_bytes());
            }
            Frame::HashesPending { disk } => {
                out.push(T_HASHES_PENDING);
                out.extend_from_slice(&disk.to_le_bytes());
            }
            Frame::HashesUnavailable { disk, reason } => {
                out.push(T_HASHES_UNAVAILABLE);
                out.extend_from_slice(&disk.to_le_bytes());
                put_message(out, reason);
            }
        }
        let len = (out.len() - start - 4) as u32;
        debug_assert!(len <= FRAME_LEN_MAX);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes one frame from its type and body (the length prefix already removed).
    pub fn decode(kind: u8, body: &[u8]) -> Result<Frame, FrameError> {
        let mut r = Reader { b: body, at: 0 };
        let frame = match kind {
            T_HELLO => Frame::Hello { version: r.u16()?, machine: r.name()?, client_nonce: r.array()? },
            T_CHALLENGE => Frame::Challenge { version: r.u16()?, server_nonce: r.array()? },
            T_AUTH => Frame::Auth { mac: r.array()? },
            T_AUTH_OK => Frame::AuthOk { mac: r.array()? },
            T_OPEN_DISK => Frame::OpenDisk { disk: r.u16()?, size_bytes: r.u64()?, name: r.name()? },
            T_WRITE => {
                let (disk, tag, offset) = (r.u16()?, r.u64()?, r.u64()?);
                let data = bytes::Bytes::copy_from_slice(r.rest());
                if data.is_empty() || data.len() > WRITE_DATA_MAX {
                    return Err(FrameError::Field("write data length"));
                }
                Frame::Write { disk, tag, offset, data }
            }
            T_ZERO => {
                let (disk, tag, offset, len) = (r.u16()?, r.u64()?, r.u64()?, r.u64()?);
                if len == 0 || len > super::ZERO_LEN_MAX {
                    return Err(FrameError::Field("zero run length"));
                }
                Frame::Zero { disk, tag, offset, len }
            }
            T_POINT => {
                let (tag, point_id) = (r.u64()?, r.u64()?);
                let kind = PointKind::from_u8(r.u8()?).ok_or(FrameError::Field("point kind"))?;
                let unix_ms = r.u64()?;
                let n = r.u16()? as usize;
                if n == 0 || n > POINT_DISKS_MAX {
                    return Err(FrameError::Field("point disk count"));
                }
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    disks.push((r.u16()?, r.u64()?));
                }
                Frame::Point { tag, point_id, kind, unix_ms, disks }
            }
            T_RESYNC => Frame::Resync { disk: r.u16()?, tag: r.u64()? },
            T_RESYNC_REQUIRED => Frame::ResyncRequired { disk: r.u16()? },
            T_POINT_LOST => Frame::PointLost { point_id: r.u64()? },
            T_DURABLE => Frame::Durable { upto_tag: r.u64()? },
            T_UPLOADED => Frame::Uploaded { point_id: r.u64()? },
            T_BACKPRESSURE => Frame::Backpressure { retry_after_ms: r.u32()? },
            T_ERROR => Frame::Error { code: r.u16()?, message: r.message()? },
            T_HASHES_REQUEST => Frame::HashesRequest { disk: r.u16()?, block_size: r.u32()? },
            T_HASHES => {
                let (disk, first_block, n) = (r.u16()?, r.u64()?, r.u32()? as usize);
                if n == 0 || n > HASHES_PER_FRAME_MAX {
                    return Err(FrameError::Field("hash count"));
                }
                let hashes =
                    r.take(n * 16)?.chunks_exact(16).map(|h| u128::from_le_bytes(h.try_into().expect("16"))).collect();
                Frame::Hashes { disk, first_block, hashes }
            }
            T_HASHES_END => Frame::HashesEnd { disk: r.u16()?, blocks: r.u64()?, head_seq: r.u64()? },
            T_HASHES_UNAVAILABLE => Frame::HashesUnavailable { disk: r.u16()?, reason: r.message()? },
            T_HASHES_PENDING => Frame::HashesPending { disk: r.u16()? },
            other => return Err(FrameError::UnknownType(other)),
        };
        if r.at != body.len() {
            return Err(FrameError::Field("trailing bytes"));
        }
        Ok(frame)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(FrameError::Truncated)?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn message(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        if n > MESSAGE_LEN_MAX {
            return Err(FrameError::Field("message length"));
        }
        // Strict, not lossy: a lossy decode could grow past the cap and not round-trip.
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| FrameError::Field("message is not UTF-8"))
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().expect("N"))
    }
    fn name(&mut self) -> Result<String, FrameError> {
        let n = self.u8()? as usize;
        if n == 0 || n > NAME_LEN_MAX {
            return Err(FrameError::Field("name length"));
        }
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| FrameError::Field("name is not UTF-8"))?;
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(FrameError::Field("name has characters outside [A-Za-z0-9._-]"));
        }
        Ok(s.to_string())
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }
}

/// Reads one frame; `Closed` on a clean end of stream at a frame boundary.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<Frame, FrameError> {
    read_frame_bytes(r, buf).await?;
    Frame::decode(buf[0], &buf[1..])
}

/// Reads one frame's type and body into `buf` (length checked, nothing decoded), for a
/// caller that handles some frame types in place (see `super::write_frame_as_record`).
pub async fn read_frame_bytes<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    read_frame_bytes_max(r, buf, FRAME_LEN_MAX).await
}

/// As [`read_frame_bytes`], refusing a frame longer than `len_max` before allocating for
/// it: before login a peer may only send the small login frames
/// ([`super::LOGIN_FRAME_LEN_MAX`]), so an unauthenticated connection never costs a
/// megabyte.
pub async fn read_frame_bytes_max<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    len_max: u32,
) -> Result<(), FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len);
    if len == 0 || len > len_max {
        return Err(FrameError::Length { len, max: len_max });
    }
    buf.resize(len as usize, 0);
    r.read_exact(buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            e.into()
        }
    })?;
    Ok(())
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    if let Frame::Write { disk, tag, offset, data } = frame {
        // The bulk of the traffic: header from the stack, data without another copy.
        debug_assert!(!data.is_empty() && data.len() <= WRITE_DATA_MAX);
        let mut head = [0u8; 4 + WRITE_HEADER_LEN];
        head[0..4].copy_from_slice(&((WRITE_HEADER_LEN + data.len()) as u32).to_le_bytes());
        head[4] = T_WRITE;
        head[5..7].copy_from_slice(&disk.to_le_bytes());
        head[7..15].copy_from_slice(&tag.to_le_bytes());
        head[15..23].copy_from_slice(&offset.to_le_bytes());
        w.write_all(&head).await?;
        return w.write_all(data).await;
    }
    let mut out = Vec::new();
    frame.encode(&mut out);
    w.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,64}"
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u16>(), name(), any::<[u8; 32]>()).prop_map(|(version, machine, client_nonce)| Frame::Hello {
                version,
                machine,
                client_nonce
            }),
            (any::<u16>(), any::<[u8; 32]>())
                .prop_map(|(version, server_nonce)| Frame::Challenge { version, server_nonce }),
            any::<[u8; 32]>().prop_map(|mac| Frame::Auth { mac }),
            (any::<u16>(), any::<u64>(), name()).prop_map(|(disk, size_bytes, name)| Frame::OpenDisk {
                disk,
                size_bytes,
                name
            }),
            (any::<u16>(), any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 1..3000))
                .prop_map(|(disk, tag, offset, data)| Frame::Write { disk, tag, offset, data: data.into() }),
            (any::<u64>(), any::<u64>(), any::<u64>(), proptest::collection::vec((any::<u16>(), any::<u64>()), 1..10))
                .prop_map(|(tag, point_id, unix_ms, disks)| Frame::Point {
                    tag,
                    point_id,
                    kind: PointKind::AppConsistent,
                    unix_ms,
                    disks
                }),
            (any::<u16>(), any::<u64>(), any::<u64>(), 1u64..1 << 40)
                .prop_map(|(disk, tag, offset, len)| Frame::Zero { disk, tag, offset, len }),
            any::<u64>().prop_map(|upto_tag| Frame::Durable { upto_tag }),
            (any::<u16>(), any::<u64>()).prop_map(|(disk, tag)| Frame::Resync { disk, tag }),
            any::<u16>().prop_map(|disk| Frame::ResyncRequired { disk }),
            any::<u64>().prop_map(|point_id| Frame::PointLost { point_id }),
            any::<u64>().prop_map(|point_id| Frame::Uploaded { point_id }),
            any::<u32>().prop_map(|retry_after_ms| Frame::Backpressure { retry_after_ms }),
            (any::<u16>(), "[ -~]{0,100}").prop_map(|(code, message)| Frame::Error { code, message }),
            (any::<u16>(), any::<u32>()).prop_map(|(disk, block_size)| Frame::HashesRequest { disk, block_size }),
            (any::<u16>(), any::<u64>(), proptest::collection::vec(any::<u128>(), 1..300))
                .prop_map(|(disk, first_block, hashes)| Frame::Hashes { disk, first_block, hashes }),
            (any::<u16>(), any::<u64>(), any::<u64>()).prop_map(|(disk, blocks, head_seq)| Frame::HashesEnd {
                disk,
                blocks,
                head_seq
            }),
            (any::<u16>(), "[ -~]{0,100}").prop_map(|(disk, reason)| Frame::HashesUnavailable { disk, reason }),
            any::<u16>().prop_map(|disk| Frame::HashesPending { disk }),
        ]
    }

    #[test]
    fn a_frame_longer_than_the_cap_is_refused_before_any_allocation() {
        for len in [super::super::LOGIN_FRAME_LEN_MAX + 1, FRAME_LEN_MAX, u32::MAX] {
            let mut wire = len.to_le_bytes().to_vec();
            wire.push(T_HELLO);
            let mut buf = Vec::new();
            let r = futures::executor::block_on(read_frame_bytes_max(
                &mut wire.as_slice(),
                &mut buf,
                super::super::LOGIN_FRAME_LEN_MAX,
            ));
            assert!(matches!(r, Err(FrameError::Length { len: l, .. }) if l == len), "{r:?}");
            assert_eq!(buf.capacity(), 0, "nothing allocated for a {len}-byte frame");
        }
        // The largest login message fits.
        let hello = Frame::Hello { version: 1, machine: "m".repeat(NAME_LEN_MAX), client_nonce: [7; NONCE_LEN] };
        let mut wire = Vec::new();
        hello.encode(&mut wire);
        assert_eq!(wire.len() - 4, super::super::LOGIN_FRAME_LEN_MAX as usize);
        let mut buf = Vec::new();
        futures::executor::block_on(read_frame_bytes_max(
            &mut wire.as_slice(),
            &mut buf,
            super::super::LOGIN_FRAME_LEN_MAX,
        ))
        .unwrap();
        assert_eq!(Frame::decode(buf[0], &buf[1..]).unwrap(), hello);
    }

    proptest! {
        #[test]
        fn frames_round_trip(f in frame()) {
            let mut out = Vec::new();
            f.encode(&mut out);
            let len = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
            prop_assert_eq!(len, out.len() - 4);
            prop_assert_eq!(Frame::decode(out[4], &out[5..]).unwrap(), f);
        }

        #[test]
        fn decode_never_panics(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(kind, &body);
        }

        #[test]
        fn truncated_frames_are_rejected(f in frame(), cut in any::<prop::sample::Index>()) {
            let mut out = Vec::new();
            f.encode(&mut out);
            let body = &out[5..];
            if !body.is_empty() {
                let cut = cut.index(body.len());
                // Cutting a write's data still decodes (the data is the rest): only
                // structured frames must refuse every shorter body.
                if !matches!(f, Frame::Write { .. } | Frame::Error { .. }) {
                    prop_assert!(Frame::decode(out[4], &body[..cut]).is_err());
                }
            }
        }
    }
}
