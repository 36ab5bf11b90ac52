//! The command line: one file per command, each with its arguments, its run function
//! and nothing else; reports are `Display`/`Serialize` types beside the code that
//! produces them, so a command only chooses between text and JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use churnlog::proxy::ProxySettings;

mod agent;
mod bench;
mod bench_cs;
mod cache;
mod cs;
mod demo;
mod plan;
mod ps;
mod restore;
mod setup;
mod status;
mod torture;

#[derive(Parser)]
#[command(name = "churnlog", version, about = "Open scale-out process server for disaster-recovery replication")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Inspect a cache directory.
    Cache {
        #[command(subcommand)]
        command: cache::CacheCommand,
    },
    /// Measure the engine.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// The whole data path on loopback: process server, agent, churn, recovery points,
    /// drain to a local directory, restore of every point, byte comparison.
    Demo(demo::DemoArgs),
    /// Process server commands.
    Ps {
        #[command(subcommand)]
        command: ps::PsCommand,
    },
    /// Configuration server commands: run it, make its passphrase, operate the fleet.
    Cs {
        #[command(subcommand)]
        command: cs::CsCommand,
    },
    /// Health of the fleet (from the configuration server) or of one process server.
    Status(status::StatusArgs),
    /// Replicate disk images or block devices to a process server.
    Agent(agent::AgentArgs),
    /// Rebuild a disk image at a recovery point from the object store.
    Restore(restore::RestoreArgs),
    /// Recommend the number and size of process servers (seed table, and a measurement
    /// of this machine with --measure).
    Plan(plan::PlanArgs),
    /// Unattended install of a process server or configuration server.
    Setup(setup::SetupArgs),
    /// Crash-test child: appends forever and prints each durable acknowledgement.
    #[command(hide = true)]
    Torture(torture::TortureArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Cache { command } => cache::run(command),
        Command::Bench { command } => bench::run(command),
        Command::Demo(args) => demo::run(args),
        Command::Ps { command } => ps::run(command),
        Command::Cs { command } => cs::run(command),
        Command::Status(args) => status::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Setup(args) => setup::run(args),
        Command::Torture(args) => torture::run(args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A report as pretty JSON or as its text form.
fn print_report(report: &(impl serde::Serialize + std::fmt::Display), json: bool) -> anyhow::Result<()> {
    if json {
        print_json(report)
    } else {
        println!("{report}");
        Ok(())
    }
}

fn read_passphrase(path: &Path) -> anyhow::Result<String> {
    churnlog::secrets::warn_if_exposed(path);
    let p = std::fs::read_to_string(path).with_context(|| format!("read passphrase file {}", path.display()))?;
    anyhow::ensure!(!p.trim().is_empty(), "passphrase file {} is empty", path.display());
    Ok(p.trim().to_string())
}

fn read_proxy(path: Option<PathBuf>) -> anyhow::Result<Option<ProxySettings>> {
    path.map(|p| {
        churnlog::secrets::warn_if_exposed(&p);
        let text = std::fs::read_to_string(&p).with_context(|| format!("read proxy file {}", p.display()))?;
        Ok(ProxySettings::parse(&text)?)
    })
    .transpose()
}

fn parse_backend(name: &str) -> anyhow::Result<churnlog::cache::IoBackend> {
    use churnlog::cache::IoBackend;
    Ok(match name {
        "auto" => IoBackend::Auto,
        "std" => IoBackend::Std,
        "direct" => IoBackend::Direct,
        "uring" => IoBackend::Uring,
        other => anyhow::bail!("unknown backend {other:?} (auto, std, direct, uring)"),
    })
}

/// A progress bar on a terminal, nothing otherwise.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("template"),
        );
        b
    })
}

/// Moves `bar` (when there is one) to `done` of `total`.
fn show_progress(bar: &Option<indicatif::ProgressBar>, done: u64, total: u64) {
    if let Some(b) = bar {
        b.set_length(total);
        b.set_position(done);
    }
}
