//! Structured logs with `tracing`: human-readable by default, JSON for log shippers.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Logging options shared by every subcommand.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax, e.g. `info` or `tally=debug,warn`; overrides RUST_LOG.
    #[arg(long, env = "TALLY_LOG", global = true)]
    pub log: Option<String>,
}

/// Installs the global subscriber; logs go to stderr so that tables on stdout stay clean.
pub fn init(args: &LogArgs) {
    let filter = args
        .log
        .as_deref()
        .map(EnvFilter::new)
        .unwrap_or_else(|| EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
