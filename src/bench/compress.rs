//! `churnlog bench compress`: how a sample of the operator's own data compresses at each
//! LZ4 acceleration, through the engine's own encoder (sampling and the ratio cut-off
//! included), so `lz4_acceleration_max` can be chosen from measurements, not guesses.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use crate::cache::compress::encode_hinted;
use crate::cache::format::Codec;

/// Largest sample read from the file.
pub const SAMPLE_BYTES_MAX: u64 = 1 << 30;

#[derive(Clone, Debug, serde::Serialize)]
pub struct EffortRow {
    pub acceleration: u32,
    /// Logical MiB encoded per second on one core.
    pub mib_per_s: f64,
    /// Stored bytes ÷ logical bytes.
    pub stored_ratio: f64,
    /// Records kept compressed (the rest were stored raw: they did not pay).
    pub compressed_fraction: f64,
}

/// Encodes the first `sample_bytes` of `path` as records of `record_size` at each
/// acceleration; each row takes the best of `rounds` passes.
pub fn run(
    path: &Path,
    sample_bytes: u64,
    record_size: usize,
    ratio_max: f64,
    accelerations: &[u32],
    rounds: u32,
) -> anyhow::Result<Vec<EffortRow>> {
    anyhow::ensure!(record_size > 0, "record size must be positive");
    let mut data = Vec::new();
    std::fs::File::open(path)?.take(sample_bytes.min(SAMPLE_BYTES_MAX)).read_to_end(&mut data)?;
    anyhow::ensure!(data.len() >= record_size, "{} holds less than one record", path.display());
    data.truncate(data.len() / record_size * record_size);
    let mut rows = Vec::new();
    for &acceleration in accelerations {
        let (mut best, mut stored, mut compressed) = (f64::INFINITY, 0u64, 0u64);
        for _ in 0..rounds.max(1) {
            (stored, compressed) = (0, 0);
            let started = Instant::now();
            // The sample as one stream, hinted as the engine hints a stream.
            let mut last_compressed = false;
            for record in data.chunks_exact(record_size) {
                let (codec, len) =
                    encode_hinted(record, ratio_max, acceleration, last_compressed, |codec, s, _| (codec, s.len()));
                last_compressed = codec == Codec::Lz4;
                stored += len as u64;
                compressed += u64::from(codec == Codec::Lz4);
            }
            best = best.min(started.elapsed().as_secs_f64());
        }
        let records = (data.len() / record_size) as f64;
        rows.push(EffortRow {
            acceleration,
            mib_per_s: data.len() as f64 / (1u64 << 20) as f64 / best,
            stored_ratio: stored as f64 / data.len() as f64,
            compressed_fraction: compressed as f64 / records,
        });
    }
    Ok(rows)
}

/// `churnlog bench compress`'s table, one row per acceleration.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(transparent)]
pub struct EffortTable(pub Vec<EffortRow>);

impl std::fmt::Display for EffortTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "acceleration  MiB/s (1 core)  stored/logical  records compressed")?;
        for r in &self.0 {
            write!(
                f,
                "\n{:>12}  {:>14.0}  {:>14.3}  {:>17.1}%",
                r.acceleration,
                r.mib_per_s,
                r.stored_ratio,
                r.compressed_fraction * 100.0
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_compress_random_does_not_and_bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample");
        let mut data = vec![0u8; 256 << 10];
        crate::bench::fill_random(&mut data[128 << 10..], 3);
        std::fs::write(&path, &data).unwrap();
        let rows = run(&path, u64::MAX, 64 << 10, 0.9, &[1, 8], 1).unwrap();
        assert_eq!(rows.len(), 2);
        for r in &rows {
            // Half the records are zeros (stored tiny), half random (stored raw).
            assert_eq!(r.compressed_fraction, 0.5, "{r:?}");
            assert!(r.stored_ratio > 0.5 && r.stored_ratio < 0.52, "{r:?}");
        }
        assert!(run(&path, 1000, 64 << 10, 0.9, &[1], 1).is_err(), "less than one record");
        assert!(run(&dir.path().join("missing"), u64::MAX, 64 << 10, 0.9, &[1], 1).is_err());
    }
}
