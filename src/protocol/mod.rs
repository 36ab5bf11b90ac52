//! The agent ⇄ process-server wire format, documented byte by byte in
//! `docs/protocol.md`. Every frame is `len: u32 LE | type: u8 | body`, `len` counting
//! type and body and capped at [`FRAME_LEN_MAX`]; every variable field inside is capped
//! too. Decoding never trusts a length before checking it.

pub mod auth;
pub mod codec;
pub mod record;

pub use codec::{read_frame, read_frame_bytes, read_frame_bytes_max, write_frame, Frame, FrameError};
pub use record::{write_frame_as_record, StreamRecord, RECORD_HEADER_LEN};

/// Protocol version spoken by this build. 2: OpenDisk declares the disk's size.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame (type + body), bytes.
pub const FRAME_LEN_MAX: u32 = (1 << 20) + 1024;
/// Largest data carried by one write frame.
pub const WRITE_DATA_MAX: usize = 1 << 20;
/// Largest cache record the protocol produces (a full write plus its header): a process
/// server's cache must accept records this large.
pub const RECORD_BYTES_MAX: usize = WRITE_DATA_MAX + RECORD_HEADER_LEN;
/// Longest machine or disk name.
pub const NAME_LEN_MAX: usize = 64;
/// Most disks one recovery point may cover.
pub const POINT_DISKS_MAX: usize = 64;
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
/// Largest frame (type + body) a peer may send before it has logged in: a Hello with the
/// longest machine name (Auth, the only other login frame, is shorter). Anything longer
/// is refused before its body is read.
pub const LOGIN_FRAME_LEN_MAX: u32 = (1 + 2 + 1 + NAME_LEN_MAX + NONCE_LEN) as u32;
/// The default data-transfer port of a process server.
pub const DEFAULT_PORT: u16 = 9443;

/// Kinds of recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PointKind {
    /// Taken on a timer: the disks as they were at one instant.
    CrashConsistent = 1,
    /// Requested by the application after it quiesced.
    AppConsistent = 2,
    /// Tagged while the agent was catching up from its dirty bitmap (the replication
    /// queue had overflowed, or the initial copy of an NBD export was under way): the
    /// image holds some writes made after others it lacks, so it is **not**
    /// crash-consistent. Restorable, but not a state the disk ever had. Added after
    /// version 2 without a version change: older readers refuse kind 3.
    NotCrashConsistent = 3,
}

impl PointKind {
    pub fn from_u8(v: u8) -> Option<PointKind> {
        match v {
            1 => Some(PointKind::CrashConsistent),
            2 => Some(PointKind::AppConsistent),
            3 => Some(PointKind::NotCrashConsistent),
            _ => None,
        }
    }
}

/// Longest zero run one record or frame may describe.
pub const ZERO_LEN_MAX: u64 = 1 << 40;
