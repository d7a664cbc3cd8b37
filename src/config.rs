//! Configuration shared by the commands that talk to Postgres: flags, each with an
//! environment variable.

use std::time::Duration;

use clap::Args;

/// How to reach and use the database.
#[derive(Clone, Debug, Args)]
pub struct DbArgs {
    /// Postgres connection URL, e.g. postgres://postgres@127.0.0.1:5432/antenna.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "TALLY_POOL_SIZE", default_value_t = 4)]
    pub pool_size: usize,
    /// Statement timeout in seconds (0: none). Bounds every statement tally sends.
    #[arg(long, env = "TALLY_STATEMENT_TIMEOUT", default_value_t = 300)]
    pub statement_timeout: u64,
    /// Time zone of the session. Django (USE_TZ=False) writes naive wall-clock times in its
    /// TIME_ZONE; tally sets the same zone so that `now()` and timestamps agree with Django's.
    #[arg(long, env = "TALLY_TIME_ZONE", default_value = "America/New_York")]
    pub time_zone: String,
    /// Connection attempts before giving up (the first attempt included).
    #[arg(long, env = "TALLY_CONNECT_ATTEMPTS", default_value_t = 8)]
    pub connect_attempts: u32,
    /// Delay before the second attempt in milliseconds; doubles each attempt, capped at 30 s.
    #[arg(long, env = "TALLY_CONNECT_BACKOFF_MS", default_value_t = 250)]
    pub connect_backoff_ms: u64,
}

impl DbArgs {
    /// The settings for `url`, with every default.
    pub fn for_url(url: &str) -> Self {
        DbArgs {
            database_url: url.to_string(),
            pool_size: 4,
            statement_timeout: 300,
            time_zone: "America/New_York".into(),
            connect_attempts: 8,
            connect_backoff_ms: 250,
        }
    }

    /// The delay before attempt `n` (1-based; the first attempt has none).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ms = self.connect_backoff_ms.saturating_mul(1u64 << attempt.saturating_sub(2).min(16));
        Duration::from_millis(ms.min(30_000))
    }
}
