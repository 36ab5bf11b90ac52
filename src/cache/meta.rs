//! The `META` file: the cache's salt and segment size, and the stream catalog with each
//! stream's upload cursor and resync flag. Rewritten whole and crash-atomically
//! (temp → fsync → rename → fsync dir) whenever a stream is created, acknowledged as
//! uploaded, evicted or resynced. Byte map in `docs/format.md`.

use super::format::{crc32, FORMAT_VERSION, META_BODY_LEN_MAX, META_MAGIC, STREAMS_MAX, STREAM_KEY_LEN_MAX};

pub const META_FILE: &str = "META";
/// Preallocated space given up so META can still be written on a full file system.
pub const META_RESERVE_FILE: &str = "META.reserve";
const META_RESERVE_MIN: u64 = 256 << 10;

/// Writes META crash-atomically; on ENOSPC before any fsync, gives up the reserve and
/// tries once more (decisions and upload cursors must persist on a full file system).
pub(crate) fn write_with_reserve(
    storage: &dyn super::io::Storage,
    bytes: &[u8],
) -> Result<(), super::io::AtomicWriteFailure> {
    use super::io::{write_atomic_checked, AtomicWriteFailure};
    match write_atomic_checked(storage, META_FILE, bytes) {
        Err(AtomicWriteFailure::Write(e)) if super::error::is_no_space(&e) => {
            tracing::warn!("file system full: using the META reserve");
            let _ = storage.remove(META_RESERVE_FILE);
            write_atomic_checked(storage, META_FILE, bytes)
        }
        other => other,
    }
}

/// Makes sure the reserve exists and holds at least four times `meta_len` bytes (a temp
/// copy plus slack for growth), and never less than 256 KiB.
/// Best effort: with no room, it is retried on the next META write.
pub(crate) fn ensure_reserve(storage: &dyn super::io::Storage, meta_len: usize) {
    let want = META_RESERVE_MIN.max(4 * meta_len as u64);
    let ok =
        storage.open(META_RESERVE_FILE, true).and_then(|f| if f.size()? < want { f.allocate(want) } else { Ok(()) });
    if let Err(e) = ok {
        tracing::debug!(error = %e, "META reserve not (re)made");
        let _ = storage.remove(META_RESERVE_FILE);
    }
}
pub const META_HEADER_LEN: usize = 16;
const META_STREAM_FIXED_LEN: usize = 4 + 8 + 1 + 1 + 1 + 1 + 8 + 8;
pub const FLAG_RESYNC_REQUIRED: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaStream {
    pub id: u32,
    pub machine: String,
    pub disk: String,
    /// Every record with `seq <= uploaded_upto` is uploaded (or evicted) and dead.
    pub uploaded_upto: u64,
    pub resync_required: bool,
    /// Highest sequence number ever dropped without upload (eviction, salvage); 0: none.
    pub evicted_upto: u64,
    /// Sequence number of the record that began the latest resync (a full copy); 0: none.
    pub resync_base: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub salt: u64,
    pub segment_size: u64,
    /// Incremented on every rewrite; lets a reader tell two versions apart.
    pub generation: u64,
    pub streams: Vec<MetaStream>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("META is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("META has a bad magic")]
    BadMagic,
    #[error("META has unsupported version {0}")]
    Version(u16),
    #[error("META body length {0} out of range")]
    Length(u64),
    #[error("META checksum mismatch")]
    Checksum,
    #[error("META field out of range: {0}")]
    Field(&'static str),
}

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(28 + self.streams.len() * 48);
        body.extend_from_slice(&self.salt.to_le_bytes());
        body.extend_from_slice(&self.segment_size.to_le_bytes());
        body.extend_from_slice(&self.generation.to_le_bytes());
        body.extend_from_slice(&(self.streams.len() as u32).to_le_bytes());
        for s in &self.streams {
            debug_assert!(s.machine.len() <= STREAM_KEY_LEN_MAX && s.disk.len() <= STREAM_KEY_LEN_MAX);
            body.extend_from_slice(&s.id.to_le_bytes());
            body.extend_from_slice(&s.uploaded_upto.to_le_bytes());
            body.push(if s.resync_required { FLAG_RESYNC_REQUIRED } else { 0 });
            body.push(s.machine.len() as u8);
            body.push(s.disk.len() as u8);
            body.push(0);
            body.extend_from_slice(&s.evicted_upto.to_le_bytes());
            body.extend_from_slice(&s.resync_base.to_le_bytes());
            body.extend_from_slice(s.machine.as_bytes());
            body.extend_from_slice(s.disk.as_bytes());
        }
        let mut out = Vec::with_capacity(META_HEADER_LEN + body.len());
        out.extend_from_slice(&META_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Meta, MetaError> {
        if b.len() < META_HEADER_LEN {
            return Err(MetaError::Short(b.len()));
        }
        if b[0..4] != META_MAGIC {
            return Err(MetaError::BadMagic);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != FORMAT_VERSION {
            return Err(MetaError::Version(version));
        }
        if b[6..8] != [0, 0] {
            return Err(MetaError::Field("reserved header bytes"));
        }
        let body_len = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        if body_len > META_BODY_LEN_MAX || body_len as usize != b.len() - META_HEADER_LEN {
            return Err(MetaError::Length(u64::from(body_len)));
        }
        let body = &b[META_HEADER_LEN..];
        if crc32(body) != u32::from_le_bytes(b[12..16].try_into().expect("4")) {
            return Err(MetaError::Checksum);
        }
        let mut r = Reader { b: body, at: 0 };
        let salt = r.u64()?;
        let segment_size = r.u64()?;
        let generation = r.u64()?;
        let count = r.u32()?;
        if count > STREAMS_MAX {
            return Err(MetaError::Field("stream count"));
        }
        let mut streams = Vec::with_capacity(count.min(4096) as usize);
        for _ in 0..count {
            let fixed = r.take(META_STREAM_FIXED_LEN)?;
            let id = u32::from_le_bytes(fixed[0..4].try_into().expect("4"));
            let uploaded_upto = u64::from_le_bytes(fixed[4..12].try_into().expect("8"));
            let flags = fixed[12];
            let (ml, dl) = (fixed[13] as usize, fixed[14] as usize);
            let evicted_upto = u64::from_le_bytes(fixed[16..24].try_into().expect("8"));
            let resync_base = u64::from_le_bytes(fixed[24..32].try_into().expect("8"));
            if ml == 0 || dl == 0 || fixed[15] != 0 || flags & !FLAG_RESYNC_REQUIRED != 0 || id >= STREAMS_MAX {
                return Err(MetaError::Field("stream entry"));
            }
            let machine = String::from_utf8(r.take(ml)?.to_vec()).map_err(|_| MetaError::Field("machine name"))?;
            let disk = String::from_utf8(r.take(dl)?.to_vec()).map_err(|_| MetaError::Field("disk name"))?;
            streams.push(MetaStream {
                id,
                machine,
                disk,
                uploaded_upto,
                resync_required: flags & FLAG_RESYNC_REQUIRED != 0,
                evicted_upto,
                resync_base,
            });
        }
        if r.at != body.len() {
            return Err(MetaError::Field("trailing bytes"));
        }
        Ok(Meta { salt, segment_size, generation, streams })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MetaError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(MetaError::Field("truncated body"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, MetaError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, MetaError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,40}"
    }

    proptest! {
        #[test]
        fn meta_round_trips(salt in any::<u64>(), gen in any::<u64>(),
                            streams in proptest::collection::vec((key(), key(), any::<u64>(), any::<bool>(), any::<(u64, u64)>()), 0..20)) {
            let meta = Meta { salt, segment_size: 1 << 27, generation: gen, streams: streams.into_iter().enumerate()
                .map(|(i, (m, d, up, r, (ev, base)))| MetaStream { id: i as u32, machine: m, disk: d, uploaded_upto: up, resync_required: r, evicted_upto: ev, resync_base: base })
                .collect() };
            let bytes = meta.encode();
            prop_assert_eq!(Meta::decode(&bytes).unwrap(), meta);
        }

        #[test]
        fn any_single_bit_flip_is_detected(flip in 0usize..2000, bit in 0u8..8) {
            let meta = Meta { salt: 1, segment_size: 1 << 27, generation: 2, streams: vec![
                MetaStream { id: 0, machine: "m1".into(), disk: "d0".into(), uploaded_upto: 9, resync_required: false, evicted_upto: 4, resync_base: 7 }] };
            let mut bytes = meta.encode();
            let at = flip % bytes.len();
            bytes[at] ^= 1 << bit;
            prop_assert!(Meta::decode(&bytes).is_err());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Meta::decode(&bytes);
        }
    }
}
