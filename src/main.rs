//! `churnlog`: the command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod demo;

use churnlog::agent::{Agent, AgentConfig};
use churnlog::bench::{self, ingest::IngestParams};
use churnlog::cache::{Cache, Options, RecoveryMode};
use churnlog::config::{PsRunConfig, PsRunSettings, SizeValue};
use churnlog::drain::{DrainConfig, Drainer, ProxySettings, Target};
use churnlog::ingest::{IngestConfig, IngestServer};
use churnlog::protocol::PointKind;
use churnlog::restore::PointSelector;
use churnlog::size::parse_size;

#[derive(Parser)]
#[command(name = "churnlog", version, about = "Open scale-out process server for disaster-recovery replication")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect a cache directory.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Measure the engine.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// The whole data path on loopback: process server, agent, churn, recovery points,
    /// drain to a local directory, restore of every point, byte comparison.
    Demo {
        /// Size of the generated disk image.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        image: u64,
        /// Rounds of churn (each ends with a recovery point).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Make the image about 2:1 compressible.
        #[arg(long)]
        compressible: bool,
        /// Keep everything in this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Process server commands.
    Ps {
        #[command(subcommand)]
        command: PsCommand,
    },
    /// Replicate disk images or block devices to a process server.
    Agent {
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
    },
    /// Rebuild a disk image at a recovery point from the object store.
    Restore {
        #[arg(long)]
        target: String,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        disk: String,
        /// `latest` or a point id.
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        out: Option<PathBuf>,
        /// List the recovery points instead.
        #[arg(long)]
        list: bool,
        #[arg(long)]
        proxy_file: Option<PathBuf>,
    },
    /// Crash-test child: appends forever and prints each durable acknowledgement.
    #[command(hide = true)]
    Torture {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 4)]
        streams: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum PsCommand {
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
struct BandwidthArgs {
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

#[derive(Subcommand)]
enum CacheCommand {
    /// Recover (read-only), check every record's checksum, report per stream. Exits 0
    /// only when nothing is corrupt.
    Verify {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
    /// Time opening (recovering) an existing cache.
    Recover {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHURNLOG_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("churnlog: error: {e:#}");
            ExitCode::from(2)
        }
    }
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

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Options for a cache that must hold `bytes` without any upload behind it.
fn options_for(bytes: u64) -> Options {
    let mut o = Options::default();
    o.capacity_bytes = o.capacity_bytes.max((bytes as f64 / 0.7) as u64 + 8 * o.segment_size);
    o
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Cache { command: CacheCommand::Verify { dir, json } } => verify(&dir, json),
        Command::Bench { command } => bench_cmd(command),
        Command::Demo { image, rounds, compressible, dir } => demo(image, rounds, compressible, dir),
        Command::Ps {
            command:
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
                },
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
        Command::Agent {
            ps,
            ps_cert,
            passphrase_file,
            machine,
            disks,
            once,
            wait_uploaded,
            interval,
            app_consistent,
        } => agent(ps, &ps_cert, &passphrase_file, machine, disks, once, wait_uploaded, interval, app_consistent),
        Command::Restore { target, machine, disk, point, out, list, proxy_file } => {
            restore(&target, &machine, &disk, &point, out, list, proxy_file)
        }
        Command::Torture { dir, streams, seed } => torture(&dir, streams, seed),
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
        print_json(&serde_json::json!({ "clean": report.is_clean(), "report": report }))?;
    } else {
        let r = &report.recovery;
        println!(
            "cache {}: {} segment(s), {} from summaries, {} scanned",
            dir.display(),
            r.segments,
            r.segments_from_summary,
            r.segments_scanned.len()
        );
        if let Some(t) = &r.torn_tail {
            println!("torn tail (unacknowledged, discarded): segment {} at {}: {}", t.segment, t.offset, t.reason);
        }
        for d in &r.damage {
            println!("DAMAGE segment {} at {}: {}", d.segment, d.offset, d.what);
        }
        for n in &r.notes {
            println!("note: {n}");
        }
        println!(
            "{:<24} {:<10} {:>10} {:>23} {:>14} {:>10} {:>7}  corrupt",
            "machine", "disk", "records", "seq range", "bytes", "uploaded", "resync"
        );
        for s in &report.streams {
            let range = s.seq_range.map_or("-".to_string(), |(a, b)| format!("{a}..={b}"));
            let corrupt = if s.corrupt_ranges.is_empty() {
                "-".to_string()
            } else {
                format!("{:?} ({})", s.corrupt_ranges, s.first_error.as_deref().unwrap_or(""))
            };
            println!(
                "{:<24} {:<10} {:>10} {:>23} {:>14} {:>10} {:>7}  {}",
                s.machine, s.disk, s.records, range, s.logical_bytes, s.uploaded_upto, s.resync_required, corrupt
            );
        }
        for d in &r.damaged_streams {
            println!("DAMAGED stream {}/{}: missing {:?}", d.machine, d.disk, d.missing);
        }
        println!(
            "{} record(s), {} byte(s) checked: {}",
            report.records_checked,
            report.bytes_checked,
            if report.is_clean() { "clean" } else { "CORRUPT" }
        );
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn bench_cmd(command: BenchCommand) -> anyhow::Result<ExitCode> {
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
            anyhow::ensure!(
                !dir.exists() || std::fs::read_dir(&dir)?.next().is_none(),
                "{} is not empty",
                dir.display()
            );
            anyhow::ensure!((0.0..=1.0).contains(&churn_fraction), "--churn-fraction is in 0..=1");
            let params = churnlog::bench::e2e::E2eParams {
                dir,
                image_bytes: image,
                compressible,
                churn_passes,
                churn_fraction,
                uploads_in_flight,
                io_backend: parse_backend(&backend)?,
            };
            let r = runtime()?.block_on(churnlog::bench::e2e::run(&params))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "e2e {:.0} MiB image{} ({}): initial copy {:.0} MiB in {:.2} s = {:.0} MiB/s ({:.2} cores; durable after {:.2} s)",
                    r.image_mib,
                    if r.compressible { ", 2:1 compressible" } else { "" },
                    r.backend,
                    r.initial.mib,
                    r.initial.seconds,
                    r.initial.mib_per_s,
                    r.initial.cpu_cores,
                    r.initial.durable_seconds
                );
                for c in &r.churn {
                    println!(
                        "  churn pass: {:.0} MiB in {:.2} s = {:.0} MiB/s ({:.2} cores; durable after {:.2} s)",
                        c.mib, c.seconds, c.mib_per_s, c.cpu_cores, c.durable_seconds
                    );
                }
                println!(
                    "  restore: {:.0} MiB/s of image, {}",
                    r.restore_mib_per_s,
                    if r.restore_identical { "byte-identical" } else { "DIFFERS" }
                );
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
            if json {
                let mut v = serde_json::to_value(&r)?;
                if let Some(d) = device {
                    v["device_limit_mib_per_s"] = serde_json::json!(d);
                    v["ratio_to_device"] = serde_json::json!(r.mib_per_s / d);
                }
                print_json(&v)?;
            } else {
                println!(
                    "ingest: {:.1} MiB/s logical, {:.1} MiB/s to the device, {} records in {:.2} s, ack p50 {} us p99 {} us, {:.1} records/batch, write amplification {:.3}",
                    r.mib_per_s, r.device_mib_per_s, r.records, r.seconds, r.ack_latency_us_p50, r.ack_latency_us_p99, r.records_per_batch, r.write_amplification
                );
                if r.ack_latency_inexact > 0 {
                    println!(
                        "warning: {} ack latencies were taken late (their batch's time was no longer kept): upper bounds",
                        r.ack_latency_inexact
                    );
                }
                if r.meta_writes > 0 {
                    println!(
                        "meta: {} rewrites, {:.1} MiB; write amplification with META {:.3}",
                        r.meta_writes,
                        r.meta_bytes as f64 / (1u64 << 20) as f64,
                        r.write_amplification_with_meta
                    );
                }
                if r.stored_bytes < r.logical_bytes {
                    println!(
                        "compression: stored {:.3} of logical, LZ4 acceleration mean {:.1} (max {})",
                        r.stored_bytes as f64 / r.logical_bytes as f64,
                        r.lz4_acceleration_mean,
                        r.lz4_acceleration_max
                    );
                }
                if let (Some(cpu), Some(per_mib)) = (r.cpu_seconds, r.cpu_ms_per_logical_mib) {
                    println!(
                        "cpu: {cpu:.2} s ({:.2} cores busy), {per_mib:.3} ms per logical MiB (engine and bench threads)",
                        cpu / r.seconds
                    );
                }
                if let Some(d) = device {
                    println!(
                        "device: {d:.1} MiB/s (O_DIRECT 1 MiB writes, fdatasync every 4 MiB): churnlog at {:.2}x",
                        r.mib_per_s / d
                    );
                }
            }
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
            if json {
                print_json(&rows)?;
            } else {
                println!("acceleration  MiB/s (1 core)  stored/logical  records compressed");
                for r in &rows {
                    println!(
                        "{:>12}  {:>14.0}  {:>14.3}  {:>17.1}%",
                        r.acceleration,
                        r.mib_per_s,
                        r.stored_ratio,
                        r.compressed_fraction * 100.0
                    );
                }
            }
        }
        BenchCommand::Recover { dir, json } => {
            let r = bench::recover::run(&dir, options_for(0))?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "recover: opened in {:.3} s: {} records ({} MiB cached), index {} bytes ({:.1} per record), {} segments, {} scanned",
                    r.open_seconds, r.records, r.cached_logical_bytes >> 20, r.index_bytes, r.index_bytes_per_record, r.segments, r.segments_scanned
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn read_passphrase(path: &Path) -> anyhow::Result<String> {
    let p = std::fs::read_to_string(path).with_context(|| format!("read passphrase file {}", path.display()))?;
    anyhow::ensure!(!p.trim().is_empty(), "passphrase file {} is empty", path.display());
    Ok(p.trim().to_string())
}

fn read_proxy(path: Option<PathBuf>) -> anyhow::Result<Option<ProxySettings>> {
    path.map(|p| {
        let text = std::fs::read_to_string(&p).with_context(|| format!("read proxy file {}", p.display()))?;
        Ok(ProxySettings::parse(&text)?)
    })
    .transpose()
}

fn demo(image: u64, rounds: usize, compressible: bool, dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::tempdir()?;
    let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    println!("churnlog demo in {}", dir.display());
    let report =
        runtime()?.block_on(demo::run(&dir, image >> 20, rounds.max(1), compressible, |line| println!("  {line}")))?;
    let ok = report.points.iter().all(|p| p.identical);
    println!(
        "{} of {} recovery points restored byte-identical",
        report.points.iter().filter(|p| p.identical).count(),
        report.points.len()
    );
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn ps_run(settings: PsRunSettings) -> anyhow::Result<ExitCode> {
    let PsRunSettings {
        cache_dir,
        cache_size_bytes: cache_size,
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
    let options = Options {
        capacity_bytes: cache_size,
        record_size_max: churnlog::protocol::RECORD_BYTES_MAX as u32,
        tail_cache_bytes: churnlog::drain::DRAIN_TAIL_CACHE_BYTES,
        lz4_acceleration_max: lz4_acceleration_max.unwrap_or(Options::default().lz4_acceleration_max),
        ..Options::default()
    };
    let cache = Arc::new(Cache::open(&cache_dir, options)?);
    runtime()?.block_on(async move {
        let server = IngestServer::start(
            cache.clone(),
            IngestConfig { tls_names, ..IngestConfig::new(listen, tls_dir.clone(), &passphrase) },
        )
        .await?;
        eprintln!(
            "churnlog process server listening on {} (certificate: {})",
            server.local_addr,
            tls_dir.join("cert.pem").display()
        );
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let cfg = DrainConfig { bandwidth, ..DrainConfig::default() };
        let drainer = tokio::spawn(Drainer::new(cache.clone(), target, cfg).run(stopped));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        eprintln!("stopping");
        let _ = stop.send(true);
        let _ = drainer.await;
        server.stop().await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn agent(
    ps: String,
    ps_cert: &Path,
    passphrase_file: &Path,
    machine: String,
    disks: Vec<String>,
    once: bool,
    wait_uploaded: bool,
    interval: u64,
    app_consistent: bool,
) -> anyhow::Result<ExitCode> {
    let passphrase = read_passphrase(passphrase_file)?;
    let cert = std::fs::read_to_string(ps_cert).with_context(|| format!("read {}", ps_cert.display()))?;
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
            let report = agent.pass(kind, wait_uploaded, |done, total| {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                }
            });
            let report = report.await?;
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

fn restore(
    target: &str,
    machine: &str,
    disk: &str,
    point: &str,
    out: Option<PathBuf>,
    list: bool,
    proxy_file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let proxy = read_proxy(proxy_file)?;
    let target = Target::from_url(target, proxy.as_ref())?;
    runtime()?.block_on(async move {
        if list {
            for p in churnlog::restore::list_points(&target, machine, disk).await? {
                println!("{}", serde_json::to_string(&p)?);
            }
            return anyhow::Ok(());
        }
        let out = out.ok_or_else(|| anyhow::anyhow!("--out FILE is required unless --list"))?;
        let selector: PointSelector = point.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let bar = progress_bar();
        let report = churnlog::restore::restore(&target, machine, disk, selector, &out, |done, total| {
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            }
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

/// Appends records of deterministic content until killed; prints `ACK stream seq len`
/// once each is durable and `UPLOADED stream upto` after each upload acknowledgement.
fn torture(dir: &Path, streams: u32, seed: u64) -> anyhow::Result<ExitCode> {
    let opts = Options {
        segment_size: 1 << 20,
        capacity_bytes: 256 << 20,
        record_size_max: 64 << 10,
        commit_bytes_max: 256 << 10,
        ..Options::default()
    };
    let cache = Cache::open(dir, opts)?;
    let ids: Vec<_> = (0..streams).map(|i| cache.stream(&format!("m{i}"), "d0")).collect::<Result<_, _>>()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    out.flush()?;
    let mut buf = Vec::new();
    let mut round = seed;
    loop {
        round += 1;
        let mut tickets = Vec::new();
        for &s in &ids {
            // One record per stream per round, all settled before the next: the next
            // sequence is the one after the last durable record.
            let seq = cache.stream_info(s).map_or(1, |i| i.durable_upto + 1);
            let len = bench::record_len(s.0, seq, 1, 48 << 10);
            bench::record_bytes(s.0, seq, len, 0.5, &mut buf);
            let t = cache.append(s, &buf)?;
            anyhow::ensure!(t.seq == seq, "sequence {} assigned where {} was expected", t.seq, seq);
            tickets.push((t, len));
        }
        for (t, len) in tickets {
            let (stream, seq) = (t.stream, t.seq);
            t.wait()?;
            writeln!(out, "ACK {} {} {}", stream.0, seq, len)?;
        }
        out.flush()?;
        if round.is_multiple_of(16) {
            for &s in &ids {
                let info = cache.stream_info(s).expect("stream");
                let upto = info.durable_upto.saturating_sub(20);
                if upto > info.uploaded_upto {
                    cache.ack(s, upto)?;
                    writeln!(out, "UPLOADED {} {}", s.0, upto)?;
                }
            }
            cache.reclaim()?;
            out.flush()?;
        }
    }
}
