//! Projects' registry credentials: how their passwords are sealed at rest, and how a leased
//! task gets its project's credential for its image's registry.
//!
//! Passwords are sealed with XChaCha20-Poly1305 under the server's credential key (32 bytes,
//! from the settings or a key file; see `stevedore serve`), a random 24-byte nonce per seal,
//! and the project id and registry as associated data, so a sealed password copied into
//! another row does not open. The database holds the nonce, ciphertext and tag (`sealed`) and
//! the key's id, never the password. Servers sharing a database must share the key: a server
//! with another key cannot open what the first sealed, and says so in its log by key id.
//!
//! [`attach_registry_credentials`] is the one place a lease gets its credential, called once,
//! by the server's lease desk that the embedded runner and the runner protocol's lease
//! handler both lease through, so a remote runner and the embedded one receive exactly the
//! same.

use chacha20poly1305::aead::{Aead, Generate, Key, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use stevedore_model::registry::registry_of;
use stevedore_model::{CodeKind, RegistryCredential, Timestamp};

use crate::{LeasedTask, Result, Store};

/// The length of a credential key, bytes.
pub const CREDENTIAL_KEY_BYTES: usize = 32;
/// The nonce at the start of every sealed password.
const NONCE_BYTES: usize = 24;

/// A project's credential for one registry as the store keeps it: the password sealed.
#[derive(Clone, PartialEq)]
pub struct StoredCredential {
    pub project_id: String,
    /// The normalized registry host.
    pub registry: String,
    pub username: String,
    pub sealed: SealedSecret,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A password sealed by a [`CredentialVault`]: nonce, ciphertext and tag, and the id of the
/// key that sealed it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub bytes: Vec<u8>,
    pub key_id: String,
}

/// The server's credential key. Never printed.
#[derive(Clone)]
pub struct CredentialKey([u8; CREDENTIAL_KEY_BYTES]);

/// Seals and opens passwords with one [`CredentialKey`].
#[derive(Clone)]
pub struct CredentialVault {
    cipher: XChaCha20Poly1305,
    key_id: String,
}

/// Why a key or a sealed password is unusable. Carries no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a credential key is {CREDENTIAL_KEY_BYTES} bytes written as 64 hexadecimal digits")]
    MalformedKey,
    #[error(
        "the credential was sealed with key {sealed_with}, but this server holds key {held}: \
         servers sharing a database must share one credential key"
    )]
    OtherKey { sealed_with: String, held: String },
    #[error("the sealed credential is damaged or was moved to another row")]
    Damaged,
    #[error("the system's random number generator failed")]
    Random,
}

// === impl CredentialKey ===

impl CredentialKey {
    /// A new random key.
    pub fn generate() -> Result<Self, SecretError> {
        let key = Key::<XChaCha20Poly1305>::try_generate().map_err(|_| SecretError::Random)?;
        let mut bytes = [0u8; CREDENTIAL_KEY_BYTES];
        bytes.copy_from_slice(key.as_slice());
        Ok(CredentialKey(bytes))
    }

    /// A key written as 64 hexadecimal digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, SecretError> {
        let decoded = hex::decode(text.trim()).map_err(|_| SecretError::MalformedKey)?;
        let bytes: [u8; CREDENTIAL_KEY_BYTES] =
            decoded.try_into().map_err(|_| SecretError::MalformedKey)?;
        Ok(CredentialKey(bytes))
    }

    /// The key as 64 hexadecimal digits, for a key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A short public name of the key: the first 8 bytes of its SHA-256, in hex. Tells keys
    /// apart in logs and rows without revealing them.
    pub fn id(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..8])
    }
}

impl std::fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CredentialKey({})", self.id())
    }
}

// === impl CredentialVault ===

impl CredentialVault {
    pub fn new(key: &CredentialKey) -> Self {
        CredentialVault {
            cipher: XChaCha20Poly1305::new(&Key::<XChaCha20Poly1305>::from(key.0)),
            key_id: key.id(),
        }
    }

    /// The id of the key this vault seals with.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `password` for `project_id`'s credential for `registry`.
    pub fn seal(
        &self,
        project_id: &str,
        registry: &str,
        password: &str,
    ) -> Result<SealedSecret, SecretError> {
        let nonce = XNonce::try_generate().map_err(|_| SecretError::Random)?;
        let aad = associated_data(project_id, registry);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: password.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Damaged)?;
        let mut bytes = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        bytes.extend_from_slice(nonce.as_slice());
        bytes.extend_from_slice(&ciphertext);
        Ok(SealedSecret {
            bytes,
            key_id: self.key_id.clone(),
        })
    }

    /// Opens a stored credential's password.
    pub fn open(&self, stored: &StoredCredential) -> Result<String, SecretError> {
        if stored.sealed.key_id != self.key_id {
            return Err(SecretError::OtherKey {
                sealed_with: stored.sealed.key_id.clone(),
                held: self.key_id.clone(),
            });
        }
        if stored.sealed.bytes.len() < NONCE_BYTES {
            return Err(SecretError::Damaged);
        }
        let (nonce, ciphertext) = stored.sealed.bytes.split_at(NONCE_BYTES);
        let nonce = XNonce::try_from(nonce).map_err(|_| SecretError::Damaged)?;
        let aad = associated_data(&stored.project_id, &stored.registry);
        let plain = self
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Damaged)?;
        String::from_utf8(plain).map_err(|_| SecretError::Damaged)
    }
}

impl std::fmt::Debug for CredentialVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialVault")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for StoredCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCredential")
            .field("project_id", &self.project_id)
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("key_id", &self.sealed.key_id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Binds a sealed password to its row.
fn associated_data(project_id: &str, registry: &str) -> Vec<u8> {
    format!("stevedore registry credential\0{project_id}\0{registry}").into_bytes()
}

/// Gives every leased task whose code names an image its project's credential for that
/// image's registry, when the project stored one. Stack images are the operator's and get
/// nothing here: the runner pulls them with the operator's own credentials.
///
/// A credential this server cannot open (another key, a damaged row) is left out and logged
/// by project, registry and key id; the pull then goes without it and the registry's refusal
/// ends the task.
pub async fn attach_registry_credentials(
    store: &dyn Store,
    vault: &CredentialVault,
    leased: &mut [LeasedTask],
) -> Result<()> {
    for task in leased.iter_mut() {
        let CodeKind::Image { image, .. } = &task.code.spec.kind else {
            continue;
        };
        let registry = registry_of(image);
        let Some(stored) = store
            .get_registry_credential(&task.task.project_id, &registry)
            .await?
        else {
            continue;
        };
        match vault.open(&stored) {
            Ok(password) => {
                task.registry_credential = Some(RegistryCredential {
                    registry,
                    username: stored.username,
                    password,
                });
            }
            Err(error) => tracing::error!(
                project_id = %stored.project_id,
                registry = %stored.registry,
                %error,
                "a stored registry credential cannot be opened; the task's pull goes without it"
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(project_id: &str, registry: &str, sealed: SealedSecret) -> StoredCredential {
        StoredCredential {
            project_id: project_id.into(),
            registry: registry.into(),
            username: "alice".into(),
            sealed,
            created_at: Timestamp::default(),
            updated_at: Timestamp::default(),
        }
    }

    #[test]
    fn a_sealed_password_opens_only_in_its_own_row_and_under_its_own_key() {
        let key = CredentialKey::generate().unwrap();
        let vault = CredentialVault::new(&key);
        let sealed = vault.seal("p1", "r:5000", "hunter2").unwrap();
        assert!(
            !sealed
                .bytes
                .windows(b"hunter2".len())
                .any(|w| w == b"hunter2")
        );
        assert_eq!(
            vault.open(&stored("p1", "r:5000", sealed.clone())).unwrap(),
            "hunter2"
        );
        // Moved to another project or registry: it does not open.
        assert_eq!(
            vault.open(&stored("p2", "r:5000", sealed.clone())),
            Err(SecretError::Damaged)
        );
        assert_eq!(
            vault.open(&stored("p1", "r:5001", sealed.clone())),
            Err(SecretError::Damaged)
        );
        // Another key says which one sealed it.
        let other = CredentialVault::new(&CredentialKey::generate().unwrap());
        assert!(matches!(
            other.open(&stored("p1", "r:5000", sealed.clone())),
            Err(SecretError::OtherKey { ref sealed_with, .. }) if *sealed_with == key.id()
        ));
        // Two seals of one password differ (fresh nonces).
        assert_ne!(vault.seal("p1", "r:5000", "hunter2").unwrap(), sealed);
    }

    #[test]
    fn keys_round_trip_through_hex_and_never_print() {
        let key = CredentialKey::generate().unwrap();
        let again = CredentialKey::from_hex(&format!(" {}\n", key.to_hex())).unwrap();
        assert_eq!(again.id(), key.id());
        assert!(!format!("{key:?}").contains(&key.to_hex()));
        assert_eq!(
            CredentialKey::from_hex("abcd").map(|_| ()),
            Err(SecretError::MalformedKey)
        );
    }
}
