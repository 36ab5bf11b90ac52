//! A disk's manifest: which data objects, recovery points, resync bases and gaps exist
//! in the object store for it. Restore trusts nothing else; the drain rewrites it after
//! every run of uploads it acknowledges to the cache.
//!
//! So that a long history (or a flood of recovery points) does not make every rewrite
//! longer, the manifest is checkpointed: once its head holds more than
//! [`HEAD_ENTRIES_MAX`] entries, everything but the newest [`HEAD_ENTRIES_KEPT`] moves
//! into an immutable part object (`manifest-parts/{first:020}-{upto:020}.json`, written
//! create-only) that the head lists. A rewrite then costs at most the head, and the total
//! uploaded grows linearly with the history. In memory a [`Manifest`] always holds every
//! entry, parts merged in.

/// A data object holding positions `first_seq..=last_seq`.
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
    /// When the drain recorded the point here, its objects uploaded (Unix ms, the
    /// process server's clock); absent in manifests written before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_unix_ms: Option<u64>,
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
    /// Sealed parts holding the older entries, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartEntry>,
    /// Set by a cache that handed this disk over to another process server (a move):
    /// every position up to this one is recorded and nothing of the disk is left in that
    /// cache, so the next cache continues the history right after it, without a gap and
    /// without a full copy. Cleared by the cache that takes over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_over_at: Option<u64>,
}

/// A sealed part of a manifest: every entry at or below position `upto` (and above the
/// previous part's) lives in the part object `name`, not in the head.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartEntry {
    pub name: String,
    pub first_seq: u64,
    pub upto: u64,
}

/// The body of a part object.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestPart {
    pub objects: Vec<ObjectEntry>,
    pub points: Vec<PointEntry>,
    pub bases: Vec<u64>,
    pub gaps: Vec<GapEntry>,
}

/// A head with more entries than this is checkpointed into a part.
pub const HEAD_ENTRIES_MAX: usize = 2048;
/// Entries a checkpoint leaves in the head (the newest: a re-upload after a crash
/// rewrites only recent ones).
pub const HEAD_ENTRIES_KEPT: usize = 256;

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

    /// Position up to which entries live in sealed parts (0: none).
    pub fn sealed_upto(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.upto)
    }

    /// Entries the head would hold (those above the sealed parts).
    pub fn head_entries(&self) -> usize {
        let sealed = self.sealed_upto();
        self.objects.iter().filter(|o| o.last_seq > sealed).count()
            + self.points.iter().filter(|p| p.seq > sealed).count()
            + self.bases.iter().filter(|&&b| b > sealed).count()
            + self.gaps.iter().filter(|g| g.last_seq > sealed).count()
    }

    /// The head as stored: the manifest without the entries its parts hold.
    pub fn head(&self) -> Manifest {
        let sealed = self.sealed_upto();
        Manifest {
            objects: self.objects.iter().filter(|o| o.last_seq > sealed).cloned().collect(),
            points: self.points.iter().filter(|p| p.seq > sealed).cloned().collect(),
            bases: self.bases.iter().copied().filter(|&b| b > sealed).collect(),
            gaps: self.gaps.iter().filter(|g| g.last_seq > sealed).cloned().collect(),
            ..self.clone()
        }
    }

    /// When the head has grown past [`HEAD_ENTRIES_MAX`]: the next part to seal (its
    /// entry and body), leaving the newest [`HEAD_ENTRIES_KEPT`] entries in the head.
    /// `name` makes the part object's name from its first and last positions.
    pub fn next_part(&self, name: impl Fn(u64, u64) -> String) -> Option<(PartEntry, ManifestPart)> {
        if self.head_entries() <= HEAD_ENTRIES_MAX {
            return None;
        }
        let sealed = self.sealed_upto();
        // Every position an entry of the head ends at, newest last.
        let mut ends: Vec<u64> = self
            .objects
            .iter()
            .map(|o| o.last_seq)
            .chain(self.points.iter().map(|p| p.seq))
            .chain(self.bases.iter().copied())
            .chain(self.gaps.iter().map(|g| g.last_seq))
            .filter(|&e| e > sealed)
            .collect();
        ends.sort_unstable();
        let upto = ends[ends.len() - HEAD_ENTRIES_KEPT - 1];
        let part = ManifestPart {
            objects: self.objects.iter().filter(|o| o.last_seq > sealed && o.last_seq <= upto).cloned().collect(),
            points: self.points.iter().filter(|p| p.seq > sealed && p.seq <= upto).cloned().collect(),
            bases: self.bases.iter().copied().filter(|&b| b > sealed && b <= upto).collect(),
            gaps: self.gaps.iter().filter(|g| g.last_seq > sealed && g.last_seq <= upto).cloned().collect(),
        };
        Some((PartEntry { name: name(sealed + 1, upto), first_seq: sealed + 1, upto }, part))
    }

    /// Merges a part's entries into this manifest (an entry already here wins: the head
    /// is newer).
    pub fn merge_part(&mut self, part: ManifestPart) {
        // Sets, not scans: a reader merges every part of a long history.
        let names: std::collections::HashSet<String> = self.objects.iter().map(|o| o.name.clone()).collect();
        let ids: std::collections::HashSet<u64> = self.points.iter().map(|p| p.point_id).collect();
        let bases: std::collections::HashSet<u64> = self.bases.iter().copied().collect();
        self.objects.extend(part.objects.into_iter().filter(|o| !names.contains(&o.name)));
        self.points.extend(part.points.into_iter().filter(|p| !ids.contains(&p.point_id)));
        self.bases.extend(part.bases.into_iter().filter(|b| !bases.contains(b)));
        for g in part.gaps {
            if !self.gaps.contains(&g) {
                self.gaps.push(g);
            }
        }
        self.objects.sort_by_key(|o| (o.first_seq, o.last_seq));
        self.points.sort_by_key(|p| p.seq);
        self.bases.sort_unstable();
        self.gaps.sort_by_key(|g| g.first_seq);
    }

    /// The highest position this manifest mentions anywhere.
    pub fn highest_position(&self) -> u64 {
        self.objects
            .iter()
            .map(|o| o.last_seq)
            .chain(self.points.iter().map(|p| p.seq))
            .chain(self.bases.iter().copied())
            .chain(self.gaps.iter().map(|g| g.last_seq))
            .chain(self.parts.iter().map(|p| p.upto))
            .chain([self.recorded_upto])
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with(objects: u64) -> Manifest {
        Manifest {
            machine: "m".into(),
            disk: "d".into(),
            objects: (1..=objects).map(|i| ObjectEntry { name: format!("o{i}"), first_seq: i, last_seq: i }).collect(),
            points: (1..=objects)
                .step_by(2)
                .map(|i| PointEntry {
                    point_id: i,
                    kind: crate::protocol::PointKind::CrashConsistent,
                    unix_ms: i,
                    seq: i,
                    disk_size: 1,
                    uploaded_unix_ms: None,
                })
                .collect(),
            recorded_upto: objects,
            ..Manifest::default()
        }
    }

    #[test]
    fn a_checkpoint_keeps_the_head_small_and_loses_nothing() {
        let mut m = manifest_with(3000);
        assert!(m.head_entries() > HEAD_ENTRIES_MAX);
        let (entry, part) = m.next_part(|a, b| format!("p{a}-{b}")).expect("due");
        m.parts.push(entry.clone());
        assert_eq!(m.head_entries(), HEAD_ENTRIES_KEPT);
        assert!(m.next_part(|a, b| format!("p{a}-{b}")).is_none());
        // The stored head plus the part give back the whole manifest.
        let mut rebuilt = m.head();
        assert_eq!(rebuilt.objects.len() + rebuilt.points.len(), HEAD_ENTRIES_KEPT);
        rebuilt.merge_part(part);
        let mut want = m.clone();
        want.merge_part(ManifestPart::default());
        assert_eq!(rebuilt, want);
        assert_eq!(entry.first_seq, 1);
        assert!(entry.upto < 3000);
    }
}
