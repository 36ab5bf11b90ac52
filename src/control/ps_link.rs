//! A process server's link to its configuration server: the settings (`cs_address`,
//! `cs_cert`, `ps_id`, `advertise_address`, heartbeat interval) and registration, which
//! `ProcessServer::start`, `churnlog ps register` and `churnlog setup` all use. The
//! periodic report is `heartbeat.rs`.

use std::time::Duration;

use super::api::{self, PsRegistered, PsRegistration};
use super::auth::Principal;
use super::client::{ClientError, CsClient};
use crate::protocol::auth::AuthKey;

/// Seconds between heartbeats unless configured.
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);

/// How a process server reaches and identifies itself to its CS.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// host:port of the CS.
    pub cs_address: String,
    /// The CS certificate (PEM), the only one trusted.
    pub cs_cert_pem: String,
    pub ps_id: String,
    /// host:port agents connect to (the CS hands it to them).
    pub advertise_address: String,
    pub heartbeat_interval: Duration,
    /// From the passphrase (never sent).
    pub key: AuthKey,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The version rule: the CS said why (both versions, upgrade the CS first).
    #[error("the configuration server refused this process server's version: {0}")]
    Version(String),
    #[error("registration with the configuration server at {address}: {source}")]
    Register { address: String, source: ClientError },
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("ps_id: {0}")]
    BadId(api::ApiError),
    #[error("passphrase: {0}")]
    Passphrase(#[from] super::PassphraseError),
}

impl LinkConfig {
    /// A signed client of the CS, as this process server.
    pub fn client(&self) -> Result<CsClient, LinkError> {
        Ok(CsClient::new(&self.cs_address, &self.cs_cert_pem, Principal::Passphrase, self.key.clone())?)
    }
}

/// Registers (or re-registers) this process server: its id, the address agents use, its
/// certificate, this build's version, its cache size.
pub async fn register(link: &LinkConfig, cert_pem: &str, cache_size_bytes: u64) -> Result<PsRegistered, LinkError> {
    api::check_name("ps_id", &link.ps_id).map_err(LinkError::BadId)?;
    let client = link.client()?;
    let body = PsRegistration {
        id: link.ps_id.clone(),
        address: link.advertise_address.clone(),
        cert_pem: cert_pem.to_string(),
        version: super::VERSION.to_string(),
        cache_size_bytes,
    };
    match client.post::<_, PsRegistered>(api::PATH_PS_REGISTER, &body).await {
        Ok(r) => Ok(r),
        Err(ClientError::Refused(e)) if e.code == "version" => Err(LinkError::Version(e.error)),
        Err(source) => Err(LinkError::Register { address: link.cs_address.clone(), source }),
    }
}
