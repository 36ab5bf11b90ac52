//! An agent's own identity with a configuration server (CS): it registers its machine
//! once with the passphrase and keeps the credential the CS returns in
//! `STATE_DIR/credential` (mode 0600, in a 0700 directory). Later runs reuse it; the
//! passphrase is then no longer needed on the protected machine.
//!
//! File format (text): the credential as 64 hex digits on the first line, then
//! `machine=NAME`, so a state directory reused under another `--machine` is refused
//! instead of failing later as an unexplained authentication error.

use std::path::{Path, PathBuf};

use crate::control::api::{self, Assignment, MachineRegistered, MachineRegistration};
use crate::control::auth::Principal;
use crate::control::client::{ClientError, CsClient};
use crate::protocol::auth::AuthKey;

use super::AgentError;

/// The credential file's name inside the state directory.
pub const CREDENTIAL_FILE: &str = "credential";

/// Path of the credential file in `state_dir`.
pub fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CREDENTIAL_FILE)
}

fn malformed(path: &Path, reason: impl Into<String>) -> AgentError {
    AgentError::Credential { path: path.to_path_buf(), reason: reason.into() }
}

/// Decodes a credential (hex of 32 bytes), as the CS sends it and the file keeps it.
pub fn parse_credential_hex(hex_text: &str) -> Option<[u8; 32]> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut bytes).ok()?;
    Some(bytes)
}

/// Reads the credential stored for `machine`; `None` when there is no file yet.
/// A file readable by group or others is used, with a warning; a malformed file, or one
/// written for another machine name, is an error (never silently re-registered over).
pub fn read_credential(path: &Path, machine: &str) -> Result<Option<AuthKey>, AgentError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(malformed(path, format!("cannot read it: {e}"))),
    };
    crate::secrets::warn_if_exposed(path);
    let mut lines = text.lines();
    let bytes = lines
        .next()
        .and_then(parse_credential_hex)
        .ok_or_else(|| malformed(path, "the first line is not 64 hex digits"))?;
    for line in lines.map(str::trim).filter(|l| !l.is_empty()) {
        match line.strip_prefix("machine=") {
            Some(name) if name == machine => {}
            Some(name) => {
                return Err(malformed(
                    path,
                    format!("it holds the credential of machine {name:?}, not {machine:?}: use another --state-dir"),
                ))
            }
            None => return Err(malformed(path, format!("unexpected line {line:?}"))),
        }
    }
    Ok(Some(AuthKey::from_bytes(bytes)))
}

/// Stores a new credential: created 0600 with O_EXCL | O_NOFOLLOW, so an existing file
/// or a planted symbolic link is never overwritten or followed.
pub fn write_credential(path: &Path, machine: &str, credential: &[u8; 32]) -> Result<(), AgentError> {
    let text = format!("{}\nmachine={machine}\n", hex::encode(credential));
    crate::secrets::create_private(path, text.as_bytes()).map_err(|e| malformed(path, format!("cannot create it: {e}")))
}

/// What an agent needs to find its process server through the CS and log in there.
#[derive(Clone, Debug)]
pub struct CsIdentity {
    /// Signs as `machine:<name>` with the credential.
    pub client: CsClient,
    /// The credential as the data path's login key.
    pub key: AuthKey,
    /// True when this call registered the machine (first run).
    pub registered_now: bool,
}

/// Where to reach the CS and how to register.
pub struct CsSettings<'a> {
    /// host:port of the CS.
    pub address: &'a str,
    /// The CS certificate (PEM), the only one trusted.
    pub cert_pem: &'a str,
    /// Needed only for the first registration (None: a credential must already exist).
    pub passphrase: Option<&'a str>,
    pub machine: &'a str,
    /// Holds the credential file (created 0700 if missing).
    pub state_dir: &'a Path,
}

/// Loads the machine's credential from the state directory or, on the first run,
/// registers the machine with the CS and stores the credential it returns.
pub async fn load_or_register(s: &CsSettings<'_>) -> Result<CsIdentity, AgentError> {
    api::check_name("machine", s.machine).map_err(|e| AgentError::Refused(e.error))?;
    crate::secrets::create_private_dir(s.state_dir).map_err(|e| AgentError::StateDir(s.state_dir.to_path_buf(), e))?;
    let path = credential_path(s.state_dir);
    let principal = Principal::Machine(s.machine.to_string());
    if let Some(key) = read_credential(&path, s.machine)? {
        let client = CsClient::new(s.address, s.cert_pem, principal, key.clone()).map_err(AgentError::Cs)?;
        return Ok(CsIdentity { client, key, registered_now: false });
    }
    let passphrase = s.passphrase.ok_or_else(|| {
        malformed(&path, "there is no credential yet: give --passphrase-file once so that the machine registers")
    })?;
    crate::control::check_passphrase(passphrase).map_err(|e| AgentError::Refused(e.to_string()))?;
    let registrar = CsClient::new(s.address, s.cert_pem, Principal::Passphrase, AuthKey::from_passphrase(passphrase))
        .map_err(AgentError::Cs)?;
    let body = MachineRegistration { name: s.machine.to_string() };
    let registered: MachineRegistered =
        registrar.post(api::PATH_MACHINE_REGISTER, &body).await.map_err(|e| match e {
            ClientError::Refused(err) if err.code == "conflict" => {
                AgentError::NameTaken { machine: s.machine.to_string(), detail: err.error }
            }
            other => AgentError::Cs(other),
        })?;
    let bytes = parse_credential_hex(&registered.credential)
        .ok_or_else(|| AgentError::Cs(ClientError::BadReply("the credential is not 64 hex digits".into())))?;
    write_credential(&path, s.machine, &bytes).map_err(|e| {
        // The CS now holds a credential nobody has: say how to recover.
        malformed(
            &path,
            format!("{e}; the machine is registered but its credential is lost: run `churnlog cs reassign --machine {}` and start again", s.machine),
        )
    })?;
    tracing::info!(machine = s.machine, path = %path.display(), "registered with the configuration server");
    let key = AuthKey::from_bytes(bytes);
    let client = registrar.as_principal(principal, key.clone());
    Ok(CsIdentity { client, key, registered_now: true })
}

/// Asks the CS where the machine replicates now.
pub async fn assignment(client: &CsClient) -> Result<Assignment, ClientError> {
    client.get(api::PATH_MACHINE_ASSIGNMENT).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn credential_files_are_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        crate::secrets::create_private_dir(&state).unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        let path = credential_path(&state);
        assert!(read_credential(&path, "vm-1").unwrap().is_none());
        let secret = [7u8; 32];
        write_credential(&path, "vm-1", &secret).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let key = read_credential(&path, "vm-1").unwrap().unwrap();
        assert_eq!(key.as_bytes(), &secret);
        // Never overwritten: a second registration cannot clobber the first credential.
        assert!(write_credential(&path, "vm-1", &[9u8; 32]).is_err());
        assert_eq!(read_credential(&path, "vm-1").unwrap().unwrap().as_bytes(), &secret);
        // An exposed file still works (with a warning).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_credential(&path, "vm-1").unwrap().unwrap().as_bytes(), &secret);
    }

    #[test]
    fn malformed_or_foreign_credential_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CREDENTIAL_FILE);
        for bad in ["", "xyz\n", &"ab".repeat(31), &format!("{}\ngarbage\n", "ab".repeat(32))] {
            std::fs::write(&path, bad).unwrap();
            let err = read_credential(&path, "vm-1").unwrap_err();
            assert!(matches!(err, AgentError::Credential { .. }), "{bad:?}: {err:?}");
        }
        std::fs::write(&path, format!("{}\nmachine=vm-2\n", "ab".repeat(32))).unwrap();
        let err = read_credential(&path, "vm-1").unwrap_err();
        assert!(err.to_string().contains("vm-2"), "{err}");
        // The bare credential (no machine line) is accepted.
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(read_credential(&path, "vm-1").unwrap().unwrap().as_bytes(), &[0xab; 32]);
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        let path = dir.path().join(CREDENTIAL_FILE);
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(write_credential(&path, "vm-1", &[1; 32]).is_err());
        assert!(!target.exists());
    }

    #[tokio::test]
    async fn without_a_credential_or_passphrase_nothing_is_registered() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("s");
        let settings = CsSettings {
            // Nothing listens there: the error must come before any request.
            address: "127.0.0.1:9",
            cert_pem: "not used",
            passphrase: None,
            machine: "vm-1",
            state_dir: &state,
        };
        let err = load_or_register(&settings).await.unwrap_err();
        assert!(err.to_string().contains("--passphrase-file"), "{err}");
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        let bad_name = CsSettings { machine: "no spaces", ..settings };
        assert!(matches!(load_or_register(&bad_name).await, Err(AgentError::Refused(_))));
    }
}
