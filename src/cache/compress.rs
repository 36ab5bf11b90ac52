//! Per-record encoding done by the producer, outside the writer's critical section:
//! adaptive LZ4 (kept only when it pays) and the payload CRC. Scratch space is
//! thread-local, so the hot path allocates nothing once warm.

use std::cell::RefCell;

use super::format::{crc32, Codec};

/// Bytes of a large record compressed first, as a cheap test of compressibility.
const SAMPLE_LEN: usize = 4096;
/// Records at least this long are sampled before being compressed whole.
const SAMPLE_FROM_LEN: usize = 4 * SAMPLE_LEN;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes `data` and hands `(codec, stored bytes, payload crc)` to `f`. Compression is
/// kept only when the result is at most `ratio_max` of the input (0 disables it).
pub fn encode_with<R>(data: &[u8], ratio_max: f64, f: impl FnOnce(Codec, &[u8], u32) -> R) -> R {
    if ratio_max <= 0.0 || data.len() < 64 {
        return f(Codec::Raw, data, crc32(data));
    }
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let need = lz4_flex::block::get_maximum_output_size(data.len());
        if scratch.len() < need {
            scratch.resize(need, 0);
        }
        if data.len() >= SAMPLE_FROM_LEN {
            let sample = &data[..SAMPLE_LEN];
            let n = lz4_flex::block::compress_into(sample, &mut scratch[..]).unwrap_or(usize::MAX);
            if n as f64 > SAMPLE_LEN as f64 * ratio_max {
                return f(Codec::Raw, data, crc32(data));
            }
        }
        match lz4_flex::block::compress_into(data, &mut scratch[..]) {
            Ok(n) if (n as f64) <= data.len() as f64 * ratio_max && n < data.len() => {
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
        fn encode_decode_round_trips(data in proptest::collection::vec(any::<u8>(), 1..40_000), zeros in any::<bool>()) {
            let data: Vec<u8> = if zeros { data.iter().map(|b| b & 3).collect() } else { data };
            let (codec, stored, crc) = encode_with(&data, 0.9, |c, s, crc| (c, s.to_vec(), crc));
            prop_assert_eq!(crc, crc32(&stored));
            let mut out = Vec::new();
            decode_into(codec, &stored, data.len(), &mut out).unwrap();
            prop_assert_eq!(out, data);
        }
    }

    #[test]
    fn compressible_data_is_compressed_and_random_is_not() {
        let zeros = vec![0u8; 65536];
        let codec = encode_with(&zeros, 0.9, |c, s, _| {
            assert!(s.len() < 1000);
            c
        });
        assert_eq!(codec, Codec::Lz4);
        let mut x = 1u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(encode_with(&random, 0.9, |c, _, _| c), Codec::Raw);
    }
}
