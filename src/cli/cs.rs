//! `churnlog cs …`: run the configuration server, make its passphrase, and the operator's
//! requests to it (migrate, unregister/purge, reassign).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use churnlog::control::api;
use churnlog::control::auth::Principal;
use churnlog::control::client::CsClient;
use churnlog::control::cs::{ConfigServer, CsConfig, HEARTBEAT_TIMEOUT_DEFAULT};
use churnlog::protocol::auth::AuthKey;

use super::{print_json, read_passphrase, runtime};

#[derive(Subcommand)]
pub enum CsCommand {
    /// Run the configuration server (HTTPS API, status page, metrics).
    Run(RunArgs),
    /// Write a strong random passphrase to a new file (mode 0600).
    Passphrase {
        #[arg(long)]
        out: PathBuf,
    },
    /// Move one machine (`--machine NAME`), or every machine of a server
    /// (`--all --from PS`), to another process server.
    Migrate {
        #[command(flatten)]
        cs: CsArgs,
        #[arg(long, conflicts_with_all = ["all", "from"])]
        machine: Option<String>,
        #[arg(long, requires = "from")]
        all: bool,
        #[arg(long, requires = "all")]
        from: Option<String>,
        #[arg(long)]
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a process server; with `--purge` also a disconnected one that still has
    /// machines (they move elsewhere and are marked resync-required).
    Unregister {
        #[command(flatten)]
        cs: CsArgs,
        #[arg(long)]
        ps: String,
        #[arg(long)]
        purge: bool,
        #[arg(long)]
        json: bool,
    },
    /// Release a machine name so that a (new) machine may register it.
    Reassign {
        #[command(flatten)]
        cs: CsArgs,
        #[arg(long)]
        machine: String,
    },
}

/// How an operator's command reaches the CS.
#[derive(Args, Clone)]
pub struct CsArgs {
    /// The configuration server, host:port.
    #[arg(long = "cs")]
    pub address: String,
    /// Its certificate (`cert.pem` in its TLS directory): the only one trusted.
    #[arg(long)]
    pub cs_cert: PathBuf,
    #[arg(long)]
    pub passphrase_file: PathBuf,
}

impl CsArgs {
    pub fn client(&self) -> anyhow::Result<CsClient> {
        let cert = std::fs::read_to_string(&self.cs_cert)
            .with_context(|| format!("read the CS certificate {}", self.cs_cert.display()))?;
        let passphrase = read_passphrase(&self.passphrase_file)?;
        Ok(CsClient::new(&self.address, &cert, Principal::Passphrase, AuthKey::from_passphrase(&passphrase))?)
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// Where to listen, e.g. 0.0.0.0:9444.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A SQLite file (created if missing) or postgres://user@host/db.
    #[arg(long)]
    db: Option<String>,
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Holds cert.pem and key.pem (a self-signed pair is created when empty).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Extra host names or addresses for a newly created certificate.
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// A process server silent this long shows as disconnected (default 900).
    #[arg(long)]
    heartbeat_timeout: Option<u64>,
    /// The same settings from a TOML file (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write the address actually listened on to this file once serving (for scripts
    /// and the load benchmark, with `--listen 127.0.0.1:0`).
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

/// `cs run --config cs.toml`: keys as the flags; relative paths are relative to the file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CsRunFile {
    listen: Option<String>,
    db: Option<String>,
    passphrase_file: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    tls_names: Option<Vec<String>>,
    heartbeat_timeout_seconds: Option<u64>,
}

fn load_file(path: &Path) -> anyhow::Result<CsRunFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut f: CsRunFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    f.passphrase_file = f.passphrase_file.map(rel);
    f.tls_dir = f.tls_dir.map(rel);
    f.db = f.db.map(|d| {
        if d.contains("://") || d.starts_with("sqlite:") || Path::new(&d).is_absolute() {
            d
        } else {
            base.join(d).display().to_string()
        }
    });
    Ok(f)
}

/// Flags over the file; every required setting named when missing.
fn settings(args: RunArgs) -> anyhow::Result<(CsConfig, PathBuf, Option<PathBuf>)> {
    let file = match &args.config {
        Some(p) => load_file(p)?,
        None => CsRunFile::default(),
    };
    let listen = match args.listen {
        Some(l) => l,
        None => file
            .listen
            .as_deref()
            .context("--listen (or `listen` in the config file) is required")?
            .parse()
            .context("listen: host:port with a numeric address, e.g. 0.0.0.0:9444")?,
    };
    let db = args.db.or(file.db).context("--db (or `db` in the config file) is required")?;
    let passphrase_file = args
        .passphrase_file
        .or(file.passphrase_file)
        .context("--passphrase-file (or `passphrase_file` in the config file) is required")?;
    let tls_dir = args.tls_dir.or(file.tls_dir).context("--tls-dir (or `tls_dir` in the config file) is required")?;
    let tls_names = if args.tls_names.is_empty() { file.tls_names.unwrap_or_default() } else { args.tls_names };
    let timeout = args
        .heartbeat_timeout
        .or(file.heartbeat_timeout_seconds)
        .map(Duration::from_secs)
        .unwrap_or(HEARTBEAT_TIMEOUT_DEFAULT);
    anyhow::ensure!(!timeout.is_zero(), "the heartbeat timeout must be at least 1 second");
    // read_passphrase warns when the file is readable by group or others.
    let passphrase = read_passphrase(&passphrase_file)?;
    churnlog::control::check_passphrase(&passphrase)?;
    let config = CsConfig { listen, db, passphrase, tls_dir: tls_dir.clone(), tls_names, heartbeat_timeout: timeout };
    Ok((config, tls_dir, args.addr_file))
}

pub fn run(command: CsCommand) -> anyhow::Result<ExitCode> {
    match command {
        CsCommand::Run(args) => cs_run(args),
        CsCommand::Passphrase { out } => {
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("random: {e}"))?;
            let text = format!("{}\n", hex::encode(raw));
            churnlog::secrets::create_private(&out, text.as_bytes()).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow::anyhow!("{} exists: refusing to replace a passphrase (remove it first)", out.display())
                } else {
                    anyhow::anyhow!("create {}: {e}", out.display())
                }
            })?;
            println!("wrote a 64-character random passphrase to {} (mode 0600)", out.display());
            Ok(ExitCode::SUCCESS)
        }
        CsCommand::Migrate { cs, machine, all, from, to, json } => {
            anyhow::ensure!(machine.is_some() != all, "give either --machine NAME or --all --from PS");
            let body = api::Migrate { machine, all_from: from, to };
            let done: api::Migrated = runtime()?
                .block_on(async { cs.client()?.post(api::PATH_MIGRATE, &body).await.map_err(anyhow::Error::from) })?;
            if json {
                print_json(&done)?;
            } else {
                println!(
                    "moving {} machine(s) to {}: {} (each moves once its old server has uploaded its cached data)",
                    done.machines.len(),
                    body.to,
                    done.machines.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CsCommand::Unregister { cs, ps, purge, json } => {
            let body = api::Unregister { ps: ps.clone(), purge, force: false };
            let done: api::Unregistered = runtime()?.block_on(async {
                cs.client()?.post(api::PATH_PS_UNREGISTER, &body).await.map_err(anyhow::Error::from)
            })?;
            if json {
                print_json(&done)?;
            } else {
                println!("unregistered process server {ps}");
                for (m, to) in &done.moved {
                    println!("  machine {m} now on {to}");
                }
                if !done.resync_required.is_empty() {
                    println!(
                        "  resync required (cached data was lost with the server): {}",
                        done.resync_required.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CsCommand::Reassign { cs, machine } => {
            let body = api::Reassign { name: machine.clone() };
            let _: api::Reassign = runtime()?.block_on(async {
                cs.client()?.post(api::PATH_MACHINE_REASSIGN, &body).await.map_err(anyhow::Error::from)
            })?;
            println!("machine name {machine} released: the next machine to register it gets a new credential");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn cs_run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (config, tls_dir, addr_file) = settings(args)?;
    runtime()?.block_on(async move {
        let cs = ConfigServer::start(config).await?;
        let addr = cs.local_addr;
        println!("configuration server listening on {addr}");
        println!(
            "certificate (give it to process servers, agents and operators): {}",
            tls_dir.join("cert.pem").display()
        );
        println!("status page: https://{addr}/status#view={}", cs.status_view_token());
        println!("metrics: https://{addr}/metrics");
        if let Some(f) = addr_file {
            std::fs::write(&f, addr.to_string()).with_context(|| format!("write {}", f.display()))?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        tracing::info!("stopping the configuration server");
        cs.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_paths_are_relative_to_it_and_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cs.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:9444\"\ndb = \"cs.db\"\npassphrase_file = \"pp\"\ntls_dir = \"/etc/tls\"\nheartbeat_timeout_seconds = 60\n",
        )
        .unwrap();
        let f = load_file(&p).unwrap();
        assert_eq!(f.db.unwrap(), dir.path().join("cs.db").display().to_string());
        assert_eq!(f.passphrase_file.unwrap(), dir.path().join("pp"));
        assert_eq!(f.tls_dir.unwrap(), PathBuf::from("/etc/tls"));
        std::fs::write(&p, "db = \"postgres://u@h/db\"\n").unwrap();
        assert_eq!(load_file(&p).unwrap().db.unwrap(), "postgres://u@h/db");
        std::fs::write(&p, "lisen = \"x\"\n").unwrap();
        assert!(load_file(&p).unwrap_err().to_string().contains("lisen"));
    }
}
