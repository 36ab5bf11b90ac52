//! `churnlog bench e2e`: the whole data path in one process on loopback — agent, TLS
//! ingest, cache, drain to a local-directory target, restore — timed phase by phase. The
//! initial copy and each churn pass count from the first block read until everything the
//! pass sent is uploaded (and acknowledged to the cache), so ingest and drain must both
//! keep up; the time to durable is reported beside it.

use std::path::PathBuf;
use std::time::Instant;

use super::image::{churn, make_image, same_contents};
use crate::agent::{Agent, AgentConfig};
use crate::cache::Cache;
use crate::drain::DrainConfig;
use crate::ingest::IngestConfig;
use crate::process_server::{ProcessServer, ProcessServerConfig};
use crate::protocol::PointKind;
use crate::restore::{restore, PointSelector};
use crate::store::Target;

#[derive(Clone, Debug)]
pub struct E2eParams {
    pub dir: PathBuf,
    pub image_bytes: u64,
    pub compressible: bool,
    /// Churn passes after the initial copy.
    pub churn_passes: usize,
    /// Fraction of the image's blocks rewritten before each churn pass.
    pub churn_fraction: f64,
    pub uploads_in_flight: usize,
    pub io_backend: crate::cache::IoBackend,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PhaseResult {
    /// Logical bytes sent (data blocks; zero runs are not counted).
    pub mib: f64,
    pub seconds: f64,
    pub mib_per_s: f64,
    /// Until the pass's point was durable in the cache (the rest is the drain's tail).
    pub durable_seconds: f64,
    /// Process CPU time ÷ wall time (2.0 = both cores of a 2-core machine busy).
    pub cpu_cores: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct E2eResult {
    pub image_mib: f64,
    pub compressible: bool,
    pub backend: &'static str,
    pub initial: PhaseResult,
    pub churn: Vec<PhaseResult>,
    pub churn_median_mib_per_s: f64,
    pub restore_mib_per_s: f64,
    pub restore_identical: bool,
}

/// CPU seconds used by this process so far (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based) of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// One pass: durable (agent returns), then uploaded (the cache has nothing left to drain).
async fn timed_pass(agent: &mut Agent, cache: &Cache) -> anyhow::Result<PhaseResult> {
    let (started, cpu_before) = (Instant::now(), cpu_seconds());
    let r = agent.pass(PointKind::CrashConsistent, false, |_, _| {}).await?;
    let durable_seconds = started.elapsed().as_secs_f64();
    while cache.streams().iter().any(|s| s.uploaded_upto < s.durable_upto) {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mib = r.bytes_sent as f64 / (1 << 20) as f64;
    Ok(PhaseResult {
        mib,
        seconds,
        mib_per_s: mib / seconds,
        durable_seconds,
        cpu_cores: (cpu_seconds() - cpu_before) / seconds,
    })
}

pub async fn run(p: &E2eParams) -> anyhow::Result<E2eResult> {
    std::fs::create_dir_all(&p.dir)?;
    // Absolute, because the drain's file:// target URL needs an absolute path.
    let dir = std::fs::canonicalize(&p.dir)?;
    let (cache_dir, store_dir, tls_dir) = (dir.join("cache"), dir.join("store"), dir.join("tls"));
    let image = dir.join("disk0.img");
    make_image(&image, p.image_bytes, 11, p.compressible)?;
    let passphrase = "bench e2e";
    let target = Target::from_url(&format!("file://{}", store_dir.display()), None)?;
    let mut cfg = ProcessServerConfig::new(
        cache_dir,
        (p.image_bytes * 2).max(1 << 30),
        IngestConfig::new("127.0.0.1:0".parse()?, tls_dir, passphrase),
        target.clone(),
    );
    cfg.cache.segment_size = 64 << 20;
    cfg.cache.io_backend = p.io_backend;
    cfg.drain = DrainConfig { uploads_in_flight: p.uploads_in_flight, ..DrainConfig::default() };
    let server = ProcessServer::start(cfg).await?;
    let cache = server.cache().clone();
    let backend = cache.backend_name();
    let agent_cfg = AgentConfig::new(
        server.local_addr.to_string(),
        server.cert_pem.clone(),
        "bench-vm".into(),
        vec![("disk0".into(), image.clone())],
    );
    let mut agent = Agent::new(agent_cfg, passphrase)?;

    let initial = timed_pass(&mut agent, &cache).await?;
    let blocks = (p.image_bytes / (64 << 10)) as usize;
    let mut churned = Vec::new();
    for i in 0..p.churn_passes {
        churn(&image, ((blocks as f64 * p.churn_fraction) as usize).max(1), 77 + i as u64, p.compressible)?;
        churned.push(timed_pass(&mut agent, &cache).await?);
    }
    let mut rates: Vec<f64> = churned.iter().map(|c| c.mib_per_s).collect();
    rates.sort_by(f64::total_cmp);
    let churn_median_mib_per_s = rates.get(rates.len() / 2).copied().unwrap_or(0.0);

    let out = dir.join("restored.img");
    let started = Instant::now();
    restore(&target, "bench-vm", "disk0", PointSelector::Latest, &out, |_, _| {}).await?;
    let restore_mib_per_s = p.image_bytes as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64();
    let restore_identical = same_contents(&out, &image)?;

    drop((agent, cache));
    server.stop().await?;
    Ok(E2eResult {
        image_mib: p.image_bytes as f64 / (1 << 20) as f64,
        compressible: p.compressible,
        backend,
        initial,
        churn: churned,
        churn_median_mib_per_s,
        restore_mib_per_s,
        restore_identical,
    })
}

impl std::fmt::Display for E2eResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "e2e {:.0} MiB image{} ({}): initial copy {:.0} MiB in {:.2} s = {:.0} MiB/s ({:.2} cores; durable after {:.2} s)",
            self.image_mib,
            if self.compressible { ", 2:1 compressible" } else { "" },
            self.backend,
            self.initial.mib,
            self.initial.seconds,
            self.initial.mib_per_s,
            self.initial.cpu_cores,
            self.initial.durable_seconds
        )?;
        for c in &self.churn {
            writeln!(
                f,
                "  churn pass: {:.0} MiB in {:.2} s = {:.0} MiB/s ({:.2} cores; durable after {:.2} s)",
                c.mib, c.seconds, c.mib_per_s, c.cpu_cores, c.durable_seconds
            )?;
        }
        write!(
            f,
            "  restore: {:.0} MiB/s of image, {}",
            self.restore_mib_per_s,
            if self.restore_identical { "byte-identical" } else { "DIFFERS" }
        )
    }
}
