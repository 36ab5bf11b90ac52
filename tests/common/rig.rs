//! An in-process process server (cache, TLS ingest, drain) for end-to-end tests, and
//! disk-image helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use churnlog::agent::{Agent, AgentConfig};
use churnlog::cache::Cache;
use churnlog::ingest::IngestConfig;
use churnlog::process_server::{ProcessServer, ProcessServerConfig};
use churnlog::store::Target;

pub const PASSPHRASE: &str = "a registration passphrase";

/// A running [`ProcessServer`] in a temporary directory.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub server: ProcessServer,
    /// The server's cache (a second handle, dropped by `stop`).
    pub cache: Arc<Cache>,
    pub target: Target,
}

impl Rig {
    pub async fn start(idle_timeout: Duration) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("store").display());
        Rig::start_with(dir, &url, idle_timeout).await
    }

    /// A rig draining to `url` (file://, az://, s3://).
    pub async fn start_with(dir: tempfile::TempDir, url: &str, idle_timeout: Duration) -> Rig {
        let mut ingest = IngestConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("tls"), PASSPHRASE);
        ingest.idle_timeout = idle_timeout;
        ingest.handshake_timeout = Duration::from_secs(5);
        let target = Target::from_url(url, None).unwrap();
        let mut cfg = ProcessServerConfig::new(dir.path().join("cache"), 1 << 30, ingest, target.clone());
        cfg.cache.segment_size = 16 << 20;
        // The engine's own tail cache: these tests read back what the drain needs.
        cfg.cache.tail_cache_bytes = churnlog::cache::Options::default().tail_cache_bytes;
        let server = ProcessServer::start(cfg).await.unwrap();
        let cache = server.cache().clone();
        Rig { dir, server, cache, target }
    }

    pub fn agent(&self, machine: &str, disks: Vec<(String, PathBuf)>) -> Agent {
        let cfg =
            AgentConfig::new(self.server.local_addr.to_string(), self.server.cert_pem.clone(), machine.into(), disks);
        Agent::new(cfg, PASSPHRASE).unwrap()
    }

    /// Stops the drain (records stay in the cache until `start_drain`).
    pub async fn stop_drain(&mut self) {
        self.server.pause_drain().await.unwrap();
    }

    pub fn start_drain(&mut self) {
        self.server.resume_drain();
    }

    /// Stops the server and closes its cache: fails if anything (a session, its
    /// acknowledger, the drain) still holds the cache once stopped.
    pub async fn stop(self) {
        let Rig { dir, server, cache, .. } = self;
        drop(cache);
        server.stop().await.expect("the process server stops cleanly and closes its cache");
        drop(dir);
    }
}

pub use churnlog::bench::fill_random as fill;

pub fn image(path: &Path, size: usize, seed: u64) {
    let mut data = vec![0u8; size];
    for (i, region) in data.chunks_mut(256 << 10).enumerate() {
        if i % 3 != 2 {
            fill(region, seed + i as u64);
        }
    }
    std::fs::write(path, data).unwrap();
}

/// Overwrites `n` 64 KiB blocks (every third with zeros), and grows nothing.
pub fn churn(path: &Path, n: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / (64 << 10);
    let mut block = vec![0u8; 64 << 10];
    for i in 0..n {
        let b = (seed.wrapping_mul(31) + i * 7919) % blocks;
        if i % 3 == 0 {
            block.fill(0);
        } else {
            fill(&mut block, seed ^ i);
        }
        f.write_all_at(&block, b * (64 << 10)).unwrap();
    }
}
