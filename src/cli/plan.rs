//! `churnlog plan`: how many process servers, and how big, from the seed's sizing table
//! and, with `--measure DIR`, from a short measurement of this machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use churnlog::plan::{self, MeasuredAssumptions, PlanReport};
use churnlog::size::parse_size;

use super::print_report;

/// Recommend process servers for a number of machines and a daily churn.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// Protected machines in total.
    #[arg(long)]
    machines: u64,
    /// Data changed a day across all machines, e.g. 1.5TB (decimal units as in the
    /// sizing table; TiB etc. also accepted).
    #[arg(long, value_parser = parse_size)]
    churn_per_day: u64,
    /// Also measure this machine: durable ingest into a scratch cache in DIR (the cache
    /// disk; removed afterwards, a few hundred MB used), about 10 s.
    #[arg(long)]
    measure: Option<PathBuf>,
    /// Seconds the measurement's main run aims at.
    #[arg(long, default_value_t = 8)]
    measure_seconds: u64,
    /// Peak churn rate as a multiple of the day's average.
    #[arg(long, default_value_t = 2.0)]
    peak_factor: f64,
    /// Hours of peak churn the cache must hold when uploads stall.
    #[arg(long, default_value_t = 2.0)]
    backlog_hours: f64,
    #[arg(long)]
    json: bool,
}

pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let table = plan::table_plan(args.machines, args.churn_per_day)?;
    let measured = match &args.measure {
        None => None,
        Some(dir) => {
            anyhow::ensure!((1..=60).contains(&args.measure_seconds), "--measure-seconds is 1..=60");
            let assumptions = MeasuredAssumptions {
                peak_factor: args.peak_factor,
                backlog_hours: args.backlog_hours,
                safe_utilisation: plan::SAFE_UTILISATION,
            };
            // Check the knobs before spending seconds on the measurement.
            let dummy = plan::Measurement {
                ingest_mib_per_s: 1.0,
                cpu_ms_per_mib: None,
                cores: 1,
                memory_bytes: None,
                free_bytes: 0,
                seconds: 0.0,
            };
            plan::measured_plan(args.machines, args.churn_per_day, &dummy, assumptions)?;
            if !args.json {
                eprintln!("measuring durable ingest in {} (about {} s)...", dir.display(), args.measure_seconds + 2);
            }
            let m = plan::measure(dir, Duration::from_secs(args.measure_seconds))?;
            Some(plan::measured_plan(args.machines, args.churn_per_day, &m, assumptions)?)
        }
    };
    let report = PlanReport { machines: args.machines, churn_per_day_bytes: args.churn_per_day, table, measured };
    print_report(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}
