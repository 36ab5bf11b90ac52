//! Records dropped before upload (eviction) and a disk handed over to another cache: the
//! process server asks the agent for a full copy, points that lost records are reported
//! lost (never acknowledged as uploaded, never restored), and every other point restores
//! byte for byte.

mod common;

use std::time::Duration;

use churnlog::protocol::PointKind;
use churnlog::restore::{list_points, restore, PointSelector};
use common::rig::{churn, image, Rig};

async fn restores_to(rig: &Rig, point: u64, want: &[u8], out: &std::path::Path) {
    let rep = restore(&rig.target, "vm-1", "disk0", PointSelector::Id(point), out, |_, _| {}).await.unwrap();
    assert_eq!(rep.point.point_id, point);
    assert!(std::fs::read(out).unwrap() == want, "point {point} differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_asks_for_a_resync_and_loses_only_the_points_it_broke() {
    let mut rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let disk = work.join("d0.img");
    image(&disk, 4 << 20, 7);
    let mut agent = rig.agent("vm-1", vec![("disk0".into(), disk.clone())]);
    let first = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!(first.full_copies, 1, "a process's first pass is a full copy");
    let image1 = std::fs::read(&disk).unwrap();

    // Point 2 becomes durable, then the cache has to drop it before upload.
    rig.stop_drain().await;
    churn(&disk, 12, 1);
    let second = agent.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap();
    let stream = rig.cache.find_stream("vm-1", "disk0").unwrap();
    let evicted = rig.cache.evict_stream(stream, "test: cache full").unwrap();
    assert!(evicted.records > 0);
    rig.start_drain();

    // The next pass ends with a point the server uploads only after a full copy.
    churn(&disk, 5, 2);
    let third = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    let image3 = std::fs::read(&disk).unwrap();
    assert!(third.full_copies >= 1, "the server asked for a full copy: {third:?}");
    let info = rig.cache.stream_info(stream).unwrap();
    assert!(!info.resync_required && info.resync_base > info.evicted_upto, "{info:?}");

    let listed = list_points(&rig.target, "vm-1", "disk0").await.unwrap();
    let status = |id: u64| listed.iter().find(|p| p.point.point_id == id);
    assert!(status(first.point_id).unwrap().restorable);
    assert!(status(second.point_id).is_none_or(|p| !p.restorable), "point 2 lost records: {listed:?}");
    assert!(status(third.point_id).unwrap().restorable);
    restores_to(&rig, first.point_id, &image1, &work.join("r1")).await;
    restores_to(&rig, third.point_id, &image3, &work.join("r3")).await;
    let latest = restore(&rig.target, "vm-1", "disk0", PointSelector::Latest, &work.join("rl"), |_, _| {}).await;
    assert_eq!(latest.unwrap().point.point_id, third.point_id);
    if status(second.point_id).is_some() {
        let err =
            restore(&rig.target, "vm-1", "disk0", PointSelector::Id(second.point_id), &work.join("r2"), |_, _| {})
                .await
                .unwrap_err();
        assert!(err.to_string().contains("dropped before upload"), "{err}");
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_cache_on_the_same_target_continues_the_history_after_a_resync() {
    let store = tempfile::tempdir().unwrap();
    let url = format!("file://{}", store.path().display());
    let rig_a = Rig::start_with(tempfile::tempdir().unwrap(), &url, Duration::from_secs(60)).await;
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("d0.img");
    image(&disk, 3 << 20, 9);
    let mut agent = rig_a.agent("vm-1", vec![("disk0".into(), disk.clone())]);
    let a1 = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    let image_a1 = std::fs::read(&disk).unwrap();
    churn(&disk, 8, 3);
    let a2 = agent.pass(PointKind::AppConsistent, true, |_, _| {}).await.unwrap();
    let image_a2 = std::fs::read(&disk).unwrap();
    rig_a.stop().await;

    // A rebuilt process server (new cache, sequence numbers from 1 again) takes over the
    // same agent, which still knows its block hashes and sends only changes.
    let rig_b = Rig::start_with(tempfile::tempdir().unwrap(), &url, Duration::from_secs(60)).await;
    agent.set_process_server(rig_b.server.local_addr.to_string(), rig_b.server.cert_pem.clone()).unwrap();
    churn(&disk, 6, 4);
    let b1 = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    let image_b1 = std::fs::read(&disk).unwrap();
    assert!(b1.full_copies >= 1 && b1.repeated_passes >= 1, "the new cache needed a full copy: {b1:?}");

    let listed = list_points(&rig_b.target, "vm-1", "disk0").await.unwrap();
    assert!(listed.iter().filter(|p| p.restorable).count() >= 3, "{listed:?}");
    for (point, want) in [(a1.point_id, &image_a1), (a2.point_id, &image_a2), (b1.point_id, &image_b1)] {
        restores_to(&rig_b, point, want, &work.path().join(format!("r{point}"))).await;
    }
    rig_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_machine_handed_over_continues_on_the_new_server_without_a_full_copy() {
    let store = tempfile::tempdir().unwrap();
    let url = format!("file://{}", store.path().display());
    let rig_a = Rig::start_with(tempfile::tempdir().unwrap(), &url, Duration::from_secs(60)).await;
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("d0.img");
    image(&disk, 3 << 20, 19);
    let mut agent = rig_a.agent("vm-1", vec![("disk0".into(), disk.clone())]);
    let a1 = agent.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap();
    let image_a1 = std::fs::read(&disk).unwrap();
    churn(&disk, 8, 5);
    let a2 = agent.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap();
    let image_a2 = std::fs::read(&disk).unwrap();

    // The old server uploads what it holds for the machine and marks the hand-over.
    rig_a.server.handoffs().request("vm-1");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !rig_a.server.handoffs().is_done("vm-1") {
        assert!(std::time::Instant::now() < deadline, "the hand-over did not complete in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig_a.stop().await;

    // The new server continues the disk's history right after it: only changed blocks.
    let rig_b = Rig::start_with(tempfile::tempdir().unwrap(), &url, Duration::from_secs(60)).await;
    agent.set_process_server(rig_b.server.local_addr.to_string(), rig_b.server.cert_pem.clone()).unwrap();
    churn(&disk, 6, 6);
    let b1 = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    let image_b1 = std::fs::read(&disk).unwrap();
    assert_eq!(b1.full_copies, 0, "a hand-over needs no full copy: {b1:?}");
    assert_eq!(b1.repeated_passes, 0, "{b1:?}");
    assert!(b1.blocks_sent <= 6, "only the churned blocks are sent: {b1:?}");

    let listed = list_points(&rig_b.target, "vm-1", "disk0").await.unwrap();
    assert!(listed.iter().all(|p| p.restorable), "{listed:?}");
    for (point, want) in [(a1.point_id, &image_a1), (a2.point_id, &image_a2), (b1.point_id, &image_b1)] {
        restores_to(&rig_b, point, want, &work.path().join(format!("r{point}"))).await;
    }
    rig_b.stop().await;
}
