//! The agent: replicates disk image files or block devices to a process server. Each
//! pass reads every block, hashes it (xxh3-128) and sends the blocks that changed since
//! the previous pass (the first pass of a process sends all data blocks, and describes
//! all-zero runs with a small `Zero` frame instead of their bytes), then tags a recovery
//! point over all disks. A full copy (the first pass of a process, or one the server asks
//! for after it had to drop records before upload) begins with a `Resync` frame, so that
//! restore can build later points from it alone. Frames stay queued until the server acknowledges them durable;
//! after a lost connection the agent reconnects and resends exactly those, in order, so
//! nothing acknowledged is lost and nothing unacknowledged is skipped.
//!
//! Where the process server is comes from a [`Locator`]: a fixed address (a standalone
//! server and the passphrase) or the configuration server, asked before every connection
//! attempt ([`credential`]). When the CS moves the machine, the old server closes the
//! session once it has drained, and the agent reconnects to the new one, resends what is
//! unacknowledged and goes on with its in-memory block hashes: a move costs no full copy.
//!
//! With a state directory ([`AgentConfig::state_dir`], [`state`]) the hashes of the last
//! point the server acknowledged durable survive a restart: a restarted agent sends only
//! the blocks that differ from them, without a `Resync` frame.

pub mod capture;
pub mod credential;
pub mod delta;
pub mod dirty_file;
pub mod nbd;
pub mod state;

use std::collections::{HashSet, VecDeque};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::control::api::Assignment;
use crate::control::client::{ClientError, CsClient};
use crate::protocol::auth::{nonce, AuthKey};
use crate::protocol::{read_frame, write_frame, Frame, FrameError, PointKind, PROTOCOL_VERSION, ZERO_LEN_MAX};

/// Where the agent finds its process server.
#[derive(Clone, Debug)]
pub enum Locator {
    /// A standalone process server: host:port and its certificate (PEM), the only one
    /// trusted.
    Fixed { address: String, cert_pem: String },
    /// Ask the configuration server before every connection attempt; the client signs as
    /// the machine with its credential ([`credential::load_or_register`]).
    Cs { client: CsClient },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub locator: Locator,
    pub machine: String,
    /// (disk id, path of the image file or block device).
    pub disks: Vec<(String, PathBuf)>,
    pub block_size: usize,
    /// Frames in flight before the agent waits for acknowledgements.
    pub window: usize,
    /// Give up when the server stays unreachable this long.
    pub reconnect_timeout: Duration,
    /// Time allowed for one connection attempt: TCP connect, TLS and every step of the
    /// login. A server that goes silent in between counts as unreachable.
    pub handshake_timeout: Duration,
    /// With frames waiting for acknowledgement, a connection on which the server says
    /// nothing for this long is dropped and the frames resent on a new one.
    pub ack_timeout: Duration,
    /// Connections dropped that way in a row before the agent gives up: the server
    /// accepts logins but acknowledges nothing.
    pub silent_connections_max: u32,
    /// With the CS as locator: how long refusals (login refused, certificate not the one
    /// the CS gave) are retried, asking the CS again each time, before the agent gives
    /// up. A newly assigned server learns the machine's credential only at its next
    /// heartbeat, and a moved-from one refuses, so a refusal alone is not final there.
    pub refusal_grace: Duration,
    /// Where each disk's block hashes are kept across restarts ([`state`]); None: in
    /// memory only (a restart copies every disk in full).
    pub state_dir: Option<PathBuf>,
}

impl AgentConfig {
    /// A standalone process server at `ps` with certificate `ps_cert_pem`.
    pub fn new(ps: String, ps_cert_pem: String, machine: String, disks: Vec<(String, PathBuf)>) -> AgentConfig {
        AgentConfig::with_locator(Locator::Fixed { address: ps, cert_pem: ps_cert_pem }, machine, disks)
    }

    pub fn with_locator(locator: Locator, machine: String, disks: Vec<(String, PathBuf)>) -> AgentConfig {
        AgentConfig {
            locator,
            machine,
            disks,
            block_size: 64 << 10,
            window: 256,
            reconnect_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(15),
            ack_timeout: Duration::from_secs(120),
            silent_connections_max: 3,
            refusal_grace: Duration::from_secs(180),
            state_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("disk {0}: {1}")]
    Disk(String, std::io::Error),
    #[error("cannot reach the process server within {0:?}: {1}")]
    Unreachable(Duration, String),
    #[error("the process server refused us: {0}")]
    Refused(String),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("the process server at {0} is not the one trusted (its certificate does not match --ps-cert): {1}")]
    NotTrusted(String, String),
    #[error("the process server broke the protocol: {0}")]
    BadServer(String),
    #[error("the process server acknowledged nothing on {0} connections in a row ({1:?} each)")]
    Unresponsive(u32, Duration),
    #[error("recovery point {0} was lost on the process server (records dropped before upload), {1} times in a row")]
    PointLost(u64, usize),
    #[error("configuration server: {0}")]
    Cs(#[from] ClientError),
    #[error("the configuration server refused machine {machine:?}: {detail}. The name is registered to another machine; if this machine replaces it, an operator runs `churnlog cs reassign --machine {machine}` on the configuration server, then start the agent again")]
    NameTaken { machine: String, detail: String },
    #[error("credential file {path}: {reason}")]
    Credential { path: PathBuf, reason: String },
    #[error("state directory {0}: {1}")]
    StateDir(PathBuf, std::io::Error),
    #[error("{0}")]
    State(#[from] state::StateIoError),
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PassReport {
    pub point_id: u64,
    pub blocks_read: u64,
    pub blocks_sent: u64,
    pub zero_runs_sent: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
    pub reconnects: u64,
    /// Disks copied in full (first pass, or a resync the server asked for).
    pub full_copies: u64,
    /// Passes repeated because the server lost their point before upload.
    pub repeated_passes: u64,
    /// Disks compared with the server's block hashes (no usable state): only the blocks
    /// that differ were sent ([`delta`]).
    pub delta_resyncs: u64,
}

/// What the server told the reader task.
enum Event {
    Durable(u64),
    Uploaded(u64),
    ResyncRequired(u16),
    PointLost(u64),
    /// A delta-resync answer ([`delta`]).
    Hashes(Frame),
    Closed(String),
}

/// How many times `pass` repeats when the server loses its point before upload.
const LOST_POINT_RETRIES: usize = 3;

struct Conn {
    tx: mpsc::Sender<Frame>,
    events: mpsc::Receiver<Event>,
    next_tag: u64,
}

/// A frame awaiting its durable acknowledgement (tags are per connection).
struct Unacked {
    tag: u64,
    frame: Frame,
}

fn with_tag(frame: &Frame, tag: u64) -> Frame {
    let mut f = frame.clone();
    match &mut f {
        Frame::Write { tag: t, .. }
        | Frame::Zero { tag: t, .. }
        | Frame::Point { tag: t, .. }
        | Frame::Resync { tag: t, .. } => *t = tag,
        _ => unreachable!("only tagged frames are tracked"),
    }
    f
}

/// The process server connections go to now, and the connector trusting exactly its
/// certificate.
struct Target {
    address: String,
    cert_pem: String,
    tls: tokio_rustls::TlsConnector,
}

impl Target {
    fn new(address: String, cert_pem: String) -> Result<Target, AgentError> {
        let tls = tokio_rustls::TlsConnector::from(crate::tls::client_config(&cert_pem)?);
        Ok(Target { address, cert_pem, tls })
    }
}

pub struct Agent {
    cfg: AgentConfig,
    key: AuthKey,
    /// None until the CS first answered (CS locator); then the last assignment, kept
    /// while the CS is unreachable.
    target: Option<Target>,
    /// Since when connection attempts have been refused in a row (CS locator).
    refused_since: Option<Instant>,
    conn: Option<Conn>,
    unacked: VecDeque<Unacked>,
    uploaded: HashSet<u64>,
    lost: HashSet<u64>,
    hashes: Vec<Option<Vec<u128>>>,
    /// The server asked for a full copy of these disks.
    resync_requested: Vec<bool>,
    /// The latest pass's point frame (re-tagged on a new session while waiting for upload).
    last_point: Option<Frame>,
    last_point_id: u64,
    /// The newest point whose frame the server acknowledged durable.
    durable_point: u64,
    reconnects: u64,
    /// Connections in a row dropped because the server acknowledged nothing.
    silent_connections: u32,
    /// Each disk's size as last declared to the server (OpenDisk); writes must end within
    /// it. `None` until first read.
    declared_bytes: Vec<Option<u64>>,
    /// The persistent block state, with a state directory.
    state: Option<state::StateDir>,
    /// The delta-resync answer being received.
    hash_fetch: Option<delta::HashFetch>,
}

impl Agent {
    /// An agent logging in with the passphrase (a standalone process server).
    pub fn new(cfg: AgentConfig, passphrase: &str) -> Result<Agent, AgentError> {
        Agent::with_key(cfg, AuthKey::from_passphrase(passphrase))
    }

    /// An agent logging in with `key`: with the CS as locator, the machine's credential
    /// ([`credential::CsIdentity::key`]).
    pub fn with_key(cfg: AgentConfig, key: AuthKey) -> Result<Agent, AgentError> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= crate::protocol::NAME_LEN_MAX
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !name_ok(&cfg.machine) || cfg.disks.iter().any(|(id, _)| !name_ok(id)) {
            return Err(AgentError::Refused("machine and disk names are 1..=64 characters of [A-Za-z0-9._-]".into()));
        }
        if cfg.disks.is_empty() || cfg.disks.len() > crate::protocol::POINT_DISKS_MAX {
            return Err(AgentError::Refused(format!(
                "an agent protects 1..={} disks",
                crate::protocol::POINT_DISKS_MAX
            )));
        }
        let target = match &cfg.locator {
            Locator::Fixed { address, cert_pem } => Some(Target::new(address.clone(), cert_pem.clone())?),
            Locator::Cs { .. } => None,
        };
        let mut hashes = vec![None; cfg.disks.len()];
        let resync_requested = vec![false; cfg.disks.len()];
        let mut declared_bytes = vec![None; cfg.disks.len()];
        let state = match &cfg.state_dir {
            Some(dir) => {
                // State is kept for one server's history: a standalone server is named by
                // its certificate, the CS by its address (its servers share a target).
                let server = state_server(&cfg.locator);
                let mut sd = state::StateDir::open(dir, &cfg.machine, server, cfg.disks.len())?;
                for (d, (id, path)) in cfg.disks.iter().enumerate() {
                    let Ok(size) = std::fs::File::open(path)
                        .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                    else {
                        continue; // the first pass reports the disk's error
                    };
                    hashes[d] = sd.load(d, id, size, cfg.block_size);
                    if hashes[d].is_some() {
                        // The size of the point the state describes: a change before the
                        // first pass is declared (and a shrink copied in full) as usual.
                        declared_bytes[d] = Some(size);
                    }
                }
                Some(sd)
            }
            None => None,
        };
        Ok(Agent {
            key,
            cfg,
            target,
            refused_since: None,
            conn: None,
            unacked: VecDeque::new(),
            uploaded: HashSet::new(),
            lost: HashSet::new(),
            hashes,
            resync_requested,
            last_point: None,
            last_point_id: 0,
            durable_point: 0,
            reconnects: 0,
            silent_connections: 0,
            declared_bytes,
            state,
            hash_fetch: None,
        })
    }

    /// Moves this agent to another process server (a scale-out hand-over): the current
    /// session ends, and what is not yet acknowledged is resent to the new server.
    /// The agent then stays on that server (a fixed locator) with the same key.
    pub fn set_process_server(&mut self, ps: String, ps_cert_pem: String) -> Result<(), AgentError> {
        self.target = Some(Target::new(ps.clone(), ps_cert_pem.clone())?);
        self.cfg.locator = Locator::Fixed { address: ps, cert_pem: ps_cert_pem };
        self.conn = None;
        Ok(())
    }

    /// The address of the process server the agent connects to now (None before the CS
    /// first assigned one).
    pub fn process_server(&self) -> Option<&str> {
        self.target.as_ref().map(|t| t.address.as_str())
    }

    /// Before a connection attempt: with the CS as locator, asks it where to go. An
    /// error here is retried by the caller (a CS refusal that cannot mend is final).
    async fn locate(&mut self) -> Result<(), AgentError> {
        let Locator::Cs { client } = &self.cfg.locator else { return Ok(()) };
        let limit = self.cfg.handshake_timeout;
        let answer = match tokio::time::timeout(limit, credential::assignment(client)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::BadReply(format!("no answer within {limit:?}"))),
        };
        match answer {
            Ok(Assignment { ps, address, cert_pem }) => {
                let same = self.target.as_ref().is_some_and(|t| t.address == address && t.cert_pem == cert_pem);
                if !same {
                    tracing::info!(ps, %address, "the configuration server assigns this machine to a process server");
                    self.target = Some(Target::new(address, cert_pem)?);
                }
                Ok(())
            }
            // Moving between servers (or none can take it): the old server no longer
            // takes the machine, so wait rather than fall back to it.
            Err(e) if e.code() == Some("unavailable") => {
                Err(AgentError::Unreachable(Duration::ZERO, format!("no process server for now: {e}")))
            }
            // The credential is not (or no longer) accepted: retrying will not help.
            Err(ClientError::Refused(e)) if matches!(e.code.as_str(), "unauthorized" | "not_found" | "bad_request") => {
                Err(AgentError::Cs(ClientError::Refused(e)))
            }
            // The CS is down or confused: replication goes on with the last assignment.
            Err(e) if self.target.is_some() => {
                tracing::warn!(error = %e, "cannot ask the configuration server; using the last assignment");
                Ok(())
            }
            Err(e) => Err(AgentError::Unreachable(Duration::ZERO, e.to_string())),
        }
    }

    /// One pass over every disk, then a recovery point of `kind`. Returns once the point
    /// is durable on the process server, or — with `wait_uploaded` — uploaded; a point the
    /// server loses before upload makes the pass run again (with the full copies the
    /// server asks for), a few times at most.
    pub async fn pass(
        &mut self,
        kind: PointKind,
        wait_uploaded: bool,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<PassReport, AgentError> {
        let started = Instant::now();
        let reconnects_before = self.reconnects;
        let mut report = PassReport::default();
        for attempt in 0..=LOST_POINT_RETRIES {
            let point_id = self.pass_once(kind, &mut report, &mut progress).await?;
            report.point_id = point_id;
            if !wait_uploaded {
                break;
            }
            let lost = self.wait_uploaded(point_id).await?;
            if !lost {
                break;
            }
            if attempt == LOST_POINT_RETRIES {
                return Err(AgentError::PointLost(point_id, attempt + 1));
            }
            tracing::warn!(point_id, "the process server lost this point before upload; passing again");
            report.repeated_passes += 1;
        }
        report.seconds = started.elapsed().as_secs_f64();
        report.reconnects = self.reconnects - reconnects_before;
        Ok(report)
    }

    /// Streaming (NBD exports, [`capture`]): queues a write of `data` (at most
    /// [`crate::protocol::WRITE_DATA_MAX`] bytes) at `offset` of disk number `disk`, in
    /// order after everything sent before it; resent after reconnects until durable.
    pub async fn stream_write(&mut self, disk: u16, offset: u64, data: bytes::Bytes) -> Result<(), AgentError> {
        self.send(Frame::Write { disk, tag: 0, offset, data }).await
    }

    /// Streaming: `len` (at most [`ZERO_LEN_MAX`]) bytes from `offset` are zeros.
    pub async fn stream_zero(&mut self, disk: u16, offset: u64, len: u64) -> Result<(), AgentError> {
        self.send(Frame::Zero { disk, tag: 0, offset, len }).await
    }

    /// Streaming: a full copy of `disk` follows (restore builds later points from it).
    pub async fn stream_resync(&mut self, disk: u16) -> Result<(), AgentError> {
        self.send(Frame::Resync { disk, tag: 0 }).await
    }

    /// Streaming: tags a recovery point of `kind` over every disk, behind everything sent
    /// so far, without waiting for it; returns its id.
    pub async fn tag_point(&mut self, kind: PointKind) -> Result<u64, AgentError> {
        self.connected().await?; // every disk's size is declared once connected
        let disks = self.declared_bytes.iter().enumerate().map(|(d, b)| (d as u16, b.unwrap_or(0))).collect();
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let point_id = (self.last_point_id + 1).max(now_ms);
        self.last_point_id = point_id;
        self.send(Frame::Point { tag: 0, point_id, kind, unix_ms: now_ms, disks }).await?;
        Ok(point_id)
    }

    /// Streaming: disks the process server asked a full copy of since the last call.
    pub fn take_resync_requests(&mut self) -> Vec<u16> {
        let mut out = Vec::new();
        for (d, flag) in self.resync_requested.iter_mut().enumerate() {
            if std::mem::take(flag) {
                out.push(d as u16);
            }
        }
        out
    }

    /// Streaming: the newest point the server acknowledged durable (0: none yet).
    pub fn durable_point(&self) -> u64 {
        self.durable_point
    }

    /// Streaming: where and under which identity NBD exports keep their persistent
    /// dirty bitmaps (the state directory, when there is one).
    pub fn capture_persist(&self) -> Option<capture::PersistConfig> {
        let dir = self.cfg.state_dir.clone()?;
        Some(capture::PersistConfig { dir, machine: self.cfg.machine.clone(), server: state_server(&self.cfg.locator) })
    }

    /// Frames sent and not yet acknowledged durable.
    pub fn pending_frames(&self) -> usize {
        self.unacked.len()
    }

    /// Streaming: whether the server reported `point_id` uploaded (forgotten once true).
    pub fn take_uploaded(&mut self, point_id: u64) -> bool {
        self.uploaded.remove(&point_id)
    }

    /// Streaming: whether the server reported `point_id` lost (forgotten once true).
    pub fn take_lost(&mut self, point_id: u64) -> bool {
        self.lost.remove(&point_id)
    }

    /// Handles one message from the server (acknowledgements, uploads, resync requests),
    /// reconnecting first if needed. Cancel-safe between messages.
    pub async fn poll(&mut self) -> Result<(), AgentError> {
        self.next_event().await
    }

    /// Waits until `point_id` is uploaded (false) or lost (true).
    async fn wait_uploaded(&mut self, point_id: u64) -> Result<bool, AgentError> {
        let mut reconnects = self.reconnects;
        loop {
            if self.uploaded.contains(&point_id) {
                return Ok(false);
            }
            if self.lost.remove(&point_id) {
                return Ok(true);
            }
            // Reconnect first if the session died: a new session does not know the
            // point, so it is tagged again (same id) before waiting for anything.
            self.connected().await?;
            if self.reconnects != reconnects {
                reconnects = self.reconnects;
                let point = self.last_point.clone().expect("a pass tagged it");
                self.send(point).await?;
            }
            self.next_event().await?;
        }
    }

    /// Reads every disk once, sends what changed, tags a point; returns its id once the
    /// point is durable.
    async fn pass_once(
        &mut self,
        kind: PointKind,
        report: &mut PassReport,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<u64, AgentError> {
        let bs = self.cfg.block_size;
        let total: u64 = self
            .cfg
            .disks
            .iter()
            .map(|(_, p)| {
                std::fs::File::open(p)
                    .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                    .unwrap_or(0)
            })
            .sum();
        let mut done = 0u64;
        let mut sizes = Vec::with_capacity(self.cfg.disks.len());
        // Read 1 MiB at a time (fewer system calls), hash and send 64 KiB blocks.
        let chunk_blocks = ((1 << 20) / bs).max(1);
        let mut buf = vec![0u8; chunk_blocks * bs];
        let zeros = vec![0u8; bs];
        for d in 0..self.cfg.disks.len() {
            let (id, path) = self.cfg.disks[d].clone();
            let mut file = std::fs::File::open(&path).map_err(|e| AgentError::Disk(id.clone(), e))?;
            // Seeking to the end gives the size of block devices too (their metadata says 0).
            let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
                .map_err(|e| AgentError::Disk(id.clone(), e))?;
            sizes.push((d as u16, size));
            // The server refuses data past the declared size: declare a changed size before
            // sending anything of this pass. A shrunk disk is copied in full, because
            // records past its new end would make the next point unrestorable.
            let shrunk = self.declared_bytes[d].is_some_and(|old| size < old);
            if self.declared_bytes[d] != Some(size) {
                // Connected first: a reconnection declares the old size, under which the
                // frames it resends were checked.
                self.connected().await?;
                self.declared_bytes[d] = Some(size);
                let conn = self.conn.as_mut().expect("connected");
                if conn.tx.send(Frame::OpenDisk { disk: d as u16, size_bytes: size, name: id.clone() }).await.is_err() {
                    self.conn = None; // the next connection declares it
                }
            }
            let blocks = size.div_ceil(bs as u64) as usize;
            let mut full = std::mem::take(&mut self.resync_requested[d]) || shrunk;
            if !full && self.hashes[d].is_none() {
                // No usable state: compare with what the server holds instead.
                self.hashes[d] = self.delta_resync(d, size).await?;
                // A full copy asked for meanwhile wins over the answer.
                full = self.hashes[d].is_none() || std::mem::take(&mut self.resync_requested[d]);
                report.delta_resyncs += u64::from(!full);
            }
            let previous = if full { None } else { self.hashes[d].take() };
            if full {
                // The stored state describes what the full copy replaces: it goes first,
                // durably, or a restart during the copy would build on it.
                if let Some(st) = &mut self.state {
                    st.forget(d, &id)?;
                }
                // Restore builds later points from here on: the full copy follows.
                self.send(Frame::Resync { disk: d as u16, tag: 0 }).await?;
                report.full_copies += 1;
            }
            let mut current = Vec::with_capacity(blocks);
            let mut chunk_hashes = Vec::with_capacity(chunk_blocks);
            let mut zero_run: Option<(u64, u64)> = None;
            for b in 0..blocks {
                let offset = (b * bs) as u64;
                let len = (size - offset).min(bs as u64) as usize;
                let in_chunk = (b % chunk_blocks) * bs;
                if in_chunk == 0 {
                    let n = (size - offset).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], offset).map_err(|e| AgentError::Disk(id.clone(), e))?;
                    chunk_hashes.clear();
                    chunk_hashes.extend(buf[..n].chunks(bs).map(xxhash_rust::xxh3::xxh3_128));
                    self.journal_chunk(d, b as u64, &chunk_hashes, previous.as_deref())?;
                }
                let block = &buf[in_chunk..in_chunk + len];
                let h = chunk_hashes[b % chunk_blocks];
                current.push(h);
                report.blocks_read += 1;
                done += len as u64;
                let changed = previous.as_ref().and_then(|p| p.get(b)).is_none_or(|&old| old != h);
                if !changed {
                    self.flush_zero_run(d as u16, &mut zero_run, report).await?;
                    continue;
                }
                if block == &zeros[..len] {
                    zero_run = match zero_run {
                        Some((start, n)) if start + n == offset && n + len as u64 <= ZERO_LEN_MAX => {
                            Some((start, n + len as u64))
                        }
                        other => {
                            let mut run = other;
                            self.flush_zero_run(d as u16, &mut run, report).await?;
                            Some((offset, len as u64))
                        }
                    };
                    continue;
                }
                self.flush_zero_run(d as u16, &mut zero_run, report).await?;
                self.send(Frame::Write { disk: d as u16, tag: 0, offset, data: bytes::Bytes::copy_from_slice(block) })
                    .await?;
                report.blocks_sent += 1;
                report.bytes_sent += len as u64;
                if report.blocks_read.is_multiple_of(64) {
                    progress(done, total);
                }
            }
            self.flush_zero_run(d as u16, &mut zero_run, report).await?;
            // A resync asked for while this disk was read: copy it all next pass.
            self.hashes[d] = if self.resync_requested[d] { None } else { Some(current) };
        }
        progress(total, total);
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let point_id = (self.last_point_id + 1).max(now_ms);
        self.last_point_id = point_id;
        let point = Frame::Point { tag: 0, point_id, kind, unix_ms: now_ms, disks: sizes.clone() };
        self.last_point = Some(point.clone());
        self.send(point).await?;
        while !self.unacked.is_empty() {
            self.next_event().await?;
        }
        self.commit_state(point_id, &sizes)?;
        Ok(point_id)
    }

    async fn flush_zero_run(
        &mut self,
        disk: u16,
        run: &mut Option<(u64, u64)>,
        report: &mut PassReport,
    ) -> Result<(), AgentError> {
        if let Some((offset, len)) = run.take() {
            self.send(Frame::Zero { disk, tag: 0, offset, len }).await?;
            report.zero_runs_sent += 1;
        }
        Ok(())
    }

    /// Queues a tagged frame and sends it; waits while the window is full.
    async fn send(&mut self, frame: Frame) -> Result<(), AgentError> {
        while self.unacked.len() >= self.cfg.window {
            self.next_event().await?;
        }
        let conn = self.connected().await?;
        let tag = conn.next_tag;
        conn.next_tag += 1;
        let tagged = with_tag(&frame, tag);
        let sent = conn.tx.send(tagged).await.is_ok();
        self.unacked.push_back(Unacked { tag, frame });
        if !sent {
            self.conn = None; // resent by the next connection
        }
        Ok(())
    }

    async fn next_event(&mut self) -> Result<(), AgentError> {
        let ack_timeout = self.cfg.ack_timeout;
        let conn = self.connected().await?;
        let event = match tokio::time::timeout(ack_timeout, conn.events.recv()).await {
            Ok(event) => {
                self.silent_connections = 0;
                event
            }
            Err(_) => {
                self.silent_connections += 1;
                if self.silent_connections >= self.cfg.silent_connections_max {
                    return Err(AgentError::Unresponsive(self.silent_connections, ack_timeout));
                }
                tracing::warn!(timeout = ?ack_timeout, "the process server acknowledged nothing; reconnecting");
                self.conn = None; // resent by the next connection
                return Ok(());
            }
        };
        self.handle_event(event)
    }

    /// Streaming: handles the server's messages that have already arrived, without
    /// waiting (a busy sender learns of acknowledgements and uploads promptly).
    pub fn take_arrived(&mut self) -> Result<(), AgentError> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Ok(()) };
            match conn.events.try_recv() {
                Ok(event) => self.handle_event(Some(event))?,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return Ok(()),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return self.handle_event(None),
            }
        }
    }

    fn handle_event(&mut self, event: Option<Event>) -> Result<(), AgentError> {
        match event {
            Some(Event::Durable(upto)) => {
                self.refused_since = None;
                while self.unacked.front().is_some_and(|u| u.tag <= upto) {
                    if let Some(Unacked { frame: Frame::Point { point_id, .. }, .. }) = self.unacked.pop_front() {
                        self.durable_point = self.durable_point.max(point_id);
                    }
                }
            }
            Some(Event::Uploaded(id)) => {
                self.uploaded.insert(id);
            }
            Some(Event::PointLost(id)) => {
                tracing::warn!(point_id = id, "the process server lost this recovery point before upload");
                self.lost.insert(id);
            }
            Some(Event::ResyncRequired(disk)) => {
                // A Resync still waiting for its acknowledgement already answers this.
                let pending =
                    self.unacked.iter().any(|u| matches!(u.frame, Frame::Resync { disk: d, .. } if d == disk));
                if let (false, Some(flag)) = (pending, self.resync_requested.get_mut(disk as usize)) {
                    tracing::warn!(disk, "the process server needs a full copy of this disk");
                    *flag = true;
                    // The stored hashes no longer describe what the server can restore.
                    if let Some(st) = &mut self.state {
                        if let Err(e) = st.forget(disk as usize, &self.cfg.disks[disk as usize].0) {
                            tracing::warn!(disk, error = %e, "cannot remove the block state");
                        }
                    }
                }
            }
            Some(Event::Hashes(answer)) => self.hash_answer(answer),
            Some(Event::Closed(why)) => {
                // Following the CS, a server that ends the session with a refusal may
                // have handed the machine on: reconnecting asks the CS (within the
                // refusal grace, reset by any acknowledgement).
                let follows_cs = matches!(self.cfg.locator, Locator::Cs { .. });
                if why.starts_with("refused") && (!follows_cs || self.refusal_grace_over()) {
                    return Err(AgentError::Refused(why));
                }
                tracing::warn!(%why, "connection to the process server lost; reconnecting");
                self.conn = None;
            }
            None => self.conn = None,
        }
        Ok(())
    }

    /// The live connection, (re)connecting with backoff and resending everything not yet
    /// acknowledged, in its original order.
    async fn connected(&mut self) -> Result<&mut Conn, AgentError> {
        if self.conn.is_none() {
            for (d, (id, path)) in self.cfg.disks.iter().enumerate() {
                if self.declared_bytes[d].is_none() {
                    let size = std::fs::File::open(path)
                        .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                        .map_err(|e| AgentError::Disk(id.clone(), e))?;
                    self.declared_bytes[d] = Some(size);
                }
            }
            let deadline = Instant::now() + self.cfg.reconnect_timeout;
            let mut delay = Duration::from_millis(50);
            let follows_cs = matches!(self.cfg.locator, Locator::Cs { .. });
            let mut conn = loop {
                let attempt = match self.locate().await {
                    Ok(()) => self.connect().await,
                    Err(e) => Err(e),
                };
                match attempt {
                    Ok(c) => break c,
                    // Following the CS, a refusal or a certificate that does not match
                    // may be a move the agent has not seen yet: ask again, for a while.
                    Err(e @ (AgentError::Refused(_) | AgentError::NotTrusted(..)))
                        if follows_cs && !self.refusal_grace_over() =>
                    {
                        tracing::info!(error = %e, "refused; asking the configuration server again");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    // Neither a wrong server nor a broken protocol mends by retrying.
                    Err(
                        e @ (AgentError::Refused(_)
                        | AgentError::NotTrusted(..)
                        | AgentError::BadServer(_)
                        | AgentError::Cs(_)
                        | AgentError::Tls(_)),
                    ) => return Err(e),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(AgentError::Unreachable(self.cfg.reconnect_timeout, e.to_string()))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "connect failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            };
            if self.reconnects > 0 || !self.unacked.is_empty() {
                for u in self.unacked.iter_mut() {
                    u.tag = conn.next_tag;
                    conn.next_tag += 1;
                    let _ = conn.tx.send(with_tag(&u.frame, u.tag)).await;
                }
            }
            self.reconnects += 1;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// Starts (or continues) the refusal grace period; true once it is over.
    fn refusal_grace_over(&mut self) -> bool {
        self.refused_since.get_or_insert_with(Instant::now).elapsed() >= self.cfg.refusal_grace
    }

    /// One connection attempt, bounded by `handshake_timeout` as a whole.
    async fn connect(&self) -> Result<Conn, AgentError> {
        let limit = self.cfg.handshake_timeout;
        match tokio::time::timeout(limit, self.connect_unbounded()).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Unreachable(Duration::ZERO, format!("no complete login within {limit:?}"))),
        }
    }

    async fn connect_unbounded(&self) -> Result<Conn, AgentError> {
        let unreachable = |e: String| AgentError::Unreachable(Duration::ZERO, e);
        // A frame from the server that cannot be read is a broken protocol; a connection
        // that ends is a network matter, retried.
        let frame_error = |e: FrameError| match e {
            FrameError::Closed | FrameError::Io(_) | FrameError::Truncated => unreachable(e.to_string()),
            other => AgentError::BadServer(other.to_string()),
        };
        let target = self.target.as_ref().ok_or_else(|| unreachable("no process server assigned yet".into()))?;
        let address = &target.address;
        let tcp = tokio::net::TcpStream::connect(address).await.map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h).trim_matches(['[', ']']);
        let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| unreachable(e.to_string()))?;
        let tls = target.tls.connect(name, tcp).await.map_err(|e| {
            let certificate = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
            if certificate {
                AgentError::NotTrusted(address.clone(), e.to_string())
            } else {
                unreachable(e.to_string())
            }
        })?;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let mut buf = Vec::new();
        let client_nonce = nonce();
        let machine = self.cfg.machine.clone();
        write_frame(&mut wr, &Frame::Hello { version: PROTOCOL_VERSION, machine: machine.clone(), client_nonce })
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        wr.flush().await.map_err(|e| unreachable(e.to_string()))?;
        let server_nonce = match read_frame(&mut rd, &mut buf).await {
            Ok(Frame::Challenge { server_nonce, .. }) => server_nonce,
            Ok(Frame::Error { message, .. }) => return Err(AgentError::Refused(message)),
            Ok(other) => return Err(AgentError::BadServer(format!("expected a challenge, got {other:?}"))),
            Err(e) => return Err(frame_error(e)),
        };
        let mac = self.key.client_mac(&client_nonce, &server_nonce, &machine);
        write_frame(&mut wr, &Frame::Auth { mac }).await.map_err(|e| unreachable(e.to_string()))?;
        wr.flush().await.map_err(|e| unreachable(e.to_string()))?;
        match read_frame(&mut rd, &mut buf).await {
            Ok(Frame::AuthOk { mac }) if self.key.verify_server(&client_nonce, &server_nonce, &machine, &mac) => {}
            Ok(Frame::AuthOk { .. }) => {
                return Err(AgentError::BadServer("the server did not prove it knows the passphrase".into()))
            }
            Ok(Frame::Error { message, .. }) => return Err(AgentError::Refused(message)),
            Ok(other) => return Err(AgentError::BadServer(format!("expected the login's answer, got {other:?}"))),
            Err(e) => return Err(frame_error(e)),
        }
        for (i, (id, _)) in self.cfg.disks.iter().enumerate() {
            let size_bytes = self.declared_bytes[i].expect("connected() reads every size first");
            write_frame(&mut wr, &Frame::OpenDisk { disk: i as u16, size_bytes, name: id.clone() })
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        }
        let (tx, mut out_rx) = mpsc::channel::<Frame>(self.cfg.window.max(16));
        let (ev_tx, events) = mpsc::channel::<Event>(self.cfg.window.max(16) * 2);
        tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if write_frame(&mut wr, &f).await.is_err() {
                    break;
                }
                if out_rx.is_empty() && wr.flush().await.is_err() {
                    break;
                }
            }
        });
        let ev = Arc::new(ev_tx);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let event = match read_frame(&mut rd, &mut buf).await {
                    Ok(Frame::Durable { upto_tag }) => Event::Durable(upto_tag),
                    Ok(Frame::Uploaded { point_id }) => Event::Uploaded(point_id),
                    Ok(Frame::PointLost { point_id }) => Event::PointLost(point_id),
                    Ok(Frame::ResyncRequired { disk }) => Event::ResyncRequired(disk),
                    Ok(
                        f @ (Frame::Hashes { .. }
                        | Frame::HashesEnd { .. }
                        | Frame::HashesUnavailable { .. }
                        | Frame::HashesPending { .. }),
                    ) => Event::Hashes(f),
                    Ok(Frame::Backpressure { retry_after_ms }) => {
                        tracing::info!(retry_after_ms, "process server signals backpressure");
                        continue;
                    }
                    // Authentication, version and protocol errors will not go away by
                    // reconnecting; a server-side error (code 4) may.
                    Ok(Frame::Error { code, message }) if code != crate::protocol::codec::E_SERVER => {
                        Event::Closed(format!("refused (code {code}): {message}"))
                    }
                    Ok(Frame::Error { code, message }) => Event::Closed(format!("server error {code}: {message}")),
                    Ok(other) => Event::Closed(format!("unexpected frame {other:?}")),
                    Err(FrameError::Closed) => Event::Closed("closed by the server".into()),
                    Err(e) => Event::Closed(e.to_string()),
                };
                let last = matches!(event, Event::Closed(_));
                if ev.send(event).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(Conn { tx, events, next_tag: 1 })
    }
}

/// State is kept for one server's history: a standalone server is named by its
/// certificate, the CS by its address (its servers share a target).
fn state_server(locator: &Locator) -> [u8; 32] {
    match locator {
        Locator::Fixed { cert_pem, .. } => state::server_identity("ps", cert_pem),
        Locator::Cs { client } => state::server_identity("cs", client.address()),
    }
}
