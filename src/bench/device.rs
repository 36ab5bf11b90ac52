//! The device's own durable sequential write rate, measured the way `fio --direct=1
//! --bs=1M --rw=write --fdatasync=4` does: O_DIRECT 1 MiB writes from an aligned buffer,
//! an fdatasync every 4 MiB, into a preallocated file on the same file system.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use crate::cache::io::aligned::AlignedBuf;

/// Writes `bytes` (rounded up to MiB) to a scratch file in `dir`; returns MiB/s.
pub fn sequential_direct_mib_per_s(dir: &Path, bytes: u64) -> std::io::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(".churnlog-device-limit.bin");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(&path)?;
    let mib = bytes.div_ceil(1 << 20).max(4);
    let result = (|| {
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, mib << 20)?;
        let mut buf = AlignedBuf::with_capacity(1 << 20);
        buf.resize(1 << 20, 0);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let started = Instant::now();
        for i in 0..mib {
            file.write_all_at(&buf, i << 20)?;
            if (i + 1) % 4 == 0 {
                file.sync_data()?;
            }
        }
        file.sync_data()?;
        Ok(mib as f64 / started.elapsed().as_secs_f64())
    })();
    let _ = std::fs::remove_file(&path);
    result
}
