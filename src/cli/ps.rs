//! `churnlog ps run`: a process server from flags and/or a TOML file, until SIGINT or
//! SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use churnlog::config::{PsRunConfig, PsRunSettings, SizeValue};
use churnlog::drain::DrainConfig;
use churnlog::ingest::IngestConfig;
use churnlog::process_server::{ProcessServer, ProcessServerConfig};
use churnlog::size::parse_size;
use churnlog::store::Target;

use super::{read_passphrase, read_proxy, runtime};

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
    },
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
            };
            ps_run(file.overlay(flags).settle()?)
        }
    }
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
    } = settings;
    let passphrase = read_passphrase(&passphrase_file)?;
    let proxy = read_proxy(proxy_file)?;
    let target = Target::from_url(&target, proxy.as_ref())?;
    let ingest = IngestConfig { tls_names, ..IngestConfig::new(listen, tls_dir.clone(), &passphrase) };
    let mut cfg = ProcessServerConfig::new(cache_dir, cache_size_bytes, ingest, target);
    if let Some(a) = lz4_acceleration_max {
        cfg.cache.lz4_acceleration_max = a;
    }
    cfg.drain = DrainConfig { bandwidth, ..DrainConfig::default() };
    runtime()?.block_on(async move {
        let server = ProcessServer::start(cfg).await?;
        eprintln!(
            "churnlog process server listening on {} (certificate: {})",
            server.local_addr,
            tls_dir.join("cert.pem").display()
        );
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
