//! The drainer: uploads each stream's durable records in order, then acknowledges them
//! to the cache so their segments are reclaimed. Failures are retried with backoff; a
//! crash resumes from the cache's persisted upload cursor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::PutPayload;

use super::{object, DrainError, Manifest, ObjectEntry, PointEntry, Target};
use crate::cache::{Cache, ReadError, StreamId, StreamInfo};
use crate::protocol::StreamRecord;

#[derive(Clone, Debug)]
pub struct DrainConfig {
    /// An object closes at this many bytes (or at a recovery point).
    pub object_bytes_max: usize,
    /// Upload bandwidth cap, MB/s (None: unlimited).
    pub bandwidth_mb_per_s: Option<f64>,
    pub poll_interval: Duration,
    pub retry_delay_max: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            object_bytes_max: 8 << 20,
            bandwidth_mb_per_s: None,
            poll_interval: Duration::from_millis(50),
            retry_delay_max: Duration::from_secs(5),
        }
    }
}

pub struct Drainer {
    cache: Arc<Cache>,
    target: Target,
    cfg: DrainConfig,
    manifests: HashMap<StreamId, Manifest>,
    uploaded_bytes: u64,
    started: Instant,
}

impl Drainer {
    pub fn new(cache: Arc<Cache>, target: Target, cfg: DrainConfig) -> Drainer {
        Drainer { cache, target, cfg, manifests: HashMap::new(), uploaded_bytes: 0, started: Instant::now() }
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

    /// One pass over every stream; returns the records uploaded.
    pub async fn drain_once(&mut self) -> Result<usize, DrainError> {
        let mut uploaded = 0;
        for info in self.cache.streams() {
            if info.durable_upto > info.uploaded_upto {
                uploaded += self.drain_stream(&info).await?;
            }
        }
        Ok(uploaded)
    }

    async fn drain_stream(&mut self, info: &StreamInfo) -> Result<usize, DrainError> {
        if !self.manifests.contains_key(&info.id) {
            let m = self.target.load_manifest(&info.machine, &info.disk).await?.unwrap_or_else(|| Manifest {
                machine: info.machine.clone(),
                disk: info.disk.clone(),
                ..Manifest::default()
            });
            self.manifests.insert(info.id, m);
        }
        let mut records = Vec::new();
        let mut points = Vec::new();
        let mut bytes = 0usize;
        for seq in info.uploaded_upto + 1..=info.durable_upto {
            let data = match self.cache.read(info.id, seq) {
                Ok(d) => d,
                Err(e @ ReadError::Corruption { .. }) => {
                    // A record that cannot be read cannot be uploaded: the stream needs a
                    // resync. Evict it (loudly) rather than upload a hole.
                    tracing::error!(error = %e, machine = %info.machine, disk = %info.disk, "corrupt cached record: evicting the stream");
                    self.cache
                        .evict_stream(info.id, &format!("drain: {e}"))
                        .map_err(|e| DrainError::Cache(e.to_string()))?;
                    return Ok(0);
                }
                Err(e) => return Err(DrainError::Cache(e.to_string())),
            };
            if let Ok(StreamRecord::Point { point_id, kind, unix_ms, disk_size }) = StreamRecord::decode(&data) {
                points.push(PointEntry { point_id, kind, unix_ms, seq, disk_size });
            }
            bytes += data.len();
            records.push((seq, data));
            if !points.is_empty() || bytes >= self.cfg.object_bytes_max {
                break;
            }
        }
        let (first, last) = (records[0].0, records.last().expect("at least one").0);
        let body = object::encode(&records);
        let path = self.target.object_path(&info.machine, &info.disk, first, last);
        let len = body.len();
        self.target.store.put(&path, PutPayload::from(body)).await?;
        let manifest = self.manifests.get_mut(&info.id).expect("loaded above");
        manifest.objects.retain(|o| o.name != path.to_string());
        manifest.objects.push(ObjectEntry { name: path.to_string(), first_seq: first, last_seq: last });
        manifest.points.retain(|p| !points.iter().any(|n| n.point_id == p.point_id));
        manifest.points.extend(points);
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
        self.target.store.put(&self.target.manifest_path(&info.machine, &info.disk), PutPayload::from(json)).await?;
        // Only now is the run safe in the cloud: let the cache reclaim it.
        self.cache.ack(info.id, last).map_err(|e| DrainError::Cache(e.to_string()))?;
        self.throttle(len).await;
        Ok(records.len())
    }

    async fn throttle(&mut self, bytes: usize) {
        self.uploaded_bytes += bytes as u64;
        if let Some(limit) = self.cfg.bandwidth_mb_per_s {
            let due = Duration::from_secs_f64(self.uploaded_bytes as f64 / (limit * 1e6));
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}
