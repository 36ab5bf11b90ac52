//! The agent following a configuration server (CS): registration and its credential
//! file, the assignment asked before every connection, a CS outage while the process
//! server works, and a move between process servers that costs no full copy on the
//! agent's side.
//!
//! The CS here is a small stand-in speaking the real API (paths, bodies, request
//! signatures, error codes) over HTTPS, so these tests need no configuration server
//! implementation; it hands out the passphrase's key as the machine's credential, so
//! that the standalone process servers of the test rig accept the agent's login.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use churnlog::agent::credential::{credential_path, load_or_register, CsSettings};
use churnlog::agent::{Agent, AgentConfig, AgentError, Locator};
use churnlog::control::api::{self, ApiError, Assignment, MachineRegistered, MachineRegistration};
use churnlog::control::auth::{self, Principal};
use churnlog::control::client::{ClientError, CsClient};
use churnlog::protocol::auth::AuthKey;
use churnlog::protocol::PointKind;

use common::rig::{image, Rig, PASSPHRASE};

/// Every bounded wait in this file.
const WAIT_MAX: Duration = Duration::from_secs(60);

enum Answer {
    Assign(Assignment),
    Unavailable,
}

struct CsState {
    credentials: HashMap<String, [u8; 32]>,
    answer: Answer,
    registrations: u64,
    unavailable_answers: u64,
}

type Shared = Arc<Mutex<CsState>>;

fn refuse(code: &str, msg: &str) -> Response {
    let e = ApiError::new(code, msg);
    (StatusCode::from_u16(e.status()).unwrap(), Json(e)).into_response()
}

async fn handle(State(st): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let Some(sig) = headers.get("authorization").and_then(|h| h.to_str().ok()).and_then(|h| auth::parse(h).ok()) else {
        return refuse("unauthorized", "no signature");
    };
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let mut st = st.lock().unwrap();
    match (method.as_str(), uri.path()) {
        ("POST", api::PATH_MACHINE_REGISTER) => {
            let key = AuthKey::from_passphrase(PASSPHRASE);
            if sig.principal != Principal::Passphrase || sig.verify(&key, "POST", path, &body).is_err() {
                return refuse("unauthorized", "authentication failed");
            }
            let Ok(reg) = serde_json::from_slice::<MachineRegistration>(&body) else {
                return refuse("bad_request", "bad body");
            };
            if st.credentials.contains_key(&reg.name) {
                return refuse("conflict", &format!("machine {} is registered to another machine", reg.name));
            }
            // The passphrase's key as the credential: the rig's standalone servers
            // check logins with it.
            st.credentials.insert(reg.name, *key.as_bytes());
            st.registrations += 1;
            Json(MachineRegistered { credential: hex::encode(key.as_bytes()) }).into_response()
        }
        ("GET", api::PATH_MACHINE_ASSIGNMENT) => {
            let Principal::Machine(name) = &sig.principal else {
                return refuse("unauthorized", "not a machine");
            };
            let Some(cred) = st.credentials.get(name) else {
                return refuse("unauthorized", "unknown machine");
            };
            if sig.verify(&AuthKey::from_bytes(*cred), "GET", path, &body).is_err() {
                return refuse("unauthorized", "authentication failed");
            }
            match &st.answer {
                Answer::Assign(a) => Json(a.clone()).into_response(),
                Answer::Unavailable => {
                    st.unavailable_answers += 1;
                    refuse("unavailable", "moving between process servers")
                }
            }
        }
        _ => refuse("not_found", "no such endpoint"),
    }
}

/// The stand-in CS: HTTPS on 127.0.0.1; `stop` closes the listener and every connection
/// (the agent's pooled ones included), `restart` listens on the same port again.
struct FakeCs {
    addr: SocketAddr,
    address: String,
    cert_pem: String,
    tls: Arc<rustls::ServerConfig>,
    state: Shared,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl FakeCs {
    async fn start(answer: Answer) -> FakeCs {
        let dir = tempfile::tempdir().unwrap();
        let (tls, cert_pem) = churnlog::tls::server_config(&dir.path().join("tls"), &[]).unwrap();
        let state = Arc::new(Mutex::new(CsState {
            credentials: HashMap::new(),
            answer,
            registrations: 0,
            unavailable_answers: 0,
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cs = FakeCs { addr, address: addr.to_string(), cert_pem, tls, state, task: None, _dir: dir };
        cs.serve(listener);
        cs
    }

    fn serve(&mut self, listener: TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let app = axum::Router::new().fallback(handle).with_state(self.state.clone());
        self.task = Some(tokio::spawn(async move {
            // Dropped with this task: aborting it ends every connection too.
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                while conns.try_join_next().is_some() {}
                let (acceptor, app) = (acceptor.clone(), app.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        }));
    }

    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.expect("the CS's port again");
        self.serve(listener);
    }

    fn set(&self, answer: Answer) {
        self.state.lock().unwrap().answer = answer;
    }

    fn settings<'a>(&'a self, passphrase: Option<&'a str>, state_dir: &'a Path) -> CsSettings<'a> {
        CsSettings { address: &self.address, cert_pem: &self.cert_pem, passphrase, machine: "vm-1", state_dir }
    }
}

/// A TCP forwarder in front of a process server, whose live connections a test can cut
/// while it keeps listening.
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    live: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, live2) = (cut.clone(), live.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut down, _)) = listener.accept().await else { return };
                while conns.try_join_next().is_some() {}
                let mut rx = tx.subscribe();
                let live = live2.clone();
                live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                conns.spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = rx.changed() => {}
                        }
                    }
                    live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Proxy { addr, cut, live, task }
    }

    /// Cuts every live connection and waits until they are gone.
    async fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
        wait_until("the proxy's connections are cut", || self.live.load(std::sync::atomic::Ordering::SeqCst) == 0)
            .await;
    }

    fn stop(self) {
        self.task.abort();
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT_MAX:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Overwrites `n` distinct 64 KiB blocks with fresh random data (never zeros, never
/// what was there): exactly `n` blocks change.
fn rewrite(path: &Path, n: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / (64 << 10);
    assert!(n <= blocks / 3);
    let mut block = vec![0u8; 64 << 10];
    for i in 0..n {
        common::rig::fill(&mut block, seed.wrapping_mul(1_000_003) ^ i);
        f.write_all_at(&block, (i * 3 + seed % 3) * (64 << 10)).unwrap();
    }
}

fn agent_for(client: CsClient, key: AuthKey, disk: &Path, reconnect_timeout: Duration) -> Agent {
    let mut cfg = AgentConfig::with_locator(Locator::Cs { client }, "vm-1".into(), vec![("d0".into(), disk.into())]);
    cfg.reconnect_timeout = reconnect_timeout;
    cfg.handshake_timeout = Duration::from_secs(5);
    cfg.refusal_grace = Duration::from_secs(5);
    Agent::with_key(cfg, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_keeps_a_private_credential_and_refuses_a_taken_name() {
    let cs = FakeCs::start(Answer::Unavailable).await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let settings = cs.settings(Some(PASSPHRASE), &state);

    // A wrong passphrase registers nothing and leaves no credential behind.
    let wrong = cs.settings(Some("not the passphrase at all"), &state);
    let err = load_or_register(&wrong).await.unwrap_err();
    assert!(matches!(&err, AgentError::Cs(ClientError::Refused(e)) if e.code == "unauthorized"), "{err:?}");
    assert!(!credential_path(&state).exists());

    let first = load_or_register(&settings).await.unwrap();
    assert!(first.registered_now);
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    let cred = credential_path(&state);
    assert_eq!(std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777, 0o600);

    // The next run reuses it, needing no passphrase and asking nothing of the CS.
    let again = cs.settings(None, &state);
    let second = load_or_register(&again).await.unwrap();
    assert!(!second.registered_now);
    assert_eq!(second.key.as_bytes(), first.key.as_bytes());
    assert_eq!(cs.state.lock().unwrap().registrations, 1);

    // Another machine (another state directory) under the same name: a typed refusal
    // that tells the operator what to do.
    let other_state = work.path().join("other");
    let other = CsSettings { state_dir: &other_state, ..settings };
    let err = load_or_register(&other).await.unwrap_err();
    assert!(matches!(&err, AgentError::NameTaken { machine, .. } if machine == "vm-1"), "{err:?}");
    assert!(err.to_string().contains("churnlog cs reassign --machine vm-1"), "{err}");
    assert!(!credential_path(&other_state).exists());

    // A malformed credential file is an error, not a silent re-registration.
    std::fs::write(&cred, "not hex\n").unwrap();
    let err = load_or_register(&again).await.unwrap_err();
    assert!(matches!(err, AgentError::Credential { .. }), "{err:?}");
    assert_eq!(cs.state.lock().unwrap().registrations, 1);
    let mut cs = cs;
    cs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_follows_its_assignment_through_a_cs_outage_and_a_move() {
    let rig_a = Rig::start(Duration::from_secs(120)).await;
    let rig_b = Rig::start(Duration::from_secs(120)).await;
    let proxy_a = Proxy::start(rig_a.server.local_addr).await;
    let on_a =
        Assignment { ps: "ps-a".into(), address: proxy_a.addr.to_string(), cert_pem: rig_a.server.cert_pem.clone() };
    let mut cs = FakeCs::start(Answer::Assign(on_a)).await;
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("d0.img");
    image(&disk, 4 << 20, 5);
    let state = work.path().join("state");
    let id = load_or_register(&cs.settings(Some(PASSPHRASE), &state)).await.unwrap();

    // A credential the CS does not know is final at once, not retried for the whole
    // reconnect timeout.
    let stranger = AuthKey::from_bytes([3; 32]);
    let mut bad = agent_for(
        id.client.as_principal(Principal::Machine("vm-1".into()), stranger.clone()),
        stranger,
        &disk,
        WAIT_MAX,
    );
    let err = bad.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap_err();
    assert!(matches!(&err, AgentError::Cs(ClientError::Refused(e)) if e.code == "unauthorized"), "{err:?}");

    let mut agent = agent_for(id.client.clone(), id.key.clone(), &disk, WAIT_MAX);
    assert_eq!(agent.process_server(), None, "nothing assigned before the CS is asked");
    let p1 = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert_eq!(p1.full_copies, 1, "{p1:?}");
    assert_eq!(agent.process_server(), Some(proxy_a.addr.to_string().as_str()));

    // The CS goes away and the connection to A breaks: the agent reconnects to A from
    // its last assignment and sends only what changed.
    cs.stop().await;
    proxy_a.cut().await;
    rewrite(&disk, 5, 1);
    let p2 = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
    assert!(p2.reconnects >= 1, "{p2:?}");
    assert_eq!((p2.full_copies, p2.blocks_sent, p2.zero_runs_sent), (0, 5, 0), "{p2:?}");

    // Without any assignment yet, an unreachable CS is an error once the reconnect
    // timeout is over (bounded, not a hang).
    let mut fresh = agent_for(id.client.clone(), id.key.clone(), &disk, Duration::from_secs(2));
    let err = fresh.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap_err();
    assert!(matches!(err, AgentError::Unreachable(..)), "{err:?}");

    // The move: the CS says "unavailable" while the machine moves, A goes away; the
    // agent waits, then reconnects to B when the CS names it, and resends what A never
    // acknowledged: the changed blocks only.
    cs.restart().await;
    cs.set(Answer::Unavailable);
    let rig_a_writes = rig_a.server.status().writes;
    rig_a.stop().await;
    rewrite(&disk, 7, 2);
    let moving = tokio::spawn(async move {
        let r = agent.pass(PointKind::CrashConsistent, false, |_, _| {}).await;
        (agent, r)
    });
    wait_until("the agent asks the CS during the move", || cs.state.lock().unwrap().unavailable_answers >= 2).await;
    assert_eq!(rig_b.server.status().sessions, 0, "nothing reached B before the CS named it");
    cs.set(Answer::Assign(Assignment {
        ps: "ps-b".into(),
        address: rig_b.server.local_addr.to_string(),
        cert_pem: rig_b.server.cert_pem.clone(),
    }));
    let (agent, p3) = tokio::time::timeout(WAIT_MAX, moving).await.expect("the pass ends").unwrap();
    let p3 = p3.unwrap();
    assert_eq!((p3.full_copies, p3.blocks_sent, p3.zero_runs_sent), (0, 7, 0), "no full copy for a move: {p3:?}");
    assert_eq!(agent.process_server(), Some(rig_b.server.local_addr.to_string().as_str()));
    let b = rig_b.server.status();
    assert!(b.sessions >= 1 && b.writes >= 7, "B received the changed blocks: {b:?} (A had {rig_a_writes})");

    drop(agent);
    cs.stop().await;
    proxy_a.stop();
    rig_b.stop().await;
}
