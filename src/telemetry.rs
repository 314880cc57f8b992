//! Logging with `tracing`. Keys never reach a log: the types that hold them do
//! not print them, and handlers skip request bodies.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. Fails on a bad filter or if one is already set.
pub fn init(
    format: LogFormat,
    filter: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = EnvFilter::try_new(filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
        LogFormat::Pretty => registry
            .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
            .try_init()?,
    }
    Ok(())
}

/// `err: cause: cause`, for one log line: the whole chain, so that a store
/// error logged here keeps its sqlx cause (and that one its I/O cause).
pub fn chain(err: &dyn std::error::Error) -> String {
    use std::fmt::Write as _;
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}
