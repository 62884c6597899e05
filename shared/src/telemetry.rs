//! Logging setup shared by every subcommand.
//!
//! Secrets never reach a log line: plaintext credentials live in `vault::SecretValue`, whose
//! `Debug` is redacted, and spans skip request bodies.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Default verbosity when `RUST_LOG` is unset: our crates at info, chatty dependencies at warn.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,apalis=warn,apalis_core=warn,hyper=warn,tower_http=info";

/// Installs the global subscriber. Logs go to stderr so that commands printing a result on
/// stdout (`tradeeon keygen`) stay pipeable. Calling it twice is harmless (the second is a no-op).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = subscriber(format, filter, std::io::stderr).try_init();
}

/// The subscriber [`init`] installs, writing to `writer` (tests capture what production writes).
///
/// JSON lines carry every enclosing span (`spans`), not only the innermost (`span`): the API's
/// `request` span, with the request id, encloses the handler's own span.
pub fn subscriber<W>(format: LogFormat, filter: EnvFilter, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Pretty => {
            Box::new(registry.with(tracing_subscriber::fmt::layer().with_writer(writer).with_target(false)))
        }
        LogFormat::Json => Box::new(registry.with(
            tracing_subscriber::fmt::layer().json().with_current_span(true).with_span_list(true).with_writer(writer),
        )),
    }
}
