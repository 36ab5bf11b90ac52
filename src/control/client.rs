//! The HTTPS client of the CS API, used by process servers, agents and the command line.
//! It trusts exactly the CS certificate it is given, signs every request
//! ([`super::auth`]), caps reply bodies at [`BODY_BYTES_MAX`], and times out.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::{ApiError, BODY_BYTES_MAX};
use super::auth::{sign, Principal};
use crate::protocol::auth::AuthKey;

/// Whole-request timeout (connect, TLS, request, reply).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot reach the configuration server at {address}: {source}")]
    Unreachable { address: String, source: reqwest::Error },
    /// The CS answered with an error: its sentence and code.
    #[error("the configuration server refused: {0}")]
    Refused(ApiError),
    #[error("the configuration server's reply is not valid: {0}")]
    BadReply(String),
}

impl ClientError {
    /// The API error code when the CS refused (`conflict`, `version`, `unavailable`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused(e) => Some(&e.code),
            _ => None,
        }
    }
}

/// A signed-request client of one CS.
#[derive(Clone)]
pub struct CsClient {
    http: reqwest::Client,
    /// `https://host:port`
    base: String,
    address: String,
    principal: Principal,
    key: AuthKey,
}

impl std::fmt::Debug for CsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CsClient({}, {:?})", self.address, self.principal)
    }
}

impl CsClient {
    /// `address` is host:port; `cs_cert_pem` the CS certificate, the only one trusted.
    pub fn new(address: &str, cs_cert_pem: &str, principal: Principal, key: AuthKey) -> Result<CsClient, ClientError> {
        let tls = crate::tls::client_config(cs_cert_pem)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .map_err(|source| ClientError::Unreachable { address: address.to_string(), source })?;
        Ok(CsClient { http, base: format!("https://{address}"), address: address.to_string(), principal, key })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The same client signing as another principal with another key.
    pub fn as_principal(&self, principal: Principal, key: AuthKey) -> CsClient {
        CsClient { principal, key, ..self.clone() }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send("GET", path, Vec::new()).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::BadReply(e.to_string()))?;
        self.send("POST", path, body).await
    }

    async fn send<T: DeserializeOwned>(&self, method: &str, path: &str, body: Vec<u8>) -> Result<T, ClientError> {
        let unreachable = |source| ClientError::Unreachable { address: self.address.clone(), source };
        let authorization = sign(&self.principal, &self.key, method, path, &body);
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url).header("content-type", "application/json").body(body),
        };
        let mut reply = request.header("authorization", authorization).send().await.map_err(unreachable)?;
        if reply.content_length().is_some_and(|n| n > BODY_BYTES_MAX as u64) {
            return Err(ClientError::BadReply(format!("a reply of more than {BODY_BYTES_MAX} bytes")));
        }
        let status = reply.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = reply.chunk().await.map_err(unreachable)? {
            if bytes.len() + chunk.len() > BODY_BYTES_MAX {
                return Err(ClientError::BadReply(format!("a reply of more than {BODY_BYTES_MAX} bytes")));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let err = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
                ApiError::new(
                    "internal",
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])),
                )
            });
            return Err(ClientError::Refused(err));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadReply(e.to_string()))
    }
}
