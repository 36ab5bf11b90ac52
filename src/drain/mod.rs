//! The drain: per stream, in order, records are packed into objects and uploaded to
//! object storage (`object_store`: local directory, Azure Blob, S3), with a per-stream
//! manifest that tells restore which objects and recovery points exist.
//!
//! Layout under the target's prefix:
//! `{machine}/{disk}/data/{first:020}-{last:020}.clo` (see [`object`]) and
//! `{machine}/{disk}/manifest.json`. Numbers in the manifest and in object names are
//! *positions* in the disk's history: the cache's sequence number plus the manifest's
//! `seq_offset`, which moves on when another cache (a rebuilt or different process
//! server) takes the disk over, so histories never collide. Object names are
//! deterministic, so a re-upload after a crash overwrites instead of duplicating; a run
//! re-packed differently after a crash is harmless because restore applies each position
//! once. Positions dropped before upload are recorded as gaps; a point is restorable when
//! no gap lies between the latest resync base before it and the point.

pub mod drainer;
pub mod object;
pub mod proxy;
pub mod throttle;

use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::ObjectStore;

pub use drainer::{DrainConfig, Drainer};
pub use proxy::ProxySettings;
pub use throttle::{BandwidthSchedule, WorkHours};

/// Tail cache for a cache that a drain reads from: the drain follows the writer by its
/// objects in flight and its passes over the streams, and a device read-back competes
/// with the writes (the engine's own default is 64 MiB). 256 MiB covers about a second of
/// ingest at this machine's end-to-end rate.
pub const DRAIN_TAIL_CACHE_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("bad target URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("manifest {0} is not valid JSON: {1}")]
    Manifest(String, serde_json::Error),
    #[error("object {0}: {1}")]
    Object(String, object::ObjectError),
    #[error("cache: {0}")]
    Cache(String),
    #[error("restore: {0}")]
    Restore(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// An object store and the prefix everything goes under.
#[derive(Clone)]
pub struct Target {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: StorePath,
    pub url: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.url)
    }
}

impl Target {
    /// `file:///abs/dir`, `az://container/prefix` (credentials and emulator from the
    /// standard `AZURE_*` variables) or `s3://bucket/prefix` (standard `AWS_*` variables,
    /// endpoint included). A proxy, when given, carries all HTTP traffic.
    pub fn from_url(url: &str, proxy: Option<&ProxySettings>) -> Result<Target, DrainError> {
        let bad = |why: &str| DrainError::Url { url: url.to_string(), why: why.to_string() };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected scheme://..."))?;
        let mut options = object_store::ClientOptions::new();
        if let Some(p) = proxy {
            options = options.with_proxy_url(p.url());
        }
        let (store, prefix): (Arc<dyn ObjectStore>, &str) = match scheme {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("file URLs need an absolute path: file:///abs/dir"));
                }
                std::fs::create_dir_all(rest)?;
                (Arc::new(object_store::local::LocalFileSystem::new_with_prefix(rest)?), "")
            }
            "az" | "azure" => {
                let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let store = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_client_options(options)
                    .build()?;
                (Arc::new(store), prefix)
            }
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                // Our client options replace the ones from_env read: carry this one over.
                let allow_http =
                    std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
                let options = options.with_allow_http(allow_http);
                let store = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(options)
                    .build()?;
                (Arc::new(store), prefix)
            }
            other => return Err(bad(&format!("unknown scheme {other:?} (file, az, s3)"))),
        };
        Ok(Target { store, prefix: StorePath::from(prefix.trim_matches('/')), url: url.to_string() })
    }

    pub fn stream_dir(&self, machine: &str, disk: &str) -> StorePath {
        self.prefix.child(machine).child(disk)
    }

    pub fn manifest_path(&self, machine: &str, disk: &str) -> StorePath {
        self.stream_dir(machine, disk).child("manifest.json")
    }

    pub fn object_path(&self, machine: &str, disk: &str, first: u64, last: u64) -> StorePath {
        self.stream_dir(machine, disk).child("data").child(format!("{first:020}-{last:020}.clo"))
    }

    pub async fn load_manifest(&self, machine: &str, disk: &str) -> Result<Option<Manifest>, DrainError> {
        let path = self.manifest_path(machine, disk);
        match self.store.get(&path).await {
            Ok(r) => {
                let bytes = r.bytes().await?;
                serde_json::from_slice(&bytes).map(Some).map_err(|e| DrainError::Manifest(path.to_string(), e))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectEntry {
    pub name: String,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Positions `first_seq..=last_seq` were dropped before upload (eviction, salvaged
/// damage, or the hand-over to another cache): no point after them is restorable until
/// a resync base.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GapEntry {
    pub first_seq: u64,
    pub last_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PointEntry {
    pub point_id: u64,
    pub kind: crate::protocol::PointKind,
    pub unix_ms: u64,
    /// Sequence number of the point's record in this stream: the point holds every
    /// record before it.
    pub seq: u64,
    pub disk_size: u64,
}

/// What exists in the object store for one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub machine: String,
    pub disk: String,
    /// The cache now draining this disk ([`crate::cache::Cache::cache_id`]).
    #[serde(default)]
    pub cache_id: u64,
    /// Position = that cache's sequence number + `seq_offset`.
    #[serde(default)]
    pub seq_offset: u64,
    /// Every position up to this one is in an object or a gap.
    #[serde(default)]
    pub recorded_upto: u64,
    pub objects: Vec<ObjectEntry>,
    pub points: Vec<PointEntry>,
    /// Positions of resync bases: a full copy of the disk follows each.
    #[serde(default)]
    pub bases: Vec<u64>,
    #[serde(default)]
    pub gaps: Vec<GapEntry>,
}

impl Manifest {
    /// The position restore starts after to build `point`: the latest resync base before
    /// it (0: the start of the history). Err names the gap that makes it unrestorable.
    pub fn base_for(&self, point: u64) -> Result<u64, GapEntry> {
        let base = self.bases.iter().copied().filter(|&b| b < point).max().unwrap_or(0);
        match self.gaps.iter().find(|g| g.last_seq > base && g.first_seq <= point) {
            Some(g) => Err(g.clone()),
            None => Ok(base),
        }
    }
}
