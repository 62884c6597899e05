//! Fault injection shared by every fake exchange, and a log of the requests each one received
//! (so tests can assert, say, that nothing was sent during a `Retry-After` window).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tradeeon_shared::domain::Exchange;

use crate::SimState;

/// One injected misbehaviour. Faults apply to every request to that exchange until cleared,
/// except `ServerErrors` and `RateLimit`, which count down.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer normally, but only after this long.
    Latency(Duration),
    /// The next `count` requests answer with `status` (5xx).
    ServerErrors { status: u16, count: u32 },
    /// Never answer (the client's timeout must fire).
    Hang,
    /// Answer 200 with a body that is not JSON.
    Malformed,
    /// The next `count` requests answer 429 with `Retry-After: retry_after` (whole seconds).
    RateLimit { retry_after: Duration, count: u32 },
}

/// A request as the fake exchange saw it.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub exchange: Exchange,
    pub method: String,
    pub path: String,
    pub at: Instant,
    pub status: u16,
}

#[derive(Default)]
pub struct FaultSet {
    faults: Mutex<HashMap<Exchange, Vec<Fault>>>,
    clock_skew_ms: Mutex<HashMap<Exchange, i64>>,
    log: Mutex<Vec<LoggedRequest>>,
}

impl FaultSet {
    pub fn inject(&self, exchange: Exchange, fault: Fault) {
        self.faults.lock().expect("fault lock").entry(exchange).or_default().push(fault);
    }

    pub fn clear(&self, exchange: Exchange) {
        self.faults.lock().expect("fault lock").remove(&exchange);
        self.clock_skew_ms.lock().expect("skew lock").remove(&exchange);
    }

    /// Shifts the exchange's clock by `skew_ms` (positive: the exchange is ahead of us). Servers
    /// use [`FaultSet::now_ms`] for their timestamp checks and their time endpoints.
    pub fn set_clock_skew(&self, exchange: Exchange, skew_ms: i64) {
        self.clock_skew_ms.lock().expect("skew lock").insert(exchange, skew_ms);
    }

    /// The exchange's idea of the current time, in Unix milliseconds.
    pub fn now_ms(&self, exchange: Exchange) -> i64 {
        let skew = self.clock_skew_ms.lock().expect("skew lock").get(&exchange).copied().unwrap_or(0);
        chrono::Utc::now().timestamp_millis() + skew
    }

    pub fn requests(&self, exchange: Exchange) -> Vec<LoggedRequest> {
        self.log.lock().expect("log lock").iter().filter(|r| r.exchange == exchange).cloned().collect()
    }

    pub fn clear_log(&self) {
        self.log.lock().expect("log lock").clear();
    }

    fn record(&self, entry: LoggedRequest) {
        let mut log = self.log.lock().expect("log lock");
        // Bounded: a long-running `tradeeon simulate` must not grow without limit.
        if log.len() >= 100_000 {
            log.drain(..50_000);
        }
        log.push(entry);
    }

    /// Takes the fault that applies to the next request, counting down the countable ones.
    fn next_fault(&self, exchange: Exchange) -> Vec<Fault> {
        let mut faults = self.faults.lock().expect("fault lock");
        let Some(list) = faults.get_mut(&exchange) else { return Vec::new() };
        let mut applied = Vec::new();
        list.retain_mut(|fault| match fault {
            Fault::ServerErrors { count, status } => {
                applied.push(Fault::ServerErrors { status: *status, count: 1 });
                *count -= 1;
                *count > 0
            }
            Fault::RateLimit { count, retry_after } => {
                applied.push(Fault::RateLimit { retry_after: *retry_after, count: 1 });
                *count -= 1;
                *count > 0
            }
            other => {
                applied.push(other.clone());
                true
            }
        });
        applied
    }
}

/// Middleware applying the injected faults of `exchange` and logging every request.
pub async fn apply(
    State((state, exchange)): State<(Arc<SimState>, Exchange)>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let at = Instant::now();
    let faults = state.faults.next_fault(exchange);
    let mut response = None;
    for fault in &faults {
        match fault {
            Fault::Latency(delay) => tokio::time::sleep(*delay).await,
            Fault::Hang => std::future::pending::<()>().await,
            Fault::ServerErrors { status, .. } => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                response.get_or_insert_with(|| (status, "upstream failure").into_response());
            }
            Fault::RateLimit { retry_after, .. } => {
                let mut r =
                    (StatusCode::TOO_MANY_REQUESTS, "{\"code\":-1003,\"msg\":\"Too many requests.\"}").into_response();
                r.headers_mut().insert("retry-after", HeaderValue::from(retry_after.as_secs().max(1)));
                response.get_or_insert(r);
            }
            Fault::Malformed => {}
        }
    }
    let response = match response {
        Some(r) => r,
        None if faults.contains(&Fault::Malformed) => {
            let _ = next.run(request).await;
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Body::from("{\"this is\": not json"))
                .expect("static response")
        }
        None => next.run(request).await,
    };
    state.faults.record(LoggedRequest { exchange, method, path, at, status: response.status().as_u16() });
    response
}
