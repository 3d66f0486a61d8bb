//! The server's credential key, which seals projects' registry passwords at rest.
//!
//! Taken from `credential_key` (64 hex digits, e.g. `STEVEDORE_CREDENTIAL_KEY`) when set, else
//! from `credential_key_file`, else from `credential.key` in the data directory, which the
//! first start creates (mode 0600) with a random key. Servers sharing one PostgreSQL database
//! must share the key: give each the same `credential_key` or the same key file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use stevedore_store::CredentialKey;

use crate::settings::Settings;

/// The key file's name in the data directory.
pub const DEFAULT_KEY_FILE: &str = "credential.key";

/// Where the key came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Setting,
    File(PathBuf),
    Created(PathBuf),
}

/// The configured key, or the key file's, created when it does not exist yet.
pub fn credential_key(settings: &Settings) -> anyhow::Result<(CredentialKey, KeySource)> {
    if let Some(text) = settings
        .credential_key
        .as_ref()
        .map(|secret| secret.0.as_str())
        .filter(|text| !text.is_empty())
    {
        let key = CredentialKey::from_hex(text).context("credential_key")?;
        return Ok((key, KeySource::Setting));
    }
    let path = settings
        .credential_key_file
        .clone()
        .unwrap_or_else(|| settings.data_dir.join(DEFAULT_KEY_FILE));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = CredentialKey::from_hex(&text)
                .with_context(|| format!("the credential key file {}", path.display()))?;
            Ok((key, KeySource::File(path)))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = CredentialKey::generate().context("cannot make a credential key")?;
            create_key_file(&path, &key)?;
            Ok((key, KeySource::Created(path)))
        }
        Err(error) => Err(error)
            .with_context(|| format!("cannot read the credential key file {}", path.display())),
    }
}

/// Writes a new key file readable by its owner only. Refuses to overwrite one that appeared
/// meanwhile (another server starting on the same directory): then that one is read.
fn create_key_file(path: &Path, key: &CredentialKey) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create the credential key file {}", path.display()))?;
    writeln!(file, "{}", key.to_hex())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write the credential key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> Settings {
        Settings {
            data_dir: dir.to_path_buf(),
            ..Settings::default()
        }
    }

    #[test]
    fn the_first_start_creates_a_private_key_file_and_later_starts_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let (created, source) = credential_key(&settings(dir.path())).unwrap();
        let path = dir.path().join(DEFAULT_KEY_FILE);
        assert_eq!(source, KeySource::Created(path.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, source) = credential_key(&settings(dir.path())).unwrap();
        assert_eq!(source, KeySource::File(path));
        assert_eq!(again.id(), created.id());
    }

    #[test]
    fn a_configured_key_wins_and_a_malformed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = CredentialKey::generate().unwrap();
        let configured = Settings {
            credential_key: Some(crate::settings::Secret(key.to_hex())),
            ..settings(dir.path())
        };
        let (used, source) = credential_key(&configured).unwrap();
        assert_eq!((used.id(), source), (key.id(), KeySource::Setting));
        assert!(!dir.path().join(DEFAULT_KEY_FILE).exists());

        let malformed = Settings {
            credential_key: Some(crate::settings::Secret("nothex".into())),
            ..settings(dir.path())
        };
        assert!(credential_key(&malformed).is_err());
    }
}
