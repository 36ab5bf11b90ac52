//! The configuration server (CS): process servers register with it and report to it,
//! agents learn their process server from it, operators ask it for status, migrations,
//! decommission and purge. State lives in a database (SQLite file or PostgreSQL) so that
//! several CS instances may share one (`docs/protocol.md` §9, `docs/operations.md` §9.1).
//!
//! - [`db`]: the schema, its migrations and every state change (one transaction each).
//! - [`placement`]: which process server takes a machine (least loaded, eligible only).
//! - [`status`]: the status report built from the stored rows.
//! - [`server`]: HTTPS (rustls + hyper + axum), request authentication, the endpoints.
//! - [`metrics`]: Prometheus metrics (`GET /metrics`).
//! - [`page`]: the read-only status page (`GET /status`).

use std::path::PathBuf;
use std::time::Duration;

use super::api::ApiError;

pub mod db;
pub mod metrics;
pub mod page;
pub mod placement;
pub mod server;
pub mod status;

pub use server::ConfigServer;

/// The seed's default: a process server silent this long shows as disconnected.
pub const HEARTBEAT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15 * 60);

/// Everything `ConfigServer::start` needs.
#[derive(Debug, Clone)]
pub struct CsConfig {
    /// Where to listen (tests: 127.0.0.1:0).
    pub listen: std::net::SocketAddr,
    /// A SQLite file path, `sqlite://…`, or `postgres://…`.
    pub db: String,
    pub passphrase: String,
    /// Holds (or receives) `cert.pem` and `key.pem`.
    pub tls_dir: PathBuf,
    /// Extra names for a newly created certificate.
    pub tls_names: Vec<String>,
    pub heartbeat_timeout: Duration,
}

/// Why the CS cannot start or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CsError {
    #[error(transparent)]
    Passphrase(#[from] super::PassphraseError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database holds a value this CS cannot read: {0}")]
    Corrupt(String),
    #[error("listen on {address}: {source}")]
    Listen { address: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A request the API refuses (its code and sentence go to the caller).
    #[error("{0}")]
    Refused(ApiError),
}

impl From<ApiError> for CsError {
    fn from(e: ApiError) -> CsError {
        CsError::Refused(e)
    }
}

impl CsError {
    /// The API error a caller sees: a refusal as is, anything else `internal` (the
    /// detail is logged, not sent).
    pub fn to_api(&self) -> ApiError {
        match self {
            CsError::Refused(e) => e.clone(),
            other => {
                tracing::error!("configuration server: {other}");
                ApiError::new("internal", "internal error in the configuration server (see its log)")
            }
        }
    }
}

/// Milliseconds since the Unix epoch, the unit of every stored time.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// `a, b, c and 7 more`: machine lists in refusals stay one readable sentence.
pub(crate) fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}
