//! `churnlog`: the command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};

use churnlog::bench::{self, ingest::IngestParams};
use churnlog::cache::{Cache, Options, RecoveryMode};
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
    /// Run the engine end to end on a temporary directory and print a summary.
    Demo {
        /// Logical bytes to ingest.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        bytes: u64,
        /// Keep the demo's cache in this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
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
        Command::Demo { bytes, dir } => demo(bytes, dir),
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
            compare_device,
            crash,
            backend,
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

fn demo(bytes: u64, dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::tempdir()?;
    let dir = dir.unwrap_or_else(|| tmp.path().join("cache"));
    println!("churnlog demo: cache engine in {}", dir.display());
    let params = IngestParams {
        dir: dir.clone(),
        bytes,
        record_size: 64 << 10,
        streams: 16,
        compressible: 0.5,
        producers: 8,
        window_per_stream: 2,
        inflight_per_producer_max: None,
        drain: false,
        rate_mib_per_s: None,
        leave_open: false,
        options: Options { segment_size: 32 << 20, capacity_bytes: (bytes * 2).max(1 << 30), ..Options::default() },
    };
    let r = bench::ingest::run(&params)?;
    println!(
        "  ingest   {} records from 16 streams: {:.0} MiB/s logical ({:.0} MiB/s to disk), ack p99 {} us",
        r.records, r.mib_per_s, r.device_mib_per_s, r.ack_latency_us_p99
    );
    let opts = params.options.clone();
    let started = Instant::now();
    let cache = Arc::new(Cache::open(&dir, opts.clone())?);
    println!("  reopen   {:.3} s, {} records indexed", started.elapsed().as_secs_f64(), cache.stats().index_records);
    // Drain half of every stream, then reclaim.
    for s in cache.streams() {
        cache.ack(s.id, s.uploaded_upto + s.records / 2)?;
    }
    let reclaimed = cache.reclaim()?;
    println!("  drain    half of each stream acknowledged: {} segment(s) freed", reclaimed.segments_freed);
    let report = cache.verify();
    println!(
        "  verify   {} records, {} MiB checked: {}",
        report.records_checked,
        report.bytes_checked >> 20,
        if report.is_clean() { "clean" } else { "CORRUPT" }
    );
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
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
