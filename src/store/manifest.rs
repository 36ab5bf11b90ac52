//! A disk's manifest: which data objects, recovery points, resync bases and gaps exist
//! in the object store for it. Restore trusts nothing else; the drain rewrites it after
//! every run of uploads it acknowledges to the cache.

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

    /// The highest position this manifest mentions anywhere.
    pub fn highest_position(&self) -> u64 {
        self.objects
            .iter()
            .map(|o| o.last_seq)
            .chain(self.points.iter().map(|p| p.seq))
            .chain(self.bases.iter().copied())
            .chain(self.gaps.iter().map(|g| g.last_seq))
            .chain([self.recorded_upto])
            .max()
            .unwrap_or(0)
    }
}
