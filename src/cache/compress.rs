//! Per-record encoding done by the producer, outside the writer's critical section:
//! adaptive LZ4 (kept only when it pays) and the payload CRC. Scratch space is
//! thread-local, so the hot path allocates nothing once warm.
//!
//! Encoding uses liblz4 (crate `lz4`), because its `LZ4_compress_fast` takes an
//! acceleration (see [`super::effort`]); lz4_flex has none. Both write the same LZ4 block
//! format. Decoding uses lz4_flex's checked decoder: it reads bytes that may be corrupt.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use super::format::{crc32, Codec};

/// Bytes of a large record compressed first, as a cheap test of compressibility.
const SAMPLE_LEN: usize = 4096;
/// Records at least this long are sampled before being compressed whole.
const SAMPLE_FROM_LEN: usize = 4 * SAMPLE_LEN;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// LZ4 block of `src` into `out` at `acceleration` (1 = standard LZ4); None when it does
/// not fit in `out`.
fn lz4_block(src: &[u8], acceleration: u32, out: &mut [u8]) -> Option<usize> {
    let mode = lz4::block::CompressionMode::FAST(acceleration.clamp(1, super::effort::LZ4_ACCELERATION_CAP) as i32);
    lz4::block::compress_to_buffer(src, Some(mode), false, out).ok().filter(|&n| n > 0)
}

/// Slots of [`CompressHints`]; streams beyond it share slots (a shared slot only makes
/// the hint less often right).
const HINT_SLOTS: usize = 4096;

/// Per stream, whether its last record was stored compressed. A stream whose data
/// compressed a moment ago most likely still does, so its next record skips the
/// sample and is compressed whole at once: the sample would cost a sixteenth of the
/// compression work of a 64 KiB record (and one more clearing of LZ4's 16 KiB table)
/// for nothing. When the hint is wrong, one record is compressed whole in vain and the
/// hint is cleared. A hinted record whose first 4 KiB do not compress but whose whole
/// does is stored compressed where the sample would have kept it raw; either way it is
/// kept only within `ratio_max`, and what a read returns never depends on the hint.
pub(crate) struct CompressHints {
    last_compressed: Box<[AtomicBool]>,
}

impl CompressHints {
    pub fn new() -> CompressHints {
        CompressHints { last_compressed: (0..HINT_SLOTS).map(|_| AtomicBool::new(false)).collect() }
    }

    fn slot(&self, stream: u32) -> &AtomicBool {
        &self.last_compressed[stream as usize % HINT_SLOTS]
    }

    pub fn last_compressed(&self, stream: u32) -> bool {
        self.slot(stream).load(Ordering::Relaxed)
    }

    pub fn record(&self, stream: u32, codec: Codec) {
        let compressed = codec == Codec::Lz4;
        // Read first: a shared cache line is written only when the answer changes.
        if self.slot(stream).load(Ordering::Relaxed) != compressed {
            self.slot(stream).store(compressed, Ordering::Relaxed);
        }
    }
}

/// Encodes `data` and hands `(codec, stored bytes, payload crc)` to `f`. Compression is
/// kept only when the result is at most `ratio_max` of the input (0 disables it).
pub fn encode_with<R>(data: &[u8], ratio_max: f64, acceleration: u32, f: impl FnOnce(Codec, &[u8], u32) -> R) -> R {
    encode_hinted(data, ratio_max, acceleration, false, f)
}

/// [`encode_with`], told whether the stream's previous record compressed: if it did, the
/// sample that screens out incompressible data is skipped.
pub fn encode_hinted<R>(
    data: &[u8],
    ratio_max: f64,
    acceleration: u32,
    last_compressed: bool,
    f: impl FnOnce(Codec, &[u8], u32) -> R,
) -> R {
    if ratio_max <= 0.0 || data.len() < 64 {
        return f(Codec::Raw, data, crc32(data));
    }
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let need = lz4_flex::block::get_maximum_output_size(data.len());
        if scratch.len() < need {
            scratch.resize(need, 0);
        }
        if data.len() >= SAMPLE_FROM_LEN && !last_compressed {
            let sample = &data[..SAMPLE_LEN];
            let n = lz4_block(sample, acceleration, &mut scratch[..]).unwrap_or(usize::MAX);
            if n as f64 > SAMPLE_LEN as f64 * ratio_max {
                return f(Codec::Raw, data, crc32(data));
            }
        }
        match lz4_block(data, acceleration, &mut scratch[..]) {
            Some(n) if (n as f64) <= data.len() as f64 * ratio_max && n < data.len() => {
                let stored = &scratch[..n];
                f(Codec::Lz4, stored, crc32(stored))
            }
            _ => f(Codec::Raw, data, crc32(data)),
        }
    })
}

/// Decodes a stored payload into `out` (cleared first), checking the logical length.
pub fn decode_into(codec: Codec, stored: &[u8], logical_len: usize, out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    match codec {
        Codec::Raw => {
            if stored.len() != logical_len {
                return Err(format!("raw length {} != logical length {logical_len}", stored.len()));
            }
            out.extend_from_slice(stored);
        }
        Codec::Lz4 => {
            out.resize(logical_len, 0);
            let n = lz4_flex::block::decompress_into(stored, out).map_err(|e| format!("lz4: {e}"))?;
            if n != logical_len {
                return Err(format!("lz4 produced {n} bytes, expected {logical_len}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode_round_trips(
            data in proptest::collection::vec(any::<u8>(), 1..40_000),
            zeros in any::<bool>(),
            acceleration in prop_oneof![Just(1u32), 2u32..=64, Just(0u32), Just(u32::MAX)],
            last_compressed in any::<bool>(),
        ) {
            // liblz4 encodes at any acceleration; lz4_flex must decode every one of them.
            let data: Vec<u8> = if zeros { data.iter().map(|b| b & 3).collect() } else { data };
            let (codec, stored, crc) =
                encode_hinted(&data, 0.9, acceleration, last_compressed, |c, s, crc| (c, s.to_vec(), crc));
            prop_assert_eq!(crc, crc32(&stored));
            let mut out = Vec::new();
            decode_into(codec, &stored, data.len(), &mut out).unwrap();
            prop_assert_eq!(out, data);
        }
    }

    /// Incompressible bytes (xorshift64, one byte per step).
    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_data_is_compressed_and_random_is_not() {
        let zeros = vec![0u8; 65536];
        let codec = encode_with(&zeros, 0.9, 1, |c, s, _| {
            assert!(s.len() < 1000);
            c
        });
        assert_eq!(codec, Codec::Lz4);
        let random = random_bytes(1, 65536);
        assert_eq!(encode_with(&random, 0.9, 1, |c, _, _| c), Codec::Raw);
        assert_eq!(encode_with(&random, 0.9, 64, |c, _, _| c), Codec::Raw);
    }

    #[test]
    fn a_compressed_stream_skips_the_sample() {
        // Random first 4 KiB (the sample), zeros after: compressible as a whole.
        let mut data = random_bytes(3, SAMPLE_LEN);
        data.resize(65536, 0);
        // Screened by the sample: kept raw although it would compress.
        assert_eq!(encode_hinted(&data, 0.9, 1, false, |c, _, _| c), Codec::Raw);
        // Hinted: the sample is skipped and the whole record is compressed.
        let (codec, stored) = encode_hinted(&data, 0.9, 1, true, |c, s, _| (c, s.to_vec()));
        assert_eq!(codec, Codec::Lz4);
        let mut out = Vec::new();
        decode_into(codec, &stored, data.len(), &mut out).unwrap();
        assert_eq!(out, data);

        let hints = CompressHints::new();
        assert!(!hints.last_compressed(7));
        hints.record(7, Codec::Lz4);
        assert!(hints.last_compressed(7) && !hints.last_compressed(8));
        hints.record(7, Codec::Raw);
        assert!(!hints.last_compressed(7));
    }

    #[test]
    fn higher_acceleration_trades_a_little_ratio_and_never_correctness() {
        // Text-like data: words from a small vocabulary with varying separators.
        let words = ["cache", "segment", "batch", "record", "stream", "drain", "upload", "seal"];
        let mut x = 7u64;
        let mut text = Vec::new();
        while text.len() < 65536 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.extend_from_slice(words[(x % 8) as usize].as_bytes());
            text.push(b" ,.;\n"[(x >> 8) as usize % 5]);
        }
        text.truncate(65536);
        let size_at = |acceleration| encode_with(&text, 0.9, acceleration, |c, s, _| (c, s.len()));
        let (codec1, len1) = size_at(1);
        let (codec16, len16) = size_at(16);
        assert_eq!((codec1, codec16), (Codec::Lz4, Codec::Lz4));
        assert!(len1 <= len16, "acceleration 1 gave {len1} bytes, 16 gave {len16}");
        for acceleration in [1, 16] {
            let (codec, stored) = encode_with(&text, 0.9, acceleration, |c, s, _| (c, s.to_vec()));
            let mut out = Vec::new();
            decode_into(codec, &stored, text.len(), &mut out).unwrap();
            assert_eq!(out, text);
        }
    }
}
