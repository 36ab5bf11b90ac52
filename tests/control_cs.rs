//! The configuration server over real HTTPS on 127.0.0.1 with real signed clients, each
//! scenario against SQLite and against a throwaway PostgreSQL cluster the test starts
//! (and stops). Outside CI a missing PostgreSQL skips its half; with `CI` set it fails.

mod cs_support;

use std::time::Duration;

use churnlog::control::api::{self, HealthLevel, MachineState, PsState};
use churnlog::control::auth::{self, Principal};
use churnlog::control::client::CsClient;
use churnlog::control::cs::{ConfigServer, CsError};
use churnlog::protocol::auth::AuthKey;
use cs_support::*;

/// Long enough that a process server beating once per test stays connected.
const LONG: Duration = Duration::from_secs(600);
/// Test-shortened heartbeat timeout.
const SHORT: Duration = Duration::from_secs(2);
/// Upper bound of any wait in these tests.
const WAIT: Duration = Duration::from_secs(60);

on_both_backends!(
    registration_and_version_gate,
    bad_credentials_replays_and_tampering_are_refused,
    a_request_replayed_to_another_instance_on_the_same_database_is_refused,
    a_database_failure_while_checking_a_request_is_unavailable_not_unauthorized,
    machine_names_are_owned_until_reassigned,
    assignment_goes_to_the_least_loaded_eligible_server,
    silent_servers_go_disconnected_with_an_alert,
    migration_drains_then_hands_over,
    purge_moves_machines_and_marks_resync_only_for_them,
    decommission_moves_machines_and_takes_no_new_ones,
);

async fn registration_and_version_gate(b: Backend) {
    let Some(rig) = CsRig::start(b, LONG).await else { return };
    let c = rig.client();
    let mut reg = registration("ps-new", &rig.cs.cert_pem);
    reg.version = "99.0.0".into();
    let e = c.post::<_, api::PsRegistered>(api::PATH_PS_REGISTER, &reg).await.unwrap_err();
    assert_eq!(e.code(), Some("version"), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("99.0.0") && msg.contains(churnlog::control::VERSION), "{msg}");
    assert!(msg.contains("upgrade the configuration server first"), "{msg}");
    assert!(status(&c).await.process_servers.is_empty(), "a refused server is not recorded");

    let r: api::PsRegistered = c.post(api::PATH_PS_REGISTER, &registration("ps-a", &rig.cs.cert_pem)).await.unwrap();
    assert_eq!(r.cs_version, churnlog::control::VERSION);
    assert!(r.heartbeat_interval_seconds >= 1);
    // Re-registration (a new address after a proxy change) updates the record.
    let mut again = registration("ps-a", &rig.cs.cert_pem);
    again.address = "10.0.0.9:9443".into();
    let _: api::PsRegistered = c.post(api::PATH_PS_REGISTER, &again).await.unwrap();
    let s = status(&c).await;
    assert_eq!(s.process_servers.len(), 1);
    assert_eq!(s.process_servers[0].address, "10.0.0.9:9443");
    // Not yet heard from: disconnected, never placed on.
    assert_eq!(s.process_servers[0].state, PsState::Disconnected);

    // A certificate agents could not pin is refused.
    let bad = registration("ps-b", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    let e = c.post::<_, api::PsRegistered>(api::PATH_PS_REGISTER, &bad).await.unwrap_err();
    assert_eq!(e.code(), Some("bad_request"), "{e}");
    // A heartbeat from a server that never registered is told to register.
    let e = c.post::<_, api::HeartbeatReply>(api::PATH_PS_HEARTBEAT, &heartbeat("ps-x", 90.0, HealthLevel::Ok)).await;
    assert_eq!(e.unwrap_err().code(), Some("not_found"));
    rig.stop().await;
}

fn raw_client(cert_pem: &str) -> reqwest::Client {
    let tls = churnlog::tls::client_config(cert_pem).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A client with a wrong passphrase, after checking that status refuses it as
/// `unauthorized`.
async fn refused_with_a_wrong_passphrase(rig: &CsRig) -> CsClient {
    let wrong = CsClient::new(
        &rig.address(),
        &rig.cs.cert_pem,
        Principal::Passphrase,
        AuthKey::from_passphrase("a wrong passphrase of some length"),
    )
    .unwrap();
    let e = wrong.get::<api::StatusReport>(api::PATH_STATUS).await.unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"), "{e}");
    wrong
}

async fn bad_credentials_replays_and_tampering_are_refused(b: Backend) {
    let Some(rig) = CsRig::start(b, LONG).await else { return };
    // A passphrase under 16 characters: the server does not start.
    let short = tempfile::tempdir().unwrap();
    let mut cfg = config(short.path(), &short.path().join("x.db").display().to_string(), LONG);
    cfg.passphrase = "too short".into();
    assert!(matches!(ConfigServer::start(cfg).await, Err(CsError::Passphrase(_))));

    let wrong = refused_with_a_wrong_passphrase(&rig).await;
    let e = register_machine(&wrong, "m1").await.unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"));

    let http = raw_client(&rig.cs.cert_pem);
    let url = format!("https://{}{}", rig.address(), api::PATH_MACHINE_REGISTER);
    let key = AuthKey::from_passphrase(PASSPHRASE);
    let body = serde_json::to_vec(&api::MachineRegistration { name: "m1".into() }).unwrap();
    // No header at all.
    let r = http.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let e: api::ApiError = r.json().await.unwrap();
    assert_eq!(e.code, "unauthorized");
    // A body other than the one signed.
    let header = auth::sign(&Principal::Passphrase, &key, "POST", api::PATH_MACHINE_REGISTER, &body);
    let tampered = serde_json::to_vec(&api::MachineRegistration { name: "m2".into() }).unwrap();
    let r = http.post(&url).header("authorization", &header).body(tampered).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // The genuine request once, then its replay.
    let r = http.post(&url).header("authorization", &header).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http.post(&url).header("authorization", &header).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let e: api::ApiError = r.json().await.unwrap();
    assert!(e.error.contains("already used"), "{e}");
    // The view token reads status and nothing else.
    let token = rig.cs.status_view_token();
    let status_url = format!("https://{}{}", rig.address(), api::PATH_STATUS);
    let r = http.get(&status_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http.get(&status_url).bearer_auth("00".repeat(32)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http.post(&url).bearer_auth(&token).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A body over the cap is refused before anything reads it as JSON.
    let huge = vec![b' '; api::BODY_BYTES_MAX + 1];
    let r = http.post(&url).header("authorization", &header).body(huge).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);

    // A machine's credential is its own: not valid as another machine, nor as operator.
    let c = rig.client();
    let cred2 = register_machine(&c, "m2").await.unwrap();
    let mut key2 = [0u8; 32];
    hex::decode_to_slice(&cred2, &mut key2).unwrap();
    let as_m1 = c.as_principal(Principal::Machine("m1".into()), AuthKey::from_bytes(key2));
    let e = as_m1.get::<api::Assignment>(api::PATH_MACHINE_ASSIGNMENT).await.unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"));
    let m2 = rig.machine_client("m2", &cred2);
    let e = m2.get::<api::StatusReport>(api::PATH_STATUS).await.unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"));
    let e = m2.post::<_, api::Reassign>(api::PATH_MACHINE_REASSIGN, &api::Reassign { name: "m1".into() }).await;
    assert_eq!(e.unwrap_err().code(), Some("unauthorized"));
    rig.stop().await;
}

/// Two CS instances behind one load balancer share the database (and here the TLS
/// identity): a signed request one of them accepted is refused by the other too.
async fn a_request_replayed_to_another_instance_on_the_same_database_is_refused(b: Backend) {
    let Some(rig) = CsRig::start(b, LONG).await else { return };
    let second = ConfigServer::start(config(rig.dir.path(), &rig.db, LONG)).await.unwrap();
    assert_eq!(second.cert_pem, rig.cs.cert_pem, "one TLS identity for both instances");
    let http = raw_client(&rig.cs.cert_pem);
    let key = AuthKey::from_passphrase(PASSPHRASE);
    let body = serde_json::to_vec(&api::MachineRegistration { name: "m1".into() }).unwrap();
    let header = auth::sign(&Principal::Passphrase, &key, "POST", api::PATH_MACHINE_REGISTER, &body);
    let url = |addr: std::net::SocketAddr| format!("https://{addr}{}", api::PATH_MACHINE_REGISTER);
    let r = http.post(url(rig.cs.local_addr)).header("authorization", &header).body(body.clone()).send().await;
    assert_eq!(r.unwrap().status().as_u16(), 200);
    let r = http.post(url(second.local_addr)).header("authorization", &header).body(body.clone()).send().await;
    let r = r.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let e: api::ApiError = r.json().await.unwrap();
    assert!(e.error.contains("already used"), "{e}");
    // The other way round, with a status read: accepted by the second, refused by the first.
    let header = auth::sign(&Principal::Passphrase, &key, "GET", api::PATH_STATUS, b"");
    let status_url = |addr: std::net::SocketAddr| format!("https://{addr}{}", api::PATH_STATUS);
    let r = http.get(status_url(second.local_addr)).header("authorization", &header).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let s: api::StatusReport = r.json().await.unwrap();
    assert_eq!(s.machines.len(), 1, "the first instance's registration, read through the second");
    let r = http.get(status_url(rig.cs.local_addr)).header("authorization", &header).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Fresh signatures are accepted by either.
    let c = rig.client();
    status(&c).await;
    let c2 = CsClient::new(&second.local_addr.to_string(), &second.cert_pem, Principal::Passphrase, key).unwrap();
    assert_eq!(status(&c2).await.machines.len(), 1);
    second.stop().await;
    rig.stop().await;
}

/// Recording a request's nonce needs the database: when that fails, the caller gets 503
/// `unavailable` (an agent waits and asks again), not 401 `unauthorized`
/// (an agent's final answer). The failure here: the nonce table dropped behind the CS.
async fn a_database_failure_while_checking_a_request_is_unavailable_not_unauthorized(b: Backend) {
    use sqlx::Connection;
    let Some(rig) = CsRig::start(b, LONG).await else { return };
    let c = rig.client();
    status(&c).await;
    sqlx::any::install_default_drivers();
    let (url, _) = churnlog::control::cs::db::database_url(&rig.db);
    let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("DROP TABLE request_nonces").execute(&mut db).await.unwrap();
    db.close().await.unwrap();
    let e = c.get::<api::StatusReport>(api::PATH_STATUS).await.unwrap_err();
    assert_eq!(e.code(), Some("unavailable"), "{e}");
    assert!(e.to_string().contains("cannot check requests"), "{e}");
    // A wrong passphrase is still found out before the database is asked.
    refused_with_a_wrong_passphrase(&rig).await;
    rig.stop().await;
}

async fn machine_names_are_owned_until_reassigned(b: Backend) {
    let Some(rig) = CsRig::start(b, LONG).await else { return };
    let c = rig.client();
    register_ps(&c, "ps-a", &rig.cs.cert_pem).await;
    beat(&c, &heartbeat("ps-a", 90.0, HealthLevel::Ok)).await;
    let cred = register_machine(&c, "m1").await.unwrap();
    assert_eq!(cred.len(), 64);
    assert!(cred.bytes().all(|b| b.is_ascii_hexdigit()));
    let e = register_machine(&c, "m1").await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"));
    assert!(e.to_string().contains("churnlog cs reassign --machine m1"), "{e}");
    let e = register_machine(&c, "bad name!").await.unwrap_err();
    assert_eq!(e.code(), Some("bad_request"));
    // The process server learns the machine and its credential.
    let reply = beat(&c, &heartbeat("ps-a", 90.0, HealthLevel::Ok)).await;
    assert_eq!(reply.machines.len(), 1);
    assert_eq!((reply.machines[0].name.as_str(), reply.machines[0].credential.as_str()), ("m1", cred.as_str()));
    assert_eq!(reply.machines[0].state, MachineState::Active);

    let _: api::Reassign = c.post(api::PATH_MACHINE_REASSIGN, &api::Reassign { name: "m1".into() }).await.unwrap();
    let e = rig.machine_client("m1", &cred).get::<api::Assignment>(api::PATH_MACHINE_ASSIGNMENT).await.unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"), "the old credential no longer works");
    // Nobody may log in as it, but it stays the server's: what is cached for it uploads.
    let reply = beat(&c, &heartbeat("ps-a", 90.0, HealthLevel::Ok)).await;
    assert!(reply.machines.is_empty());
    assert_eq!(reply.owned, Some(vec!["m1".to_string()]));
    let cred2 = register_machine(&c, "m1").await.unwrap();
    assert_ne!(cred, cred2);
    let a: api::Assignment = rig.machine_client("m1", &cred2).get(api::PATH_MACHINE_ASSIGNMENT).await.unwrap();
    assert_eq!(a.ps, "ps-a", "the name keeps its server");
    let e = c.post::<_, api::Reassign>(api::PATH_MACHINE_REASSIGN, &api::Reassign { name: "nope".into() }).await;
    assert_eq!(e.unwrap_err().code(), Some("not_found"));
    rig.stop().await;
}

async fn assignment(
    rig: &CsRig,
    name: &str,
    cred: &str,
) -> Result<api::Assignment, churnlog::control::client::ClientError> {
    rig.machine_client(name, cred).get(api::PATH_MACHINE_ASSIGNMENT).await
}

async fn assignment_goes_to_the_least_loaded_eligible_server(b: Backend) {
    let Some(rig) = CsRig::start(b, LONG).await else { return };
    let c = rig.client();
    // No server yet: the machine registers, and waits for one.
    let early = register_machine(&c, "early").await.unwrap();
    let e = assignment(&rig, "early", &early).await.unwrap_err();
    assert_eq!(e.code(), Some("unavailable"), "{e}");

    for id in ["ps-full", "ps-roomy", "ps-critical", "ps-silent"] {
        register_ps(&c, id, &rig.cs.cert_pem).await;
    }
    beat(&c, &heartbeat("ps-full", 40.0, HealthLevel::Ok)).await;
    beat(&c, &heartbeat("ps-roomy", 95.0, HealthLevel::Ok)).await;
    beat(&c, &heartbeat("ps-critical", 100.0, HealthLevel::Critical)).await;
    // ps-silent registered but never reported: disconnected.
    let a = assignment(&rig, "early", &early).await.unwrap();
    assert_eq!(a.ps, "ps-roomy");
    assert_eq!(a.address, "ps-roomy.example:9443");
    assert_eq!(a.cert_pem, rig.cs.cert_pem);

    let m1 = register_machine(&c, "m1").await.unwrap();
    assert_eq!(assignment(&rig, "m1", &m1).await.unwrap().ps, "ps-roomy");
    // Churn counts too: ps-roomy now takes all the churn, ps-full keeps its cache use.
    let mut busy = heartbeat("ps-roomy", 95.0, HealthLevel::Ok);
    busy.ingest_bytes_per_second = 50e6;
    beat(&c, &busy).await;
    let mut idle = heartbeat("ps-full", 40.0, HealthLevel::Ok);
    idle.ingest_bytes_per_second = 1e6;
    beat(&c, &idle).await;
    let m2 = register_machine(&c, "m2").await.unwrap();
    assert_eq!(assignment(&rig, "m2", &m2).await.unwrap().ps, "ps-full");
    // A server that turns critical takes no new machine.
    beat(&c, &heartbeat("ps-full", 40.0, HealthLevel::Critical)).await;
    let m3 = register_machine(&c, "m3").await.unwrap();
    assert_eq!(assignment(&rig, "m3", &m3).await.unwrap().ps, "ps-roomy");
    let s = status(&c).await;
    let on = |ps: &str| s.machines.iter().filter(|m| m.ps.as_deref() == Some(ps)).count();
    assert_eq!((on("ps-roomy"), on("ps-full"), on("ps-critical"), on("ps-silent")), (3, 1, 0, 0));
    rig.stop().await;
}

async fn silent_servers_go_disconnected_with_an_alert(b: Backend) {
    let Some(rig) = CsRig::start(b, SHORT).await else { return };
    let c = rig.client();
    register_ps(&c, "ps-a", &rig.cs.cert_pem).await;
    register_ps(&c, "ps-b", &rig.cs.cert_pem).await;
    let live = keep_beating(rig.client(), heartbeat("ps-b", 80.0, HealthLevel::Ok));
    beat(&c, &heartbeat("ps-a", 80.0, HealthLevel::Ok)).await;
    let s = status(&c).await;
    // Within the 2 s timeout right after its heartbeat, unless this machine stalled.
    let a = s.process_servers.iter().find(|p| p.id == "ps-a").unwrap();
    if a.heartbeat_age_seconds.unwrap() < 1.0 {
        assert_eq!(a.state, PsState::Connected);
    }
    wait_until(WAIT, "ps-a to show disconnected", || {
        let c = c.clone();
        async move {
            let s = status(&c).await;
            s.process_servers.iter().any(|p| p.id == "ps-a" && p.state == PsState::Disconnected)
        }
    })
    .await;
    let s = status(&c).await;
    let a = s.process_servers.iter().find(|p| p.id == "ps-a").unwrap();
    assert_eq!(a.health, HealthLevel::Critical);
    let alert = a.alerts.iter().find(|x| x.kind == "heartbeat_missing").expect("heartbeat_missing alert");
    assert_eq!(alert.level, HealthLevel::Critical);
    assert!(alert.message.contains("no heartbeat"), "{}", alert.message);
    let b_ = s.process_servers.iter().find(|p| p.id == "ps-b").unwrap();
    assert_eq!(b_.state, PsState::Connected, "the server that keeps beating stays connected");
    assert!(b_.alerts.is_empty());
    // The disconnected one takes no new machine.
    let m = register_machine(&c, "m1").await.unwrap();
    assert_eq!(assignment(&rig, "m1", &m).await.unwrap().ps, "ps-b");
    // The metrics agree.
    let text = reqwest_text(&rig, api::PATH_METRICS).await;
    assert!(text.contains("churnlog_cs_process_servers{state=\"disconnected\"} 1"), "{text}");
    assert!(text.contains("churnlog_cs_alerts{level=\"critical\"} 1"), "{text}");
    assert!(text.contains("churnlog_cs_api_requests_total{code=\"200\",endpoint=\"/api/v1/status\"}"), "{text}");
    live.abort();
    rig.stop().await;
}

async fn reqwest_text(rig: &CsRig, path: &str) -> String {
    let r = raw_client(&rig.cs.cert_pem).get(format!("https://{}{path}", rig.address())).send().await.unwrap();
    assert!(r.status().is_success());
    r.text().await.unwrap()
}

async fn migration_drains_then_hands_over(b: Backend) {
    let Some(rig) = CsRig::start(b, LONG).await else { return };
    let c = rig.client();
    register_ps(&c, "ps-a", &rig.cs.cert_pem).await;
    register_ps(&c, "ps-b", &rig.cs.cert_pem).await;
    beat(&c, &heartbeat("ps-a", 90.0, HealthLevel::Ok)).await;
    // ps-b fuller, so the machines go to ps-a.
    beat(&c, &heartbeat("ps-b", 50.0, HealthLevel::Ok)).await;
    let m1 = register_machine(&c, "m1").await.unwrap();
    let m2 = register_machine(&c, "m2").await.unwrap();
    let m3 = register_machine(&c, "m3").await.unwrap();
    assert_eq!(assignment(&rig, "m1", &m1).await.unwrap().ps, "ps-a");

    let mv = |machine: Option<&str>, from: Option<&str>, to: &str| api::Migrate {
        machine: machine.map(String::from),
        all_from: from.map(String::from),
        to: to.into(),
    };
    let e = c.post::<_, api::Migrated>(api::PATH_MIGRATE, &mv(Some("m1"), None, "ps-nope")).await.unwrap_err();
    assert_eq!(e.code(), Some("not_found"));
    let e = c.post::<_, api::Migrated>(api::PATH_MIGRATE, &mv(Some("m1"), Some("ps-a"), "ps-b")).await.unwrap_err();
    assert_eq!(e.code(), Some("bad_request"));
    let done: api::Migrated = c.post(api::PATH_MIGRATE, &mv(Some("m1"), None, "ps-b")).await.unwrap();
    assert_eq!(done.machines, vec!["m1".to_string()]);
    // The old server is told to drain it; the machine waits; the new one does not have it yet.
    let ra = beat(&c, &heartbeat("ps-a", 90.0, HealthLevel::Ok)).await;
    let m1a = ra.machines.iter().find(|m| m.name == "m1").unwrap();
    assert_eq!(m1a.state, MachineState::MovingAway);
    assert!(ra.machines.iter().filter(|m| m.name != "m1").all(|m| m.state == MachineState::Active));
    assert_eq!(assignment(&rig, "m1", &m1).await.unwrap_err().code(), Some("unavailable"));
    assert!(beat(&c, &heartbeat("ps-b", 50.0, HealthLevel::Ok)).await.machines.is_empty());
    let s = status(&c).await;
    let st = s.machines.iter().find(|m| m.name == "m1").unwrap();
    assert_eq!((st.ps.as_deref(), st.moving_to.as_deref()), (Some("ps-a"), Some("ps-b")));
    // Released by the old server (a release of a machine not moving is ignored).
    let mut hb = heartbeat("ps-a", 90.0, HealthLevel::Ok);
    hb.released = vec!["m1".into(), "m2".into()];
    let ra = beat(&c, &hb).await;
    assert_eq!(ra.machines.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["m2", "m3"]);
    let rb = beat(&c, &heartbeat("ps-b", 50.0, HealthLevel::Ok)).await;
    assert_eq!(rb.machines.len(), 1);
    assert_eq!((rb.machines[0].name.as_str(), rb.machines[0].state), ("m1", MachineState::Active));
    assert_eq!(rb.machines[0].credential, m1);
    assert_eq!(assignment(&rig, "m1", &m1).await.unwrap().ps, "ps-b");

    // A whole server.
    let done: api::Migrated = c.post(api::PATH_MIGRATE, &mv(None, Some("ps-a"), "ps-b")).await.unwrap();
    assert_eq!(done.machines, vec!["m2".to_string(), "m3".to_string()]);
    assert_eq!(assignment(&rig, "m2", &m2).await.unwrap_err().code(), Some("unavailable"));
    let mut hb = heartbeat("ps-a", 90.0, HealthLevel::Ok);
    hb.released = vec!["m2".into(), "m3".into()];
    assert!(beat(&c, &hb).await.machines.is_empty());
    assert_eq!(assignment(&rig, "m3", &m3).await.unwrap().ps, "ps-b");
    let e = c.post::<_, api::Migrated>(api::PATH_MIGRATE, &mv(Some("m3"), None, "ps-b")).await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "already there");
    rig.stop().await;
}

async fn purge_moves_machines_and_marks_resync_only_for_them(b: Backend) {
    let Some(rig) = CsRig::start(b, SHORT).await else { return };
    let c = rig.client();
    for id in ["ps-a", "ps-b", "ps-c"] {
        register_ps(&c, id, &rig.cs.cert_pem).await;
    }
    // ps-a the emptiest while m1 and m2 register; ps-b then takes m3.
    let live_a = keep_beating(rig.client(), heartbeat("ps-a", 99.0, HealthLevel::Ok));
    let live_b = keep_beating(rig.client(), heartbeat("ps-b", 60.0, HealthLevel::Ok));
    let live_c = keep_beating(rig.client(), heartbeat("ps-c", 10.0, HealthLevel::Ok));
    wait_until(WAIT, "all three connected", || {
        let c = c.clone();
        async move { status(&c).await.process_servers.iter().all(|p| p.state == PsState::Connected) }
    })
    .await;
    let m1 = register_machine(&c, "m1").await.unwrap();
    let _m2 = register_machine(&c, "m2").await.unwrap();
    assert_eq!(assignment(&rig, "m1", &m1).await.unwrap().ps, "ps-a");
    // Purging a connected server that has machines is refused: decommission it instead.
    let e = c
        .post::<_, api::Unregistered>(
            api::PATH_PS_UNREGISTER,
            &api::Unregister { ps: "ps-a".into(), purge: true, force: false },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("conflict"));
    assert!(e.to_string().contains("decommission"), "{e}");
    live_a.abort();
    let _ = live_a.await;
    // The one silent server goes disconnected; m3 now goes to ps-b.
    wait_until(WAIT, "ps-a disconnected", || {
        let c = c.clone();
        async move {
            status(&c).await.process_servers.iter().any(|p| p.id == "ps-a" && p.state == PsState::Disconnected)
        }
    })
    .await;
    let m3 = register_machine(&c, "m3").await.unwrap();
    assert_eq!(assignment(&rig, "m3", &m3).await.unwrap().ps, "ps-b");

    // Without purge: refused, naming its machines.
    let e = c
        .post::<_, api::Unregistered>(
            api::PATH_PS_UNREGISTER,
            &api::Unregister { ps: "ps-a".into(), purge: false, force: false },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("conflict"));
    assert!(e.to_string().contains("m1") && e.to_string().contains("m2"), "{e}");
    // Moving a machine off the dead server is refused too: purge is the way.
    let e = c
        .post::<_, api::Migrated>(
            api::PATH_MIGRATE,
            &api::Migrate { machine: Some("m1".into()), all_from: None, to: "ps-b".into() },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("purge"), "{e}");

    let u: api::Unregistered = c
        .post(api::PATH_PS_UNREGISTER, &api::Unregister { ps: "ps-a".into(), purge: true, force: false })
        .await
        .unwrap();
    assert_eq!(u.resync_required, vec!["m1".to_string(), "m2".to_string()]);
    assert_eq!(u.moved, vec![("m1".to_string(), "ps-b".to_string()), ("m2".to_string(), "ps-b".to_string())]);
    let s = status(&c).await;
    assert!(s.process_servers.iter().all(|p| p.id != "ps-a"));
    let m = |n: &str| s.machines.iter().find(|m| m.name == n).unwrap().clone();
    assert!(m("m1").resync_required && m("m2").resync_required);
    assert!(!m("m3").resync_required, "other machines unaffected");
    assert_eq!(m("m3").ps.as_deref(), Some("ps-b"));
    assert_eq!(assignment(&rig, "m1", &m1).await.unwrap().ps, "ps-b");
    // The new server is told to mark the disks; once it reports that, the flag clears.
    let mut hb = heartbeat("ps-b", 60.0, HealthLevel::Ok);
    let rb = beat(&c, &hb).await;
    let flags: Vec<(&str, bool)> = rb.machines.iter().map(|m| (m.name.as_str(), m.resync_required)).collect();
    assert_eq!(flags, vec![("m1", true), ("m2", true), ("m3", false)]);
    hb.resync_applied = vec!["m1".into(), "m2".into()];
    let rb = beat(&c, &hb).await;
    assert!(rb.machines.iter().all(|m| !m.resync_required));
    let e = c
        .post::<_, api::Unregistered>(
            api::PATH_PS_UNREGISTER,
            &api::Unregister { ps: "ps-a".into(), purge: true, force: false },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("not_found"));
    live_b.abort();
    live_c.abort();
    rig.stop().await;
}

async fn decommission_moves_machines_and_takes_no_new_ones(b: Backend) {
    let Some(rig) = CsRig::start(b, LONG).await else { return };
    let c = rig.client();
    register_ps(&c, "ps-a", &rig.cs.cert_pem).await;
    register_ps(&c, "ps-b", &rig.cs.cert_pem).await;
    register_ps(&c, "ps-empty", &rig.cs.cert_pem).await;
    beat(&c, &heartbeat("ps-a", 90.0, HealthLevel::Ok)).await;
    beat(&c, &heartbeat("ps-b", 20.0, HealthLevel::Ok)).await;
    let _m1 = register_machine(&c, "m1").await.unwrap();
    // Unregister without purge while it has machines: refused, naming them.
    let e = c
        .post::<_, api::Unregistered>(
            api::PATH_PS_UNREGISTER,
            &api::Unregister { ps: "ps-a".into(), purge: false, force: false },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("conflict"));
    assert!(e.to_string().contains("m1"), "{e}");
    // A server without machines just goes.
    let u: api::Unregistered = c
        .post(api::PATH_PS_UNREGISTER, &api::Unregister { ps: "ps-empty".into(), purge: false, force: false })
        .await
        .unwrap();
    assert!(u.moved.is_empty() && u.resync_required.is_empty());

    let d: api::Migrated = c.post(api::PATH_PS_DECOMMISSION, &api::Decommission { ps: "ps-a".into() }).await.unwrap();
    assert_eq!(d.machines, vec!["m1".to_string()]);
    let ra = beat(&c, &heartbeat("ps-a", 90.0, HealthLevel::Ok)).await;
    assert!(ra.decommissioning);
    assert_eq!(ra.machines[0].state, MachineState::MovingAway);
    // New machines avoid it although it is the emptiest.
    let m2 = register_machine(&c, "m2").await.unwrap();
    assert_eq!(assignment(&rig, "m2", &m2).await.unwrap().ps, "ps-b");
    let e = c
        .post::<_, api::Migrated>(
            api::PATH_MIGRATE,
            &api::Migrate { machine: Some("m2".into()), all_from: None, to: "ps-a".into() },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("conflict"));
    // ps-b cannot be decommissioned: nobody else can take m2 (nothing changes).
    let e = c
        .post::<_, api::Migrated>(api::PATH_PS_DECOMMISSION, &api::Decommission { ps: "ps-b".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unavailable"));
    assert!(e.to_string().contains("m2"), "{e}");
    assert!(!beat(&c, &heartbeat("ps-b", 20.0, HealthLevel::Ok)).await.decommissioning);
    // Drained and released: then it has nothing and can be unregistered.
    let mut hb = heartbeat("ps-a", 90.0, HealthLevel::Ok);
    hb.released = vec!["m1".into()];
    assert!(beat(&c, &hb).await.machines.is_empty());
    let _: api::Unregistered = c
        .post(api::PATH_PS_UNREGISTER, &api::Unregister { ps: "ps-a".into(), purge: false, force: false })
        .await
        .unwrap();
    let s = status(&c).await;
    assert_eq!(s.process_servers.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), vec!["ps-b"]);
    assert!(s.machines.iter().all(|m| m.ps.as_deref() == Some("ps-b") && m.moving_to.is_none()));
    rig.stop().await;
}
