//! tracing set-up: `--log.level`, `--log.format logfmt|json`, to stderr.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSection};

/// Installs the global subscriber. Noisy dependencies stay at warn unless asked for by name.
pub fn init(log: &LogSection) {
    let directives = if log.level.contains('=') {
        log.level.clone()
    } else {
        format!("{level},h2=warn,hyper=warn,rustls=warn", level = log.level)
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = match log.format {
        LogFormat::Logfmt => tracing_logfmt::builder()
            .with_span_path(false)
            .layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}
