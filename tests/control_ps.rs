//! The process server's side of the control plane, against a real configuration server
//! (each scenario on SQLite and on PostgreSQL) and real process servers on 127.0.0.1:
//! registration and heartbeats, logins with each machine's own credential (impersonation
//! refused), MovingAway closing sessions and ending in `released`, and the health
//! watermarks of a small cache in `/status.json`, the CS's status and `/metrics`, with
//! ingest throttled below the last one.

mod cs_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use churnlog::cache::StreamId;
use churnlog::control::api::{self, HealthLevel, Heartbeat, MachineState};
use churnlog::control::auth::Principal;
use churnlog::control::client::CsClient;
use churnlog::control::ps_link::{LinkConfig, LinkError};
use churnlog::ingest::IngestConfig;
use churnlog::process_server::{ProcessServer, ProcessServerConfig, ProcessServerError};
use churnlog::protocol::auth::{nonce, AuthKey};
use churnlog::protocol::codec::E_AUTH;
use churnlog::protocol::{read_frame, Frame, PointKind, PROTOCOL_VERSION};
use churnlog::store::Target;
use cs_support::{keep_beating, register_machine, register_ps, status, wait_until, Backend, CsRig, PASSPHRASE};
use tokio::io::AsyncWriteExt;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

const WAIT: Duration = Duration::from_secs(30);

on_both_backends!(
    machines_log_in_with_their_own_credential_and_move_away_cleanly,
    a_resync_asked_by_the_cs_reaches_the_disk_and_is_reported,
    a_newer_process_server_is_refused_at_start_with_the_cs_sentence,
    a_filling_cache_warns_then_goes_critical_then_throttles_ingest,
);

/// A process server in `dir`, linked to the CS when `cs` is given.
async fn start_ps(
    dir: &std::path::Path,
    cs: Option<(&CsRig, &str)>,
    edit: impl FnOnce(&mut ProcessServerConfig),
) -> Result<ProcessServer, ProcessServerError> {
    let mut ingest = IngestConfig::new("127.0.0.1:0".parse().unwrap(), dir.join("tls"), PASSPHRASE);
    ingest.handshake_timeout = Duration::from_secs(10);
    let target = Target::from_url(&format!("file://{}", dir.join("store").display()), None).unwrap();
    let mut cfg = ProcessServerConfig::new(dir.join("cache"), 1 << 30, ingest, target);
    cfg.cache.segment_size = 16 << 20;
    cfg.control.monitor_interval = Duration::from_millis(100);
    // The host's own load (other builds and tests) must not raise alerts here.
    let t = &mut cfg.control.thresholds;
    (t.cpu_warning_percent, t.cpu_critical_percent, t.memory_warning_percent, t.memory_critical_percent) =
        (100.0, 100.0, 100.0, 100.0);
    cfg.control.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    if let Some((rig, id)) = cs {
        cfg.control.link = Some(LinkConfig {
            cs_address: rig.address(),
            cs_cert_pem: rig.cs.cert_pem.clone(),
            ps_id: id.to_string(),
            advertise_address: "127.0.0.1:9443".into(),
            heartbeat_interval: Duration::from_millis(200),
            key: AuthKey::from_passphrase(PASSPHRASE),
        });
    }
    edit(&mut cfg);
    ProcessServer::start(cfg).await
}

async fn send(s: &mut Tls, frames: &[Frame]) {
    let mut out = Vec::new();
    for f in frames {
        f.encode(&mut out);
    }
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();
}

/// Connects and logs in as `machine` with `key`; the frame that ended the login otherwise.
async fn login(ps: &ProcessServer, machine: &str, key: &AuthKey) -> Result<Tls, Option<Frame>> {
    let tcp = tokio::net::TcpStream::connect(ps.local_addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(churnlog::tls::client_config(&ps.cert_pem).unwrap());
    let mut s = connector.connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp).await.unwrap();
    let client_nonce = nonce();
    send(&mut s, &[Frame::Hello { version: PROTOCOL_VERSION, machine: machine.into(), client_nonce }]).await;
    let mut buf = Vec::new();
    let server_nonce = match read_frame(&mut s, &mut buf).await {
        Ok(Frame::Challenge { server_nonce, .. }) => server_nonce,
        other => return Err(other.ok()),
    };
    send(&mut s, &[Frame::Auth { mac: key.client_mac(&client_nonce, &server_nonce, machine) }]).await;
    match read_frame(&mut s, &mut buf).await {
        Ok(Frame::AuthOk { .. }) => Ok(s),
        other => Err(other.ok()),
    }
}

/// Reads until `want` matches a frame (panics after `WAIT` or on a close first).
async fn read_until(s: &mut Tls, what: &str, want: impl Fn(&Frame) -> bool) -> Frame {
    let mut buf = Vec::new();
    let read = async {
        loop {
            match read_frame(s, &mut buf).await {
                Ok(f) if want(&f) => return f,
                Ok(_) => {}
                Err(e) => panic!("connection ended before {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

fn key_of(credential: &str) -> AuthKey {
    churnlog::control::book::parse_credential(credential).unwrap()
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let r = reqwest::Client::new().get(format!("http://{addr}{path}")).send().await.unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.text().await.unwrap()
}

async fn status_json(ps: &ProcessServer) -> Heartbeat {
    serde_json::from_str(&get(ps.metrics_addr.unwrap(), "/status.json").await).unwrap()
}

fn assignment_client(rig: &CsRig, name: &str, credential: &str) -> CsClient {
    rig.client().as_principal(Principal::Machine(name.into()), key_of(credential))
}

async fn machines_log_in_with_their_own_credential_and_move_away_cleanly(b: Backend) {
    let Some(rig) = CsRig::start(b, Duration::from_secs(60)).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut ps = start_ps(dir.path(), Some((&rig, "ps1")), |_| {}).await.unwrap();
    let c = rig.client();
    wait_until(WAIT, "ps1 connected", || async {
        status(&c).await.process_servers.iter().any(|p| p.id == "ps1" && p.state == api::PsState::Connected)
    })
    .await;

    // Two machines register and are placed on ps1, the only server.
    let cred_a = register_machine(&c, "m-a").await.unwrap();
    let cred_b = register_machine(&c, "m-b").await.unwrap();
    for (name, cred) in [("m-a", &cred_a), ("m-b", &cred_b)] {
        let a: api::Assignment = assignment_client(&rig, name, cred).get(api::PATH_MACHINE_ASSIGNMENT).await.unwrap();
        assert_eq!(a.ps, "ps1");
    }
    let book = ps.book().unwrap().clone();
    wait_until(WAIT, "both machines in ps1's book", || {
        let book = book.clone();
        async move { book.admit("m-a").is_ok() && book.admit("m-b").is_ok() }
    })
    .await;

    // The passphrase no longer logs a machine in; A's credential logs in A only.
    let refused = login(&ps, "m-a", &AuthKey::from_passphrase(PASSPHRASE)).await.expect_err("passphrase refused");
    assert!(matches!(refused, Some(Frame::Error { code: E_AUTH, .. })), "{refused:?}");
    let impersonation = login(&ps, "m-b", &key_of(&cred_a)).await.expect_err("A's credential for B refused");
    assert!(matches!(impersonation, Some(Frame::Error { code: E_AUTH, .. })), "{impersonation:?}");
    let unknown = login(&ps, "m-unknown", &key_of(&cred_a)).await.expect_err("an unassigned machine is refused");
    match unknown {
        Some(Frame::Error { code: E_AUTH, message }) => assert!(message.contains("not assigned"), "{message}"),
        other => panic!("{other:?}"),
    }
    let before = ps.stats.auth_failures.load(Ordering::Relaxed);
    assert!(before >= 2, "both bad MACs counted: {before}");
    let mut a = login(&ps, "m-a", &key_of(&cred_a)).await.expect("A logs in with its own credential");

    // A writes and tags a point; the drain uploads it and A gets an RPO.
    // A new disk's history begins with a full copy (Resync), as an agent sends it.
    send(&mut a, &[Frame::OpenDisk { disk: 0, size_bytes: 1 << 20, name: "disk0".into() }]).await;
    send(&mut a, &[Frame::Resync { disk: 0, tag: 1 }]).await;
    send(&mut a, &[Frame::Write { disk: 0, tag: 2, offset: 0, data: vec![7u8; 64 << 10].into() }]).await;
    let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let point =
        Frame::Point { tag: 3, point_id: 1, kind: PointKind::CrashConsistent, unix_ms, disks: vec![(0, 1 << 20)] };
    send(&mut a, &[point]).await;
    read_until(&mut a, "the point's upload", |f| matches!(f, Frame::Uploaded { point_id: 1 })).await;
    wait_until(WAIT, "A's RPO in the report", || async {
        status_json(&ps)
            .await
            .machines
            .iter()
            .any(|m| m.name == "m-a" && m.rpo_seconds.is_some() && m.pending_bytes == 0)
    })
    .await;

    // A second server takes A over: ps1 closes A's session, refuses a new one, and once
    // everything of A is uploaded reports it released, so the CS hands it on.
    register_ps(&c, "ps2", &rig.cs.cert_pem).await;
    let beating = keep_beating(rig.client(), cs_support::heartbeat("ps2", 90.0, HealthLevel::Ok));
    wait_until(WAIT, "ps2 connected", || async {
        status(&c).await.process_servers.iter().any(|p| p.id == "ps2" && p.state == api::PsState::Connected)
    })
    .await;
    // Data still pending when the move begins: the release waits for its upload.
    ps.pause_drain().await.unwrap();
    send(&mut a, &[Frame::Write { disk: 0, tag: 4, offset: 0, data: vec![9u8; 64 << 10].into() }]).await;
    read_until(&mut a, "durable", |f| matches!(f, Frame::Durable { upto_tag: 4 })).await;
    let moved: api::Migrated = c
        .post(api::PATH_MIGRATE, &api::Migrate { machine: Some("m-a".into()), all_from: None, to: "ps2".into() })
        .await
        .unwrap();
    assert_eq!(moved.machines, vec!["m-a".to_string()]);
    let ended = read_until(&mut a, "the session's end", |f| matches!(f, Frame::Error { .. })).await;
    match ended {
        Frame::Error { message, .. } => assert!(message.contains("moving to another process server"), "{message}"),
        _ => unreachable!(),
    }
    match login(&ps, "m-a", &key_of(&cred_a)).await.expect_err("no new session while moving") {
        Some(Frame::Error { code: E_AUTH, message }) => assert!(message.contains("moving"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(book.admit("m-a").unwrap_err().to_string().contains("moving"));
    // Pending data holds the release back.
    wait_until(WAIT, "the pending write in the report", || async {
        let hb = status_json(&ps).await;
        hb.machines.iter().any(|m| m.name == "m-a" && m.pending_bytes > 0) && hb.released.is_empty()
    })
    .await;
    assert_eq!(status(&c).await.machines.iter().find(|m| m.name == "m-a").unwrap().ps.as_deref(), Some("ps1"));
    ps.resume_drain();
    wait_until(WAIT, "m-a handed on to ps2", || async {
        status(&c)
            .await
            .machines
            .iter()
            .any(|m| m.name == "m-a" && m.ps.as_deref() == Some("ps2") && m.moving_to.is_none())
    })
    .await;
    wait_until(WAIT, "m-a gone from ps1's book", || {
        let book = book.clone();
        async move { !book.machines().iter().any(|(n, _)| n == "m-a") }
    })
    .await;
    // B is untouched and still logs in.
    assert!(matches!(book.machines().as_slice(), [(n, MachineState::Active)] if n == "m-b"));
    let b = login(&ps, "m-b", &key_of(&cred_b)).await.expect("B still logs in");
    drop(b);
    drop(a);
    beating.abort();
    ps.stop().await.unwrap();
    rig.stop().await;
}

async fn a_resync_asked_by_the_cs_reaches_the_disk_and_is_reported(b: Backend) {
    let Some(rig) = CsRig::start(b, Duration::from_secs(3)).await else { return };
    let c = rig.client();
    // ps-old holds m-r, then goes silent and is purged: m-r moves to ps1 marked resync.
    register_ps(&c, "ps-old", &rig.cs.cert_pem).await;
    let old = keep_beating(rig.client(), cs_support::heartbeat("ps-old", 90.0, HealthLevel::Ok));
    wait_until(WAIT, "ps-old connected", || async {
        status(&c).await.process_servers.iter().any(|p| p.id == "ps-old" && p.state == api::PsState::Connected)
    })
    .await;
    let cred = register_machine(&c, "m-r").await.unwrap();
    let a: api::Assignment = assignment_client(&rig, "m-r", &cred).get(api::PATH_MACHINE_ASSIGNMENT).await.unwrap();
    assert_eq!(a.ps, "ps-old");
    let dir = tempfile::tempdir().unwrap();
    let ps = start_ps(dir.path(), Some((&rig, "ps1")), |_| {}).await.unwrap();
    old.abort();
    wait_until(WAIT, "ps-old disconnected", || async {
        status(&c).await.process_servers.iter().any(|p| p.id == "ps-old" && p.state == api::PsState::Disconnected)
    })
    .await;
    let purged: api::Unregistered = c
        .post(api::PATH_PS_UNREGISTER, &api::Unregister { ps: "ps-old".into(), purge: true, force: false })
        .await
        .unwrap();
    assert_eq!(purged.resync_required, vec!["m-r".to_string()]);
    let book = ps.book().unwrap().clone();
    wait_until(WAIT, "m-r on ps1 with a resync asked", || {
        let book = book.clone();
        async move { book.admit("m-r").is_ok() && book.resync_wanted("m-r") }
    })
    .await;
    let mut s = login(&ps, "m-r", &key_of(&cred)).await.expect("m-r logs in on ps1");
    send(&mut s, &[Frame::OpenDisk { disk: 0, size_bytes: 1 << 20, name: "disk0".into() }]).await;
    read_until(&mut s, "ResyncRequired", |f| matches!(f, Frame::ResyncRequired { disk: 0 })).await;
    let stream = ps.cache().find_stream("m-r", "disk0").unwrap();
    assert!(ps.cache().stream_info(stream).unwrap().resync_required);
    // Reported, and the CS stops asking once it heard.
    wait_until(WAIT, "the CS heard the resync was applied", || async {
        status(&c).await.machines.iter().any(|m| m.name == "m-r" && !m.resync_required) || !book.resync_wanted("m-r")
    })
    .await;
    // The agent's full copy clears the mark.
    send(&mut s, &[Frame::Resync { disk: 0, tag: 1 }]).await;
    read_until(&mut s, "durable", |f| matches!(f, Frame::Durable { upto_tag: 1 })).await;
    wait_until(WAIT, "the mark cleared by the resync base", || {
        let cache = ps.cache().clone();
        async move { !cache.stream_info(stream).unwrap().resync_required }
    })
    .await;
    drop(s);
    ps.stop().await.unwrap();
    rig.stop().await;
}

async fn a_newer_process_server_is_refused_at_start_with_the_cs_sentence(b: Backend) {
    let Some(rig) = CsRig::start(b, Duration::from_secs(60)).await else { return };
    let dir = tempfile::tempdir().unwrap();
    // The CS refuses a version newer than its own; a PS of this build is not newer, so the
    // refusal is provoked through the same register call with a bumped version.
    let link = LinkConfig {
        cs_address: rig.address(),
        cs_cert_pem: rig.cs.cert_pem.clone(),
        ps_id: "ps-new".into(),
        advertise_address: "127.0.0.1:9443".into(),
        heartbeat_interval: Duration::from_secs(1),
        key: AuthKey::from_passphrase(PASSPHRASE),
    };
    let reg = api::PsRegistration {
        id: "ps-new".into(),
        address: link.advertise_address.clone(),
        cert_pem: rig.cs.cert_pem.clone(),
        version: "999.0.0".into(),
        cache_size_bytes: 1 << 30,
    };
    let e = link.client().unwrap().post::<_, api::PsRegistered>(api::PATH_PS_REGISTER, &reg).await.unwrap_err();
    assert_eq!(e.code(), Some("version"));
    // A wrong passphrase fails the start with the CS's refusal, before anything listens.
    let wrong = start_ps(dir.path(), Some((&rig, "ps-x")), |cfg| {
        cfg.control.link.as_mut().unwrap().key = AuthKey::from_passphrase("not the passphrase at all");
    })
    .await;
    match wrong {
        Err(ProcessServerError::Link(LinkError::Register { source, .. })) => {
            assert_eq!(source.code(), Some("unauthorized"), "{source}")
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("started with a wrong passphrase"),
    }
    rig.stop().await;
}

/// Appends random 1 MiB records to `stream` until the cache's free space is below
/// `free_percent`.
fn fill_below(cache: &Arc<churnlog::cache::Cache>, stream: StreamId, free_percent: f64, seed: &mut u64) {
    let cap = cache.options().capacity_bytes as f64;
    let mut data = vec![0u8; 1 << 20];
    let mut record = Vec::new();
    for _ in 0..10_000 {
        if 100.0 * (1.0 - cache.used_bytes() as f64 / cap) < free_percent {
            return;
        }
        *seed += 1;
        churnlog::bench::fill_random(&mut data, *seed);
        record.clear();
        record.extend_from_slice(&churnlog::protocol::StreamRecord::Write { offset: 0, data: data.clone() }.encode());
        let ticket = cache.append(stream, &record).unwrap();
        ticket.wait().unwrap();
    }
    panic!("the cache never got below {free_percent}% free");
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(line_start).and_then(|v| v.trim().parse().ok()))
}

async fn a_filling_cache_warns_then_goes_critical_then_throttles_ingest(b: Backend) {
    let Some(rig) = CsRig::start(b, Duration::from_secs(60)).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut ps = start_ps(dir.path(), Some((&rig, "ps-small")), |cfg| {
        // 20 segments of 8 MiB: free space moves in 5% steps.
        cfg.cache.segment_size = 8 << 20;
        cfg.cache.commit_bytes_max = 2 << 20;
        cfg.cache.capacity_bytes = 160 << 20;
        cfg.cache.tail_cache_bytes = 16 << 20;
    })
    .await
    .unwrap();
    ps.pause_drain().await.unwrap();
    let c = rig.client();
    let metrics_addr = ps.metrics_addr.unwrap();
    let cache = ps.cache().clone();
    let stream = cache.stream("m-fill", "disk0").unwrap();
    // A disk's history begins with a full copy's base, as an agent's Resync writes it.
    let base = churnlog::protocol::StreamRecord::ResyncBase { unix_ms: 1 }.encode();
    cache.append(stream, &base).unwrap().wait().unwrap();
    let mut seed = 1;
    let alerts = |hb: &Heartbeat| -> Vec<(String, HealthLevel)> {
        hb.alerts.iter().map(|a| (a.kind.clone(), a.level)).collect()
    };

    let hb = status_json(&ps).await;
    assert_eq!(hb.health, HealthLevel::Ok, "{:?}", hb.alerts);
    // Machines placed here while the server is healthy (a critical one gets no new ones):
    // m-fill, whose stream fills the cache (only an assigned machine's records are
    // uploaded), and m-w, which writes through the ingest.
    let fill_cred = register_machine(&c, "m-fill").await.unwrap();
    let _: api::Assignment =
        assignment_client(&rig, "m-fill", &fill_cred).get(api::PATH_MACHINE_ASSIGNMENT).await.unwrap();
    let cred = register_machine(&c, "m-w").await.unwrap();
    let _: api::Assignment = assignment_client(&rig, "m-w", &cred).get(api::PATH_MACHINE_ASSIGNMENT).await.unwrap();
    let book = ps.book().unwrap().clone();
    wait_until(WAIT, "m-fill and m-w in the book", || {
        let book = book.clone();
        async move { book.admit("m-fill").is_ok() && book.admit("m-w").is_ok() }
    })
    .await;

    fill_below(&cache, stream, 30.0, &mut seed);
    wait_until(WAIT, "a cache_free warning", || async {
        let hb = status_json(&ps).await;
        hb.cache_free_percent < 30.0 && alerts(&hb).contains(&("cache_free".into(), HealthLevel::Warning))
    })
    .await;
    if status_json(&ps).await.cache_free_percent >= 25.0 {
        let m = get(metrics_addr, "/metrics").await;
        assert_eq!(metric(&m, "churnlog_alerts{kind=\"cache_free\",level=\"warning\"}"), Some(1.0), "{m}");
        assert_eq!(metric(&m, "churnlog_health_level"), Some(1.0), "{m}");
        assert_eq!(metric(&m, "churnlog_ingest_throttled"), Some(0.0), "{m}");
    }

    fill_below(&cache, stream, 25.0, &mut seed);
    wait_until(WAIT, "a cache_free critical", || async {
        let hb = status_json(&ps).await;
        hb.health == HealthLevel::Critical && alerts(&hb).contains(&("cache_free".into(), HealthLevel::Critical))
    })
    .await;
    // The CS hears it too.
    wait_until(WAIT, "the CS shows ps-small critical", || async {
        status(&c).await.process_servers.iter().any(|p| {
            p.id == "ps-small" && p.health == HealthLevel::Critical && p.alerts.iter().any(|a| a.kind == "cache_free")
        })
    })
    .await;

    fill_below(&cache, stream, 20.0, &mut seed);
    wait_until(WAIT, "ingest throttled", || async {
        alerts(&status_json(&ps).await).contains(&("ingest_throttled".into(), HealthLevel::Critical))
    })
    .await;
    let m = get(metrics_addr, "/metrics").await;
    assert_eq!(metric(&m, "churnlog_ingest_throttled"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "churnlog_alerts{kind=\"ingest_throttled\",level=\"critical\"}"), Some(1.0), "{m}");
    assert!(metric(&m, "churnlog_cache_free_percent").unwrap() < 20.0, "{m}");
    assert!(metric(&m, "churnlog_backlog_bytes").unwrap() > 0.0, "{m}");

    // A write through the ingest now is held back (and still made durable).
    let throttled_before = ps.stats.throttled_records.load(Ordering::Relaxed);
    let mut s = login(&ps, "m-w", &key_of(&cred)).await.unwrap();
    send(&mut s, &[Frame::OpenDisk { disk: 0, size_bytes: 1 << 20, name: "disk0".into() }]).await;
    send(&mut s, &[Frame::Resync { disk: 0, tag: 1 }]).await;
    send(&mut s, &[Frame::Write { disk: 0, tag: 2, offset: 0, data: vec![1u8; 4096].into() }]).await;
    read_until(&mut s, "durable", |f| matches!(f, Frame::Durable { upto_tag: 2 })).await;
    assert!(ps.stats.throttled_records.load(Ordering::Relaxed) > throttled_before);
    // The counters reach /metrics at the monitor's next sample; the record is counted
    // throttled before its 10 ms delay and received after it, so a sample can fall in
    // between: wait for all three.
    wait_until(WAIT, "the throttled record, its bytes and its acknowledgement in /metrics", || async {
        let m = get(metrics_addr, "/metrics").await;
        metric(&m, "churnlog_ingest_throttled_records_total").unwrap_or(0.0) >= 1.0
            && metric(&m, "churnlog_ingest_bytes_total").unwrap_or(0.0) >= 4096.0
            && metric(&m, "churnlog_ack_latency_seconds_count").unwrap_or(0.0) >= 1.0
    })
    .await;
    drop(s);

    // The drain frees the space and the alerts clear.
    ps.resume_drain();
    wait_until(WAIT, "health back to ok", || async { status_json(&ps).await.health == HealthLevel::Ok }).await;
    let m = get(metrics_addr, "/metrics").await;
    assert_eq!(metric(&m, "churnlog_ingest_throttled"), Some(0.0), "{m}");
    assert!(metric(&m, "churnlog_upload_bytes_total").unwrap() > 0.0, "{m}");
    drop(cache);
    ps.stop().await.unwrap();
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standalone_server_keeps_the_passphrase_login_and_serves_status() {
    let dir = tempfile::tempdir().unwrap();
    let ps = start_ps(dir.path(), None, |_| {}).await.unwrap();
    assert!(ps.book().is_none());
    let s = login(&ps, "any-machine", &AuthKey::from_passphrase(PASSPHRASE)).await.expect("passphrase login");
    drop(s);
    let hb = status_json(&ps).await;
    assert_eq!(hb.health, HealthLevel::Ok, "{:?}", hb.alerts);
    assert_eq!(hb.cache_size_bytes, 1 << 30);
    assert!(hb.cache_free_percent > 90.0);
    let m = get(ps.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(metric(&m, "churnlog_cache_size_bytes"), Some((1u64 << 30) as f64), "{m}");
    ps.stop().await.unwrap();
}
