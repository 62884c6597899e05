//! Domain types shared by the API, the workers and the store.
//!
//! "Parse, don't validate": a value of one of these types is valid by construction, so code that
//! receives an [`Exchange`] never re-checks the string it came from. The string forms
//! (`as_str()`) are exactly what the database `CHECK` constraints store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user's id: the `sub` claim of their Supabase JWT, and the primary key of `auth.users`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub Uuid);

/// The id of one exchange connection (a row of `exchange_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnectionId(pub Uuid);

macro_rules! uuid_newtype {
    ($name:ident) => {
        impl $name {
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}
uuid_newtype!(UserId);
uuid_newtype!(ConnectionId);

/// A string that is not one of a closed set of values; the message lists the allowed ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`; expected one of: {allowed}")]
pub struct ParseEnumError {
    kind: &'static str,
    value: String,
    allowed: String,
}

/// Defines a closed string enum: `as_str`, `ALL`, `Display`, `FromStr` (case-insensitive) and
/// serde through the canonical string (deserialization is case-insensitive too).
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(into = "&'static str", try_from = "String")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical (database and JSON) spelling.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $(if s.eq_ignore_ascii_case($s) { return Ok($name::$variant); })+
                Err(ParseEnumError {
                    kind: $kind,
                    value: s.chars().take(64).collect(),
                    allowed: $name::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                })
            }
        }

        impl From<$name> for &'static str {
            fn from(v: $name) -> Self { v.as_str() }
        }

        impl TryFrom<String> for $name {
            type Error = ParseEnumError;
            fn try_from(s: String) -> Result<Self, ParseEnumError> { s.parse() }
        }
    };
}

string_enum!(
    /// A supported exchange. `"BINANCE"` parses; the stored and serialized form is lowercase.
    Exchange, "exchange", {
        Binance => "binance",
        Coinbase => "coinbase",
        Kraken => "kraken",
        Zerodha => "zerodha",
    }
);

string_enum!(
    /// Health of a connection as last observed by the workers.
    ConnectionStatus, "connection status", {
        Pending => "pending",
        Connected => "connected",
        Degraded => "degraded",
        Error => "error",
        Expired => "expired",
    }
);

string_enum!(
    /// What an audit log row records.
    AuditAction, "audit action", {
        Connected => "connected",
        Tested => "tested",
        Rotated => "rotated",
        RotateFailed => "rotate_failed",
        Revoked => "revoked",
        StatusChanged => "status_changed",
        SessionCreated => "session_created",
    }
);

/// What may be shown of an API key: an ellipsis followed by its last four characters
/// (`"…WXYZ"`). Keys of four characters or fewer show all but their first character (`"ab"` →
/// `"…b"`), so a hint never reveals a whole key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKeyHint(String);

impl ApiKeyHint {
    const VISIBLE: usize = 4;

    pub fn from_api_key(api_key: &str) -> Self {
        let len = api_key.chars().count();
        let visible = Self::VISIBLE.min(len.saturating_sub(1));
        let tail: String = api_key.chars().skip(len - visible).collect();
        Self(format!("…{tail}"))
    }

    /// A hint read back from storage (it was computed by [`ApiKeyHint::from_api_key`]).
    pub fn from_stored(hint: String) -> Self {
        Self(hint)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ApiKeyHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an exchange reports the API key may do. Stored as JSON in `exchange_keys.permissions`;
/// `{}` there means "not checked yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Permissions {
    pub read: bool,
    pub trade: bool,
    pub withdraw: bool,
    pub ip_restricted: bool,
}

/// What the user has the connection enabled for. Stored as JSON in `exchange_keys.features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Features {
    pub trading: bool,
    pub wallet: bool,
    pub paper: bool,
}

impl Default for Features {
    /// Same as the column default: live trading and wallet on, paper trading off.
    fn default() -> Self {
        Self { trading: true, wallet: true, paper: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_parses_case_insensitively_and_names_allowed_values() {
        assert_eq!("BINANCE".parse::<Exchange>().unwrap(), Exchange::Binance);
        assert_eq!("Kraken".parse::<Exchange>().unwrap(), Exchange::Kraken);
        let err = "ftx".parse::<Exchange>().unwrap_err().to_string();
        assert_eq!(err, "unknown exchange `ftx`; expected one of: binance, coinbase, kraken, zerodha");
        assert_eq!(serde_json::to_string(&Exchange::Zerodha).unwrap(), "\"zerodha\"");
        assert_eq!(serde_json::from_str::<Exchange>("\"COINBASE\"").unwrap(), Exchange::Coinbase);
    }

    #[test]
    fn audit_actions_are_snake_case() {
        assert_eq!(AuditAction::RotateFailed.as_str(), "rotate_failed");
        assert_eq!(serde_json::to_string(&AuditAction::SessionCreated).unwrap(), "\"session_created\"");
        assert_eq!("status_changed".parse::<AuditAction>().unwrap(), AuditAction::StatusChanged);
    }

    #[test]
    fn api_key_hint_never_shows_a_whole_key() {
        assert_eq!(ApiKeyHint::from_api_key("abcdefghWXYZ").as_str(), "…WXYZ");
        assert_eq!(ApiKeyHint::from_api_key("abcde").as_str(), "…bcde");
        assert_eq!(ApiKeyHint::from_api_key("abcd").as_str(), "…bcd");
        assert_eq!(ApiKeyHint::from_api_key("ab").as_str(), "…b");
        assert_eq!(ApiKeyHint::from_api_key("a").as_str(), "…");
        assert_eq!(ApiKeyHint::from_api_key("").as_str(), "…");
        assert_eq!(ApiKeyHint::from_api_key("ключ-ÄÖÜß").as_str(), "…ÄÖÜß");
    }

    #[test]
    fn permissions_and_features_tolerate_missing_fields() {
        let p: Permissions = serde_json::from_str(r#"{"read":true}"#).unwrap();
        assert_eq!(p, Permissions { read: true, ..Permissions::default() });
        let f: Features = serde_json::from_str("{}").unwrap();
        assert_eq!(f, Features::default());
    }
}
