//! The agent against a hostile or broken process server (a real TLS server on 127.0.0.1
//! that misbehaves in one way each): every case ends in a clear, typed error within the
//! agent's own time limits, never a hang. Each server stops when its test ends.

use std::path::Path;
use std::time::Duration;

use churnlog::agent::{Agent, AgentConfig, AgentError};
use churnlog::protocol::auth::{nonce, AuthKey};
use churnlog::protocol::codec::E_PROTOCOL;
use churnlog::protocol::{read_frame, write_frame, Frame, PointKind, PROTOCOL_VERSION};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const PASSPHRASE: &str = "hostile server test passphrase";

#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Completes TLS, then says nothing.
    SilentAfterTls,
    /// Answers the login with a MAC that proves nothing.
    BadMac,
    /// Sends a frame header announcing 2 GiB.
    OversizedFrame,
    /// Logs the agent in properly, then reads everything and acknowledges nothing.
    NeverAcknowledges,
    /// Sends something other than a challenge.
    WrongFrame,
    /// A server older than the delta resync: it logs the agent in and acknowledges what
    /// it knows, but answers `HashesRequest` as any unknown frame, with a protocol error
    /// and a close. Not hostile: the agent must fall back to a full copy.
    OlderServer,
}

/// A TLS server with the identity in `tls_dir`, misbehaving on every connection.
async fn serve(tls_dir: &Path, how: Misbehaviour) -> (String, tokio::task::JoinHandle<()>) {
    let (config, _) = churnlog::tls::server_config(tls_dir, &[]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            connections.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let (mut rd, mut wr) = tokio::io::split(tls);
                let mut buf = Vec::new();
                let Ok(Frame::Hello { machine, client_nonce, .. }) = read_frame(&mut rd, &mut buf).await else {
                    return;
                };
                let server_nonce = nonce();
                let challenge = Frame::Challenge { version: PROTOCOL_VERSION, server_nonce };
                match how {
                    Misbehaviour::SilentAfterTls => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Misbehaviour::OversizedFrame => {
                        let _ = wr.write_all(&(2u32 << 30).to_le_bytes()).await;
                        let _ = wr.flush().await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Misbehaviour::WrongFrame => {
                        let _ = write_frame(&mut wr, &Frame::Uploaded { point_id: 7 }).await;
                        let _ = wr.flush().await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Misbehaviour::OlderServer => {
                        let _ = write_frame(&mut wr, &challenge).await;
                        let _ = wr.flush().await;
                        let Ok(Frame::Auth { .. }) = read_frame(&mut rd, &mut buf).await else { return };
                        let key = AuthKey::from_passphrase(PASSPHRASE);
                        let mac = key.server_mac(&client_nonce, &server_nonce, &machine);
                        let _ = write_frame(&mut wr, &Frame::AuthOk { mac }).await;
                        let _ = wr.flush().await;
                        while let Ok(frame) = read_frame(&mut rd, &mut buf).await {
                            let tag = match frame {
                                Frame::HashesRequest { .. } => {
                                    let message = "refused: unexpected frame HashesRequest".to_string();
                                    let _ = write_frame(&mut wr, &Frame::Error { code: E_PROTOCOL, message }).await;
                                    let _ = wr.flush().await;
                                    return;
                                }
                                Frame::Write { tag, .. } | Frame::Zero { tag, .. } | Frame::Resync { tag, .. } => tag,
                                Frame::Point { tag, .. } => tag,
                                _ => continue,
                            };
                            let _ = write_frame(&mut wr, &Frame::Durable { upto_tag: tag }).await;
                            let _ = wr.flush().await;
                        }
                    }
                    Misbehaviour::BadMac | Misbehaviour::NeverAcknowledges => {
                        let _ = write_frame(&mut wr, &challenge).await;
                        let _ = wr.flush().await;
                        let Ok(Frame::Auth { .. }) = read_frame(&mut rd, &mut buf).await else { return };
                        let mac = if matches!(how, Misbehaviour::BadMac) {
                            [0u8; churnlog::protocol::MAC_LEN]
                        } else {
                            AuthKey::from_passphrase(PASSPHRASE).server_mac(&client_nonce, &server_nonce, &machine)
                        };
                        let _ = write_frame(&mut wr, &Frame::AuthOk { mac }).await;
                        let _ = wr.flush().await;
                        // Read (and drop) whatever comes; answer nothing.
                        while read_frame(&mut rd, &mut buf).await.is_ok() {}
                    }
                }
            });
        }
    });
    (addr, task)
}

fn agent(addr: String, cert_pem: String, disk: &Path) -> Agent {
    let mut cfg = AgentConfig::new(addr, cert_pem, "vm".into(), vec![("d0".into(), disk.to_path_buf())]);
    cfg.reconnect_timeout = Duration::from_secs(2);
    cfg.handshake_timeout = Duration::from_millis(500);
    cfg.ack_timeout = Duration::from_millis(500);
    cfg.silent_connections_max = 2;
    Agent::new(cfg, PASSPHRASE).unwrap()
}

/// One pass against a server misbehaving `how`; the error it ends with.
async fn pass_against(how: Misbehaviour) -> AgentError {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let (addr, server) = serve(&dir.path().join("tls"), how).await;
    let cert = std::fs::read_to_string(dir.path().join("tls").join("cert.pem")).unwrap();
    let mut agent = agent(addr, cert, &disk);
    let result =
        tokio::time::timeout(Duration::from_secs(30), agent.pass(PointKind::CrashConsistent, false, |_, _| {}))
            .await
            .expect("the agent gives up within its own limits");
    server.abort();
    result.expect_err("a pass against a hostile server cannot succeed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_certificate_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let (addr, server) = serve(&dir.path().join("impostor"), Misbehaviour::SilentAfterTls).await;
    // The agent trusts another identity, made for the real server.
    let (_, trusted) = churnlog::tls::server_config(&dir.path().join("real"), &[]).unwrap();
    let mut agent = agent(addr.clone(), trusted, &disk);
    let err = agent.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap_err();
    server.abort();
    assert!(matches!(err, AgentError::NotTrusted(ref a, _) if *a == addr), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_silent_after_tls_is_unreachable_within_the_limits() {
    let err = pass_against(Misbehaviour::SilentAfterTls).await;
    assert!(matches!(err, AgentError::Unreachable(_, ref why) if why.contains("no complete login")), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_prove_the_passphrase_is_refused() {
    let err = pass_against(Misbehaviour::BadMac).await;
    assert!(matches!(err, AgentError::BadServer(ref why) if why.contains("passphrase")), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_from_the_server_is_a_protocol_error() {
    let err = pass_against(Misbehaviour::OversizedFrame).await;
    assert!(matches!(err, AgentError::BadServer(ref why) if why.contains("frame length")), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_frame_in_the_login_is_a_protocol_error() {
    let err = pass_against(Misbehaviour::WrongFrame).await;
    assert!(matches!(err, AgentError::BadServer(ref why) if why.contains("challenge")), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_acknowledges_nothing_is_given_up_on() {
    let err = pass_against(Misbehaviour::NeverAcknowledges).await;
    assert!(matches!(err, AgentError::Unresponsive(2, _)), "{err:?}");
}

/// An older server that does not know the delta resync: an agent without block state
/// asks it for hashes, gets the protocol error an unknown frame earns, and copies the
/// disk in full on a new connection instead of stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_older_than_the_delta_resync_gets_a_full_copy() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let (addr, server) = serve(&dir.path().join("tls"), Misbehaviour::OlderServer).await;
    let cert = std::fs::read_to_string(dir.path().join("tls").join("cert.pem")).unwrap();
    let mut agent = agent(addr, cert, &disk);
    let report =
        tokio::time::timeout(Duration::from_secs(30), agent.pass(PointKind::CrashConsistent, false, |_, _| {}))
            .await
            .expect("the pass ends within its limits")
            .expect("a full copy instead of the delta resync");
    server.abort();
    assert_eq!((report.full_copies, report.delta_resyncs), (1, 0), "{report:?}");
    assert_eq!(report.bytes_sent, 1 << 20, "the whole disk: {report:?}");
}
