//! The credential vault: encryption at rest for traders' exchange API credentials.
//!
//! Exchange API keys, secrets, passphrases and access tokens are stored in the database as
//! [Fernet](https://github.com/fernet/spec/blob/master/Spec.md) tokens (AES-128-CBC + HMAC-SHA256,
//! URL-safe base64). Fernet is kept because the previous Python service (`encryption.py`) stored
//! `Fernet(key).encrypt(value.encode()).decode()` in TEXT columns: the rows it wrote must keep
//! decrypting here, and rows written here must keep decrypting in Python (both directions are
//! covered by `shared/tests/vault.rs`).
//!
//! The module has three types that make the two sides of the boundary hard to mix up:
//!
//! * [`SecretValue`]: plaintext. Zeroized on drop, redacted in `Debug`, and deliberately *not*
//!   `Display` or `Serialize`, so it cannot end up in a log line, an error message or a JSON
//!   response by accident. The only way to read it is [`SecretValue::expose`], which is easy to
//!   grep for.
//! * [`EncryptedSecret`]: the Fernet token, i.e. exactly the text stored in the database. Safe to
//!   store and serialize.
//! * [`Keyring`]: one or more Fernet keys. The first (primary) key encrypts; every key decrypts.
//!   This is what makes key rotation possible without downtime: put the new key first, keep the
//!   old one after it, re-encrypt rows with [`Keyring::rewrap`], then drop the old key.
//!
//! The module does no I/O: reading the key from the environment or a file is the configuration
//! layer's job; it hands the string to [`Keyring::parse`].
//!
//! # Limits of the in-memory protection
//!
//! Zeroizing is best effort. It wipes the buffers this module owns, but not copies made
//! elsewhere: serde's intermediate buffers when a [`SecretValue`] is deserialized from a request
//! body, HTTP client buffers when a secret is sent to an exchange, or temporary buffers inside
//! the `fernet` crate. It narrows the window in which plaintext sits in memory; it does not close
//! it.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use fernet::Fernet;
use serde::{Deserialize, Deserializer, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Errors from the vault.
///
/// No variant carries key material, plaintext or token content, and neither do the messages:
/// these errors are logged and may be shown to operators, and a configuration error that echoed
/// the offending `ENCRYPTION_KEY` entry would leak (part of) a key into the logs. Positions are
/// 1-based because they are read by humans looking at a comma-separated list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// The key string was empty (or only whitespace).
    #[error("ENCRYPTION_KEY is empty: expected one or more comma-separated Fernet keys")]
    NoKeys,

    /// An entry between two commas was empty, e.g. `key1,,key2` or a trailing comma.
    #[error("ENCRYPTION_KEY entry {position} of {total} is empty (check for a stray comma)")]
    EmptyEntry {
        /// 1-based position of the empty entry.
        position: usize,
        /// Number of comma-separated entries.
        total: usize,
    },

    /// An entry is not a Fernet key.
    #[error(
        "ENCRYPTION_KEY entry {position} of {total} is not a valid Fernet key \
         (expected 32 bytes of URL-safe base64)"
    )]
    InvalidKey {
        /// 1-based position of the invalid entry.
        position: usize,
        /// Number of comma-separated entries.
        total: usize,
    },

    /// An entry repeats an earlier one (compared after base64 decoding, so a padded and an
    /// unpadded spelling of the same key count as duplicates). Rejected because it is always a
    /// mistake, usually a rotation where the new key was never actually pasted in.
    #[error("ENCRYPTION_KEY entry {position} is a duplicate of an earlier entry")]
    DuplicateKey {
        /// 1-based position of the later copy.
        position: usize,
    },

    /// No key in the ring could decrypt the token: wrong key(s), a corrupted or truncated value,
    /// or a value that is not a Fernet token at all. Fernet deliberately does not say which.
    #[error("credential could not be decrypted with any configured ENCRYPTION_KEY")]
    Undecryptable,

    /// The token decrypted, but the plaintext is not UTF-8. Every credential this service and its
    /// Python predecessor stored was text, so this means the row was written by something else.
    #[error("decrypted credential is not valid UTF-8")]
    NotUtf8,
}

// ---------------------------------------------------------------------------------------------
// SecretValue
// ---------------------------------------------------------------------------------------------

/// A plaintext secret in memory: an API key, API secret, passphrase or access token.
///
/// * The buffer is zeroized when the value is dropped.
/// * `Debug` prints `SecretValue([REDACTED])`, so a `{:?}` of a struct holding one is safe.
/// * There is intentionally no `Display` and no `Serialize`: a secret must never be formatted
///   into a message or written into a response. Read it explicitly with [`SecretValue::expose`].
/// * `Deserialize` exists because secrets arrive in request bodies.
/// * There is no `PartialEq`: comparing secrets is almost never what the caller wants, and a
///   derived comparison would not be constant-time.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Takes ownership of `value`; its buffer will be zeroized on drop.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The plaintext. Keep the borrow short, and do not copy it into long-lived `String`s.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue([REDACTED])")
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

// ---------------------------------------------------------------------------------------------
// EncryptedSecret
// ---------------------------------------------------------------------------------------------

/// A Fernet token: the encrypted form of a [`SecretValue`], and exactly the text stored in the
/// database column (the same text the Python service stored).
///
/// It is ciphertext, so storing and serializing it is fine (serialized as a plain string).
/// `Debug` shows only a short prefix and the length anyway, to keep log lines short.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EncryptedSecret(String);

impl EncryptedSecret {
    /// The token text, as stored in the database.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The token text, as stored in the database.
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl From<String> for EncryptedSecret {
    /// Wraps a token read from storage. No validation happens here; a malformed token is
    /// reported by [`Keyring::decrypt`] as [`VaultError::Undecryptable`].
    fn from(token: String) -> Self {
        Self(token)
    }
}

impl AsRef<str> for EncryptedSecret {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EncryptedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every Fernet token starts with "gAAAAA" (version byte + high bytes of the timestamp),
        // which is enough to recognise one in a log line. Count chars, not bytes, so that a
        // non-ASCII value read from a corrupted row cannot make the slicing panic.
        let prefix: String = self.0.chars().take(6).collect();
        write!(f, "EncryptedSecret({prefix}…, {} chars)", self.0.chars().count())
    }
}

// ---------------------------------------------------------------------------------------------
// Keyring
// ---------------------------------------------------------------------------------------------

/// The result of [`Keyring::decrypt`].
#[derive(Debug, Clone)]
pub struct Decrypted {
    /// The plaintext.
    pub value: SecretValue,
    /// Which key in the ring decrypted the token: 0 is the primary key, 1 the next one, and so on.
    ///
    /// Reported so that key rotation can be finished: any row with `key_index > 0` is still
    /// encrypted under an old key and must be re-encrypted ([`Keyring::rewrap`]) before that key
    /// can be removed from `ENCRYPTION_KEY`. Fernet tokens do not name their key, so trying the
    /// keys in order is the only way to find this out.
    pub key_index: usize,
}

/// One or more Fernet keys. The first (primary) key encrypts; all keys are tried, in order, to
/// decrypt.
///
/// Built from the `ENCRYPTION_KEY` setting by [`Keyring::parse`]. The key material is zeroized
/// when the keyring is dropped (the `fernet` crate zeroizes its key structs), and `Debug` shows
/// only the number of keys.
///
/// Decryption applies no TTL: stored credentials are long-lived, and a token's timestamp is only
/// its creation time. Note that the `fernet` crate always rejects a token whose timestamp is more
/// than 60 seconds in the future of this machine's clock (Python's `cryptography` only checks
/// that when a TTL is given), so a row written by a host whose clock ran ahead fails with
/// [`VaultError::Undecryptable`] until this host's clock catches up.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Fernet>,
}

impl Keyring {
    /// Parses a comma-separated list of Fernet keys, primary first.
    ///
    /// Whitespace around each entry is ignored. Each entry must be a key as produced by
    /// [`Keyring::generate_key`] or Python's `Fernet.generate_key()`: 32 bytes, URL-safe base64
    /// (the trailing `=` padding may be omitted). Empty entries and duplicate keys are rejected
    /// rather than skipped, because both indicate a botched edit of the setting.
    ///
    /// Errors identify the offending entry by position only, never by content.
    pub fn parse(s: &str) -> Result<Self, VaultError> {
        if s.trim().is_empty() {
            return Err(VaultError::NoKeys);
        }
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        let total = entries.len();
        let mut keys = Vec::with_capacity(total);
        // Decoded key bytes, kept only for the duplicate check and zeroized on drop.
        let mut seen: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(total);

        for (i, entry) in entries.into_iter().enumerate() {
            let position = i + 1;
            if entry.is_empty() {
                return Err(VaultError::EmptyEntry { position, total });
            }
            let fernet = Fernet::new(entry).ok_or(VaultError::InvalidKey { position, total })?;
            // Decode the same way `Fernet::new` does (padding optional) so that two spellings of
            // one key are recognised as the same key.
            let bytes = Zeroizing::new(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(entry.trim_end_matches('='))
                    .map_err(|_| VaultError::InvalidKey { position, total })?,
            );
            if seen.iter().any(|prev| **prev == *bytes) {
                return Err(VaultError::DuplicateKey { position });
            }
            seen.push(bytes);
            keys.push(fernet);
        }
        Ok(Self { keys })
    }

    /// Generates a new random key in the standard form (44 characters of padded URL-safe base64,
    /// the same form as Python's `Fernet.generate_key()`).
    ///
    /// The returned string *is* the key: hand it to the operator and do not log it.
    pub fn generate_key() -> String {
        Fernet::generate_key()
    }

    /// Number of keys in the ring (at least 1).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always `false`: [`Keyring::parse`] never produces an empty ring. Present for API
    /// completeness next to [`Keyring::len`].
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Encrypts `plaintext` under the primary key.
    ///
    /// Every call produces a different token (random IV, current timestamp), so tokens cannot be
    /// compared to test whether two secrets are equal.
    pub fn encrypt(&self, plaintext: &SecretValue) -> EncryptedSecret {
        EncryptedSecret(self.primary().encrypt(plaintext.expose().as_bytes()))
    }

    /// Decrypts `token`, trying the primary key first and then the older keys in order.
    ///
    /// Returns the plaintext together with the index of the key that worked; see
    /// [`Decrypted::key_index`] for why.
    pub fn decrypt(&self, token: &EncryptedSecret) -> Result<Decrypted, VaultError> {
        for (key_index, key) in self.keys.iter().enumerate() {
            let Ok(bytes) = key.decrypt(token.as_str()) else {
                continue;
            };
            let value = String::from_utf8(bytes).map_err(|err| {
                // The bytes are still plaintext; wipe them before giving up.
                err.into_bytes().zeroize();
                VaultError::NotUtf8
            })?;
            return Ok(Decrypted { value: SecretValue::new(value), key_index });
        }
        Err(VaultError::Undecryptable)
    }

    /// Whether `token` is encrypted under an older key and should be re-encrypted.
    ///
    /// This has to decrypt the token: Fernet tokens do not say which key made them.
    pub fn needs_rewrap(&self, token: &EncryptedSecret) -> Result<bool, VaultError> {
        Ok(self.decrypt(token)?.key_index != 0)
    }

    /// Re-encrypts `token` under the primary key if it is encrypted under an older one.
    ///
    /// Returns `Ok(None)` if the token is already on the primary key, so running a rotation job
    /// twice changes nothing the second time; `Ok(Some(new_token))` if the row should be updated.
    pub fn rewrap(&self, token: &EncryptedSecret) -> Result<Option<EncryptedSecret>, VaultError> {
        let decrypted = self.decrypt(token)?;
        if decrypted.key_index == 0 { Ok(None) } else { Ok(Some(self.encrypt(&decrypted.value))) }
    }

    fn primary(&self) -> &Fernet {
        // `parse` guarantees at least one key.
        &self.keys[0]
    }
}

impl FromStr for Keyring {
    type Err = VaultError;

    /// Same as [`Keyring::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}
