//! The control plane: a configuration server (CS) that process servers register with and
//! report to, that agents learn their process server from, and that operators ask for
//! status, migrations, decommission and purge (`docs/protocol.md` §9, `docs/operations.md`).
//!
//! - [`api`]: the JSON bodies of every CS endpoint, shared by server and clients.
//! - [`auth`]: request signing: a MAC over each request from the passphrase or a
//!   machine's credential; the secret never crosses the wire.
//! - [`client`]: the HTTPS client every caller uses (pinned CS certificate).
//! - [`cs`]: the configuration server itself.

pub mod api;
pub mod auth;
pub mod book;
pub mod client;
#[cfg(feature = "config-server")]
pub mod cs;
pub mod decommission;
pub mod health;
pub mod heartbeat;
pub mod metrics;
pub mod monitor;
pub mod ps_link;
pub mod setup;
pub mod status_http;
pub mod sysinfo;

/// This build's version, compared by the version rule (a process server newer than the
/// CS is refused).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every server refuses a shorter passphrase.
pub const PASSPHRASE_LEN_MIN: usize = 16;

/// Why a passphrase is refused.
#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    #[error("the passphrase is {0} characters; at least {PASSPHRASE_LEN_MIN} are required (make one with `churnlog cs passphrase --out FILE`)")]
    TooShort(usize),
}

/// Checks the passphrase's length (after trimming, as the key derivation trims).
pub fn check_passphrase(passphrase: &str) -> Result<(), PassphraseError> {
    let n = passphrase.trim().chars().count();
    if n < PASSPHRASE_LEN_MIN {
        return Err(PassphraseError::TooShort(n));
    }
    Ok(())
}

/// Parses `MAJOR.MINOR.PATCH` (a pre-release or build suffix is ignored).
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    let v = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("0.10.0").unwrap() > parse_version("0.9.7").unwrap());
        assert_eq!(parse_version("1.2.3-rc1"), Some((1, 2, 3)));
        assert_eq!(parse_version("1.2"), None);
        assert_eq!(parse_version("1.2.3.4"), None);
        assert_eq!(parse_version("x.2.3"), None);
    }

    #[test]
    fn short_passphrases_are_refused() {
        assert!(check_passphrase("fifteen chars!!").is_err());
        assert!(check_passphrase("  sixteen chars!!!  ").is_ok());
    }
}
