//! What recovery found and did ([`RecoveryReport`] and its parts), as plain data. Apart
//! from the recoverer because errors carry it (`OpenError::Corruption`) and the recoverer
//! returns those errors: with the report here, `error.rs` and `recover.rs` no longer import
//! each other.

use super::types::StreamId;

/// What recovery found and did. Returned inside `OpenError::Corruption` when it refuses.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Sealed segments indexed from their summary alone.
    pub segments_from_summary: usize,
    /// Segments whose batches had to be read (the one left open, or a damaged trailer).
    pub segments_scanned: Vec<u64>,
    pub metadata_bytes_read: u64,
    pub scanned_bytes_read: u64,
    pub records: u64,
    pub torn_tail: Option<TornTail>,
    /// Acknowledged bytes that no longer validate.
    pub damage: Vec<Damage>,
    /// Problems with redundant metadata only (no record lost), e.g. a bad trailer.
    pub notes: Vec<String>,
    pub damaged_streams: Vec<DamagedStream>,
    /// The newest segment file held no batch: a spare made ahead of rotation, recycled.
    pub spare_segment: Option<u64>,
    pub open_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TornTail {
    pub segment: u64,
    /// Offset of the first byte discarded (the start of the first invalid batch).
    pub offset: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    pub segment: u64,
    pub offset: u64,
    pub what: String,
    /// Streams whose records the damaged bytes seem to hold, read from record headers the
    /// checksum no longer vouches for; `None` when even that failed (any stream may be hit).
    pub suspect_streams: Option<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DamagedStream {
    pub stream: StreamId,
    pub machine: String,
    pub disk: String,
    /// Inclusive sequence ranges that are missing.
    pub missing: Vec<(u64, u64)>,
    /// Highest sequence number found after the hole.
    pub last_seen: u64,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} damaged region(s)", self.damage.len())?;
        for d in &self.damage {
            write!(f, "; segment {} at {}: {}", d.segment, d.offset, d.what)?;
        }
        for s in &self.damaged_streams {
            write!(f, "; stream {}/{} missing {:?}", s.machine, s.disk, s.missing)?;
        }
        Ok(())
    }
}
