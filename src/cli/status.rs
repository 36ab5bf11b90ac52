//! `churnlog status`: the fleet from the configuration server (`--cs`), or one process
//! server's own report (`--config ps.toml`, read from its local metrics listener).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use churnlog::control::api::{self, Heartbeat, StatusReport};

use super::{print_json, runtime};

#[derive(Args)]
pub struct StatusArgs {
    /// The configuration server, host:port (with --cs-cert and --passphrase-file).
    #[arg(long = "cs", requires_all = ["cs_cert", "passphrase_file"], conflicts_with = "config")]
    cs: Option<String>,
    #[arg(long)]
    cs_cert: Option<PathBuf>,
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// A process server's TOML: its `metrics_listen` serves its report at /status.json.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    match (&args.cs, &args.config) {
        (Some(address), None) => {
            let cs = super::cs::CsArgs {
                address: address.clone(),
                cs_cert: args.cs_cert.clone().context("--cs-cert is required with --cs")?,
                passphrase_file: args.passphrase_file.clone().context("--passphrase-file is required with --cs")?,
            };
            let report: StatusReport =
                runtime()?.block_on(async { cs.client()?.get(api::PATH_STATUS).await.map_err(anyhow::Error::from) })?;
            if args.json {
                print_json(&report)?;
            } else {
                print!("{}", fleet_table(&report));
            }
        }
        (None, Some(config)) => {
            let text = std::fs::read_to_string(config).with_context(|| format!("read {}", config.display()))?;
            let value: toml::Value = toml::from_str(&text).with_context(|| format!("parse {}", config.display()))?;
            let listen = value.get("metrics_listen").and_then(|v| v.as_str()).with_context(|| {
                format!(
                    "{} has no `metrics_listen` (host:port): the process server serves its status there",
                    config.display()
                )
            })?;
            let url = format!("http://{listen}/status.json");
            let report: Heartbeat = runtime()?.block_on(async {
                let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).no_proxy().build()?;
                let r = http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
                anyhow::ensure!(r.status().is_success(), "GET {url}: HTTP {}", r.status());
                r.json::<Heartbeat>().await.with_context(|| format!("GET {url}: not a status report"))
            })?;
            if args.json {
                print_json(&report)?;
            } else {
                print!("{}", ps_table(&report));
            }
        }
        _ => anyhow::bail!("give --cs HOST:PORT --cs-cert F --passphrase-file F, or --config ps.toml"),
    }
    Ok(ExitCode::SUCCESS)
}

fn rpo(r: Option<f64>) -> String {
    r.map(|s| format!("{s:.0} s")).unwrap_or_else(|| "-".into())
}

fn fleet_table(r: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "configuration server {}", r.cs_version);
    let _ = writeln!(
        out,
        "{:<20} {:<24} {:<9} {:<13} {:<9} {:>7} {:>14} {:>8}",
        "PROCESS SERVER", "ADDRESS", "VERSION", "STATE", "HEALTH", "FREE %", "BACKLOG B", "MACHINES"
    );
    for p in &r.process_servers {
        let state = format!("{:?}{}", p.state, if p.decommissioning { "*" } else { "" }).to_lowercase();
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:<9} {:<13} {:<9} {:>7.1} {:>14} {:>8}",
            p.id,
            p.address,
            p.version,
            state,
            format!("{:?}", p.health).to_lowercase(),
            p.cache_free_percent,
            p.backlog_bytes,
            p.machines
        );
        for a in &p.alerts {
            let _ = writeln!(out, "    {:?} {}: {}", a.level, a.kind, a.message);
        }
    }
    if r.process_servers.iter().any(|p| p.decommissioning) {
        let _ = writeln!(out, "(* decommissioning)");
    }
    let _ =
        writeln!(out, "\n{:<24} {:<20} {:<20} {:>10} {:<6}", "MACHINE", "PROCESS SERVER", "MOVING TO", "RPO", "RESYNC");
    for m in &r.machines {
        let _ = writeln!(
            out,
            "{:<24} {:<20} {:<20} {:>10} {:<6}",
            m.name,
            m.ps.as_deref().unwrap_or("-"),
            m.moving_to.as_deref().unwrap_or(""),
            rpo(m.rpo_seconds),
            if m.resync_required { "yes" } else { "" }
        );
    }
    out
}

fn ps_table(h: &Heartbeat) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "process server {} ({}): health {:?}", h.id, h.version, h.health);
    let _ = writeln!(
        out,
        "cache free {:.1}% of {} B, backlog {} B, ingest {:.0} B/s, upload {:.0} B/s, cpu {:.0}%, memory {:.0}%",
        h.cache_free_percent,
        h.cache_size_bytes,
        h.backlog_bytes,
        h.ingest_bytes_per_second,
        h.upload_bytes_per_second,
        h.cpu_percent,
        h.memory_percent
    );
    for a in &h.alerts {
        let _ = writeln!(out, "  {:?} {}: {}", a.level, a.kind, a.message);
    }
    let _ = writeln!(out, "\n{:<24} {:>10} {:>14} {:<6}", "MACHINE", "RPO", "PENDING B", "RESYNC");
    for m in &h.machines {
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>14} {:<6}",
            m.name,
            rpo(m.rpo_seconds),
            m.pending_bytes,
            if m.resync_required { "yes" } else { "" }
        );
    }
    out
}
