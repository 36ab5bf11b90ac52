//! The operator's commands end to end, through the real binary against a real
//! configuration server (SQLite and PostgreSQL): `churnlog setup --server-mode ps`
//! installs and registers a process server, `ps register` re-registers it after its
//! address changed, `ps run --config` brings it up and heartbeating, `status --cs` shows
//! it, `ps decommission` removes it. Every server listens on 127.0.0.1; the child
//! process is killed when the test ends.

mod cs_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use churnlog::control::api::PsState;
pub use cs_support::*;

const WAIT: Duration = Duration::from_secs(60);

fn churnlog(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_churnlog")).args(args).output().unwrap();
    eprintln!(
        "churnlog {}: {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Rewrites one `key = …` line of a TOML file.
fn set_key(file: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let prefix = format!("{key} = ");
    assert!(text.lines().any(|l| l.starts_with(&prefix)), "{key} is in {}", file.display());
    let new: Vec<String> =
        text.lines().map(|l| if l.starts_with(&prefix) { format!("{key} = {value}") } else { l.to_string() }).collect();
    std::fs::write(file, new.join("\n") + "\n").unwrap();
}

/// Kills the `ps run` child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn setup_register_run_and_decommission(b: Backend) {
    let Some(cs) = CsRig::start(b, Duration::from_secs(30)).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let cs_cert = dir.path().join("cs.pem");
    std::fs::write(&cs_cert, &cs.cs.cert_pem).unwrap();
    let passphrase = dir.path().join("passphrase");
    churnlog::secrets::create_private(&passphrase, PASSPHRASE.as_bytes()).unwrap();
    let install = dir.path().join("ps");
    let store = format!("file://{}", dir.path().join("store").display());
    let port = free_port().to_string();
    let cs_address = cs.address();

    // `setup --server-mode ps` with every parameter, `port` and `extra` (flags) varying.
    let setup = |port: &str, extra: &[&str]| {
        let mut args = vec![
            "setup",
            "--server-mode",
            "ps",
            "--install-location",
            install.to_str().unwrap(),
            "--cs-ip",
            &cs_address,
            "--cs-cert",
            cs_cert.to_str().unwrap(),
            "--ps-ip",
            "127.0.0.1",
            "--passphrase-file-path",
            passphrase.to_str().unwrap(),
            "--data-transfer-secure-port",
            port,
            "--bypass-proxy",
            "--env-type",
            "non-vmware",
            "--cache-size",
            "1GiB",
            "--target",
            &store,
            "--ps-id",
            "ps-cli",
        ];
        args.extend_from_slice(extra);
        churnlog(&args)
    };

    // A bad value is one error naming its parameter, and leaves nothing behind.
    let bad = setup("99999", &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("data-transfer-secure-port"));
    assert!(!install.join("ps.toml").exists());
    assert!(status(&cs.client()).await.process_servers.is_empty());

    let ok = setup(&port, &["--skip-space-check"]);
    assert!(ok.status.success());
    let config = install.join("ps.toml");
    let st = status(&cs.client()).await;
    assert_eq!(st.process_servers.len(), 1);
    assert_eq!(st.process_servers[0].id, "ps-cli");
    assert_eq!(st.process_servers[0].address, format!("127.0.0.1:{port}"));

    // Tests listen on 127.0.0.1 only (setup writes 0.0.0.0), on a new port: the address
    // agents use changes, and `ps register` tells the CS.
    let port = free_port().to_string();
    set_key(&config, "listen", &format!("'127.0.0.1:{port}'"));
    set_key(&config, "advertise_address", &format!("'127.0.0.1:{port}'"));
    assert!(churnlog(&["ps", "register", "--config", config.to_str().unwrap()]).status.success());
    assert_eq!(status(&cs.client()).await.process_servers[0].address, format!("127.0.0.1:{port}"));

    // `ps run --config` registers and heartbeats.
    // Beat every second, and leave the host's CPU and memory out of health: the test
    // machine's load (a compiler on the same cores) must not make it critical and so
    // refuse the machine registered below.
    let tuned = std::fs::read_to_string(&config).unwrap()
        + "heartbeat_interval_seconds = 1\n\n[health]\ncpu_warning_percent = 100\ncpu_critical_percent = 100\n\
           memory_warning_percent = 100\nmemory_critical_percent = 100\n";
    std::fs::write(&config, tuned).unwrap();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_churnlog"))
            .args(["ps", "run", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(WAIT, "the process server to heartbeat", || async {
        status(&cs.client()).await.process_servers.iter().any(|p| p.state == PsState::Connected)
    })
    .await;
    let shown = churnlog(&[
        "status",
        "--cs",
        &cs_address,
        "--cs-cert",
        cs_cert.to_str().unwrap(),
        "--passphrase-file",
        passphrase.to_str().unwrap(),
        "--json",
    ]);
    assert!(shown.status.success());
    let report: churnlog::control::api::StatusReport = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(report.process_servers[0].id, "ps-cli");
    assert_eq!(report.process_servers[0].state, PsState::Connected);

    // Without machines or backlog, decommission unregisters it at once.
    let gone = churnlog(&["ps", "decommission", "--config", config.to_str().unwrap(), "--wait-seconds", "60"]);
    assert!(gone.status.success());
    assert!(status(&cs.client()).await.process_servers.is_empty());

    // Registered again (the running server picks it up at its next heartbeat), it takes
    // a machine; with nowhere to move it, decommission refuses unless forced, and forced
    // it purges the server although it is still running, and says what is lost.
    assert!(churnlog(&["ps", "register", "--config", config.to_str().unwrap()]).status.success());
    wait_until(WAIT, "the process server to heartbeat again", || async {
        status(&cs.client()).await.process_servers.iter().any(|p| p.state == PsState::Connected)
    })
    .await;
    register_machine(&cs.client(), "m1").await.unwrap();
    assert_eq!(status(&cs.client()).await.machines[0].ps.as_deref(), Some("ps-cli"));
    let refused = churnlog(&["ps", "decommission", "--config", config.to_str().unwrap(), "--wait-seconds", "5"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert_eq!(status(&cs.client()).await.process_servers.len(), 1);
    let forced =
        churnlog(&["ps", "decommission", "--config", config.to_str().unwrap(), "--wait-seconds", "5", "--force"]);
    assert!(forced.status.success());
    assert!(String::from_utf8_lossy(&forced.stdout).contains("m1"));
    let st = status(&cs.client()).await;
    assert!(st.process_servers.is_empty());
    assert_eq!(st.machines[0].ps, None);
    assert!(st.machines[0].resync_required);
    let _ = child.0.kill();
    let _ = child.0.wait();
    cs.stop().await;
}

on_both_backends!(setup_register_run_and_decommission);

/// A standalone `ps run` refuses a passphrase under 16 characters before it creates
/// anything, with the sentence that says how to make a good one.
#[test]
fn a_standalone_server_refuses_a_short_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("passphrase");
    churnlog::secrets::create_private(&pass, b"fifteen chars!!").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let store = format!("file://{}", dir.path().join("store").display());
    let cache = dir.path().join("cache");
    let tls = dir.path().join("tls");
    let out = churnlog(&[
        "ps",
        "run",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--listen",
        &listen,
        "--target",
        &store,
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--tls-dir",
        tls.to_str().unwrap(),
        "--cache-size",
        "1GiB",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the passphrase is 15 characters; at least 16 are required"), "{err}");
    assert!(!cache.exists() && !tls.exists(), "nothing created");
}
