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
//! deterministic: a re-upload after a crash finds the object already there and checks
//! that it holds the same bytes; a run re-packed differently after a crash is harmless
//! because restore applies each position once.
//!
//! Nothing is overwritten silently. Data objects are written create-only, and an object
//! already present under the name must hold the same bytes. The manifest is written with
//! a condition on the version read (or written) last: an ETag match on Azure Blob and S3,
//! and on `file://` targets a check of the same version under an exclusive lock beside the
//! manifest. A second server draining the same disk gets a conflict, never a lost update.
//! On `file://` targets every object and manifest is fsynced with its directory before
//! the write returns, so the cache space an upload frees is reused only once it is
//! durable.

pub mod manifest;
pub mod object;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};

pub use manifest::{GapEntry, Manifest, ManifestPart, ObjectEntry, PartEntry, PointEntry};

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
    #[error("{path} was changed by another writer since this server read it: not overwritten")]
    Conflict { path: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The version of a manifest a write is conditional on: the one read (or written) last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ManifestVersion {
    /// There was no manifest: the write must create it.
    #[default]
    Absent,
    At(UpdateVersion),
}

/// An object store and the prefix everything goes under.
#[derive(Clone)]
pub struct Target {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: StorePath,
    pub url: String,
    /// The directory of a `file://` target: writes there are fsynced, and conditional
    /// manifest writes are done under a lock.
    local_root: Option<PathBuf>,
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
        let local_root = (scheme == "file").then(|| PathBuf::from(rest));
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
        Ok(Target { store, prefix: StorePath::from(prefix.trim_matches('/')), url: url.to_string(), local_root })
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
        Ok(self.load_manifest_versioned(machine, disk).await?.0)
    }

    /// The disk's manifest and the version a later [`Target::put_manifest`] is conditional on.
    pub async fn load_manifest_versioned(
        &self,
        machine: &str,
        disk: &str,
    ) -> Result<(Option<Manifest>, ManifestVersion), StoreError> {
        let path = self.manifest_path(machine, disk);
        match self.store.get(&path).await {
            Ok(r) => {
                let len = r.meta.size;
                if len > MANIFEST_LEN_MAX {
                    return Err(StoreError::ManifestTooLarge { path: path.to_string(), len, max: MANIFEST_LEN_MAX });
                }
                let version =
                    ManifestVersion::At(UpdateVersion { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() });
                let bytes = r.bytes().await?;
                let mut m: Manifest = serde_json::from_slice(&bytes)
                    .map_err(|source| StoreError::ManifestJson { path: path.to_string(), source })?;
                for part in m.parts.clone() {
                    m.merge_part(self.load_part(&part.name).await?);
                }
                Ok((Some(m), version))
            }
            Err(object_store::Error::NotFound { .. }) => Ok((None, ManifestVersion::Absent)),
            Err(e) => Err(e.into()),
        }
    }

    /// One sealed part of a manifest (its size checked before it is read whole).
    async fn load_part(&self, name: &str) -> Result<ManifestPart, StoreError> {
        let bad_name = |why: String| StoreError::Url { url: name.to_string(), why };
        let path = StorePath::parse(name).map_err(|e| bad_name(e.to_string()))?;
        let r = self.store.get(&path).await?;
        if r.meta.size > MANIFEST_LEN_MAX {
            return Err(StoreError::ManifestTooLarge {
                path: name.to_string(),
                len: r.meta.size,
                max: MANIFEST_LEN_MAX,
            });
        }
        let bytes = r.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::ManifestJson { path: name.to_string(), source })
    }

    /// Writes the disk's manifest if the stored one is still at `expected`; returns the
    /// new version. A head grown too long is first checkpointed into a part (recorded in
    /// `m.parts`). [`StoreError::Conflict`] when another writer got there first: reload
    /// before trying again.
    pub async fn put_manifest(
        &self,
        m: &mut Manifest,
        expected: &ManifestVersion,
    ) -> Result<ManifestVersion, StoreError> {
        let dir = self.stream_dir(&m.machine, &m.disk);
        while let Some((entry, part)) = m.next_part(|first, upto| {
            dir.child("manifest-parts").child(format!("{first:020}-{upto:020}.json")).to_string()
        }) {
            let path = StorePath::parse(&entry.name).expect("a name made from a store path");
            let body = serde_json::to_vec(&part).expect("a manifest part always serializes");
            self.put_object(&path, bytes::Bytes::from(body)).await?;
            m.parts.push(entry);
        }
        let path = self.manifest_path(&m.machine, &m.disk);
        let json = PutPayload::from(serde_json::to_vec_pretty(&m.head()).expect("a manifest always serializes"));
        let conflict = || StoreError::Conflict { path: path.to_string() };
        let Some(root) = &self.local_root else {
            let mode = match expected {
                ManifestVersion::Absent => PutMode::Create,
                ManifestVersion::At(v) => PutMode::Update(v.clone()),
            };
            return match self.store.put_opts(&path, json, PutOptions::from(mode)).await {
                Ok(r) => Ok(ManifestVersion::At(UpdateVersion { e_tag: r.e_tag, version: r.version })),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    Err(conflict())
                }
                Err(e) => Err(e.into()),
            };
        };
        // The local file system has no conditional overwrite: check and write under an
        // exclusive lock that every writer of this manifest takes.
        let file = local_file(root, &path);
        let dir = file.parent().expect("a manifest has a directory").to_path_buf();
        let lock = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            std::fs::create_dir_all(&dir)?;
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(".manifest.lock"))?;
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
            Ok(lock)
        })
        .await
        .expect("lock task")?;
        let current = match self.store.head(&path).await {
            Ok(meta) => ManifestVersion::At(UpdateVersion { e_tag: meta.e_tag, version: meta.version }),
            Err(object_store::Error::NotFound { .. }) => ManifestVersion::Absent,
            Err(e) => return Err(e.into()),
        };
        if current != *expected {
            return Err(conflict());
        }
        let r = self.store.put_opts(&path, json, PutOptions::from(PutMode::Overwrite)).await?;
        let first = *expected == ManifestVersion::Absent;
        let root = root.clone();
        tokio::task::spawn_blocking(move || sync_local(&root, &file, first)).await.expect("sync task")?;
        drop(lock);
        Ok(ManifestVersion::At(UpdateVersion { e_tag: r.e_tag, version: r.version }))
    }

    /// Writes a data object, create-only. An object already there (a re-upload after a
    /// crash) is accepted only if it holds exactly these bytes.
    pub async fn put_object(&self, path: &StorePath, body: bytes::Bytes) -> Result<(), StoreError> {
        match self.store.put_opts(path, PutPayload::from(body.clone()), PutOptions::from(PutMode::Create)).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                let existing = self.store.get(path).await?;
                if existing.meta.size != body.len() as u64 || existing.bytes().await? != body {
                    return Err(StoreError::Conflict { path: path.to_string() });
                }
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(root) = &self.local_root {
            let (root, file) = (root.clone(), local_file(root, path));
            tokio::task::spawn_blocking(move || sync_local(&root, &file, false)).await.expect("sync task")?;
        }
        Ok(())
    }
}

/// Where a `file://` target keeps `path`.
fn local_file(root: &Path, path: &StorePath) -> PathBuf {
    path.parts().fold(root.to_path_buf(), |p, part| p.join(part.as_ref()))
}

/// Makes a file written into a `file://` target durable: the file, its directory, and
/// when `whole_chain`, every directory up to the target's root (new ones included).
fn sync_local(root: &Path, file: &Path, whole_chain: bool) -> std::io::Result<()> {
    std::fs::File::open(file)?.sync_all()?;
    let mut dir = file.parent();
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        if !whole_chain || d == root || !d.starts_with(root) {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}
