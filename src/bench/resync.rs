//! `churnlog bench resync`: what an agent restart costs, with and without its state
//! directory. A process server runs in this process (file:// store); one image of
//! `image_bytes` is copied in full once, then twice `changed_percent` % of its 64 KiB
//! blocks (spread evenly) are overwritten and a fresh agent passes over it:
//!
//! 1. with the state directory of the previous pass (only the changed blocks go);
//! 2. with the state directory deleted: a **delta resync** (the server rebuilds the
//!    disk from the object store, hashes it and the agent sends what differs).
//!
//! Each row: seconds for the pass (the delta row includes the server's rebuild and
//! hashing), bytes sent, and the ratio of bytes sent to bytes changed (the first row's
//! is the full copy's, over the whole image).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::agent::{Agent, AgentConfig, PassReport};
use crate::ingest::IngestConfig;
use crate::process_server::{ProcessServer, ProcessServerConfig};
use crate::protocol::PointKind;
use crate::store::Target;

const BLOCK: u64 = 64 << 10;

#[derive(Clone, Debug)]
pub struct ResyncParams {
    pub dir: PathBuf,
    pub image_bytes: u64,
    pub changed_percent: f64,
    /// Fraction of each 256 bytes of the image that is zeros (0 = incompressible).
    pub compressible: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ResyncRow {
    pub pass: &'static str,
    pub seconds: f64,
    pub bytes_sent: u64,
    pub bytes_changed: u64,
    /// Bytes sent over bytes changed (the goal: at most 1.05).
    pub sent_per_changed: f64,
    pub full_copies: u64,
    pub delta_resyncs: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct ResyncResult {
    pub image_mib: u64,
    pub changed_percent: f64,
    pub rows: Vec<ResyncRow>,
}

impl std::fmt::Display for ResyncResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "agent restart: {} MiB image, {} % of its blocks changed before each restart",
            self.image_mib, self.changed_percent
        )?;
        let full = self.rows.first().map_or(0.0, |r| r.seconds);
        for r in &self.rows {
            writeln!(
                f,
                "  {:<28} {:>7.2} s ({:.2}x the full copy's time), sent {:>12} bytes for {:>12} changed = {:.3}x (full copies {}, delta resyncs {})",
                r.pass,
                r.seconds,
                r.seconds / full.max(1e-9),
                r.bytes_sent,
                r.bytes_changed,
                r.sent_per_changed,
                r.full_copies,
                r.delta_resyncs
            )?;
        }
        Ok(())
    }
}

/// Overwrites every `stride`-th block from `first` with fresh data; returns bytes changed.
fn change(img: &std::path::Path, blocks: u64, stride: u64, first: u64, seed: u64) -> std::io::Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(img)?;
    let mut data = Vec::new();
    let mut changed = 0;
    let mut b = first;
    while b < blocks {
        super::record_bytes(7, seed.wrapping_mul(1 << 32) + b, BLOCK as usize, 0.0, &mut data);
        f.write_all_at(&data, b * BLOCK)?;
        changed += BLOCK;
        b += stride;
    }
    f.sync_all()?;
    Ok(changed)
}

fn row(pass: &'static str, r: &PassReport, bytes_changed: u64) -> ResyncRow {
    ResyncRow {
        pass,
        seconds: r.seconds,
        bytes_sent: r.bytes_sent,
        bytes_changed,
        sent_per_changed: r.bytes_sent as f64 / bytes_changed.max(1) as f64,
        full_copies: r.full_copies,
        delta_resyncs: r.delta_resyncs,
    }
}

pub async fn run(p: &ResyncParams) -> anyhow::Result<ResyncResult> {
    anyhow::ensure!(
        p.image_bytes >= 16 * BLOCK && p.image_bytes.is_multiple_of(BLOCK),
        "the image is whole 64 KiB blocks, at least 16"
    );
    anyhow::ensure!(p.changed_percent > 0.0 && p.changed_percent <= 50.0, "the changed share is in (0, 50] %");
    std::fs::create_dir_all(&p.dir)?;
    let dir = std::fs::canonicalize(&p.dir)?;
    let passphrase = "bench resync";
    let target = Target::from_url(&format!("file://{}", dir.join("store").display()), None)?;
    let ingest = IngestConfig::new("127.0.0.1:0".parse()?, dir.join("tls"), passphrase);
    let mut cfg = ProcessServerConfig::new(dir.join("cache"), (p.image_bytes * 4).max(4 << 30), ingest, target);
    cfg.cache.segment_size = 64 << 20;
    let server = ProcessServer::start(cfg).await?;

    let img = dir.join("disk.img");
    let blocks = p.image_bytes / BLOCK;
    {
        let f = std::fs::File::create(&img)?;
        let mut data = Vec::new();
        for b in 0..blocks {
            super::record_bytes(1, b, BLOCK as usize, p.compressible, &mut data);
            f.write_all_at(&data, b * BLOCK)?;
        }
        f.sync_all()?;
    }
    let state = dir.join("state");
    let agent = || {
        let mut cfg = AgentConfig::new(
            server.local_addr.to_string(),
            server.cert_pem.clone(),
            "bench-resync".into(),
            vec![("disk0".into(), img.clone())],
        );
        cfg.state_dir = Some(state.clone());
        Agent::new(cfg, passphrase)
    };
    let pass = |mut a: Agent| async move { a.pass(PointKind::CrashConsistent, true, |_, _| {}).await };
    let stride = ((100.0 / p.changed_percent).round() as u64).max(2);
    let mut rows = Vec::new();
    let full = pass(agent()?).await?;
    rows.push(row("first pass (full copy)", &full, p.image_bytes));
    let changed = change(&img, blocks, stride, 1, 1)?;
    let restart = pass(agent()?).await?;
    rows.push(row("restart with --state-dir", &restart, changed));
    let changed = change(&img, blocks, stride, stride / 2, 2)?;
    std::fs::remove_dir_all(&state)?;
    let delta = pass(agent()?).await?;
    rows.push(row("restart, state deleted", &delta, changed));
    server.stop().await?;
    Ok(ResyncResult { image_mib: p.image_bytes >> 20, changed_percent: p.changed_percent, rows })
}
