//! Delta resync, the server's side: an agent that lost its block state (or kept it for
//! another history) asks for the hash of every block of what this server holds for a
//! disk, compares them with the disk and sends only the blocks that differ — instead of
//! a full copy.
//!
//! "What the server holds" is every record of the stream, uploaded, from its latest
//! resync base on: not just the last point, because records sent after it (a pass cut
//! short by a crash) are part of what the next point builds on, and a block they changed
//! must be compared with that content. So the answer waits until the drain has uploaded
//! everything the cache holds for the stream, rebuilds that image from the object store
//! into an unlinked scratch file (sparse: zero runs are holes) and hashes it block by
//! block, as the agent does (xxh3-128 over each block, the last one short).
//!
//! Whenever it cannot tell — no history in the store, a history with a gap, a drain that
//! does not catch up within [`HashSource::drain_wait_max`], a full copy the cache is
//! already asking for, no scratch space — it answers `HashesUnavailable` with the reason,
//! and the agent copies the disk in full: never a guess.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::cache::{Cache, StreamId};
use crate::protocol::codec::HASHES_PER_FRAME_MAX;
use crate::protocol::Frame;
use crate::store::Target;

/// Smallest block size a delta resync hashes.
pub const HASH_BLOCK_SIZE_MIN: u32 = 4096;
/// Largest block size a delta resync hashes.
pub const HASH_BLOCK_SIZE_MAX: u32 = 1 << 20;
/// Most blocks one answer describes (16 TiB at 64 KiB blocks: 4 GiB of hashes).
pub const HASH_BLOCKS_MAX: u64 = 1 << 28;

/// Where the answers come from.
#[derive(Clone, Debug)]
pub struct HashSource {
    /// The object store the drain writes to.
    pub target: Target,
    /// Where the rebuilt image is kept while it is hashed (an unlinked file, sparse; it
    /// needs room for the disk's data).
    pub scratch_dir: PathBuf,
    /// How long an answer waits for the drain to upload what the cache holds.
    pub drain_wait_max: Duration,
    /// Answers rebuilt at once, over all sessions (each costs a read of the disk's data
    /// from the store, its scratch space and a hashing core); the others wait their turn.
    pub concurrent: Arc<tokio::sync::Semaphore>,
}

/// How often a waiting agent hears `HashesPending` (well within its acknowledgement
/// timeout).
pub const PENDING_INTERVAL: Duration = Duration::from_secs(5);

/// How long an answer waits for its turn before giving up (the agent copies in full).
pub const SLOT_WAIT_MAX: Duration = Duration::from_secs(600);

/// Answers a server rebuilds at once by default.
pub const CONCURRENT_ANSWERS: usize = 2;

impl HashSource {
    pub fn new(target: Target) -> HashSource {
        HashSource {
            target,
            scratch_dir: std::env::temp_dir(),
            drain_wait_max: Duration::from_secs(120),
            concurrent: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_ANSWERS)),
        }
    }
}

/// Answers one `HashesRequest` on `out`: `Hashes` frames then `HashesEnd`, or
/// `HashesUnavailable`.
pub(super) async fn answer(
    source: HashSource,
    cache: Arc<Cache>,
    stream: StreamId,
    disk: u16,
    size_bytes: u64,
    block_size: u32,
    out: mpsc::Sender<Frame>,
) {
    let started = Instant::now();
    let work = send_hashes(&source, &cache, stream, disk, size_bytes, block_size, &out);
    tokio::pin!(work);
    // Tell the waiting agent the answer is on its way, however long the rebuild takes.
    let mut pending = tokio::time::interval(PENDING_INTERVAL);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = pending.tick() => {
                if out.send(Frame::HashesPending { disk }).await.is_err() {
                    return;
                }
            }
        }
    };
    let frame = match result {
        Ok((blocks, head_seq)) => {
            tracing::info!(
                disk,
                blocks,
                head_seq,
                seconds = started.elapsed().as_secs_f64(),
                "delta resync: block hashes sent"
            );
            Frame::HashesEnd { disk, blocks, head_seq }
        }
        Err(reason) => {
            tracing::info!(disk, %reason, "delta resync: no block hashes, the agent copies the disk in full");
            Frame::HashesUnavailable { disk, reason }
        }
    };
    let _ = out.send(frame).await;
}

async fn send_hashes(
    source: &HashSource,
    cache: &Cache,
    stream: StreamId,
    disk: u16,
    size_bytes: u64,
    block_size: u32,
    out: &mpsc::Sender<Frame>,
) -> Result<(u64, u64), String> {
    if !block_size.is_power_of_two() || !(HASH_BLOCK_SIZE_MIN..=HASH_BLOCK_SIZE_MAX).contains(&block_size) {
        return Err(format!(
            "block size {block_size}: a power of two in {HASH_BLOCK_SIZE_MIN}..={HASH_BLOCK_SIZE_MAX} expected"
        ));
    }
    let blocks = size_bytes.div_ceil(block_size as u64);
    if blocks > HASH_BLOCKS_MAX {
        return Err(format!("{blocks} blocks: more than the {HASH_BLOCKS_MAX} one answer describes"));
    }
    let _turn = match tokio::time::timeout(SLOT_WAIT_MAX, source.concurrent.acquire()).await {
        Ok(permit) => permit.map_err(|_| "the server is stopping")?,
        Err(_) => return Err(format!("other delta resyncs kept this server busy for {SLOT_WAIT_MAX:?}")),
    };
    // Everything the cache holds for the stream must be in the store first.
    let deadline = Instant::now() + source.drain_wait_max;
    let info = loop {
        let info = cache.stream_info(stream).ok_or("the stream is gone from the cache")?;
        if info.resync_required {
            return Err("records of this disk were dropped before upload: a full copy is required".into());
        }
        if info.uploaded_upto >= info.durable_upto {
            break info;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the drain did not upload the cached records {}..={} within {:?}",
                info.uploaded_upto + 1,
                info.durable_upto,
                source.drain_wait_max
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let scratch = tempfile::tempfile_in(&source.scratch_dir)
        .map_err(|e| format!("scratch file in {}: {e}", source.scratch_dir.display()))?;
    let head = crate::restore::rebuild_head(
        &source.target,
        &info.machine,
        &info.disk,
        cache.cache_id(),
        size_bytes,
        &scratch,
        &source.scratch_dir,
    )
    .await
    .map_err(|e| e.to_string())?
    .ok_or("no history of this disk in the object store")?;
    let scratch = Arc::new(scratch);
    let mut first = 0u64;
    while first < blocks {
        let n = (blocks - first).min(HASHES_PER_FRAME_MAX as u64);
        let file = scratch.clone();
        let hashes = tokio::task::spawn_blocking(move || hash_blocks(&file, first, n, block_size, size_bytes))
            .await
            .map_err(|e| format!("hashing: {e}"))?
            .map_err(|e| format!("reading the scratch image: {e}"))?;
        debug_assert_eq!(hashes.len() as u64, n);
        out.send(Frame::Hashes { disk, first_block: first, hashes }).await.map_err(|_| "the session ended")?;
        first += n;
    }
    // A record appended meanwhile (a superseded session's last one, between its check and
    // its append) is not in the image: then the answer is void.
    let now = cache.stream_info(stream).ok_or("the stream is gone from the cache")?;
    if now.durable_upto != info.durable_upto || now.resync_required {
        return Err("the stream changed while the answer was prepared".into());
    }
    Ok((blocks, head))
}

/// The xxh3-128 hashes of blocks `first..first + n` of the image (the last one short).
/// Ranges the file holds as holes (most of a rebuilt image whose disk is mostly unused)
/// hash as zeros without being read.
fn hash_blocks(file: &std::fs::File, first: u64, n: u64, block_size: u32, size: u64) -> std::io::Result<Vec<u128>> {
    let bs = block_size as u64;
    let chunk_blocks = ((1u64 << 20) / bs).max(1);
    let mut buf = vec![0u8; (chunk_blocks * bs) as usize];
    let zero_block = xxhash_rust::xxh3::xxh3_128(&vec![0u8; bs as usize]);
    let mut hashes = Vec::with_capacity(n as usize);
    let mut b = first;
    while b < first + n {
        let offset = b * bs;
        let take = (first + n - b).min(chunk_blocks);
        let len = ((take * bs).min(size - offset)) as usize;
        if next_data(file, offset)?.is_none_or(|data| data >= offset + len as u64) {
            // A hole: full blocks of zeros, and the image's short last block if in range.
            let full = len as u64 / bs;
            hashes.extend(std::iter::repeat_n(zero_block, full as usize));
            if !(len as u64).is_multiple_of(bs) {
                hashes.push(xxhash_rust::xxh3::xxh3_128(&vec![0u8; (len as u64 % bs) as usize]));
            }
        } else {
            file.read_exact_at(&mut buf[..len], offset)?;
            hashes.extend(buf[..len].chunks(bs as usize).map(xxhash_rust::xxh3::xxh3_128));
        }
        b += take;
    }
    Ok(hashes)
}

/// Where the file's next data at or after `offset` begins (`SEEK_DATA`); `None` when
/// only a hole follows. A file system without `SEEK_DATA` reports data everywhere.
fn next_data(file: &std::fs::File, offset: u64) -> std::io::Result<Option<u64>> {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
        Ok(at) => Ok(Some(at)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(Some(offset)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_hash_as_zeros_without_changing_any_hash() {
        let bs = 64u64 << 10;
        let size = 40 * bs + 1000; // a short last block
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        file.write_all_at(&[7u8; 5000], 3 * bs + 10).unwrap();
        file.write_all_at(&[9u8; 100], 39 * bs + 500).unwrap(); // data near the end
        file.write_all_at(&[0u8; 4096], 20 * bs).unwrap(); // written zeros: data, not a hole
        let mut image = vec![0u8; size as usize];
        file.read_exact_at(&mut image, 0).unwrap();
        let want: Vec<u128> = image.chunks(bs as usize).map(xxhash_rust::xxh3::xxh3_128).collect();
        assert_eq!(want.len(), 41);
        // Whole, and in pieces that start and end anywhere.
        assert_eq!(hash_blocks(&file, 0, 41, bs as u32, size).unwrap(), want);
        for (first, n) in [(0, 3), (3, 1), (4, 30), (34, 7), (40, 1)] {
            let got = hash_blocks(&file, first, n, bs as u32, size).unwrap();
            assert_eq!(got, want[first as usize..(first + n) as usize], "blocks {first}+{n}");
        }
        // Where the file system keeps holes (ext4, xfs, tmpfs), the gap is skipped; one
        // without SEEK_DATA reports data at once (and every block is read).
        let next = next_data(&file, 5 * bs).unwrap();
        assert!(next == Some(20 * bs) || next == Some(5 * bs), "{next:?}");
        assert_eq!(next_data(&file, 39 * bs + 4096).unwrap(), None, "only a hole after the last data");
    }
}
