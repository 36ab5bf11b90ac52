//! An in-process process server (cache, TLS ingest, drain) for end-to-end tests, and
//! disk-image helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use churnlog::agent::{Agent, AgentConfig};
use churnlog::cache::{Cache, Options};
use churnlog::drain::{DrainConfig, Drainer, Target};
use churnlog::ingest::{IngestConfig, IngestServer};

pub const PASSPHRASE: &str = "a registration passphrase";

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub cache: Arc<Cache>,
    pub server: IngestServer,
    pub target: Target,
    stop: tokio::sync::watch::Sender<bool>,
    drainer: tokio::task::JoinHandle<()>,
}

impl Rig {
    pub async fn start(idle_timeout: Duration) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("store").display());
        Rig::start_with(dir, &url, idle_timeout).await
    }

    /// A rig draining to `url` (file://, az://, s3://).
    pub async fn start_with(dir: tempfile::TempDir, url: &str, idle_timeout: Duration) -> Rig {
        let opts = Options {
            capacity_bytes: 1 << 30,
            segment_size: 16 << 20,
            record_size_max: churnlog::protocol::RECORD_BYTES_MAX as u32,
            ..Options::default()
        };
        let cache = Arc::new(Cache::open(dir.path().join("cache"), opts).unwrap());
        let mut cfg = IngestConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("tls"), PASSPHRASE);
        cfg.idle_timeout = idle_timeout;
        cfg.handshake_timeout = Duration::from_secs(5);
        let server = IngestServer::start(cache.clone(), cfg).await.unwrap();
        let target = Target::from_url(url, None).unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let drainer = tokio::spawn(Drainer::new(cache.clone(), target.clone(), DrainConfig::default()).run(stopped));
        Rig { dir, cache, server, target, stop, drainer }
    }

    pub fn agent(&self, machine: &str, disks: Vec<(String, PathBuf)>) -> Agent {
        let cfg =
            AgentConfig::new(self.server.local_addr.to_string(), self.server.cert_pem.clone(), machine.into(), disks);
        Agent::new(cfg, PASSPHRASE).unwrap()
    }

    /// Stops the drain (records stay in the cache until `start_drain`).
    pub async fn stop_drain(&mut self) {
        let _ = self.stop.send(true);
        (&mut self.drainer).await.unwrap();
    }

    pub fn start_drain(&mut self) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        self.stop = stop;
        self.drainer =
            tokio::spawn(Drainer::new(self.cache.clone(), self.target.clone(), DrainConfig::default()).run(stopped));
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.drainer.await;
        self.server.stop().await;
        // Once stopped, neither the server nor its sessions (their acknowledgers included)
        // may still hold the cache: its owner closes it right after.
        assert_eq!(Arc::strong_count(&self.cache), 1, "a stopped server or drain still holds the cache");
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
