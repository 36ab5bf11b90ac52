//! `churnlog restore`: list a disk's recovery points, or rebuild its image at one.

use std::path::PathBuf;
use std::process::ExitCode;

use churnlog::restore::PointSelector;
use churnlog::store::Target;

use super::{progress_bar, read_proxy, runtime, show_progress};

/// Rebuild a disk image at a recovery point from the object store.
#[derive(clap::Args)]
pub struct RestoreArgs {
    #[arg(long)]
    target: String,
    #[arg(long)]
    machine: String,
    #[arg(long)]
    disk: String,
    /// `latest` (the newest crash- or application-consistent point), `latest-any` (the
    /// newest of any kind) or a point id.
    #[arg(long, default_value = "latest")]
    point: String,
    #[arg(long)]
    out: Option<PathBuf>,
    /// List the recovery points instead.
    #[arg(long)]
    list: bool,
    #[arg(long)]
    proxy_file: Option<PathBuf>,
}

pub fn run(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let RestoreArgs { target, machine, disk, point, out, list, proxy_file } = args;
    let proxy = read_proxy(proxy_file)?;
    let target = Target::from_url(&target, proxy.as_ref())?;
    runtime()?.block_on(async move {
        if list {
            for p in churnlog::restore::list_points(&target, &machine, &disk).await? {
                println!("{}", serde_json::to_string(&p)?);
            }
            return anyhow::Ok(());
        }
        let out = out.ok_or_else(|| anyhow::anyhow!("--out FILE is required unless --list"))?;
        let selector: PointSelector = point.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let bar = progress_bar();
        let report = churnlog::restore::restore(&target, &machine, &disk, selector, &out, |done, total| {
            show_progress(&bar, done, total)
        })
        .await?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
