//! Files that hold secrets (the passphrase, the TLS private key, proxy credentials): how
//! they are created, and the warning an operator gets when one is readable by others.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The warning for a secret file that its group or others may read, if it is one.
pub fn exposure(path: &Path) -> std::io::Result<Option<String>> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    Ok((mode & 0o077 != 0).then(|| {
        format!(
            "{} holds a secret but is readable by group or others (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        )
    }))
}

/// Logs [`exposure`]'s warning for `path` (a file that cannot be read is left to its reader).
pub fn warn_if_exposed(path: &Path) {
    if let Ok(Some(warning)) = exposure(path) {
        tracing::warn!("{warning}");
        eprintln!("churnlog: warning: {warning}");
    }
}

/// Creates `path` holding `bytes`, readable by its owner only. Refuses to replace an
/// existing file or to follow a symbolic link there (O_EXCL | O_NOFOLLOW).
pub fn create_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates the directory `dir` (and its parents) if missing; a directory this creates is
/// accessible by its owner only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_owner_only_and_never_replace_or_follow() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        create_private(&key, b"secret").unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(exposure(&key).unwrap(), None);
        assert_eq!(create_private(&key, b"again").unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        // A symbolic link planted where the key goes is not followed.
        let target = dir.path().join("elsewhere");
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_private(&link, b"secret").is_err());
        assert!(!target.exists());

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(exposure(&key).unwrap().unwrap().contains("chmod 600"));

        let sub = dir.path().join("a").join("tls");
        create_private_dir(&sub).unwrap();
        assert_eq!(std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
