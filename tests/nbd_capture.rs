//! Write capture through the agent's NBD export, driven by real NBD clients (qemu-io from
//! qemu-utils, nbdinfo and nbdcopy from libnbd-bin): every crash-consistent point
//! restores byte for byte to the image at the FLUSH it follows, and a process server
//! that is down while the writer runs neither blocks the writer nor loses a byte (the
//! dirty bitmap catches up). The client binaries are required: a missing one fails.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use churnlog::agent::capture::{CaptureConfig, CaptureStatus};
use churnlog::agent::{nbd, Agent, AgentConfig};
use churnlog::ingest::IngestConfig;
use churnlog::process_server::{ProcessServer, ProcessServerConfig};
use churnlog::protocol::PointKind;
use churnlog::restore::{list_points, restore, PointSelector};
use churnlog::store::Target;
use common::rig::{fill, Rig, PASSPHRASE};

fn require(bin: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("{bin} is not installed: this test needs qemu-utils (qemu-io) and libnbd-bin (nbdinfo, nbdcopy)");
}

/// Runs a client to completion within `limit` (killed and failed past it).
fn run_client(mut cmd: Command, limit: Duration) -> String {
    let what = format!("{cmd:?}");
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn the NBD client");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// A seeded writer: qemu-io commands for one round (writes, FUA writes, write-zeroes,
/// discards, ending with a flush), applied to `expected` too.
struct Writer {
    rng: u64,
}

impl Writer {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn round(&mut self, expected: &mut [u8], ops: usize) -> Vec<String> {
        let sectors = expected.len() as u64 / 512;
        let mut cmds = Vec::new();
        for _ in 0..ops {
            let len = (1 + self.next() % 256).min(sectors);
            let off = self.next() % (sectors - len + 1);
            let (o, l) = ((off * 512) as usize, (len * 512) as usize);
            match self.next() % 8 {
                0 => {
                    cmds.push(format!("discard {o} {l}"));
                    expected[o..o + l].fill(0);
                }
                1 => {
                    cmds.push(format!("write -z {o} {l}"));
                    expected[o..o + l].fill(0);
                }
                k => {
                    let pattern = 1 + (self.next() % 255) as u8;
                    let fua = if k == 2 { "-f " } else { "" };
                    cmds.push(format!("write {fua}-P {pattern} {o} {l}"));
                    expected[o..o + l].fill(pattern);
                }
            }
        }
        cmds.push("flush".into());
        cmds
    }
}

fn qemu_io(addr: SocketAddr, disk: &str, cmds: &[String]) -> String {
    let mut cmd = Command::new(require("qemu-io"));
    cmd.args(["-f", "raw", "-d", "unmap", &format!("nbd://{addr}/{disk}")]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run_client(cmd, Duration::from_secs(120))
}

fn agent_for(server: &ProcessServer, machine: &str, disk: &str, path: &Path) -> Agent {
    let cfg = AgentConfig::new(
        server.local_addr.to_string(),
        server.cert_pem.clone(),
        machine.into(),
        vec![(disk.into(), path.to_path_buf())],
    );
    Agent::new(cfg, PASSPHRASE).unwrap()
}

/// Polls `status` until `done` holds (bounded).
async fn wait_for(running: &nbd::Running, what: &str, limit: Duration, done: impl Fn(&CaptureStatus) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let s = running.status();
        if done(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn h(b: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_point_restores_to_its_flush_state() {
    require("qemu-io");
    let nbdinfo = require("nbdinfo");
    let rig = Rig::start(Duration::from_secs(60)).await;
    let work = rig.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let img = work.join("d0.img");
    let size = 8 << 20;
    let mut expected = vec![0u8; size];
    fill(&mut expected[..3 << 20], 5); // existing content: the initial copy sends it
    std::fs::write(&img, &expected).unwrap();

    let agent = agent_for(&rig.server, "vm-nbd", "disk0", &img);
    let exports = nbd::open_exports(&[("disk0".into(), img.clone())]).unwrap();
    let cfg = CaptureConfig { queue_bytes: 64 << 20, point_interval: Duration::ZERO, persist: None };
    let sock = work.join("nbd.sock");
    let running =
        nbd::start(agent, exports, cfg, Some("127.0.0.1:0".parse().unwrap()), Some(sock.clone())).await.unwrap();
    let addr = running.tcp_addr.unwrap();
    wait_for(&running, "initial copy", Duration::from_secs(60), |s| {
        s.dirty_chunks == 0 && s.catchup_bytes >= size as u64
    })
    .await;

    // Option haggling: NBD_OPT_LIST, and NBD_OPT_INFO/GO with the size.
    let listed = run_client(
        {
            let mut c = Command::new(&nbdinfo);
            c.args(["--list", &format!("nbd://{addr}")]);
            c
        },
        Duration::from_secs(30),
    );
    assert!(listed.contains("disk0"), "{listed}");
    let size_out = run_client(
        {
            let mut c = Command::new(&nbdinfo);
            c.args(["--size", &format!("nbd://{addr}/disk0")]);
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(size_out.trim(), size.to_string());
    let unix_size = run_client(
        {
            let mut c = Command::new(&nbdinfo);
            c.args(["--size", &format!("nbd+unix:///disk0?socket={}", sock.display())]);
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(unix_size.trim(), size.to_string(), "the Unix socket serves the same export");

    // A seeded writer; the image at every flush is remembered by its hash.
    let mut writer = Writer { rng: 0x9e37_79b9_7f4a_7c15 };
    let mut states: HashMap<u128, usize> = HashMap::new();
    let mut images = Vec::new();
    let rounds = 12;
    let mut cmds = Vec::new();
    for r in 0..rounds {
        cmds.extend(writer.round(&mut expected, 8));
        assert!(states.insert(h(&expected), r).is_none(), "every flush state differs");
        images.push(expected.clone());
    }
    let out = qemu_io(addr, "disk0", &cmds);
    let writes = cmds.iter().filter(|c| c.starts_with("write")).count();
    assert_eq!(out.lines().filter(|l| l.starts_with("wrote")).count(), writes, "{out}");
    assert!(std::fs::read(&img).unwrap() == expected, "the backing file holds what the client wrote");

    wait_for(&running, "every point uploaded", Duration::from_secs(120), |s| {
        s.points_consistent >= rounds as u64
            && s.last_point.is_some_and(|(id, ok)| ok && s.last_uploaded_consistent == Some(id))
    })
    .await;
    let status = running.status();
    assert_eq!(status.overflows, 0, "{status:?}");
    assert!(status.last_upload_age_ms.is_some() && running.capture.upload_ages_ms().len() >= rounds, "{status:?}");
    let (_agent, r) = running.stop().await;
    r.unwrap();

    // Every crash-consistent point is one flush state, in order, and every flush has one.
    let points = list_points(&rig.target, "vm-nbd", "disk0").await.unwrap();
    let mut matched = Vec::new();
    for p in points.iter().filter(|p| p.point.kind == PointKind::CrashConsistent) {
        assert!(p.restorable, "{p:?}");
        assert!(p.upload_age_ms.is_some(), "the manifest says when the point was uploaded: {p:?}");
        let out = work.join(format!("r{}", p.point.point_id));
        restore(&rig.target, "vm-nbd", "disk0", PointSelector::Id(p.point.point_id), &out, |_, _| {}).await.unwrap();
        let got = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        let Some(&r) = states.get(&h(&got)) else {
            panic!("point {} restores to no flush state of the writer", p.point.point_id)
        };
        assert!(got == images[r]);
        matched.push(r);
    }
    // qemu-io flushes once more when it closes: a second point of the final state.
    assert!(matched.windows(2).all(|w| w[0] <= w[1]), "points in flush order: {matched:?}");
    matched.dedup();
    assert_eq!(matched, (0..rounds).collect::<Vec<_>>(), "a point at every flush");
    let out = work.join("latest");
    restore(&rig.target, "vm-nbd", "disk0", PointSelector::Latest, &out, |_, _| {}).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == expected, "latest is the final image");
    rig.stop().await;
}

/// A process server on `port` (0: any) with its cache and TLS in `dir`.
async fn start_ps(dir: &Path, store: &str, port: u16) -> ProcessServer {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ingest = IngestConfig::new(addr, dir.join("tls"), PASSPHRASE);
    ingest.handshake_timeout = Duration::from_secs(5);
    let target = Target::from_url(store, None).unwrap();
    let mut cfg = ProcessServerConfig::new(dir.join("cache"), 1 << 30, ingest, target);
    cfg.cache.segment_size = 16 << 20;
    ProcessServer::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_server_does_not_block_the_writer_and_the_bitmap_catches_up() {
    let nbdcopy = require("nbdcopy");
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let ps_dir = dir.path().join("ps");
    let server = start_ps(&ps_dir, &store, 0).await;
    let port = server.local_addr.port();
    let img = dir.path().join("d0.img");
    let size = 16 << 20;
    std::fs::write(&img, vec![0u8; size]).unwrap();

    let mut cfg = AgentConfig::new(
        server.local_addr.to_string(),
        server.cert_pem.clone(),
        "vm-out".into(),
        vec![("disk0".into(), img.clone())],
    );
    cfg.reconnect_timeout = Duration::from_secs(5);
    // A small window: frames in flight on a connection the agent has not yet seen die
    // are another queue, and this test wants the bitmap to take the outage.
    cfg.window = 4;
    let agent = Agent::new(cfg, PASSPHRASE).unwrap();
    let exports = nbd::open_exports(&[("disk0".into(), img.clone())]).unwrap();
    // A small queue: the outage outlasts it many times over.
    let cfg = CaptureConfig { queue_bytes: 256 << 10, point_interval: Duration::ZERO, persist: None };
    let running = nbd::start(agent, exports, cfg, Some("127.0.0.1:0".parse().unwrap()), None).await.unwrap();
    let addr = running.tcp_addr.unwrap();
    wait_for(&running, "initial copy", Duration::from_secs(60), |s| {
        s.catchup_bytes >= size as u64 && s.dirty_chunks == 0 && s.queued_bytes == 0
    })
    .await;

    // The process server goes away.
    server.stop().await.unwrap();

    // A libnbd client copies a whole image in (data and zero runs), then qemu-io writes.
    let mut expected = vec![0u8; size];
    fill(&mut expected[..10 << 20], 77);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &expected).unwrap();
    let mut copy = Command::new(&nbdcopy);
    copy.arg(&src).arg(format!("nbd://{addr}/disk0"));
    run_client(copy, Duration::from_secs(120));
    let mut writer = Writer { rng: 42 };
    let mut cmds = Vec::new();
    for _ in 0..4 {
        cmds.extend(writer.round(&mut expected, 16));
    }
    let out = qemu_io(addr, "disk0", &cmds);
    let issued = cmds.iter().filter(|c| !c.starts_with("flush")).count();
    let completed = out.lines().filter(|l| l.starts_with("wrote") || l.starts_with("discard")).count();
    assert_eq!(completed, issued, "every command completed while the server was down: {out}");
    assert!(std::fs::read(&img).unwrap() == expected);
    let during = running.status();
    assert!(during.overflows >= 1 && during.dirty_chunks > 0, "the queue overflowed into the bitmap: {during:?}");

    // The server comes back on the same address with its cache: the agent catches up.
    let server = start_ps(&ps_dir, &store, port).await;
    wait_for(&running, "catch-up", Duration::from_secs(120), |s| s.dirty_chunks == 0 && s.queued_bytes == 0).await;
    // Streaming again: the next flush gives a crash-consistent point.
    let cmds = writer.round(&mut expected, 4);
    qemu_io(addr, "disk0", &cmds);
    wait_for(&running, "a crash-consistent point uploaded", Duration::from_secs(120), |s| {
        s.last_point.is_some_and(|(id, ok)| ok && s.last_uploaded_consistent == Some(id))
    })
    .await;
    let final_point = running.status().last_point.unwrap().0;
    let (_agent, r) = running.stop().await;
    r.unwrap();

    let target = Target::from_url(&store, None).unwrap();
    let points = list_points(&target, "vm-out", "disk0").await.unwrap();
    assert!(
        points.iter().any(|p| p.point.kind == PointKind::NotCrashConsistent),
        "points taken during the outage are marked: {points:?}"
    );
    for (sel, name) in [(PointSelector::Id(final_point), "final"), (PointSelector::Latest, "latest")] {
        let out = dir.path().join(name);
        let rep = restore(&target, "vm-out", "disk0", sel, &out, |_, _| {}).await.unwrap();
        assert_eq!(rep.point.point_id, final_point);
        assert!(std::fs::read(&out).unwrap() == expected, "{name} restores the final image");
    }
    server.stop().await.unwrap();
}

/// A `churnlog agent --export` child process: its NBD address (from stderr) and the JSON
/// status lines it prints; killed with SIGKILL when dropped.
struct AgentChild {
    child: std::process::Child,
    addr: SocketAddr,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl AgentChild {
    fn spawn(args: &[String]) -> AgentChild {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_churnlog"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("NBD exports on nbd://").nth(1) {
                    let _ = tx.send(url.trim_end_matches("/ID").to_string());
                }
                eprintln!("agent: {line}");
            }
        });
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let line: serde_json::Value = serde_json::from_str(&line).expect("a JSON status line");
                sink.lock().unwrap().push(line);
            }
        });
        let mut child = AgentChild { child, addr: "127.0.0.1:1".parse().unwrap(), lines };
        let url = rx.recv_timeout(Duration::from_secs(60)).expect("the agent serves NBD");
        child.addr = url.parse().unwrap();
        child
    }

    /// The newest status line (bounded wait for the first).
    async fn last_status(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = self.lines.lock().unwrap().last().cloned();
            if let Some(l) = last {
                return l;
            }
            assert!(Instant::now() < deadline, "no status line within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first status line after a crash-consistent point (bounded wait): every chunk
    /// that was dirty before that point has been sent.
    async fn consistent_status(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self.lines.lock().unwrap().iter().find(|l| l["last_point"][1] == true).cloned();
            if let Some(l) = found {
                return l;
            }
            assert!(Instant::now() < deadline, "no crash-consistent point reported: {:?}", self.lines.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `churnlog agent --export disk0=IMG` arguments: points at every flush, NBD on an
/// ephemeral 127.0.0.1 port, the dirty bitmap in `state`.
fn export_args(ps: &str, cert: &Path, pass: &Path, machine: &str, img: &Path, state: &Path) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    [
        "agent",
        "--ps",
        ps,
        "--ps-cert",
        &p(cert),
        "--passphrase-file",
        &p(pass),
        "--machine",
        machine,
        "--export",
        &format!("disk0={}", p(img)),
        "--nbd-listen",
        "127.0.0.1:0",
        "--state-dir",
        &p(state),
        "--point-interval",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Chunks (of the capture's 64 KiB) that `cmds` touch.
fn chunks_touched(cmds: &[String]) -> std::collections::BTreeSet<u64> {
    let chunk = churnlog::agent::capture::CHUNK;
    let mut out = std::collections::BTreeSet::new();
    for c in cmds.iter().filter(|c| !c.starts_with("flush")) {
        let nums: Vec<u64> = c.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let (off, len) = (nums[nums.len() - 2], nums[nums.len() - 1]);
        out.extend(off / chunk..=(off + len - 1) / chunk);
    }
    out
}

/// Polls the store until a crash-consistent point of `machine`/`disk` restores to
/// `want` (bounded).
async fn wait_for_point(target: &Target, machine: &str, want: &[u8], work: &Path, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(points) = list_points(target, machine, "disk0").await {
            for p in points.iter().rev().filter(|p| p.point.kind == PointKind::CrashConsistent && p.restorable) {
                let out = work.join("probe");
                restore(target, machine, "disk0", PointSelector::Id(p.point.point_id), &out, |_, _| {}).await.unwrap();
                if std::fs::read(&out).unwrap() == want {
                    return p.point.point_id;
                }
            }
        }
        assert!(Instant::now() < deadline, "no crash-consistent point of the expected image within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every crash-consistent point of `machine`/disk0 restores to one of the writer's
/// `flushed` states, in flush order, and the last flush has a point.
async fn points_are_flush_states_in_order(target: &Target, machine: &str, flushed: &[Vec<u8>], work: &Path) {
    let states: HashMap<u128, usize> = flushed.iter().enumerate().map(|(i, f)| (h(f), i)).collect();
    let points = list_points(target, machine, "disk0").await.unwrap();
    let mut seen = Vec::new();
    for pt in points.iter().filter(|pt| pt.point.kind == PointKind::CrashConsistent) {
        assert!(pt.restorable, "{pt:?}");
        let out = work.join("r");
        restore(target, machine, "disk0", PointSelector::Id(pt.point.point_id), &out, |_, _| {}).await.unwrap();
        let got = std::fs::read(&out).unwrap();
        let Some(&i) = states.get(&h(&got)) else { panic!("point {} is no flush state", pt.point.point_id) };
        seen.push(i);
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "points in flush order: {seen:?}");
    assert_eq!(seen.last(), Some(&(flushed.len() - 1)), "the last flush has a point");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_agent_resumes_from_its_persistent_bitmap_without_a_full_copy() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let ps_dir = dir.path().join("ps");
    let server = start_ps(&ps_dir, &store, 0).await;
    let (port, cert_pem, ps_addr) = (server.local_addr.port(), server.cert_pem.clone(), server.local_addr);
    let mut server = Some(server);
    let target = Target::from_url(&store, None).unwrap();
    let cert = dir.path().join("ps.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, PASSPHRASE).unwrap();
    std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let img = dir.path().join("d0.img");
    let size = 16 << 20;
    let mut expected = vec![0u8; size];
    fill(&mut expected[..6 << 20], 9);
    std::fs::write(&img, &expected).unwrap();
    let args = export_args(&ps_addr.to_string(), &cert, &pass, "vm-k9", &img, &dir.path().join("state"));

    // First run: the full copy, then a round whose point is uploaded.
    let agent = AgentChild::spawn(&args);
    let mut writer = Writer { rng: 7 };
    let mut flushed = vec![expected.clone()];
    let cmds = writer.round(&mut expected, 12);
    qemu_io(agent.addr, "disk0", &cmds);
    flushed.push(expected.clone());
    wait_for_point(&target, "vm-k9", &expected, dir.path(), Duration::from_secs(120)).await;
    let first = agent.consistent_status().await;
    assert_eq!(first["full_copies"], 1, "{first}");

    // Kill -9 twice after a round, restart, and count what the restarted agent resends.
    // First with the process server down during the round (nothing of it can be durable),
    // then with it up (the round's frames may be in flight).
    let mut agent = agent;
    let mut previous = chunks_touched(&cmds);
    for kill in 0..2 {
        if kill == 0 {
            server.take().unwrap().stop().await.unwrap();
        }
        let cmds = writer.round(&mut expected, 24);
        let touched = chunks_touched(&cmds);
        qemu_io(agent.addr, "disk0", &cmds);
        flushed.push(expected.clone());
        drop(agent); // SIGKILL
        if server.is_none() {
            server = Some(start_ps(&ps_dir, &store, port).await);
        }
        agent = AgentChild::spawn(&args);
        let cmds = writer.round(&mut expected, 4);
        let touched_after = chunks_touched(&cmds);
        qemu_io(agent.addr, "disk0", &cmds);
        flushed.push(expected.clone());
        wait_for_point(&target, "vm-k9", &expected, dir.path(), Duration::from_secs(120)).await;
        let st = agent.consistent_status().await;
        eprintln!("after kill {kill}: {st} (round touched {} chunks)", touched.len());
        assert_eq!(st["full_copies"], 0, "no full copy after a restart: {st}");
        // What the killed run had not seen durable: the round before the kill, and at
        // most the round before that (uploaded, so durable, but its acknowledgement may
        // not have been read yet).
        let resumed = st["resumed_chunks"].as_u64().unwrap();
        let bound = touched.union(&previous).count() as u64;
        assert!(resumed <= bound, "resumed {resumed} chunks, the last two rounds touched {bound}");
        if kill == 0 {
            assert!(resumed >= touched.len() as u64, "every chunk written while the server was down: {resumed}");
        }
        let catchup = st["catchup_bytes"].as_u64().unwrap();
        let bound = (bound + touched_after.len() as u64) * churnlog::agent::capture::CHUNK;
        assert!(catchup <= bound, "catch-up sent {catchup} bytes, at most {bound} were dirty");
        previous = touched_after;
    }
    drop(agent);

    points_are_flush_states_in_order(&target, "vm-k9", &flushed, dir.path()).await;
    server.unwrap().stop().await.unwrap();
}

/// `kill -9` of a real `churnlog ps run` while a writer writes through the export (and
/// again right after a round, while the drain uploads): the agent reconnects to the
/// restarted server and resends what was not durable, nothing is copied in full, and
/// every crash-consistent point restores to one of the writer's flush states, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_process_server_costs_no_full_copy_and_every_point_restores() {
    use common::ps_child::{free_port, kill9, start_ps};
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let ps_dir = dir.path().join("ps");
    std::fs::create_dir_all(&ps_dir).unwrap();
    let pass = ps_dir.join("passphrase");
    std::fs::write(&pass, PASSPHRASE).unwrap();
    std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = free_port();
    let mut ps = start_ps(&ps_dir, port);
    let target = Target::from_url(&format!("file://{}", ps_dir.join("store").display()), None).unwrap();
    let img = dir.path().join("d0.img");
    let size = 8 << 20;
    let mut expected = vec![0u8; size];
    fill(&mut expected[..3 << 20], 31);
    std::fs::write(&img, &expected).unwrap();
    let (ps_addr, cert) = (format!("127.0.0.1:{port}"), ps_dir.join("tls/cert.pem"));
    let args = export_args(&ps_addr, &cert, &pass, "vm-pk9", &img, &dir.path().join("state"));
    let agent = AgentChild::spawn(&args);
    let mut writer = Writer { rng: 17 };
    let mut flushed = vec![expected.clone()];
    for kill in 0..3u64 {
        let cmds = writer.round(&mut expected, 40);
        let addr = agent.addr;
        let write = std::thread::spawn(move || qemu_io(addr, "disk0", &cmds));
        // Mid-round (0, 2), or after the round while its point is uploaded (1).
        let write = if kill == 1 {
            write.join().unwrap();
            None
        } else {
            tokio::time::sleep(Duration::from_millis(30 + 40 * kill)).await;
            Some(write)
        };
        kill9(&mut ps);
        // The writer finishes with the server down (bounded by qemu_io's own limit).
        if let Some(write) = write {
            tokio::task::spawn_blocking(move || write.join().unwrap()).await.unwrap();
        }
        flushed.push(expected.clone());
        ps = start_ps(&ps_dir, port);
        wait_for_point(&target, "vm-pk9", &expected, dir.path(), Duration::from_secs(120)).await;
        eprintln!("after kill {kill}: the final image of the round has a point");
    }
    let last = agent.last_status().await;
    assert_eq!(last["full_copies"], 1, "only the first copy: {last}");
    drop(agent);

    points_are_flush_states_in_order(&target, "vm-pk9", &flushed, dir.path()).await;
}

/// The agent's state directory lost while it was stopped, and the image changed behind
/// its back meanwhile: the restarted agent compares the image with the server's block
/// hashes (a delta resync) and sends only the chunks that differ, not a full copy; the
/// final image restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_bitmap_means_a_delta_resync_not_a_full_copy() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let server = start_ps(&dir.path().join("ps"), &store, 0).await;
    let target = Target::from_url(&store, None).unwrap();
    let cert = dir.path().join("ps.pem");
    std::fs::write(&cert, &server.cert_pem).unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, PASSPHRASE).unwrap();
    std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let img = dir.path().join("d0.img");
    let size = 16 << 20;
    let mut expected = vec![0u8; size];
    fill(&mut expected[..5 << 20], 41);
    std::fs::write(&img, &expected).unwrap();
    let state = dir.path().join("state");
    let args = export_args(&server.local_addr.to_string(), &cert, &pass, "vm-d", &img, &state);

    let agent = AgentChild::spawn(&args);
    let mut writer = Writer { rng: 43 };
    let cmds = writer.round(&mut expected, 12);
    qemu_io(agent.addr, "disk0", &cmds);
    wait_for_point(&target, "vm-d", &expected, dir.path(), Duration::from_secs(120)).await;
    drop(agent); // SIGKILL

    // The state directory is gone, and three chunks change while no agent runs.
    std::fs::remove_dir_all(&state).unwrap();
    let chunk = churnlog::agent::capture::CHUNK as usize;
    for (i, c) in [3usize, 100, 201].into_iter().enumerate() {
        expected[c * chunk..(c + 1) * chunk].fill(0xA0 + i as u8);
    }
    std::fs::write(&img, &expected).unwrap();
    let agent = AgentChild::spawn(&args);
    let cmds = writer.round(&mut expected, 6);
    let mut touched = chunks_touched(&cmds);
    qemu_io(agent.addr, "disk0", &cmds);
    // That round's flush may come while the differing chunks are still being caught up
    // (its point is then not crash-consistent): one more round once they are sent.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !agent.lines.lock().unwrap().iter().any(|l| l["delta_resyncs"] == 1 && l["dirty_chunks"] == 0) {
        assert!(Instant::now() < deadline, "the delta resync did not finish: {:?}", agent.lines.lock().unwrap().last());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cmds = writer.round(&mut expected, 2);
    touched.extend(chunks_touched(&cmds));
    qemu_io(agent.addr, "disk0", &cmds);
    wait_for_point(&target, "vm-d", &expected, dir.path(), Duration::from_secs(120)).await;
    let st = agent.consistent_status().await;
    eprintln!("after the lost bitmap: {st}");
    assert_eq!((st["full_copies"].as_u64(), st["delta_resyncs"].as_u64()), (Some(0), Some(1)), "{st}");
    let chunks = (size / chunk) as u64;
    assert!(st["delta_equal_chunks"].as_u64().unwrap() >= chunks - 3 - touched.len() as u64, "{st}");
    let bound = (3 + touched.len() as u64) * chunk as u64;
    let sent = st["catchup_bytes"].as_u64().unwrap();
    assert!(sent <= bound, "catch-up sent {sent} bytes, at most {bound} differ");
    assert!(sent >= 3 * chunk as u64, "the three chunks changed behind its back are sent: {sent}");
    drop(agent);
    server.stop().await.unwrap();
}
