//! Challenge–response authentication from a shared registration passphrase. The
//! passphrase never crosses the wire: both ends derive a key from it, the agent proves
//! knowledge of the key by a MAC over both sides' fresh nonces (the server's nonce makes
//! a replayed handshake useless), and the server proves it back.
//!
//! key        = HMAC-SHA256(key = passphrase, "churnlog/v1/key")
//! client_mac = HMAC-SHA256(key, "churnlog/v1/client" ‖ client_nonce ‖ server_nonce ‖ machine)
//! server_mac = HMAC-SHA256(key, "churnlog/v1/server" ‖ client_nonce ‖ server_nonce ‖ machine)

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// A key derived from the passphrase; the passphrase itself is not kept.
#[derive(Clone)]
pub struct AuthKey([u8; 32]);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

impl AuthKey {
    pub fn from_passphrase(passphrase: &str) -> AuthKey {
        let mut mac = HmacSha256::new_from_slice(passphrase.trim().as_bytes()).expect("HMAC takes any key length");
        mac.update(b"churnlog/v1/key");
        AuthKey(mac.finalize().into_bytes().into())
    }

    /// A key that is a random credential of its own (a machine's, issued by the
    /// configuration server) rather than derived from the passphrase.
    pub fn from_bytes(bytes: [u8; 32]) -> AuthKey {
        AuthKey(bytes)
    }

    /// The key's bytes, for MACs of other messages (the control plane's request signing).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn state(
        &self,
        label: &[u8],
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        machine: &str,
    ) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("32-byte key");
        mac.update(label);
        mac.update(client_nonce);
        mac.update(server_nonce);
        mac.update(machine.as_bytes());
        mac
    }

    pub fn client_mac(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        machine: &str,
    ) -> [u8; MAC_LEN] {
        self.state(CLIENT, client_nonce, server_nonce, machine).finalize().into_bytes().into()
    }

    pub fn server_mac(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        machine: &str,
    ) -> [u8; MAC_LEN] {
        self.state(SERVER, client_nonce, server_nonce, machine).finalize().into_bytes().into()
    }

    /// Constant-time check of the agent's MAC.
    pub fn verify_client(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        machine: &str,
        got: &[u8; MAC_LEN],
    ) -> bool {
        self.state(CLIENT, client_nonce, server_nonce, machine).verify_slice(got).is_ok()
    }

    /// Constant-time check of the server's MAC.
    pub fn verify_server(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        machine: &str,
        got: &[u8; MAC_LEN],
    ) -> bool {
        self.state(SERVER, client_nonce, server_nonce, machine).verify_slice(got).is_ok()
    }
}

const CLIENT: &[u8] = b"churnlog/v1/client";
const SERVER: &[u8] = b"churnlog/v1/server";

/// A fresh random nonce from the operating system.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).expect("the OS random source works");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_key_nonces_and_machine() {
        let k = AuthKey::from_passphrase("correct horse");
        let (c, s) = (nonce(), nonce());
        let m = k.client_mac(&c, &s, "m1");
        assert!(k.verify_client(&c, &s, "m1", &m));
        assert!(!k.verify_client(&c, &s, "m2", &m));
        assert!(!k.verify_client(&c, &nonce(), "m1", &m), "a replay under a new server nonce fails");
        assert!(!AuthKey::from_passphrase("wrong").verify_client(&c, &s, "m1", &m));
        assert!(!k.verify_server(&c, &s, "m1", &m), "client and server MACs differ");
        assert!(k.verify_server(&c, &s, "m1", &k.server_mac(&c, &s, "m1")));
    }
}
