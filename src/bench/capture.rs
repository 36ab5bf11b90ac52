//! `churnlog bench capture`: write capture through the agent's NBD export, with real NBD
//! clients from qemu-utils and a process server in the same process (file:// store).
//!
//! 1. **Overhead**: `qemu-img bench` writes the same sequence (sequential, wrapping,
//!    queue depth `depth`, a FLUSH every `flush_interval` requests) once to a plain
//!    image file and once through the export, at 64 KiB and 4 KiB; the ratio of the two
//!    throughputs is the cost of capture (and, on one machine, of the replication that
//!    runs beside it).
//! 2. **RPO**: a paced `qemu-io` writer (1 MiB writes at offsets wrapping over the
//!    image, a FLUSH every second) at each rate for `seconds`, points every
//!    `point_interval`; each crash-consistent point's age when the agent learns it is
//!    uploaded (from its FLUSH to the server's report): median and p99.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::agent::capture::{CaptureConfig, CaptureStatus};
use crate::agent::{nbd, Agent, AgentConfig};
use crate::ingest::IngestConfig;
use crate::process_server::{ProcessServer, ProcessServerConfig};
use crate::store::Target;

#[derive(Clone, Debug)]
pub struct CaptureParams {
    pub dir: PathBuf,
    pub image_bytes: u64,
    /// Bytes each overhead run writes.
    pub overhead_bytes: u64,
    pub depth: u32,
    pub flush_interval: u32,
    /// RPO runs, MB/s (10^6 bytes).
    pub rates_mb_s: Vec<f64>,
    pub seconds: u64,
    pub point_interval: Duration,
}

#[derive(Debug, serde::Serialize)]
pub struct OverheadRow {
    pub block_bytes: u64,
    pub requests: u64,
    pub file_mib_s: f64,
    /// Through the export, replicating to the process server on this machine.
    pub export_mib_s: f64,
    pub ratio: f64,
    /// Through an export whose process server is unreachable: the NBD and capture
    /// path alone (writes recorded in the dirty bitmap), without replication's CPU.
    pub export_unreplicated_mib_s: f64,
    pub ratio_unreplicated: f64,
    /// CPU seconds per GiB written, both runs of each side together.
    pub cpu: CpuPerGib,
}

/// Where the CPU went, seconds per GiB the writer wrote. The process server runs on its
/// own runtime (threads `ps-rt`, and the engine's `churnlog-*`), so its share is told
/// apart from the agent's (every other thread of this process).
#[derive(Debug, Default, serde::Serialize)]
pub struct CpuPerGib {
    /// qemu-img writing the plain file.
    pub file_writer: f64,
    /// qemu-img writing through the replicated export, the agent, and the process server
    /// (until replication has caught up).
    pub export_writer: f64,
    pub export_agent: f64,
    pub export_ps: f64,
    /// qemu-img and the agent through the export whose process server is unreachable.
    pub unreplicated_writer: f64,
    pub unreplicated_agent: f64,
}

/// CPU seconds used so far: (process-server threads, other threads of this process,
/// children waited for).
fn cpu_seconds() -> (f64, f64, f64) {
    // Fields after the parenthesised name: state is field 3, utime 14, stime 15,
    // cutime 16, cstime 17 (clock ticks).
    fn fields(stat: &str) -> Option<(&str, Vec<f64>)> {
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        let f: Vec<f64> = rest.split_whitespace().skip(11).take(4).filter_map(|x| x.parse().ok()).collect();
        (f.len() == 4).then_some((comm, f))
    }
    let tick = rustix::param::clock_ticks_per_second() as f64;
    let own = std::fs::read_to_string("/proc/self/stat").ok();
    let Some((_, f)) = own.as_deref().and_then(fields) else { return (0.0, 0.0, 0.0) };
    let (total, children) = ((f[0] + f[1]) / tick, (f[2] + f[3]) / tick);
    let mut ps = 0.0;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        if let Some((comm, f)) = fields(&stat) {
            if comm.starts_with("ps-rt") || comm.starts_with("churnlog-") {
                ps += (f[0] + f[1]) / tick;
            }
        }
    }
    (ps, total - ps, children)
}

#[derive(Debug, serde::Serialize)]
pub struct RpoRow {
    pub target_mb_s: f64,
    /// What the writer achieved (bytes written over the run's length).
    pub achieved_mb_s: f64,
    pub seconds: f64,
    pub points_uploaded: usize,
    pub upload_age_ms_median: u64,
    pub upload_age_ms_p99: u64,
    pub upload_age_ms_max: u64,
    /// Times the replication queue overflowed into the dirty bitmap.
    pub overflows: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct CaptureResult {
    pub image_mib: u64,
    pub depth: u32,
    pub flush_interval: u32,
    pub overhead: Vec<OverheadRow>,
    pub rpo: Vec<RpoRow>,
}

impl std::fmt::Display for CaptureResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "capture overhead: qemu-img bench, sequential writes, depth {}, a FLUSH every {} requests, {} MiB image",
            self.depth, self.flush_interval, self.image_mib
        )?;
        for r in &self.overhead {
            writeln!(
                f,
                "  {:>3} KiB x {:>6}: file {:>7.1} MiB/s; export {:>7.1} MiB/s ({:.2}x); export, PS unreachable {:>7.1} MiB/s ({:.2}x)",
                r.block_bytes >> 10,
                r.requests,
                r.file_mib_s,
                r.export_mib_s,
                r.ratio,
                r.export_unreplicated_mib_s,
                r.ratio_unreplicated
            )?;
            let c = &r.cpu;
            writeln!(
                f,
                "      CPU s/GiB: file: writer {:.2}; export: writer {:.2} + agent {:.2} + PS {:.2}; unreachable: writer {:.2} + agent {:.2}",
                c.file_writer, c.export_writer, c.export_agent, c.export_ps, c.unreplicated_writer, c.unreplicated_agent
            )?;
        }
        writeln!(f, "RPO: paced qemu-io writer, 1 MiB writes, a FLUSH every second; age of each point at upload")?;
        for r in &self.rpo {
            writeln!(
                f,
                "  {:>6.1} MB/s (achieved {:>6.1}) for {:.0} s: {} points, age median {} ms, p99 {} ms, max {} ms, {} overflows",
                r.target_mb_s,
                r.achieved_mb_s,
                r.seconds,
                r.points_uploaded,
                r.upload_age_ms_median,
                r.upload_age_ms_p99,
                r.upload_age_ms_max,
                r.overflows
            )?;
        }
        Ok(())
    }
}

fn tool(name: &str) -> anyhow::Result<PathBuf> {
    ["/usr/bin", "/usr/local/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} is not installed (Debian package qemu-utils)"))
}

/// Runs `qemu-img bench` writing `params`' sequence to `url` (a file or an NBD URL);
/// MiB/s from its own timing.
fn qemu_img_bench(url: &str, block: u64, requests: u64, p: &CaptureParams) -> anyhow::Result<f64> {
    let out = Command::new(tool("qemu-img")?)
        .args(["bench", "-w", "-f", "raw", "-t", "writeback", "-q"])
        .args(["-c", &requests.to_string(), "-s", &block.to_string(), "-d", &p.depth.to_string()])
        .arg(format!("--flush-interval={}", p.flush_interval))
        .arg("--pattern=165")
        .arg(url)
        .output()?;
    anyhow::ensure!(out.status.success(), "qemu-img bench {url}: {}", String::from_utf8_lossy(&out.stderr));
    // "Run completed in 1.234 seconds."
    let text = String::from_utf8_lossy(&out.stdout);
    let seconds: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("qemu-img bench output: {text}"))?;
    Ok((block * requests) as f64 / (1 << 20) as f64 / seconds.max(1e-9))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn wait_until(running: &nbd::Running, limit: Duration, done: impl Fn(&CaptureStatus) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done(&running.status()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A paced writer: `rate` bytes/s of 1 MiB writes through qemu-io's command line, a
/// FLUSH every second, for `seconds`; returns the bytes written and the time qemu-io
/// took to finish them.
fn paced_writer(url: &str, image_bytes: u64, rate: f64, seconds: u64, seed: u64) -> anyhow::Result<(u64, f64)> {
    let mut child = Command::new(tool("qemu-io")?)
        .args(["-f", "raw", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("qemu-io stdin")?;
    let started = Instant::now();
    let (write_len, tick) = (1u64 << 20, Duration::from_millis(100));
    let slots = (image_bytes / write_len).max(1);
    let (mut sent, mut offset_slot, mut ticks) = (0u64, seed % slots, 0u64);
    while started.elapsed() < Duration::from_secs(seconds) {
        let due = (rate * started.elapsed().as_secs_f64()) as u64;
        let mut cmds = String::new();
        while sent + write_len <= due {
            offset_slot = (offset_slot * 7 + 13) % slots;
            let pattern = 1 + (sent / write_len % 250);
            cmds.push_str(&format!("write -P {pattern} {} {write_len}\n", offset_slot * write_len));
            sent += write_len;
        }
        ticks += 1;
        if ticks.is_multiple_of(10) {
            cmds.push_str("flush\n");
        }
        stdin.write_all(cmds.as_bytes())?;
        std::thread::sleep(tick);
    }
    stdin.write_all(b"flush\n")?;
    drop(stdin);
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
    Ok((sent, started.elapsed().as_secs_f64()))
}

pub async fn run(p: &CaptureParams) -> anyhow::Result<CaptureResult> {
    std::fs::create_dir_all(&p.dir)?;
    let dir = std::fs::canonicalize(&p.dir)?;
    let passphrase = "bench capture";
    let target = Target::from_url(&format!("file://{}", dir.join("store").display()), None)?;
    let ingest = IngestConfig::new("127.0.0.1:0".parse()?, dir.join("tls"), passphrase);
    let mut cfg = ProcessServerConfig::new(dir.join("cache"), (p.image_bytes * 4).max(4 << 30), ingest, target);
    cfg.cache.segment_size = 64 << 20;
    // The process server on a runtime of its own, so its CPU can be told from the
    // agent's (its blocking threads kept alive: an exited thread's time is not
    // attributable any more).
    let ps_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ps-rt")
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .enable_all()
        .build()?;
    let server = ps_runtime.spawn(ProcessServer::start(cfg)).await??;

    let file_img = dir.join("file.img");
    let export_img = dir.join("export.img");
    for img in [&file_img, &export_img] {
        let f = std::fs::File::create(img)?;
        f.set_len(p.image_bytes)?;
    }
    let mut agent_cfg = AgentConfig::new(
        server.local_addr.to_string(),
        server.cert_pem.clone(),
        "bench-nbd".into(),
        vec![("disk0".into(), export_img.clone())],
    );
    agent_cfg.state_dir = Some(dir.join("state"));
    let agent = Agent::new(agent_cfg, passphrase)?;
    let exports = nbd::open_exports(&[("disk0".into(), export_img.clone())])?;
    let cap = CaptureConfig { point_interval: p.point_interval, ..CaptureConfig::default() };
    let running = nbd::start(agent, exports, cap, Some("127.0.0.1:0".parse()?), None).await?;
    let url = format!("nbd://{}/disk0", running.tcp_addr.context("listening")?);
    // A second agent whose process server does not exist (a closed port): its writes
    // go to the dirty bitmap, so it shows the NBD and capture path alone.
    let alone_img = dir.join("unreplicated.img");
    std::fs::File::create(&alone_img)?.set_len(p.image_bytes)?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?; // bound, then dropped
    let alone_agent = Agent::new(
        AgentConfig::new(
            closed.to_string(),
            server.cert_pem.clone(),
            "bench-alone".into(),
            vec![("disk0".into(), alone_img.clone())],
        ),
        passphrase,
    )?;
    let alone_exports = nbd::open_exports(&[("disk0".into(), alone_img.clone())])?;
    let alone_cap = CaptureConfig { point_interval: p.point_interval, ..CaptureConfig::default() };
    let alone = nbd::start(alone_agent, alone_exports, alone_cap, Some("127.0.0.1:0".parse()?), None).await?;
    let alone_url = format!("nbd://{}/disk0", alone.tcp_addr.context("listening")?);
    let idle = |s: &CaptureStatus| s.dirty_chunks == 0 && s.queued_bytes == 0;
    anyhow::ensure!(wait_until(&running, Duration::from_secs(600), idle).await, "the initial copy did not finish");

    let mut overhead = Vec::new();
    for block in [64u64 << 10, 4 << 10] {
        let requests = (p.overhead_bytes / block).max(1);
        // Alternate, file first, and keep each side's better run of two: the page cache
        // and the replication catching up between runs weigh on both alike.
        let (mut file_mib_s, mut export_mib_s, mut alone_mib_s) = (0f64, 0f64, 0f64);
        let mut cpu = CpuPerGib::default();
        let gib = 2.0 * (block * requests) as f64 / (1u64 << 30) as f64;
        for _ in 0..2 {
            let (_, _, c0) = cpu_seconds();
            file_mib_s = file_mib_s.max(qemu_img_bench(&file_img.display().to_string(), block, requests, p)?);
            let (ps0, agent0, c1) = cpu_seconds();
            export_mib_s = export_mib_s.max(qemu_img_bench(&url, block, requests, p)?);
            let (_, _, c2) = cpu_seconds();
            wait_until(&running, Duration::from_secs(600), idle).await;
            let (ps1, agent1, _) = cpu_seconds();
            alone_mib_s = alone_mib_s.max(qemu_img_bench(&alone_url, block, requests, p)?);
            let (_, agent2, c3) = cpu_seconds();
            cpu.file_writer += (c1 - c0) / gib;
            cpu.export_writer += (c2 - c1) / gib;
            cpu.export_agent += (agent1 - agent0) / gib;
            cpu.export_ps += (ps1 - ps0) / gib;
            cpu.unreplicated_writer += (c3 - c2) / gib;
            cpu.unreplicated_agent += (agent2 - agent1) / gib;
        }
        overhead.push(OverheadRow {
            block_bytes: block,
            requests,
            file_mib_s,
            export_mib_s,
            ratio: export_mib_s / file_mib_s.max(1e-9),
            export_unreplicated_mib_s: alone_mib_s,
            ratio_unreplicated: alone_mib_s / file_mib_s.max(1e-9),
            cpu,
        });
    }

    let mut rpo = Vec::new();
    for (i, &rate) in p.rates_mb_s.iter().enumerate() {
        anyhow::ensure!(wait_until(&running, Duration::from_secs(600), idle).await, "replication did not catch up");
        let before = running.capture.upload_ages_ms().len();
        let overflows_before = running.status().overflows;
        let (url, image_bytes, seconds) = (url.clone(), p.image_bytes, p.seconds);
        let (bytes, took) =
            tokio::task::spawn_blocking(move || paced_writer(&url, image_bytes, rate * 1e6, seconds, i as u64))
                .await??;
        // The last points' uploads.
        let last = running.status().last_point.map(|(id, _)| id);
        wait_until(&running, Duration::from_secs(300), |s| s.last_uploaded_consistent >= last && idle(s)).await;
        let ages = running.capture.upload_ages_ms();
        let mut ages: Vec<u64> = ages[before.min(ages.len())..].to_vec();
        ages.sort_unstable();
        rpo.push(RpoRow {
            target_mb_s: rate,
            achieved_mb_s: bytes as f64 / 1e6 / took,
            seconds: took,
            points_uploaded: ages.len(),
            upload_age_ms_median: percentile(&ages, 0.5),
            upload_age_ms_p99: percentile(&ages, 0.99),
            upload_age_ms_max: ages.last().copied().unwrap_or(0),
            overflows: running.status().overflows - overflows_before,
        });
    }
    let (_agent, r) = running.stop().await;
    r?;
    let (_agent, r) = alone.stop().await;
    r?;
    ps_runtime.spawn(server.stop()).await??;
    ps_runtime.shutdown_background();
    Ok(CaptureResult {
        image_mib: p.image_bytes >> 20,
        depth: p.depth,
        flush_interval: p.flush_interval,
        overhead,
        rpo,
    })
}
