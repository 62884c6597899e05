//! SCRAM-SHA-256 password verifiers (RFC 5802, RFC 7677), in the form PostgreSQL stores in
//! `pg_authid.rolpassword`. `CREATE ROLE … PASSWORD '<verifier>'` then never carries the password
//! itself, which a server logging statements would otherwise keep — what psql's `\password` does.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{Result, StoreError};

/// PostgreSQL's default (`scram_iterations`).
const ITERATIONS: u32 = 4096;

/// The verifier for `password` with a fresh random salt.
///
/// PostgreSQL normalizes passwords with SASLprep before hashing; for printable ASCII that is the
/// identity, and other passwords are refused rather than risking a verifier that does not match.
pub(super) fn verifier(password: &str) -> Result<String> {
    if password.is_empty() || !password.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(StoreError::AppRole("the password must be non-empty printable ASCII"));
    }
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    Ok(verifier_with_salt(password.as_bytes(), &salt, ITERATIONS))
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Hi() of RFC 5802: PBKDF2 with HMAC-SHA-256 and one block of output.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        out.iter_mut().zip(u).for_each(|(o, b)| *o ^= b);
    }
    out
}

fn verifier_with_salt(password: &[u8], salt: &[u8], iterations: u32) -> String {
    let salted = salted_password(password, salt, iterations);
    let stored_key = Sha256::digest(hmac(&salted, b"Client Key"));
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example: password "pencil", salt "W22ZaJ0SNY7soEsUEjb6gQ==", 4096 iterations.
    /// Its ClientProof and ServerSignature follow from these keys; PostgreSQL stores exactly
    /// this form (checked end to end by the store test that signs in with a provisioned role).
    #[test]
    fn matches_rfc_7677() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let verifier = verifier_with_salt(b"pencil", &salt, 4096);
        assert_eq!(
            verifier,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }

    #[test]
    fn refuses_what_saslprep_might_change() {
        assert!(verifier("pässword").is_err());
        assert!(verifier("").is_err());
        assert!(verifier("Abc123xyz").unwrap().starts_with("SCRAM-SHA-256$4096:"));
    }
}
