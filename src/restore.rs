//! Restore: rebuilds a disk image at a recovery point from the object store. It starts
//! from zeros after the latest resync base before the point (a full copy follows every
//! base), applies the records up to the point in position order, each exactly once (a
//! re-upload after a crash may overlap an earlier object). A missing position is an error,
//! never a silent hole; a point with a recorded gap (records dropped before upload)
//! between its base and itself is reported unrestorable.
//!
//! Nothing half-done is left under the output's name: the image is built in a temporary
//! file beside it and renamed over it only once complete and synced. Memory stays bounded:
//! an object's size is checked before it is downloaded, and its records are decoded one
//! at a time. Zero runs become holes where the file system can punch them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use object_store::path::Path as StorePath;

use crate::protocol::StreamRecord;
use crate::store::object::{ObjectError, ObjectRecords, OBJECT_LEN_MAX};
use crate::store::{GapEntry, Manifest, PointEntry, StoreError, Target};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("no manifest for {machine}/{disk} in {target}")]
    NoManifest { machine: String, disk: String, target: String },
    #[error("no restorable recovery point {point:?} for {machine}/{disk} (`latest` skips points that are not crash-consistent; `latest-any` takes them too)")]
    NoPoint { machine: String, disk: String, point: PointSelector },
    #[error("{machine}/{disk} point {point_id}: positions {}..={} were dropped before upload and no full resync began between them and the point", gap.first_seq, gap.last_seq)]
    Unrestorable { machine: String, disk: String, point_id: u64, gap: GapEntry },
    #[error("object {name}: not a valid object path: {why}")]
    ObjectName { name: String, why: String },
    #[error("object {name} is {len} bytes, more than the {max} an object may hold")]
    ObjectTooLarge { name: String, len: u64, max: u64 },
    #[error("object {name}: {source}")]
    Object { name: String, source: ObjectError },
    #[error("{machine}/{disk}: positions {first}..={last} are missing from the store")]
    Missing { machine: String, disk: String, first: u64, last: u64 },
    #[error("position {seq}: not a valid stream record: {why}")]
    Record { seq: u64, why: String },
    #[error("position {seq}: {what} {offset}+{len} lies past the disk's end ({disk_size})")]
    PastEnd { seq: u64, what: &'static str, offset: u64, len: u64, disk_size: u64 },
    #[error("output {path}: {source}")]
    Output { path: PathBuf, source: std::io::Error },
    #[error("{machine}/{disk}: the store's history was written by another cache ({found:016x}) and not handed over to this one")]
    OtherCache { machine: String, disk: String, found: u64 },
    #[error("output {0} is not a regular file: restore writes an image file (copy it to a device afterwards)")]
    OutputNotAFile(PathBuf),
}

/// Which recovery point to restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointSelector {
    /// The newest restorable point that is a state the disk had: crash- or
    /// application-consistent (`latest`).
    Latest,
    /// The newest restorable point of any kind, a not crash-consistent one included
    /// (`latest-any`): newer data, but possibly a mix the file system never saw.
    LatestAny,
    Id(u64),
}

impl std::str::FromStr for PointSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "latest" => return Ok(PointSelector::Latest),
            "latest-any" => return Ok(PointSelector::LatestAny),
            _ => {}
        }
        s.parse()
            .map(PointSelector::Id)
            .map_err(|_| format!("expected `latest`, `latest-any` or a point id, got {s:?}"))
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreReport {
    pub point: PointEntry,
    pub records_applied: u64,
    pub bytes_written: u64,
    pub objects_read: usize,
    pub seconds: f64,
}

/// A recovery point and whether it can be restored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PointStatus {
    #[serde(flatten)]
    pub point: PointEntry,
    pub restorable: bool,
    /// The point's age when it was uploaded (its record in the manifest): from the
    /// agent's time stamp to the drain's, ms. The recovery point objective achieved
    /// (across two clocks: the agent's and the process server's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_age_ms: Option<u64>,
    /// Position restore starts after (the resync base), when restorable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_because: Option<String>,
}

fn status(m: &Manifest, p: &PointEntry) -> PointStatus {
    let upload_age_ms = p.uploaded_unix_ms.map(|u| u.saturating_sub(p.unix_ms));
    match m.base_for(p.seq) {
        Ok(base) => {
            PointStatus { point: p.clone(), restorable: true, upload_age_ms, base: Some(base), lost_because: None }
        }
        Err(g) => PointStatus {
            point: p.clone(),
            restorable: false,
            upload_age_ms,
            base: None,
            lost_because: Some(format!(
                "positions {}..={} were dropped before upload and no full resync began between them and the point",
                g.first_seq, g.last_seq
            )),
        },
    }
}

/// The recovery points of one disk, oldest first.
pub async fn list_points(target: &Target, machine: &str, disk: &str) -> Result<Vec<PointStatus>, RestoreError> {
    let m = load(target, machine, disk).await?;
    let mut points: Vec<_> = m.points.iter().map(|p| status(&m, p)).collect();
    points.sort_by_key(|p| p.point.seq);
    Ok(points)
}

async fn load(target: &Target, machine: &str, disk: &str) -> Result<Manifest, RestoreError> {
    target.load_manifest(machine, disk).await?.ok_or_else(|| RestoreError::NoManifest {
        machine: machine.into(),
        disk: disk.into(),
        target: target.url.clone(),
    })
}

/// Runs blocking `f` in place, telling a multi-threaded tokio runtime first so it moves
/// its other tasks elsewhere (a current-thread runtime, or none, just runs it).
fn blocking_section<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The manifest's entry `point` selects (restorable or not, for an id).
fn choose(manifest: &Manifest, point: PointSelector) -> Option<&PointEntry> {
    let restorable = |p: &&PointEntry| manifest.base_for(p.seq).is_ok();
    match point {
        // The latest point that can be restored and is a state the disk had.
        PointSelector::Latest => manifest
            .points
            .iter()
            .filter(|p| p.kind != crate::protocol::PointKind::NotCrashConsistent)
            .filter(restorable)
            .max_by_key(|p| p.seq),
        PointSelector::LatestAny => manifest.points.iter().filter(restorable).max_by_key(|p| p.seq),
        PointSelector::Id(id) => manifest.points.iter().filter(|p| p.point_id == id).max_by_key(|p| p.seq),
    }
}

/// Rebuilds `machine`/`disk` at `point` into the file `out` (replaced only on success).
pub async fn restore(
    target: &Target,
    machine: &str,
    disk: &str,
    point: PointSelector,
    out: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let manifest = load(target, machine, disk).await?;
    let chosen = choose(&manifest, point).cloned().ok_or_else(|| RestoreError::NoPoint {
        machine: machine.into(),
        disk: disk.into(),
        point,
    })?;
    let base = manifest.base_for(chosen.seq).map_err(|gap| RestoreError::Unrestorable {
        machine: machine.into(),
        disk: disk.into(),
        point_id: chosen.point_id,
        gap,
    })?;
    let output_error = |source| RestoreError::Output { path: out.to_path_buf(), source };
    // The image is renamed over the output: a device node there would be replaced.
    if std::fs::symlink_metadata(out).is_ok_and(|m| !m.file_type().is_file()) {
        return Err(RestoreError::OutputNotAFile(out.to_path_buf()));
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = out.file_name().map_or("restore".into(), |n| n.to_string_lossy().into_owned());
    let partial = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(output_error)?;
    partial.as_file().set_len(chosen.disk_size).map_err(output_error)?;
    let mut image = Image { file: partial.as_file(), path: out, disk_size: chosen.disk_size, can_punch: true };
    let applied = apply(target, &manifest, &chosen, base, &mut image, progress).await?;
    partial.as_file().sync_all().map_err(output_error)?;
    // Dropping `partial` on any error above removed it; only a whole image gets the name.
    partial.persist(out).map_err(|e| output_error(e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(output_error)?;
    Ok(RestoreReport {
        point: chosen,
        records_applied: applied.records,
        bytes_written: applied.bytes,
        objects_read: applied.objects,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Delta resync (server side): rebuilds into `file` (set to `disk_size` bytes) every
/// uploaded record of `machine`/`disk` from its latest resync base on, whether or not a
/// point follows them: what a later point will build on. Returns the head position, or
/// `Ok(None)` when the store has no records for the disk. An unrestorable history (a gap
/// after the last base) or a record past `disk_size` is an error, and so is a history
/// another cache wrote and did not hand over to `cache_id` (this cache's drain would
/// continue it only after a gap).
pub async fn rebuild_head(
    target: &Target,
    machine: &str,
    disk: &str,
    cache_id: u64,
    disk_size: u64,
    file: &File,
    path: &Path,
) -> Result<Option<u64>, RestoreError> {
    let Some(manifest) = target.load_manifest(machine, disk).await? else { return Ok(None) };
    let Some(head) = manifest.objects.iter().map(|o| o.last_seq).max() else { return Ok(None) };
    if manifest.cache_id != cache_id && manifest.handed_over_at != Some(manifest.highest_position()) {
        return Err(RestoreError::OtherCache { machine: machine.into(), disk: disk.into(), found: manifest.cache_id });
    }
    let base = manifest.base_for(head + 1).map_err(|gap| RestoreError::Unrestorable {
        machine: machine.into(),
        disk: disk.into(),
        point_id: 0,
        gap,
    })?;
    file.set_len(disk_size).map_err(|source| RestoreError::Output { path: path.to_path_buf(), source })?;
    let upto = PointEntry {
        point_id: 0,
        kind: crate::protocol::PointKind::NotCrashConsistent,
        unix_ms: 0,
        seq: head,
        disk_size,
        uploaded_unix_ms: None,
    };
    let mut image = Image { file, path, disk_size, can_punch: true };
    apply(target, &manifest, &upto, base, &mut image, |_, _| {}).await?;
    Ok(Some(head))
}

struct Applied {
    records: u64,
    bytes: u64,
    objects: usize,
}

/// The image being built, and how zero runs are written to it.
struct Image<'a> {
    file: &'a File,
    /// The name the image gets once whole (for errors).
    path: &'a Path,
    disk_size: u64,
    /// False once the file system refused to punch a hole: zeros are written instead.
    can_punch: bool,
}

impl Image<'_> {
    fn check_range(&self, seq: u64, what: &'static str, offset: u64, len: u64) -> Result<(), RestoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.disk_size => Ok(()),
            _ => Err(RestoreError::PastEnd { seq, what, offset, len, disk_size: self.disk_size }),
        }
    }

    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if self.can_punch && len > 0 {
            match fallocate(self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => self.can_punch = false,
                Err(e) => return Err(e.into()),
            }
        }
        let zeros = vec![0u8; (len as usize).min(1 << 20)];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Applies positions `base+1..=point.seq`, each once, in order.
async fn apply(
    target: &Target,
    manifest: &Manifest,
    point: &PointEntry,
    base: u64,
    image: &mut Image<'_>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Applied, RestoreError> {
    let (machine, disk) = (&manifest.machine, &manifest.disk);
    let out_path = image.path.to_path_buf();
    let output_error = |source| RestoreError::Output { path: out_path.clone(), source };
    let missing =
        |first: u64, last: u64| RestoreError::Missing { machine: machine.clone(), disk: disk.clone(), first, last };
    let mut objects: Vec<_> =
        manifest.objects.iter().filter(|o| o.first_seq <= point.seq && o.last_seq > base).cloned().collect();
    objects.sort_by_key(|o| (o.first_seq, o.last_seq));
    let mut applied = base;
    let mut done = Applied { records: 0, bytes: 0, objects: 0 };
    let mut data = Vec::new();
    for entry in &objects {
        if entry.last_seq <= applied {
            continue;
        }
        let object_error = |source| RestoreError::Object { name: entry.name.clone(), source };
        let path = StorePath::parse(&entry.name)
            .map_err(|e| RestoreError::ObjectName { name: entry.name.clone(), why: e.to_string() })?;
        let got = target.store.get(&path).await?;
        if got.meta.size > OBJECT_LEN_MAX as u64 {
            return Err(RestoreError::ObjectTooLarge {
                name: entry.name.clone(),
                len: got.meta.size,
                max: OBJECT_LEN_MAX as u64,
            });
        }
        let body = got.bytes().await?;
        done.objects += 1;
        // Checking, decoding and writing an object (up to its cap) is blocking work: off
        // the async workers where the runtime allows it (the process server rebuilds
        // heads for delta resyncs on its ingest runtime).
        blocking_section(|| {
            let mut records = ObjectRecords::check(&body).map_err(object_error)?;
            while let Some(seq) = records.next_into(&mut data) {
                let seq = seq.map_err(object_error)?;
                if seq <= applied {
                    continue;
                }
                if seq > point.seq {
                    break;
                }
                if seq != applied + 1 {
                    return Err(missing(applied + 1, seq - 1));
                }
                match StreamRecord::decode(&data).map_err(|e| RestoreError::Record { seq, why: e.to_string() })? {
                    StreamRecord::Write { offset, data } => {
                        image.check_range(seq, "write", offset, data.len() as u64)?;
                        image.file.write_all_at(&data, offset).map_err(output_error)?;
                        done.bytes += data.len() as u64;
                    }
                    StreamRecord::Zero { offset, len } => {
                        image.check_range(seq, "zero run", offset, len)?;
                        image.zero(offset, len).map_err(output_error)?;
                    }
                    StreamRecord::Point { .. } | StreamRecord::ResyncBase { .. } => {}
                }
                applied = seq;
                done.records += 1;
            }
            Ok(())
        })?;
        progress(applied - base, point.seq - base);
    }
    if applied != point.seq {
        return Err(missing(applied + 1, point.seq));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PointKind;

    fn point(point_id: u64, kind: PointKind, seq: u64) -> PointEntry {
        PointEntry { point_id, kind, unix_ms: point_id, seq, disk_size: 1, uploaded_unix_ms: None }
    }

    #[test]
    fn latest_skips_points_that_are_not_crash_consistent_and_latest_any_does_not() {
        let mut m = Manifest {
            points: vec![
                point(1, PointKind::CrashConsistent, 10),
                point(2, PointKind::AppConsistent, 20),
                point(3, PointKind::NotCrashConsistent, 30),
            ],
            ..Manifest::default()
        };
        let id = |p: PointSelector, m: &Manifest| choose(m, p).map(|e| e.point_id);
        assert_eq!(id(PointSelector::Latest, &m), Some(2));
        assert_eq!(id(PointSelector::LatestAny, &m), Some(3));
        assert_eq!(id(PointSelector::Id(3), &m), Some(3), "an id is taken as asked");
        // An unrestorable newest point is skipped by both.
        m.points.push(point(4, PointKind::CrashConsistent, 40));
        m.gaps.push(GapEntry { first_seq: 35, last_seq: 36 });
        assert_eq!((id(PointSelector::Latest, &m), id(PointSelector::LatestAny, &m)), (Some(2), Some(3)));
        // Nothing but catch-up points: `latest` finds none.
        m.points.retain(|p| p.kind == PointKind::NotCrashConsistent);
        assert_eq!((id(PointSelector::Latest, &m), id(PointSelector::LatestAny, &m)), (None, Some(3)));
        assert_eq!("latest-any".parse::<PointSelector>(), Ok(PointSelector::LatestAny));
        assert_eq!("latest".parse::<PointSelector>(), Ok(PointSelector::Latest));
        assert!("newest".parse::<PointSelector>().unwrap_err().contains("latest-any"));
    }
}
