//! The object-store layout: where a process server's drain puts each disk's history and
//! where restore finds it. One [`Target`] (an object store and a prefix), the names of
//! everything under it, the per-disk [`manifest`] and the data [`object`] format. The
//! drain writes this layout and restore reads it; neither owns it.
//!
//! Layout under the target's prefix:
//! `{machine}/{disk}/data/{first:020}-{last:020}.clo` (see [`object`]) and
//! `{machine}/{disk}/manifest.json` (see [`manifest`]). Numbers in the manifest and in
//! object names are *positions* in the disk's history: the cache's sequence number plus
//! the manifest's `seq_offset`, which moves on when another cache (a rebuilt or different
//! process server) takes the disk over, so histories never collide. Object names are
//! deterministic, so a re-upload after a crash overwrites instead of duplicating; a run
//! re-packed differently after a crash is harmless because restore applies each position
//! once.

pub mod manifest;
pub mod object;

use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::ObjectStore;

pub use manifest::{GapEntry, Manifest, ObjectEntry, PointEntry};

use crate::proxy::ProxySettings;

/// Largest manifest accepted on read: a manifest is read whole, so its size is checked
/// before it is downloaded.
pub const MANIFEST_LEN_MAX: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad target URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("manifest {path} is not valid JSON: {source}")]
    ManifestJson { path: String, source: serde_json::Error },
    #[error("manifest {path} is {len} bytes, more than the {max} accepted")]
    ManifestTooLarge { path: String, len: u64, max: u64 },
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
    pub fn from_url(url: &str, proxy: Option<&ProxySettings>) -> Result<Target, StoreError> {
        let bad = |why: &str| StoreError::Url { url: url.to_string(), why: why.to_string() };
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

    /// Everything of one disk lives under this directory.
    pub fn stream_dir(&self, machine: &str, disk: &str) -> StorePath {
        self.prefix.child(machine).child(disk)
    }

    pub fn manifest_path(&self, machine: &str, disk: &str) -> StorePath {
        self.stream_dir(machine, disk).child("manifest.json")
    }

    /// The data object holding positions `first..=last` of the disk's history.
    pub fn object_path(&self, machine: &str, disk: &str, first: u64, last: u64) -> StorePath {
        self.stream_dir(machine, disk).child("data").child(format!("{first:020}-{last:020}.clo"))
    }

    /// The disk's manifest, None when the disk has none yet. Its size is checked before
    /// it is read whole.
    pub async fn load_manifest(&self, machine: &str, disk: &str) -> Result<Option<Manifest>, StoreError> {
        let path = self.manifest_path(machine, disk);
        match self.store.get(&path).await {
            Ok(r) => {
                let len = r.meta.size;
                if len > MANIFEST_LEN_MAX {
                    return Err(StoreError::ManifestTooLarge { path: path.to_string(), len, max: MANIFEST_LEN_MAX });
                }
                let bytes = r.bytes().await?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::ManifestJson { path: path.to_string(), source })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the disk's manifest (whole, replacing the previous one).
    pub async fn put_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(m).expect("a manifest always serializes");
        self.store.put(&self.manifest_path(&m.machine, &m.disk), object_store::PutPayload::from(json)).await?;
        Ok(())
    }
}
