//! One process server: the cache, the TLS ingest server in front of it and the drain
//! behind it, started and stopped together in the only order that loses nothing. `ps
//! run`, the demo, `bench e2e` and the end-to-end tests all run this one wiring; its
//! [`ProcessServer::status`] is what an operator (and, later, the configuration server's
//! heartbeat) sees.
//!
//! Start: open (recover) the cache, then listen, then drain. Stop: the drain first (its
//! acknowledgements are in META), then the ingest server (every session winds down, so no
//! task still holds the cache), then close the cache (the open segment is sealed).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::{Cache, CloseError, OpenError, Options, SpaceReport};
use crate::control::api::{Alert, HealthLevel, Heartbeat};
use crate::control::book::MachineBook;
use crate::control::health::Thresholds;
use crate::control::heartbeat::{Beat, HeartbeatTask};
use crate::control::metrics::{MetricsError, PsMetrics};
use crate::control::monitor::{Monitor, MonitorTask, Snapshot};
use crate::control::ps_link::{self, LinkConfig, LinkError};
use crate::control::status_http::{StatusHttp, StatusHttpError};
use crate::drain::{DrainConfig, DrainStats, Drainer, DRAIN_TAIL_CACHE_BYTES};
use crate::ingest::{IngestConfig, IngestError, IngestServer, IngestStats};
use crate::protocol::RECORD_BYTES_MAX;
use crate::store::Target;

/// Everything a process server is started with.
#[derive(Clone, Debug)]
pub struct ProcessServerConfig {
    pub cache_dir: PathBuf,
    pub cache: Options,
    pub ingest: IngestConfig,
    pub target: Target,
    pub drain: DrainConfig,
    pub control: ControlConfig,
}

/// The control-plane side of a process server: its CS (none: standalone), health
/// thresholds, and the local metrics and status listener.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// Register with this CS and heartbeat to it; agents then log in with their own
    /// credentials. None: standalone, passphrase-only logins.
    pub link: Option<LinkConfig>,
    pub thresholds: Thresholds,
    /// `GET /metrics` and `GET /status.json` on this address (plain HTTP).
    pub metrics_listen: Option<SocketAddr>,
    /// How often health and metrics are sampled.
    pub monitor_interval: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            link: None,
            thresholds: Thresholds::default(),
            metrics_listen: None,
            monitor_interval: Duration::from_secs(1),
        }
    }
}

impl ProcessServerConfig {
    /// A process server with the defaults for everything but where it keeps its cache,
    /// how large that may grow, how agents reach it and where it drains to.
    pub fn new(cache_dir: PathBuf, cache_size_bytes: u64, ingest: IngestConfig, target: Target) -> Self {
        ProcessServerConfig {
            cache_dir,
            cache: Self::cache_options(cache_size_bytes),
            ingest,
            target,
            drain: DrainConfig::default(),
            control: ControlConfig::default(),
        }
    }

    /// The cache options a process server needs: records as large as the protocol's
    /// largest, and a tail cache the drain reads from.
    pub fn cache_options(capacity_bytes: u64) -> Options {
        Options {
            capacity_bytes,
            record_size_max: RECORD_BYTES_MAX as u32,
            tail_cache_bytes: DRAIN_TAIL_CACHE_BYTES,
            ..Options::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessServerError {
    #[error("open the cache in {dir}: {source}")]
    Open { dir: PathBuf, source: OpenError },
    #[error("ingest server: {0}")]
    Ingest(#[from] IngestError),
    #[error("close the cache: {0}")]
    Close(#[from] CloseError),
    #[error("the cache is still held elsewhere ({holders} holders) after the server stopped")]
    CacheStillShared { holders: usize },
    #[error("a background task panicked: {0}")]
    Panicked(String),
    #[error("configuration server: {0}")]
    Link(#[from] LinkError),
    #[error("{0}")]
    Metrics(#[from] MetricsError),
    #[error("{0}")]
    StatusHttp(#[from] StatusHttpError),
    #[error("health thresholds: {0}")]
    Thresholds(#[from] crate::control::health::ThresholdError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A running process server.
pub struct ProcessServer {
    /// Where agents connect.
    pub local_addr: SocketAddr,
    /// The server's certificate, for agents to trust.
    pub cert_pem: String,
    /// The ingest server's counters.
    pub stats: Arc<IngestStats>,
    cache: Arc<Cache>,
    ingest: IngestServer,
    target: Target,
    drain_config: DrainConfig,
    drain: Option<DrainTask>,
    drain_stats: Arc<DrainStats>,
    started: Instant,
    monitor: MonitorTask,
    heartbeat: Option<HeartbeatTask>,
    status_http: Option<StatusHttp>,
    book: Option<Arc<MachineBook>>,
    /// Where `/metrics` and `/status.json` are served, when they are.
    pub metrics_addr: Option<SocketAddr>,
}

struct DrainTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DrainTask {
    fn start(cache: Arc<Cache>, target: Target, cfg: DrainConfig, stats: Arc<DrainStats>) -> DrainTask {
        let (stop, stopped) = watch::channel(false);
        DrainTask { stop, task: tokio::spawn(Drainer::with_stats(cache, target, cfg, stats).run(stopped)) }
    }

    async fn stop(self) -> Result<(), ProcessServerError> {
        let _ = self.stop.send(true);
        self.task.await.map_err(|e| ProcessServerError::Panicked(format!("drain: {e}")))
    }
}

impl ProcessServer {
    /// Opens (recovers) the cache; with a CS, registers and fetches its machines; starts
    /// listening, draining, sampling health (and serving metrics), and heartbeats.
    pub async fn start(cfg: ProcessServerConfig) -> Result<ProcessServer, ProcessServerError> {
        let ProcessServerConfig { cache_dir, cache: options, mut ingest, target, mut drain, control } = cfg;
        control.thresholds.validate()?;
        let cache_size_bytes = options.capacity_bytes;
        // Recovery reads the whole cache directory: off the runtime's worker threads.
        let dir = cache_dir.clone();
        let cache = tokio::task::spawn_blocking(move || Cache::open(&dir, options))
            .await
            .map_err(|e| ProcessServerError::Panicked(format!("cache open: {e}")))?
            .map_err(|source| ProcessServerError::Open { dir: cache_dir, source })?;
        let cache = Arc::new(cache);
        ingest.throttle.free_percent_min = control.thresholds.cache_free_throttle_percent;
        // With a CS: register before listening (a refusal, the version rule's among them,
        // fails the start), and every login is checked against the machine book.
        let mut link = None;
        if let Some(cfg) = &control.link {
            let (_, cert_pem) = crate::tls::server_config(&ingest.tls_dir, &ingest.tls_names)?;
            let registered = ps_link::register(cfg, &cert_pem, cache_size_bytes).await?;
            let client = cfg.client()?;
            let book = MachineBook::new();
            ingest.book = Some(book.clone());
            let mut interval = cfg.heartbeat_interval;
            if registered.heartbeat_interval_seconds > 0 {
                interval = interval.min(Duration::from_secs(registered.heartbeat_interval_seconds));
            }
            tracing::info!(cs = %cfg.cs_address, cs_version = %registered.cs_version, ps_id = %cfg.ps_id, "registered with the configuration server");
            link = Some((client, book, interval, cfg.ps_id.clone()));
            // Nothing is uploaded until the first heartbeat's reply says which machines
            // are this server's (a server purged while away must not upload them).
            drain.ownership = crate::drain::Ownership::linked();
        }
        if ingest.hashes.is_none() {
            ingest.hashes = Some(crate::ingest::hashes::HashSource::new(target.clone()));
        }
        let ingest = IngestServer::start(cache.clone(), ingest).await?;
        let drain_stats = Arc::new(DrainStats::default());
        let drain_task = DrainTask::start(cache.clone(), target.clone(), drain.clone(), drain_stats.clone());
        let metrics = Arc::new(PsMetrics::new(&ingest.stats.ack_latency)?);
        let monitor = Monitor::new(
            link.as_ref().map(|l| l.3.clone()).unwrap_or_default(),
            cache.clone(),
            ingest.stats.clone(),
            drain_stats.clone(),
            link.as_ref().map(|l| l.1.clone()),
            drain.handoffs.clone(),
            control.thresholds.clone(),
            metrics.clone(),
        );
        let monitor = MonitorTask::start(monitor, control.monitor_interval);
        let mut server = ProcessServer {
            local_addr: ingest.local_addr,
            cert_pem: ingest.cert_pem.clone(),
            stats: ingest.stats.clone(),
            cache,
            ingest,
            target,
            drain_config: drain,
            drain: Some(drain_task),
            drain_stats,
            started: Instant::now(),
            monitor,
            heartbeat: None,
            status_http: None,
            book: link.as_ref().map(|l| l.1.clone()),
            metrics_addr: None,
        };
        if let Some(addr) = control.metrics_listen {
            match StatusHttp::start(addr, metrics, server.monitor.snapshot.clone()).await {
                Ok(h) => {
                    server.metrics_addr = Some(h.local_addr);
                    server.status_http = Some(h);
                }
                Err(e) => {
                    let _ = server.stop().await;
                    return Err(e.into());
                }
            }
        }
        if let Some((client, book, interval, _)) = link {
            let beat = Beat {
                client,
                snapshot: server.monitor.snapshot.clone(),
                book,
                cache: server.cache.clone(),
                handoffs: server.drain_config.handoffs.clone(),
                ownership: server.drain_config.ownership.clone(),
            };
            // The first heartbeat now: the machines assigned here can log in at once.
            if let Err(e) = beat.once().await {
                tracing::warn!(error = %e, "first heartbeat failed; no machine can log in until one succeeds");
            }
            server.heartbeat = Some(HeartbeatTask::start(beat, interval));
        }
        Ok(server)
    }

    /// The current report (what the heartbeat sends and `/status.json` serves), sampled
    /// at most the monitor interval ago.
    pub fn report(&self) -> Heartbeat {
        self.monitor.snapshot.read().clone()
    }

    /// The shared report, updated by the monitor.
    pub fn snapshot(&self) -> Snapshot {
        self.monitor.snapshot.clone()
    }

    /// The machine book (with a CS only).
    pub fn book(&self) -> Option<&Arc<MachineBook>> {
        self.book.as_ref()
    }

    pub fn drain_stats(&self) -> &Arc<DrainStats> {
        &self.drain_stats
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Machines being handed over to another process server (see [`crate::drain::Handoffs`]).
    pub fn handoffs(&self) -> &crate::drain::Handoffs {
        &self.drain_config.handoffs
    }

    /// Stops the drain (records stay in the cache until [`ProcessServer::resume_drain`]).
    pub async fn pause_drain(&mut self) -> Result<(), ProcessServerError> {
        match self.drain.take() {
            Some(d) => d.stop().await,
            None => Ok(()),
        }
    }

    /// Starts the drain again after [`ProcessServer::pause_drain`].
    pub fn resume_drain(&mut self) {
        if self.drain.is_none() {
            self.drain = Some(DrainTask::start(
                self.cache.clone(),
                self.target.clone(),
                self.drain_config.clone(),
                self.drain_stats.clone(),
            ));
        }
    }

    /// What the server holds and does now.
    pub fn status(&self) -> ProcessServerStatus {
        let streams = self.cache.streams();
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        let report = self.report();
        ProcessServerStatus {
            health: report.health,
            alerts: report.alerts,
            version: env!("CARGO_PKG_VERSION"),
            listen: self.local_addr,
            target: self.target.url.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            cache_id: format!("{:016x}", self.cache.cache_id()),
            poisoned: self.cache.is_poisoned(),
            space: self.cache.space(),
            streams: streams.len(),
            streams_needing_resync: streams.iter().filter(|s| s.resync_required).count(),
            records_not_uploaded: streams.iter().map(|s| s.durable_upto - s.uploaded_upto).sum(),
            stored_bytes_cached: streams.iter().map(|s| s.stored_bytes).sum(),
            draining: self.drain.as_ref().is_some_and(|d| !d.task.is_finished()),
            connections: count(&s.connections),
            sessions: count(&s.sessions),
            auth_failures: count(&s.auth_failures),
            protocol_errors: count(&s.protocol_errors),
            writes: count(&s.writes),
            write_bytes: count(&s.write_bytes),
            throttled_records: count(&s.throttled_records),
        }
    }

    /// Stops in order (drain, ingest, cache) and closes the cache: once this returns, the
    /// cache directory may be opened again.
    pub async fn stop(self) -> Result<(), ProcessServerError> {
        let ProcessServer { cache, ingest, drain, monitor, heartbeat, status_http, .. } = self;
        // The control-plane tasks first: they hold cache handles and report on the rest.
        if let Some(h) = heartbeat {
            h.stop().await;
        }
        if let Some(h) = status_http {
            h.stop().await;
        }
        monitor.stop().await;
        let drained = match drain {
            Some(d) => d.stop().await,
            None => Ok(()),
        };
        ingest.stop().await;
        drained?;
        let cache = Arc::try_unwrap(cache)
            .map_err(|shared| ProcessServerError::CacheStillShared { holders: Arc::strong_count(&shared) })?;
        tokio::task::spawn_blocking(move || cache.close())
            .await
            .map_err(|e| ProcessServerError::Panicked(format!("cache close: {e}")))??;
        Ok(())
    }
}

/// A process server's state, as `ps run` logs it and the control plane will collect it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProcessServerStatus {
    pub version: &'static str,
    pub health: HealthLevel,
    pub alerts: Vec<Alert>,
    pub listen: SocketAddr,
    pub target: String,
    pub uptime_seconds: f64,
    pub cache_id: String,
    /// A failed fsync poisoned the cache: it acknowledges nothing more until restarted.
    pub poisoned: bool,
    pub space: SpaceReport,
    pub streams: usize,
    pub streams_needing_resync: usize,
    /// Durable records the drain has not uploaded yet, and their stored bytes.
    pub records_not_uploaded: u64,
    pub stored_bytes_cached: u64,
    pub draining: bool,
    pub connections: u64,
    pub sessions: u64,
    pub auth_failures: u64,
    pub protocol_errors: u64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Records slowed because the cache was short of free space.
    pub throttled_records: u64,
}

impl std::fmt::Display for ProcessServerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "health {:?}{}; listening on {}, draining to {}{}; cache {:.1}% used ({:?}){}, {} stream(s), {} record(s) not yet uploaded; {} session(s), {} auth failure(s)",
            self.health,
            self.alerts.iter().map(|a| format!(" [{}]", a.message)).collect::<String>(),
            self.listen,
            self.target,
            if self.draining { "" } else { " (drain paused)" },
            self.space.usage_ratio * 100.0,
            self.space.state,
            if self.poisoned { ", POISONED" } else { "" },
            self.streams,
            self.records_not_uploaded,
            self.sessions,
            self.auth_failures,
        )
    }
}
