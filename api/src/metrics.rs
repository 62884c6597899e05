//! The API's metrics, named once here and registered in the process's one
//! [`prometheus::Registry`] (`AppState::registry`), which the metrics listener ([`serve`]) renders.
//! The workers register their own metrics in the same registry, so one scrape shows the whole
//! process.

use std::future::Future;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::net::TcpListener;
use tradeeon_shared::jobs::JobKind;

use crate::{ApiError, AppState};

/// Request latency buckets, in seconds: fine below 25 ms, where the API should live.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Route label for requests that matched no route (keeps the label set bounded).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The method label: one of HTTP's standard methods, or `other`. The caller chooses the method,
/// and every new label value would be a set of series kept for the life of the process.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

pub struct ApiMetrics {
    /// `tradeeon_http_requests_total{method, route, status}`
    requests: IntCounterVec,
    /// `tradeeon_http_request_duration_seconds{method, route}`
    latency: HistogramVec,
    /// `tradeeon_jobs_enqueued_total{kind}`
    jobs_enqueued: IntCounterVec,
}

impl ApiMetrics {
    /// Creates the metrics and registers them in `registry`. Fails if they are registered
    /// there already (one `AppState` per registry).
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new("tradeeon_http_requests_total", "HTTP requests answered, by route template and status."),
            &["method", "route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("tradeeon_http_request_duration_seconds", "Time to answer an HTTP request.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["method", "route"],
        )?;
        let jobs_enqueued = IntCounterVec::new(
            Opts::new("tradeeon_jobs_enqueued_total", "Jobs enqueued by the API, by kind."),
            &["kind"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(jobs_enqueued.clone()))?;
        // Zero series for every kind, so dashboards and rate() see them before the first job.
        for kind in JobKind::ALL {
            jobs_enqueued.with_label_values(&[kind.as_str()]);
        }
        Ok(Self { requests, latency, jobs_enqueued })
    }

    pub fn job_enqueued(&self, kind: JobKind) {
        self.jobs_enqueued.with_label_values(&[kind.as_str()]).inc();
    }

    fn observe(&self, method: &Method, route: &str, status: u16, started: Instant) {
        let method = method_label(method);
        self.requests.with_label_values(&[method, route, status.to_string().as_str()]).inc();
        self.latency.with_label_values(&[method, route]).observe(started.elapsed().as_secs_f64());
    }
}

/// Middleware (as a route layer, so the route template is known): counts and times requests.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let response = next.run(request).await;
    state.metrics.observe(&method, &route, response.status().as_u16(), started);
    response
}

/// Answers unmatched paths (counted under [`UNMATCHED_ROUTE`]) in the API's error format.
pub async fn not_found(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let response = ApiError::NotFound.into_response();
    state.metrics.observe(request.method(), UNMATCHED_ROUTE, response.status().as_u16(), started);
    response
}

/// The metrics listener's routes: `GET /metrics` renders `registry`; everything else is 404.
/// It listens on a port of its own (`API_METRICS_PORT`), never on the public router: the load
/// balancer forwards only `API_PORT`, and the metrics are for scrapers inside the VPC.
pub fn router(registry: Registry) -> Router {
    Router::new().route("/metrics", get(render)).with_state(registry)
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry)).with_graceful_shutdown(shutdown).await
}

/// `GET /metrics`: the registry in the Prometheus text format.
async fn render(State(registry): State<Registry>) -> Result<Response, ApiError> {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .map_err(|e| ApiError::Internal(e.into()))?;
    let mut response = text.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(prometheus::TEXT_FORMAT));
    Ok(response)
}
