//! `kill -9` of a real `churnlog ps run` while an agent writes to it and while its drain
//! uploads. After each restart the agent reconnects and resends what was not yet durable;
//! every recovery point restores byte for byte.

use std::time::Duration;

mod common;

use churnlog::agent::{Agent, AgentConfig};
use churnlog::protocol::PointKind;
use churnlog::restore::{restore, PointSelector};
use churnlog::store::Target;
use common::ps_child::{free_port, kill9, start_ps};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn process_server_killed_mid_write_and_mid_upload() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHURNLOG_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("passphrase"), "kill nine passphrase\n").unwrap();
    let port = free_port();
    let mut ps = start_ps(dir.path(), port);
    let cert = std::fs::read_to_string(dir.path().join("tls/cert.pem")).unwrap();
    let img = dir.path().join("disk.img");
    let mut data = vec![0u8; 48 << 20];
    churnlog::bench::record_bytes(1, 1, data.len(), 0.3, &mut data);
    std::fs::write(&img, &data).unwrap();
    let mut cfg = AgentConfig::new(format!("127.0.0.1:{port}"), cert, "vm-k9".into(), vec![("d0".into(), img.clone())]);
    cfg.window = 32;
    let mut agent = Agent::new(cfg, "kill nine passphrase").unwrap();
    let mut points = Vec::new();
    for round in 0..3u64 {
        if round > 0 {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            let mut block = vec![0u8; 1 << 20];
            churnlog::bench::record_bytes(2, round, block.len(), 0.0, &mut block);
            f.write_all_at(&block, round * (5 << 20)).unwrap();
        }
        let pass = agent.pass(PointKind::CrashConsistent, true, |_, _| {});
        tokio::pin!(pass);
        // Kill the server while the pass is writing (round 0, 2) or right after the point
        // is durable, while the drain uploads (round 1).
        let delay = if round == 1 { Duration::from_millis(5) } else { Duration::from_millis(60) };
        eprintln!("round {round}: pass starts");
        let report = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(30), &mut pass) => r.expect("pass finishes").unwrap(),
            _ = tokio::time::sleep(delay) => {
                kill9(&mut ps);
                eprintln!("round {round}: killed the process server");
                tokio::time::sleep(Duration::from_millis(100)).await;
                ps = start_ps(dir.path(), port);
                tokio::time::timeout(Duration::from_secs(20), &mut pass).await.expect("the pass finishes after the restart").unwrap()
            }
        };
        points.push((report.point_id, std::fs::read(&img).unwrap(), report.reconnects));
    }
    assert!(points.iter().any(|p| p.2 > 0), "no pass saw the server die: the test did not test anything");
    let target = Target::from_url(&format!("file://{}", dir.path().join("store").display()), None).unwrap();
    for (point, want, _) in &points {
        let out = dir.path().join(format!("restored-{point}.img"));
        restore(&target, "vm-k9", "d0", PointSelector::Id(*point), &out, |_, _| {}).await.unwrap();
        assert!(std::fs::read(&out).unwrap() == *want, "point {point} differs after kill -9");
    }
    drop(ps);
}
