//! `churnlog agent`: replicate disk images or block devices to a process server, one
//! pass (and recovery point) per interval; one JSON line per pass on stdout. With `--cs`
//! the machine registers with the configuration server once and follows its assignment.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use std::time::Duration;

use churnlog::agent::capture::CaptureConfig;
use churnlog::agent::credential::{credential_path, load_or_register, CsSettings};
use churnlog::agent::{nbd, Agent, AgentConfig, Locator};
use churnlog::protocol::PointKind;

use super::{progress_bar, read_passphrase, runtime, show_progress};

/// Replicate disk images or block devices to a process server: a standalone one
/// (`--ps`, `--ps-cert`, `--passphrase-file`) or the one the configuration server assigns
/// (`--cs`, `--cs-cert`, `--state-dir`, and `--passphrase-file` for the first run).
/// With `--state-dir` each disk's block hashes survive a restart: a restarted agent sends
/// only the blocks that changed.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("locator").required(true).args(["ps", "cs"])))]
pub struct AgentArgs {
    /// host:port of a standalone process server.
    #[arg(long, conflicts_with_all = ["cs", "cs_cert"], requires = "ps_cert")]
    ps: Option<String>,
    /// The process server's certificate (its TLS directory's cert.pem).
    #[arg(long, requires = "ps")]
    ps_cert: Option<PathBuf>,
    /// host:port of the configuration server: register there once, then ask it for the
    /// process server before every connection.
    #[arg(long, requires_all = ["cs_cert", "state_dir"])]
    cs: Option<String>,
    /// The configuration server's certificate.
    #[arg(long, requires = "cs")]
    cs_cert: Option<PathBuf>,
    /// The agent's state directory (created 0700): each disk's block hashes as of the
    /// last point the process server acknowledged (`blocks-ID.state`, `blocks-ID.sent`),
    /// so a restart sends only changed blocks; with --cs also the machine's credential
    /// (`credential`, 0600). Optional with --ps (without it a restart copies every disk
    /// in full), required with --cs.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The passphrase: always with --ps; with --cs only until the machine has registered.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    #[arg(long)]
    machine: String,
    /// ID=PATH, once per disk: whole-disk passes (read every block each interval).
    #[arg(long = "disk", required_unless_present = "exports", conflicts_with = "exports")]
    disks: Vec<String>,
    /// ID=PATH, once per disk: serve the image file or block device PATH as the NBD
    /// export ID and replicate every write as it happens (crash-consistent points at
    /// flush boundaries). Needs --nbd-listen and/or --nbd-socket.
    #[arg(long = "export", conflicts_with_all = ["once", "wait_uploaded", "interval"])]
    exports: Vec<String>,
    /// TCP address the NBD exports listen on (e.g. 127.0.0.1:10809).
    #[arg(long, requires = "exports")]
    nbd_listen: Option<std::net::SocketAddr>,
    /// Unix socket path the NBD exports listen on (created; must not exist).
    #[arg(long, requires = "exports")]
    nbd_socket: Option<PathBuf>,
    /// With --export: a point follows the first completed FLUSH after this many seconds.
    #[arg(long, default_value_t = 5, requires = "exports")]
    point_interval: u64,
    /// With --export: MiB of writes queued for the process server before capture falls
    /// back to the dirty bitmap.
    #[arg(long, default_value_t = 64, requires = "exports")]
    queue_mib: usize,
    /// One pass, then exit.
    #[arg(long)]
    once: bool,
    /// Return only once the pass's recovery point is uploaded.
    #[arg(long)]
    wait_uploaded: bool,
    /// Seconds between passes (crash-consistent point after each).
    #[arg(long, default_value_t = 300)]
    interval: u64,
    /// Tag the points app-consistent (the application quiesced).
    #[arg(long)]
    app_consistent: bool,
    /// Give up when no process server can be reached for this many seconds (default 60
    /// with --ps; 3600 with --cs, where a move waits for the old server to drain).
    #[arg(long)]
    reconnect_timeout: Option<u64>,
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let AgentArgs {
        ps,
        ps_cert,
        cs,
        cs_cert,
        state_dir,
        passphrase_file,
        machine,
        disks,
        exports,
        nbd_listen,
        nbd_socket,
        point_interval,
        queue_mib,
        once,
        wait_uploaded,
        interval,
        app_consistent,
        reconnect_timeout,
    } = args;
    let nbd = !exports.is_empty();
    let disks = if nbd { &exports } else { &disks };
    let disks = disks
        .iter()
        .map(|d| {
            d.split_once('=')
                .map(|(id, p)| (id.to_string(), PathBuf::from(p)))
                .ok_or_else(|| anyhow::anyhow!("--disk takes ID=PATH, got {d:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = runtime()?;
    let mut agent = match (ps, cs) {
        (Some(ps), None) => {
            let disks = disks.clone();
            let ps_cert = ps_cert.context("--ps needs --ps-cert")?;
            let passphrase_file = passphrase_file.context("--ps needs --passphrase-file")?;
            let passphrase = read_passphrase(&passphrase_file)?;
            let cert = std::fs::read_to_string(&ps_cert).with_context(|| format!("read {}", ps_cert.display()))?;
            let mut cfg = AgentConfig::new(ps, cert, machine, disks);
            cfg.reconnect_timeout = Duration::from_secs(reconnect_timeout.unwrap_or(60));
            cfg.state_dir = state_dir;
            Agent::new(cfg, &passphrase)?
        }
        (None, Some(cs)) => {
            let cs_cert = cs_cert.context("--cs needs --cs-cert")?;
            let state_dir = state_dir.context("--cs needs --state-dir")?;
            let cert = std::fs::read_to_string(&cs_cert).with_context(|| format!("read {}", cs_cert.display()))?;
            let passphrase = passphrase_file.as_deref().map(read_passphrase).transpose()?;
            let settings = CsSettings {
                address: &cs,
                cert_pem: &cert,
                passphrase: passphrase.as_deref(),
                machine: &machine,
                state_dir: &state_dir,
            };
            let identity = rt.block_on(load_or_register(&settings))?;
            if identity.registered_now {
                eprintln!(
                    "churnlog: registered machine {machine} with the configuration server; credential in {}",
                    credential_path(&state_dir).display()
                );
            }
            let mut cfg = AgentConfig::with_locator(Locator::Cs { client: identity.client }, machine, disks.clone());
            cfg.reconnect_timeout = Duration::from_secs(reconnect_timeout.unwrap_or(3600));
            cfg.state_dir = Some(state_dir);
            Agent::with_key(cfg, identity.key)?
        }
        _ => anyhow::bail!("give either --ps (a standalone process server) or --cs (a configuration server)"),
    };
    if nbd {
        let cfg = CaptureConfig {
            queue_bytes: queue_mib << 20,
            point_interval: Duration::from_secs(point_interval),
            persist: None,
        };
        rt.block_on(serve_exports(agent, &disks, cfg, nbd_listen, nbd_socket))?;
        return Ok(ExitCode::SUCCESS);
    }
    let kind = if app_consistent { PointKind::AppConsistent } else { PointKind::CrashConsistent };
    rt.block_on(async move {
        loop {
            let bar = progress_bar();
            let report = agent.pass(kind, wait_uploaded, |done, total| show_progress(&bar, done, total)).await?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            println!("{}", serde_json::to_string(&report)?);
            if once {
                return anyhow::Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_secs(interval)).await;
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `--export`: serves the exports until SIGINT or SIGTERM; one JSON line of capture
/// status per new recovery point.
async fn serve_exports(
    agent: Agent,
    disks: &[(String, PathBuf)],
    cfg: CaptureConfig,
    tcp: Option<std::net::SocketAddr>,
    unix: Option<PathBuf>,
) -> anyhow::Result<()> {
    let exports = nbd::open_exports(disks)?;
    let running = nbd::start(agent, exports, cfg, tcp, unix).await?;
    if let Some(a) = running.tcp_addr {
        eprintln!("churnlog: NBD exports on nbd://{a}/ID");
    }
    if let Some(p) = &running.unix_path {
        eprintln!("churnlog: NBD exports on nbd+unix:///ID?socket={}", p.display());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let status = running.status();
                if status.last_point != last {
                    last = status.last_point;
                    println!("{}", serde_json::to_string(&status)?);
                }
            }
        }
    }
    let (_agent, r) = running.stop().await;
    r?;
    Ok(())
}
