//! `churnlog setup`: the seed's unattended installer (library: `control::setup`).

use std::path::PathBuf;
use std::process::ExitCode;

use churnlog::control::setup::{setup, SetupParams};

use super::runtime;

/// Install a process server (registered with its configuration server) or a
/// configuration server, unattended. Every value is checked before anything is created;
/// a failure leaves nothing behind.
#[derive(clap::Args)]
pub struct SetupArgs {
    /// ps (a process server) or cs (a configuration server).
    #[arg(long)]
    server_mode: Option<String>,
    /// Directory to install into (created, or empty).
    #[arg(long)]
    install_location: Option<PathBuf>,
    /// HOST:PORT of the configuration server (cs mode: the name and port it serves on).
    #[arg(long)]
    cs_ip: Option<String>,
    /// The configuration server's certificate (PEM).
    #[arg(long)]
    cs_cert: Option<PathBuf>,
    /// Address agents use to reach this process server.
    #[arg(long)]
    ps_ip: Option<String>,
    /// The registration passphrase (at least 16 characters).
    #[arg(long)]
    passphrase_file_path: Option<PathBuf>,
    /// Port agents connect to (default 9443).
    #[arg(long)]
    data_transfer_secure_port: Option<String>,
    /// Proxy for the object store ([ProxySettings] file).
    #[arg(long)]
    proxy_settings_file_path: Option<PathBuf>,
    /// Connect to the object store directly.
    #[arg(long)]
    bypass_proxy: bool,
    /// vmware or non-vmware.
    #[arg(long)]
    env_type: Option<String>,
    /// Install even if the cache does not fit in the free space.
    #[arg(long)]
    skip_space_check: bool,
    /// Cache size (e.g. 300GiB).
    #[arg(long)]
    cache_size: Option<String>,
    /// Object store: file:///abs/dir, az://container/prefix or s3://bucket/prefix.
    #[arg(long)]
    target: Option<String>,
    /// This process server's id at the configuration server (default: the host name).
    #[arg(long)]
    ps_id: Option<String>,
    /// IP:PORT where `ps run` serves /metrics and /status.json (optional).
    #[arg(long)]
    metrics_listen: Option<String>,
}

pub fn run(a: SetupArgs) -> anyhow::Result<ExitCode> {
    let params = SetupParams {
        server_mode: a.server_mode,
        install_location: a.install_location,
        cs_ip: a.cs_ip,
        cs_cert: a.cs_cert,
        ps_ip: a.ps_ip,
        passphrase_file_path: a.passphrase_file_path,
        data_transfer_secure_port: a.data_transfer_secure_port,
        proxy_settings_file_path: a.proxy_settings_file_path,
        bypass_proxy: a.bypass_proxy,
        env_type: a.env_type,
        skip_space_check: a.skip_space_check,
        cache_size: a.cache_size,
        target: a.target,
        ps_id: a.ps_id,
        metrics_listen: a.metrics_listen,
    };
    let installed = runtime()?.block_on(setup(params))?;
    let run = if installed.config.ends_with("cs.toml") { "cs run" } else { "ps run" };
    println!(
        "installed: {} (certificate {}); start it with `churnlog {run} --config {}`",
        installed.config.display(),
        installed.cert.display(),
        installed.config.display()
    );
    Ok(ExitCode::SUCCESS)
}
