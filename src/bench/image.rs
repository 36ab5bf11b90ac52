//! Generated disk images and churn for the end-to-end demo and benchmark.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::fill_random as fill;

/// Zeros the second half of every 256 bytes: about 2:1 for LZ4.
fn make_compressible(buf: &mut [u8]) {
    for run in buf.chunks_mut(256) {
        let half = run.len() / 2;
        run[half..].fill(0);
    }
}

/// A disk image of `size` bytes: random blocks with every fourth 1 MiB region left zero;
/// with `compressible`, half of every 256 bytes is zeros (about 2:1 for LZ4). Written in
/// 1 MiB pieces and synced.
pub fn make_image(path: &Path, size: u64, seed: u64, compressible: bool) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    let mut region = vec![0u8; 1 << 20];
    let mut at = 0u64;
    let mut i = 0u64;
    while at < size {
        let n = (size - at).min(1 << 20) as usize;
        if i % 4 != 3 {
            fill(&mut region[..n], seed + i);
            if compressible {
                make_compressible(&mut region[..n]);
            }
        } else {
            region[..n].fill(0);
        }
        f.write_all(&region[..n])?;
        at += n as u64;
        i += 1;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Rewrites `blocks` pseudo-random 64 KiB blocks (every fifth with zeros; the others
/// random, or 2:1 compressible with `compressible`).
pub fn churn(path: &Path, blocks: usize, seed: u64, compressible: bool) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let count = f.metadata()?.len() / (64 << 10);
    let mut block = vec![0u8; 64 << 10];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..blocks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if i % 5 == 0 {
            block.fill(0);
        } else {
            fill(&mut block, x);
            if compressible {
                make_compressible(&mut block);
            }
        }
        f.write_all_at(&block, (x % count) * (64 << 10))?;
    }
    f.sync_all()
}

/// Whether two files hold the same bytes (read 1 MiB at a time).
pub fn same_contents(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let len = fa.metadata()?.len();
    if len != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(1 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], at)?;
        fb.read_exact_at(&mut bb[..n], at)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}
