//! `churnlog bench ingest`: many concurrent producers append to one cache; only records
//! acknowledged durable count. Optionally a drainer acknowledges uploads behind them, so
//! segments are reclaimed as in normal operation.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{AppendError, AppendTicket, Cache, Options, StreamId};

#[derive(Clone, Debug)]
pub struct IngestParams {
    pub dir: PathBuf,
    pub bytes: u64,
    pub record_size: usize,
    pub streams: u32,
    /// Fraction of each record that compresses away (0 = incompressible, 0.5 ≈ 2:1).
    pub compressible: f64,
    pub producers: usize,
    /// Records each stream may have in flight (appended, not yet durable).
    pub window_per_stream: usize,
    /// Caps the records one producer has in flight, whatever its stream count: with 1,
    /// a producer behaves like a blocking writer (one write at a time).
    pub inflight_per_producer_max: Option<usize>,
    /// Acknowledge records as uploaded once durable, as a keeping-up drain would.
    pub drain: bool,
    /// Pace producers to this many logical MiB/s in total (None: as fast as possible).
    pub rate_mib_per_s: Option<f64>,
    /// When paced: how each producer spaces its records in time.
    pub arrivals: Arrivals,
    /// Leave the cache open on return (the caller exits as a crash would).
    pub leave_open: bool,
    pub options: Options,
}

/// The arrival process of a paced run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum Arrivals {
    /// Independent sources: exponential gaps between a producer's records (a Poisson
    /// process per producer, seeded), and latency counted from the record's scheduled
    /// time, so a producer that falls behind its schedule shows it.
    #[default]
    Poisson,
    /// Every producer on the same fixed grid from the same start: all of them append at
    /// the same instants (synchronized bursts of `producers` records). Latency from the
    /// append call. The figure reported before 2026-11-26.
    Lockstep,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct IngestResult {
    pub mib_per_s: f64,
    pub device_mib_per_s: f64,
    pub ack_latency_us_p50: u32,
    pub ack_latency_us_p99: u32,
    pub ack_latency_us_p999: u32,
    pub ack_latency_us_max: u32,
    /// Latencies taken at the producer's look instead of at durability, because the
    /// engine no longer kept the resolution time (more than 256 batches before): upper
    /// bounds. 0 in a sound run.
    pub ack_latency_inexact: u64,
    pub records: u64,
    pub seconds: f64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub device_bytes: u64,
    /// device bytes ÷ stored bytes (segment files only)
    pub write_amplification: f64,
    /// META rewrites during the run (with `--drain`: one per 20 ms acknowledgement pass)
    /// and their bytes in whole blocks.
    pub meta_writes: u64,
    pub meta_bytes: u64,
    /// (device bytes + META bytes) ÷ stored bytes: everything the engine wrote.
    pub write_amplification_with_meta: f64,
    /// LZ4 acceleration over the run, sampled every 10 ms (1 = standard LZ4).
    pub lz4_acceleration_mean: f64,
    pub lz4_acceleration_max: u32,
    pub batches: u64,
    pub records_per_batch: f64,
    /// CPU time (user + system) of the whole process during the run: the engine and the
    /// bench's own producer threads. None where /proc is unavailable.
    pub cpu_seconds: Option<f64>,
    /// `cpu_seconds` per logical MiB acknowledged, in milliseconds: the cost that sizes
    /// cores (1000 ÷ this = logical MiB/s per fully used core).
    pub cpu_ms_per_logical_mib: Option<f64>,
    pub streams: u32,
    pub producers: usize,
    pub record_size: usize,
    pub backend: String,
}

pub fn run(p: &IngestParams) -> anyhow::Result<IngestResult> {
    anyhow::ensure!(
        p.streams > 0 && p.producers > 0 && p.record_size > 0,
        "streams, producers and record size must be positive"
    );
    let cache = Arc::new(Cache::open(&p.dir, p.options.clone())?);
    let streams: Vec<StreamId> =
        (0..p.streams).map(|i| cache.stream(&format!("machine-{i:04}"), "disk-0")).collect::<Result<_, _>>()?;
    let records_total = (p.bytes / p.record_size as u64).max(1);
    // Pre-generated contents: producers cycle through them so generation costs nothing.
    let variants = 64usize;
    let pool: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..variants)
            .map(|v| {
                let mut b = Vec::new();
                super::record_bytes(v as u32, v as u64 + 1, p.record_size, p.compressible, &mut b);
                b
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let drainer = p.drain.then(|| {
        let (cache, streams, stop) = (cache.clone(), streams.clone(), stop.clone());
        std::thread::spawn(move || {
            // Every 20 ms, everything durable is acknowledged in one META write, as an
            // uploader that finished a round over the streams would.
            let mut acks = Vec::with_capacity(streams.len());
            while !stop.load(Ordering::Relaxed) {
                acks.clear();
                for &s in &streams {
                    if let Some(info) = cache.stream_info(s) {
                        if info.durable_upto > info.uploaded_upto {
                            acks.push((s, info.durable_upto));
                        }
                    }
                }
                let _ = cache.ack_many(&acks);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    });
    let sampler = {
        let (cache, stop) = (cache.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut sum, mut n, mut max) = (0u64, 0u64, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let a = cache.lz4_acceleration();
                (sum, n, max) = (sum + u64::from(a), n + 1, max.max(a));
                std::thread::sleep(Duration::from_millis(10));
            }
            (sum as f64 / n.max(1) as f64, max)
        })
    };
    let before = cache.stats();
    let cpu_before = super::process_cpu_seconds();
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..p.producers {
        let mine: Vec<StreamId> = streams.iter().copied().skip(t).step_by(p.producers).collect();
        if mine.is_empty() {
            continue;
        }
        let share = records_total / p.producers as u64 + u64::from((t as u64) < records_total % p.producers as u64);
        let (cache, pool) = (cache.clone(), pool.clone());
        let window =
            (p.window_per_stream.max(1) * mine.len()).min(p.inflight_per_producer_max.unwrap_or(usize::MAX)).max(1);
        // Bytes per second this producer may send when paced.
        let pace = p.rate_mib_per_s.map(|r| r * (1u64 << 20) as f64 / p.producers as f64);
        let (record_size, arrivals) = (p.record_size, p.arrivals);
        handles.push(std::thread::spawn(move || -> anyhow::Result<(Vec<u32>, u64, u64)> {
            // Tickets in flight, oldest first, at most `window`. The engine keeps the moment
            // each batch was resolved, so a latency runs to the moment the record became
            // durable however late the producer looks; no thread waits beside it.
            let mut inflight: VecDeque<(AppendTicket, Instant, usize)> = VecDeque::with_capacity(window);
            let mut latencies = Vec::with_capacity(share as usize);
            let (mut bytes, mut inexact) = (0u64, 0u64);
            let mut settle =
                |at: Instant, len: usize, (result, durable_at): (Result<u64, AppendError>, Option<Instant>)| {
                    result?;
                    // Looked at too late for the engine's kept times: the look's time is an
                    // upper bound, and is counted so a run can say so.
                    let durable_at = durable_at.unwrap_or_else(|| {
                        inexact += 1;
                        Instant::now()
                    });
                    latencies
                        .push(durable_at.saturating_duration_since(at).as_micros().min(u128::from(u32::MAX)) as u32);
                    bytes += len as u64;
                    anyhow::Ok(())
                };
            let mut i = 0u64;
            let t0 = Instant::now();
            // Poisson arrivals: seeded per producer, so runs repeat.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ ((t as u64 + 1) << 17);
            let mut next_due = Duration::ZERO;
            while i < share {
                let mut scheduled = None;
                if let Some(bps) = pace {
                    let gap_s = record_size as f64 / bps;
                    let due = match arrivals {
                        Arrivals::Lockstep => Duration::from_secs_f64(i as f64 * gap_s),
                        Arrivals::Poisson => next_due,
                    };
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    if arrivals == Arrivals::Poisson {
                        scheduled = Some(t0 + due);
                    }
                }
                // A full window blocks on its oldest ticket. Paced, a window may take
                // hundreds of batches to fill, so resolved tickets are taken on every
                // pass, while the engine still keeps their times.
                let full = inflight.len() >= window;
                if full {
                    if let Some((ticket, at, len)) = inflight.pop_front() {
                        settle(at, len, ticket.wait_at())?;
                    }
                }
                if full || pace.is_some() {
                    while let Some(resolved) = inflight.front().and_then(|(ticket, _, _)| ticket.try_result_at()) {
                        if let Some((_, at, len)) = inflight.pop_front() {
                            settle(at, len, resolved)?;
                        }
                    }
                }
                let s = mine[(i % mine.len() as u64) as usize];
                let data = &pool[((i * 7 + u64::from(s.0)) % pool.len() as u64) as usize];
                let at = scheduled.unwrap_or_else(Instant::now);
                match cache.append(s, data) {
                    Ok(ticket) => {
                        inflight.push_back((ticket, at, data.len()));
                        i += 1;
                        if let (Some(bps), Arrivals::Poisson) = (pace, arrivals) {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            // Uniform in (0, 1], then an exponential gap with the paced mean.
                            let u = ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                            next_due += Duration::from_secs_f64(-u.ln() * record_size as f64 / bps);
                        }
                    }
                    Err(AppendError::Backpressure { .. }) => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => return Err(e.into()),
                }
            }
            for (ticket, at, len) in inflight.drain(..) {
                settle(at, len, ticket.wait_at())?;
            }
            Ok((latencies, bytes, inexact))
        }));
    }
    let outcomes: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_before.zip(super::process_cpu_seconds()).map(|(b, a)| a - b);
    // Stop the helper threads before reporting any producer's failure.
    stop.store(true, Ordering::Relaxed);
    if let Some(d) = drainer {
        let _ = d.join();
    }
    let (lz4_acceleration_mean, lz4_acceleration_max) =
        sampler.join().map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    let mut latencies = Vec::with_capacity(records_total as usize);
    let (mut logical, mut ack_latency_inexact) = (0u64, 0u64);
    for outcome in outcomes {
        let (l, b, inexact) = outcome.map_err(|_| anyhow::anyhow!("producer panicked"))??;
        latencies.extend(l);
        logical += b;
        ack_latency_inexact += inexact;
    }
    let after = cache.stats();
    latencies.sort_unstable();
    let device = after.device_bytes - before.device_bytes;
    let (meta_writes, meta_bytes) = (after.meta_writes - before.meta_writes, after.meta_bytes - before.meta_bytes);
    let stored = after.stored_bytes - before.stored_bytes;
    let batches = after.batches - before.batches;
    let backend = cache.backend_name().to_string();
    if p.leave_open {
        // The flusher keeps running until the process exits, as it would at a kill.
        std::mem::forget(cache);
    } else {
        drop(cache);
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(IngestResult {
        mib_per_s: mib(logical) / seconds,
        device_mib_per_s: mib(device) / seconds,
        ack_latency_us_p50: super::percentile(&latencies, 50.0),
        ack_latency_us_p99: super::percentile(&latencies, 99.0),
        ack_latency_us_p999: super::percentile(&latencies, 99.9),
        ack_latency_us_max: latencies.last().copied().unwrap_or(0),
        ack_latency_inexact,
        records: latencies.len() as u64,
        seconds,
        logical_bytes: logical,
        stored_bytes: stored,
        device_bytes: device,
        write_amplification: if stored > 0 { device as f64 / stored as f64 } else { 0.0 },
        meta_writes,
        meta_bytes,
        write_amplification_with_meta: if stored > 0 { (device + meta_bytes) as f64 / stored as f64 } else { 0.0 },
        lz4_acceleration_mean,
        lz4_acceleration_max,
        batches,
        records_per_batch: if batches > 0 { latencies.len() as f64 / batches as f64 } else { 0.0 },
        cpu_seconds,
        cpu_ms_per_logical_mib: cpu_seconds.filter(|_| logical > 0).map(|c| c * 1000.0 / mib(logical)),
        streams: p.streams,
        producers: p.producers,
        record_size: p.record_size,
        backend,
    })
}

/// `churnlog bench ingest`'s report: the run, and the device's own figure beside it when
/// it was measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IngestReport {
    #[serde(flatten)]
    pub result: IngestResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_limit_mib_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_device: Option<f64>,
}

impl IngestReport {
    pub fn new(result: IngestResult, device_limit_mib_per_s: Option<f64>) -> IngestReport {
        let ratio_to_device = device_limit_mib_per_s.map(|d| result.mib_per_s / d);
        IngestReport { result, device_limit_mib_per_s, ratio_to_device }
    }
}

impl std::fmt::Display for IngestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.result;
        write!(
            f,
            "ingest: {:.1} MiB/s logical, {:.1} MiB/s to the device, {} records in {:.2} s, ack p50 {} us p99 {} us, {:.1} records/batch, write amplification {:.3}",
            r.mib_per_s, r.device_mib_per_s, r.records, r.seconds, r.ack_latency_us_p50, r.ack_latency_us_p99, r.records_per_batch, r.write_amplification
        )?;
        if r.ack_latency_inexact > 0 {
            write!(
                f,
                "\nwarning: {} ack latencies were taken late (their batch's time was no longer kept): upper bounds",
                r.ack_latency_inexact
            )?;
        }
        if r.meta_writes > 0 {
            write!(
                f,
                "\nmeta: {} rewrites, {:.1} MiB; write amplification with META {:.3}",
                r.meta_writes,
                r.meta_bytes as f64 / (1u64 << 20) as f64,
                r.write_amplification_with_meta
            )?;
        }
        if r.stored_bytes < r.logical_bytes {
            write!(
                f,
                "\ncompression: stored {:.3} of logical, LZ4 acceleration mean {:.1} (max {})",
                r.stored_bytes as f64 / r.logical_bytes as f64,
                r.lz4_acceleration_mean,
                r.lz4_acceleration_max
            )?;
        }
        if let (Some(cpu), Some(per_mib)) = (r.cpu_seconds, r.cpu_ms_per_logical_mib) {
            write!(
                f,
                "\ncpu: {cpu:.2} s ({:.2} cores busy), {per_mib:.3} ms per logical MiB (engine and bench threads)",
                cpu / r.seconds
            )?;
        }
        if let (Some(d), Some(ratio)) = (self.device_limit_mib_per_s, self.ratio_to_device) {
            write!(
                f,
                "\ndevice: {d:.1} MiB/s (O_DIRECT 1 MiB writes, fdatasync every 4 MiB): churnlog at {ratio:.2}x"
            )?;
        }
        Ok(())
    }
}
