//! Benchmarks and load generators driven from the command line (`churnlog bench …`),
//! and the deterministic record contents shared by them and the crash tests.

pub mod capture;
pub mod compress;
pub mod device;
pub mod e2e;
pub mod image;
pub mod ingest;
pub mod recover;
pub mod resync;

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

/// CPU time (user + system, every thread) this process has used so far, in seconds;
/// None where /proc is unavailable. Resolution: one clock tick (10 ms).
pub fn process_cpu_seconds() -> Option<f64> {
    let ticks = cpu_ticks_from_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// utime + stime from a `/proc/<pid>/stat` line. The command name is in parentheses and
/// may itself hold spaces or ')', so fields are counted from the last ')': the first
/// token after it is field 3 (state), making utime (field 14) and stime (15) tokens 11, 12.
fn cpu_ticks_from_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Percentile (0..=100) of a sorted slice.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (churn (log) x) S 1 4242 4242 0 -1 4194304 9 0 0 0 250 75 0 0 20 0 66 0 12345 1000 10 18446744073709551615";
        assert_eq!(cpu_ticks_from_stat(line), Some(325));
        assert_eq!(cpu_ticks_from_stat("4242 (x) S 1 2"), None, "a short line is not misread");
        assert_eq!(cpu_ticks_from_stat("no parenthesis here"), None);
    }

    #[test]
    fn own_cpu_time_is_readable_and_never_goes_backwards() {
        let before = process_cpu_seconds().expect("/proc/self/stat is readable on Linux");
        let mut x = 1u64;
        for i in 0..10_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        let after = process_cpu_seconds().unwrap();
        assert!(before >= 0.0 && after >= before, "{before} then {after}");
    }
}
