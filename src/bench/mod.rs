//! Benchmarks and load generators driven from the command line (`churnlog bench …`),
//! and the deterministic record contents shared by them and the crash tests.

pub mod compress;
pub mod device;
pub mod e2e;
pub mod image;
pub mod ingest;
pub mod recover;

/// Deterministic contents of record `seq` of stream `stream`: a test can recompute what a
/// (killed) producer wrote. `compressible` in 0..=1 is the fraction of each 256-byte run
/// that is zeros.
pub fn record_bytes(stream: u32, seq: u64, len: usize, compressible: f64, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(len);
    let mut x = (u64::from(stream) << 40) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let zeros = (256.0 * compressible.clamp(0.0, 1.0)) as usize;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let run = (len - out.len()).min(256);
        let random = run.saturating_sub(zeros);
        let bytes = x.to_le_bytes();
        for i in 0..random {
            out.push(bytes[i % 8] ^ (i as u8).wrapping_mul(31) ^ (x >> (i % 56)) as u8);
        }
        out.resize(out.len() + (run - random), 0);
    }
}

/// Fills `buf` with deterministic pseudo-random bytes (xorshift64), fast enough for
/// multi-GiB test images.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// A record length between `min` and `max` chosen by (stream, seq), deterministically.
pub fn record_len(stream: u32, seq: u64, min: usize, max: usize) -> usize {
    let h = (u64::from(stream).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 17;
    min + (h as usize) % (max - min + 1)
}

/// Percentile (0..=100) of a sorted slice.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
