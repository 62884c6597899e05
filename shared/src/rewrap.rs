//! `tradeeon rewrap`: re-encrypt every stored secret under the primary vault key.
//!
//! Used when rotating `ENCRYPTION_KEY` (new key first, old keys after it). Each connection is
//! rewritten with a compare-and-swap on its exact ciphertexts, so the command is idempotent,
//! safe to interrupt, and never overwrites a rotation or a revoke that happened meanwhile.

use std::fmt;

use crate::store::{EncryptedCredentials, Store, StoreError, StoredSecrets};
use crate::vault::{EncryptedSecret, Keyring, VaultError};

/// Rows read per page: bounded memory whatever the table size.
const PAGE_SIZE: u32 = 200;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RewrapReport {
    /// Connections holding encrypted material that were examined.
    pub scanned: u64,
    /// Connections re-encrypted under the primary key by this run.
    pub rewrapped: u64,
    /// Connections already entirely on the primary key.
    pub already_current: u64,
    /// Connections that changed while we worked (a rotation or revoke won); their new values were
    /// written with the current primary key, so nothing is left to do for them.
    pub skipped_concurrent: u64,
    /// Connections with a secret no configured key decrypts. They are left untouched.
    pub undecryptable: u64,
}

impl fmt::Display for RewrapReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rewrap: {} scanned, {} rewrapped, {} already current, {} changed concurrently, {} undecryptable",
            self.scanned, self.rewrapped, self.already_current, self.skipped_concurrent, self.undecryptable
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    #[error("database error during rewrap")]
    Store(#[from] StoreError),
}

/// Re-encrypts one Fernet token under the primary key when another key made it.
/// `Ok(None)`: already on the primary key.
fn rewrap_token(keyring: &Keyring, token: &str) -> Result<Option<String>, VaultError> {
    if token.is_empty() {
        // Revoked rows hold '' (secrets destroyed); nothing to re-encrypt.
        return Ok(None);
    }
    Ok(keyring.rewrap(&EncryptedSecret::from(token.to_string()))?.map(EncryptedSecret::into_inner))
}

/// The row's new ciphertexts, or `None` when everything is already on the primary key.
fn rewrap_row(
    keyring: &Keyring,
    row: &StoredSecrets,
) -> Result<Option<(EncryptedCredentials, Option<String>)>, VaultError> {
    let api_key = rewrap_token(keyring, &row.credentials.api_key)?;
    let api_secret = rewrap_token(keyring, &row.credentials.api_secret)?;
    let passphrase = row.credentials.passphrase.as_deref().map(|t| rewrap_token(keyring, t)).transpose()?.flatten();
    let access_token = row.access_token.as_deref().map(|t| rewrap_token(keyring, t)).transpose()?.flatten();
    if api_key.is_none() && api_secret.is_none() && passphrase.is_none() && access_token.is_none() {
        return Ok(None);
    }
    let credentials = EncryptedCredentials {
        api_key: api_key.unwrap_or_else(|| row.credentials.api_key.clone()),
        api_secret: api_secret.unwrap_or_else(|| row.credentials.api_secret.clone()),
        passphrase: passphrase.or_else(|| row.credentials.passphrase.clone()),
    };
    Ok(Some((credentials, access_token.or_else(|| row.access_token.clone()))))
}

pub async fn rewrap_all(store: &Store, keyring: &Keyring) -> Result<RewrapReport, RewrapError> {
    let mut report = RewrapReport::default();
    let mut after = None;
    loop {
        let page = store.list_encrypted_secrets(after, PAGE_SIZE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for row in &page {
            report.scanned += 1;
            match rewrap_row(keyring, row) {
                Ok(None) => report.already_current += 1,
                Ok(Some((credentials, access_token))) => {
                    if store.replace_encrypted_secrets(row, credentials, access_token).await? {
                        report.rewrapped += 1;
                    } else {
                        report.skipped_concurrent += 1;
                    }
                }
                Err(_) => {
                    tracing::error!(connection_id = %row.id, "a stored secret decrypts with none of the configured keys");
                    report.undecryptable += 1;
                }
            }
        }
        if page.len() < PAGE_SIZE as usize {
            break;
        }
    }
    tracing::info!(%report, "rewrap finished");
    Ok(report)
}
