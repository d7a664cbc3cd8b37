//! Configuration shared by the commands that talk to Postgres and NATS: flags, each with an
//! environment variable.

use std::time::Duration;

use clap::Args;

use crate::duration::{parse_millis, parse_secs};
use crate::retry::BackoffBuilder;

/// The settings of `T` as its `#[arg]` attributes define them when only `flags` are given,
/// so that each default is stated once, there (`impl Default` of the flag structs calls this).
/// Environment variables are not read: a default does not depend on the process's environment.
///
/// # Panics
///
/// When `flags` or a default does not parse: a bug in the caller or in `T`'s attributes.
pub fn from_flags<T: clap::Args>(flags: &[&str]) -> T {
    let command =
        T::augment_args(clap::Command::new("tally").no_binary_name(true)).mut_args(|arg| arg.env(None::<&'static str>));
    let matches = command.try_get_matches_from(flags).unwrap_or_else(|e| panic!("flags {flags:?}: {e}"));
    T::from_arg_matches(&matches).unwrap_or_else(|e| panic!("flags {flags:?}: {e}"))
}

/// How to reach and use the database.
#[derive(Clone, Debug, Args)]
pub struct DbArgs {
    /// Postgres connection URL, e.g. postgres://postgres@127.0.0.1:5432/antenna.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "TALLY_POOL_SIZE", default_value_t = 4)]
    pub pool_size: usize,
    /// Statement timeout (0: none; a bare number is seconds). Bounds every statement tally
    /// sends.
    #[arg(long, env = "TALLY_STATEMENT_TIMEOUT", value_parser = parse_secs, default_value = "300")]
    pub statement_timeout: Duration,
    /// Time zone of the session. Django (USE_TZ=False) writes naive wall-clock times in its
    /// TIME_ZONE; tally sets the same zone so that `now()` and timestamps agree with Django's.
    #[arg(long, env = "TALLY_TIME_ZONE", default_value = "America/New_York")]
    pub time_zone: String,
    /// Connection attempts before giving up (the first attempt included).
    #[arg(long, env = "TALLY_CONNECT_ATTEMPTS", default_value_t = 8)]
    pub connect_attempts: u32,
    /// Delay before the second attempt (a bare number is milliseconds); doubles each attempt,
    /// capped at 30 s.
    #[arg(long, alias = "connect-backoff-ms", env = "TALLY_CONNECT_BACKOFF_MS", value_parser = parse_millis, default_value = "250ms")]
    pub connect_backoff: Duration,
    /// How Postgres compresses the large values tally writes (TOAST): the scores and logits
    /// of a classification are 233 KB each with ADC's 29,176-class model. `pglz`, Postgres'
    /// default, spends ~4 ms of the server's CPU on each such array and then stores it
    /// uncompressed anyway; `lz4` gives up on it at once. `server` keeps the server's
    /// `default_toast_compression`. Only values tally writes are affected; readers (Django)
    /// read both alike. Where the server was built without lz4, tally warns and keeps the
    /// server's.
    #[arg(long, env = "TALLY_TOAST_COMPRESSION", value_enum, default_value_t = ToastCompression::Lz4)]
    pub toast_compression: ToastCompression,
}

/// The `default_toast_compression` of tally's sessions (`--toast-compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ToastCompression {
    /// LZ4 (Postgres 14+ built `--with-lz4`, as Debian's and the official images are).
    Lz4,
    /// Postgres' own pglz.
    Pglz,
    /// Whatever the server's configuration says.
    Server,
}

impl ToastCompression {
    /// The setting's value, `None` for [`ToastCompression::Server`].
    pub fn setting(self) -> Option<&'static str> {
        match self {
            ToastCompression::Lz4 => Some("lz4"),
            ToastCompression::Pglz => Some("pglz"),
            ToastCompression::Server => None,
        }
    }
}

impl DbArgs {
    /// Fails when no URL was given. `serve` and `rebuild` accept none on a dataflow peer (`-p`
    /// above 0), which never connects; every process that does connect needs one.
    pub fn require_url(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.database_url.is_empty(),
            "--database-url (or DATABASE_URL) is required: this process connects to Postgres"
        );
        Ok(())
    }

    /// The settings for `url`, with every default.
    pub fn for_url(url: &str) -> Self {
        from_flags(&[&format!("--database-url={url}")])
    }
}

/// How to reach NATS and which JetStream names to use. Defaults are Antenna's where Antenna has
/// one (SPEC §4).
#[derive(Clone, Debug, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// The stream that carries result messages.
    #[arg(long, env = "TALLY_RESULTS_STREAM", default_value = "TALLY_RESULTS")]
    pub results_stream: String,
    /// Results are published on `<prefix>.{job_id}`.
    #[arg(long, env = "TALLY_RESULTS_SUBJECT_PREFIX", default_value = "tally.results")]
    pub results_subject_prefix: String,
    /// JetStream object store bucket that carries results larger than one NATS message (claim
    /// check; its max age is the results stream's).
    #[arg(long, env = "TALLY_RESULTS_OBJECT_BUCKET", default_value = "TALLY_RESULT_OBJECTS")]
    pub results_object_bucket: String,
    /// How long one attempt to connect may take (a bare number is seconds). `tally serve`
    /// retries attempts until --startup-deadline; the other commands retry for up to this
    /// long in all. A connection once made that is lost is retried forever.
    #[arg(long, env = "TALLY_NATS_CONNECT_TIMEOUT", value_parser = parse_secs, default_value = "10")]
    pub nats_connect_timeout: Duration,
    /// How long to wait for a JetStream API or acknowledgement reply (a bare number is
    /// seconds).
    #[arg(long, env = "TALLY_NATS_REQUEST_TIMEOUT", value_parser = parse_secs, default_value = "10")]
    pub nats_request_timeout: Duration,
}

impl NatsArgs {
    /// The settings for `url`, with every default.
    pub fn for_url(url: &str) -> Self {
        from_flags(&[&format!("--nats-url={url}")])
    }

    /// The subject of job `job_id`'s results.
    pub fn results_subject(&self, job_id: i64) -> String {
        format!("{}.{job_id}", self.results_subject_prefix)
    }

    /// Where the connection goes, without credentials (for logs and `/readyz`).
    pub fn redacted_url(&self) -> String {
        self.nats_url
            .split(',')
            .map(|part| {
                let part = part.trim();
                match part.rsplit_once('@') {
                    Some((before, host)) => match before.split_once("://") {
                        Some((scheme, _credentials)) => format!("{scheme}://{host}"),
                        None => host.to_string(),
                    },
                    None => part.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One attempt to connect, bounded by `nats_connect_timeout`: one persistent connection
    /// that reconnects on its own once established.
    pub async fn connect_once(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let options = async_nats::ConnectOptions::new()
            .name("tally")
            .connection_timeout(self.nats_connect_timeout.max(Duration::from_secs(1)))
            .request_timeout(Some(self.nats_request_timeout))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected; reconnecting"),
                    other => tracing::info!(event = %other, "NATS event"),
                }
            });
        async_nats::connect_with_options(self.nats_url.as_str(), options).await
    }

    /// Connects, retrying the first connection for up to `nats_connect_timeout` in all
    /// (the one-shot commands; `tally serve` retries until its start-up deadline).
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let deadline = std::time::Instant::now() + self.nats_connect_timeout;
        let mut backoff = crate::retry::nats_connect().build();
        loop {
            let delay = crate::retry::pause(&mut backoff);
            let remaining = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_secs(1));
            let attempt = tokio::time::timeout(remaining, self.connect_once()).await;
            match attempt {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) if std::time::Instant::now() + delay < deadline => {
                    tracing::warn!(url = %self.redacted_url(), error = %e, retry_in = ?delay, "cannot connect to NATS yet");
                    tokio::time::sleep(delay).await;
                }
                Ok(Err(e)) => anyhow::bail!(
                    "cannot connect to NATS at {} within {} s: {e} (is nats-server running with -js?)",
                    self.redacted_url(),
                    self.nats_connect_timeout.as_secs_f64()
                ),
                Err(_) => anyhow::bail!(
                    "cannot connect to NATS at {} within {} s: timed out (is nats-server running with -js?)",
                    self.redacted_url(),
                    self.nats_connect_timeout.as_secs_f64()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{from_flags, DbArgs, NatsArgs};
    use crate::gateway::GatewayArgs;
    use crate::ingest::daemon::IngestArgs;

    #[test]
    fn defaults_are_the_flags_defaults() {
        let db = DbArgs::for_url("postgres://postgres@127.0.0.1/antenna");
        assert_eq!(db.database_url, "postgres://postgres@127.0.0.1/antenna");
        assert_eq!((db.pool_size, db.connect_attempts, db.time_zone.as_str()), (4, 8, "America/New_York"));
        assert_eq!((db.statement_timeout, db.connect_backoff), (Duration::from_secs(300), Duration::from_millis(250)));
        let nats = NatsArgs::for_url("nats://n:4222");
        assert_eq!(
            (nats.nats_url.as_str(), nats.results_object_bucket.as_str()),
            ("nats://n:4222", "TALLY_RESULT_OBJECTS")
        );
        assert_eq!(nats.nats_connect_timeout, Duration::from_secs(10));
        let ingest = IngestArgs::default();
        assert_eq!(
            (ingest.batch_size, ingest.batch_linger, ingest.nak_delay),
            (500, Duration::from_millis(5), Duration::from_secs(2))
        );
        assert_eq!(
            (ingest.consumer.ack_wait, ingest.feed.feed_poll),
            (Duration::from_secs(60), Duration::from_secs(10))
        );
        assert_eq!(GatewayArgs::default().gateway_fetch_wait, Duration::from_millis(500));
        assert_eq!(ingest.consumer.max_age(), Duration::from_secs(24 * 3600));
    }

    #[test]
    fn old_flag_names_and_bare_numbers_keep_their_meaning() {
        let ingest: IngestArgs =
            from_flags(&["--batch-linger-ms", "7", "--nak-delay", "3", "--max-age-hours", "2", "--ack-wait", "1.5"]);
        assert_eq!((ingest.batch_linger, ingest.nak_delay), (Duration::from_millis(7), Duration::from_secs(3)));
        assert_eq!(
            (ingest.consumer.max_age(), ingest.consumer.ack_wait),
            (Duration::from_secs(7200), Duration::from_millis(1500))
        );
        let ingest: IngestArgs = from_flags(&["--batch-linger", "1s", "--results-max-age", "30m"]);
        assert_eq!(
            (ingest.batch_linger, ingest.consumer.max_age()),
            (Duration::from_secs(1), Duration::from_secs(1800))
        );
        let db: DbArgs =
            from_flags(&["--database-url=postgres://h/d", "--connect-backoff-ms", "10", "--statement-timeout", "2m"]);
        assert_eq!((db.connect_backoff, db.statement_timeout), (Duration::from_millis(10), Duration::from_secs(120)));
    }

    #[test]
    fn nats_urls_are_shown_without_credentials() {
        let shown = |url: &str| NatsArgs::for_url(url).redacted_url();
        assert_eq!(shown("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(shown("nats://user:secret@n1:4222, tls://tok@n2:4222"), "nats://n1:4222,tls://n2:4222");
        assert_eq!(shown("secret@n3:4222"), "n3:4222");
    }
}
