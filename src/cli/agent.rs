//! `churnlog agent`: replicate disk images or block devices to a process server, one
//! pass (and recovery point) per interval; one JSON line per pass on stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use churnlog::agent::{Agent, AgentConfig};
use churnlog::protocol::PointKind;

use super::{progress_bar, read_passphrase, runtime, show_progress};

/// Replicate disk images or block devices to a process server.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// host:port of the process server.
    #[arg(long)]
    ps: String,
    /// The process server's certificate (its TLS directory's cert.pem).
    #[arg(long)]
    ps_cert: PathBuf,
    #[arg(long)]
    passphrase_file: PathBuf,
    #[arg(long)]
    machine: String,
    /// ID=PATH, once per disk.
    #[arg(long = "disk", required = true)]
    disks: Vec<String>,
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
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let AgentArgs { ps, ps_cert, passphrase_file, machine, disks, once, wait_uploaded, interval, app_consistent } =
        args;
    let passphrase = read_passphrase(&passphrase_file)?;
    let cert = std::fs::read_to_string(&ps_cert).with_context(|| format!("read {}", ps_cert.display()))?;
    let disks = disks
        .iter()
        .map(|d| {
            d.split_once('=')
                .map(|(id, p)| (id.to_string(), PathBuf::from(p)))
                .ok_or_else(|| anyhow::anyhow!("--disk takes ID=PATH, got {d:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kind = if app_consistent { PointKind::AppConsistent } else { PointKind::CrashConsistent };
    let mut agent = Agent::new(AgentConfig::new(ps, cert, machine, disks), &passphrase)?;
    runtime()?.block_on(async move {
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
