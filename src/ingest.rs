//! The ingest server: a TLS listener, one task per connection. A connection says hello,
//! answers a challenge derived from the registration passphrase, opens its disks, then
//! streams writes and recovery points; the server appends them to the cache and returns
//! *durable* acknowledgements (cumulative, in order) once the cache has them on disk, and
//! *uploaded* ones once the drain has every disk of a point in the object store. A bad or
//! unauthenticated connection is closed with a logged reason and affects no other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::cache::{AppendError, AppendTicket, Cache, StreamId};
use crate::protocol::auth::{nonce, AuthKey};
use crate::protocol::codec::{E_AUTH, E_PROTOCOL, E_SERVER, E_VERSION, T_WRITE};
use crate::protocol::{
    read_frame, read_frame_bytes, write_frame, write_frame_as_record, Frame, FrameError, StreamRecord,
    PROTOCOL_VERSION, RECORD_BYTES_MAX,
};

#[derive(Clone, Debug)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    pub tls_dir: PathBuf,
    pub key: AuthKey,
    /// Time allowed from accept to an authenticated session.
    pub handshake_timeout: Duration,
    /// A session that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Disks one machine may open on a connection.
    pub disks_max: usize,
    /// Extra DNS names or IPs for a generated certificate (localhost and 127.0.0.1 are
    /// always in it): the names agents use to reach this server.
    pub tls_names: Vec<String>,
}

impl IngestConfig {
    pub fn new(listen: SocketAddr, tls_dir: PathBuf, passphrase: &str) -> IngestConfig {
        IngestConfig {
            listen,
            tls_dir,
            key: AuthKey::from_passphrase(passphrase),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            disks_max: 64,
            tls_names: Vec::new(),
        }
    }
}

/// Counters an operator (and the tests) can read.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub connections: AtomicU64,
    pub sessions: AtomicU64,
    pub auth_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub backpressure_signals: AtomicU64,
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

impl IngestServer {
    pub async fn start(cache: Arc<Cache>, cfg: IngestConfig) -> Result<IngestServer, IngestError> {
        if (cache.options().record_size_max as usize) < RECORD_BYTES_MAX {
            return Err(IngestError::RecordSize(cache.options().record_size_max));
        }
        let (tls, cert_pem) = crate::tls::server_config(&cfg.tls_dir, &cfg.tls_names)?;
        let listener = TcpListener::bind(cfg.listen).await.map_err(|e| IngestError::Listen(cfg.listen, e))?;
        let local_addr = listener.local_addr().map_err(|e| IngestError::Listen(cfg.listen, e))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let stats = Arc::new(IngestStats::default());
        let (stop, mut stopped) = watch::channel(false);
        let (stats2, cfg) = (stats.clone(), Arc::new(cfg));
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, peer)) = accepted else { continue };
                        stats2.connections.fetch_add(1, Ordering::Relaxed);
                        let (acceptor, cache, cfg, stats, stop) = (acceptor.clone(), cache.clone(), cfg.clone(), stats2.clone(), stopped.clone());
                        sessions.spawn(async move {
                            if let Err(why) = serve(tcp, acceptor, cache, cfg, stats, stop).await {
                                tracing::info!(%peer, %why, "connection closed");
                            }
                        });
                    }
                    _ = stopped.changed() => break,
                    Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                }
            }
            // Sessions see the stop signal and wind down, their acknowledger and writer
            // with them, so no task still holds the cache once `stop` returns. Any still
            // running after the grace period (a peer that stopped reading) is aborted.
            let drained = async { while sessions.join_next().await.is_some() {} };
            let _ = tokio::time::timeout(STOP_GRACE, drained).await;
            sessions.shutdown().await;
        });
        Ok(IngestServer { local_addr, cert_pem, stats, stop, task })
    }

    /// Stops accepting, lets every session wind down (its acknowledger and writer
    /// included; aborted after `STOP_GRACE`), and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("timed out ({0})")]
    Timeout(&'static str),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("cache: {0}")]
    Cache(String),
    #[error("server stopping")]
    Stopping,
}

async fn serve(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    cache: Arc<Cache>,
    cfg: Arc<IngestConfig>,
    stats: Arc<IngestStats>,
    stop: watch::Receiver<bool>,
) -> Result<(), SessionEnd> {
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| SessionEnd::Timeout("TLS handshake"))?
        .map_err(SessionEnd::Tls)?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut buf = Vec::new();
    let machine =
        match tokio::time::timeout(cfg.handshake_timeout, handshake(&mut rd, &mut wr, &mut buf, &cfg.key)).await {
            Err(_) => {
                stats.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(SessionEnd::Timeout("authentication"));
            }
            Ok(Err(e)) => {
                if matches!(e, SessionEnd::Refused(_)) {
                    stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
            Ok(Ok(m)) => m,
        };
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%machine, "session authenticated");
    // One writer task owns the write half; the reader and the acknowledger send to it.
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(256);
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if write_frame(&mut wr, &f).await.is_err() {
                break;
            }
            if out_rx.is_empty() && wr.flush().await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let (ack_tx, ack_rx) = mpsc::channel::<AckWork>(4096);
    let acker = tokio::spawn(acknowledge(ack_rx, out_tx.clone(), cache.clone()));
    let result = session(&mut rd, &mut buf, &machine, &cache, &cfg, &stats, &out_tx, &ack_tx, stop).await;
    if let Err(e) = &result {
        stats
            .protocol_errors
            .fetch_add(u64::from(matches!(e, SessionEnd::Frame(_) | SessionEnd::Refused(_))), Ordering::Relaxed);
        let (code, message) = match e {
            SessionEnd::Frame(_) | SessionEnd::Refused(_) => (E_PROTOCOL, e.to_string()),
            _ => (E_SERVER, e.to_string()),
        };
        let _ = out_tx.send(Frame::Error { code, message }).await;
    }
    drop(ack_tx);
    let _ = acker.await;
    drop(out_tx);
    let _ = writer.await;
    result
}

async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut Vec<u8>,
    key: &AuthKey,
) -> Result<String, SessionEnd> {
    let Frame::Hello { version, machine, client_nonce } = read_frame(rd, buf).await? else {
        return Err(SessionEnd::Refused("expected Hello".into()));
    };
    if version != PROTOCOL_VERSION {
        let _ =
            write_frame(wr, &Frame::Error { code: E_VERSION, message: format!("protocol {PROTOCOL_VERSION} only") })
                .await;
        return Err(SessionEnd::Refused(format!("protocol version {version}")));
    }
    let server_nonce = nonce();
    write_frame(wr, &Frame::Challenge { version: PROTOCOL_VERSION, server_nonce }).await.map_err(FrameError::Io)?;
    wr.flush().await.map_err(FrameError::Io)?;
    let Frame::Auth { mac } = read_frame(rd, buf).await? else {
        return Err(SessionEnd::Refused("expected Auth".into()));
    };
    if !key.verify_client(&client_nonce, &server_nonce, &machine, &mac) {
        let _ = write_frame(wr, &Frame::Error { code: E_AUTH, message: "authentication failed".into() }).await;
        let _ = wr.flush().await;
        return Err(SessionEnd::Refused(format!("machine {machine:?} failed authentication")));
    }
    let mac = key.server_mac(&client_nonce, &server_nonce, &machine);
    write_frame(wr, &Frame::AuthOk { mac }).await.map_err(FrameError::Io)?;
    wr.flush().await.map_err(FrameError::Io)?;
    Ok(machine)
}

/// Appended frames waiting for durability, in tag order.
struct Pending {
    tag: u64,
    tickets: Vec<AppendTicket>,
    /// For a recovery point: its id and the (stream, sequence) of its record in each disk.
    point: Option<(u64, Vec<(StreamId, u64)>)>,
    /// For a resync base: the stream and the base record's sequence number.
    resync: Option<(StreamId, u64)>,
}

/// What the session tells its acknowledger.
enum AckWork {
    Pending(Pending),
    /// The agent opened disk `.0` as stream `.1`: watch it for resync-required.
    Disk(u16, StreamId),
}

#[allow(clippy::too_many_arguments)]
async fn session<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    machine: &str,
    cache: &Arc<Cache>,
    cfg: &IngestConfig,
    stats: &IngestStats,
    out: &mpsc::Sender<Frame>,
    acks: &mpsc::Sender<AckWork>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SessionEnd> {
    let mut disks: HashMap<u16, StreamId> = HashMap::new();
    let mut last_tag = 0u64;
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(cfg.idle_timeout, read_frame_bytes(rd, buf)) => match r {
                Err(_) => {
                    stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(SessionEnd::Timeout("idle"));
                }
                Ok(Err(FrameError::Closed)) => return Ok(()),
                Ok(r) => r,
            },
            _ = stop.changed() => return Err(SessionEnd::Stopping),
        };
        read?;
        if buf[0] == T_WRITE {
            // The bulk of the traffic: the frame becomes its cache record in place.
            let (disk, tag, record) = write_frame_as_record(buf)?;
            advance_tag(&mut last_tag, tag)?;
            let stream =
                *disks.get(&disk).ok_or_else(|| SessionEnd::Refused(format!("write to unopened disk {disk}")))?;
            let ticket = append_waiting(cache, stream, record, out, stats).await?;
            stats.writes.fetch_add(1, Ordering::Relaxed);
            stats.write_bytes.fetch_add(record.len() as u64 - 9, Ordering::Relaxed);
            acks.send(AckWork::Pending(Pending { tag, tickets: vec![ticket], point: None, resync: None }))
                .await
                .map_err(|_| SessionEnd::Stopping)?;
            continue;
        }
        let frame = Frame::decode(buf[0], &buf[1..])?;
        let mut check_tag = |tag: u64| advance_tag(&mut last_tag, tag);
        match frame {
            Frame::OpenDisk { disk, name } => {
                if disks.len() >= cfg.disks_max && !disks.contains_key(&disk) {
                    return Err(SessionEnd::Refused(format!("more than {} disks", cfg.disks_max)));
                }
                let stream = cache.stream(machine, &name).map_err(|e| SessionEnd::Cache(e.to_string()))?;
                disks.insert(disk, stream);
                acks.send(AckWork::Disk(disk, stream)).await.map_err(|_| SessionEnd::Stopping)?;
            }
            Frame::Zero { disk, tag, offset, len } => {
                check_tag(tag)?;
                let stream = *disks
                    .get(&disk)
                    .ok_or_else(|| SessionEnd::Refused(format!("zero run on unopened disk {disk}")))?;
                let record = StreamRecord::Zero { offset, len }.encode();
                let ticket = append_waiting(cache, stream, &record, out, stats).await?;
                acks.send(AckWork::Pending(Pending { tag, tickets: vec![ticket], point: None, resync: None }))
                    .await
                    .map_err(|_| SessionEnd::Stopping)?;
            }
            Frame::Point { tag, point_id, kind, unix_ms, disks: sizes } => {
                check_tag(tag)?;
                let mut tickets = Vec::with_capacity(sizes.len());
                let mut places = Vec::with_capacity(sizes.len());
                for (disk, disk_size) in sizes {
                    let stream = *disks
                        .get(&disk)
                        .ok_or_else(|| SessionEnd::Refused(format!("point on unopened disk {disk}")))?;
                    let record = StreamRecord::Point { point_id, kind, unix_ms, disk_size }.encode();
                    let ticket = append_waiting(cache, stream, &record, out, stats).await?;
                    places.push((stream, ticket.seq));
                    tickets.push(ticket);
                }
                acks.send(AckWork::Pending(Pending { tag, tickets, point: Some((point_id, places)), resync: None }))
                    .await
                    .map_err(|_| SessionEnd::Stopping)?;
            }
            Frame::Resync { disk, tag } => {
                check_tag(tag)?;
                let stream =
                    *disks.get(&disk).ok_or_else(|| SessionEnd::Refused(format!("resync of unopened disk {disk}")))?;
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let record = StreamRecord::ResyncBase { unix_ms }.encode();
                let ticket = append_waiting(cache, stream, &record, out, stats).await?;
                let seq = ticket.seq;
                tracing::info!(%machine, disk, seq, "full resync begins");
                acks.send(AckWork::Pending(Pending {
                    tag,
                    tickets: vec![ticket],
                    point: None,
                    resync: Some((stream, seq)),
                }))
                .await
                .map_err(|_| SessionEnd::Stopping)?;
            }
            other => return Err(SessionEnd::Refused(format!("unexpected frame {other:?}"))),
        }
    }
}

/// Tags of a connection must strictly increase.
fn advance_tag(last_tag: &mut u64, tag: u64) -> Result<(), SessionEnd> {
    if tag <= *last_tag {
        return Err(SessionEnd::Refused(format!("tag {tag} after {last_tag}: tags must increase")));
    }
    *last_tag = tag;
    Ok(())
}

/// Appends, holding the connection back while the cache is above its hard watermark
/// (and telling the agent so) instead of failing the write.
async fn append_waiting(
    cache: &Arc<Cache>,
    stream: StreamId,
    record: &[u8],
    out: &mpsc::Sender<Frame>,
    stats: &IngestStats,
) -> Result<AppendTicket, SessionEnd> {
    let mut signalled = false;
    loop {
        // append may sleep briefly (throttling, a full batch): keep it off the reactor.
        match tokio::task::block_in_place(|| cache.append(stream, record)) {
            Ok(t) => return Ok(t),
            Err(AppendError::Backpressure { .. }) => {
                if !signalled {
                    stats.backpressure_signals.fetch_add(1, Ordering::Relaxed);
                    let _ = out.send(Frame::Backpressure { retry_after_ms: 100 }).await;
                    signalled = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(SessionEnd::Cache(e.to_string())),
        }
    }
}

/// Waits for each pending frame's records to be durable, in order, and acknowledges;
/// watches recovery points until the drain has uploaded all their disks (or reports them
/// lost when records before them were dropped), and tells the agent when a disk needs a
/// full resync.
async fn acknowledge(mut rx: mpsc::Receiver<AckWork>, out: mpsc::Sender<Frame>, cache: Arc<Cache>) {
    let mut points: Vec<(u64, Vec<(StreamId, u64)>)> = Vec::new();
    // Opened disks, and whether the agent has been told its disk needs a resync.
    let mut disks: Vec<(u16, StreamId, bool)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut open = true;
    while open || !points.is_empty() {
        tokio::select! {
            w = rx.recv(), if open => match w {
                Some(AckWork::Disk(disk, stream)) => {
                    disks.retain(|d| d.0 != disk);
                    disks.push((disk, stream, false));
                }
                Some(AckWork::Pending(p)) => {
                    let mut failed = None;
                    for t in p.tickets {
                        if let Err(e) = t.await {
                            failed = Some(e);
                        }
                    }
                    if let Some(e) = failed {
                        let _ = out.send(Frame::Error { code: E_SERVER, message: format!("not durable: {e}") }).await;
                        return;
                    }
                    if let Some((stream, base)) = p.resync {
                        // The base is durable: points after it no longer depend on what was dropped.
                        if let Err(e) = cache.clear_resync(stream, base) {
                            tracing::warn!(error = %e, ?stream, base, "resync base not recorded; the agent will be asked again");
                        }
                        if let Some(d) = disks.iter_mut().find(|d| d.1 == stream) {
                            d.2 = false;
                        }
                    }
                    let _ = out.send(Frame::Durable { upto_tag: p.tag }).await;
                    points.extend(p.point);
                }
                None => open = false,
            },
            _ = tick.tick() => {
                for (disk, stream, told) in disks.iter_mut() {
                    let required = cache.stream_info(*stream).is_some_and(|i| i.resync_required);
                    if required && !*told && open {
                        tracing::warn!(disk = *disk, ?stream, "records were dropped before upload; asking the agent for a full resync");
                        if out.send(Frame::ResyncRequired { disk: *disk }).await.is_err() {
                            return;
                        }
                    }
                    *told = required;
                }
                let mut i = 0;
                while i < points.len() {
                    let infos: Vec<_> = points[i].1.iter().map(|(s, seq)| (cache.stream_info(*s), *seq)).collect();
                    let lost = infos.iter().any(|(info, seq)| info.as_ref().is_none_or(|i| !i.history_whole_upto(*seq)));
                    let done = infos.iter().all(|(info, seq)| info.as_ref().is_some_and(|i| i.uploaded_upto >= *seq));
                    if lost || done {
                        let (point_id, _) = points.swap_remove(i);
                        let frame = if lost { Frame::PointLost { point_id } } else { Frame::Uploaded { point_id } };
                        if lost {
                            tracing::warn!(point_id, "recovery point lost: records before it were dropped before upload");
                        }
                        if out.send(frame).await.is_err() {
                            return;
                        }
                    } else {
                        i += 1;
                    }
                }
                if !open && !points.is_empty() {
                    // The agent has gone: nobody waits for these any more.
                    points.clear();
                }
            }
        }
    }
}
