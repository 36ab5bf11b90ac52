//! `churnlog demo`: the whole data path on temporary directories and loopback. A process
//! server (TLS, cache, drain to a local-directory target), an agent replicating a
//! generated disk image through several rounds of churn and recovery points, and a
//! restore of every point compared byte for byte with the image as it was.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use churnlog::agent::{Agent, AgentConfig};
use churnlog::ingest::IngestConfig;
use churnlog::process_server::{ProcessServer, ProcessServerConfig};
use churnlog::protocol::PointKind;
use churnlog::restore::{restore, PointSelector};
use churnlog::size::parse_size;
use churnlog::store::Target;

/// The whole data path on loopback: process server, agent, churn, recovery points, drain
/// to a local directory, restore of every point, byte comparison.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Size of the generated disk image.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    image: u64,
    /// Rounds of churn (each ends with a recovery point).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Make the image about 2:1 compressible.
    #[arg(long)]
    compressible: bool,
    /// Keep everything in this directory instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let DemoArgs { image, rounds, compressible, dir } = args;
    let tmp = tempfile::tempdir()?;
    let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    println!("churnlog demo in {}", dir.display());
    let report = super::runtime()?
        .block_on(run_demo(&dir, image >> 20, rounds.max(1), compressible, |line| println!("  {line}")))?;
    let ok = report.points.iter().all(|p| p.identical);
    println!(
        "{} of {} recovery points restored byte-identical",
        report.points.iter().filter(|p| p.identical).count(),
        report.points.len()
    );
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoPoint {
    pub point_id: u64,
    pub blocks_sent: u64,
    pub mib_sent: f64,
    pub replicate_seconds: f64,
    pub restore_seconds: f64,
    pub identical: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoReport {
    pub image_mib: u64,
    pub points: Vec<DemoPoint>,
}

use churnlog::bench::image::{churn, make_image};

pub async fn run_demo(
    dir: &Path,
    image_mib: u64,
    rounds: usize,
    compressible: bool,
    mut say: impl FnMut(&str),
) -> anyhow::Result<DemoReport> {
    let (cache_dir, store_dir, tls_dir, work) =
        (dir.join("cache"), dir.join("store"), dir.join("tls"), dir.join("work"));
    std::fs::create_dir_all(&work)?;
    let passphrase = "demo passphrase: change me";
    let target = Target::from_url(&format!("file://{}", store_dir.display()), None)?;
    let mut cfg = ProcessServerConfig::new(
        cache_dir.clone(),
        2 << 30,
        IngestConfig::new("127.0.0.1:0".parse()?, tls_dir, passphrase),
        target.clone(),
    );
    cfg.cache.segment_size = 32 << 20;
    let server = ProcessServer::start(cfg).await?;
    say(&format!(
        "process server on {} (TLS, cache {}), draining to {}",
        server.local_addr,
        cache_dir.display(),
        target.url
    ));

    let image = work.join("disk0.img");
    make_image(&image, image_mib << 20, 7, compressible)?;
    let cfg = AgentConfig::new(
        server.local_addr.to_string(),
        server.cert_pem.clone(),
        "demo-vm".into(),
        vec![("disk0".into(), image.clone())],
    );
    let mut agent = Agent::new(cfg, passphrase)?;
    let mut snapshots = Vec::new();
    for round in 0..rounds {
        if round > 0 {
            churn(&image, (image_mib as usize * 16) / 10, 1000 + round as u64, compressible)?;
        }
        let r = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await?;
        let snap = work.join(format!("point-{}.img", r.point_id));
        std::fs::copy(&image, &snap)?;
        say(&format!(
            "point {}: {} blocks ({:.1} MiB) replicated and uploaded in {:.2} s ({:.0} MiB/s)",
            r.point_id,
            r.blocks_sent,
            r.bytes_sent as f64 / (1 << 20) as f64,
            r.seconds,
            r.bytes_sent as f64 / (1 << 20) as f64 / r.seconds
        ));
        snapshots.push((r, snap));
    }
    let mut points = Vec::new();
    for (r, snap) in &snapshots {
        let out = work.join(format!("restored-{}.img", r.point_id));
        let started = Instant::now();
        restore(&target, "demo-vm", "disk0", PointSelector::Id(r.point_id), &out, |_, _| {}).await?;
        let restore_seconds = started.elapsed().as_secs_f64();
        let identical = churnlog::bench::image::same_contents(&out, snap)?;
        say(&format!(
            "restore of point {}: {} in {:.2} s ({:.0} MiB/s of image)",
            r.point_id,
            if identical { "byte-identical" } else { "DIFFERS" },
            restore_seconds,
            image_mib as f64 / restore_seconds
        ));
        points.push(DemoPoint {
            point_id: r.point_id,
            blocks_sent: r.blocks_sent,
            mib_sent: r.bytes_sent as f64 / (1 << 20) as f64,
            replicate_seconds: r.seconds,
            restore_seconds,
            identical,
        });
    }
    drop(agent);
    server.stop().await?;
    Ok(DemoReport { image_mib, points })
}
