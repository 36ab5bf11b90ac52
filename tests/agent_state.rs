//! The agent's persistent block state (`--state-dir`): a restarted agent sends only the
//! blocks that changed since the last point the process server acknowledged, without a
//! full copy, and every point restores byte for byte. A state that is corrupt, kept for
//! another server, of another disk size, or missing is never trusted: the agent then
//! compares the disk with the server's block hashes (a delta resync), or copies it in
//! full when the server has no history of it.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use churnlog::agent::{Agent, AgentConfig};
use churnlog::protocol::PointKind;
use churnlog::restore::{restore, PointSelector};
use common::rig::{fill, image, Rig, PASSPHRASE};

const BS: u64 = 64 << 10;

fn agent(rig: &Rig, disks: Vec<(String, PathBuf)>, state: &Path) -> Agent {
    let mut cfg =
        AgentConfig::new(rig.server.local_addr.to_string(), rig.server.cert_pem.clone(), "vm-1".into(), disks);
    cfg.state_dir = Some(state.to_path_buf());
    Agent::new(cfg, PASSPHRASE).unwrap()
}

/// Overwrites blocks `blocks` of `path` with fresh random data (never zeros, never what
/// was there); returns the bytes changed.
fn change(path: &Path, blocks: &[u64], seed: u64) -> u64 {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut block = vec![0u8; BS as usize];
    for (i, b) in blocks.iter().enumerate() {
        fill(&mut block, seed.wrapping_mul(1000) + i as u64);
        f.write_all_at(&block, b * BS).unwrap();
    }
    blocks.len() as u64 * BS
}

async fn restores_to(rig: &Rig, disk: &str, point: u64, want: &Path, out: &Path) {
    let rep = restore(&rig.target, "vm-1", disk, PointSelector::Id(point), out, |_, _| {}).await.unwrap();
    assert_eq!(rep.point.point_id, point);
    assert!(std::fs::read(out).unwrap() == std::fs::read(want).unwrap(), "{disk} at point {point} differs");
}

/// 1 % of a 16 MiB disk (256 blocks of 64 KiB) changed while the agent was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_agent_sends_only_the_changed_blocks() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (disk, state) = (work.join("d0.img"), work.join("state"));
    image(&disk, 16 << 20, 3);
    let disks = vec![("disk0".to_string(), disk.clone())];
    let mut first = agent(&rig, disks.clone(), &state);
    let p1 = first.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!(p1.full_copies, 1, "no state yet: a full copy");
    let image1 = work.join("image1");
    std::fs::copy(&disk, &image1).unwrap();
    assert!(state.join("blocks-disk0.state").exists());
    drop(first);

    // 3 of 256 blocks (1.2 %), spread over the disk.
    let changed_bytes = change(&disk, &[5, 100, 201], 1);
    let mut second = agent(&rig, disks, &state);
    let p2 = second.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    let ratio = p2.bytes_sent as f64 / changed_bytes as f64;
    println!(
        "restart after 1% churn: bytes_sent {} / changed bytes {changed_bytes} = {ratio:.3} ({p2:?})",
        p2.bytes_sent
    );
    assert_eq!(p2.full_copies, 0, "a valid state: no Resync, no full copy: {p2:?}");
    assert_eq!(p2.blocks_sent, 3, "{p2:?}");
    assert!(ratio <= 1.05, "bytes sent {} for {changed_bytes} changed", p2.bytes_sent);
    assert_eq!(p2.blocks_read, 256);

    restores_to(&rig, "disk0", p1.point_id, &image1, &work.join("r1")).await;
    restores_to(&rig, "disk0", p2.point_id, &disk, &work.join("r2")).await;
    // The state now names the second point: a third run with no change sends nothing.
    drop(second);
    let mut third = agent(&rig, vec![("disk0".to_string(), disk.clone())], &state);
    let p3 = third.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!((p3.full_copies, p3.blocks_sent, p3.zero_runs_sent), (0, 0, 0), "{p3:?}");
    restores_to(&rig, "disk0", p3.point_id, &disk, &work.join("r3")).await;
    rig.stop().await;
}

/// A run over `disks` (disk0, disk1) that sends disk0's changed blocks, then fails on
/// disk1 (moved away; returned) before its point; returns once disk0's new records are
/// durable on the server, the session still alive, then drops the agent: it died with
/// them durable and no new point.
async fn send_then_die_on_disk1(rig: &Rig, disks: &[(String, PathBuf)], state: &Path) -> PathBuf {
    let mut agent = agent(rig, disks.to_vec(), state);
    let hidden = disks[1].1.with_extension("away");
    std::fs::rename(&disks[1].1, &hidden).unwrap();
    let stream = rig.cache.find_stream("vm-1", "disk0").unwrap();
    let durable_before = rig.cache.stream_info(stream).unwrap().durable_upto;
    let err = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap_err();
    assert!(err.to_string().contains("disk1"), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rig.cache.stream_info(stream).unwrap().durable_upto <= durable_before {
        assert!(std::time::Instant::now() < deadline, "disk0's changed blocks never became durable");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hidden
}

/// Blocks sent after the last acknowledged point, before the agent died, are recorded in
/// the journal: a restarted agent sends them again even when the disk changed back to
/// the content the state remembers (else the next point would keep the sent content).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocks_sent_before_a_crash_are_sent_again_after_the_restart() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (d0, d1, state) = (work.join("d0.img"), work.join("d1.img"), work.join("state"));
    image(&d0, 4 << 20, 5);
    image(&d1, 2 << 20, 6);
    let disks = vec![("disk0".to_string(), d0.clone()), ("disk1".to_string(), d1.clone())];
    let mut first = agent(&rig, disks.clone(), &state);
    first.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    let original = std::fs::read(&d0).unwrap();
    drop(first);

    // The second run sends disk0's changed block 7, then fails on disk1 before its
    // point: the process dies with block 7 durable on the server and no new point.
    change(&d0, &[7], 9);
    let hidden = send_then_die_on_disk1(&rig, &disks, &state).await;
    assert!(state.join("blocks-disk0.sent").exists(), "the journal records block 7");

    // Block 7 changes back to what the state remembers; the next run must send it.
    std::fs::write(&d0, &original).unwrap();
    std::fs::rename(&hidden, &d1).unwrap();
    let mut third = agent(&rig, disks, &state);
    let p3 = third.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!(p3.full_copies, 0, "{p3:?}");
    assert_eq!(p3.blocks_sent, 1, "block 7 is sent again: {p3:?}");
    assert!(!state.join("blocks-disk0.sent").exists(), "the point's commit retires the journal");
    restores_to(&rig, "disk0", p3.point_id, &d0, &work.join("r0")).await;
    restores_to(&rig, "disk1", p3.point_id, &d1, &work.join("r1")).await;
    rig.stop().await;
}

/// A flipped byte in the state file: a warning, the state ignored, a delta resync, and
/// the point restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_state_file_is_ignored_and_the_disk_resynced_by_delta() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (disk, state) = (work.join("d0.img"), work.join("state"));
    image(&disk, 4 << 20, 11);
    let disks = vec![("disk0".to_string(), disk.clone())];
    agent(&rig, disks.clone(), &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    let file = state.join("blocks-disk0.state");
    let mut bytes = std::fs::read(&file).unwrap();
    // A byte inside the hash of block 20: trusting it would skip or resend one block.
    let at = bytes.len() - 4 - 16 * (64 - 20);
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    change(&disk, &[20, 33], 12);
    let p = agent(&rig, disks, &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    // Never trusted: the server's hashes are asked for instead; the two changed blocks go.
    assert_eq!((p.full_copies, p.delta_resyncs, p.blocks_sent), (0, 1, 2), "a corrupt state is never trusted: {p:?}");
    restores_to(&rig, "disk0", p.point_id, &disk, &work.join("r")).await;
    assert!(churnlog::agent::state::BlockState::decode(&std::fs::read(&file).unwrap()).is_ok(), "rewritten");
    rig.stop().await;
}

/// State kept for one process server is not used with another (its history is not the
/// one the state describes): an empty server gets a full copy, a server with the disk's
/// history a delta resync. A disk that changed size, or a deleted state directory, also
/// means a delta resync: only the blocks that differ from what the server holds are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_of_another_server_another_size_or_deleted_means_a_delta_resync() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = tempfile::tempdir().unwrap();
    let (disk, state) = (work.path().join("d0.img"), work.path().join("state"));
    image(&disk, 4 << 20, 13);
    let disks = vec![("disk0".to_string(), disk.clone())];
    agent(&rig, disks.clone(), &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();

    // Another server with its own (empty) object store: no history, a full copy.
    let other = Rig::start(Duration::from_secs(60)).await;
    let p = agent(&other, disks.clone(), &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!((p.full_copies, p.delta_resyncs), (1, 0), "{p:?}");
    restores_to(&other, "disk0", p.point_id, &disk, &work.path().join("r-other")).await;
    other.stop().await;

    // Back on the first server: the state now names the other one, so the agent asks
    // the first server for its hashes; nothing changed, nothing is sent.
    let p = agent(&rig, disks.clone(), &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!((p.full_copies, p.delta_resyncs, p.blocks_sent, p.zero_runs_sent), (0, 1, 0, 0), "{p:?}");
    restores_to(&rig, "disk0", p.point_id, &disk, &work.path().join("r-back")).await;
    let unchanged = agent(&rig, disks.clone(), &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!((unchanged.full_copies, unchanged.delta_resyncs, unchanged.blocks_sent), (0, 0, 0), "{unchanged:?}");

    // The disk grows by one block, written: that block is the only one sent.
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len((4 << 20) + BS).unwrap();
    change(&disk, &[64], 14);
    let p = agent(&rig, disks.clone(), &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!((p.full_copies, p.delta_resyncs, p.blocks_sent), (0, 1, 1), "{p:?}");
    restores_to(&rig, "disk0", p.point_id, &disk, &work.path().join("r-grown")).await;

    // The state directory deleted, two blocks changed: those two are sent.
    std::fs::remove_dir_all(&state).unwrap();
    let changed_bytes = change(&disk, &[1, 40], 15);
    let p = agent(&rig, disks, &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    println!("delta resync after the state was deleted: bytes_sent {} / changed bytes {changed_bytes}", p.bytes_sent);
    assert_eq!((p.full_copies, p.delta_resyncs, p.blocks_sent), (0, 1, 2), "{p:?}");
    assert_eq!(p.bytes_sent, changed_bytes, "{p:?}");
    restores_to(&rig, "disk0", p.point_id, &disk, &work.path().join("r-deleted")).await;
    rig.stop().await;
}

/// A new server directory holding only `rig`'s TLS identity (its certificate and key),
/// and the URL of an empty object store inside it: `rig` rebuilt from scratch.
fn rebuilt_with_the_same_identity(rig: &Rig) -> (tempfile::TempDir, String) {
    use std::os::unix::fs::DirBuilderExt;
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::DirBuilder::new().mode(0o700).create(&tls).unwrap();
    for f in std::fs::read_dir(rig.dir.path().join("tls")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), tls.join(f.file_name())).unwrap();
    }
    let url = format!("file://{}", dir.path().join("store").display());
    (dir, url)
}

/// A process server rebuilt with the same certificate (the agent's state still names it)
/// but an empty cache and an empty object store: the changes an agent sends from its
/// state would build on a base the store never had. The server asks for a full copy
/// instead, of an agent that kept running and of one restarted from its state directory,
/// and each point restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_rebuilt_with_the_same_certificate_and_an_empty_store_gets_a_full_copy() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = tempfile::tempdir().unwrap();
    let (disk, state) = (work.path().join("d0.img"), work.path().join("state"));
    image(&disk, 4 << 20, 23);
    let disks = vec![("disk0".to_string(), disk.clone())];
    let mut kept = agent(&rig, disks.clone(), &state);
    let p1 = kept.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!(p1.full_copies, 1, "{p1:?}");
    change(&disk, &[3, 30], 24);
    let p2 = kept.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!((p2.full_copies, p2.blocks_sent), (0, 2), "{p2:?}");

    // The agent keeps running; its server is rebuilt with the same identity.
    let (dir, url) = rebuilt_with_the_same_identity(&rig);
    let cert = rig.server.cert_pem.clone();
    rig.stop().await;
    let rebuilt = Rig::start_with(dir, &url, Duration::from_secs(60)).await;
    assert_eq!(rebuilt.server.cert_pem, cert, "the same certificate");
    kept.set_process_server(rebuilt.server.local_addr.to_string(), cert.clone()).unwrap();
    change(&disk, &[7], 25);
    let p3 = kept.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert!(p3.full_copies >= 1 && p3.repeated_passes >= 1, "the rebuilt server asked for a full copy: {p3:?}");
    restores_to(&rebuilt, "disk0", p3.point_id, &disk, &work.path().join("r-kept")).await;
    drop(kept);

    // Rebuilt once more; this time the agent restarts from its state directory, which
    // still names this certificate and a point the new store has never seen.
    let (dir, url) = rebuilt_with_the_same_identity(&rebuilt);
    rebuilt.stop().await;
    let again = Rig::start_with(dir, &url, Duration::from_secs(60)).await;
    change(&disk, &[9], 26);
    let p4 = agent(&again, disks, &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert!(p4.full_copies >= 1 && p4.repeated_passes >= 1, "the rebuilt server asked for a full copy: {p4:?}");
    restores_to(&again, "disk0", p4.point_id, &disk, &work.path().join("r-restarted")).await;
    again.stop().await;
}

/// The delta resync compares with everything the server holds, not only with its last
/// point: a block sent after that point by an agent that then died, and changed back
/// since, is sent again even though the state (and its journal) is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delta_resync_compares_with_blocks_sent_after_the_last_point() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (d0, d1, state) = (work.join("d0.img"), work.join("d1.img"), work.join("state"));
    image(&d0, 4 << 20, 25);
    image(&d1, 2 << 20, 26);
    let disks = vec![("disk0".to_string(), d0.clone()), ("disk1".to_string(), d1.clone())];
    agent(&rig, disks.clone(), &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    let original = std::fs::read(&d0).unwrap();

    // A run sends disk0's changed block 9, then fails on disk1 before its point.
    change(&d0, &[9], 27);
    let hidden = send_then_die_on_disk1(&rig, &disks, &state).await;

    // The state directory is lost and block 9 changes back: the server holds the other
    // content, so the delta resync must send it.
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::write(&d0, &original).unwrap();
    std::fs::rename(&hidden, &d1).unwrap();
    let p = agent(&rig, disks, &state).pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    // (As a block, or as a zero run where the original block was zeros.)
    let sent = p.blocks_sent + p.zero_runs_sent;
    assert_eq!((p.full_copies, p.delta_resyncs, sent), (0, 2, 1), "block 9 is sent again: {p:?}");
    restores_to(&rig, "disk0", p.point_id, &d0, &work.join("r0")).await;
    restores_to(&rig, "disk1", p.point_id, &d1, &work.join("r1")).await;
    rig.stop().await;
}
