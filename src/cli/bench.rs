//! `churnlog bench …`: the engine's and the data path's measurements. Each report is a
//! type of `churnlog::bench` with its own text form.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use churnlog::bench::{self, ingest::IngestParams};
use churnlog::cache::Options;
use churnlog::size::parse_size;

use super::{parse_backend, print_report, runtime};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// How a sample of your own data compresses at each LZ4 acceleration (one core,
    /// through the engine's encoder): pick `lz4_acceleration_max` from it.
    Compress {
        /// A file (or device) holding typical data, e.g. a copy of a source disk's image.
        #[arg(long)]
        file: PathBuf,
        /// Bytes to read from it (at most 1 GiB).
        #[arg(long, value_parser = parse_size, default_value = "256MiB")]
        sample: u64,
        #[arg(long, value_parser = parse_size, default_value = "64KiB")]
        record_size: u64,
        /// Passes over the sample per acceleration; the fastest counts.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[arg(long)]
        json: bool,
    },
    /// Durable ingest from many concurrent producers.
    Ingest {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
        #[arg(long, value_parser = parse_size, default_value = "64KiB")]
        record_size: u64,
        #[arg(long, default_value_t = 225)]
        streams: u32,
        /// Compression ratio of the data, e.g. 2 for 2:1 (1 = incompressible).
        #[arg(long, default_value_t = 1.0)]
        compressible: f64,
        /// Producer threads (default: one per stream up to 32).
        #[arg(long)]
        producers: Option<usize>,
        /// Records each stream may have in flight.
        #[arg(long, default_value_t = 2)]
        window: usize,
        /// Records each producer may have in flight (1 = a blocking writer).
        #[arg(long)]
        inflight: Option<usize>,
        /// Acknowledge records as uploaded once durable (a drain that keeps up).
        #[arg(long)]
        drain: bool,
        #[arg(long, value_parser = parse_size)]
        segment_size: Option<u64>,
        #[arg(long, value_parser = parse_size)]
        commit_bytes: Option<u64>,
        #[arg(long)]
        commit_window_us: Option<u64>,
        /// Pace producers to this many MiB/s of logical data (default: flat out).
        #[arg(long)]
        rate: Option<f64>,
        /// With --rate: `poisson` (independent sources, latency from the scheduled time)
        /// or `lockstep` (all producers append at the same instants).
        #[arg(long, default_value = "poisson")]
        arrivals: String,
        /// Also measure the device: O_DIRECT 1 MiB writes of the same size, fdatasync
        /// every 4 MiB, on the same file system, and report both figures.
        #[arg(long)]
        compare_device: bool,
        /// Exit without closing the cache, as a kill -9 would (for `bench recover`).
        #[arg(long)]
        crash: bool,
        /// I/O backend: auto, std, direct or uring.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Highest LZ4 acceleration the cache may use when the CPU is the bottleneck
        /// (1 = always standard LZ4; default: the engine's).
        #[arg(long)]
        lz4_acceleration_max: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// The whole data path in one process on loopback (agent, TLS ingest, cache, drain
    /// to a local directory, restore), timed to "uploaded".
    E2e {
        /// Work directory (image, cache, target, restored image); must be empty or new.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_size, default_value = "2GiB")]
        image: u64,
        /// About 2:1 compressible image and churn.
        #[arg(long)]
        compressible: bool,
        #[arg(long, default_value_t = 3)]
        churn_passes: usize,
        /// Fraction of the image's blocks rewritten before each churn pass.
        #[arg(long, default_value_t = 0.25)]
        churn_fraction: f64,
        #[arg(long, default_value_t = 4)]
        uploads_in_flight: usize,
        /// I/O backend of the cache: auto, std, direct or uring.
        #[arg(long, default_value = "auto")]
        backend: String,
        #[arg(long)]
        json: bool,
    },
    /// The configuration server under a simulated fleet of process servers and machines.
    Cs(super::bench_cs::CsBenchArgs),
    /// An agent restart's cost: the full copy, a restart with `--state-dir`, and one with
    /// the state deleted (a delta resync against what the process server holds).
    Resync {
        /// An empty (or missing) directory for the image, the cache and the store.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_size, default_value = "1GiB")]
        image: u64,
        /// Share of the image's blocks overwritten before each restart, %.
        #[arg(long, default_value_t = 1.0)]
        changed_percent: f64,
        /// Fraction of the image's bytes that are zeros (0 = incompressible).
        #[arg(long, default_value_t = 0.5)]
        compressible: f64,
        #[arg(long)]
        json: bool,
    },
    /// Write capture through the agent's NBD export (qemu-img bench and qemu-io, from
    /// qemu-utils): throughput against the plain backing file, and each point's age at
    /// upload under a paced writer.
    Capture {
        /// An empty (or missing) directory for the images, the cache and the store.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_size, default_value = "1GiB")]
        image: u64,
        /// Bytes each throughput run writes.
        #[arg(long, value_parser = parse_size, default_value = "512MiB")]
        overhead_bytes: u64,
        /// qemu-img bench queue depth.
        #[arg(long, default_value_t = 16)]
        depth: u32,
        /// A FLUSH every this many requests in the throughput runs.
        #[arg(long, default_value_t = 256)]
        flush_interval: u32,
        /// Paced writer rates for the RPO runs, MB/s (23 is 2 TB/day).
        #[arg(long, value_delimiter = ',', default_value = "23,230")]
        rates: Vec<f64>,
        /// Length of each RPO run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long, default_value_t = 5)]
        point_interval: u64,
        #[arg(long)]
        json: bool,
    },
    /// Time opening (recovering) an existing cache.
    Recover {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// A benchmark's working directory must be new or empty (it fills it).
fn ensure_empty(dir: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(!dir.exists() || std::fs::read_dir(dir)?.next().is_none(), "{} is not empty", dir.display());
    Ok(())
}

/// Options for a cache that must hold `bytes` without any upload behind it.
fn options_for(bytes: u64) -> Options {
    let mut o = Options::default();
    o.capacity_bytes = o.capacity_bytes.max((bytes as f64 / 0.7) as u64 + 8 * o.segment_size);
    o
}

pub fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::E2e {
            dir,
            image,
            compressible,
            churn_passes,
            churn_fraction,
            uploads_in_flight,
            backend,
            json,
        } => {
            ensure_empty(&dir)?;
            anyhow::ensure!((0.0..=1.0).contains(&churn_fraction), "--churn-fraction is in 0..=1");
            let params = bench::e2e::E2eParams {
                dir,
                image_bytes: image,
                compressible,
                churn_passes,
                churn_fraction,
                uploads_in_flight,
                io_backend: parse_backend(&backend)?,
            };
            let r = runtime()?.block_on(bench::e2e::run(&params))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{r}");
            }
            if !r.restore_identical {
                return Ok(ExitCode::from(1));
            }
        }
        BenchCommand::Ingest {
            dir,
            bytes,
            record_size,
            streams,
            compressible,
            producers,
            window,
            inflight,
            drain,
            segment_size,
            commit_bytes,
            commit_window_us,
            rate,
            arrivals,
            compare_device,
            crash,
            backend,
            lz4_acceleration_max,
            json,
        } => {
            anyhow::ensure!(compressible >= 1.0, "--compressible is a ratio >= 1 (2 means 2:1)");
            let mut options = options_for(if drain { 0 } else { bytes });
            if let Some(s) = segment_size {
                options.segment_size = s;
            }
            if let Some(c) = commit_bytes {
                options.commit_bytes_max = u32::try_from(c).context("--commit-bytes")?;
            }
            if let Some(w) = commit_window_us {
                options.commit_window_us = w;
            }
            options.record_size_max = options.record_size_max.max(record_size as u32);
            options.io_backend = parse_backend(&backend)?;
            if let Some(a) = lz4_acceleration_max {
                options.lz4_acceleration_max = a;
            }
            let params = IngestParams {
                dir,
                bytes,
                record_size: usize::try_from(record_size)?,
                streams,
                compressible: 1.0 - 1.0 / compressible,
                producers: producers.unwrap_or(streams.min(32) as usize),
                window_per_stream: window,
                inflight_per_producer_max: inflight,
                drain,
                rate_mib_per_s: rate,
                arrivals: match arrivals.as_str() {
                    "poisson" => bench::ingest::Arrivals::Poisson,
                    "lockstep" => bench::ingest::Arrivals::Lockstep,
                    other => anyhow::bail!("--arrivals is poisson or lockstep, not {other:?}"),
                },
                leave_open: crash,
                options,
            };
            let r = bench::ingest::run(&params)?;
            let device = if compare_device {
                Some(bench::device::sequential_direct_mib_per_s(&params.dir, bytes).context("measure the device")?)
            } else {
                None
            };
            print_report(&bench::ingest::IngestReport::new(r, device), json)?;
            if crash {
                std::process::exit(0);
            }
        }
        BenchCommand::Compress { file, sample, record_size, rounds, json } => {
            let ratio_max = Options::default().compress_ratio_max;
            let rows = bench::compress::run(
                &file,
                sample,
                usize::try_from(record_size)?,
                ratio_max,
                &[1, 2, 4, 8, 16],
                rounds,
            )?;
            print_report(&bench::compress::EffortTable(rows), json)?;
        }
        BenchCommand::Cs(args) => return super::bench_cs::run(args),
        BenchCommand::Capture {
            dir,
            image,
            overhead_bytes,
            depth,
            flush_interval,
            rates,
            seconds,
            point_interval,
            json,
        } => {
            ensure_empty(&dir)?;
            anyhow::ensure!(image >= 64 << 20 && image % 512 == 0, "--image is at least 64MiB, in 512-byte sectors");
            anyhow::ensure!(rates.iter().all(|r| *r > 0.0), "--rates are positive MB/s");
            let params = bench::capture::CaptureParams {
                dir,
                image_bytes: image,
                overhead_bytes,
                depth,
                flush_interval,
                rates_mb_s: rates,
                seconds,
                point_interval: std::time::Duration::from_secs(point_interval),
            };
            let r = runtime()?.block_on(bench::capture::run(&params))?;
            print_report(&r, json)?;
        }
        BenchCommand::Resync { dir, image, changed_percent, compressible, json } => {
            ensure_empty(&dir)?;
            let params = bench::resync::ResyncParams { dir, image_bytes: image, changed_percent, compressible };
            let r = runtime()?.block_on(bench::resync::run(&params))?;
            print_report(&r, json)?;
        }
        BenchCommand::Recover { dir, json } => {
            print_report(&bench::recover::run(&dir, options_for(0))?, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
