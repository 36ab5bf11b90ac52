//! `churnlog setup`: the seed's unattended installer. Every value is checked first (one
//! error naming the parameter), then free space; then it creates the TLS identity and,
//! for a process server, registers with the CS and writes `DIR/ps.toml` (for a CS,
//! `DIR/cs.toml`). Whatever it created is removed again if any step fails: nothing is
//! left half-installed.

use std::path::{Path, PathBuf};

use super::ps_link::{self, LinkConfig, LinkError, HEARTBEAT_INTERVAL_DEFAULT};
use crate::protocol::auth::AuthKey;

/// The installer's parameters as given (long options of `churnlog setup`).
#[derive(Debug, Clone, Default)]
pub struct SetupParams {
    pub server_mode: Option<String>,
    pub install_location: Option<PathBuf>,
    pub cs_ip: Option<String>,
    pub cs_cert: Option<PathBuf>,
    pub ps_ip: Option<String>,
    pub passphrase_file_path: Option<PathBuf>,
    pub data_transfer_secure_port: Option<String>,
    pub proxy_settings_file_path: Option<PathBuf>,
    pub bypass_proxy: bool,
    pub env_type: Option<String>,
    pub skip_space_check: bool,
    pub cache_size: Option<String>,
    /// The object store (`file://`, `az://`, `s3://`): an addition to the seed's list.
    pub target: Option<String>,
    /// Default: the host name.
    pub ps_id: Option<String>,
    /// Optional: where `ps run` serves /metrics and /status.json.
    pub metrics_listen: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A parameter's value is wrong or missing; `param` is the long option.
    #[error("--{param}: {message}")]
    Invalid { param: &'static str, message: String },
    #[error("--install-location {dir}: {free} bytes free, --cache-size needs {needed} (use --skip-space-check to install anyway)")]
    Space { dir: PathBuf, free: u64, needed: u64 },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("TLS identity: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Register(#[from] LinkError),
}

fn invalid(param: &'static str, message: impl Into<String>) -> SetupError {
    SetupError::Invalid { param, message: message.into() }
}

fn need<T>(v: Option<T>, param: &'static str) -> Result<T, SetupError> {
    v.ok_or_else(|| invalid(param, "is required"))
}

/// Server modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ps,
    Cs,
}

/// The checked parameters of a process server install.
#[derive(Debug, Clone)]
pub struct PsPlan {
    pub dir: PathBuf,
    pub cs_address: String,
    pub cs_cert_pem: String,
    pub ps_ip: String,
    pub port: u16,
    pub passphrase_file: PathBuf,
    pub passphrase: String,
    pub proxy_file: Option<PathBuf>,
    pub cache_size_bytes: u64,
    pub target: String,
    pub ps_id: String,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The checked parameters of a CS install.
#[derive(Debug, Clone)]
pub struct CsPlan {
    pub dir: PathBuf,
    pub port: u16,
    pub passphrase_file: PathBuf,
    pub tls_names: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Plan {
    Ps(PsPlan),
    Cs(CsPlan),
}

/// What an install created.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    /// `DIR/ps.toml` or `DIR/cs.toml`.
    pub config: PathBuf,
    pub cert: PathBuf,
}

fn host_name() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_string())
}

fn absolute(param: &'static str, p: PathBuf) -> Result<PathBuf, SetupError> {
    if p.is_absolute() {
        return Ok(p);
    }
    let cwd = std::env::current_dir().map_err(|e| invalid(param, e.to_string()))?;
    Ok(cwd.join(p))
}

fn check_host(param: &'static str, host: &str) -> Result<(), SetupError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(param, format!("{host:?} is not an IP address or host name")))
    }
}

fn read_passphrase(p: Option<PathBuf>) -> Result<(PathBuf, String), SetupError> {
    const P: &str = "passphrase-file-path";
    let path = absolute(P, need(p, P)?)?;
    let text = std::fs::read_to_string(&path).map_err(|e| invalid(P, format!("{}: {e}", path.display())))?;
    super::check_passphrase(&text).map_err(|e| invalid(P, e.to_string()))?;
    crate::secrets::warn_if_exposed(&path);
    Ok((path, text.trim().to_string()))
}

fn parse_port(v: Option<String>) -> Result<u16, SetupError> {
    const P: &str = "data-transfer-secure-port";
    match v {
        None => Ok(crate::protocol::DEFAULT_PORT),
        Some(s) => match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(invalid(P, format!("{s:?} is not a port (1 to 65535)"))),
        },
    }
}

/// Checks every parameter (nothing is created yet). The first wrong one is the error.
pub fn plan(p: SetupParams) -> Result<Plan, SetupError> {
    let mode = match need(p.server_mode.clone(), "server-mode")?.to_ascii_lowercase().as_str() {
        "ps" => Mode::Ps,
        "cs" => Mode::Cs,
        other => return Err(invalid("server-mode", format!("{other:?}: expected ps or cs"))),
    };
    let dir = absolute("install-location", need(p.install_location.clone(), "install-location")?)?;
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(&dir).map_err(|e| invalid("install-location", format!("{}: {e}", dir.display())))?;
        if entries.next().is_some() {
            return Err(invalid("install-location", format!("{} exists and is not empty", dir.display())));
        }
    }
    if let Some(env) = &p.env_type {
        if !matches!(env.to_ascii_lowercase().as_str(), "vmware" | "non-vmware") {
            return Err(invalid("env-type", format!("{env:?}: expected vmware or non-vmware")));
        }
    }
    let port = parse_port(p.data_transfer_secure_port.clone())?;
    if mode == Mode::Cs {
        let (passphrase_file, _) = read_passphrase(p.passphrase_file_path)?;
        let (mut tls_names, mut port) = (Vec::new(), port);
        if let Some(cs) = &p.cs_ip {
            crate::config::check_host_port("cs_ip", cs).map_err(|e| invalid("cs-ip", e.to_string()))?;
            let (host, cs_port) = cs.rsplit_once(':').expect("checked");
            check_host("cs-ip", host)?;
            tls_names.push(host.to_string());
            port = cs_port.parse().expect("checked");
        }
        return Ok(Plan::Cs(CsPlan { dir, port, passphrase_file, tls_names }));
    }
    let cs_address = need(p.cs_ip, "cs-ip")?;
    crate::config::check_host_port("cs_ip", &cs_address)
        .map_err(|_| invalid("cs-ip", format!("{cs_address:?} is not HOST:PORT of the configuration server")))?;
    let cs_cert = absolute("cs-cert", need(p.cs_cert, "cs-cert")?)?;
    let cs_cert_pem =
        std::fs::read_to_string(&cs_cert).map_err(|e| invalid("cs-cert", format!("{}: {e}", cs_cert.display())))?;
    {
        use rustls_pki_types::pem::PemObject;
        let certs: Result<Vec<_>, _> =
            rustls_pki_types::CertificateDer::pem_slice_iter(cs_cert_pem.as_bytes()).collect();
        match certs {
            Ok(c) if !c.is_empty() => {}
            Ok(_) => return Err(invalid("cs-cert", format!("{}: holds no PEM certificate", cs_cert.display()))),
            Err(e) => return Err(invalid("cs-cert", format!("{}: not a PEM certificate: {e}", cs_cert.display()))),
        }
    }
    let ps_ip = need(p.ps_ip, "ps-ip")?;
    check_host("ps-ip", &ps_ip)?;
    let (passphrase_file, passphrase) = read_passphrase(p.passphrase_file_path)?;
    let proxy_file = match (p.proxy_settings_file_path, p.bypass_proxy) {
        (Some(_), true) => {
            return Err(invalid("proxy-settings-file-path", "give either it or --bypass-proxy, not both"))
        }
        (None, false) => {
            return Err(invalid("proxy-settings-file-path", "is required (or --bypass-proxy for a direct connection)"))
        }
        (None, true) => None,
        (Some(f), false) => {
            const P: &str = "proxy-settings-file-path";
            let f = absolute(P, f)?;
            let text = std::fs::read_to_string(&f).map_err(|e| invalid(P, format!("{}: {e}", f.display())))?;
            crate::proxy::ProxySettings::parse(&text).map_err(|e| invalid(P, format!("{}: {e}", f.display())))?;
            Some(f)
        }
    };
    let cache_size = need(p.cache_size, "cache-size")?;
    let cache_size_bytes = crate::size::parse_size(&cache_size).map_err(|e| invalid("cache-size", e))?;
    if cache_size_bytes == 0 {
        return Err(invalid("cache-size", "must be more than 0 bytes"));
    }
    let target = need(p.target, "target")?;
    crate::store::Target::from_url(&target, None).map_err(|e| invalid("target", e.to_string()))?;
    let ps_id = match p.ps_id {
        Some(id) => id,
        None => host_name().ok_or_else(|| invalid("ps-id", "is required (the host name is not readable)"))?,
    };
    super::api::check_name("ps_id", &ps_id).map_err(|e| invalid("ps-id", e.error))?;
    let metrics_listen = match p.metrics_listen {
        None => None,
        Some(m) => Some(m.parse().map_err(|_| invalid("metrics-listen", format!("{m:?} is not IP:PORT")))?),
    };
    Ok(Plan::Ps(PsPlan {
        dir,
        cs_address,
        cs_cert_pem,
        ps_ip,
        port,
        passphrase_file,
        passphrase,
        proxy_file,
        cache_size_bytes,
        target,
        ps_id,
        metrics_listen,
    }))
}

/// Bytes available to an unprivileged user on the file system that holds `dir` (or its
/// nearest existing ancestor, when it does not exist yet).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut at = dir;
    while !at.exists() {
        at = at.parent().unwrap_or(Path::new("/"));
    }
    let st = rustix::fs::statvfs(at)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuses when the cache would not fit (unless skipped).
pub fn check_space(plan: &PsPlan, skip: bool) -> Result<(), SetupError> {
    if skip {
        return Ok(());
    }
    let free = free_bytes(&plan.dir).map_err(|source| SetupError::Io {
        what: "free space of",
        path: plan.dir.clone(),
        source,
    })?;
    if free < plan.cache_size_bytes {
        return Err(SetupError::Space { dir: plan.dir.clone(), free, needed: plan.cache_size_bytes });
    }
    Ok(())
}

/// A TOML basic string (JSON string escapes are valid TOML ones).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

/// Removes what an install created, on failure.
struct Rollback {
    /// The install directory, if this install created it.
    created_dir: Option<PathBuf>,
    /// Entries created inside an existing (empty) directory.
    created: Vec<PathBuf>,
    done: bool,
}

impl Rollback {
    fn begin(dir: &Path) -> Result<Rollback, SetupError> {
        let io = |source| SetupError::Io { what: "create", path: dir.to_path_buf(), source };
        if dir.exists() {
            return Ok(Rollback { created_dir: None, created: Vec::new(), done: false });
        }
        // Only the last component is ours to remove; parents must exist.
        std::fs::create_dir(dir).map_err(io)?;
        Ok(Rollback { created_dir: Some(dir.to_path_buf()), created: Vec::new(), done: false })
    }

    fn note(&mut self, p: PathBuf) {
        self.created.push(p);
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for p in self.created.iter().rev() {
            let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
        }
        if let Some(d) = &self.created_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn write_new(path: &Path, text: &str) -> Result<(), SetupError> {
    crate::secrets::create_private(path, text.as_bytes()).map_err(|source| SetupError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Installs a process server: TLS identity, the CS certificate beside it, registration,
/// `ps.toml`. On any failure nothing it created remains.
pub async fn install_ps(plan: &PsPlan) -> Result<Installed, SetupError> {
    let mut rollback = Rollback::begin(&plan.dir)?;
    let tls_dir = plan.dir.join("tls");
    rollback.note(tls_dir.clone());
    let tls_names = vec![plan.ps_ip.clone()];
    let (_, cert_pem) = crate::tls::server_config(&tls_dir, &tls_names)?;
    let cs_cert = plan.dir.join("cs.pem");
    rollback.note(cs_cert.clone());
    write_new(&cs_cert, &plan.cs_cert_pem)?;
    let cache_dir = plan.dir.join("cache");
    let advertise = format!("{}:{}", plan.ps_ip, plan.port);
    let mut text = format!(
        "# Written by churnlog setup. `churnlog ps run --config {config}` starts this process server.\n\
         cache_dir = {cache_dir}\n\
         cache_size = {cache_size}\n\
         listen = {listen}\n\
         advertise_address = {advertise}\n\
         target = {target}\n\
         passphrase_file = {passphrase}\n\
         tls_dir = {tls}\n\
         tls_names = [{name}]\n\
         cs_address = {cs}\n\
         cs_cert = {cs_cert}\n\
         ps_id = {id}\n",
        config = plan.dir.join("ps.toml").display(),
        cache_dir = toml_path(&cache_dir),
        cache_size = plan.cache_size_bytes,
        listen = toml_str(&format!("0.0.0.0:{}", plan.port)),
        advertise = toml_str(&advertise),
        target = toml_str(&plan.target),
        passphrase = toml_path(&plan.passphrase_file),
        tls = toml_path(&tls_dir),
        name = toml_str(&plan.ps_ip),
        cs = toml_str(&plan.cs_address),
        cs_cert = toml_path(&cs_cert),
        id = toml_str(&plan.ps_id),
    );
    if let Some(p) = &plan.proxy_file {
        text.push_str(&format!("proxy_file = {}\n", toml_path(p)));
    }
    if let Some(m) = &plan.metrics_listen {
        text.push_str(&format!("metrics_listen = {}\n", toml_str(&m.to_string())));
    }
    // The file must read back as `ps run` will read it.
    crate::config::PsRunConfig::parse(&text)
        .and_then(|c| c.settle().map_err(|e| e.to_string()))
        .map_err(|e| invalid("install-location", format!("the generated ps.toml does not check out: {e}")))?;
    let config = plan.dir.join("ps.toml");
    rollback.note(config.clone());
    write_new(&config, &text)?;
    let link = LinkConfig {
        cs_address: plan.cs_address.clone(),
        cs_cert_pem: plan.cs_cert_pem.clone(),
        ps_id: plan.ps_id.clone(),
        advertise_address: advertise,
        heartbeat_interval: HEARTBEAT_INTERVAL_DEFAULT,
        key: AuthKey::from_passphrase(&plan.passphrase),
    };
    ps_link::register(&link, &cert_pem, plan.cache_size_bytes).await?;
    rollback.done = true;
    Ok(Installed { config, cert: tls_dir.join("cert.pem") })
}

/// Installs a configuration server: its TLS identity and `cs.toml` (read by `cs run
/// --config`).
pub fn install_cs(plan: &CsPlan) -> Result<Installed, SetupError> {
    let mut rollback = Rollback::begin(&plan.dir)?;
    let tls_dir = plan.dir.join("tls");
    rollback.note(tls_dir.clone());
    crate::tls::server_config(&tls_dir, &plan.tls_names)?;
    let names: Vec<String> = plan.tls_names.iter().map(|n| toml_str(n)).collect();
    let text = format!(
        "# Written by churnlog setup. `churnlog cs run --config {config}` starts this configuration server.\n\
         listen = {listen}\n\
         db = {db}\n\
         passphrase_file = {passphrase}\n\
         tls_dir = {tls}\n\
         tls_names = [{names}]\n",
        config = plan.dir.join("cs.toml").display(),
        listen = toml_str(&format!("0.0.0.0:{}", plan.port)),
        db = toml_path(&plan.dir.join("cs.db")),
        passphrase = toml_path(&plan.passphrase_file),
        tls = toml_path(&tls_dir),
        names = names.join(", "),
    );
    let config = plan.dir.join("cs.toml");
    rollback.note(config.clone());
    write_new(&config, &text)?;
    rollback.done = true;
    Ok(Installed { config, cert: tls_dir.join("cert.pem") })
}

/// The whole install: check, space, create. For the CLI and tests.
pub async fn setup(params: SetupParams) -> Result<Installed, SetupError> {
    let skip = params.skip_space_check;
    match plan(params)? {
        Plan::Ps(plan) => {
            check_space(&plan, skip)?;
            install_ps(&plan).await
        }
        Plan::Cs(plan) => install_cs(&plan),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASS: &str = "a setup passphrase of some length";

    /// Valid ps-mode parameters against files in `dir` (the CS is not reachable).
    fn params(dir: &Path) -> SetupParams {
        let pass = dir.join("pass");
        if !pass.exists() {
            crate::secrets::create_private(&pass, PASS.as_bytes()).unwrap();
            let (_, pem) = crate::tls::server_config(&dir.join("cs-tls"), &[]).unwrap();
            std::fs::write(dir.join("cs.pem"), pem).unwrap();
        }
        SetupParams {
            server_mode: Some("ps".into()),
            install_location: Some(dir.join("install")),
            cs_ip: Some("127.0.0.1:1".into()),
            cs_cert: Some(dir.join("cs.pem")),
            ps_ip: Some("127.0.0.1".into()),
            passphrase_file_path: Some(pass),
            data_transfer_secure_port: None,
            proxy_settings_file_path: None,
            bypass_proxy: true,
            env_type: Some("non-vmware".into()),
            skip_space_check: false,
            cache_size: Some("1MiB".into()),
            target: Some(format!("file://{}", dir.join("store").display())),
            ps_id: Some("ps1".into()),
            metrics_listen: None,
        }
    }

    fn param_of(e: SetupError) -> &'static str {
        match e {
            SetupError::Invalid { param, .. } => param,
            other => panic!("not a parameter error: {other}"),
        }
    }

    #[test]
    fn each_bad_value_names_its_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(matches!(plan(params(d)), Ok(Plan::Ps(_))));
        type Edit = Box<dyn Fn(&mut SetupParams)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("server-mode", Box::new(|p| p.server_mode = Some("both".into()))),
            ("install-location", Box::new(|p| p.install_location = None)),
            ("cs-ip", Box::new(|p| p.cs_ip = Some("10.0.0.1".into()))),
            ("cs-ip", Box::new(|p| p.cs_ip = None)),
            ("cs-cert", Box::new(|p| p.cs_cert = Some("/nonexistent/cs.pem".into()))),
            ("ps-ip", Box::new(|p| p.ps_ip = Some("not a host!".into()))),
            ("passphrase-file-path", Box::new(|p| p.passphrase_file_path = Some("/nonexistent".into()))),
            ("data-transfer-secure-port", Box::new(|p| p.data_transfer_secure_port = Some("70000".into()))),
            ("data-transfer-secure-port", Box::new(|p| p.data_transfer_secure_port = Some("0".into()))),
            ("proxy-settings-file-path", Box::new(|p| p.bypass_proxy = false)),
            ("proxy-settings-file-path", Box::new(|p| p.proxy_settings_file_path = Some("/etc/hosts".into()))),
            ("env-type", Box::new(|p| p.env_type = Some("xen".into()))),
            ("cache-size", Box::new(|p| p.cache_size = Some("lots".into()))),
            ("cache-size", Box::new(|p| p.cache_size = Some("0".into()))),
            ("target", Box::new(|p| p.target = Some("ftp://x".into()))),
            ("ps-id", Box::new(|p| p.ps_id = Some("no spaces".into()))),
            ("metrics-listen", Box::new(|p| p.metrics_listen = Some("nowhere".into()))),
        ];
        for (param, edit) in cases {
            let mut p = params(d);
            edit(&mut p);
            let e = plan(p).unwrap_err();
            let text = e.to_string();
            assert!(text.starts_with(&format!("--{param}: ")), "{text}");
            assert_eq!(param_of(e), param);
        }
        // A cert file that is not a certificate.
        std::fs::write(d.join("garbage.pem"), "not pem").unwrap();
        let e = plan(SetupParams { cs_cert: Some(d.join("garbage.pem")), ..params(d) }).unwrap_err();
        assert_eq!(param_of(e), "cs-cert");
        // A short passphrase.
        crate::secrets::create_private(&d.join("short"), b"short").unwrap();
        let e = plan(SetupParams { passphrase_file_path: Some(d.join("short")), ..params(d) }).unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        assert_eq!(param_of(e), "passphrase-file-path");
        // A non-empty install location.
        std::fs::create_dir(d.join("install")).unwrap();
        std::fs::write(d.join("install/x"), "").unwrap();
        assert_eq!(param_of(plan(params(d)).unwrap_err()), "install-location");
    }

    #[test]
    fn too_little_space_is_refused_unless_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let Plan::Ps(p) = plan(SetupParams { cache_size: Some("900000TiB".into()), ..params(d) }).unwrap() else {
            panic!()
        };
        let e = check_space(&p, false).unwrap_err();
        assert!(matches!(e, SetupError::Space { .. }), "{e}");
        assert!(e.to_string().contains("--skip-space-check"), "{e}");
        check_space(&p, true).unwrap();
        assert!(free_bytes(&d.join("a/b/c")).unwrap() > 0, "measured at the nearest existing ancestor");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_install_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Nothing listens on 127.0.0.1:1: registration fails after the files were made.
        let e = setup(params(d)).await.unwrap_err();
        assert!(matches!(e, SetupError::Register(_)), "{e}");
        assert!(!d.join("install").exists(), "the install directory it created is gone");
        // In an existing empty directory: the directory stays, empty.
        std::fs::create_dir(d.join("install")).unwrap();
        let e = setup(params(d)).await.unwrap_err();
        assert!(matches!(e, SetupError::Register(_)), "{e}");
        assert_eq!(std::fs::read_dir(d.join("install")).unwrap().count(), 0);
        // Too little space: nothing created at all.
        std::fs::remove_dir(d.join("install")).unwrap();
        let e = setup(SetupParams { cache_size: Some("900000TiB".into()), ..params(d) }).await.unwrap_err();
        assert!(matches!(e, SetupError::Space { .. }), "{e}");
        assert!(!d.join("install").exists());
    }

    #[test]
    fn cs_mode_writes_cs_toml() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p = SetupParams { server_mode: Some("cs".into()), cs_ip: Some("cs.example.net:8443".into()), ..params(d) };
        let Plan::Cs(plan) = plan(p).unwrap() else { panic!() };
        let installed = install_cs(&plan).unwrap();
        let text = std::fs::read_to_string(&installed.config).unwrap();
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["listen"].as_str(), Some("0.0.0.0:8443"));
        assert_eq!(v["db"].as_str().map(PathBuf::from), Some(d.join("install/cs.db")));
        assert_eq!(v["tls_names"].as_array().unwrap()[0].as_str(), Some("cs.example.net"));
        assert!(v.contains_key("passphrase_file") && v.contains_key("tls_dir"));
        assert!(installed.cert.exists());
    }
}
