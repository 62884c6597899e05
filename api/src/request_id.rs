//! The request id: every request gets an `X-Request-Id`, every response carries it back, and every
//! log line written while the request is served carries it in the `request` span, so a client
//! (or an operator) can find that request's log lines from its response.
//!
//! An id the client sends is kept if it is a short plain token (at most 64 letters, digits or
//! `-_.:+/=`: a UUID, a ULID, a proxy's trace id): it is only a label for correlating logs, grants
//! nothing, and a caller can only label its own requests. Anything else (too long, other
//! characters, several headers) is replaced by a fresh UUID, so a client cannot write arbitrary
//! text into the logs.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use tower_http::request_id::RequestId;

/// The header, on requests and responses.
pub(crate) const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-supplied id that is kept.
const MAX_LEN: usize = 64;

/// The id of a request: the client's when it is usable (see the module doc), else a fresh UUID.
pub(crate) fn of(headers: &HeaderMap) -> HeaderValue {
    let mut ids = headers.get_all(&HEADER).iter();
    match (ids.next(), ids.next()) {
        (Some(id), None) if is_usable(id.as_bytes()) => id.clone(),
        _ => {
            let fresh = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).to_owned();
            HeaderValue::try_from(fresh).expect("a UUID is a header value")
        }
    }
}

/// Files the id where [`span`] (and any handler) finds it.
pub(crate) fn attach(request: &mut Request, id: HeaderValue) {
    request.extensions_mut().insert(RequestId::new(id));
}

/// The span every log line of a request is written in. INFO, so that it is enabled wherever the
/// handlers' own lines are. It records the path but not the query string: `/kite/callback`
/// receives a Kite request token there.
pub(crate) fn span(request: &Request) -> tracing::Span {
    let id = request.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("");
    tracing::info_span!("request", method = %request.method(), path = request.uri().path(), request_id = id)
}

fn is_usable(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+' | b'/' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_short_tokens_are_kept() {
        assert!(is_usable(b"5f0c6c3e-1b1e-4c1a-9d3c-0f8a6b7e2d41"));
        assert!(is_usable(b"01J9ZQ4M5X8Y7W6V5T4S3R2Q1P"));
        assert!(is_usable(b"Root=1-5759e988-bd862e3fe1be46a9"));
        assert!(is_usable(&[b'a'; MAX_LEN]));
    }

    #[test]
    fn anything_else_is_replaced() {
        assert!(!is_usable(b""));
        assert!(!is_usable(&[b'a'; MAX_LEN + 1]));
        assert!(!is_usable(b"two words"));
        assert!(!is_usable(b"line\nbreak"));
        assert!(!is_usable(b"quote\"d"));
        assert!(!is_usable("caf\u{e9}".as_bytes()));
    }
}
