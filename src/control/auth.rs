//! Request signing for the CS API. A caller proves it holds a key (derived from the
//! passphrase, or a machine's own credential) without sending it: each request carries
//!
//! `Authorization: Churnlog-MAC <principal> <unix_seconds> <nonce_hex16> <mac_hex32>`
//!
//! mac = HMAC-SHA256(key, "churnlog/v1/http\n" ‖ method ‖ "\n" ‖ path_and_query ‖ "\n" ‖
//!                   unix_seconds ‖ "\n" ‖ nonce_hex ‖ "\n" ‖ hex(SHA-256(body)))
//!
//! The principal is `passphrase` (process servers, operators, agent registration) or
//! `machine:<name>` (an agent with its credential). The server accepts a timestamp within
//! [`CLOCK_SKEW_MAX`] of its own clock and each nonce once: the nonce is recorded in the
//! CS database until [`Signature::nonce_expires_at`], so no CS instance sharing that
//! database accepts a captured request again. TLS with the pinned CS certificate protects the
//! replies. The read-only status page uses `Authorization: Bearer <view token>`, a token
//! derived from the passphrase that grants nothing but `GET /api/v1/status`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::protocol::auth::AuthKey;

type HmacSha256 = Hmac<Sha256>;

pub const SCHEME: &str = "Churnlog-MAC";

/// Largest difference between the caller's clock and the server's.
pub const CLOCK_SKEW_MAX: Duration = Duration::from_secs(300);

/// Who signed a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    Passphrase,
    Machine(String),
}

impl Principal {
    fn encode(&self) -> String {
        match self {
            Principal::Passphrase => "passphrase".to_string(),
            Principal::Machine(m) => format!("machine:{m}"),
        }
    }

    fn decode(s: &str) -> Option<Principal> {
        if s == "passphrase" {
            return Some(Principal::Passphrase);
        }
        s.strip_prefix("machine:").map(|m| Principal::Machine(m.to_string()))
    }
}

/// A parsed `Authorization: Churnlog-MAC ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub principal: Principal,
    pub unix_seconds: u64,
    pub nonce: String,
    pub mac: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no Authorization header")]
    Missing,
    #[error("malformed Authorization header")]
    Malformed,
    #[error("request timestamp is {0} s away from the server's clock (at most {max} s allowed)", max = CLOCK_SKEW_MAX.as_secs())]
    Clock(u64),
    #[error("request nonce already used")]
    Replayed,
    #[error("authentication failed")]
    BadMac,
}

/// This host's clock, Unix seconds (what request timestamps are checked against).
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn mac_of(
    key: &AuthKey,
    method: &str,
    path_and_query: &str,
    unix_seconds: u64,
    nonce: &str,
    body: &[u8],
) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("32-byte key");
    mac.update(b"churnlog/v1/http\n");
    mac.update(method.as_bytes());
    mac.update(b"\n");
    mac.update(path_and_query.as_bytes());
    mac.update(b"\n");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(nonce.as_bytes());
    mac.update(b"\n");
    mac.update(hex::encode(Sha256::digest(body)).as_bytes());
    mac
}

/// The `Authorization` header value for a request.
pub fn sign(principal: &Principal, key: &AuthKey, method: &str, path_and_query: &str, body: &[u8]) -> String {
    let ts = now_unix();
    // 16 random bytes (32 hex digits), the length `parse` accepts.
    let nonce = hex::encode(&crate::protocol::auth::nonce()[..16]);
    let mac = mac_of(key, method, path_and_query, ts, &nonce, body).finalize().into_bytes();
    format!("{SCHEME} {} {ts} {nonce} {}", principal.encode(), hex::encode(mac))
}

/// Parses a `Churnlog-MAC` header value (without checking it).
pub fn parse(header: &str) -> Result<Signature, AuthError> {
    let mut parts = header.split(' ');
    if parts.next() != Some(SCHEME) {
        return Err(AuthError::Malformed);
    }
    let (Some(p), Some(ts), Some(nonce), Some(mac), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let principal = Principal::decode(p).ok_or(AuthError::Malformed)?;
    let unix_seconds = ts.parse().map_err(|_| AuthError::Malformed)?;
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Malformed);
    }
    let mut mac_bytes = [0u8; 32];
    hex::decode_to_slice(mac, &mut mac_bytes).map_err(|_| AuthError::Malformed)?;
    Ok(Signature { principal, unix_seconds, nonce: nonce.to_string(), mac: mac_bytes })
}

impl Signature {
    /// Constant-time check of the MAC under `key`, and of the clock window.
    pub fn verify(&self, key: &AuthKey, method: &str, path_and_query: &str, body: &[u8]) -> Result<(), AuthError> {
        let skew = now_unix().abs_diff(self.unix_seconds);
        if skew > CLOCK_SKEW_MAX.as_secs() {
            return Err(AuthError::Clock(skew));
        }
        mac_of(key, method, path_and_query, self.unix_seconds, &self.nonce, body)
            .verify_slice(&self.mac)
            .map_err(|_| AuthError::BadMac)
    }

    /// Until when (Unix seconds) the nonce must be remembered: the request's timestamp
    /// plus twice [`CLOCK_SKEW_MAX`]. An instance accepts the timestamp until its own
    /// clock passes timestamp + CLOCK_SKEW_MAX, so the row outlives that on every instance
    /// whose clock is at most CLOCK_SKEW_MAX behind the instance that deletes expired rows.
    pub fn nonce_expires_at(&self) -> u64 {
        self.unix_seconds.saturating_add(2 * CLOCK_SKEW_MAX.as_secs())
    }
}

/// The read-only status view token (hex), derived from the passphrase key.
pub fn status_view_token(key: &AuthKey) -> String {
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("32-byte key");
    mac.update(b"churnlog/v1/status-view");
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time comparison of a presented view token.
pub fn verify_status_view_token(key: &AuthKey, presented: &str) -> bool {
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("32-byte key");
    mac.update(b"churnlog/v1/status-view");
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(presented, &mut bytes).is_ok() && mac.verify_slice(&bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_key_method_path_and_body() {
        let key = AuthKey::from_passphrase("a passphrase of sixteen");
        let p = Principal::Machine("m1".into());
        let header = sign(&p, &key, "POST", "/api/v1/x", b"{}");
        let sig = parse(&header).unwrap();
        assert_eq!(sig.principal, p);
        assert_eq!(sig.verify(&key, "POST", "/api/v1/x", b"{}"), Ok(()));
        assert_eq!(sig.verify(&key, "GET", "/api/v1/x", b"{}"), Err(AuthError::BadMac));
        assert_eq!(sig.verify(&key, "POST", "/api/v1/y", b"{}"), Err(AuthError::BadMac));
        assert_eq!(sig.verify(&key, "POST", "/api/v1/x", b"{ }"), Err(AuthError::BadMac));
        let other = AuthKey::from_passphrase("another passphrase here");
        assert_eq!(sig.verify(&other, "POST", "/api/v1/x", b"{}"), Err(AuthError::BadMac));
        assert_eq!(sig.nonce_expires_at(), sig.unix_seconds + 600);
    }

    #[test]
    fn malformed_headers_and_old_timestamps_are_refused() {
        assert_eq!(parse("Basic abc"), Err(AuthError::Malformed));
        assert_eq!(parse("Churnlog-MAC passphrase 1 00"), Err(AuthError::Malformed));
        assert_eq!(parse("Churnlog-MAC someone 1 00000000000000000000000000000000 00"), Err(AuthError::Malformed));
        let key = AuthKey::from_passphrase("a passphrase of sixteen");
        let nonce = "0".repeat(32);
        let ts = now_unix() - 3600;
        let mac = mac_of(&key, "GET", "/", ts, &nonce, b"").finalize().into_bytes();
        let sig = parse(&format!("Churnlog-MAC passphrase {ts} {nonce} {}", hex::encode(mac))).unwrap();
        assert!(matches!(sig.verify(&key, "GET", "/", b""), Err(AuthError::Clock(_))));
    }

    #[test]
    fn view_tokens_check_out_only_under_their_key() {
        let key = AuthKey::from_passphrase("a passphrase of sixteen");
        let t = status_view_token(&key);
        assert!(verify_status_view_token(&key, &t));
        assert!(!verify_status_view_token(&AuthKey::from_passphrase("another passphrase here"), &t));
        assert!(!verify_status_view_token(&key, "zz"));
    }
}
