//! The drainer: uploads each stream's durable records in order, then acknowledges them
//! to the cache so their segments are reclaimed. Failures are retried with backoff; a
//! crash resumes from the cache's persisted upload cursor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;

use super::throttle::{BandwidthSchedule, Throttle};
use super::DrainError;
use crate::cache::{Cache, Codec, ReadError, StreamId, StreamInfo};
use crate::protocol::StreamRecord;
use crate::store::{object, GapEntry, Manifest, ManifestVersion, ObjectEntry, PointEntry, StoreError, Target};

/// Upload acknowledgements wait at most this long to share one META write with others
/// (the cache frees space only once acknowledged, so the wait is kept short).
const ACK_DELAY_MAX: Duration = Duration::from_secs(1);

/// Records shorter than this may be points or resync bases and are looked at; point and
/// base records are far shorter (see the test below), so longer ones are writes.
const SMALL_RECORD_LEN: usize = 4096;

#[derive(Clone, Debug)]
pub struct DrainConfig {
    /// An object closes at this many bytes (or at a recovery point).
    pub object_bytes_max: usize,
    /// Object uploads in flight per stream (they complete, and are acknowledged, in order).
    pub uploads_in_flight: usize,
    /// Upload bandwidth limits (default: unlimited).
    pub bandwidth: BandwidthSchedule,
    pub poll_interval: Duration,
    pub retry_delay_max: Duration,
    /// Machines to hand over to another process server once uploaded.
    pub handoffs: super::Handoffs,
    /// Machines whose records may be uploaded (all, unless linked to a CS).
    pub ownership: super::Ownership,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            object_bytes_max: 8 << 20,
            uploads_in_flight: 4,
            bandwidth: BandwidthSchedule::unlimited(),
            poll_interval: Duration::from_millis(50),
            retry_delay_max: Duration::from_secs(5),
            handoffs: super::Handoffs::default(),
            ownership: super::Ownership::default(),
        }
    }
}

/// What the drain has done, for health, heartbeats and metrics: shared with the process
/// server, kept across pauses of the drain.
#[derive(Debug, Default)]
pub struct DrainStats {
    /// Object bytes uploaded (as stored: compressed where it paid).
    pub uploaded_bytes: std::sync::atomic::AtomicU64,
    /// Per (machine, disk): the `unix_ms` of the newest recovery point recorded in the
    /// stream's manifest (the agent stamps it when it tags the point, after the point's
    /// last write).
    pub newest_point_ms: parking_lot::Mutex<HashMap<(String, String), u64>>,
    /// Records dropped because the CS assigns their machine to another server
    /// ([`super::Ownership`]).
    pub foreign_records_dropped: std::sync::atomic::AtomicU64,
}

impl DrainStats {
    /// The newest uploaded point of `machine` in every disk that has one: the oldest of
    /// its disks' newest points (a point covers every disk). None before the first.
    pub fn machine_point_ms(&self, machine: &str) -> Option<u64> {
        self.newest_point_ms.lock().iter().filter(|((m, _), _)| m == machine).map(|(_, &ms)| ms).min()
    }
}

pub struct Drainer {
    stats: Arc<DrainStats>,
    cache: Arc<Cache>,
    target: Target,
    cfg: DrainConfig,
    /// Each stream's manifest as last read or written, and its version there.
    manifests: HashMap<StreamId, (Manifest, ManifestVersion)>,
    throttle: Throttle,
    /// Uploads recorded in their manifests but not yet acknowledged to the cache, and
    /// when the oldest of them was recorded: a pass acknowledges them together.
    pending_acks: Vec<(StreamId, u64)>,
    pending_since: Option<Instant>,
}

impl Drainer {
    pub fn new(cache: Arc<Cache>, target: Target, cfg: DrainConfig) -> Drainer {
        Drainer::with_stats(cache, target, cfg, Arc::default())
    }

    /// A drainer that counts into `stats` (shared with whoever reports them).
    pub fn with_stats(cache: Arc<Cache>, target: Target, cfg: DrainConfig, stats: Arc<DrainStats>) -> Drainer {
        let throttle = Throttle::new(cfg.bandwidth.clone());
        Drainer {
            stats,
            cache,
            target,
            cfg,
            manifests: HashMap::new(),
            throttle,
            pending_acks: Vec::new(),
            pending_since: None,
        }
    }

    /// Drains until `stop` turns true; errors are logged and retried.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut delay = Duration::from_millis(100);
        while !*stop.borrow() {
            let pause = match self.drain_once().await {
                Ok(0) => self.cfg.poll_interval,
                Ok(_) => {
                    delay = Duration::from_millis(100);
                    Duration::ZERO
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "drain failed; retrying");
                    let d = delay;
                    delay = (delay * 2).min(self.cfg.retry_delay_max);
                    d
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// One pass over every stream; returns the records uploaded. A stream that fails does
    /// not hold the others back: the pass goes on and returns the first error at its end.
    pub async fn drain_once(&mut self) -> Result<usize, DrainError> {
        if !self.cfg.ownership.known() {
            // Linked to a CS that has not yet said which machines are this server's.
            return Ok(0);
        }
        let mut uploaded = 0;
        let mut first_error = None;
        for info in self.cache.streams() {
            if self.cfg.handoffs.is_done(&info.machine) {
                // The disk's history continues on another server now. Records that
                // became durable here after the hand-over (an append in flight as the
                // session closed; its agent resends it there) must never follow it.
                if info.durable_upto > info.uploaded_upto {
                    self.cache.evict_stream(info.id, "records arrived after the machine was handed over")?;
                }
                continue;
            }
            if !self.cfg.ownership.may_upload(&info.machine) {
                // Assigned elsewhere (or this server unknown to the CS): another server
                // continues this disk's history; stale records must never follow it. The
                // target is not touched.
                if info.durable_upto > info.uploaded_upto {
                    let report = self.cache.evict_stream(
                        info.id,
                        "the configuration server assigns this machine to another process server",
                    )?;
                    tracing::warn!(machine = %info.machine, disk = %info.disk, records = report.records,
                        "cached records of a machine assigned to another process server dropped: its history continues there");
                    self.stats.foreign_records_dropped.fetch_add(report.records, std::sync::atomic::Ordering::Relaxed);
                }
                continue;
            }
            if info.durable_upto > info.uploaded_upto {
                match self.drain_stream(&info).await {
                    Ok(n) => uploaded += n,
                    Err(e) => {
                        tracing::warn!(machine = %info.machine, disk = %info.disk, error = %e, "stream not drained");
                        // Reload the manifest next time: the failed write may or may not have landed.
                        self.manifests.remove(&info.id);
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        // Whatever the pass uploaded is acknowledged, streams that failed or not.
        if let Err(e) = self.flush_acks() {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.hand_over().await {
            first_error.get_or_insert(e);
        }
        match first_error {
            Some(e) if uploaded == 0 => Err(e),
            _ => Ok(uploaded),
        }
    }

    /// The stream's manifest, loaded once; when another cache drained this disk before,
    /// a new history begins after everything it recorded, with a gap in between.
    async fn manifest(&mut self, info: &StreamInfo) -> Result<(), DrainError> {
        if self.manifests.contains_key(&info.id) {
            return Ok(());
        }
        let cache_id = self.cache.cache_id();
        let (loaded, mut version) = self.target.load_manifest_versioned(&info.machine, &info.disk).await?;
        let fresh = loaded.is_none();
        let mut m = loaded.unwrap_or_else(|| Manifest {
            machine: info.machine.clone(),
            disk: info.disk.clone(),
            cache_id,
            ..Manifest::default()
        });
        let high = m.highest_position();
        if m.cache_id != cache_id && m.handed_over_at == Some(high) && high >= info.uploaded_upto {
            // The previous cache uploaded everything and handed the disk over: continue
            // right after it.
            tracing::info!(machine = %info.machine, disk = %info.disk, previous_cache = format!("{:016x}", m.cache_id),
                from = high + 1, "taking over this disk's history from the process server that handed it over");
            m.seq_offset = high - info.uploaded_upto;
            m.recorded_upto = high;
            m.cache_id = cache_id;
            m.handed_over_at = None;
            version = self.target.put_manifest(&mut m, &version).await?;
        } else if m.cache_id != cache_id {
            // A gap stands for whatever the other cache never uploaded; this cache's
            // records continue after it, from its own upload cursor.
            let gap = GapEntry { first_seq: high + 1, last_seq: (high + 1).max(info.uploaded_upto) };
            tracing::warn!(machine = %info.machine, disk = %info.disk, previous_cache = format!("{:016x}", m.cache_id),
                gap_at = gap.first_seq, "the target holds this disk's history from another cache: continuing after it; points need a resync");
            m.seq_offset = gap.last_seq - info.uploaded_upto;
            m.recorded_upto = gap.last_seq;
            m.cache_id = cache_id;
            m.gaps.push(gap);
            if !self.first_to_upload_is_base(info) {
                // Nothing here can be restored without a full copy after the junction.
                self.cache.evict_stream(info.id, "the target holds this disk's history from another cache")?;
            }
            version = self.target.put_manifest(&mut m, &version).await?;
        } else if fresh && !self.first_to_upload_is_base(info) {
            // The target has no history of this disk, yet this cache's records do not
            // begin with a full copy: they change a base the target never had (a server
            // rebuilt with the same certificate and an empty store, under an agent that
            // kept its block state). Restoring them would build on zeros; a full copy is
            // asked for instead, and the points before it are lost, loudly.
            tracing::warn!(machine = %info.machine, disk = %info.disk, from = info.uploaded_upto + 1,
                "the target holds no history of this disk and its records do not begin with a full copy: points need a resync");
            // The eviction's gap (`drain_stream`) then starts at position 1, covering also
            // what this cache uploaded before, if the store was emptied under it.
            self.cache.evict_stream(info.id, "the target holds no history of this disk")?;
        }
        self.manifests.insert(info.id, (m, version));
        Ok(())
    }

    /// Whether the stream's first record not yet uploaded is the base of a full copy
    /// (`ResyncBase`): only then can a history begin, or continue after a gap, there.
    fn first_to_upload_is_base(&self, info: &StreamInfo) -> bool {
        matches!(
            self.cache.read(info.id, info.uploaded_upto + 1).ok().map(|d| StreamRecord::decode(&d)),
            Some(Ok(StreamRecord::ResyncBase { .. }))
        )
    }

    /// For each machine being handed over whose streams are all uploaded (and
    /// acknowledged): marks every one of its disks' manifests handed over, then reports
    /// the hand-over done. A machine with records still to upload waits for a later pass.
    async fn hand_over(&mut self) -> Result<(), DrainError> {
        let machines = self.cfg.handoffs.pending();
        if machines.is_empty() {
            return Ok(());
        }
        let streams = self.cache.streams();
        for machine in machines {
            if !self.cfg.ownership.may_upload(&machine) {
                // No longer this server's (purged meanwhile): its manifests are another's.
                continue;
            }
            let mine: Vec<_> = streams.iter().filter(|i| i.machine == machine).collect();
            if mine.iter().any(|i| i.durable_upto > i.uploaded_upto) {
                continue;
            }
            for info in mine {
                self.manifest(info).await?;
                let (m, _) = self.manifests.get_mut(&info.id).expect("loaded above");
                let high = m.highest_position();
                if m.handed_over_at != Some(high) {
                    m.handed_over_at = Some(high);
                    self.put_manifest(info.id).await?;
                }
            }
            tracing::info!(machine = %machine, "every disk uploaded and handed over");
            self.cfg.handoffs.mark_done(&machine);
        }
        Ok(())
    }

    /// Acknowledges the pending uploads to the cache in one META write. Should that be
    /// refused, each is tried alone, so one stream's trouble holds no other back.
    fn flush_acks(&mut self) -> Result<(), DrainError> {
        self.pending_since = None;
        if self.pending_acks.is_empty() {
            return Ok(());
        }
        let acks = std::mem::take(&mut self.pending_acks);
        if self.cache.ack_many(&acks).is_ok() {
            return Ok(());
        }
        let mut first_error = None;
        for (stream, upto) in acks {
            if let Err(e) = self.cache.ack(stream, upto) {
                tracing::warn!(stream = stream.0, upto, error = %e, "upload not acknowledged; it is re-sent next pass");
                first_error.get_or_insert(DrainError::Stream(e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Queues an acknowledgement (its manifest is already written); flushes the queue
    /// once its oldest entry has waited `ACK_DELAY_MAX`.
    fn ack_later(&mut self, stream: StreamId, upto: u64) {
        self.pending_acks.push((stream, upto));
        let since = *self.pending_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= ACK_DELAY_MAX {
            // A failure is logged per stream and re-sent next pass; this stream's upload
            // itself went well.
            let _ = self.flush_acks();
        }
    }

    /// Writes the stream's manifest as held here, conditional on the version last seen.
    /// On any failure the copy held here is dropped, to be reloaded: the write may or may
    /// not have landed, or another writer changed it.
    async fn put_manifest(&mut self, stream: StreamId) -> Result<(), DrainError> {
        let (m, version) = self.manifests.get_mut(&stream).expect("loaded before it is written");
        match self.target.put_manifest(m, version).await {
            Ok(new_version) => {
                *version = new_version;
                Ok(())
            }
            Err(e) => {
                if matches!(e, StoreError::Conflict { .. }) {
                    tracing::error!(machine = %m.machine, disk = %m.disk, error = %e,
                        "another writer changed this disk's manifest: is a second process server draining it?");
                }
                self.manifests.remove(&stream);
                Err(e.into())
            }
        }
    }

    async fn drain_stream(&mut self, info: &StreamInfo) -> Result<usize, DrainError> {
        self.manifest(info).await?;
        let info = &self.cache.stream_info(info.id).ok_or(DrainError::StreamVanished(info.id.0))?;
        let offset = self.manifests[&info.id].0.seq_offset;
        {
            // Records dropped before upload become a gap, before anything after them.
            let m = &mut self.manifests.get_mut(&info.id).expect("loaded above").0;
            let evicted = info.evicted_upto + offset;
            if info.evicted_upto > 0 && evicted > m.recorded_upto {
                m.gaps.push(GapEntry { first_seq: m.recorded_upto + 1, last_seq: evicted });
                m.recorded_upto = evicted;
                self.put_manifest(info.id).await?;
            }
        }
        if info.durable_upto <= info.uploaded_upto {
            return Ok(0);
        }
        // Objects are built in order and uploaded several at a time; they complete in
        // order, and each completion updates the manifest and acknowledges the cache.
        let mut next = info.uploaded_upto + 1;
        let mut inflight = FuturesOrdered::new();
        let mut uploaded = 0;
        loop {
            while inflight.len() < self.cfg.uploads_in_flight.max(1) && next <= info.durable_upto {
                let Some(built) = tokio::task::block_in_place(|| self.build_object(info, next, offset))? else {
                    return Ok(uploaded); // the stream was evicted
                };
                next = built.last - offset + 1;
                let path = self.target.object_path(&info.machine, &info.disk, built.first, built.last);
                let target = self.target.clone();
                inflight.push_back(async move {
                    target.put_object(&path, built.body.clone()).await?;
                    Ok::<_, DrainError>((path, built))
                });
            }
            let Some(done) = inflight.next().await else { break };
            let mut completed = vec![done?];
            // Whatever else has finished too goes into the same manifest write and ack.
            while let Some(Some(more)) = inflight.next().now_or_never() {
                completed.push(more?);
            }
            let manifest = &mut self.manifests.get_mut(&info.id).expect("loaded above").0;
            let mut bytes = 0;
            let mut last = 0;
            let mut newest_point: Option<u64> = None;
            for (path, built) in completed {
                newest_point = built.points.iter().map(|p| p.unix_ms).chain(newest_point).max();
                manifest.objects.retain(|o| o.name != path.to_string());
                manifest.objects.push(ObjectEntry {
                    name: path.to_string(),
                    first_seq: built.first,
                    last_seq: built.last,
                });
                manifest.points.retain(|p| !built.points.iter().any(|n| n.point_id == p.point_id));
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                manifest
                    .points
                    .extend(built.points.into_iter().map(|p| PointEntry { uploaded_unix_ms: Some(now_ms), ..p }));
                for b in built.bases {
                    if !manifest.bases.contains(&b) {
                        manifest.bases.push(b);
                    }
                }
                manifest.recorded_upto = manifest.recorded_upto.max(built.last);
                // New records here: whatever hand-over mark an earlier stint left is void.
                manifest.handed_over_at = None;
                bytes += built.body.len();
                uploaded += built.records;
                last = built.last;
            }
            self.put_manifest(info.id).await?;
            self.stats.uploaded_bytes.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
            if let Some(newest) = newest_point {
                let key = (info.machine.clone(), info.disk.clone());
                let mut points = self.stats.newest_point_ms.lock();
                let at = points.entry(key).or_insert(newest);
                *at = (*at).max(newest);
            }
            // Only now is the run safe in the cloud: let the cache reclaim it (with the
            // other streams' acknowledgements of this pass, in one META write).
            self.ack_later(info.id, last - offset);
            let pause = self.throttle.account(bytes, Instant::now(), std::time::SystemTime::now());
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        Ok(uploaded)
    }

    /// Reads the stream's records from `from` into one object: up to `object_bytes_max`
    /// bytes, closed early after a point or a resync base. None: a record could not be
    /// read and the stream was evicted instead (loudly) rather than upload a hole.
    fn build_object(&self, info: &StreamInfo, from: u64, offset: u64) -> Result<Option<Built>, DrainError> {
        let object_bytes_max = self.cfg.object_bytes_max;
        let mut object = object::ObjectBuilder::with_capacity(object_bytes_max + (1 << 20));
        let (mut points, mut bases) = (Vec::new(), Vec::new());
        let (mut scratch, mut small) = (Vec::new(), Vec::new());
        let mut bad: Option<(u64, String)> = None;
        let read = self.cache.read_stored_run(
            info.id,
            from,
            info.durable_upto,
            object_bytes_max,
            &mut scratch,
            |seq, stored| {
                // Point and base records are a few dozen bytes: only a small record can be
                // one, and only a small one is decompressed to look (larger ones are writes).
                let record = match stored.codec {
                    Codec::Raw => Some(StreamRecord::decode(stored.bytes)),
                    Codec::Lz4 if (stored.logical_len as usize) < SMALL_RECORD_LEN => {
                        if let Err(what) = stored.decode_into(&mut small) {
                            bad = Some((seq, what));
                            return false;
                        }
                        Some(StreamRecord::decode(&small))
                    }
                    Codec::Lz4 => None,
                };
                match record {
                    Some(Ok(StreamRecord::Point { point_id, kind, unix_ms, disk_size })) => points.push(PointEntry {
                        point_id,
                        kind,
                        unix_ms,
                        seq: seq + offset,
                        disk_size,
                        uploaded_unix_ms: None,
                    }),
                    Some(Ok(StreamRecord::ResyncBase { .. })) => bases.push(seq + offset),
                    _ => {}
                }
                object.push_stored(seq + offset, stored.codec, stored.logical_len, stored.bytes, stored.crc);
                // An object ends after a point or a base, or when it is full.
                points.is_empty() && bases.is_empty() && object.len() < object_bytes_max
            },
        );
        let read = match (read, bad) {
            (Ok(_), Some((seq, what))) => Err(self.cache.corruption(info.id, seq, what)),
            (r, _) => r,
        };
        let records = match read {
            Ok(_) => object.count() as usize,
            Err(e @ ReadError::Corruption { .. }) => {
                self.cache.quarantine_corrupt(info.id, &e)?;
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let (first, last) = object.range();
        Ok(Some(Built { first, last, records, points, bases, body: bytes::Bytes::from(object.finish()) }))
    }
}

/// One object, built and waiting for (or done with) its upload.
struct Built {
    first: u64,
    last: u64,
    records: usize,
    points: Vec<PointEntry>,
    bases: Vec<u64>,
    body: bytes::Bytes,
}

#[cfg(test)]
mod tests {
    use super::SMALL_RECORD_LEN;
    use crate::protocol::{PointKind, StreamRecord};

    #[test]
    fn point_and_base_records_are_small() {
        let point = StreamRecord::Point {
            point_id: u64::MAX,
            kind: PointKind::AppConsistent,
            unix_ms: u64::MAX,
            disk_size: u64::MAX,
        };
        let base = StreamRecord::ResyncBase { unix_ms: u64::MAX };
        for r in [point, base] {
            assert!(r.encode().len() < SMALL_RECORD_LEN);
        }
    }
}

#[cfg(test)]
mod ack_tests {
    use std::sync::Arc;

    use super::{DrainConfig, Drainer};
    use crate::cache::{Cache, Options};
    use crate::store::Target;

    /// A pass over several streams acknowledges all of them in one META write, and only
    /// after their manifests are written: every stream's cursor reaches what is durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_pass_acknowledges_every_stream_in_one_meta_write() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path().join("cache"), Options::small_for_tests()).unwrap());
        let streams: Vec<_> = (0..5).map(|i| cache.stream(&format!("m{i}"), "disk-0").unwrap()).collect();
        for &s in &streams {
            // A history begins with a full copy's base.
            let base = crate::protocol::StreamRecord::ResyncBase { unix_ms: 1 };
            cache.append(s, &base.encode()).unwrap().wait().unwrap();
            for seq in 1..=6u64 {
                let record = crate::protocol::StreamRecord::Write { offset: seq * 4096, data: vec![seq as u8; 4096] };
                cache.append(s, &record.encode()).unwrap().wait().unwrap();
            }
        }
        let url = format!("file://{}", dir.path().join("cloud").display());
        let mut drainer = Drainer::new(cache.clone(), Target::from_url(&url, None).unwrap(), DrainConfig::default());
        let before = cache.stats().meta_writes;
        assert_eq!(drainer.drain_once().await.unwrap(), 35);
        assert_eq!(cache.stats().meta_writes, before + 1, "one META write for the whole pass");
        for &s in &streams {
            let info = cache.stream_info(s).unwrap();
            assert_eq!(info.uploaded_upto, 7, "{}", info.machine);
        }
        assert_eq!(drainer.drain_once().await.unwrap(), 0, "nothing left");
        assert_eq!(cache.stats().meta_writes, before + 1, "an empty pass writes nothing");
    }
}
