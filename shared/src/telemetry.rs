//! Logging setup shared by every subcommand.
//!
//! Secrets never reach a log line: plaintext credentials live in `vault::SecretValue`, whose
//! `Debug` is redacted, and spans skip request bodies.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Default verbosity when `RUST_LOG` is unset: our crates at info, chatty dependencies at warn.
const DEFAULT_FILTER: &str = "info,sqlx=warn,apalis=warn,apalis_core=warn,hyper=warn,tower_http=info";

/// Installs the global subscriber. Logs go to stderr so that commands printing a result on
/// stdout (`tradeeon keygen`) stay pipeable. Calling it twice is harmless (the second is a no-op).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Pretty => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false)).try_init()
        }
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    let _ = result;
}
