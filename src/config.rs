//! The process server's settings: a TOML file (`ps run --config FILE`) and the command
//! line set the same keys; a flag given on the command line wins over the file. Keys are
//! the long flags with `_` for `-` (`cache_dir`, `cache_size`, `work_hours`, ...), so the
//! operator's guide documents one list. Unknown keys are an error, not a silent typo.
//!
//! Relative paths in a file are taken relative to the file's directory, so a file and the
//! passphrase beside it keep working whatever directory the service starts in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::control::health::Thresholds;
use crate::drain::{BandwidthSchedule, WorkHours};
use crate::size::parse_size;

/// A config file larger than this is refused before parsing (it is a few hundred bytes).
pub const CONFIG_BYTES_MAX: u64 = 64 << 10;

/// Every address, on the data-transfer port of the seed ([`crate::protocol::DEFAULT_PORT`]).
pub const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), crate::protocol::DEFAULT_PORT);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("config {path} is {len} bytes; the limit is {CONFIG_BYTES_MAX}")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} is required: give --{flag} or set {key} in the config file")]
    Missing { key: &'static str, flag: &'static str },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A size as a number of bytes or a string with a unit (`"300GiB"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self, key: &'static str) -> Result<u64, ConfigError> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(s) => parse_size(s).map_err(|message| ConfigError::Invalid { key, message }),
        }
    }
}

/// `ps run` settings as given, every one optional: from a file, or from flags.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PsRunConfig {
    pub cache_dir: Option<PathBuf>,
    pub cache_size: Option<SizeValue>,
    pub listen: Option<SocketAddr>,
    /// `file:///abs/dir`, `az://container/prefix` or `s3://bucket/prefix`.
    pub target: Option<String>,
    pub passphrase_file: Option<PathBuf>,
    pub tls_dir: Option<PathBuf>,
    pub proxy_file: Option<PathBuf>,
    pub tls_names: Option<Vec<String>>,
    pub bandwidth_mbps: Option<f64>,
    pub work_hours: Option<String>,
    pub work_days: Option<String>,
    pub work_mbps: Option<f64>,
    pub utc_offset_min: Option<i32>,
    /// Highest LZ4 acceleration when the CPU is the bottleneck (1 = best ratio always).
    pub lz4_acceleration_max: Option<u32>,
    /// host:port of the configuration server; unset: a standalone server.
    pub cs_address: Option<String>,
    /// The CS certificate (PEM file), the only one trusted for it.
    pub cs_cert: Option<PathBuf>,
    /// This server's id at the CS.
    pub ps_id: Option<String>,
    /// host:port agents use to reach this server (handed to them by the CS).
    pub advertise_address: Option<String>,
    pub heartbeat_interval_seconds: Option<u64>,
    /// host:port for `GET /metrics` and `GET /status.json` (plain HTTP).
    pub metrics_listen: Option<SocketAddr>,
    /// Health thresholds (`[health]` table); each key optional.
    pub health: Option<Thresholds>,
}

/// The CS link as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct CsSettings {
    pub cs_address: String,
    pub cs_cert: PathBuf,
    pub ps_id: String,
    pub advertise_address: String,
    pub heartbeat_interval_seconds: u64,
}

/// `ps run` settings after merging and checking: everything the server needs.
#[derive(Debug, Clone)]
pub struct PsRunSettings {
    pub cache_dir: PathBuf,
    pub cache_size_bytes: u64,
    pub listen: SocketAddr,
    pub target: String,
    pub passphrase_file: PathBuf,
    pub tls_dir: PathBuf,
    pub proxy_file: Option<PathBuf>,
    pub tls_names: Vec<String>,
    pub bandwidth: BandwidthSchedule,
    /// None: the engine's default.
    pub lz4_acceleration_max: Option<u32>,
    /// None: standalone (passphrase-only logins).
    pub cs: Option<CsSettings>,
    pub metrics_listen: Option<SocketAddr>,
    pub health: Thresholds,
}

impl PsRunConfig {
    /// Reads and parses a TOML file; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<PsRunConfig, ConfigError> {
        use std::io::Read;
        let io = |source| ConfigError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > CONFIG_BYTES_MAX {
            return Err(ConfigError::TooLarge { path: path.to_path_buf(), len });
        }
        let mut text = String::new();
        // The cap holds even if the file grows between the check and the read.
        file.take(CONFIG_BYTES_MAX + 1).read_to_string(&mut text).map_err(io)?;
        if text.len() as u64 > CONFIG_BYTES_MAX {
            return Err(ConfigError::TooLarge { path: path.to_path_buf(), len: text.len() as u64 });
        }
        let mut cfg =
            PsRunConfig::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(cfg)
    }

    /// Parses TOML text; the error names the line and the key.
    pub fn parse(text: &str) -> Result<PsRunConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in
            [&mut self.cache_dir, &mut self.passphrase_file, &mut self.tls_dir, &mut self.proxy_file, &mut self.cs_cert]
                .into_iter()
                .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// `self` with every setting `over` gives replaced by it (flags over the file).
    pub fn overlay(self, over: PsRunConfig) -> PsRunConfig {
        PsRunConfig {
            cache_dir: over.cache_dir.or(self.cache_dir),
            cache_size: over.cache_size.or(self.cache_size),
            listen: over.listen.or(self.listen),
            target: over.target.or(self.target),
            passphrase_file: over.passphrase_file.or(self.passphrase_file),
            tls_dir: over.tls_dir.or(self.tls_dir),
            proxy_file: over.proxy_file.or(self.proxy_file),
            tls_names: over.tls_names.or(self.tls_names),
            bandwidth_mbps: over.bandwidth_mbps.or(self.bandwidth_mbps),
            work_hours: over.work_hours.or(self.work_hours),
            work_days: over.work_days.or(self.work_days),
            work_mbps: over.work_mbps.or(self.work_mbps),
            utc_offset_min: over.utc_offset_min.or(self.utc_offset_min),
            lz4_acceleration_max: over.lz4_acceleration_max.or(self.lz4_acceleration_max),
            cs_address: over.cs_address.or(self.cs_address),
            cs_cert: over.cs_cert.or(self.cs_cert),
            ps_id: over.ps_id.or(self.ps_id),
            advertise_address: over.advertise_address.or(self.advertise_address),
            heartbeat_interval_seconds: over.heartbeat_interval_seconds.or(self.heartbeat_interval_seconds),
            metrics_listen: over.metrics_listen.or(self.metrics_listen),
            health: over.health.or(self.health),
        }
    }

    /// Checks the merged settings: required ones present, sizes and schedules valid.
    pub fn settle(self) -> Result<PsRunSettings, ConfigError> {
        fn need<T>(v: Option<T>, key: &'static str, flag: &'static str) -> Result<T, ConfigError> {
            v.ok_or(ConfigError::Missing { key, flag })
        }
        let cache_size_bytes = need(self.cache_size, "cache_size", "cache-size")?.bytes("cache_size")?;
        if cache_size_bytes == 0 {
            return Err(ConfigError::Invalid { key: "cache_size", message: "must be more than 0 bytes".into() });
        }
        for (key, v) in [("bandwidth_mbps", self.bandwidth_mbps), ("work_mbps", self.work_mbps)] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(ConfigError::Invalid { key, message: format!("a positive number of MB/s, got {v}") });
                }
            }
        }
        let work_hours = match (&self.work_hours, self.work_mbps) {
            (Some(h), Some(_)) => {
                let days = self.work_days.as_deref().unwrap_or("mon-fri");
                let wh = WorkHours::parse(h, days, self.utc_offset_min.unwrap_or(0))
                    .map_err(|e| ConfigError::Invalid { key: "work_hours", message: e.to_string() })?;
                Some(wh)
            }
            (Some(_), None) => return Err(ConfigError::Missing { key: "work_mbps", flag: "work-mbps" }),
            (None, _) => None,
        };
        if let Some(a) = self.lz4_acceleration_max {
            crate::cache::effort::check_acceleration_max(a)
                .map_err(|message| ConfigError::Invalid { key: "lz4_acceleration_max", message })?;
        }
        let listen = self.listen.unwrap_or(DEFAULT_LISTEN);
        let health = self.health.unwrap_or_default();
        health.validate().map_err(|e| ConfigError::Invalid { key: "health", message: e.to_string() })?;
        let cs = match self.cs_address {
            None => {
                for (key, set) in [
                    ("cs_cert", self.cs_cert.is_some()),
                    ("ps_id", self.ps_id.is_some()),
                    ("advertise_address", self.advertise_address.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::Invalid { key, message: "given without cs_address".into() });
                    }
                }
                None
            }
            Some(cs_address) => {
                check_host_port("cs_address", &cs_address)?;
                let advertise_address = need(self.advertise_address, "advertise_address", "advertise-address")?;
                check_host_port("advertise_address", &advertise_address)?;
                let ps_id = need(self.ps_id, "ps_id", "ps-id")?;
                crate::control::api::check_name("ps_id", &ps_id)
                    .map_err(|e| ConfigError::Invalid { key: "ps_id", message: e.error })?;
                let heartbeat_interval_seconds = self.heartbeat_interval_seconds.unwrap_or(30);
                if heartbeat_interval_seconds == 0 {
                    return Err(ConfigError::Invalid {
                        key: "heartbeat_interval_seconds",
                        message: "must be at least 1".into(),
                    });
                }
                Some(CsSettings {
                    cs_address,
                    cs_cert: need(self.cs_cert, "cs_cert", "cs-cert")?,
                    ps_id,
                    advertise_address,
                    heartbeat_interval_seconds,
                })
            }
        };
        Ok(PsRunSettings {
            cache_dir: need(self.cache_dir, "cache_dir", "cache-dir")?,
            cache_size_bytes,
            listen,
            target: need(self.target, "target", "target")?,
            passphrase_file: need(self.passphrase_file, "passphrase_file", "passphrase-file")?,
            tls_dir: need(self.tls_dir, "tls_dir", "tls-dir")?,
            proxy_file: self.proxy_file,
            tls_names: self.tls_names.unwrap_or_default(),
            bandwidth: BandwidthSchedule {
                off_mb_per_s: self.bandwidth_mbps,
                work_mb_per_s: self.work_mbps,
                work_hours,
            },
            lz4_acceleration_max: self.lz4_acceleration_max,
            cs,
            metrics_listen: self.metrics_listen,
            health,
        })
    }
}

/// `host:port` with a non-empty host and a port in 1..=65535.
pub fn check_host_port(key: &'static str, value: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::Invalid { key, message: format!("{value:?} is not host:port") };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        cache_dir = "cache"
        cache_size = "300GiB"
        listen = "127.0.0.1:9443"
        target = "s3://dr-bucket/site-a"
        passphrase_file = "/etc/churnlog/passphrase"
        tls_dir = "tls"
        tls_names = ["ps1.example.net"]
        bandwidth_mbps = 100.0
        work_hours = "08:00-18:00"
        work_mbps = 20.5
        utc_offset_min = -300
        lz4_acceleration_max = 1
    "#;

    #[test]
    fn a_full_file_settles() {
        let mut cfg = PsRunConfig::parse(FULL).unwrap();
        cfg.resolve_paths(Path::new("/srv/churnlog"));
        let s = cfg.settle().unwrap();
        assert_eq!(s.cache_dir, PathBuf::from("/srv/churnlog/cache"));
        assert_eq!(s.passphrase_file, PathBuf::from("/etc/churnlog/passphrase"));
        assert_eq!(s.cache_size_bytes, 300 << 30);
        assert_eq!(s.listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(s.tls_names, vec!["ps1.example.net".to_string()]);
        assert_eq!(s.bandwidth.off_mb_per_s, Some(100.0));
        assert_eq!(s.bandwidth.work_mb_per_s, Some(20.5));
        assert!(s.bandwidth.work_hours.is_some());
        assert_eq!(s.lz4_acceleration_max, Some(1));
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file = PsRunConfig::parse(FULL).unwrap();
        let flags = PsRunConfig {
            cache_size: Some(SizeValue::Bytes(1 << 30)),
            target: Some("file:///tmp/t".into()),
            ..PsRunConfig::default()
        };
        let s = file.overlay(flags).settle().unwrap();
        assert_eq!(s.cache_size_bytes, 1 << 30);
        assert_eq!(s.target, "file:///tmp/t");
        assert_eq!(s.tls_dir, PathBuf::from("tls"));

        let minimal = PsRunConfig::parse(
            "cache_dir='/c'\ncache_size=1073741824\ntarget='file:///t'\npassphrase_file='/p'\ntls_dir='/t'",
        )
        .unwrap()
        .settle()
        .unwrap();
        assert_eq!(minimal.listen.port(), 9443);
        assert_eq!(minimal.cache_size_bytes, 1 << 30);
        assert!(minimal.bandwidth.off_mb_per_s.is_none() && minimal.bandwidth.work_hours.is_none());
    }

    #[test]
    fn bad_files_get_named_errors() {
        let typo = PsRunConfig::parse("cache_dri = '/c'").unwrap_err();
        assert!(typo.contains("cache_dri"), "{typo}");
        let wrong_type = PsRunConfig::parse("listen = 9443").unwrap_err();
        assert!(wrong_type.contains("listen"), "{wrong_type}");

        let missing = PsRunConfig::parse("cache_size='1GiB'").unwrap().settle().unwrap_err();
        assert!(matches!(missing, ConfigError::Missing { key: "cache_dir", .. }), "{missing}");
        let base = "cache_dir='/c'\ntarget='file:///t'\npassphrase_file='/p'\ntls_dir='/t'\n";
        let bad_size = PsRunConfig::parse(&format!("{base}cache_size='lots'")).unwrap().settle().unwrap_err();
        assert!(matches!(bad_size, ConfigError::Invalid { key: "cache_size", .. }), "{bad_size}");
        let negative = PsRunConfig::parse(&format!("{base}cache_size='1G'\nbandwidth_mbps=-1.0")).unwrap().settle();
        assert!(matches!(negative, Err(ConfigError::Invalid { key: "bandwidth_mbps", .. })));
        let hours_alone =
            PsRunConfig::parse(&format!("{base}cache_size='1G'\nwork_hours='08:00-18:00'")).unwrap().settle();
        assert!(matches!(hours_alone, Err(ConfigError::Missing { key: "work_mbps", .. })));
        let bad_hours =
            PsRunConfig::parse(&format!("{base}cache_size='1G'\nwork_hours='8-6'\nwork_mbps=5.0")).unwrap().settle();
        assert!(matches!(bad_hours, Err(ConfigError::Invalid { key: "work_hours", .. })));
        let zero_effort =
            PsRunConfig::parse(&format!("{base}cache_size='1G'\nlz4_acceleration_max=0")).unwrap().settle();
        assert!(matches!(zero_effort, Err(ConfigError::Invalid { key: "lz4_acceleration_max", .. })));
    }

    #[test]
    fn cs_keys_and_health_table_settle() {
        let base = "cache_dir='/c'\ncache_size='1G'\ntarget='file:///t'\npassphrase_file='/p'\ntls_dir='/t'\n";
        let standalone = PsRunConfig::parse(base).unwrap().settle().unwrap();
        assert!(standalone.cs.is_none());
        assert_eq!(standalone.health, Thresholds::default());
        let text = format!(
            "{base}cs_address='cs.example:8443'\ncs_cert='cs.pem'\nps_id='ps1'\nadvertise_address='10.0.0.5:9443'\nmetrics_listen='127.0.0.1:9464'\n[health]\ncache_free_warning_percent = 40.0\n"
        );
        let mut cfg = PsRunConfig::parse(&text).unwrap();
        cfg.resolve_paths(Path::new("/srv"));
        let s = cfg.settle().unwrap();
        let cs = s.cs.unwrap();
        assert_eq!(cs.cs_cert, PathBuf::from("/srv/cs.pem"));
        assert_eq!(cs.heartbeat_interval_seconds, 30);
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(s.health.cache_free_warning_percent, 40.0);
        let no_advertise =
            PsRunConfig::parse(&format!("{base}cs_address='cs:1'\ncs_cert='c'\nps_id='p'")).unwrap().settle();
        assert!(matches!(no_advertise, Err(ConfigError::Missing { key: "advertise_address", .. })));
        let bad_addr =
            PsRunConfig::parse(&format!("{base}cs_address='cs'\ncs_cert='c'\nps_id='p'\nadvertise_address='a:1'"))
                .unwrap()
                .settle();
        assert!(matches!(bad_addr, Err(ConfigError::Invalid { key: "cs_address", .. })));
        let orphan = PsRunConfig::parse(&format!("{base}ps_id='p'")).unwrap().settle();
        assert!(matches!(orphan, Err(ConfigError::Invalid { key: "ps_id", .. })));
        let bad_health = PsRunConfig::parse(&format!("{base}[health]\ncpu_warning_percent = 101.0")).unwrap().settle();
        assert!(matches!(bad_health, Err(ConfigError::Invalid { key: "health", .. })));
        assert!(PsRunConfig::parse(&format!("{base}[health]\nnope = 1.0")).is_err());
    }

    #[test]
    fn load_caps_the_size_and_resolves_paths_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ps.toml");
        std::fs::write(&path, "cache_dir = 'cache'\ntls_dir = '/abs/tls'\n").unwrap();
        let cfg = PsRunConfig::load(&path).unwrap();
        assert_eq!(cfg.cache_dir, Some(dir.path().join("cache")));
        assert_eq!(cfg.tls_dir, Some(PathBuf::from("/abs/tls")));

        std::fs::write(&path, vec![b'#'; CONFIG_BYTES_MAX as usize + 1]).unwrap();
        assert!(matches!(PsRunConfig::load(&path), Err(ConfigError::TooLarge { .. })));
        assert!(matches!(PsRunConfig::load(&dir.path().join("absent.toml")), Err(ConfigError::Io { .. })));
    }
}
