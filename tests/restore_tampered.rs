//! Restore against a tampered object store: every kind of damage is an exact, typed
//! error, nothing is left under the output's name (an existing file there is untouched),
//! and no partial file is left beside it. An untampered restore punches holes for zero
//! runs instead of writing zeros.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use churnlog::protocol::PointKind;
use churnlog::restore::{restore, PointSelector, RestoreError};
use churnlog::store::object::ObjectError;
use churnlog::store::{Manifest, StoreError, Target};
use common::rig::{churn, image, Rig};

/// A store holding two points of one disk; returns the rig's directory (kept), the
/// target, and the image at the last point.
async fn replicated_store() -> (tempfile::TempDir, Target, Vec<u8>) {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let disk = work.join("d0.img");
    image(&disk, 3 << 20, 5);
    let mut agent = rig.agent("vm", vec![("d0".into(), disk.clone())]);
    agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    churn(&disk, 7, 9);
    agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    drop(agent);
    let want = std::fs::read(&disk).unwrap();
    let target = rig.target.clone();
    let Rig { dir, server, cache, .. } = rig;
    drop(cache);
    server.stop().await.unwrap();
    (dir, target, want)
}

fn store_dir(dir: &Path) -> PathBuf {
    dir.join("store").join("vm").join("d0")
}

/// The largest data object: one restore needs (the first holds only the resync base,
/// which restore starts after).
fn largest_object(dir: &Path) -> PathBuf {
    objects(dir).into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap()
}

fn objects(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(store_dir(dir).join("data")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

/// Restores the latest point into `out` (which holds "old" beforehand) and checks that
/// the failure left `out` as it was and no partial file beside it.
async fn restore_fails(target: &Target, out_dir: &Path) -> RestoreError {
    std::fs::create_dir_all(out_dir).unwrap();
    let out = out_dir.join("restored.img");
    std::fs::write(&out, b"old").unwrap();
    let err = restore(target, "vm", "d0", PointSelector::Latest, &out, |_, _| {}).await.unwrap_err();
    assert_eq!(std::fs::read(&out).unwrap(), b"old", "a failed restore touched the output");
    let names: Vec<_> = std::fs::read_dir(out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("restored.img")], "a partial file was left behind");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untampered_store_restores_whole_with_holes_for_zeros() {
    let (dir, target, want) = replicated_store().await;
    let out = dir.path().join("out").join("restored.img");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, vec![0xAAu8; 5 << 20]).unwrap();
    restore(&target, "vm", "d0", PointSelector::Latest, &out, |_, _| {}).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == want, "restored image differs");
    // Every third 256 KiB region of the image is zeros: the file keeps no blocks for
    // them (on file systems that punch holes; tmpfs and ext4 both do).
    let meta = std::fs::metadata(&out).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len(),
        "{} bytes allocated for a {}-byte image",
        meta.blocks() * 512,
        meta.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_an_object_is_a_checksum_error() {
    let (dir, target, _) = replicated_store().await;
    let victim = largest_object(dir.path());
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x04;
    std::fs::write(&victim, bytes).unwrap();
    match restore_fails(&target, &dir.path().join("out")).await {
        RestoreError::Object { name, source: ObjectError::Checksum } => assert!(victim.ends_with(&name), "{name}"),
        other => panic!("expected a checksum error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_object_is_detected() {
    let (dir, target, _) = replicated_store().await;
    let victim = largest_object(dir.path());
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 100]).unwrap();
    match restore_fails(&target, &dir.path().join("out")).await {
        RestoreError::Object { source: ObjectError::Checksum | ObjectError::Length(_), .. } => {}
        other => panic!("expected a damaged-object error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_object_is_a_not_found_error() {
    let (dir, target, _) = replicated_store().await;
    std::fs::remove_file(objects(dir.path()).last().unwrap()).unwrap();
    match restore_fails(&target, &dir.path().join("out")).await {
        RestoreError::ObjectStore(object_store::Error::NotFound { .. }) => {}
        other => panic!("expected not found, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_manifest_is_a_manifest_error() {
    let (dir, target, _) = replicated_store().await;
    std::fs::write(store_dir(dir.path()).join("manifest.json"), b"{\"machine\": \"vm\", \"objects\": [").unwrap();
    match restore_fails(&target, &dir.path().join("out")).await {
        RestoreError::Store(StoreError::ManifestJson { path, .. }) => assert!(path.ends_with("manifest.json")),
        other => panic!("expected an invalid manifest, got {other:?}"),
    }
    // Listing the points reports the same.
    let err = churnlog::restore::list_points(&target, "vm", "d0").await.unwrap_err();
    assert!(matches!(err, RestoreError::Store(StoreError::ManifestJson { .. })), "{err:?}");
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let path = store_dir(dir).join("manifest.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_past_the_stored_records_is_reported_missing() {
    let (dir, target, _) = replicated_store().await;
    let mut highest = 0;
    edit_manifest(dir.path(), |m| {
        highest = m.objects.iter().map(|o| o.last_seq).max().unwrap();
        let last = m.points.iter_mut().max_by_key(|p| p.seq).unwrap();
        last.seq = highest + 50;
    });
    match restore_fails(&target, &dir.path().join("out")).await {
        RestoreError::Missing { first, last, .. } => {
            assert_eq!((first, last), (highest + 1, highest + 50));
        }
        other => panic!("expected missing positions, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_shrinking_the_disk_is_a_write_past_the_end() {
    let (dir, target, _) = replicated_store().await;
    edit_manifest(dir.path(), |m| {
        for p in &mut m.points {
            p.disk_size = 1 << 20;
        }
    });
    match restore_fails(&target, &dir.path().join("out")).await {
        RestoreError::PastEnd { disk_size, offset, len, .. } => {
            assert_eq!(disk_size, 1 << 20);
            assert!(offset + len > disk_size);
        }
        other => panic!("expected a write past the end, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_manifest_and_no_point_are_their_own_errors() {
    let (dir, target, _) = replicated_store().await;
    let out = dir.path().join("never.img");
    let err = restore(&target, "vm", "nope", PointSelector::Latest, &out, |_, _| {}).await.unwrap_err();
    assert!(matches!(err, RestoreError::NoManifest { ref disk, .. } if disk == "nope"), "{err:?}");
    let err = restore(&target, "vm", "d0", PointSelector::Id(999_999), &out, |_, _| {}).await.unwrap_err();
    assert!(matches!(err, RestoreError::NoPoint { point: PointSelector::Id(999_999), .. }), "{err:?}");
    assert!(!out.exists());
    // A device (or anything but a regular file) under the output's name is never replaced.
    let err = restore(&target, "vm", "d0", PointSelector::Latest, Path::new("/dev/null"), |_, _| {}).await.unwrap_err();
    assert!(matches!(err, RestoreError::OutputNotAFile(_)), "{err:?}");
}
