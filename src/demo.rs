//! `churnlog demo`: the whole data path on temporary directories and loopback. A process
//! server (TLS, cache, drain to a local-directory target), an agent replicating a
//! generated disk image through several rounds of churn and recovery points, and a
//! restore of every point compared byte for byte with the image as it was.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use churnlog::agent::{Agent, AgentConfig};
use churnlog::cache::{Cache, Options};
use churnlog::drain::{DrainConfig, Drainer, Target};
use churnlog::ingest::{IngestConfig, IngestServer};
use churnlog::protocol::PointKind;
use churnlog::restore::{restore, PointSelector};

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

pub async fn run(
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
    let opts = Options {
        capacity_bytes: 2 << 30,
        segment_size: 32 << 20,
        record_size_max: churnlog::protocol::RECORD_BYTES_MAX as u32,
        tail_cache_bytes: churnlog::drain::DRAIN_TAIL_CACHE_BYTES,
        ..Options::default()
    };
    let cache = Arc::new(Cache::open(&cache_dir, opts)?);
    let server =
        IngestServer::start(cache.clone(), IngestConfig::new("127.0.0.1:0".parse()?, tls_dir, passphrase)).await?;
    let target = Target::from_url(&format!("file://{}", store_dir.display()), None)?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let drainer = tokio::spawn(Drainer::new(cache.clone(), target.clone(), DrainConfig::default()).run(stopped));
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
    let _ = stop.send(true);
    let _ = drainer.await;
    server.stop().await;
    drop(agent);
    match Arc::try_unwrap(cache) {
        Ok(c) => c.close()?,
        Err(_) => anyhow::bail!("cache still shared at the end of the demo"),
    }
    Ok(DemoReport { image_mib, points })
}
