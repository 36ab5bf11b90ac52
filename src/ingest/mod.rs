//! The ingest server: a TLS listener, one task per connection. A connection says hello,
//! answers a challenge derived from the registration passphrase, opens its disks, then
//! streams writes and recovery points; the server appends them to the cache and returns
//! *durable* acknowledgements (cumulative, in order) once the cache has them on disk, and
//! *uploaded* ones once the drain has every disk of a point in the object store. A bad or
//! unauthenticated connection is closed with a logged reason and affects no other.
//!
//! This module accepts connections; `handshake` logs them in, `session` serves them
//! after login, `limits` bounds what each peer may cost.

mod handshake;
pub mod hashes;
pub mod limits;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::Cache;
use crate::control::book::{MachineBook, SessionGuard};
use crate::protocol::auth::AuthKey;
use crate::protocol::{FrameError, RECORD_BYTES_MAX};
use limits::{accept_with_backoff, AcceptBackoff, LoginSlot, LoginSlots, LoginThrottle, StreamQuota};

#[derive(Clone, Debug)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    pub tls_dir: PathBuf,
    pub key: AuthKey,
    /// Time allowed from accept to an authenticated session.
    pub handshake_timeout: Duration,
    /// A session that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A frame to the peer not written within this long (the peer stopped reading) drops
    /// the connection.
    pub write_timeout: Duration,
    /// A record not durable within this long after its append ends the session.
    pub durable_timeout: Duration,
    /// Disks one machine may open on a connection.
    pub disks_max: usize,
    /// Distinct disk names one session may open (re-opening an index under new names).
    pub session_names_max: usize,
    /// Streams one machine may have in the cache, over all its sessions.
    pub machine_streams_max: usize,
    /// Recovery points one session watches for upload; beyond it the oldest is dropped.
    pub points_watched_max: usize,
    /// Connections not yet logged in, from one address.
    pub unauthenticated_per_address_max: usize,
    /// Connections not yet logged in, in total.
    pub unauthenticated_max: usize,
    /// Failed logins an address may make before its connections are refused for a while.
    pub login_failures_free: u32,
    /// How long an address is refused after its first failure beyond the free ones;
    /// doubles with each further failure, up to `login_block_max`.
    pub login_block: Duration,
    pub login_block_max: Duration,
    /// Extra DNS names or IPs for a generated certificate (localhost and 127.0.0.1 are
    /// always in it): the names agents use to reach this server.
    pub tls_names: Vec<String>,
    /// With a configuration server: each machine logs in with its own credential from
    /// this book, and only while assigned here. None: the passphrase-only login of a
    /// standalone server.
    pub book: Option<Arc<MachineBook>>,
    /// Slowing of new writes when the cache runs short of free space.
    pub throttle: IngestThrottle,
    /// Where delta-resync answers come from ([`hashes`]); None: every `HashesRequest` is
    /// answered `HashesUnavailable` (the agent copies in full).
    pub hashes: Option<hashes::HashSource>,
}

/// Below `free_percent_min` percent of free cache space each new record waits `delay`
/// before it is appended (on top of the engine's own watermark throttling), so the drain
/// gains on the writers; counted in [`IngestStats::throttled_records`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IngestThrottle {
    pub free_percent_min: f64,
    pub delay: Duration,
}

impl Default for IngestThrottle {
    fn default() -> Self {
        IngestThrottle { free_percent_min: 20.0, delay: Duration::from_millis(10) }
    }
}

impl IngestConfig {
    pub fn new(listen: SocketAddr, tls_dir: PathBuf, passphrase: &str) -> IngestConfig {
        IngestConfig {
            listen,
            tls_dir,
            key: AuthKey::from_passphrase(passphrase),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(30),
            durable_timeout: Duration::from_secs(120),
            disks_max: 64,
            session_names_max: 64,
            machine_streams_max: 256,
            points_watched_max: 256,
            unauthenticated_per_address_max: 64,
            unauthenticated_max: 1024,
            login_failures_free: 5,
            login_block: Duration::from_secs(1),
            login_block_max: Duration::from_secs(60),
            tls_names: Vec::new(),
            book: None,
            throttle: IngestThrottle::default(),
            hashes: None,
        }
    }
}

/// Counters an operator (and the tests) can read.
#[derive(Debug)]
pub struct IngestStats {
    pub connections: AtomicU64,
    pub sessions: AtomicU64,
    /// Logins whose MAC did not verify.
    pub auth_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub backpressure_signals: AtomicU64,
    /// Failed `accept` calls (out of file descriptors, ...).
    pub accept_errors: AtomicU64,
    /// Connections accepted and not yet logged in (a gauge).
    pub logging_in: AtomicU64,
    /// Connections closed at accept: too many not logged in (per address or in total).
    pub admission_refusals: AtomicU64,
    /// Connections closed at accept: their address failed to log in too often.
    pub login_throttled: AtomicU64,
    /// Sessions dropped because the peer read nothing for `write_timeout`.
    pub write_timeouts: AtomicU64,
    /// Recovery points no longer watched for upload (`points_watched_max`).
    pub points_unwatched: AtomicU64,
    /// Records held back by [`IngestThrottle`] (the cache short of free space).
    pub throttled_records: AtomicU64,
    /// Logins refused because the machine is not (or no longer) assigned here.
    pub logins_unassigned: AtomicU64,
    /// Sessions ended because their machine moved away.
    pub sessions_moved: AtomicU64,
    /// Seconds from a frame's append to its durable acknowledgement.
    pub ack_latency: prometheus::Histogram,
}

impl Default for IngestStats {
    fn default() -> Self {
        let opts = prometheus::HistogramOpts::new(
            "churnlog_ack_latency_seconds",
            "Seconds from a frame's append to the cache to its durable acknowledgement",
        )
        .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"));
        IngestStats {
            connections: AtomicU64::default(),
            sessions: AtomicU64::default(),
            auth_failures: AtomicU64::default(),
            protocol_errors: AtomicU64::default(),
            timeouts: AtomicU64::default(),
            writes: AtomicU64::default(),
            write_bytes: AtomicU64::default(),
            backpressure_signals: AtomicU64::default(),
            accept_errors: AtomicU64::default(),
            logging_in: AtomicU64::default(),
            admission_refusals: AtomicU64::default(),
            login_throttled: AtomicU64::default(),
            write_timeouts: AtomicU64::default(),
            points_unwatched: AtomicU64::default(),
            throttled_records: AtomicU64::default(),
            logins_unassigned: AtomicU64::default(),
            sessions_moved: AtomicU64::default(),
            ack_latency: prometheus::Histogram::with_opts(opts).expect("valid histogram"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("the cache's record_size_max ({0}) is below the protocol's largest record ({RECORD_BYTES_MAX})")]
    RecordSize(u32),
}

/// How long `stop` lets sessions finish before it aborts them.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct IngestServer {
    pub local_addr: SocketAddr,
    /// The server's certificate, for agents to trust.
    pub cert_pem: String,
    pub stats: Arc<IngestStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What every connection of a server shares.
struct Shared {
    cache: Arc<Cache>,
    cfg: IngestConfig,
    stats: Arc<IngestStats>,
    acceptor: tokio_rustls::TlsAcceptor,
    throttle: LoginThrottle,
    quota: StreamQuota,
    /// Per stream, the session that opened it last ([`session`]): only it may append, so
    /// a session left behind by a killed or reconnected agent cannot add records under a
    /// newer one (whose delta resync compares with what the stream holds).
    writers: parking_lot::Mutex<std::collections::HashMap<crate::cache::StreamId, u64>>,
    /// Numbers sessions for `writers`.
    next_session: AtomicU64,
}

impl IngestServer {
    pub async fn start(cache: Arc<Cache>, cfg: IngestConfig) -> Result<IngestServer, IngestError> {
        if (cache.options().record_size_max as usize) < RECORD_BYTES_MAX {
            return Err(IngestError::RecordSize(cache.options().record_size_max));
        }
        let (tls, cert_pem) = crate::tls::server_config(&cfg.tls_dir, &cfg.tls_names)?;
        let listener = TcpListener::bind(cfg.listen).await.map_err(|e| IngestError::Listen(cfg.listen, e))?;
        let local_addr = listener.local_addr().map_err(|e| IngestError::Listen(cfg.listen, e))?;
        let stats = Arc::new(IngestStats::default());
        let (stop, stopped) = watch::channel(false);
        let slots = LoginSlots::new(cfg.unauthenticated_per_address_max, cfg.unauthenticated_max, stats.clone());
        let shared = Arc::new(Shared {
            quota: StreamQuota::new(&cache, cfg.machine_streams_max),
            writers: Default::default(),
            next_session: AtomicU64::new(1),
            throttle: LoginThrottle::new(cfg.login_failures_free, cfg.login_block, cfg.login_block_max),
            acceptor: tokio_rustls::TlsAcceptor::from(tls),
            cache,
            cfg,
            stats: stats.clone(),
        });
        let task = tokio::spawn(accept_loop(listener, shared, slots, stopped));
        Ok(IngestServer { local_addr, cert_pem, stats, stop, task })
    }

    /// Stops accepting, lets every session wind down (its acknowledger and writer
    /// included; aborted after `STOP_GRACE`), and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<LoginSlots>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut sessions = tokio::task::JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            (tcp, peer) = accept_with_backoff(|| listener.accept(), &mut backoff, &shared.stats) => {
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                // Refused before TLS and before a task exists: a flood costs an accept
                // and a close each.
                let admitted = shared.throttle.check(peer.ip(), Instant::now()).and_then(|()| slots.try_take(peer.ip()));
                let slot = match admitted {
                    Ok(slot) => slot,
                    Err(why) => {
                        let counter = match why {
                            limits::AdmissionRefusal::Throttled(_) => &shared.stats.login_throttled,
                            _ => &shared.stats.admission_refusals,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, %why, "connection refused at accept");
                        continue;
                    }
                };
                let (shared, stop) = (shared.clone(), stopped.clone());
                sessions.spawn(async move {
                    if let Err(why) = serve(tcp, peer, slot, &shared, stop).await {
                        tracing::info!(%peer, %why, "connection closed");
                    }
                });
            }
            _ = stopped.changed() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    // Sessions see the stop signal and wind down, their acknowledger and writer with
    // them, so no task still holds the cache once `stop` returns. Any still running
    // after the grace period is aborted.
    let drained = async { while sessions.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(STOP_GRACE, drained).await;
    sessions.shutdown().await;
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("timed out ({0})")]
    Timeout(&'static str),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("login: {0}")]
    Login(#[from] handshake::LoginError),
    #[error("refused: {0}")]
    Refused(#[from] session::Refusal),
    #[error("cache: {0}")]
    Stream(#[from] crate::cache::StreamError),
    #[error("cache: {0}")]
    Append(#[from] crate::cache::AppendError),
    #[error("not durable: {0}")]
    NotDurable(String),
    #[error("the peer read nothing for {0:?}")]
    NotReading(Duration),
    #[error("server stopping")]
    Stopping,
    #[error("{0}")]
    Moved(crate::control::book::Refused),
}

async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: LoginSlot,
    shared: &Shared,
    stop: watch::Receiver<bool>,
) -> Result<(), SessionEnd> {
    let (cfg, stats) = (&shared.cfg, &shared.stats);
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(cfg.handshake_timeout, shared.acceptor.accept(tcp))
        .await
        .map_err(|_| SessionEnd::Timeout("TLS handshake"))?
        .map_err(SessionEnd::Tls)?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut buf = Vec::new();
    let login = tokio::time::timeout(
        cfg.handshake_timeout,
        handshake::login(&mut rd, &mut wr, &mut buf, &cfg.key, cfg.book.as_deref()),
    );
    let machine = match login.await {
        Err(_) => {
            stats.timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(SessionEnd::Timeout("authentication"));
        }
        Ok(Err(SessionEnd::Login(e @ handshake::LoginError::BadMac(_)))) => {
            stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            let failures = shared.throttle.failed(peer.ip(), Instant::now());
            tracing::warn!(%peer, failures, "{e}");
            return Err(e.into());
        }
        Ok(Err(SessionEnd::Login(e @ handshake::LoginError::Refused(_)))) => {
            // Counted against the address like a failed MAC: probing for assigned names
            // is throttled the same way.
            stats.logins_unassigned.fetch_add(1, Ordering::Relaxed);
            shared.throttle.failed(peer.ip(), Instant::now());
            tracing::warn!(%peer, "{e}");
            return Err(e.into());
        }
        Ok(Err(e)) => {
            stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        Ok(Ok(m)) => m,
    };
    shared.throttle.succeeded(peer.ip());
    drop(slot);
    // Counted and watching before the last look, so a move decided meanwhile is seen.
    let assigned = cfg.book.as_ref().map(|book| {
        let guard: SessionGuard = book.session(&machine);
        (book.clone(), book.subscribe(), guard)
    });
    if let Some((book, _, _)) = &assigned {
        if let Err(why) = book.may_continue(&machine) {
            return Err(SessionEnd::Moved(why));
        }
    }
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%peer, %machine, "session authenticated");
    session::serve(rd, wr, buf, machine, shared, stop, assigned).await
}
