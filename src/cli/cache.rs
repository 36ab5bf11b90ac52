//! `churnlog cache verify`: recover a cache read-only and check every record.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use churnlog::cache::{Cache, Options, RecoveryMode};

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Recover (read-only), check every record's checksum, report per stream. Exits 0
    /// only when nothing is corrupt.
    Verify {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: CacheCommand) -> anyhow::Result<ExitCode> {
    match command {
        CacheCommand::Verify { dir, json } => verify(&dir, json),
    }
}

fn verify(dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(dir.join("META").exists(), "{} holds no churnlog cache (no META)", dir.display());
    let opts = Options {
        read_only: true,
        recovery_mode: RecoveryMode::SalvageMarkResync,
        background_reclaim: false,
        capacity_bytes: u64::MAX / 2,
        ..Options::default()
    };
    let cache = Cache::open(dir, opts).context("open cache")?;
    let report = cache.verify();
    if json {
        super::print_json(&serde_json::json!({ "clean": report.is_clean(), "report": report }))?;
    } else {
        println!("cache {}: {report}", dir.display());
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
