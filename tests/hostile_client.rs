//! Hostile clients against an in-process server (loopback, real TLS): each case gets the
//! exact error frame or close it must, and a well-behaved agent keeps replicating,
//! byte-identical, while an attack runs. Attackers connect from other loopback addresses
//! (127.0.0.2, ...) than the agent (127.0.0.1), as a real attacker would, so that the
//! per-address limits can be seen to spare the agent.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use churnlog::cache::Cache;
use churnlog::ingest::{IngestConfig, IngestStats};
use churnlog::process_server::{ProcessServer, ProcessServerConfig};
use churnlog::protocol::auth::{nonce, AuthKey};
use churnlog::protocol::codec::{E_AUTH, E_PROTOCOL, E_VERSION};
use churnlog::protocol::{read_frame, Frame, PointKind, FRAME_LEN_MAX, PROTOCOL_VERSION};
use churnlog::restore::{restore, PointSelector};
use churnlog::store::Target;
use common::rig::{churn, image, PASSPHRASE};
use tokio::io::AsyncWriteExt;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// An in-process process server (cache, ingest, optionally the drain) with an ingest
/// config the test chooses.
struct Server {
    dir: tempfile::TempDir,
    server: ProcessServer,
    cache: Arc<Cache>,
    target: Target,
}

impl Server {
    async fn start(drain: bool, edit: impl FnOnce(&mut IngestConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = IngestConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("tls"), PASSPHRASE);
        cfg.handshake_timeout = Duration::from_secs(30);
        cfg.idle_timeout = Duration::from_secs(60);
        edit(&mut cfg);
        let target = Target::from_url(&format!("file://{}", dir.path().join("store").display()), None).unwrap();
        let mut ps = ProcessServerConfig::new(dir.path().join("cache"), 1 << 30, cfg, target.clone());
        ps.cache.segment_size = 16 << 20;
        ps.cache.tail_cache_bytes = churnlog::cache::Options::default().tail_cache_bytes;
        let mut server = ProcessServer::start(ps).await.unwrap();
        if !drain {
            server.pause_drain().await.unwrap();
        }
        let cache = server.cache().clone();
        Server { dir, server, cache, target }
    }

    fn stats(&self) -> &IngestStats {
        &self.server.stats
    }

    async fn tcp_from(&self, from: IpAddr) -> std::io::Result<tokio::net::TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        socket.connect(self.server.local_addr).await
    }

    async fn tls_from(&self, from: IpAddr) -> std::io::Result<Tls> {
        let tcp = self.tcp_from(from).await?;
        self.tls_over(tcp).await
    }

    async fn tls_over(&self, tcp: tokio::net::TcpStream) -> std::io::Result<Tls> {
        let connector = tokio_rustls::TlsConnector::from(churnlog::tls::client_config(&self.server.cert_pem).unwrap());
        connector.connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp).await
    }

    /// A logged-in session of `machine` from 127.0.0.1.
    async fn login(&self, machine: &str) -> Tls {
        let mut s = self.tls_from(LOCAL).await.unwrap();
        login_on(&mut s, machine, PASSPHRASE).await.expect("logged in");
        s
    }

    /// Stops the server and closes its cache: fails if a session (or its acknowledger)
    /// still holds the cache once stopped.
    async fn stop(self) {
        let Server { dir, server, cache, .. } = self;
        drop(cache);
        server.stop().await.expect("the server stops and closes its cache");
        drop(dir);
    }
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

fn attacker(n: u8) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, n))
}

fn bytes(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out);
    out
}

async fn send(s: &mut Tls, frames: &[Frame]) {
    let mut out = Vec::new();
    for f in frames {
        f.encode(&mut out);
    }
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();
}

/// Logs in on `s`; the frame that ended the login otherwise.
async fn login_on(s: &mut Tls, machine: &str, passphrase: &str) -> Result<(), Option<Frame>> {
    let key = AuthKey::from_passphrase(passphrase);
    let client_nonce = nonce();
    send(s, &[Frame::Hello { version: PROTOCOL_VERSION, machine: machine.into(), client_nonce }]).await;
    let mut buf = Vec::new();
    let server_nonce = match read_frame(s, &mut buf).await {
        Ok(Frame::Challenge { server_nonce, .. }) => server_nonce,
        other => return Err(other.ok()),
    };
    send(s, &[Frame::Auth { mac: key.client_mac(&client_nonce, &server_nonce, machine) }]).await;
    match read_frame(s, &mut buf).await {
        Ok(Frame::AuthOk { .. }) => Ok(()),
        other => Err(other.ok()),
    }
}

/// Reads until the server closes the connection; returns what it sent. Panics if it is
/// still open after 10 s (every timeout of these servers is longer).
async fn until_closed(s: &mut Tls) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut buf = Vec::new();
    let read_all = async {
        while let Ok(f) = read_frame(s, &mut buf).await {
            frames.push(f);
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), read_all).await.is_err() {
        panic!("the server did not close the connection");
    }
    frames
}

/// The session ends with exactly this error frame (after any acknowledgements).
async fn refused(s: &mut Tls, code: u16, message: &str) {
    let frames = until_closed(s).await;
    let last = frames.iter().rfind(|f| !matches!(f, Frame::Durable { .. } | Frame::Uploaded { .. }));
    assert_eq!(last, Some(&Frame::Error { code, message: message.into() }), "{frames:?}");
}

fn open(disk: u16, size_bytes: u64, name: &str) -> Frame {
    Frame::OpenDisk { disk, size_bytes, name: name.into() }
}

fn write(disk: u16, tag: u64, offset: u64, len: usize) -> Frame {
    Frame::Write { disk, tag, offset, data: vec![0xAB; len].into() }
}

/// One of every frame type, with tag 1 and disk 0 where they have them.
fn every_frame() -> Vec<Frame> {
    vec![
        Frame::Hello { version: PROTOCOL_VERSION, machine: "m".into(), client_nonce: [1; 32] },
        Frame::Challenge { version: PROTOCOL_VERSION, server_nonce: [2; 32] },
        Frame::Auth { mac: [3; 32] },
        Frame::AuthOk { mac: [4; 32] },
        open(0, 1 << 20, "d"),
        write(0, 1, 0, 16),
        Frame::Zero { disk: 0, tag: 1, offset: 0, len: 4096 },
        Frame::Point { tag: 1, point_id: 1, kind: PointKind::CrashConsistent, unix_ms: 1, disks: vec![(0, 1 << 20)] },
        Frame::Resync { disk: 0, tag: 1 },
        Frame::Durable { upto_tag: 1 },
        Frame::Uploaded { point_id: 1 },
        Frame::ResyncRequired { disk: 0 },
        Frame::PointLost { point_id: 1 },
        Frame::Backpressure { retry_after_ms: 100 },
        Frame::Error { code: 3, message: "no".into() },
        Frame::HashesRequest { disk: 0, block_size: 65536 },
        Frame::Hashes { disk: 0, first_block: 0, hashes: vec![1] },
        Frame::HashesEnd { disk: 0, blocks: 1, head_seq: 1 },
        Frame::HashesPending { disk: 0 },
        Frame::HashesUnavailable { disk: 0, reason: "no".into() },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_type_in_the_wrong_state_is_refused() {
    let server = Server::start(false, |_| {}).await;
    let frames = every_frame();
    // Before Hello: anything else closes the connection without a word.
    for f in frames.iter().filter(|f| !matches!(f, Frame::Hello { .. })) {
        let mut s = server.tls_from(LOCAL).await.unwrap();
        send(&mut s, std::slice::from_ref(f)).await;
        assert_eq!(until_closed(&mut s).await, vec![], "{} instead of Hello", f.name());
    }
    // After Hello, anything but Auth: the Challenge, then the close.
    for f in frames.iter().filter(|f| !matches!(f, Frame::Auth { .. })) {
        let mut s = server.tls_from(LOCAL).await.unwrap();
        let hello = Frame::Hello { version: PROTOCOL_VERSION, machine: "m".into(), client_nonce: nonce() };
        send(&mut s, &[hello, f.clone()]).await;
        let got = until_closed(&mut s).await;
        assert!(matches!(got.as_slice(), [Frame::Challenge { .. }]), "{} instead of Auth: {got:?}", f.name());
    }
    assert_eq!(server.stats().protocol_errors.load(Ordering::Relaxed), 19 + 19);
    // After login, every frame an agent does not send is refused by name.
    let agent_frames = ["OpenDisk", "Write", "Zero", "Point", "Resync", "HashesRequest"];
    for f in frames.iter().filter(|f| !agent_frames.contains(&f.name())) {
        let mut s = server.login("m").await;
        send(&mut s, std::slice::from_ref(f)).await;
        refused(&mut s, E_PROTOCOL, &format!("refused: unexpected frame {}", f.name())).await;
    }
    assert_eq!(server.stats().auth_failures.load(Ordering::Relaxed), 0);
    server.stop().await;
}

/// Only the newest session of a machine appends to a disk it opened: a session left
/// behind (a killed agent's, or one its agent reconnected away from) is refused, so it
/// cannot add records under the new one. A hashes request names an opened disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_of_the_machine_supersedes_the_older_one() {
    let server = Server::start(false, |_| {}).await;
    let mut old = server.login("m").await;
    send(&mut old, &[open(0, 1 << 20, "d"), write(0, 1, 0, 16)]).await;
    let mut buf = Vec::new();
    assert_eq!(read_frame(&mut old, &mut buf).await.unwrap(), Frame::Durable { upto_tag: 1 });
    let mut new = server.login("m").await;
    send(&mut new, &[open(0, 1 << 20, "d"), write(0, 1, 4096, 16)]).await;
    assert_eq!(read_frame(&mut new, &mut buf).await.unwrap(), Frame::Durable { upto_tag: 1 });
    send(&mut old, &[write(0, 2, 8192, 16)]).await;
    let message = "refused: a newer session of this machine opened disk d (one agent per machine; a reconnected agent resends on its new session)";
    refused(&mut old, E_PROTOCOL, message).await;
    // The new session goes on; a hashes request for a disk it did not open is refused.
    send(&mut new, &[write(0, 2, 8192, 16)]).await;
    assert_eq!(read_frame(&mut new, &mut buf).await.unwrap(), Frame::Durable { upto_tag: 2 });
    send(&mut new, &[Frame::HashesRequest { disk: 5, block_size: 65536 }]).await;
    refused(&mut new, E_PROTOCOL, "refused: hashes request on unopened disk 5").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_rules_are_enforced_with_exact_errors() {
    let server = Server::start(false, |_| {}).await;
    const MIB: u64 = 1 << 20;
    let cases: Vec<(Vec<Frame>, u16, String)> = vec![
        (vec![open(0, MIB, "d"), write(0, 0, 0, 16)], E_PROTOCOL, "refused: tag 0 after 0: tags must increase".into()),
        (
            vec![open(0, MIB, "d"), write(0, 5, 0, 16), Frame::Zero { disk: 0, tag: 5, offset: 0, len: 1 }],
            E_PROTOCOL,
            "refused: tag 5 after 5: tags must increase".into(),
        ),
        (vec![open(0, MIB, "d"), write(7, 1, 0, 16)], E_PROTOCOL, "refused: write on unopened disk 7".into()),
        (
            vec![Frame::Zero { disk: 7, tag: 1, offset: 0, len: 1 }],
            E_PROTOCOL,
            "refused: zero run on unopened disk 7".into(),
        ),
        (
            vec![
                open(0, MIB, "d"),
                Frame::Point {
                    tag: 1,
                    point_id: 1,
                    kind: PointKind::CrashConsistent,
                    unix_ms: 1,
                    disks: vec![(0, MIB), (7, MIB)],
                },
            ],
            E_PROTOCOL,
            "refused: point on unopened disk 7".into(),
        ),
        (vec![Frame::Resync { disk: 7, tag: 1 }], E_PROTOCOL, "refused: resync on unopened disk 7".into()),
        ((0..=64).map(|i| open(i, MIB, &format!("d{i}"))).collect(), E_PROTOCOL, "refused: more than 64 disks".into()),
        // One record past the end would make every later point of the disk unrestorable.
        (
            vec![open(0, MIB, "d"), write(0, 1, MIB - 4095, 4096)],
            E_PROTOCOL,
            "refused: write past the disk's end: disk 0, offset 1044481 + length 4096 > size 1048576".into(),
        ),
        (
            vec![open(0, MIB, "d"), Frame::Zero { disk: 0, tag: 1, offset: MIB, len: 1 }],
            E_PROTOCOL,
            "refused: zero run past the disk's end: disk 0, offset 1048576 + length 1 > size 1048576".into(),
        ),
        // offset + length overflows u64.
        (
            vec![open(0, u64::MAX, "d"), Frame::Zero { disk: 0, tag: 1, offset: u64::MAX, len: 2 }],
            E_PROTOCOL,
            format!(
                "refused: zero run past the disk's end: disk 0, offset {} + length 2 > size {}",
                u64::MAX,
                u64::MAX
            ),
        ),
        (
            vec![open(0, u64::MAX, "d"), write(0, 1, u64::MAX - 1, 16)],
            E_PROTOCOL,
            format!(
                "refused: write past the disk's end: disk 0, offset {} + length 16 > size {}",
                u64::MAX - 1,
                u64::MAX
            ),
        ),
        (
            vec![
                open(0, MIB, "d"),
                write(0, 1, MIB - 16, 16),
                Frame::Point {
                    tag: 2,
                    point_id: 1,
                    kind: PointKind::CrashConsistent,
                    unix_ms: 1,
                    disks: vec![(0, 4096)],
                },
            ],
            E_PROTOCOL,
            "refused: point gives disk 0 size 4096, below data written up to 1048576".into(),
        ),
    ];
    for (i, (frames, code, message)) in cases.iter().enumerate() {
        let mut s = server.login(&format!("rules{i}")).await;
        send(&mut s, frames).await;
        refused(&mut s, *code, message).await;
    }
    // An empty write: the frame itself is malformed (the encoder never makes one).
    let mut s = server.login("empty").await;
    let mut empty = bytes(&write(0, 1, 0, 1));
    empty.pop();
    let len = u32::from_le_bytes(empty[..4].try_into().unwrap()) - 1;
    empty[..4].copy_from_slice(&len.to_le_bytes());
    send(&mut s, &[open(0, MIB, "d")]).await;
    s.write_all(&empty).await.unwrap();
    s.flush().await.unwrap();
    refused(&mut s, E_PROTOCOL, "frame: bad field: write data length").await;
    // A wrong protocol version: told which one is spoken, then closed.
    let mut s = server.tls_from(LOCAL).await.unwrap();
    send(&mut s, &[Frame::Hello { version: 1, machine: "old".into(), client_nonce: nonce() }]).await;
    let message = format!("protocol {PROTOCOL_VERSION} only");
    assert_eq!(until_closed(&mut s).await, vec![Frame::Error { code: E_VERSION, message }]);
    // Nothing refused reached the cache: no record past a disk's end, no Point record.
    for info in server.cache.streams() {
        let want = u64::from(info.machine == "rules1" || info.machine == "rules11");
        assert_eq!(info.durable_upto, want, "{info:?}");
    }
    server.stop().await;
}

/// Re-opening one index under ever new names must not create streams without end: each
/// new stream rewrites META, and the cache's 65,536 streams, once used up, block every
/// new disk of every machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_reopening_flood_is_bounded_per_session_and_per_machine() {
    let server = Server::start(false, |cfg| cfg.machine_streams_max = 100).await;
    let mut s = server.login("flood").await;
    send(&mut s, &(0..=64).map(|i| open(0, 1 << 20, &format!("n{i}"))).collect::<Vec<_>>()).await;
    refused(&mut s, E_PROTOCOL, "refused: more than 64 disk names in one session").await;
    // A second session of the machine reaches the machine's quota.
    let mut s = server.login("flood").await;
    send(&mut s, &(0..64).map(|i| open(0, 1 << 20, &format!("m{i}"))).collect::<Vec<_>>()).await;
    refused(&mut s, E_PROTOCOL, "refused: machine \"flood\" has 100 disk streams already").await;
    let flooded = server.cache.streams().iter().filter(|i| i.machine == "flood").count();
    assert_eq!(flooded, 100);
    // Its existing streams still open; other machines still get new disks.
    let mut s = server.login("flood").await;
    send(&mut s, &[open(0, 1 << 20, "n0"), write(0, 1, 0, 16)]).await;
    let mut buf = Vec::new();
    assert_eq!(read_frame(&mut s, &mut buf).await.unwrap(), Frame::Durable { upto_tag: 1 });
    let mut s = server.login("other").await;
    send(&mut s, &[open(0, 1 << 20, "d"), write(0, 1, 0, 16)]).await;
    assert_eq!(read_frame(&mut s, &mut buf).await.unwrap(), Frame::Durable { upto_tag: 1 });
    server.stop().await;
}

/// With the drain stopped no point is ever uploaded: a session sending points without
/// end must not make the server watch them without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_waiting_for_upload_are_bounded_per_session() {
    let server = Server::start(false, |cfg| cfg.points_watched_max = 8).await;
    let mut s = server.login("pointy").await;
    let mut frames = vec![open(0, 1 << 20, "d")];
    frames.extend((1..=20).map(|tag| Frame::Point {
        tag,
        point_id: tag,
        kind: PointKind::CrashConsistent,
        unix_ms: tag,
        disks: vec![(0, 1 << 20)],
    }));
    frames.push(write(0, 21, 0, 16));
    send(&mut s, &frames).await;
    let mut buf = Vec::new();
    for tag in 1..=21 {
        assert_eq!(read_frame(&mut s, &mut buf).await.unwrap(), Frame::Durable { upto_tag: tag });
    }
    assert_eq!(server.stats().points_unwatched.load(Ordering::Relaxed), 12);
    server.stop().await;
}

/// A peer that sends but never reads fills the server's socket buffer with
/// acknowledgements; the server drops it instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped() {
    let server = Server::start(false, |cfg| cfg.write_timeout = Duration::from_secs(1)).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.server.local_addr).await.unwrap();
    let mut s = server.tls_over(tcp).await.unwrap();
    login_on(&mut s, "deaf", PASSPHRASE).await.unwrap();
    send(&mut s, &[open(0, 1 << 40, "d")]).await;
    // Zero runs: the cheapest frames that each earn an acknowledgement.
    let flood = async {
        let mut tag = 0u64;
        for _ in 0..3000 {
            let mut batch = Vec::new();
            for _ in 0..1000 {
                tag += 1;
                Frame::Zero { disk: 0, tag, offset: 0, len: 4096 }.encode(&mut batch);
            }
            if s.write_all(&batch).await.is_err() || s.flush().await.is_err() {
                return tag;
            }
        }
        panic!("3,000,000 frames sent and the server still reads");
    };
    tokio::time::timeout(Duration::from_secs(120), flood).await.expect("the server dropped the peer");
    assert_eq!(server.stats().write_timeouts.load(Ordering::Relaxed), 1);
    server.stop().await;
}

/// 1,000 connections open at once from 20 addresses (within the default login-slot caps:
/// 64 per address, 1,024 in total), then each announces the largest frame before login
/// (half the cap, half u32::MAX): every one is closed at once with no frame, none is
/// refused at accept, memory stays bounded, and an agent keeps replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_connections_announcing_the_largest_frame_are_each_closed_at_once() {
    const CONNECTIONS: usize = 1000;
    // Client and server ends of every connection live in this process.
    let fds = churnlog::ingest::limits::raise_open_files_limit().unwrap();
    assert!(fds >= 4 * CONNECTIONS as u64, "the open-files hard limit ({fds}) is too low for this test");
    let server = Arc::new(Server::start(true, |_| {}).await);
    let good = GoodAgent::start(&server).await;
    let memory = PeakMemory::start();
    let protocol_errors = server.stats().protocol_errors.load(Ordering::Relaxed);

    let (ready, mut readies) = tokio::sync::mpsc::channel::<()>(CONNECTIONS);
    let (go, _) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let (server, ready, mut go) = (server.clone(), ready.clone(), go.subscribe());
        tasks.spawn(async move {
            let mut s = server.tls_from(attacker(10 + (i % 20) as u8)).await.unwrap();
            ready.send(()).await.unwrap();
            go.wait_for(|go| *go).await.unwrap();
            let len = if i % 2 == 0 { FRAME_LEN_MAX } else { u32::MAX };
            s.write_all(&len.to_le_bytes()).await.unwrap();
            s.write_all(&[0x01]).await.unwrap();
            s.flush().await.unwrap();
            assert_eq!(until_closed(&mut s).await, vec![]);
        });
    }
    for _ in 0..CONNECTIONS {
        readies.recv().await.unwrap();
    }
    // All of them are past TLS and hold a login slot at the same moment.
    assert_eq!(server.stats().logging_in.load(Ordering::Relaxed), CONNECTIONS as u64);
    go.send(true).unwrap();
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(server.stats().protocol_errors.load(Ordering::Relaxed), protocol_errors + CONNECTIONS as u64);
    assert_eq!(server.stats().admission_refusals.load(Ordering::Relaxed), 0);
    wait_for(|| server.stats().logging_in.load(Ordering::Relaxed) == 0).await;
    // Measured: 130-140 MiB for both ends of 1,000 TLS connections; one buffer of the
    // announced length (the cap, 1 MiB) per connection would be 1,000 MiB more.
    memory.assert_bounded("1,000 concurrent connections", 512);
    good.finish(&server).await;
    Arc::into_inner(server).expect("no task holds the server").stop().await;
}

/// The attack: 300 connections that hold login slots, 300 that announce the largest
/// frame before logging in, and a passphrase guesser, while an agent replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_keeps_replicating_byte_identical_under_a_connection_flood() {
    let server = Server::start(true, |cfg| {
        cfg.unauthenticated_per_address_max = 16;
        cfg.unauthenticated_max = 56;
    })
    .await;
    let good = GoodAgent::start(&server).await;

    let memory = PeakMemory::start();
    // 1. 300 connections each announcing a maximum-length frame before login: each is
    //    closed at once (the login frame cap), never after the 30 s handshake timeout.
    let protocol_errors = server.stats().protocol_errors.load(Ordering::Relaxed);
    let server = Arc::new(server);
    for batch in 0..6u8 {
        // Each batch stays within the total of login slots, once the last one's are free.
        wait_for(|| server.stats().logging_in.load(Ordering::Relaxed) == 0).await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50u8 {
            let server = server.clone();
            let from = attacker(10 + batch * 4 + i % 4);
            tasks.spawn(async move {
                let mut s = server.tls_from(from).await.unwrap();
                let len = if i % 2 == 0 { FRAME_LEN_MAX } else { u32::MAX };
                s.write_all(&len.to_le_bytes()).await.unwrap();
                s.write_all(&[0x01]).await.unwrap();
                s.flush().await.unwrap();
                assert_eq!(until_closed(&mut s).await, vec![]);
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    }
    assert_eq!(server.stats().protocol_errors.load(Ordering::Relaxed), protocol_errors + 300);
    assert_eq!(server.stats().admission_refusals.load(Ordering::Relaxed), 0);

    wait_for(|| server.stats().logging_in.load(Ordering::Relaxed) == 0).await;
    // 2. 300 connections that never start TLS, from three addresses: 16 of each
    //    address's 100 hold a login slot, the other 84 are closed at accept.
    let mut held = Vec::new();
    for i in 0..300u32 {
        held.push(server.tcp_from(attacker(2 + (i % 3) as u8)).await.unwrap());
    }
    wait_for(|| server.stats().admission_refusals.load(Ordering::Relaxed) >= 252).await;
    assert_eq!(server.stats().admission_refusals.load(Ordering::Relaxed), 252);
    assert_eq!(server.stats().logging_in.load(Ordering::Relaxed), 48);
    // ... and the total: 48 slots are taken, 8 more may log in from anywhere.
    for _ in 0..16 {
        held.push(server.tcp_from(attacker(5)).await.unwrap());
    }
    wait_for(|| server.stats().admission_refusals.load(Ordering::Relaxed) >= 260).await;
    assert_eq!(server.stats().admission_refusals.load(Ordering::Relaxed), 260);
    assert_eq!(server.stats().logging_in.load(Ordering::Relaxed), 56);
    drop(held);
    wait_for(|| server.stats().logging_in.load(Ordering::Relaxed) == 0).await;

    // 3. A passphrase guesser: 5 failures are free, the 6th blocks the address, whose
    //    next connection is closed at accept, before TLS.
    for n in 1..=6 {
        let mut s = server.tls_from(attacker(6)).await.unwrap();
        let Err(Some(frame)) = login_on(&mut s, "guesser", "not the passphrase").await else { panic!("logged in") };
        assert_eq!(frame, Frame::Error { code: E_AUTH, message: "authentication failed".into() }, "attempt {n}");
    }
    assert!(server.tls_from(attacker(6)).await.is_err(), "a blocked address gets no TLS handshake");
    assert_eq!(server.stats().auth_failures.load(Ordering::Relaxed), 6);
    assert_eq!(server.stats().login_throttled.load(Ordering::Relaxed), 1);

    memory.assert_bounded("the flood", 256);
    good.finish(&server).await;
    Arc::into_inner(server).expect("no task holds the server").stop().await;
}

/// A well-behaved agent replicating an 8 MiB disk of `good-vm`, churned between passes,
/// from 127.0.0.1 while an attack runs.
struct GoodAgent {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(u64, Vec<u8>)>,
    work: std::path::PathBuf,
}

impl GoodAgent {
    /// Starts it and waits until it is logged in: its own login is not what is tested.
    async fn start(server: &Server) -> GoodAgent {
        let work = server.dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let img = work.join("good.img");
        image(&img, 8 << 20, 9);
        let cfg = churnlog::agent::AgentConfig::new(
            server.server.local_addr.to_string(),
            server.server.cert_pem.clone(),
            "good-vm".into(),
            vec![("d".into(), img.clone())],
        );
        let mut agent = churnlog::agent::Agent::new(cfg, PASSPHRASE).unwrap();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut last = None;
            for round in 0u64.. {
                if round > 0 {
                    churn(&img, 7, round);
                }
                let r = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.expect("undisturbed");
                last = Some((r.point_id, std::fs::read(&img).unwrap()));
                if round >= 1 && *stopped.borrow_and_update() {
                    break;
                }
            }
            last.unwrap()
        });
        wait_for(|| server.stats().sessions.load(Ordering::Relaxed) >= 1).await;
        assert_eq!(server.stats().sessions.load(Ordering::Relaxed), 1);
        GoodAgent { stop, task, work }
    }

    /// Stops it after one more pass and restores its last point: byte-identical, and it
    /// never lost its session.
    async fn finish(self, server: &Server) {
        self.stop.send(true).unwrap();
        let (point_id, want) = self.task.await.unwrap();
        let out = self.work.join("restored.img");
        restore(&server.target, "good-vm", "d", PointSelector::Id(point_id), &out, |_, _| {}).await.unwrap();
        assert!(std::fs::read(&out).unwrap() == want, "the restored image differs");
        assert_eq!(server.stats().sessions.load(Ordering::Relaxed), 1, "the agent never lost its session");
    }
}

/// The peak resident set from `start` to `assert_bounded`. This process holds the
/// server, the agent and the attackers, and the other tests of this file run beside it,
/// so the bound is loose; what it catches is per-connection buffers that grow with the
/// announced frame length or the number of connections.
struct PeakMemory {
    rss_before_kib: u64,
    hwm_reset: bool,
}

impl PeakMemory {
    fn start() -> PeakMemory {
        let rss_before_kib = status_kib("VmRSS");
        PeakMemory { rss_before_kib, hwm_reset: std::fs::write("/proc/self/clear_refs", "5").is_ok() }
    }

    fn assert_bounded(&self, what: &str, growth_max_mib: u64) {
        let peak_kib = status_kib("VmHWM");
        eprintln!(
            "resident memory: {} MiB before {what}, peak {} MiB during it (peak {})",
            self.rss_before_kib >> 10,
            peak_kib >> 10,
            if self.hwm_reset { "since it began" } else { "of the whole process: clear_refs refused" }
        );
        if self.hwm_reset {
            assert!(
                peak_kib.saturating_sub(self.rss_before_kib) < growth_max_mib << 10,
                "{what} grew resident memory from {} KiB to {peak_kib} KiB",
                self.rss_before_kib
            );
        }
    }
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`), KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).expect("the field");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB")
}

/// Polls `done` for up to 20 s.
async fn wait_for(done: impl Fn() -> bool) {
    for _ in 0..2000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not reached within 20 s");
}
