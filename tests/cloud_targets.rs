//! The data path against real object-store servers on 127.0.0.1: Azure Blob through
//! Azurite and S3 through moto, each started by the test on a port it picks and stopped
//! when the test ends. `.ci/run` installs both (`.ci/node_modules`, `.ci/venv`); outside CI
//! a missing server skips its test with a message, under CI (`CI` set) it fails. Each
//! target (a local directory too) also shows that nothing in it is overwritten silently.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use churnlog::protocol::PointKind;
use churnlog::restore::{restore, PointSelector};
use churnlog::store::{Manifest, StoreError, Target};
use common::rig::{churn, image, Rig};
use hmac::{Hmac, Mac};

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tool's path, or None (after saying why) when it is not installed outside CI.
fn tool(env: &str, default: &Path, what: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| default.to_path_buf());
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is not installed at {} (CI must run .ci/run, which installs it)",
        path.display()
    );
    eprintln!("skipping: {what} not installed at {} (run .ci/run once, or set {env})", path.display());
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server on port {port} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request on a fresh connection; returns the status code.
fn http(port: u16, method: &str, path: &str, headers: &[(String, String)]) -> u16 {
    // A server that just opened its port may still drop a connection or two.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect to 127.0.0.1:{port}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("connect to 127.0.0.1:{port}: {e}"),
        }
    };
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// RFC 1123 date for x-ms-date.
fn http_date() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(m - 1) as usize];
    format!("{wd}, {d:02} {mon} {y} {:02}:{:02}:{:02} GMT", rem / 3600, rem / 60 % 60, rem % 60)
}

const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Creates a blob container with a SharedKey-signed request (object_store does not
/// create containers).
fn azurite_create_container(port: u16, container: &str) -> u16 {
    let date = http_date();
    let version = "2021-08-06";
    let string_to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD.decode(AZURITE_KEY).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(string_to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    http(
        port,
        "PUT",
        &format!("/{AZURITE_ACCOUNT}/{container}?restype=container"),
        &[
            ("x-ms-date".into(), date),
            ("x-ms-version".into(), version.into()),
            ("Authorization".into(), format!("SharedKey {AZURITE_ACCOUNT}:{sig}")),
        ],
    )
}

/// Replicates two rounds to `url`, restores both points from it, compares.
async fn replicate_and_restore(dir: tempfile::TempDir, url: &str) {
    tokio::time::timeout(Duration::from_secs(120), replicate_and_restore_inner(dir, url))
        .await
        .expect("bounded in time");
}

async fn replicate_and_restore_inner(dir: tempfile::TempDir, url: &str) {
    let rig = Rig::start_with(dir, url, Duration::from_secs(60)).await;
    let img = rig.dir.path().join("disk.img");
    image(&img, 3 << 20, 42);
    let mut agent = rig.agent("cloud-vm", vec![("d0".into(), img.clone())]);
    let mut points = Vec::new();
    for round in 0..2 {
        if round > 0 {
            churn(&img, 6, 77);
        }
        let r = agent.pass(PointKind::CrashConsistent, true, |_, _| {}).await.unwrap();
        points.push((r.point_id, std::fs::read(&img).unwrap()));
    }
    for (point, want) in &points {
        let out = rig.dir.path().join(format!("restored-{point}.img"));
        restore(&rig.target, "cloud-vm", "d0", PointSelector::Id(*point), &out, |_, _| {}).await.unwrap();
        assert!(std::fs::read(&out).unwrap() == *want, "point {point} from {url} differs");
    }
    // (Before the rig stops: its directory holds Azurite's storage.)
    conditional_writes_refuse_lost_updates(&rig.target).await;
    rig.stop().await;
}

/// Nothing in the store is overwritten silently: a manifest written from a stale version
/// is a conflict (and the newer one stays), a data object is create-only (the same bytes
/// again are accepted, other bytes are a conflict and the first stay).
async fn conditional_writes_refuse_lost_updates(target: &Target) {
    let (machine, disk) = ("writer-test", "d9");
    let (none, absent) = target.load_manifest_versioned(machine, disk).await.unwrap();
    assert!(none.is_none());
    let mut m = Manifest { machine: machine.into(), disk: disk.into(), recorded_upto: 1, ..Manifest::default() };
    let v1 = target.put_manifest(&mut m, &absent).await.unwrap();
    // A second writer that also saw no manifest loses.
    let err = target.put_manifest(&mut m, &absent).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    // The first writer goes on from its version; a writer still at v1 then loses.
    m.recorded_upto = 2;
    let v2 = target.put_manifest(&mut m, &v1).await.unwrap();
    m.recorded_upto = 99;
    let err = target.put_manifest(&mut m, &v1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let (now, v_now) = target.load_manifest_versioned(machine, disk).await.unwrap();
    assert_eq!(now.unwrap().recorded_upto, 2, "the stale write must not have landed");
    assert_eq!(v_now, v2);

    let path = target.object_path(machine, disk, 1, 2);
    target.put_object(&path, bytes::Bytes::from_static(b"first bytes")).await.unwrap();
    target.put_object(&path, bytes::Bytes::from_static(b"first bytes")).await.unwrap();
    let err = target.put_object(&path, bytes::Bytes::from_static(b"other bytes")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let kept = target.store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&kept[..], b"first bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_directory_target() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    replicate_and_restore(dir, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_blob_through_azurite() {
    let Some(azurite) = tool("CHURNLOG_AZURITE", &repo().join(".ci/node_modules/.bin/azurite-blob"), "Azurite") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server(
        Command::new(azurite)
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--silent",
                "--disableTelemetry",
                "--location",
            ])
            .arg(dir.path().join("azurite"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Azurite"),
    );
    wait_port(port);
    let status = azurite_create_container(port, "churnlog");
    assert_eq!(status, 201, "create container");
    std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
    std::env::set_var("AZURITE_BLOB_STORAGE_URL", format!("http://127.0.0.1:{port}"));
    std::env::set_var("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT);
    std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY);
    replicate_and_restore(dir, "az://churnlog/pfx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_through_moto() {
    let Some(python) = tool("CHURNLOG_MOTO_PYTHON", &repo().join(".ci/venv/bin/python"), "moto (moto[server])") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server(
        Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto"),
    );
    wait_port(port);
    assert_eq!(http(port, "PUT", "/churnlog-bucket", &[]), 200, "create bucket");
    std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"));
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_REGION", "us-east-1");
    replicate_and_restore(dir, "s3://churnlog-bucket/pfx").await;
}
