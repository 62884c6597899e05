//! The HTTP API of Tradeeon Connect.
//!
//! It authenticates, validates, encrypts, writes and enqueues; it never calls an exchange and
//! never decrypts a stored secret (that is the workers' job, behind the NAT's static IP). All SQL
//! goes through `tradeeon_shared::store`.
//!
//! Modules: [`auth`] verifies Supabase tokens; `extract` turns requests into the caller, the
//! client's address and validated JSON; `validate` checks credential shapes; `routes` holds one
//! module per route group, each documented for [`openapi`]; `metrics` names the API's metrics;
//! `request_id` labels every request and its log lines.

pub mod auth;
mod error;
mod extract;
pub mod login_state;
mod metrics;
pub mod openapi;
mod ratelimit;
mod request_id;
mod routes;
pub mod ui;
mod validate;
mod views;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use tradeeon_shared::config::Config;
use tradeeon_shared::store::Store;
use tradeeon_shared::vault::Keyring;
use url::Url;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;
pub use extract::MAX_BODY_BYTES;

use crate::auth::Authenticator;
use crate::error::Invalid;
use crate::extract::SeenUsers;
use crate::login_state::StateSigner;
use crate::metrics::ApiMetrics;
use crate::ratelimit::UserRateLimiter;

/// A request that takes longer than this is answered 503 (and its transaction rolled back), so
/// a stalled database never holds clients forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long fetching the Supabase JWKS may take.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// What every handler can reach. Cloning it is one reference count: axum clones the state for
/// every extractor of every request, and a struct of a dozen `Arc`s cost measurably more.
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The parts of [`AppState`].
#[derive(Clone)]
pub struct SharedState {
    pub store: Store,
    /// Encrypts incoming credentials. The API holds the keys but never decrypts stored secrets.
    pub keyring: Arc<Keyring>,
    /// The process's one metrics registry, rendered by the metrics listener ([`run_metrics`]).
    /// Clone it (it is an `Arc` inside) to register other components' metrics, e.g. the workers'
    /// in `tradeeon serve`.
    pub registry: prometheus::Registry,
    auth: Arc<Authenticator>,
    settings: Arc<Settings>,
    metrics: Arc<ApiMetrics>,
    limiter: Arc<UserRateLimiter>,
    users: Arc<SeenUsers>,
    login_states: Arc<StateSigner>,
    /// The embedded default's one-time sign-in links (`None`: tokens come from Supabase).
    local_sign_in: Option<Arc<ui::LocalSignIn>>,
}

/// The configuration the handlers read.
#[derive(Debug, Clone)]
struct Settings {
    trust_proxy: bool,
    egress_ips: Vec<IpAddr>,
    kite_login: Url,
    cors_origins: Vec<String>,
    portal_signin_url: Option<Url>,
    require_aal2: bool,
}

impl AppState {
    /// Builds the state from the process configuration and registers the API's metrics in
    /// `registry` (which fails if they are registered there already).
    pub fn new(
        config: &Config,
        store: Store,
        keyring: Arc<Keyring>,
        registry: prometheus::Registry,
    ) -> anyhow::Result<Self> {
        // No redirects: the JWKS is fetched from exactly SUPABASE_URL's host.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(JWKS_TIMEOUT)
            .build()
            .context("could not build the HTTP client for the Supabase JWKS")?;
        let auth = Authenticator::new(
            config.auth.audience.clone(),
            config.auth.jwt_secret.clone(),
            config.auth.supabase_url.as_ref(),
            http,
        );
        if config.auth.jwt_secret.is_none() && config.auth.supabase_url.is_none() {
            tracing::warn!(
                "neither SUPABASE_JWT_SECRET nor SUPABASE_URL is set: every authenticated request will be refused"
            );
        }
        let metrics = ApiMetrics::register(&registry).context("could not register the API metrics")?;
        Ok(Self(Arc::new(SharedState {
            store,
            keyring,
            registry,
            auth: Arc::new(auth),
            settings: Arc::new(Settings {
                trust_proxy: config.http.trust_proxy,
                egress_ips: config.egress.ips.clone(),
                kite_login: config.exchanges.kite_login.clone(),
                cors_origins: config.http.cors_origins.clone(),
                portal_signin_url: config.auth.portal_signin_url.clone(),
                require_aal2: config.auth.require_aal2,
            }),
            metrics: Arc::new(metrics),
            limiter: Arc::new(UserRateLimiter::new(config.http.user_rate_limit_per_minute)),
            users: Arc::new(SeenUsers::default()),
            login_states: Arc::new(StateSigner::from_vault_config(&config.vault)),
            local_sign_in: None,
        })))
    }

    /// Turns on the web UI's local sign-in (see [`ui`]); `config.auth.jwt_secret` must be its secret.
    pub fn with_local_sign_in(mut self, local: Arc<ui::LocalSignIn>) -> Self {
        Arc::make_mut(&mut self.0).local_sign_in = Some(local);
        self
    }
}

/// The complete router, with no listener attached, so tests can drive it over real HTTP on an
/// ephemeral port.
pub fn router(state: AppState) -> Router {
    let (routes, _document) =
        OpenApiRouter::with_openapi(openapi::ApiDoc::openapi()).merge(routes::all()).split_for_parts();
    // The web UI is merged after the document is built: its routes are not part of the API.
    let mut app = routes
        .merge(ui::router())
        .route_layer(middleware::from_fn(request_timeout))
        .route_layer(middleware::from_fn_with_state(state.clone(), metrics::track))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(metrics::not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http().make_span_with(request_id::span));
    if let Some(cors) = cors(&state.settings.cors_origins) {
        app = app.layer(cors);
    }
    // Outermost, so that even answers no handler sees (CORS preflights, 404s) carry them.
    app.layer(middleware::from_fn_with_state(state.clone(), every_answer)).with_state(state)
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([
                header::RETRY_AFTER,
                header::LINK,
                HeaderName::from_static("www-authenticate"),
                request_id::HEADER,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// What every answer carries, in one layer (each layer costs on every request): the request's
/// id ([`request_id`]), and HSTS when the request reached the load balancer over https, so a
/// browser never again sends this host a request (or an access token) in the clear. HSTS only
/// behind a trusted proxy: this process serves plain HTTP and learns the scheme from
/// `X-Forwarded-Proto`.
async fn every_answer(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = request_id::of(request.headers());
    request_id::attach(&mut request, id.clone());
    let https = state.settings.trust_proxy
        && request
            .headers()
            .get("x-forwarded-proto")
            .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"));
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(request_id::HEADER, id);
    if https {
        headers
            .insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=63072000; includeSubDomains"));
    }
    response
}

async fn request_timeout(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(anyhow::anyhow!("request timed out after {REQUEST_TIMEOUT:?}")).into_response(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::Invalid(Invalid {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: "This path does not support that method.".into(),
        field: None,
    })
}

/// Serves the metrics listener (`GET /metrics` over `registry`, nothing else) on `listener`, a
/// port apart from the API's (`API_METRICS_PORT`), until `shutdown` resolves.
pub async fn run_metrics(
    listener: TcpListener,
    registry: prometheus::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    metrics::serve(listener, registry, shutdown).await
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // axum leaves Nagle's algorithm on: a response that leaves in more than one write would wait
    // for the client's delayed ACK (up to 40 ms on Linux) before its last part.
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
