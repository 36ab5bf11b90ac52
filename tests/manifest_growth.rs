//! A flood of recovery points does not make manifest uploads grow with the history:
//! the head is checkpointed into immutable parts, every rewrite stays bounded, and a
//! reader gets the whole manifest back (parts merged in).

use churnlog::protocol::PointKind;
use churnlog::store::manifest::{HEAD_ENTRIES_KEPT, HEAD_ENTRIES_MAX};
use churnlog::store::{Manifest, ObjectEntry, PointEntry, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_thousand_points_keep_every_manifest_write_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::from_url(&format!("file://{}", dir.path().display()), None).unwrap();
    let (_, mut version) = target.load_manifest_versioned("vm", "d0").await.unwrap();
    let mut m = Manifest { machine: "vm".into(), disk: "d0".into(), ..Manifest::default() };
    let head_path = dir.path().join("vm").join("d0").join("manifest.json");
    let (mut head_bytes_max, mut head_bytes_total, mut head_bytes_first_half) = (0u64, 0u64, 0u64);
    let points = 4000u64;
    // As the drain does after a point closes an object: one object and one point each.
    for i in 1..=points {
        m.objects.push(ObjectEntry { name: format!("vm/d0/data/{i:020}-{i:020}.clo"), first_seq: i, last_seq: i });
        m.points.push(PointEntry {
            point_id: i,
            kind: PointKind::CrashConsistent,
            unix_ms: i,
            seq: i,
            disk_size: 1 << 30,
            uploaded_unix_ms: Some(i + 5),
        });
        m.recorded_upto = i;
        version = target.put_manifest(&mut m, &version).await.unwrap();
        let len = std::fs::metadata(&head_path).unwrap().len();
        head_bytes_max = head_bytes_max.max(len);
        head_bytes_total += len;
        if i == points / 2 {
            head_bytes_first_half = head_bytes_total;
        }
    }
    assert!(m.parts.len() >= 2, "{} parts", m.parts.len());
    // Every write is bounded by the head's cap, whatever the history's length...
    let entry_bytes_max = 400;
    assert!(
        head_bytes_max <= (HEAD_ENTRIES_MAX as u64 + 2) * entry_bytes_max,
        "a manifest write of {head_bytes_max} bytes"
    );
    // ...so the bytes written grow linearly: the second half of the points costs about
    // what the first did (whole rewrites would make it three times as much).
    let second_half = head_bytes_total - head_bytes_first_half;
    assert!(
        second_half * 2 < head_bytes_first_half * 3,
        "first half {head_bytes_first_half} bytes, second half {second_half}: not linear"
    );
    assert!(m.head_entries() <= HEAD_ENTRIES_MAX && m.head_entries() >= HEAD_ENTRIES_KEPT.min(m.head_entries()));

    // A reader gets everything back, in order.
    let loaded = target.load_manifest("vm", "d0").await.unwrap().unwrap();
    assert_eq!(loaded.objects.len() as u64, points);
    assert_eq!(loaded.points.len() as u64, points);
    assert!(loaded.points.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(loaded.parts, m.parts);
    let listed = churnlog::restore::list_points(&target, "vm", "d0").await.unwrap();
    assert_eq!(listed.len() as u64, points);
    assert_eq!(listed.last().unwrap().point.point_id, points);
}
