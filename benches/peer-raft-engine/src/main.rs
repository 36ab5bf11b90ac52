//! Peer benchmark: the same durable-ingest workload on churnlog and on TiKV's raft-engine.
//!
//! Workload (both engines): `--streams` streams (raft-engine: one raft group each, region
//! id = stream index + 1), `--bytes` of logical data in total, in records of
//! `--record-size` incompressible bytes, every record acknowledged only once durable.
//!
//! * churnlog: `churnlog::bench::ingest::run`, default producers (min(streams, 32)), two
//!   records in flight per stream, no drain, incompressible data.
//! * raft-engine: `--threads` producer threads (each thread count is a separate run),
//!   each owning streams round-robin; every record is one `LogBatch` holding one entry for
//!   its group, written with `Engine::write(&mut batch, true)` (fdatasync before return).
//!   raft-engine groups concurrent writers itself (write barrier: one leader appends and
//!   syncs for the whole group).
//!
//! Each engine gets a fresh directory under `--dir`, deleted after its run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use protobuf::well_known_types::BytesValue;
use raft_engine::{Config, Engine, LogBatch, MessageExt, ReadableSize};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Durable ingest: churnlog vs raft-engine, same workload, one run")]
struct Cli {
    /// Parent directory; each engine runs in a fresh subdirectory, removed afterwards.
    #[arg(long)]
    dir: PathBuf,
    /// Logical bytes to write per engine run (e.g. 2GiB, 512MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    bytes: u64,
    /// Bytes per record (e.g. 64KiB).
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    record_size: u64,
    #[arg(long, default_value_t = 225)]
    streams: u32,
    /// raft-engine producer thread counts, comma separated; each is one run, best reported.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    threads: Vec<usize>,
    /// churnlog producers (default: min(streams, 32), as `churnlog bench ingest`).
    #[arg(long)]
    churnlog_producers: Option<usize>,
    /// Records one churnlog producer may have in flight (1 = a blocking writer, the same
    /// queue depth as raft-engine's blocking `write` per thread; default: 2 per stream).
    #[arg(long)]
    churnlog_inflight: Option<usize>,
    /// churnlog acknowledges records as uploaded once durable, as a process server's drain
    /// that keeps up does: sealed segments are reclaimed and their files recycled (written
    /// blocks are overwritten, which ext4 syncs without a metadata write). raft-engine
    /// runs as without it (it purges by deleting files; none is purged in a short run).
    #[arg(long)]
    churnlog_drain: bool,
    /// raft-engine writes into log files prepared (written with zeros) at open, as after
    /// purges in its steady state (`prefill_for_recycle`, with `prefill_limit` set to
    /// `--bytes` plus 256 MiB): the counterpart of `--churnlog-drain`. Preparing and
    /// syncing them is outside the timed part.
    #[arg(long)]
    raft_prefill: bool,
    /// raft-engine `batch_compression_threshold` in bytes (0 = never LZ4 a batch; its
    /// default is 8KiB, which would LZ4 every 64 KiB record).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    raft_compression_threshold: u64,
    /// Skip the churnlog run (raft-engine only).
    #[arg(long)]
    skip_churnlog: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    churnlog::size::parse_size(s)
}

#[derive(Clone, Debug)]
struct Outcome {
    mib_per_s: f64,
    p50: u32,
    p99: u32,
    p999: u32,
    max: u32,
    records: u64,
    seconds: f64,
    /// Bytes this process handed to the block layer during the run (/proc/self/io).
    proc_write_bytes: u64,
    /// Records per durable write group (fdatasync), where the engine reports it.
    records_per_group: f64,
}

impl Outcome {
    fn json(&self) -> Value {
        json!({
            "mib_per_s": round2(self.mib_per_s),
            "ack_latency_us_p50": self.p50,
            "ack_latency_us_p99": self.p99,
            "ack_latency_us_p999": self.p999,
            "ack_latency_us_max": self.max,
            "records": self.records,
            "seconds": round2(self.seconds),
            "proc_write_mib": round2(mib(self.proc_write_bytes)),
            "records_per_group": round2(self.records_per_group),
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// `write_bytes` of /proc/self/io: bytes this process caused to be sent to storage.
fn proc_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("write_bytes:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn fresh_dir(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    }
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

/// Sum of the lengths of the files directly in `path`.
fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

fn remove_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    sync_all();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// churnlog

fn run_churnlog(cli: &Cli) -> anyhow::Result<Outcome> {
    use churnlog::bench::ingest::{run, IngestParams};
    let dir = cli.dir.join("churnlog");
    fresh_dir(&dir)?;
    let mut options = churnlog::cache::Options::default();
    options.capacity_bytes = cli.bytes * 2 + (1 << 30);
    options.record_size_max = options.record_size_max.max(cli.record_size as u32);
    let params = IngestParams {
        dir: dir.clone(),
        bytes: cli.bytes,
        record_size: cli.record_size as usize,
        streams: cli.streams,
        compressible: 0.0,
        producers: cli.churnlog_producers.unwrap_or(cli.streams.min(32) as usize),
        window_per_stream: 2,
        inflight_per_producer_max: cli.churnlog_inflight,
        drain: cli.churnlog_drain,
        rate_mib_per_s: None,
        arrivals: Default::default(),
        leave_open: false,
        options,
    };
    sync_all();
    let io_before = proc_write_bytes();
    let r = run(&params)?;
    let io = proc_write_bytes() - io_before;
    eprintln!(
        "churnlog: backend {}, {} producers, {:.1} MiB/s, device {:.1} MiB/s, {:.1} records/batch, WA {:.3}",
        r.backend, r.producers, r.mib_per_s, r.device_mib_per_s, r.records_per_batch, r.write_amplification
    );
    remove_dir(&dir)?;
    Ok(Outcome {
        mib_per_s: r.mib_per_s,
        p50: r.ack_latency_us_p50,
        p99: r.ack_latency_us_p99,
        p999: r.ack_latency_us_p999,
        max: r.ack_latency_us_max,
        records: r.records,
        seconds: r.seconds,
        proc_write_bytes: io,
        records_per_group: r.records_per_batch,
    })
}

// ---------------------------------------------------------------------------------------
// raft-engine

/// Entry type for `LogBatch::add_entries`: a protobuf `BytesValue` whose first 8 bytes are
/// the raft index (little endian), the rest the record. (raft-engine's own `add_raw_entries`
/// is crate-private; the `raft` crate's `Entry` needs protoc to build. The encoding
/// overhead is 3–4 bytes per entry either way.)
struct Rec;

impl MessageExt for Rec {
    type Entry = BytesValue;
    fn index(e: &BytesValue) -> u64 {
        let v = e.get_value();
        u64::from_le_bytes(v[..8].try_into().expect("record holds an 8-byte index"))
    }
}

/// Number of write groups (leader appends + fdatasync) raft-engine has completed, from its
/// prometheus histogram `raft_engine_write_leader_duration_seconds`.
fn raft_write_groups() -> u64 {
    prometheus::gather()
        .iter()
        .find(|f| f.get_name() == "raft_engine_write_leader_duration_seconds")
        .and_then(|f| f.get_metric().first().map(|m| m.get_histogram().get_sample_count()))
        .unwrap_or(0)
}

/// One raft-engine producer thread's latencies (µs), bytes, and (region, last index) pairs.
type ThreadOutcome = (Vec<u32>, u64, Vec<(u64, u64)>);

fn run_raft_engine(cli: &Cli, threads: usize, pool: &Arc<Vec<Vec<u8>>>) -> anyhow::Result<Outcome> {
    anyhow::ensure!(threads > 0, "--threads must be positive");
    let dir = cli.dir.join(format!("raft-engine-t{threads}"));
    fresh_dir(&dir)?;
    let cfg = Config {
        dir: dir.to_str().context("non-UTF-8 dir")?.to_owned(),
        target_file_size: ReadableSize::mb(128),
        batch_compression_threshold: ReadableSize(cli.raft_compression_threshold),
        // purge_threshold (10 GiB) stays above what a run writes: no purge/rewrite.
        purge_threshold: ReadableSize((cli.bytes * 2 + (1 << 30)).max(10 << 30)),
        prefill_for_recycle: cli.raft_prefill,
        prefill_limit: cli.raft_prefill.then(|| ReadableSize(cli.bytes + (256 << 20))),
        ..Config::default()
    };
    let engine = Arc::new(Engine::open(cfg)?);
    let records_total = (cli.bytes / cli.record_size).max(1);
    let groups_before = raft_write_groups();
    sync_all();
    let io_before = proc_write_bytes();
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..threads {
        // Streams round-robin over threads; region id = stream index + 1.
        let mine: Vec<u64> = (0..u64::from(cli.streams)).skip(t).step_by(threads).map(|s| s + 1).collect();
        if mine.is_empty() {
            continue;
        }
        let share = records_total / threads as u64 + u64::from((t as u64) < records_total % threads as u64);
        let (engine, pool) = (engine.clone(), pool.clone());
        handles.push(std::thread::spawn(move || -> anyhow::Result<ThreadOutcome> {
            let mut next_index = vec![1u64; mine.len()];
            let mut latencies = Vec::with_capacity(share as usize);
            let mut bytes = 0u64;
            let mut batch = LogBatch::default();
            let mut entry = BytesValue::new();
            for i in 0..share {
                let k = (i % mine.len() as u64) as usize;
                let region = mine[k];
                let data = &pool[((i * 7 + region) % pool.len() as u64) as usize];
                // Build the entry (outside the timed section, as a raft `Entry` would
                // already exist): record bytes, first 8 replaced by the raft index.
                let mut v = entry.take_value();
                v.clear();
                v.extend_from_slice(data);
                v[..8].copy_from_slice(&next_index[k].to_le_bytes());
                entry.set_value(v);
                let at = Instant::now();
                batch.add_entries::<Rec>(region, std::slice::from_ref(&entry))?;
                engine.write(&mut batch, true)?;
                latencies.push(at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                next_index[k] += 1;
                bytes += data.len() as u64;
            }
            let last: Vec<(u64, u64)> = mine.iter().zip(&next_index).map(|(&r, &n)| (r, n - 1)).collect();
            Ok((latencies, bytes, last))
        }));
    }
    let mut latencies = Vec::with_capacity(records_total as usize);
    let mut logical = 0u64;
    let mut last_indexes = Vec::new();
    for h in handles {
        let (l, b, last) = h.join().map_err(|_| anyhow::anyhow!("producer panicked"))??;
        latencies.extend(l);
        logical += b;
        last_indexes.extend(last);
    }
    let seconds = started.elapsed().as_secs_f64();
    let io = proc_write_bytes() - io_before;
    let groups = raft_write_groups() - groups_before;
    // Sanity: every group holds every entry written to it.
    for (region, want) in last_indexes {
        let have = engine.last_index(region).unwrap_or(0);
        anyhow::ensure!(have == want, "region {region}: last index {have}, expected {want}");
    }
    drop(engine);
    let on_disk = dir_bytes(&dir);
    remove_dir(&dir)?;
    latencies.sort_unstable();
    let records = latencies.len() as u64;
    eprintln!(
        "raft-engine: {threads} threads, {:.1} MiB/s, {groups} write groups ({:.1} records/group), {:.1} MiB in log files",
        mib(logical) / seconds,
        records as f64 / groups.max(1) as f64,
        mib(on_disk)
    );
    Ok(Outcome {
        mib_per_s: mib(logical) / seconds,
        p50: churnlog::bench::percentile(&latencies, 50.0),
        p99: churnlog::bench::percentile(&latencies, 99.0),
        p999: churnlog::bench::percentile(&latencies, 99.9),
        max: latencies.last().copied().unwrap_or(0),
        records,
        seconds,
        proc_write_bytes: io,
        records_per_group: if groups > 0 { records as f64 / groups as f64 } else { 0.0 },
    })
}

// ---------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.streams > 0, "--streams must be positive");
    anyhow::ensure!(cli.record_size >= 8, "--record-size must be at least 8 bytes (raft index)");
    anyhow::ensure!(!cli.threads.is_empty(), "--threads needs at least one count");
    std::fs::create_dir_all(&cli.dir)?;

    // The same 64 distinct incompressible records churnlog's ingest cycles through.
    let pool: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..64u32)
            .map(|v| {
                let mut b = Vec::new();
                churnlog::bench::record_bytes(v, u64::from(v) + 1, cli.record_size as usize, 0.0, &mut b);
                b
            })
            .collect(),
    );

    let churn = if cli.skip_churnlog { None } else { Some(run_churnlog(&cli)?) };
    let mut raft: Vec<(usize, Outcome)> = Vec::new();
    for &t in &cli.threads {
        raft.push((t, run_raft_engine(&cli, t, &pool)?));
    }
    let (best_t, best) =
        raft.iter().max_by(|a, b| a.1.mib_per_s.total_cmp(&b.1.mib_per_s)).cloned().expect("at least one thread count");

    if cli.json {
        let mut threads = serde_json::Map::new();
        for (t, o) in &raft {
            threads.insert(t.to_string(), o.json());
        }
        let mut best_json = best.json();
        best_json["threads"] = json!(best_t);
        let out = json!({
            "workload": {
                "bytes": cli.bytes,
                "record_size": cli.record_size,
                "streams": cli.streams,
                "compressible": 0.0,
                "sync": "every record durable before ack",
            },
            "churnlog": churn.as_ref().map(Outcome::json),
            "churnlog_drain": cli.churnlog_drain,
            "raft_engine": {
                "version": "0.4.2",
                "batch_compression_threshold": cli.raft_compression_threshold,
                "target_file_size": 128u64 << 20,
                "prefill_for_recycle": cli.raft_prefill,
                "threads": threads,
                "best": best_json,
            },
            "ratio_throughput": churn.as_ref().map(|c| round3(c.mib_per_s / best.mib_per_s)),
            "ratio_p99": churn.as_ref().map(|c| round3(f64::from(c.p99) / f64::from(best.p99.max(1)))),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "durable ingest: {:.0} MiB in {} B records, {} streams, incompressible, sync every record",
            mib(cli.bytes),
            cli.record_size,
            cli.streams
        );
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10}",
            "engine", "MiB/s", "p50 us", "p99 us", "p99.9 us", "rec/grp", "io MiB"
        );
        let row = |name: String, o: &Outcome| {
            println!(
                "{:<26} {:>9.1} {:>9} {:>9} {:>9} {:>8.1} {:>10.0}",
                name,
                o.mib_per_s,
                o.p50,
                o.p99,
                o.p999,
                o.records_per_group,
                mib(o.proc_write_bytes)
            )
        };
        if let Some(c) = &churn {
            row(format!("churnlog ({} producers)", cli.churnlog_producers.unwrap_or(cli.streams.min(32) as usize)), c);
        }
        for (t, o) in &raft {
            row(format!("raft-engine 0.4.2 ({t} thr)"), o);
        }
        if let Some(c) = &churn {
            println!(
                "churnlog / raft-engine best ({best_t} thr): throughput x{:.2}, p99 x{:.2}",
                c.mib_per_s / best.mib_per_s,
                f64::from(c.p99) / f64::from(best.p99.max(1))
            );
        }
    }
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
