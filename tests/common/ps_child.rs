//! A real `churnlog ps run` child process for `kill -9` tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The child; killed (SIGKILL) and reaped when dropped.
pub struct Ps {
    child: Child,
}

impl Drop for Ps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `churnlog ps run` from a TOML file (relative paths, beside the file: `cache`,
/// `passphrase`, `tls`, a `store` directory as target) with the listen address given as
/// a flag, so the file-plus-flags path is what runs here; returns once it listens.
pub fn start_ps(dir: &Path, port: u16) -> Ps {
    let config = format!(
        "cache_dir = \"cache\"\ncache_size = \"1GiB\"\nlisten = \"127.0.0.1:1\"\n\
         target = \"file://{}\"\npassphrase_file = \"passphrase\"\ntls_dir = \"tls\"\n",
        dir.join("store").display()
    );
    std::fs::write(dir.join("ps.toml"), config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_churnlog"))
        .args(["ps", "run", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(dir.join("ps.toml"))
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("CHURNLOG_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .expect("spawn churnlog ps run");
    let mut ps = Ps { child };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A child that exited could not listen (the port taken meanwhile, say): said
        // plainly rather than found later as a server that never answers.
        if let Some(status) = ps.child.try_wait().unwrap() {
            panic!("churnlog ps run on port {port} exited: {status}");
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "process server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    ps
}

/// SIGKILL, then reap.
pub fn kill9(ps: &mut Ps) {
    ps.child.kill().unwrap();
    ps.child.wait().unwrap();
}
