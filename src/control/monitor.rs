//! The monitor task: samples the process server every interval (cache space and streams,
//! ingest and drain counters, host CPU and memory, the machine book), judges health
//! ([`super::health`]), and publishes the result as the current [`Heartbeat`] (which the
//! heartbeat task sends, `/status.json` serves and `ps run` logs) and as metrics.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::api::{Heartbeat, MachineReport, MachineState};
use super::book::MachineBook;
use super::health::{self, MachineSample, Sample, Thresholds};
use super::metrics::{PsMetrics, Totals};
use super::sysinfo::HostSampler;
use crate::cache::Cache;
use crate::drain::{DrainStats, Handoffs};
use crate::ingest::IngestStats;

/// Rates are measured over this much recent history.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The latest sample, shared with the heartbeat task and the status listener.
pub type Snapshot = Arc<RwLock<Heartbeat>>;

/// What the monitor reads.
pub struct Monitor {
    pub id: String,
    pub cache: Arc<Cache>,
    pub ingest: Arc<IngestStats>,
    pub drain: Arc<DrainStats>,
    pub book: Option<Arc<MachineBook>>,
    /// The drain's hand-overs: a machine moving away is released once its disks are
    /// uploaded and marked handed over, so the next server continues their history.
    pub handoffs: Handoffs,
    pub thresholds: Thresholds,
    pub metrics: Arc<PsMetrics>,
    host: HostSampler,
    /// (when, totals) of recent samples, oldest first.
    history: VecDeque<(Instant, Totals)>,
    /// Since when the backlog has been non-zero with no upload; None when moving.
    stalled_since: Option<Instant>,
}

fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Monitor {
    // Each argument is one thing the monitor reads; a struct for them would only repeat
    // the fields of `Monitor`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        cache: Arc<Cache>,
        ingest: Arc<IngestStats>,
        drain: Arc<DrainStats>,
        book: Option<Arc<MachineBook>>,
        handoffs: Handoffs,
        thresholds: Thresholds,
        metrics: Arc<PsMetrics>,
    ) -> Monitor {
        Monitor {
            id,
            cache,
            ingest,
            drain,
            book,
            handoffs,
            thresholds,
            metrics,
            host: HostSampler::default(),
            history: VecDeque::new(),
            stalled_since: None,
        }
    }

    fn totals(&self) -> Totals {
        Totals {
            ingest_bytes: self.ingest.write_bytes.load(Ordering::Relaxed),
            upload_bytes: self.drain.uploaded_bytes.load(Ordering::Relaxed),
            throttled_records: self.ingest.throttled_records.load(Ordering::Relaxed),
        }
    }

    /// One sample: the report as the CS would get it now. Updates the metrics.
    pub fn sample(&mut self) -> Heartbeat {
        let now = Instant::now();
        let totals = self.totals();
        let before = self.history.back().map_or(totals, |(_, t)| *t);
        self.history.push_back((now, totals));
        while self.history.len() > 2 && now.duration_since(self.history[1].0) >= RATE_WINDOW {
            self.history.pop_front();
        }
        let (t0, first) = self.history[0];
        let dt = now.duration_since(t0).as_secs_f64();
        let rate = |a: u64, b: u64| if dt > 0.0 { b.saturating_sub(a) as f64 / dt } else { 0.0 };
        let ingest_rate = rate(first.ingest_bytes, totals.ingest_bytes);
        let upload_rate = rate(first.upload_bytes, totals.upload_bytes);

        let space = self.cache.space();
        let capacity = space.capacity_bytes.max(1) as f64;
        let cache_free_percent = 100.0 * (1.0 - space.used_bytes as f64 / capacity).max(0.0);
        // Per machine: pending bytes, disks needing a resync. (Whether a machine moving
        // away is all uploaded is the drain's to tell: `Handoffs`.)
        #[derive(Default)]
        struct PerMachine {
            pending: u64,
            resync: Vec<String>,
        }
        let mut machines: BTreeMap<String, PerMachine> = BTreeMap::new();
        let mut backlog = 0;
        for s in self.cache.streams() {
            let m = machines.entry(s.machine.clone()).or_default();
            m.pending += s.stored_bytes;
            if s.resync_required {
                m.resync.push(s.disk.clone());
            }
            backlog += s.stored_bytes;
        }
        let assigned = self.book.as_ref().map(|b| b.machines()).unwrap_or_default();
        for (name, _) in &assigned {
            machines.entry(name.clone()).or_default();
        }
        let moved = upload_rate > 0.0 || totals.upload_bytes != before.upload_bytes;
        self.stalled_since = match (backlog > 0 && !moved, self.stalled_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, since) => since,
        };
        let now_ms = unix_ms_now();
        let reports: Vec<MachineReport> = machines
            .iter()
            .map(|(name, m)| MachineReport {
                name: name.clone(),
                rpo_seconds: self.drain.machine_point_ms(name).map(|ms| now_ms.saturating_sub(ms) as f64 / 1000.0),
                resync_required: !m.resync.is_empty(),
                pending_bytes: m.pending,
            })
            .collect();
        let (cpu, memory) = self.host.sample();
        let sample = Sample {
            cache_free_percent,
            backlog_bytes: backlog,
            upload_bytes_per_second: upload_rate,
            stalled_seconds: self.stalled_since.map_or(0.0, |s| now.duration_since(s).as_secs_f64()),
            cpu_percent: cpu,
            memory_percent: memory,
            machines: reports
                .iter()
                .map(|r| MachineSample {
                    name: r.name.clone(),
                    rpo_seconds: r.rpo_seconds,
                    resync_disks: machines[&r.name].resync.clone(),
                })
                .collect(),
            poisoned: self.cache.is_poisoned(),
        };
        let alerts = health::evaluate(&self.thresholds, &sample);
        // A machine moving away is handed over once its sessions are closed (the drain
        // then uploads everything cached for it and marks its disks), and released once
        // the hand-over is done. A machine that stays (or came back) cancels it.
        let mut released = Vec::new();
        if let Some(book) = &self.book {
            for (name, state) in &assigned {
                if *state != MachineState::MovingAway {
                    self.handoffs.cancel(name);
                } else if self.handoffs.is_done(name) {
                    released.push(name.clone());
                } else if book.sessions_of(name) == 0 {
                    self.handoffs.request(name);
                }
            }
        }
        let hb = Heartbeat {
            id: self.id.clone(),
            version: super::VERSION.to_string(),
            health: health::level(&alerts),
            alerts,
            cache_size_bytes: space.capacity_bytes,
            cache_free_percent,
            backlog_bytes: backlog,
            ingest_bytes_per_second: ingest_rate,
            upload_bytes_per_second: upload_rate,
            cpu_percent: cpu.unwrap_or(0.0),
            memory_percent: memory.unwrap_or(0.0),
            machines: reports,
            released,
            resync_applied: self.book.as_ref().map(|b| b.resync_applied()).unwrap_or_default(),
        };
        self.metrics.update(&hb, before, totals, health::throttled(&self.thresholds, cache_free_percent));
        hb
    }
}

/// The running monitor.
pub struct MonitorTask {
    pub snapshot: Snapshot,
    stop: watch::Sender<bool>,
    task: JoinHandle<Monitor>,
}

impl MonitorTask {
    /// Takes a first sample now (so the snapshot is never empty), then one every `interval`.
    pub fn start(mut monitor: Monitor, interval: Duration) -> MonitorTask {
        let snapshot = Arc::new(RwLock::new(monitor.sample()));
        let (stop, mut stopped) = watch::channel(false);
        let shared = snapshot.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        // Reads the cache's stream list under its lock: off the reactor.
                        let hb = tokio::task::block_in_place(|| monitor.sample());
                        *shared.write() = hb;
                    }
                    _ = stopped.changed() => break,
                }
            }
            monitor
        });
        MonitorTask { snapshot, stop, task }
    }

    /// Stops sampling; the monitor (and its cache handle) is dropped.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
