//! End to end on loopback with real TLS and a local-directory target: agents replicate,
//! the drain uploads, restore rebuilds every recovery point byte for byte. Hostile
//! clients are closed without disturbing the others; many agents run at once.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use churnlog::agent::{Agent, AgentConfig, AgentError};
use churnlog::protocol::auth::{nonce, AuthKey};
use churnlog::protocol::{read_frame, write_frame, Frame, PointKind, PROTOCOL_VERSION};
use churnlog::restore::{restore, PointSelector};
use common::rig::{churn, image, Rig, PASSPHRASE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_disks_three_points_restore_byte_identical() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (d0, d1) = (work.join("d0.img"), work.join("d1.img"));
    image(&d0, 4 << 20, 1);
    image(&d1, 2 << 20, 2);
    let mut agent = rig.agent("vm-1", vec![("disk0".into(), d0.clone()), ("disk1".into(), d1.clone())]);
    let mut points = Vec::new();
    for round in 0..3u64 {
        if round > 0 {
            churn(&d0, 9, round);
            churn(&d1, 5, round + 100);
        }
        let kind = if round == 1 { PointKind::AppConsistent } else { PointKind::CrashConsistent };
        let r = agent.pass(kind, true, |_, _| {}).await.unwrap();
        if round == 0 {
            assert!(r.zero_runs_sent > 0, "the first pass describes zero runs instead of sending them");
        }
        points.push((r.point_id, std::fs::read(&d0).unwrap(), std::fs::read(&d1).unwrap()));
    }
    // A common recovery point restores both disks as they were together.
    for (point, want0, want1) in &points {
        for (disk, want) in [("disk0", want0), ("disk1", want1)] {
            let out = work.join(format!("r-{disk}-{point}"));
            let rep = restore(&rig.target, "vm-1", disk, PointSelector::Id(*point), &out, |_, _| {}).await.unwrap();
            assert_eq!(rep.point.point_id, *point);
            assert!(std::fs::read(&out).unwrap() == *want, "{disk} at point {point} differs");
        }
    }
    let listed = churnlog::restore::list_points(&rig.target, "vm-1", "disk0").await.unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[1].point.kind, PointKind::AppConsistent);
    assert!(listed.iter().all(|p| p.restorable));
    // Uploaded records were acknowledged to the cache: nothing is left to drain.
    for s in rig.cache.streams() {
        assert_eq!(s.uploaded_upto, s.durable_upto, "{s:?}");
    }
    rig.stop().await;
}

async fn raw_tls(rig: &Rig) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(churnlog::tls::client_config(&rig.server.cert_pem).unwrap());
    let tcp = tokio::net::TcpStream::connect(rig.server.local_addr).await.unwrap();
    connector.connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp).await.unwrap()
}

/// Reads until the server closes the connection (or sends an error); returns what it sent.
async fn until_closed(s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut buf = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            f = read_frame(s, &mut buf) => match f {
                Ok(f) => frames.push(f),
                Err(_) => return frames,
            },
            _ = &mut deadline => panic!("the server did not close the connection; it sent {frames:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_are_closed_and_others_are_unaffected() {
    let rig = Rig::start(Duration::from_millis(500)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let img = work.join("good.img");
    image(&img, 8 << 20, 9);
    let mut good = rig.agent("good-vm", vec![("d".into(), img.clone())]);
    let good_pass = tokio::spawn(async move {
        let r = good.pass(PointKind::CrashConsistent, true, |_, _| {}).await;
        (good, r)
    });

    // 1. Wrong passphrase: refused.
    let cfg = AgentConfig::new(
        rig.server.local_addr.to_string(),
        rig.server.cert_pem.clone(),
        "intruder".into(),
        vec![("d".into(), img.clone())],
    );
    let mut wrong = Agent::new(cfg, "not the passphrase").unwrap();
    assert!(matches!(wrong.pass(PointKind::CrashConsistent, false, |_, _| {}).await, Err(AgentError::Refused(_))));

    // 2. Replayed handshake: a MAC valid for one server nonce is useless for the next.
    let key = AuthKey::from_passphrase(PASSPHRASE);
    let client_nonce = nonce();
    let mut first = raw_tls(&rig).await;
    write_frame(&mut first, &Frame::Hello { version: PROTOCOL_VERSION, machine: "replayer".into(), client_nonce })
        .await
        .unwrap();
    let mut buf = Vec::new();
    let Frame::Challenge { server_nonce, .. } = read_frame(&mut first, &mut buf).await.unwrap() else {
        panic!("no challenge")
    };
    let mac = key.client_mac(&client_nonce, &server_nonce, "replayer");
    drop(first);
    let mut replay = raw_tls(&rig).await;
    write_frame(&mut replay, &Frame::Hello { version: PROTOCOL_VERSION, machine: "replayer".into(), client_nonce })
        .await
        .unwrap();
    let Frame::Challenge { server_nonce: second_nonce, .. } = read_frame(&mut replay, &mut buf).await.unwrap() else {
        panic!("no challenge")
    };
    assert_ne!(second_nonce, server_nonce);
    write_frame(&mut replay, &Frame::Auth { mac }).await.unwrap();
    let frames = until_closed(&mut replay).await;
    assert!(matches!(frames.last(), Some(Frame::Error { code: 2, .. })), "{frames:?}");

    // 3. Oversized frame length: closed before the body is read.
    let mut big = raw_tls(&rig).await;
    big.write_all(&(64u32 << 20).to_le_bytes()).await.unwrap();
    big.write_all(&[0x01; 16]).await.unwrap();
    big.flush().await.unwrap();
    until_closed(&mut big).await;

    // 4. Truncated frame: a length promising more than is sent, then silence past the
    //    handshake timeout, or a hang-up.
    let mut cut = raw_tls(&rig).await;
    cut.write_all(&100u32.to_le_bytes()).await.unwrap();
    cut.write_all(&[0x01, 1, 0]).await.unwrap();
    cut.shutdown().await.unwrap();
    until_closed(&mut cut).await;

    // 5. Garbage instead of a hello.
    let mut junk = raw_tls(&rig).await;
    let mut garbage = Vec::new();
    Frame::Durable { upto_tag: 1 }.encode(&mut garbage);
    junk.write_all(&garbage).await.unwrap();
    junk.flush().await.unwrap();
    until_closed(&mut junk).await;

    // 6. An authenticated session that goes idle is closed after the idle timeout.
    let mut idle = raw_tls(&rig).await;
    let cn = nonce();
    write_frame(&mut idle, &Frame::Hello { version: PROTOCOL_VERSION, machine: "idler".into(), client_nonce: cn })
        .await
        .unwrap();
    let Frame::Challenge { server_nonce: sn, .. } = read_frame(&mut idle, &mut buf).await.unwrap() else { panic!() };
    write_frame(&mut idle, &Frame::Auth { mac: key.client_mac(&cn, &sn, "idler") }).await.unwrap();
    assert!(matches!(read_frame(&mut idle, &mut buf).await.unwrap(), Frame::AuthOk { .. }));
    until_closed(&mut idle).await;

    // 7. A plain-TCP client that never starts TLS.
    let mut plain = tokio::net::TcpStream::connect(rig.server.local_addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut sink)).await.expect("closed");

    let (_good, result) = good_pass.await.unwrap();
    let report = result.expect("the well-behaved agent was not disturbed");
    let out = work.join("restored.img");
    restore(&rig.target, "good-vm", "d", PointSelector::Id(report.point_id), &out, |_, _| {}).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    let st = &rig.server.stats;
    assert!(st.auth_failures.load(Ordering::Relaxed) >= 2, "{st:?}");
    assert!(st.protocol_errors.load(Ordering::Relaxed) >= 2, "{st:?}");
    assert!(st.timeouts.load(Ordering::Relaxed) >= 1, "{st:?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_twenty_five_agents_at_once() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let agents = 225;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..agents {
        let img = work.join(format!("vm{i}.img"));
        image(&img, 512 << 10, i as u64);
        let mut agent = rig.agent(&format!("vm{i:03}"), vec![("d0".into(), img.clone())]);
        tasks.spawn(async move {
            let first = agent.pass(PointKind::CrashConsistent, false, |_, _| {}).await.unwrap();
            churn(&img, 2, i as u64);
            let second = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
            (i, first.point_id, second.point_id, std::fs::read(&img).unwrap())
        });
    }
    let results = tokio::time::timeout(Duration::from_secs(300), async {
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r.unwrap());
        }
        out
    })
    .await
    .expect("225 agents finish within the bound");
    assert_eq!(results.len(), agents);
    assert_eq!(rig.server.stats.sessions.load(Ordering::Relaxed), agents as u64);
    // Spot-check restores.
    for (i, _, second, want) in results.iter().filter(|r| r.0 % 45 == 0) {
        let out = work.join(format!("r{i}.img"));
        restore(&rig.target, &format!("vm{i:03}"), "d0", PointSelector::Id(*second), &out, |_, _| {}).await.unwrap();
        assert!(std::fs::read(&out).unwrap() == *want, "vm{i} differs");
    }
    rig.stop().await;
}

/// OpenDisk declares each disk's size and the server refuses data past it: a disk that
/// grows is declared again before its new blocks are sent, one that shrinks is copied in
/// full, and every point restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_that_grows_or_shrinks_keeps_replicating() {
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let img = work.join("d.img");
    image(&img, 2 << 20, 5);
    let mut agent = rig.agent("elastic", vec![("d".into(), img.clone())]);
    for (round, size) in [(0u64, 2u64 << 20), (1, 6 << 20), (2, 1 << 20), (3, 3 << 20)] {
        if round > 0 {
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.set_len(size).unwrap();
            drop(f);
            churn(&img, 3, round);
        }
        let r = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.expect("not refused");
        let want_full = u64::from(round == 0 || round == 2);
        assert_eq!(r.full_copies, want_full, "round {round}: only the first pass and a shrink copy in full");
        let out = work.join(format!("r{round}.img"));
        restore(&rig.target, "elastic", "d", PointSelector::Id(r.point_id), &out, |_, _| {}).await.unwrap();
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap(), "round {round} differs");
    }
    assert_eq!(rig.server.stats.sessions.load(Ordering::Relaxed), 1, "nothing was refused");
    rig.stop().await;
}
