//! Structured logs on stderr: text for people, JSON for collectors.

use tracing::level_filters::LevelFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) {
    let level = match level.parse::<LevelFilter>() {
        Ok(l) if !level.is_empty() => l,
        _ => LevelFilter::INFO,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false);
    let r = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    if let Err(e) = r {
        eprintln!("logging: {e}");
    }
}
