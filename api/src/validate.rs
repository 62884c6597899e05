//! Shape checks on submitted credentials, before anything is encrypted or stored.
//!
//! Only the *shape* is checked (sizes, characters, encodings, Coinbase's key formats): whether a
//! key works is the worker's job. Messages name the field and what is expected and never quote
//! the value.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::exchanges::coinbase::CdpKey;
use tradeeon_shared::store::EncryptedCredentials;
use tradeeon_shared::vault::{Keyring, SecretValue};

use crate::ApiError;

/// Largest credential field (a PEM private key is well under this).
pub const MAX_CREDENTIAL_BYTES: usize = 4096;
/// Longest nickname, in characters.
pub const MAX_NICKNAME_CHARS: usize = 100;

/// Trimmed credentials that passed the shape checks. Plaintext: zeroized on drop, redacted in `Debug`.
#[derive(Debug)]
pub struct ValidCredentials {
    pub api_key: SecretValue,
    pub api_secret: SecretValue,
    pub passphrase: Option<SecretValue>,
}

impl ValidCredentials {
    pub fn encrypt(&self, keyring: &Keyring) -> EncryptedCredentials {
        EncryptedCredentials {
            api_key: keyring.encrypt(&self.api_key).into_inner(),
            api_secret: keyring.encrypt(&self.api_secret).into_inner(),
            passphrase: self.passphrase.as_ref().map(|p| keyring.encrypt(p).into_inner()),
        }
    }
}

/// An exchange connected with a static API key (everything but Zerodha).
pub fn static_key_exchange(raw: &str) -> Result<Exchange, ApiError> {
    let exchange = exchange(raw)?;
    not_zerodha(exchange)?;
    Ok(exchange)
}

pub fn exchange(raw: &str) -> Result<Exchange, ApiError> {
    raw.trim().parse::<Exchange>().map_err(|_| {
        let allowed: Vec<_> = Exchange::ALL.iter().map(|e| e.as_str()).collect();
        ApiError::field("exchange", "unknown_exchange", format!("`exchange` must be one of: {}.", allowed.join(", ")))
    })
}

/// Zerodha has no static secret to check: it connects through the Kite login flow.
pub fn not_zerodha(exchange: Exchange) -> Result<(), ApiError> {
    if exchange == Exchange::Zerodha {
        return Err(ApiError::bad_request(
            "use_zerodha_login",
            "Zerodha connects through the Kite login: POST /connections/zerodha/login, then \
             POST /connections/zerodha/session with the request_token Kite sends back.",
            Some("exchange"),
        ));
    }
    Ok(())
}

/// Checks and trims the credential fields for `exchange`.
pub fn credentials(
    exchange: Exchange,
    api_key: &SecretValue,
    api_secret: &SecretValue,
    passphrase: Option<&SecretValue>,
) -> Result<ValidCredentials, ApiError> {
    let api_key = required("api_key", api_key, Chars::Token)?;
    let api_secret = required("api_secret", api_secret, Chars::Multiline)?;
    let passphrase = match passphrase {
        None => None,
        Some(p) if p.expose().trim().is_empty() => None,
        Some(p) => Some(required("passphrase", p, Chars::Line)?),
    };
    match exchange {
        Exchange::Binance => {
            if passphrase.is_some() {
                return Err(ApiError::field("passphrase", "invalid_field", "Binance keys have no passphrase."));
            }
        }
        Exchange::Kraken => {
            if BASE64.decode(api_secret.expose()).is_err() {
                return Err(ApiError::field(
                    "api_secret",
                    "invalid_field",
                    "A Kraken private key is base64 text; copy it whole from Kraken's API settings.",
                ));
            }
        }
        Exchange::Coinbase if passphrase.is_some() => {
            // Coinbase Exchange: key + base64 secret + passphrase.
            if BASE64.decode(api_secret.expose()).is_err() {
                return Err(ApiError::field(
                    "api_secret",
                    "invalid_field",
                    "A Coinbase Exchange API secret is base64 text. For a Coinbase Developer Platform (CDP) key, \
                     leave the passphrase empty.",
                ));
            }
        }
        Exchange::Coinbase => {
            // Coinbase Advanced Trade (CDP): key name + EC PEM or Ed25519 private key.
            if !is_cdp_key_name(api_key.expose()) {
                return Err(ApiError::field(
                    "api_key",
                    "invalid_field",
                    "A Coinbase Developer Platform key name looks like organizations/{org_id}/apiKeys/{key_id} \
                     (newer keys: the bare key id). Coinbase Exchange keys also need their passphrase.",
                ));
            }
            if let Err(err) = CdpKey::parse(api_secret.expose()) {
                return Err(ApiError::field("api_secret", "invalid_field", err.message()));
            }
        }
        Exchange::Zerodha => not_zerodha(exchange)?,
    }
    Ok(ValidCredentials { api_key, api_secret, passphrase })
}

/// The app credentials of a Kite Connect app.
pub fn kite_app(api_key: &SecretValue, api_secret: &SecretValue) -> Result<ValidCredentials, ApiError> {
    let api_key = required("api_key", api_key, Chars::Token)?;
    let api_secret = required("api_secret", api_secret, Chars::Token)?;
    Ok(ValidCredentials { api_key, api_secret, passphrase: None })
}

/// A single-line token such as Kite's `request_token`.
pub fn token(field: &'static str, value: &SecretValue) -> Result<SecretValue, ApiError> {
    required(field, value, Chars::Token)
}

/// `None` for an absent or blank nickname; at most [`MAX_NICKNAME_CHARS`], no control characters.
pub fn nickname(raw: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.chars().count() > MAX_NICKNAME_CHARS {
        return Err(ApiError::field(
            "nickname",
            "invalid_field",
            format!("`nickname` is longer than {MAX_NICKNAME_CHARS} characters."),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ApiError::field("nickname", "invalid_field", "`nickname` contains control characters."));
    }
    Ok(Some(trimmed.to_owned()))
}

/// `organizations/{org}/apiKeys/{id}` or a bare key id.
fn is_cdp_key_name(key: &str) -> bool {
    let part_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    match key.split('/').collect::<Vec<_>>().as_slice() {
        ["organizations", org, "apiKeys", id] => part_ok(org) && part_ok(id),
        [id] => id.len() >= 8 && part_ok(id),
        _ => false,
    }
}

#[derive(Clone, Copy)]
enum Chars {
    /// No whitespace or control characters at all (API keys, tokens).
    Token,
    /// One line: spaces allowed, control characters not (passphrases).
    Line,
    /// Line breaks allowed (PEM private keys), other control characters not.
    Multiline,
}

fn required(field: &'static str, value: &SecretValue, chars: Chars) -> Result<SecretValue, ApiError> {
    let trimmed = value.expose().trim();
    if trimmed.is_empty() {
        return Err(ApiError::field(field, "invalid_field", format!("`{field}` must not be empty.")));
    }
    if trimmed.len() > MAX_CREDENTIAL_BYTES {
        return Err(ApiError::field(
            field,
            "invalid_field",
            format!("`{field}` is longer than {MAX_CREDENTIAL_BYTES} bytes."),
        ));
    }
    let bad = match chars {
        Chars::Token => trimmed.chars().any(|c| c.is_whitespace() || c.is_control()),
        Chars::Line => trimmed.chars().any(char::is_control),
        Chars::Multiline => trimmed.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')),
    };
    if bad {
        let what = match chars {
            Chars::Token => "spaces, line breaks or control characters",
            Chars::Line => "line breaks or control characters",
            Chars::Multiline => "control characters",
        };
        return Err(ApiError::field(field, "invalid_field", format!("`{field}` contains {what}.")));
    }
    Ok(SecretValue::new(trimmed.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> SecretValue {
        SecretValue::new(v.to_owned())
    }

    fn field_of(err: ApiError) -> String {
        match err {
            ApiError::Invalid(i) => i.field.unwrap_or_default(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn trims_and_caps_fields() {
        let ok = credentials(Exchange::Binance, &s("  key123  "), &s("\tsecret\n"), None).unwrap();
        assert_eq!(ok.api_key.expose(), "key123");
        assert_eq!(ok.api_secret.expose(), "secret");
        assert_eq!(field_of(credentials(Exchange::Binance, &s("   "), &s("x"), None).unwrap_err()), "api_key");
        let long = "a".repeat(MAX_CREDENTIAL_BYTES + 1);
        assert_eq!(field_of(credentials(Exchange::Binance, &s("k"), &s(&long), None).unwrap_err()), "api_secret");
        assert_eq!(field_of(credentials(Exchange::Binance, &s("k y"), &s("x"), None).unwrap_err()), "api_key");
        assert_eq!(
            field_of(credentials(Exchange::Binance, &s("k"), &s("x"), Some(&s("p"))).unwrap_err()),
            "passphrase"
        );
        // A blank passphrase is no passphrase.
        assert!(credentials(Exchange::Binance, &s("k"), &s("x"), Some(&s("  "))).is_ok());
    }

    #[test]
    fn exchange_specific_shapes() {
        assert_eq!(
            field_of(credentials(Exchange::Kraken, &s("k"), &s("not base64!"), None).unwrap_err()),
            "api_secret"
        );
        assert!(credentials(Exchange::Kraken, &s("k"), &s("c2VjcmV0"), None).is_ok());
        // Coinbase Exchange (with passphrase): base64 secret.
        assert!(credentials(Exchange::Coinbase, &s("k"), &s("c2VjcmV0"), Some(&s("pass"))).is_ok());
        assert_eq!(
            field_of(credentials(Exchange::Coinbase, &s("k"), &s("???"), Some(&s("pass"))).unwrap_err()),
            "api_secret"
        );
        // Coinbase CDP: key name shape and a parseable private key.
        assert_eq!(field_of(credentials(Exchange::Coinbase, &s("k/x"), &s("c2VjcmV0"), None).unwrap_err()), "api_key");
        assert_eq!(
            field_of(
                credentials(Exchange::Coinbase, &s("organizations/o/apiKeys/k"), &s("c2VjcmV0"), None).unwrap_err()
            ),
            "api_secret"
        );
        assert!(is_cdp_key_name("organizations/1f2e-3d/apiKeys/9a8b-7c"));
        assert!(is_cdp_key_name("0a1b2c3d-4e5f"));
        assert!(!is_cdp_key_name("organizations//apiKeys/x"));
        assert!(!is_cdp_key_name("short"));
    }

    #[test]
    fn nicknames() {
        assert_eq!(nickname(None).unwrap(), None);
        assert_eq!(nickname(Some("  ".into())).unwrap(), None);
        assert_eq!(nickname(Some(" Main ".into())).unwrap().as_deref(), Some("Main"));
        assert!(nickname(Some("a".repeat(101))).is_err());
        assert!(nickname(Some("é".repeat(100))).is_ok());
        assert!(nickname(Some("bad\u{7}".into())).is_err());
    }

    #[test]
    fn exchanges() {
        assert_eq!(static_key_exchange("BINANCE").unwrap(), Exchange::Binance);
        assert_eq!(field_of(static_key_exchange("ftx").unwrap_err()), "exchange");
        match static_key_exchange("zerodha").unwrap_err() {
            ApiError::Invalid(i) => assert_eq!((i.status.as_u16(), i.code), (400, "use_zerodha_login")),
            other => panic!("{other:?}"),
        }
    }
}
