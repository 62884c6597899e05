//! The worker's own `/metrics` listener (`tradeeon worker`, on `API_HOST`:`WORKER_METRICS_PORT`):
//! the process's Prometheus registry in the text exposition format. `tradeeon serve` does not
//! start it: the API's metrics listener (`API_METRICS_PORT`) renders the same registry there.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::Registry;
use tokio::net::TcpListener;

/// `GET /metrics` over `registry`; everything else is 404.
pub fn router(registry: Registry) -> Router {
    Router::new().route("/metrics", get(render)).with_state(registry)
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "worker metrics listening on /metrics");
    }
    axum::serve(listener, router(registry)).with_graceful_shutdown(shutdown).await
}

async fn render(State(registry): State<Registry>) -> Response {
    match prometheus::TextEncoder::new().encode_to_string(&registry.gather()) {
        Ok(text) => {
            let mut response = text.into_response();
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(prometheus::TEXT_FORMAT));
            response
        }
        Err(error) => {
            tracing::error!(%error, "could not encode the metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::WorkerMetrics;
    use tradeeon_shared::jobs::JobKind;

    #[tokio::test]
    async fn serves_the_registry_in_the_text_format() {
        let registry = Registry::new();
        let metrics = WorkerMetrics::register(&registry).unwrap();
        metrics.job_finished(JobKind::Test, crate::metrics::outcome::DONE, std::time::Duration::from_millis(5));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(listener, registry, async {
            let _ = stopped.await;
        }));

        let client = reqwest::Client::new();
        let response = client.get(format!("http://{addr}/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[header::CONTENT_TYPE], prometheus::TEXT_FORMAT);
        let body = response.text().await.unwrap();
        assert!(body.contains(r#"tradeeon_jobs_total{kind="test",outcome="done"} 1"#), "{body}");
        let missing = client.get(format!("http://{addr}/nope")).send().await.unwrap();
        assert_eq!(missing.status(), 404);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
