//! Full verification: every cached record is read back and checked (record header against
//! the index, payload CRC, decompressed length), on top of the summary and tail checks
//! recovery already did. Used by `churnlog cache verify`.

use super::read;
use super::recovery_report::RecoveryReport;
use super::state::Inner;
use super::types::StreamId;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StreamVerify {
    pub stream: StreamId,
    pub machine: String,
    pub disk: String,
    pub records: u64,
    /// First and last cached sequence numbers (None when nothing is cached).
    pub seq_range: Option<(u64, u64)>,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub uploaded_upto: u64,
    pub resync_required: bool,
    /// Inclusive sequence ranges that failed their checks.
    pub corrupt_ranges: Vec<(u64, u64)>,
    pub first_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VerifyReport {
    pub recovery: RecoveryReport,
    pub streams: Vec<StreamVerify>,
    pub records_checked: u64,
    pub bytes_checked: u64,
}

impl VerifyReport {
    /// True when recovery found no damage and every record checked out.
    pub fn is_clean(&self) -> bool {
        self.recovery.damage.is_empty()
            && self.recovery.damaged_streams.is_empty()
            && self.streams.iter().all(|s| s.corrupt_ranges.is_empty())
    }
}

pub(crate) fn verify(inner: &Inner) -> VerifyReport {
    let mut out =
        VerifyReport { recovery: inner.recovery.clone(), streams: Vec::new(), records_checked: 0, bytes_checked: 0 };
    let mut buf = Vec::new();
    // Taken under the lock, which is released before any record is read.
    let infos = inner.log.read().stream_infos();
    for info in infos {
        let mut sv = StreamVerify {
            stream: info.id,
            machine: info.machine.clone(),
            disk: info.disk.clone(),
            records: info.records,
            seq_range: (info.records > 0).then_some((info.uploaded_upto + 1, info.durable_upto)),
            logical_bytes: info.logical_bytes,
            stored_bytes: info.stored_bytes,
            uploaded_upto: info.uploaded_upto,
            resync_required: info.resync_required,
            corrupt_ranges: Vec::new(),
            first_error: None,
        };
        for seq in info.uploaded_upto + 1..=info.durable_upto {
            match read::read_into(inner, info.id, seq, &mut buf) {
                Ok(()) => out.bytes_checked += buf.len() as u64,
                Err(e) => {
                    match sv.corrupt_ranges.last_mut() {
                        Some((_, hi)) if *hi + 1 == seq => *hi = seq,
                        _ => sv.corrupt_ranges.push((seq, seq)),
                    }
                    sv.first_error.get_or_insert_with(|| e.to_string());
                }
            }
            out.records_checked += 1;
        }
        out.streams.push(sv);
    }
    out
}

/// The text report of `churnlog cache verify`: recovery's findings, one line per stream,
/// the verdict last.
impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.recovery;
        writeln!(
            f,
            "{} segment(s), {} from summaries, {} scanned",
            r.segments,
            r.segments_from_summary,
            r.segments_scanned.len()
        )?;
        if let Some(t) = &r.torn_tail {
            writeln!(f, "torn tail (unacknowledged, discarded): segment {} at {}: {}", t.segment, t.offset, t.reason)?;
        }
        for d in &r.damage {
            writeln!(f, "DAMAGE segment {} at {}: {}", d.segment, d.offset, d.what)?;
        }
        for n in &r.notes {
            writeln!(f, "note: {n}")?;
        }
        writeln!(
            f,
            "{:<24} {:<10} {:>10} {:>23} {:>14} {:>10} {:>7}  corrupt",
            "machine", "disk", "records", "seq range", "bytes", "uploaded", "resync"
        )?;
        for s in &self.streams {
            let range = s.seq_range.map_or("-".to_string(), |(a, b)| format!("{a}..={b}"));
            let corrupt = if s.corrupt_ranges.is_empty() {
                "-".to_string()
            } else {
                format!("{:?} ({})", s.corrupt_ranges, s.first_error.as_deref().unwrap_or(""))
            };
            writeln!(
                f,
                "{:<24} {:<10} {:>10} {:>23} {:>14} {:>10} {:>7}  {}",
                s.machine, s.disk, s.records, range, s.logical_bytes, s.uploaded_upto, s.resync_required, corrupt
            )?;
        }
        for d in &r.damaged_streams {
            writeln!(f, "DAMAGED stream {}/{}: missing {:?}", d.machine, d.disk, d.missing)?;
        }
        write!(
            f,
            "{} record(s), {} byte(s) checked: {}",
            self.records_checked,
            self.bytes_checked,
            if self.is_clean() { "clean" } else { "CORRUPT" }
        )
    }
}
