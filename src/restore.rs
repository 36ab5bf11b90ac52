//! Restore: rebuilds a disk image at a recovery point from the object store. It starts
//! from zeros after the latest resync base before the point (a full copy follows every
//! base), applies the records up to the point in position order, each exactly once (a
//! re-upload after a crash may overlap an earlier object). A missing position is an error,
//! never a silent hole; a point with a recorded gap (records dropped before upload)
//! between its base and itself is reported unrestorable.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use object_store::path::Path as StorePath;

use crate::drain::{object, DrainError, Manifest, PointEntry, Target};
use crate::protocol::StreamRecord;

/// Which recovery point to restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointSelector {
    Latest,
    Id(u64),
}

impl std::str::FromStr for PointSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "latest" {
            return Ok(PointSelector::Latest);
        }
        s.parse().map(PointSelector::Id).map_err(|_| format!("expected `latest` or a point id, got {s:?}"))
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
    /// Position restore starts after (the resync base), when restorable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_because: Option<String>,
}

fn status(m: &Manifest, p: &PointEntry) -> PointStatus {
    match m.base_for(p.seq) {
        Ok(base) => PointStatus { point: p.clone(), restorable: true, base: Some(base), lost_because: None },
        Err(g) => PointStatus {
            point: p.clone(),
            restorable: false,
            base: None,
            lost_because: Some(format!(
                "positions {}..={} were dropped before upload and no full resync began between them and the point",
                g.first_seq, g.last_seq
            )),
        },
    }
}

/// The recovery points of one disk, oldest first.
pub async fn list_points(target: &Target, machine: &str, disk: &str) -> Result<Vec<PointStatus>, DrainError> {
    let m = target
        .load_manifest(machine, disk)
        .await?
        .ok_or_else(|| DrainError::Restore(format!("no manifest for {machine}/{disk} in {}", target.url)))?;
    let mut points: Vec<_> = m.points.iter().map(|p| status(&m, p)).collect();
    points.sort_by_key(|p| p.point.seq);
    Ok(points)
}

pub async fn restore(
    target: &Target,
    machine: &str,
    disk: &str,
    point: PointSelector,
    out: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<RestoreReport, DrainError> {
    let started = Instant::now();
    let manifest = target
        .load_manifest(machine, disk)
        .await?
        .ok_or_else(|| DrainError::Restore(format!("no manifest for {machine}/{disk}")))?;
    let chosen = match point {
        // The latest point that can be restored.
        PointSelector::Latest => {
            manifest.points.iter().filter(|p| manifest.base_for(p.seq).is_ok()).max_by_key(|p| p.seq)
        }
        PointSelector::Id(id) => manifest.points.iter().filter(|p| p.point_id == id).max_by_key(|p| p.seq),
    }
    .cloned()
    .ok_or_else(|| DrainError::Restore(format!("no restorable recovery point {point:?} for {machine}/{disk}")))?;
    let base = manifest.base_for(chosen.seq).map_err(|_| {
        DrainError::Restore(format!(
            "{machine}/{disk} point {}: {}",
            chosen.point_id,
            status(&manifest, &chosen).lost_because.unwrap_or_default()
        ))
    })?;
    let mut objects: Vec<_> =
        manifest.objects.iter().filter(|o| o.first_seq <= chosen.seq && o.last_seq > base).cloned().collect();
    objects.sort_by_key(|o| (o.first_seq, o.last_seq));
    let file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(out)?;
    file.set_len(chosen.disk_size)?;
    let (mut applied, mut records, mut bytes) = (base, 0u64, 0u64);
    let mut objects_read = 0;
    for entry in &objects {
        if entry.last_seq <= applied {
            continue;
        }
        let path = StorePath::parse(&entry.name).map_err(|e| DrainError::Restore(e.to_string()))?;
        let body = target.store.get(&path).await?.bytes().await?;
        objects_read += 1;
        for (seq, data) in object::decode(&body).map_err(|e| DrainError::Object(entry.name.clone(), e))? {
            if seq <= applied {
                continue;
            }
            if seq > chosen.seq {
                break;
            }
            if seq != applied + 1 {
                return Err(DrainError::Restore(format!(
                    "{machine}/{disk}: records {}..{} are missing",
                    applied + 1,
                    seq - 1
                )));
            }
            match StreamRecord::decode(&data).map_err(|e| DrainError::Restore(format!("seq {seq}: {e}")))? {
                StreamRecord::Write { offset, data } => {
                    if offset.checked_add(data.len() as u64).is_none_or(|end| end > chosen.disk_size) {
                        return Err(DrainError::Restore(format!("seq {seq}: write past the disk's end")));
                    }
                    file.write_all_at(&data, offset)?;
                    bytes += data.len() as u64;
                }
                StreamRecord::Zero { offset, len } => {
                    if offset.checked_add(len).is_none_or(|end| end > chosen.disk_size) {
                        return Err(DrainError::Restore(format!("seq {seq}: zero run past the disk's end")));
                    }
                    let zeros = vec![0u8; (len as usize).min(1 << 20)];
                    let mut at = 0u64;
                    while at < len {
                        let n = (len - at).min(zeros.len() as u64) as usize;
                        file.write_all_at(&zeros[..n], offset + at)?;
                        at += n as u64;
                    }
                }
                StreamRecord::Point { .. } | StreamRecord::ResyncBase { .. } => {}
            }
            applied = seq;
            records += 1;
        }
        progress(applied - base, chosen.seq - base);
    }
    if applied != chosen.seq {
        return Err(DrainError::Restore(format!(
            "{machine}/{disk}: restored up to {applied}, the point needs {}",
            chosen.seq
        )));
    }
    file.sync_all()?;
    Ok(RestoreReport {
        point: chosen,
        records_applied: records,
        bytes_written: bytes,
        objects_read,
        seconds: started.elapsed().as_secs_f64(),
    })
}
