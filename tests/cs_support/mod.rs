//! Helpers of the configuration-server tests: a CS on 127.0.0.1:0 over SQLite or a
//! throwaway PostgreSQL cluster, signed clients, simulated process servers.
#![allow(dead_code)]

/// Runs each named `async fn(Backend)` as one test on SQLite and one on PostgreSQL.
/// The test crate must have `Backend` at its root (`use cs_support::*`).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use churnlog::control::api::{self, HealthLevel, Heartbeat, HeartbeatReply, MachineReport, PsRegistration};
use churnlog::control::auth::Principal;
use churnlog::control::client::{ClientError, CsClient};
use churnlog::control::cs::{ConfigServer, CsConfig};
use churnlog::protocol::auth::AuthKey;

pub const PASSPHRASE: &str = "correct horse battery staple";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Outside CI a missing tool skips the test (after saying so); with `CI` set it fails.
pub fn missing(what: &str, hint: &str) {
    assert!(std::env::var_os("CI").is_none(), "{what} is not installed (CI must run .ci/run, which installs it)");
    eprintln!("skipping: {what} not installed ({hint})");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `CHURNLOG_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` with an `initdb`.
fn pg_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHURNLOG_PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// A PostgreSQL cluster in a temporary directory on 127.0.0.1, stopped on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Running as root: PostgreSQL refuses root, so it runs as `postgres`.
    as_postgres: bool,
}

impl PgCluster {
    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start() -> Option<PgCluster> {
        use std::os::unix::fs::MetadataExt;
        let Some(bin) = pg_bin().filter(|b| b.join("initdb").exists()) else {
            missing("PostgreSQL (initdb, pg_ctl)", "apt-get install postgresql, or set CHURNLOG_PG_BIN");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = std::fs::metadata(dir.path()).unwrap().uid() == 0;
        if as_postgres {
            let ok = Command::new("chown").arg("postgres:postgres").arg(dir.path()).status().unwrap().success();
            assert!(ok, "chown the PostgreSQL directory to user postgres");
        }
        let pg = PgCluster { dir, bin, port: free_port(), as_postgres };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(pg.data())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            pg.port,
            pg.dir.path().display()
        );
        let out = pg
            .command("pg_ctl")
            .arg("-D")
            .arg(pg.data())
            .args(["-o", &opts, "-w", "-t", "60", "-l"])
            .arg(pg.dir.path().join("log"))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(pg.dir.path().join("log")).unwrap_or_default()
        );
        Some(pg)
    }

    /// One shared cluster while any test holds it (tests run in parallel).
    pub fn shared() -> Option<Arc<PgCluster>> {
        static SHARED: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pg) = slot.upgrade() {
            return Some(pg);
        }
        let pg = Arc::new(PgCluster::start()?);
        *slot = Arc::downgrade(&pg);
        Some(pg)
    }

    /// A new, empty database; its URL.
    pub async fn create_database(&self) -> String {
        use sqlx::Connection;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!("cs_{}_{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let mut c = sqlx::postgres::PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ =
            self.command("pg_ctl").arg("-D").arg(self.data()).args(["-m", "fast", "-w", "-t", "60", "stop"]).output();
    }
}

/// A CS on 127.0.0.1:0 with its database and TLS directory.
pub struct CsRig {
    pub cs: ConfigServer,
    pub dir: tempfile::TempDir,
    pub db: String,
    _pg: Option<Arc<PgCluster>>,
}

impl CsRig {
    /// None: the backend is not installed here (outside CI).
    pub async fn start(backend: Backend, heartbeat_timeout: Duration) -> Option<CsRig> {
        let dir = tempfile::tempdir().unwrap();
        let (db, pg) = match backend {
            Backend::Sqlite => (dir.path().join("cs.db").display().to_string(), None),
            Backend::Postgres => {
                let pg = tokio::task::spawn_blocking(PgCluster::shared).await.unwrap()?;
                (pg.create_database().await, Some(pg))
            }
        };
        let cs = ConfigServer::start(config(dir.path(), &db, heartbeat_timeout)).await.unwrap();
        Some(CsRig { cs, dir, db, _pg: pg })
    }

    pub fn address(&self) -> String {
        self.cs.local_addr.to_string()
    }

    pub fn client(&self) -> CsClient {
        CsClient::new(&self.address(), &self.cs.cert_pem, Principal::Passphrase, AuthKey::from_passphrase(PASSPHRASE))
            .unwrap()
    }

    pub fn machine_client(&self, name: &str, credential: &str) -> CsClient {
        let mut key = [0u8; 32];
        hex::decode_to_slice(credential, &mut key).unwrap();
        self.client().as_principal(Principal::Machine(name.into()), AuthKey::from_bytes(key))
    }

    pub async fn stop(self) {
        let CsRig { cs, dir, _pg, .. } = self;
        cs.stop().await;
        drop(dir);
        // The shared cluster's last holder stops it (blocking: off the runtime's threads).
        tokio::task::spawn_blocking(move || drop(_pg)).await.unwrap();
    }
}

pub fn config(dir: &Path, db: &str, heartbeat_timeout: Duration) -> CsConfig {
    CsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: db.to_string(),
        passphrase: PASSPHRASE.to_string(),
        tls_dir: dir.join("tls"),
        tls_names: Vec::new(),
        heartbeat_timeout,
    }
}

/// A simulated process server: its registration and heartbeats.
pub fn registration(id: &str, cert_pem: &str) -> PsRegistration {
    PsRegistration {
        id: id.into(),
        address: format!("{id}.example:9443"),
        cert_pem: cert_pem.into(),
        version: churnlog::control::VERSION.into(),
        cache_size_bytes: 300 << 30,
    }
}

pub fn heartbeat(id: &str, cache_free_percent: f64, health: HealthLevel) -> Heartbeat {
    Heartbeat {
        id: id.into(),
        version: churnlog::control::VERSION.into(),
        health,
        cache_size_bytes: 300 << 30,
        cache_free_percent,
        ..Default::default()
    }
}

pub async fn register_ps(c: &CsClient, id: &str, cert_pem: &str) {
    let _: api::PsRegistered = c.post(api::PATH_PS_REGISTER, &registration(id, cert_pem)).await.unwrap();
}

pub async fn beat(c: &CsClient, hb: &Heartbeat) -> HeartbeatReply {
    c.post(api::PATH_PS_HEARTBEAT, hb).await.unwrap()
}

pub async fn register_machine(c: &CsClient, name: &str) -> Result<String, ClientError> {
    let r: api::MachineRegistered =
        c.post(api::PATH_MACHINE_REGISTER, &api::MachineRegistration { name: name.into() }).await?;
    Ok(r.credential)
}

pub async fn status(c: &CsClient) -> api::StatusReport {
    c.get(api::PATH_STATUS).await.unwrap()
}

pub fn machine_report(name: &str, rpo: f64) -> MachineReport {
    MachineReport { name: name.into(), rpo_seconds: Some(rpo), ..Default::default() }
}

/// Heartbeats `hb` every 200 ms until aborted (a live process server in the background).
pub fn keep_beating(c: CsClient, hb: Heartbeat) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = c.post::<_, HeartbeatReply>(api::PATH_PS_HEARTBEAT, &hb).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Polls `f` every 100 ms until it is true; fails after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
