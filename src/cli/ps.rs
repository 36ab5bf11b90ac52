//! `churnlog ps run`: a process server from flags and/or a TOML file, until SIGINT or
//! SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use clap::Subcommand;

use churnlog::config::{PsRunConfig, PsRunSettings, SizeValue};
use churnlog::control::decommission;
use churnlog::control::ps_link::{self, LinkConfig};
use churnlog::drain::DrainConfig;
use churnlog::ingest::IngestConfig;
use churnlog::process_server::ControlConfig;
use churnlog::process_server::{ProcessServer, ProcessServerConfig};
use churnlog::protocol::auth::AuthKey;
use churnlog::size::parse_size;
use churnlog::store::Target;

use super::{read_passphrase, read_proxy, runtime};

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum PsCommand {
    /// Run a process server: TLS ingest into the cache, drain to the target. Every
    /// setting may also come from a TOML file (--config); a flag wins over the file.
    Run {
        /// TOML file with the same settings (keys are the flags with `_` for `-`).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        #[arg(long, value_parser = parse_size)]
        cache_size: Option<u64>,
        /// Default 0.0.0.0:9443.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// file:///abs/dir, az://container/prefix or s3://bucket/prefix
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Holds cert.pem and key.pem; a self-signed pair is created when empty.
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// Proxy settings file ([ProxySettings] format).
        #[arg(long)]
        proxy_file: Option<PathBuf>,
        #[command(flatten)]
        bandwidth: BandwidthArgs,
        /// A DNS name or IP agents use to reach this server, put in a generated
        /// certificate (repeatable; localhost and 127.0.0.1 are always in it).
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
        /// Highest LZ4 acceleration the cache may use when the CPU, not the disk, is the
        /// bottleneck: faster compression for a slightly worse ratio (1 = always the best
        /// ratio; default 4).
        #[arg(long)]
        lz4_acceleration_max: Option<u32>,
        #[command(flatten)]
        cs: CsArgs,
    },
    /// Register (again) with the configuration server: after a proxy change, a new
    /// certificate or a new address. Reads the same ps.toml as `ps run`.
    Register {
        #[arg(long)]
        config: PathBuf,
    },
    /// Move every machine off this process server, wait until everything cached is
    /// uploaded, then unregister it from the configuration server.
    Decommission {
        #[arg(long)]
        config: PathBuf,
        /// Remove it even if cached data would be lost (says exactly what first).
        #[arg(long)]
        force: bool,
        /// Longest wait for the machines to move and the backlog to drain.
        #[arg(long, default_value_t = 3600)]
        wait_seconds: u64,
    },
}

/// The configuration server this process server registers with (all or none).
#[derive(clap::Args)]
pub struct CsArgs {
    /// host:port of the configuration server (unset: a standalone server).
    #[arg(long)]
    cs_address: Option<String>,
    /// The configuration server's certificate (PEM).
    #[arg(long)]
    cs_cert: Option<PathBuf>,
    /// This server's id at the configuration server.
    #[arg(long)]
    ps_id: Option<String>,
    /// host:port agents use to reach this server.
    #[arg(long)]
    advertise_address: Option<String>,
    /// Seconds between heartbeats (default 30).
    #[arg(long)]
    heartbeat_interval_seconds: Option<u64>,
    /// host:port for GET /metrics and GET /status.json (plain HTTP).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// Upload throttle: one limit, or one for work hours and one for the rest.
#[derive(clap::Args)]
pub struct BandwidthArgs {
    /// Upload limit in megabytes (10^6 bytes) per second; outside work hours when
    /// --work-hours is given.
    #[arg(long)]
    bandwidth_mbps: Option<f64>,
    /// Work hours, local to --utc-offset-min: HH:MM-HH:MM (may cross midnight).
    #[arg(long)]
    work_hours: Option<String>,
    /// Days the work hours apply: mon-fri (the default), sat,sun, ...
    #[arg(long)]
    work_days: Option<String>,
    /// Upload limit during work hours, MB/s.
    #[arg(long)]
    work_mbps: Option<f64>,
    /// The site's offset from UTC in minutes (e.g. 60 for UTC+01:00); default 0.
    #[arg(long, allow_hyphen_values = true)]
    utc_offset_min: Option<i32>,
}

pub fn run(command: PsCommand) -> anyhow::Result<ExitCode> {
    match command {
        PsCommand::Run {
            config,
            cache_dir,
            cache_size,
            listen,
            target,
            passphrase_file,
            tls_dir,
            proxy_file,
            bandwidth,
            tls_names,
            lz4_acceleration_max,
            cs,
        } => {
            let file = match &config {
                Some(path) => PsRunConfig::load(path)?,
                None => PsRunConfig::default(),
            };
            let flags = PsRunConfig {
                cache_dir,
                cache_size: cache_size.map(SizeValue::Bytes),
                listen,
                target,
                passphrase_file,
                tls_dir,
                proxy_file,
                tls_names: (!tls_names.is_empty()).then_some(tls_names),
                bandwidth_mbps: bandwidth.bandwidth_mbps,
                work_hours: bandwidth.work_hours,
                work_days: bandwidth.work_days,
                work_mbps: bandwidth.work_mbps,
                utc_offset_min: bandwidth.utc_offset_min,
                lz4_acceleration_max,
                cs_address: cs.cs_address,
                cs_cert: cs.cs_cert,
                ps_id: cs.ps_id,
                advertise_address: cs.advertise_address,
                heartbeat_interval_seconds: cs.heartbeat_interval_seconds,
                metrics_listen: cs.metrics_listen,
                health: None,
            };
            ps_run(file.overlay(flags).settle()?)
        }
        PsCommand::Register { config } => ps_register(&config),
        PsCommand::Decommission { config, force, wait_seconds } => {
            ps_decommission(&config, force, Duration::from_secs(wait_seconds))
        }
    }
}

/// The CS link from settled settings (None: standalone). The passphrase must be long
/// enough either way: a standalone server is a server too.
fn link_config(settings: &PsRunSettings, passphrase: &str) -> anyhow::Result<Option<LinkConfig>> {
    churnlog::control::check_passphrase(passphrase)?;
    let Some(cs) = &settings.cs else { return Ok(None) };
    let cs_cert_pem =
        std::fs::read_to_string(&cs.cs_cert).with_context(|| format!("read cs_cert {}", cs.cs_cert.display()))?;
    Ok(Some(LinkConfig {
        cs_address: cs.cs_address.clone(),
        cs_cert_pem,
        ps_id: cs.ps_id.clone(),
        advertise_address: cs.advertise_address.clone(),
        heartbeat_interval: Duration::from_secs(cs.heartbeat_interval_seconds),
        key: AuthKey::from_passphrase(passphrase),
    }))
}

/// Settings of a ps.toml that names a CS, with its link.
fn load_linked(config: &Path) -> anyhow::Result<(PsRunSettings, LinkConfig)> {
    let settings = PsRunConfig::load(config)?.settle()?;
    let passphrase = read_passphrase(&settings.passphrase_file)?;
    let link = link_config(&settings, &passphrase)?
        .with_context(|| format!("{} names no configuration server (cs_address)", config.display()))?;
    Ok((settings, link))
}

fn ps_register(config: &Path) -> anyhow::Result<ExitCode> {
    let (settings, link) = load_linked(config)?;
    let (_, cert_pem) = churnlog::tls::server_config(&settings.tls_dir, &settings.tls_names)?;
    let registered = runtime()?.block_on(ps_link::register(&link, &cert_pem, settings.cache_size_bytes))?;
    println!(
        "registered {} ({}) with the configuration server at {} (version {})",
        link.ps_id, link.advertise_address, link.cs_address, registered.cs_version
    );
    Ok(ExitCode::SUCCESS)
}

fn ps_decommission(config: &Path, force: bool, wait: Duration) -> anyhow::Result<ExitCode> {
    let (_, link) = load_linked(config)?;
    let client = link.client()?;
    let outcome = runtime()?.block_on(decommission::decommission(
        &client,
        &link.ps_id,
        force,
        wait,
        Duration::from_secs(2),
        |p| {
            eprintln!(
                "waiting: {} machine(s) still assigned, {} bytes not uploaded ({:.0} s)",
                p.machines,
                p.backlog_bytes,
                p.elapsed.as_secs_f64()
            )
        },
        |loss| eprintln!("--force: removing {} anyway: {loss}", link.ps_id),
    ))?;
    match outcome {
        decommission::Outcome::Clean => {
            println!("{} decommissioned: every machine moved, everything uploaded, unregistered", link.ps_id)
        }
        decommission::Outcome::Purged { lost, unregistered } => {
            println!("{} removed with purge: {lost}", link.ps_id);
            for (m, to) in unregistered.moved {
                println!("  {m} -> {to}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ps_run(settings: PsRunSettings) -> anyhow::Result<ExitCode> {
    let PsRunSettings {
        cache_dir,
        cache_size_bytes,
        listen,
        target,
        passphrase_file,
        tls_dir,
        proxy_file,
        tls_names,
        bandwidth,
        lz4_acceleration_max,
        cs: _,
        metrics_listen,
        health,
    } = settings.clone();
    let passphrase = read_passphrase(&passphrase_file)?;
    let link = link_config(&settings, &passphrase)?;
    let proxy = read_proxy(proxy_file)?;
    let target = Target::from_url(&target, proxy.as_ref())?;
    let ingest = IngestConfig { tls_names, ..IngestConfig::new(listen, tls_dir.clone(), &passphrase) };
    let mut cfg = ProcessServerConfig::new(cache_dir, cache_size_bytes, ingest, target);
    if let Some(a) = lz4_acceleration_max {
        cfg.cache.lz4_acceleration_max = a;
    }
    cfg.drain = DrainConfig { bandwidth, ..DrainConfig::default() };
    cfg.control = ControlConfig { link, thresholds: health, metrics_listen, ..ControlConfig::default() };
    // Login slots, sessions, segments and store connections are all file descriptors;
    // the login-slot cap, not EMFILE, should be what refuses a flood.
    let fds_wanted = 2 * cfg.ingest.unauthenticated_max as u64 + 1024;
    match churnlog::ingest::limits::raise_open_files_limit() {
        Ok(fds) if fds < fds_wanted => tracing::warn!(
            "open-files limit {fds} (hard) is below the {fds_wanted} this server may use; raise it (LimitNOFILE=, ulimit -Hn)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("could not raise the open-files limit: {e}"),
    }
    runtime()?.block_on(async move {
        let server = ProcessServer::start(cfg).await?;
        eprintln!(
            "churnlog process server listening on {} (certificate: {})",
            server.local_addr,
            tls_dir.join("cert.pem").display()
        );
        if let Some(addr) = server.metrics_addr {
            eprintln!("metrics and status on http://{addr}/metrics and http://{addr}/status.json");
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        eprintln!("stopping: {}", server.status());
        server.stop().await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
