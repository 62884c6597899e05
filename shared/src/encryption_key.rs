//! Where the vault's keys come from: `ENCRYPTION_KEY`, or — only for the zero-configuration
//! SQLite default — a key file generated beside the database.
//!
//! PostgreSQL deployments are shared by many processes, so each must be given the same key
//! explicitly; silently generating one there would encrypt with a key no other process has.

use std::io::Write;
use std::path::{Path, PathBuf};

use secrecy::ExposeSecret;

use crate::config::{DatabaseConfig, VaultConfig};
use crate::vault::{Keyring, VaultError};

/// File name of the generated key inside the SQLite database's directory.
pub const KEY_FILE_NAME: &str = "encryption.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("ENCRYPTION_KEY: {0}")]
    Invalid(#[source] VaultError),
    #[error("ENCRYPTION_KEY is required with PostgreSQL (generate one with `tradeeon keygen`)")]
    MissingForPostgres,
    #[error(
        "ENCRYPTION_KEY is not set and {} does not exist (run `tradeeon serve` once, or set ENCRYPTION_KEY)",
        .0.display()
    )]
    MissingKeyFile(PathBuf),
    #[error("{}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
}

/// How the keyring was obtained, so the caller can warn about a generated key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Environment,
    ExistingFile(PathBuf),
    GeneratedFile(PathBuf),
}

/// Whether a missing key may be created (only `tradeeon serve` on SQLite does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    Generate,
    Fail,
}

pub fn load_keyring(
    vault: &VaultConfig,
    database: &DatabaseConfig,
    missing: MissingKey,
) -> Result<(Keyring, KeySource), KeyLoadError> {
    if let Some(keys) = &vault.encryption_keys {
        let ring = Keyring::parse(keys.expose_secret()).map_err(KeyLoadError::Invalid)?;
        return Ok((ring, KeySource::Environment));
    }
    let Some(dir) = database.sqlite_dir() else {
        return Err(KeyLoadError::MissingForPostgres);
    };
    let path = dir.join(KEY_FILE_NAME);
    if path.exists() {
        let ring = read_key_file(&path)?;
        return Ok((ring, KeySource::ExistingFile(path)));
    }
    match missing {
        MissingKey::Fail => Err(KeyLoadError::MissingKeyFile(path)),
        MissingKey::Generate => generate_key_file(&path),
    }
}

fn read_key_file(path: &Path) -> Result<Keyring, KeyLoadError> {
    let contents = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| KeyLoadError::KeyFile { path: path.to_path_buf(), reason: e.to_string() })?,
    );
    Keyring::parse(contents.trim())
        .map_err(|e| KeyLoadError::KeyFile { path: path.to_path_buf(), reason: e.to_string() })
}

fn generate_key_file(path: &Path) -> Result<(Keyring, KeySource), KeyLoadError> {
    let io_err = |e: std::io::Error| KeyLoadError::KeyFile { path: path.to_path_buf(), reason: e.to_string() };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let key = zeroize::Zeroizing::new(Keyring::generate_key());
    let mut options = std::fs::OpenOptions::new();
    // create_new: two processes starting at once must not both write a key; the loser reads the
    // winner's file instead.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(format!("{}\n", key.as_str()).as_bytes()).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
            let ring = Keyring::parse(&key).map_err(KeyLoadError::Invalid)?;
            Ok((ring, KeySource::GeneratedFile(path.to_path_buf())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((read_key_file(path)?, KeySource::ExistingFile(path.to_path_buf())))
        }
        Err(e) => Err(io_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_vars;

    fn configs(vars: &[(&str, &str)]) -> (VaultConfig, DatabaseConfig) {
        (from_vars(vars.iter().copied()).unwrap(), from_vars(vars.iter().copied()).unwrap())
    }

    #[test]
    fn postgres_without_key_is_a_startup_error() {
        let (vault, db) = configs(&[("DATABASE_URL", "postgres://postgres@127.0.0.1/x")]);
        let err = load_keyring(&vault, &db, MissingKey::Generate).unwrap_err();
        assert!(matches!(err, KeyLoadError::MissingForPostgres), "{err}");
    }

    #[test]
    fn malformed_key_is_an_error_that_does_not_echo_it() {
        let (vault, db) = configs(&[("ENCRYPTION_KEY", "not-a-fernet-key-but-secret")]);
        let err = load_keyring(&vault, &db, MissingKey::Generate).unwrap_err();
        assert!(err.to_string().starts_with("ENCRYPTION_KEY"), "{err}");
        assert!(!err.to_string().contains("not-a-fernet-key-but-secret"), "{err}");
    }

    #[test]
    fn sqlite_generates_a_private_key_file_once_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/db/tradeeon.db", dir.path().display());
        let (vault, db) = configs(&[("DATABASE_URL", url.as_str())]);

        let err = load_keyring(&vault, &db, MissingKey::Fail).unwrap_err();
        assert!(matches!(err, KeyLoadError::MissingKeyFile(_)), "{err}");

        let (first, source) = load_keyring(&vault, &db, MissingKey::Generate).unwrap();
        let path = dir.path().join("db").join(KEY_FILE_NAME);
        assert_eq!(source, KeySource::GeneratedFile(path.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let (second, source) = load_keyring(&vault, &db, MissingKey::Fail).unwrap();
        assert_eq!(source, KeySource::ExistingFile(path));
        let token = first.encrypt(&crate::vault::SecretValue::new("abc".to_string()));
        assert_eq!(second.decrypt(&token).unwrap().value.expose(), "abc");
    }
}
