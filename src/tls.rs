//! TLS identities and configurations (rustls with the ring provider). A process server
//! without an identity creates a self-signed one (rcgen) in its TLS directory; agents
//! trust exactly that certificate (`--ps-cert`).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS files: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("TLS directory {dir} holds {has} but not {lacks}: restore it, or remove both to create a new identity")]
    Incomplete { dir: std::path::PathBuf, has: &'static str, lacks: &'static str },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads `cert.pem` + `key.pem` from `dir`, creating a self-signed pair for `localhost`
/// and 127.0.0.1 (plus `names`) when the directory holds none.
pub fn server_config(dir: &Path, names: &[String]) -> Result<(Arc<rustls::ServerConfig>, String), TlsError> {
    crate::secrets::create_private_dir(dir)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) | (false, false) => {}
        (cert, _) => {
            return Err(TlsError::Incomplete {
                dir: dir.to_path_buf(),
                has: if cert { "cert.pem" } else { "key.pem" },
                lacks: if cert { "key.pem" } else { "cert.pem" },
            })
        }
    }
    if !cert_path.exists() {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(names.iter().cloned());
        let ck = rcgen::generate_simple_self_signed(sans)?;
        crate::secrets::create_private(&key_path, ck.key_pair.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, ck.cert.pem())?;
        tracing::info!(dir = %dir.display(), "created a self-signed TLS identity");
    }
    crate::secrets::warn_if_exposed(&key_path);
    let cert_pem = std::fs::read_to_string(&cert_path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Pem(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok((Arc::new(config), cert_pem))
}

/// A client configuration that trusts exactly the certificates in `cert_pem`.
pub fn client_config(cert_pem: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.map_err(|e| TlsError::Pem(e.to_string()))?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
