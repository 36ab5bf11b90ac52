//! A session after login: reads the agent's frames, checks each against the session's
//! rules and limits, appends records to the cache; an acknowledger task returns durable
//! and uploaded acknowledgements, a writer task owns the connection's write half.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::limits::StreamQuotaError;
use super::{SessionEnd, Shared};
use crate::cache::{AppendError, AppendTicket, Cache, StreamId, StreamInfo};
use crate::control::book::{MachineBook, SessionGuard};
use crate::protocol::codec::{E_PROTOCOL, E_SERVER, T_WRITE};
use crate::protocol::{
    read_frame_bytes, write_frame, write_frame_as_record, Frame, FrameError, StreamRecord, RECORD_HEADER_LEN,
};

/// A rule of the session the agent broke; the session ends with `Error{E_PROTOCOL}`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("unexpected frame {0}")]
    Unexpected(&'static str),
    #[error("tag {tag} after {last}: tags must increase")]
    TagOrder { tag: u64, last: u64 },
    #[error("{what} on unopened disk {disk}")]
    Unopened { what: &'static str, disk: u16 },
    #[error("more than {0} disks")]
    TooManyDisks(usize),
    #[error("more than {0} disk names in one session")]
    TooManyNames(usize),
    #[error("machine {machine:?} has {max} disk streams already")]
    MachineStreams { machine: String, max: usize },
    #[error("{what} past the disk's end: disk {disk}, offset {offset} + length {len} > size {size_bytes}")]
    PastEnd { what: &'static str, disk: u16, offset: u64, len: u64, size_bytes: u64 },
    #[error("a newer session of this machine opened disk {disk} (one agent per machine; a reconnected agent resends on its new session)")]
    Superseded { disk: String },
    #[error("point gives disk {disk} size {size_bytes}, below data written up to {written_end}")]
    PointBelowData { disk: u16, size_bytes: u64, written_end: u64 },
}

/// Frames the writer task may hold before the session and acknowledger wait for it.
const OUT_QUEUE_LEN: usize = 256;
/// Appended frames the acknowledger may hold before the session waits for it.
const ACK_QUEUE_LEN: usize = 4096;
/// How often the acknowledger looks for uploaded points and resync-required disks.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

/// Serves an authenticated connection until it closes, breaks a rule or the server stops.
pub(super) async fn serve<R, W>(
    mut rd: R,
    wr: W,
    mut buf: Vec<u8>,
    machine: String,
    shared: &Shared,
    stop: watch::Receiver<bool>,
    assigned: Option<(Arc<MachineBook>, watch::Receiver<u64>, SessionGuard)>,
) -> Result<(), SessionEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &shared.cfg;
    // One writer task owns the write half; the reader and the acknowledger send to it.
    let (out, out_rx) = mpsc::channel::<Frame>(OUT_QUEUE_LEN);
    let not_reading = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_out(wr, out_rx, cfg.write_timeout, not_reading.clone()));
    let (acks, ack_rx) = mpsc::channel::<AckWork>(ACK_QUEUE_LEN);
    let acker = Acknowledger {
        rx: ack_rx,
        out: out.clone(),
        cache: shared.cache.clone(),
        stats: shared.stats.clone(),
        durable_timeout: cfg.durable_timeout,
        points_max: cfg.points_watched_max,
    };
    let acker = tokio::spawn(acker.run());
    // The guard counts this session for the book until the session has wound down.
    let (book, moved, _guard) = match assigned {
        Some((book, rx, guard)) => (Some(book), Some(rx), Some(guard)),
        None => (None, None, None),
    };
    let ctx = Session {
        machine,
        shared,
        out: out.clone(),
        acks,
        not_reading: not_reading.clone(),
        book,
        token: shared.next_session.fetch_add(1, Ordering::Relaxed),
        hashing: Default::default(),
    };
    let result = ctx.run(&mut rd, &mut buf, stop, moved).await;
    drop(ctx); // its sender: the acknowledger ends once it has answered what is queued
    if let Err(e) = &result {
        let code = match e {
            SessionEnd::Frame(_) | SessionEnd::Refused(_) => {
                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                E_PROTOCOL
            }
            SessionEnd::NotReading(_) => {
                shared.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                E_SERVER
            }
            SessionEnd::Moved(_) => {
                shared.stats.sessions_moved.fetch_add(1, Ordering::Relaxed);
                E_SERVER
            }
            _ => E_SERVER,
        };
        // Bounded by the writer's timeout: a peer that does not read is not waited for.
        let _ = out.send(Frame::Error { code, message: e.to_string() }).await;
    }
    let _ = acker.await;
    drop(out);
    let _ = writer.await;
    result
}

/// Writes frames to the peer, flushing when the queue is empty. A frame not written
/// within `timeout` means the peer stopped reading: the writer gives up (sets
/// `not_reading`) and drops the queue, which ends the session.
async fn write_out<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Frame>,
    timeout: Duration,
    not_reading: Arc<AtomicBool>,
) {
    while let Some(f) = rx.recv().await {
        let flush = rx.is_empty();
        let wrote = tokio::time::timeout(timeout, async {
            write_frame(&mut wr, &f).await?;
            if flush {
                wr.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        match wrote {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                not_reading.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
    let _ = tokio::time::timeout(timeout, wr.shutdown()).await;
}

/// Appended frames waiting for durability, in tag order.
struct Pending {
    tag: u64,
    /// When the frame's first record was appended (for the acknowledgement latency).
    appended: std::time::Instant,
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

/// An opened disk index.
#[derive(Clone, Copy)]
struct OpenDisk {
    stream: StreamId,
    /// The size the agent declared; writes and zero runs must end within it.
    size_bytes: u64,
}

/// The disks a session opened and what it wrote to them.
#[derive(Default)]
struct Disks {
    by_index: HashMap<u16, OpenDisk>,
    /// Every name opened in this session (rebinding an index adds one).
    names: HashSet<String>,
    /// Per stream, the highest end of a write or zero run since the session began or the
    /// stream's last resync base: a point must give the disk at least this size, or
    /// restoring it would fail.
    written_end: HashMap<StreamId, u64>,
}

impl Disks {
    fn get(&self, disk: u16, what: &'static str) -> Result<OpenDisk, Refusal> {
        self.by_index.get(&disk).copied().ok_or(Refusal::Unopened { what, disk })
    }

    /// Checks that `len` bytes at `offset` lie within the disk's declared size.
    fn extent(&mut self, disk: u16, what: &'static str, offset: u64, len: u64) -> Result<StreamId, Refusal> {
        let d = self.get(disk, what)?;
        let end = offset.checked_add(len).filter(|&end| end <= d.size_bytes);
        let end = end.ok_or(Refusal::PastEnd { what, disk, offset, len, size_bytes: d.size_bytes })?;
        let written = self.written_end.entry(d.stream).or_insert(0);
        *written = (*written).max(end);
        Ok(d.stream)
    }
}

/// What a session's frame handlers share.
struct Session<'a> {
    machine: String,
    shared: &'a Shared,
    out: mpsc::Sender<Frame>,
    acks: mpsc::Sender<AckWork>,
    not_reading: Arc<AtomicBool>,
    /// With a CS: where the machine's assignment and resync requests are looked up.
    book: Option<Arc<MachineBook>>,
    /// This session's number in `Shared::writers`.
    token: u64,
    /// The delta-resync answer under way (one at a time; aborted with the session).
    hashing: parking_lot::Mutex<Option<AbortOnDrop>>,
}

/// A task that does not outlive its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once the machine may no longer go on here (moved away or unassigned); never
/// without a book. Only then does the session's select end the read: a read cancelled
/// mid-frame would lose the frame's bytes, so a book change that leaves the machine in
/// place must not interrupt it.
async fn moved_away(
    rx: &mut Option<watch::Receiver<u64>>,
    book: Option<&MachineBook>,
    machine: &str,
) -> crate::control::book::Refused {
    let (Some(rx), Some(book)) = (rx, book) else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Err(why) = book.may_continue(machine) {
            return why;
        }
    }
}

impl Session<'_> {
    /// Why the writer or the acknowledger went away.
    fn gone(&self) -> SessionEnd {
        if self.not_reading.load(Ordering::Relaxed) {
            SessionEnd::NotReading(self.shared.cfg.write_timeout)
        } else {
            SessionEnd::Stopping
        }
    }

    async fn acknowledge(&self, work: AckWork) -> Result<(), SessionEnd> {
        self.acks.send(work).await.map_err(|_| self.gone())
    }

    async fn run<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        buf: &mut Vec<u8>,
        mut stop: watch::Receiver<bool>,
        mut moved: Option<watch::Receiver<u64>>,
    ) -> Result<(), SessionEnd> {
        let (cfg, stats) = (&self.shared.cfg, &self.shared.stats);
        let mut disks = Disks::default();
        let mut last_tag = 0u64;
        loop {
            // One read per frame, kept across idle-timer expiries: a read dropped mid-frame
            // would lose the bytes it took.
            let read = {
                let frame = read_frame_bytes(rd, buf);
                tokio::pin!(frame);
                loop {
                    tokio::select! {
                        // The machine moved away (or was unassigned): end the session, so
                        // the drain can finish its data and the CS hand it on.
                        why = moved_away(&mut moved, self.book.as_deref(), &self.machine) => {
                            tracing::info!(machine = %self.machine, "{why}: closing its session");
                            return Err(SessionEnd::Moved(why));
                        }
                        r = &mut frame => match r {
                            Err(FrameError::Closed) => return Ok(()),
                            r => break r,
                        },
                        _ = tokio::time::sleep(cfg.idle_timeout) => {
                            // An agent waiting for its delta-resync answer sends nothing.
                            if self.hashing.lock().as_ref().is_some_and(|t| !t.0.is_finished()) {
                                continue;
                            }
                            stats.timeouts.fetch_add(1, Ordering::Relaxed);
                            return Err(SessionEnd::Timeout("idle"));
                        }
                        _ = stop.changed() => return Err(SessionEnd::Stopping),
                        // The writer gave up on a peer that does not read.
                        _ = self.out.closed() => return Err(self.gone()),
                    }
                }
            };
            read?;
            let appended = std::time::Instant::now();
            if buf[0] == T_WRITE {
                // The bulk of the traffic: the frame becomes its cache record in place.
                let (disk, tag, offset, record) = write_frame_as_record(buf)?;
                advance_tag(&mut last_tag, tag)?;
                let data_len = (record.len() - RECORD_HEADER_LEN) as u64;
                let stream = disks.extent(disk, "write", offset, data_len)?;
                let ticket = self.append(stream, record).await?;
                stats.writes.fetch_add(1, Ordering::Relaxed);
                stats.write_bytes.fetch_add(data_len, Ordering::Relaxed);
                self.acknowledge(AckWork::Pending(Pending {
                    tag,
                    appended,
                    tickets: vec![ticket],
                    point: None,
                    resync: None,
                }))
                .await?;
                continue;
            }
            match Frame::decode(buf[0], &buf[1..])? {
                Frame::OpenDisk { disk, size_bytes, name } => {
                    self.open_disk(&mut disks, disk, size_bytes, name).await?
                }
                Frame::Zero { disk, tag, offset, len } => {
                    advance_tag(&mut last_tag, tag)?;
                    let stream = disks.extent(disk, "zero run", offset, len)?;
                    let ticket = self.append(stream, &StreamRecord::Zero { offset, len }.encode()).await?;
                    self.acknowledge(AckWork::Pending(Pending {
                        tag,
                        appended,
                        tickets: vec![ticket],
                        point: None,
                        resync: None,
                    }))
                    .await?;
                }
                Frame::Point { tag, point_id, kind, unix_ms, disks: sizes } => {
                    advance_tag(&mut last_tag, tag)?;
                    // Every disk is checked before anything is appended.
                    let mut streams = Vec::with_capacity(sizes.len());
                    for &(disk, size_bytes) in &sizes {
                        let d = disks.get(disk, "point")?;
                        let written_end = disks.written_end.get(&d.stream).copied().unwrap_or(0);
                        if written_end > size_bytes {
                            return Err(Refusal::PointBelowData { disk, size_bytes, written_end }.into());
                        }
                        streams.push((d.stream, size_bytes));
                    }
                    let mut tickets = Vec::with_capacity(sizes.len());
                    let mut places = Vec::with_capacity(sizes.len());
                    for (stream, disk_size) in streams {
                        let record = StreamRecord::Point { point_id, kind, unix_ms, disk_size }.encode();
                        let ticket = self.append(stream, &record).await?;
                        places.push((stream, ticket.seq));
                        tickets.push(ticket);
                    }
                    let point = Some((point_id, places));
                    self.acknowledge(AckWork::Pending(Pending { tag, appended, tickets, point, resync: None })).await?;
                }
                Frame::Resync { disk, tag } => {
                    advance_tag(&mut last_tag, tag)?;
                    let stream = disks.get(disk, "resync")?.stream;
                    // Later points are built from the base on: what was written before it
                    // no longer has to fit them.
                    disks.written_end.insert(stream, 0);
                    let unix_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let ticket = self.append(stream, &StreamRecord::ResyncBase { unix_ms }.encode()).await?;
                    let seq = ticket.seq;
                    tracing::info!(machine = %self.machine, disk, seq, "full resync begins");
                    let resync = Some((stream, seq));
                    self.acknowledge(AckWork::Pending(Pending {
                        tag,
                        appended,
                        tickets: vec![ticket],
                        point: None,
                        resync,
                    }))
                    .await?;
                }
                Frame::HashesRequest { disk, block_size } => {
                    let d = disks.get(disk, "hashes request")?;
                    self.answer_hashes(disk, d, block_size).await?;
                }
                other => return Err(Refusal::Unexpected(other.name()).into()),
            }
        }
    }

    /// Starts the delta-resync answer for `disk` ([`super::hashes`]); a request while
    /// another is under way is answered `HashesUnavailable`.
    async fn answer_hashes(&self, disk: u16, d: OpenDisk, block_size: u32) -> Result<(), SessionEnd> {
        let busy = self.hashing.lock().as_ref().is_some_and(|t| !t.0.is_finished());
        let source = match (&self.shared.cfg.hashes, busy) {
            (_, true) => Err("another delta resync of this session is under way"),
            (None, _) => Err("this server answers no delta resync"),
            (Some(source), false) => Ok(source.clone()),
        };
        match source {
            Ok(source) => {
                let task = super::hashes::answer(
                    source,
                    self.shared.cache.clone(),
                    d.stream,
                    disk,
                    d.size_bytes,
                    block_size,
                    self.out.clone(),
                );
                *self.hashing.lock() = Some(AbortOnDrop(tokio::spawn(task)));
                Ok(())
            }
            Err(reason) => {
                let frame = Frame::HashesUnavailable { disk, reason: reason.into() };
                self.out.send(frame).await.map_err(|_| self.gone())
            }
        }
    }

    async fn open_disk(&self, disks: &mut Disks, disk: u16, size_bytes: u64, name: String) -> Result<(), SessionEnd> {
        let cfg = &self.shared.cfg;
        if disks.by_index.len() >= cfg.disks_max && !disks.by_index.contains_key(&disk) {
            return Err(Refusal::TooManyDisks(cfg.disks_max).into());
        }
        if disks.names.len() >= cfg.session_names_max && !disks.names.contains(&name) {
            return Err(Refusal::TooManyNames(cfg.session_names_max).into());
        }
        // Creating a stream writes the cache's META: keep it off the reactor.
        let opened = tokio::task::block_in_place(|| self.shared.quota.open(&self.shared.cache, &self.machine, &name));
        let stream = match opened {
            Ok(stream) => stream,
            Err(StreamQuotaError::MachineFull { machine, max }) => {
                return Err(Refusal::MachineStreams { machine, max }.into())
            }
            Err(StreamQuotaError::Cache(e)) => return Err(e.into()),
        };
        if let Some(book) = &self.book {
            // The CS asked for a full copy (the machine's data was lost elsewhere): the
            // acknowledger's watch then sends ResyncRequired for this disk.
            if book.resync_wanted(&self.machine) && !book.resync_marked(&self.machine, &name) {
                let cache = &self.shared.cache;
                tokio::task::block_in_place(|| cache.mark_resync_required(stream))?;
                tracing::warn!(machine = %self.machine, disk = %name, "resync required by the configuration server");
                book.note_resync_marked(&self.machine, &name);
            }
        }
        // From now on only this session appends to the stream.
        self.shared.writers.lock().insert(stream, self.token);
        disks.names.insert(name);
        disks.by_index.insert(disk, OpenDisk { stream, size_bytes });
        self.acknowledge(AckWork::Disk(disk, stream)).await
    }

    /// Appends, holding the connection back while the cache is above its hard watermark
    /// (and telling the agent so) instead of failing the write.
    async fn append(&self, stream: StreamId, record: &[u8]) -> Result<AppendTicket, SessionEnd> {
        let (cache, stats) = (&self.shared.cache, &self.shared.stats);
        let throttle = self.shared.cfg.throttle;
        let capacity = cache.options().capacity_bytes as f64;
        let free_percent = 100.0 * (1.0 - cache.used_bytes() as f64 / capacity);
        if free_percent < throttle.free_percent_min {
            // Held before the append, so this connection's next frames wait too: the
            // writers slow down and the drain gains on them.
            stats.throttled_records.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(throttle.delay).await;
        }
        let mut signalled = false;
        loop {
            if self.shared.writers.lock().get(&stream) != Some(&self.token) {
                let disk = cache.stream_info(stream).map_or_else(String::new, |i| i.disk);
                return Err(Refusal::Superseded { disk }.into());
            }
            // append may sleep briefly (throttling, a full batch): keep it off the reactor.
            match tokio::task::block_in_place(|| cache.append(stream, record)) {
                Ok(t) => return Ok(t),
                Err(AppendError::Backpressure { .. }) => {
                    if !signalled {
                        stats.backpressure_signals.fetch_add(1, Ordering::Relaxed);
                        let _ = self.out.send(Frame::Backpressure { retry_after_ms: 100 }).await;
                        signalled = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Tags of a connection must strictly increase.
fn advance_tag(last_tag: &mut u64, tag: u64) -> Result<(), Refusal> {
    if tag <= *last_tag {
        return Err(Refusal::TagOrder { tag, last: *last_tag });
    }
    *last_tag = tag;
    Ok(())
}

/// Waits for each pending frame's records to be durable, in order, and acknowledges;
/// watches recovery points until the drain has uploaded all their disks (or reports them
/// lost when records before them were dropped), and tells the agent when a disk needs a
/// full resync.
struct Acknowledger {
    rx: mpsc::Receiver<AckWork>,
    out: mpsc::Sender<Frame>,
    cache: Arc<Cache>,
    stats: Arc<super::IngestStats>,
    durable_timeout: Duration,
    points_max: usize,
}

impl Acknowledger {
    async fn run(mut self) {
        // Oldest first: when more than `points_max` wait, the oldest is no longer watched
        // (a later point's upload covers it on every disk they share).
        let mut points: VecDeque<(u64, Vec<(StreamId, u64)>)> = VecDeque::new();
        // Opened disks, and whether the agent has been told its disk needs a resync.
        let mut disks: Vec<(u16, StreamId, bool)> = Vec::new();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        let mut open = true;
        while open || !points.is_empty() {
            tokio::select! {
                w = self.rx.recv(), if open => match w {
                    Some(AckWork::Disk(disk, stream)) => {
                        disks.retain(|d| d.0 != disk);
                        disks.push((disk, stream, false));
                    }
                    Some(AckWork::Pending(p)) => {
                        if let Err(why) = self.durable(p.tickets).await {
                            let message = SessionEnd::NotDurable(why).to_string();
                            let _ = self.out.send(Frame::Error { code: E_SERVER, message }).await;
                            return;
                        }
                        self.stats.ack_latency.observe(p.appended.elapsed().as_secs_f64());
                        if let Some((stream, base)) = p.resync {
                            // The base is durable: points after it no longer depend on what was dropped.
                            if let Err(e) = self.cache.clear_resync(stream, base) {
                                tracing::warn!(error = %e, ?stream, base, "resync base not recorded; the agent will be asked again");
                            }
                            if let Some(d) = disks.iter_mut().find(|d| d.1 == stream) {
                                d.2 = false;
                            }
                        }
                        if self.out.send(Frame::Durable { upto_tag: p.tag }).await.is_err() {
                            return;
                        }
                        if let Some(point) = p.point {
                            points.push_back(point);
                            while points.len() > self.points_max {
                                let (dropped, _) = points.pop_front().expect("more than points_max");
                                self.stats.points_unwatched.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(point_id = dropped, "too many points waiting for upload; no longer watched");
                            }
                        }
                    }
                    None => open = false,
                },
                _ = tick.tick() => {
                    if self.watch(&mut disks, &mut points, open).await.is_err() {
                        return;
                    }
                    if !open && !points.is_empty() {
                        // The agent has gone: nobody waits for these any more.
                        points.clear();
                    }
                }
            }
        }
    }

    /// Waits for every ticket (each within `durable_timeout`); the first failure.
    async fn durable(&self, tickets: Vec<AppendTicket>) -> Result<(), String> {
        let mut failed = None;
        for t in tickets {
            match tokio::time::timeout(self.durable_timeout, t).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failed = failed.or(Some(e.to_string())),
                Err(_) => return Err(format!("not durable within {:?}", self.durable_timeout)),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// One look at the watched disks and points; `Err` once the writer is gone.
    async fn watch(
        &self,
        disks: &mut [(u16, StreamId, bool)],
        points: &mut VecDeque<(u64, Vec<(StreamId, u64)>)>,
        open: bool,
    ) -> Result<(), ()> {
        // One look per stream per tick, however many points name it.
        let mut infos: HashMap<StreamId, Option<StreamInfo>> = HashMap::new();
        let mut info = |s: StreamId| infos.entry(s).or_insert_with(|| self.cache.stream_info(s)).clone();
        for (disk, stream, told) in disks.iter_mut() {
            let required = info(*stream).is_some_and(|i| i.resync_required);
            if required && !*told && open {
                tracing::warn!(
                    disk = *disk,
                    ?stream,
                    "records were dropped before upload; asking the agent for a full resync"
                );
                self.out.send(Frame::ResyncRequired { disk: *disk }).await.map_err(|_| ())?;
            }
            *told = required;
        }
        let mut i = 0;
        while i < points.len() {
            let looked: Vec<_> = points[i].1.iter().map(|&(s, seq)| (info(s), seq)).collect();
            let lost = looked.iter().any(|(info, seq)| info.as_ref().is_none_or(|i| !i.history_whole_upto(*seq)));
            let done = looked.iter().all(|(info, seq)| info.as_ref().is_some_and(|i| i.uploaded_upto >= *seq));
            if lost || done {
                let (point_id, _) = points.remove(i).expect("i < len");
                let frame = if lost { Frame::PointLost { point_id } } else { Frame::Uploaded { point_id } };
                if lost {
                    tracing::warn!(point_id, "recovery point lost: records before it were dropped before upload");
                }
                self.out.send(frame).await.map_err(|_| ())?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }
}
