//! What the gateway tells its operators, set up in one place: log lines (text or
//! JSON to stderr, filtered by `log.level`, or `RUST_LOG` when set), the access log
//! ([`crate::server::access`], its own formatter and writer thread), and
//! OpenTelemetry traces ([`crate::trace`]).

use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, Settings};

/// Installs the global subscriber. Safe to call more than once (later calls are
/// ignored).
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Everything `settings` asks for: the subscriber and the access log (`log.access`).
/// Tracing starts later, within the runtime ([`start_tracing`]).
pub fn init_for(settings: &Settings) {
    init(settings.log.format, &settings.log.level);
    crate::server::access::install(&settings.log);
}

/// Starts OpenTelemetry tracing when `[tracing]` is configured (within the runtime).
pub fn start_tracing(settings: &Settings) -> Result<(), String> {
    match &settings.tracing {
        Some(t) => {
            crate::trace::start(t)?;
            tracing::info!(
                endpoint = %t.endpoint,
                sample_ratio = t.sample_ratio,
                "exporting traces over OTLP/HTTP"
            );
            Ok(())
        }
        None => Ok(()),
    }
}

/// At exit: writes what the access log holds and exports the spans queued, each
/// within `timeout` (an output or a collector that is stalled does not hold the
/// exit longer).
pub async fn flush(timeout: Duration) {
    let access = tokio::task::spawn_blocking(move || {
        if let Some(log) = crate::server::access::get() {
            log.flush(timeout);
        }
    });
    let traces = tokio::task::spawn_blocking(move || crate::trace::shutdown(timeout));
    let _ = tokio::join!(access, traces);
}
