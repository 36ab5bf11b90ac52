//! The agent against the real configuration server (in process, SQLite) and a process
//! server linked to it: registration, the taken name and its release by `reassign`,
//! waiting while no server can take the machine, then replication with the machine's
//! own credential through the server the CS assigns.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use churnlog::agent::credential::{load_or_register, CsSettings};
use churnlog::agent::{Agent, AgentConfig, AgentError, Locator};
use churnlog::control::api;
use churnlog::control::auth::Principal;
use churnlog::control::client::CsClient;
use churnlog::control::cs::{ConfigServer, CsConfig};
use churnlog::control::ps_link::LinkConfig;
use churnlog::ingest::IngestConfig;
use churnlog::process_server::{ProcessServer, ProcessServerConfig};
use churnlog::protocol::auth::AuthKey;
use churnlog::protocol::PointKind;
use churnlog::store::Target;

use common::rig::image;

const PASSPHRASE: &str = "a passphrase of more than sixteen";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_registers_waits_for_a_server_and_replicates_with_its_credential() {
    let dir = tempfile::tempdir().unwrap();
    let cs = ConfigServer::start(CsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: dir.path().join("cs.db").display().to_string(),
        passphrase: PASSPHRASE.into(),
        tls_dir: dir.path().join("cs-tls"),
        tls_names: vec![],
        heartbeat_timeout: Duration::from_secs(600),
    })
    .await
    .unwrap();
    let cs_address = cs.local_addr.to_string();
    let operator =
        CsClient::new(&cs_address, &cs.cert_pem, Principal::Passphrase, AuthKey::from_passphrase(PASSPHRASE)).unwrap();
    let disk = dir.path().join("d0.img");
    image(&disk, 2 << 20, 11);

    let state = dir.path().join("agent-state");
    let settings = CsSettings {
        address: &cs_address,
        cert_pem: &cs.cert_pem,
        passphrase: Some(PASSPHRASE),
        machine: "vm-1",
        state_dir: &state,
    };
    let id = load_or_register(&settings).await.unwrap();
    assert!(id.registered_now);

    // The name is taken: another machine is refused until an operator releases it.
    let other_state = dir.path().join("other-state");
    let other = CsSettings { state_dir: &other_state, ..settings };
    let err = load_or_register(&other).await.unwrap_err();
    assert!(matches!(err, AgentError::NameTaken { .. }), "{err:?}");

    // No process server yet: the CS says "unavailable" and the agent waits for one,
    // giving up when its (short here) reconnect timeout is over.
    let agent_cfg = |client: CsClient, reconnect: Duration| {
        let mut cfg =
            AgentConfig::with_locator(Locator::Cs { client }, "vm-1".into(), vec![("d0".into(), disk.clone())]);
        cfg.reconnect_timeout = reconnect;
        cfg.handshake_timeout = Duration::from_secs(5);
        cfg
    };
    let mut waiting = Agent::with_key(agent_cfg(id.client.clone(), Duration::from_secs(2)), id.key.clone()).unwrap();
    let err = waiting.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap_err();
    assert!(matches!(&err, AgentError::Unreachable(_, why) if why.contains("unavailable")), "{err:?}");

    // A process server linked to the CS: it learns vm-1's credential from its heartbeat
    // replies, and the agent logs in with that credential, not the passphrase.
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let ingest = IngestConfig::new(listen, dir.path().join("ps-tls"), PASSPHRASE);
    let mut ps_cfg =
        ProcessServerConfig::new(dir.path().join("cache"), 1 << 30, ingest, Target::from_url(&store, None).unwrap());
    ps_cfg.cache.segment_size = 16 << 20;
    ps_cfg.control.link = Some(LinkConfig {
        cs_address: cs_address.clone(),
        cs_cert_pem: cs.cert_pem.clone(),
        ps_id: "ps-a".into(),
        advertise_address: listen.to_string(),
        heartbeat_interval: Duration::from_secs(1),
        key: AuthKey::from_passphrase(PASSPHRASE),
    });
    // The host's load (a compiler on the same cores) must not make this, the only
    // server, critical and so refuse the machine.
    ps_cfg.control.thresholds.cpu_warning_percent = 100.0;
    ps_cfg.control.thresholds.cpu_critical_percent = 100.0;
    ps_cfg.control.thresholds.memory_warning_percent = 100.0;
    ps_cfg.control.thresholds.memory_critical_percent = 100.0;
    let ps = ProcessServer::start(ps_cfg).await.unwrap();

    let mut agent = Agent::with_key(agent_cfg(id.client.clone(), Duration::from_secs(60)), id.key.clone()).unwrap();
    let p1 = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!(p1.full_copies, 1, "{p1:?}");
    assert_eq!(agent.process_server(), Some(listen.to_string().as_str()));
    let p2 = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!((p2.full_copies, p2.blocks_sent), (0, 0), "nothing changed: {p2:?}");

    // Released by the operator, the name can be registered by the other machine.
    let _: api::Reassign =
        operator.post(api::PATH_MACHINE_REASSIGN, &api::Reassign { name: "vm-1".into() }).await.unwrap();
    assert!(load_or_register(&other).await.unwrap().registered_now);

    drop(agent);
    drop(waiting);
    ps.stop().await.unwrap();
    cs.stop().await;
}
