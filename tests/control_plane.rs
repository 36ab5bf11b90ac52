//! The whole control plane on loopback: one configuration server (SQLite, and PostgreSQL
//! when installed), process servers registered with it, agents that register their
//! machines and learn their server from it. A machine moved while it writes, a whole
//! server switched, a server decommissioned: every point restores byte for byte and no
//! move costs a full copy. A process server killed with SIGKILL goes disconnected, is
//! purged, and only its machines are reassigned and marked resync-required; one that comes
//! back after its purge drops, never uploads, what it cached for machines now elsewhere.

mod common;
mod cs_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use churnlog::agent::credential::{load_or_register, CsSettings};
use churnlog::agent::{Agent, AgentConfig, Locator, PassReport};
use churnlog::control::api::{self, PsState};
use churnlog::control::ps_link::LinkConfig;
use churnlog::ingest::IngestConfig;
use churnlog::process_server::{ControlConfig, ProcessServer, ProcessServerConfig};
use churnlog::protocol::auth::AuthKey;
use churnlog::protocol::PointKind;
use churnlog::restore::{restore, PointSelector};
use churnlog::store::Target;
use common::rig::{churn, image};
use cs_support::*;

const WAIT: Duration = Duration::from_secs(90);

on_both_backends!(
    moves_switches_and_decommission_keep_every_point_without_a_full_copy,
    a_killed_server_is_purged_and_only_its_machines_resync,
    a_purged_server_that_comes_back_drops_its_stale_records
);

/// An in-process process server registered with the CS, heartbeating every 200 ms.
async fn start_ps(cs: &CsRig, id: &str, dir: &Path, url: &str) -> ProcessServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut ingest = IngestConfig::new(addr, dir.join(id).join("tls"), PASSPHRASE);
    ingest.handshake_timeout = Duration::from_secs(5);
    let target = Target::from_url(url, None).unwrap();
    let mut cfg = ProcessServerConfig::new(dir.join(id).join("cache"), 1 << 30, ingest, target);
    cfg.cache.segment_size = 16 << 20;
    cfg.control = ControlConfig {
        link: Some(LinkConfig {
            cs_address: cs.address(),
            cs_cert_pem: cs.cs.cert_pem.clone(),
            ps_id: id.to_string(),
            advertise_address: addr.to_string(),
            heartbeat_interval: Duration::from_millis(200),
            key: AuthKey::from_passphrase(PASSPHRASE),
        }),
        monitor_interval: Duration::from_millis(100),
        thresholds: host_load_ignored(),
        ..ControlConfig::default()
    };
    ProcessServer::start(cfg).await.unwrap()
}

/// The seed's health thresholds without the host's CPU and memory: the test machine's
/// load (a compiler on the same two cores) must not make a server critical and so
/// decide where machines go.
fn host_load_ignored() -> churnlog::control::health::Thresholds {
    churnlog::control::health::Thresholds {
        cpu_warning_percent: 100.0,
        cpu_critical_percent: 100.0,
        memory_warning_percent: 100.0,
        memory_critical_percent: 100.0,
        ..Default::default()
    }
}

/// An agent in CS mode: registers its machine (credential in `state`), then follows
/// the CS's assignment.
async fn cs_agent(cs: &CsRig, machine: &str, state: &Path, disk: &Path) -> Agent {
    let cert = cs.cs.cert_pem.clone();
    let address = cs.address();
    let settings =
        CsSettings { address: &address, cert_pem: &cert, passphrase: Some(PASSPHRASE), machine, state_dir: state };
    let identity = load_or_register(&settings).await.unwrap();
    let mut cfg = AgentConfig::with_locator(
        Locator::Cs { client: identity.client },
        machine.to_string(),
        vec![("disk0".to_string(), disk.to_path_buf())],
    );
    cfg.reconnect_timeout = Duration::from_secs(60);
    Agent::with_key(cfg, identity.key).unwrap()
}

async fn where_is(cs: &CsRig, machine: &str) -> Option<String> {
    status(&cs.client()).await.machines.into_iter().find(|m| m.name == machine).and_then(|m| m.ps)
}

async fn settled_on(cs: &CsRig, machine: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = status(&cs.client()).await;
        let m = st.machines.iter().find(|m| m.name == machine).unwrap();
        if let (Some(ps), None) = (&m.ps, &m.moving_to) {
            return ps.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{machine} did not settle on a server: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A disk, its agent, and every point it took with the image at that point.
struct Protected {
    machine: String,
    disk: PathBuf,
    agent: Agent,
    points: Vec<(u64, Vec<u8>)>,
    reports: Vec<PassReport>,
}

impl Protected {
    async fn new(cs: &CsRig, machine: &str, work: &Path, seed: u64) -> Protected {
        let disk = work.join(format!("{machine}.img"));
        image(&disk, 2 << 20, seed);
        let agent = cs_agent(cs, machine, &work.join(format!("{machine}-state")), &disk).await;
        Protected { machine: machine.into(), disk, agent, points: Vec::new(), reports: Vec::new() }
    }

    /// Changes `blocks` blocks, then one pass that waits for its point's upload.
    async fn write_and_pass(&mut self, blocks: u64, seed: u64) -> PassReport {
        if blocks > 0 {
            churn(&self.disk, blocks, seed);
        }
        let report = self.agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
        self.points.push((report.point_id, std::fs::read(&self.disk).unwrap()));
        self.reports.push(report.clone());
        report
    }

    async fn check_every_point(&self, target: &Target, out: &Path) {
        for (point, want) in &self.points {
            let path = out.join(format!("{}-{point}", self.machine));
            let rep = restore(target, &self.machine, "disk0", PointSelector::Id(*point), &path, |_, _| {}).await;
            let rep = rep.unwrap_or_else(|e| panic!("{} point {point}: {e}", self.machine));
            assert_eq!(rep.point.point_id, *point);
            assert!(std::fs::read(&path).unwrap() == *want, "{} point {point} differs", self.machine);
        }
    }
}

async fn moves_switches_and_decommission_keep_every_point_without_a_full_copy(b: Backend) {
    let _ = tracing_subscriber::fmt().with_env_filter("churnlog=info").with_test_writer().try_init();
    let Some(cs) = CsRig::start(b, Duration::from_secs(600)).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let target = Target::from_url(&url, None).unwrap();
    let ps_a = start_ps(&cs, "ps-a", dir.path(), &url).await;
    let ps_b = start_ps(&cs, "ps-b", dir.path(), &url).await;
    wait_until(WAIT, "both servers connected", || async {
        let st = status(&cs.client()).await;
        st.process_servers.iter().filter(|p| p.state == PsState::Connected).count() == 2
    })
    .await;

    let mut m1 = Protected::new(&cs, "m1", dir.path(), 1).await;
    let mut m2 = Protected::new(&cs, "m2", dir.path(), 2).await;
    let first = m1.write_and_pass(0, 0).await;
    assert_eq!(first.full_copies, 1, "a new disk is copied once: {first:?}");
    m2.write_and_pass(0, 0).await;
    let m1_home = settled_on(&cs, "m1").await;
    let m2_home = settled_on(&cs, "m2").await;
    assert_ne!(m1_home, m2_home, "new machines go to the least loaded server");

    // Move m1 while it writes: a writer task keeps passing; the move happens meanwhile.
    let other = if m1_home == "ps-a" { "ps-b" } else { "ps-a" };
    let (moved_tx, mut moved_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let mut seed = 100;
        // Write until the move is done, then once more on the new server.
        loop {
            seed += 1;
            m1.write_and_pass(4, seed).await;
            if moved_rx.try_recv().is_ok() {
                m1.write_and_pass(4, seed + 1000).await;
                return m1;
            }
            assert!(seed < 400, "the move did not complete within 300 passes");
        }
    });
    let migrated: api::Migrated = cs
        .client()
        .post(api::PATH_MIGRATE, &api::Migrate { machine: Some("m1".into()), all_from: None, to: other.into() })
        .await
        .unwrap();
    assert_eq!(migrated.machines, vec!["m1".to_string()]);
    assert_eq!(settled_on(&cs, "m1").await, other);
    moved_tx.send(()).unwrap();
    let mut m1 = writer.await.unwrap();
    assert_eq!(m1.agent.process_server(), Some(ps_addr(&ps_a, &ps_b, other).as_str()), "the agent followed the move");

    // Switch a whole server: everything on m2's server goes to the other.
    let from = m2_home.clone();
    let to = if from == "ps-a" { "ps-b" } else { "ps-a" };
    let migrated: api::Migrated = cs
        .client()
        .post(api::PATH_MIGRATE, &api::Migrate { machine: None, all_from: Some(from.clone()), to: to.into() })
        .await
        .unwrap();
    assert!(migrated.machines.contains(&"m2".to_string()), "{migrated:?}");
    m2.write_and_pass(5, 7).await; // follows the move on its next connection
    assert_eq!(settled_on(&cs, "m2").await, to);
    m1.write_and_pass(3, 8).await;

    // Decommission the server both now sit on: they move to the other, which is drained
    // dry, then it is unregistered.
    let doomed = to.to_string();
    let (keep, gone) = if doomed == "ps-a" { (ps_b, ps_a) } else { (ps_a, ps_b) };
    let client = cs.client();
    let decommission = tokio::spawn(async move {
        churnlog::control::decommission::decommission(
            &client,
            &doomed,
            false,
            WAIT,
            Duration::from_millis(200),
            |_| {},
            |loss| panic!("a clean decommission loses nothing: {loss:?}"),
        )
        .await
    });
    // The agents keep writing through it and follow their machines.
    for i in 0..3 {
        m1.write_and_pass(2, 20 + i).await;
        m2.write_and_pass(2, 30 + i).await;
    }
    decommission.await.unwrap().expect("decommission completes");
    let st = status(&cs.client()).await;
    assert_eq!(st.process_servers.len(), 1, "the decommissioned server is unregistered: {st:?}");
    m1.write_and_pass(2, 40).await;
    m2.write_and_pass(2, 41).await;
    assert_eq!(where_is(&cs, "m1").await, where_is(&cs, "m2").await);

    // No move cost a full copy: only each disk's first pass copied it.
    for m in [&m1, &m2] {
        let copies: u64 = m.reports.iter().map(|r| r.full_copies).sum();
        assert_eq!(copies, 1, "{}: only the first pass copies the disk: {:?}", m.machine, m.reports);
        let repeated: u64 = m.reports.iter().map(|r| r.repeated_passes).sum();
        assert_eq!(repeated, 0, "{}: no point was lost: {:?}", m.machine, m.reports);
    }
    let out = tempfile::tempdir().unwrap();
    m1.check_every_point(&target, out.path()).await;
    m2.check_every_point(&target, out.path()).await;
    drop((m1, m2));
    gone.stop().await.unwrap();
    keep.stop().await.unwrap();
    cs.stop().await;
}

fn ps_addr(a: &ProcessServer, b: &ProcessServer, id: &str) -> String {
    if id == "ps-a" { a.local_addr } else { b.local_addr }.to_string()
}

/// A `churnlog ps run` child registered with the CS; killed with SIGKILL on drop.
struct ChildPs(std::process::Child);

impl Drop for ChildPs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child_ps(cs: &CsRig, id: &str, dir: &Path, url: &str) -> ChildPs {
    let home = dir.join(id);
    std::fs::create_dir_all(&home).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    std::fs::write(home.join("cs.pem"), &cs.cs.cert_pem).unwrap();
    churnlog::secrets::create_private(&home.join("passphrase"), PASSPHRASE.as_bytes()).unwrap();
    let toml = format!(
        "cache_dir = 'cache'\ncache_size = '1GiB'\nlisten = '{addr}'\ntarget = '{url}'\npassphrase_file = 'passphrase'\n\
         tls_dir = 'tls'\ncs_address = '{}'\ncs_cert = 'cs.pem'\nps_id = '{id}'\nadvertise_address = '{addr}'\n\
         heartbeat_interval_seconds = 1\n\n[health]\ncpu_warning_percent = 100\ncpu_critical_percent = 100\n\
         memory_warning_percent = 100\nmemory_critical_percent = 100\n",
        cs.address()
    );
    std::fs::write(home.join("ps.toml"), toml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_churnlog"))
        .args(["ps", "run", "--config"])
        .arg(home.join("ps.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ChildPs(child)
}

/// Waits until the CS shows `ps` disconnected with its `heartbeat_missing` alert, then
/// purges it.
async fn purge_once_disconnected(cs: &CsRig, ps: &str) -> api::Unregistered {
    wait_until(WAIT, &format!("{ps} to show as disconnected"), || async {
        let st = status(&cs.client()).await;
        let p = st.process_servers.iter().find(|p| p.id == ps).unwrap();
        p.state == PsState::Disconnected && p.alerts.iter().any(|a| a.kind == "heartbeat_missing")
    })
    .await;
    let unregister = api::Unregister { ps: ps.into(), purge: true, force: false };
    cs.client().post(api::PATH_PS_UNREGISTER, &unregister).await.unwrap()
}

async fn a_killed_server_is_purged_and_only_its_machines_resync(b: Backend) {
    let Some(cs) = CsRig::start(b, Duration::from_secs(3)).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let target = Target::from_url(&url, None).unwrap();
    // The child first, so that the first machine lands on it.
    let mut child = spawn_child_ps(&cs, "ps-doomed", dir.path(), &url);
    wait_until(WAIT, "the child process server to connect", || async {
        status(&cs.client()).await.process_servers.iter().any(|p| p.state == PsState::Connected)
    })
    .await;
    let mut victim = Protected::new(&cs, "victim", dir.path(), 3).await;
    victim.write_and_pass(0, 0).await;
    assert_eq!(settled_on(&cs, "victim").await, "ps-doomed");
    let ps = start_ps(&cs, "ps-ok", dir.path(), &url).await;
    wait_until(WAIT, "both servers connected", || async {
        let st = status(&cs.client()).await;
        st.process_servers.iter().filter(|p| p.state == PsState::Connected).count() == 2
    })
    .await;
    let mut bystander = Protected::new(&cs, "bystander", dir.path(), 4).await;
    bystander.write_and_pass(0, 0).await;
    assert_eq!(settled_on(&cs, "bystander").await, "ps-ok");

    // SIGKILL: the server stops heartbeating and shows as disconnected.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let purged = purge_once_disconnected(&cs, "ps-doomed").await;
    assert_eq!(purged.moved, vec![("victim".to_string(), "ps-ok".to_string())]);
    assert_eq!(purged.resync_required, vec!["victim".to_string()]);
    let st = status(&cs.client()).await;
    let m = |name: &str| st.machines.iter().find(|m| m.name == name).unwrap().clone();
    assert!(m("victim").resync_required && m("victim").ps.as_deref() == Some("ps-ok"), "{st:?}");
    assert!(!m("bystander").resync_required, "{st:?}");

    // The victim's agent follows to the surviving server, which asks it for a full copy;
    // the bystander goes on with changed blocks only.
    let report = victim.write_and_pass(3, 50).await;
    assert!(report.full_copies >= 1, "the purged machine is copied again: {report:?}");
    let report = bystander.write_and_pass(3, 51).await;
    assert_eq!(report.full_copies, 0, "{report:?}");
    wait_until(WAIT, "the victim's resync to be applied", || async {
        let st = status(&cs.client()).await;
        !st.machines.iter().find(|m| m.name == "victim").unwrap().resync_required
    })
    .await;
    let out = tempfile::tempdir().unwrap();
    let (point, want) = victim.points.last().unwrap();
    let path = out.path().join("victim-latest");
    restore(&target, "victim", "disk0", PointSelector::Id(*point), &path, |_, _| {}).await.unwrap();
    assert!(std::fs::read(&path).unwrap() == *want, "the victim's point after the resync differs");
    bystander.check_every_point(&target, out.path()).await;
    drop((victim, bystander));
    ps.stop().await.unwrap();
    cs.stop().await;
}

/// A server purged while away (here: stopped with records not yet uploaded) and then
/// started again with its cache must never upload those records: its machine continues
/// on another server after a full copy, and stale records from the old cache would break
/// that history (a gap "from another cache", an eviction, another full copy), or, once
/// the machine is moved back to it, continue it as if current. They are dropped instead,
/// and a move back begins with a full copy.
async fn a_purged_server_that_comes_back_drops_its_stale_records(b: Backend) {
    let Some(cs) = CsRig::start(b, Duration::from_secs(3)).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let target = Target::from_url(&url, None).unwrap();
    let mut old = start_ps(&cs, "ps-old", dir.path(), &url).await;
    let mut victim = Protected::new(&cs, "victim", dir.path(), 5).await;
    victim.write_and_pass(0, 0).await;
    assert_eq!(settled_on(&cs, "victim").await, "ps-old");
    // A point durable on ps-old but never uploaded: it is lost with the purge.
    old.pause_drain().await.unwrap();
    churn(&victim.disk, 5, 60);
    let stranded = victim.agent.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap();
    assert!(old.status().records_not_uploaded > 0);
    old.stop().await.unwrap();

    let new = start_ps(&cs, "ps-new", dir.path(), &url).await;
    let purged = purge_once_disconnected(&cs, "ps-old").await;
    assert_eq!(purged.moved, vec![("victim".to_string(), "ps-new".to_string())]);
    let report = victim.write_and_pass(3, 61).await;
    assert!(report.full_copies >= 1, "the purged machine is copied again: {report:?}");
    wait_until(WAIT, "the victim's resync to be applied", || async {
        let st = status(&cs.client()).await;
        !st.machines.iter().find(|m| m.name == "victim").unwrap().resync_required
    })
    .await;
    let manifest_before = target.load_manifest("victim", "disk0").await.unwrap().unwrap();

    // ps-old comes back with its cache: it registers anew and owns no machine, so its
    // drain drops the victim's stale records (an eviction: that stream now needs a full
    // copy) without touching the store.
    let old = start_ps(&cs, "ps-old", dir.path(), &url).await;
    let dropped = || old.drain_stats().foreign_records_dropped.load(std::sync::atomic::Ordering::Relaxed);
    wait_until(WAIT, "ps-old to drop the victim's stale records", || async { dropped() > 0 }).await;
    assert_eq!(old.status().records_not_uploaded, 0);
    assert_eq!(old.drain_stats().uploaded_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(target.load_manifest("victim", "disk0").await.unwrap().unwrap(), manifest_before);
    let report = victim.write_and_pass(3, 62).await;
    assert_eq!(report.full_copies, 0, "ps-old's return costs the victim nothing on ps-new: {report:?}");

    // Switched back to ps-old: ps-new hands the history over, and ps-old continues it
    // with a full copy, never with the stale records of its old cache.
    let migrated: api::Migrated = cs
        .client()
        .post(api::PATH_MIGRATE, &api::Migrate { machine: Some("victim".into()), all_from: None, to: "ps-old".into() })
        .await
        .unwrap();
    assert_eq!(migrated.machines, vec!["victim".to_string()]);
    assert_eq!(settled_on(&cs, "victim").await, "ps-old");
    // The agent follows on its next connection: pass until a pass ran on ps-old.
    let old_addr = old.local_addr.to_string();
    let mut full_copies = 0;
    for seed in 63.. {
        full_copies += victim.write_and_pass(3, seed).await.full_copies;
        if victim.agent.process_server() == Some(old_addr.as_str()) {
            break;
        }
        assert!(seed < 163, "the agent did not follow the move back within 100 passes");
    }
    assert!(full_copies >= 1, "the dropped records are replaced by a full copy on ps-old");
    let report = victim.write_and_pass(3, 200).await;
    assert_eq!(report.full_copies, 0, "{report:?}");
    assert!(old.drain_stats().uploaded_bytes.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // Every point but the stranded one restores byte for byte: those before the purge,
    // on ps-new, and on ps-old after the switch back.
    victim.points.retain(|(id, _)| *id != stranded.point_id);
    let out = tempfile::tempdir().unwrap();
    victim.check_every_point(&target, out.path()).await;
    drop(victim);
    old.stop().await.unwrap();
    new.stop().await.unwrap();
    cs.stop().await;
}
