//! `churnlog bench cs`: the configuration server under a simulated fleet. It starts
//! `churnlog cs run` as a child on 127.0.0.1:0 (SQLite in a temporary directory, or
//! `--db`), registers the process servers and machines, then sends every server's
//! heartbeat (with its share of the machines) on the interval for the run's length,
//! and measures the child's CPU from /proc (utime + stime over wall time, % of one
//! core) and the latency of heartbeats and of `GET /api/v1/status`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;

use churnlog::control::api::{self, HealthLevel, Heartbeat, HeartbeatReply, MachineReport};
use churnlog::control::auth::Principal;
use churnlog::control::client::CsClient;
use churnlog::protocol::auth::AuthKey;

use super::{print_report, runtime};

#[derive(Args)]
pub struct CsBenchArgs {
    #[arg(long, default_value_t = 100)]
    process_servers: usize,
    #[arg(long, default_value_t = 20_000)]
    machines: usize,
    #[arg(long, default_value_t = 10)]
    interval_seconds: u64,
    /// Length of the measured heartbeat phase.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The CS database (default: a SQLite file in a temporary directory).
    #[arg(long)]
    db: Option<String>,
    /// Status requests timed after the heartbeat phase.
    #[arg(long, default_value_t = 20)]
    status_requests: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct CsBenchReport {
    pub process_servers: usize,
    pub machines: usize,
    pub interval_seconds: u64,
    pub db: String,
    pub setup_seconds: f64,
    pub heartbeats: u64,
    pub heartbeat_phase_seconds: f64,
    /// CS child CPU over the heartbeat phase, % of one core.
    pub cs_cpu_percent: f64,
    pub heartbeat_ms_median: f64,
    pub heartbeat_ms_p99: f64,
    pub status_bytes: usize,
    pub status_ms_median: f64,
    pub status_ms_p99: f64,
    /// CS child resident memory at the end, MiB.
    pub cs_rss_mib: f64,
}

impl std::fmt::Display for CsBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "CS load: {} process servers, {} machines, a heartbeat each every {} s ({})",
            self.process_servers, self.machines, self.interval_seconds, self.db
        )?;
        writeln!(f, "  setup (register everything)   {:>10.1} s", self.setup_seconds)?;
        writeln!(
            f,
            "  heartbeats sent               {:>10} in {:.1} s",
            self.heartbeats, self.heartbeat_phase_seconds
        )?;
        writeln!(f, "  CS CPU during heartbeats      {:>10.2} % of one core", self.cs_cpu_percent)?;
        writeln!(
            f,
            "  heartbeat latency median/p99  {:>10.1} / {:.1} ms",
            self.heartbeat_ms_median, self.heartbeat_ms_p99
        )?;
        writeln!(f, "  status: {} bytes of JSON", self.status_bytes)?;
        writeln!(f, "  status latency median/p99     {:>10.1} / {:.1} ms", self.status_ms_median, self.status_ms_p99)?;
        write!(f, "  CS resident memory            {:>10.1} MiB", self.cs_rss_mib)
    }
}

/// Kills the child CS however the benchmark ends.
struct CsChild(Child);
impl Drop for CsChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of a process in seconds (fields 14 and 15 of /proc/PID/stat).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields count from after its closing paren.
    let rest = &stat[stat.rfind(')').context("/proc stat format")? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: CsBenchArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(args.process_servers >= 1 && args.interval_seconds >= 1, "at least one server and a 1 s interval");
    let dir = tempfile::tempdir()?;
    let passphrase = "bench passphrase, not a secret";
    let pp = dir.path().join("passphrase");
    churnlog::secrets::create_private(&pp, passphrase.as_bytes())?;
    let db = args.db.clone().unwrap_or_else(|| dir.path().join("cs.db").display().to_string());
    let addr_file = dir.path().join("addr");
    let child = Command::new(std::env::current_exe()?)
        .args(["cs", "run", "--listen", "127.0.0.1:0", "--heartbeat-timeout", "600", "--db", &db])
        .arg("--passphrase-file")
        .arg(&pp)
        .arg("--tls-dir")
        .arg(dir.path().join("tls"))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .spawn()
        .context("start `churnlog cs run`")?;
    let mut child = CsChild(child);
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let address = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            if !a.is_empty() {
                break a;
            }
        }
        anyhow::ensure!(child.0.try_wait()?.is_none(), "the CS exited during start");
        anyhow::ensure!(Instant::now() < deadline, "the CS did not start within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    let cert = std::fs::read_to_string(dir.path().join("tls").join("cert.pem"))?;
    let client = CsClient::new(&address, &cert, Principal::Passphrase, AuthKey::from_passphrase(passphrase))?;
    let report = runtime()?.block_on(load(&args, client, cert, pid))?;
    let report = CsBenchReport { db: if args.db.is_some() { db } else { "SQLite (temporary)".into() }, ..report };
    drop(child);
    print_report(&report, args.json)?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn beat(id: &str, machines: &[String]) -> Heartbeat {
    Heartbeat {
        id: id.to_string(),
        version: churnlog::control::VERSION.into(),
        health: HealthLevel::Ok,
        cache_size_bytes: 300 << 30,
        cache_free_percent: 80.0,
        backlog_bytes: 1 << 30,
        ingest_bytes_per_second: 10e6,
        upload_bytes_per_second: 10e6,
        cpu_percent: 20.0,
        memory_percent: 30.0,
        machines: machines
            .iter()
            .map(|m| MachineReport {
                name: m.clone(),
                rpo_seconds: Some(30.0),
                resync_required: false,
                pending_bytes: 1 << 20,
            })
            .collect(),
        ..Default::default()
    }
}

async fn load(args: &CsBenchArgs, client: CsClient, cert: String, pid: u32) -> anyhow::Result<CsBenchReport> {
    let setup = Instant::now();
    let ids: Vec<String> = (0..args.process_servers).map(|i| format!("ps-{i:03}")).collect();
    for id in &ids {
        let reg = api::PsRegistration {
            id: id.clone(),
            address: format!("{id}.bench:9443"),
            cert_pem: cert.clone(),
            version: churnlog::control::VERSION.into(),
            cache_size_bytes: 300 << 30,
        };
        let _: api::PsRegistered = client.post(api::PATH_PS_REGISTER, &reg).await?;
        let _: HeartbeatReply = client.post(api::PATH_PS_HEARTBEAT, &beat(id, &[])).await?;
    }
    let registered: Vec<anyhow::Result<()>> = futures::stream::iter(0..args.machines)
        .map(|i| {
            let c = client.clone();
            async move {
                let body = api::MachineRegistration { name: format!("m-{i:05}") };
                let _: api::MachineRegistered = c.post(api::PATH_MACHINE_REGISTER, &body).await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    registered.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    // Each server's share: what the CS assigned it (its first heartbeat reply tells).
    let mut shares: Vec<Vec<String>> = Vec::new();
    for id in &ids {
        let r: HeartbeatReply = client.post(api::PATH_PS_HEARTBEAT, &beat(id, &[])).await?;
        shares.push(r.machines.into_iter().map(|m| m.name).collect());
    }
    let setup_seconds = setup.elapsed().as_secs_f64();

    // The heartbeat phase: server i beats at i/n of each interval.
    let interval = Duration::from_secs(args.interval_seconds);
    let phase = Duration::from_secs(args.seconds);
    let latencies = Arc::new(parking_lot::Mutex::new(Vec::<f64>::new()));
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (id, share)) in ids.iter().zip(shares).enumerate() {
        let (c, id, lat) = (client.clone(), id.clone(), latencies.clone());
        let offset = interval.mul_f64(i as f64 / ids.len() as f64);
        tasks.spawn(async move {
            let hb = beat(&id, &share);
            let start = tokio::time::Instant::from_std(t0) + offset;
            let mut tick = tokio::time::interval_at(start, interval);
            let end = tokio::time::Instant::from_std(t0) + phase;
            loop {
                // The phase ends on time, not at each server's next tick (CPU is per wall).
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = tokio::time::sleep_until(end) => return Ok::<(), anyhow::Error>(()),
                }
                let s = Instant::now();
                let _: HeartbeatReply = c.post(api::PATH_PS_HEARTBEAT, &hb).await?;
                lat.lock().push(s.elapsed().as_secs_f64() * 1e3);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu0;
    let mut hb = latencies.lock().clone();
    hb.sort_by(f64::total_cmp);

    let mut status_ms = Vec::new();
    let mut status_bytes = 0;
    for _ in 0..args.status_requests.max(1) {
        let s = Instant::now();
        let r: api::StatusReport = client.get(api::PATH_STATUS).await?;
        status_ms.push(s.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(r.machines.len() == args.machines, "status lists {} machines", r.machines.len());
        status_bytes = serde_json::to_vec(&r)?.len();
    }
    status_ms.sort_by(f64::total_cmp);
    Ok(CsBenchReport {
        process_servers: args.process_servers,
        machines: args.machines,
        interval_seconds: args.interval_seconds,
        db: String::new(),
        setup_seconds,
        heartbeats: hb.len() as u64,
        heartbeat_phase_seconds: wall,
        cs_cpu_percent: 100.0 * cpu / wall,
        heartbeat_ms_median: percentile(&hb, 0.5),
        heartbeat_ms_p99: percentile(&hb, 0.99),
        status_bytes,
        status_ms_median: percentile(&status_ms, 0.5),
        status_ms_p99: percentile(&status_ms, 0.99),
        cs_rss_mib: rss_mib(pid),
    })
}
