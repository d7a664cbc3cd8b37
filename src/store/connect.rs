//! Connecting: a pool of sessions with tally's settings, reached with bounded retries
//! ([`connect`]) or one attempt at a time ([`connect_once`], which `tally serve` retries until
//! its start-up deadline).

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tracing::{info, warn};

use crate::config::DbArgs;
use crate::retry::{self, BackoffBuilder};
use crate::store::StoreError;

/// A pool of Postgres sessions, each with the configured time zone, statement timeout and
/// compression of large values (`--toast-compression`), and `tally.origin = 'tally'`: the
/// change feed's triggers skip tally's own writes, which reach the dataflow in the
/// transaction that makes them (migration V7).
#[derive(Clone)]
pub struct Store {
    /// The sessions.
    pub pool: Pool,
    /// The settings the store was opened with.
    pub args: DbArgs,
}

impl Store {
    /// A session from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Forgets the statements every session of the pool has prepared and kept
    /// (`prepare_cached`): after a schema change made one of them stale
    /// ([`is_stale_statement`]), each is prepared again at its next use.
    pub fn forget_statements(&self) {
        self.pool.manager().statement_caches.clear();
    }
}

/// Whether `e` comes from a kept prepared statement that a schema change made stale: the type
/// of a column it returns changed since it was prepared (a Django migration altering
/// `jobs_job.status`, say), which Postgres refuses with "cached plan must not change result
/// type" (SQLSTATE 0A000) at every use until it is prepared again.
pub fn is_stale_statement(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED)
        && e.as_db_error().is_some_and(|d| d.message().contains("cached plan must not change result type"))
}

/// Opens the pool, first waiting for the database to answer: up to `connect_attempts`
/// attempts with doubling delays. Errors that retrying cannot fix (no such database, bad
/// credentials) fail at once.
pub async fn connect(args: &DbArgs) -> Result<Store, StoreError> {
    let config: tokio_postgres::Config = args.database_url.parse()?;
    let mut backoff = retry::db_connect(args.connect_backoff, args.connect_attempts).build();
    let mut attempt = 1;
    loop {
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                let compression = first_session(client, connection, args).await;
                let pool = pool(args, config, compression)?;
                info!(attempts = attempt, "connected to the database");
                return Ok(pool);
            }
            Err(e) => match backoff.next().filter(|_| !is_permanent(&e)) {
                Some(delay) => {
                    warn!(attempt, error = %e, delay_ms = delay.as_millis() as u64, "database unreachable, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                None => return Err(StoreError::Unreachable { attempts: attempt, source: e }),
            },
        }
    }
}

/// One attempt: the pool, once the database has answered one connection. The error is the
/// driver's, so that [`is_permanent`] can tell whether another attempt may succeed.
pub async fn connect_once(args: &DbArgs) -> Result<Store, ConnectError> {
    let config: tokio_postgres::Config = args.database_url.parse().map_err(ConnectError::Permanent)?;
    let compression = match config.connect(NoTls).await {
        Ok((client, connection)) => first_session(client, connection, args).await,
        Err(e) if is_permanent(&e) => return Err(ConnectError::Permanent(e)),
        Err(e) => return Err(ConnectError::Transient(e)),
    };
    pool(args, config, compression).map_err(ConnectError::Pool)
}

/// The first session, which showed that the database answers: asks it the TOAST compression
/// the pool's sessions will set, then closes it.
async fn first_session<S, T>(
    client: tokio_postgres::Client,
    connection: tokio_postgres::Connection<S, T>,
    args: &DbArgs,
) -> Option<&'static str>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let running = tokio::spawn(connection);
    let compression = toast_compression(&client, args).await;
    drop(client);
    running.abort();
    compression
}

/// How long the first session may take to say which TOAST compressions the server offers.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The `default_toast_compression` tally's sessions set: `--toast-compression` when the
/// server accepts it; else none (the server's), with a warning.
async fn toast_compression(client: &tokio_postgres::Client, args: &DbArgs) -> Option<&'static str> {
    let wanted = args.toast_compression.setting()?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&wanted];
    let asked = client.query_opt(
        "SELECT $1::text = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
        &params,
    );
    // The probe session has no statement timeout yet: a server that accepts connections but
    // does not answer must not hold the start here.
    let accepted = match tokio::time::timeout(PROBE_TIMEOUT, asked).await {
        Ok(answer) => answer,
        Err(_) => {
            warn!(
                seconds = PROBE_TIMEOUT.as_secs(),
                "the server did not say which compressions it offers: keeping its default"
            );
            return None;
        }
    };
    match accepted {
        Ok(Some(row)) if row.get::<_, Option<bool>>(0) == Some(true) => Some(wanted),
        Ok(_) => {
            warn!(
                toast_compression = wanted,
                "the server does not offer this compression for large values (Postgres before 14, or built without lz4): keeping its own"
            );
            None
        }
        Err(e) => {
            warn!(error = %e, "cannot read the server's default_toast_compression choices: keeping its default");
            None
        }
    }
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Another attempt may succeed (nothing listens yet, the server is starting, …).
    #[error("{}", with_cause(.0))]
    Transient(tokio_postgres::Error),
    /// Another attempt will not help: a malformed URL, no such database, bad credentials.
    #[error("{}", with_cause(.0))]
    Permanent(tokio_postgres::Error),
    /// The pool could not be built.
    #[error(transparent)]
    Pool(StoreError),
}

/// The driver's error with its cause ("db error: FATAL: database \"x\" does not exist", not
/// just "db error").
fn with_cause(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

impl ConnectError {
    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, ConnectError::Transient(_))
    }
}

/// Where `url` points, without credentials: `host:port/database` (for logs and `/readyz`).
pub fn describe(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "the database (unparsable URL)".into();
    };
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            }
        })
        .collect();
    format!("{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""))
}

fn pool(args: &DbArgs, config: tokio_postgres::Config, compression: Option<&str>) -> Result<Store, StoreError> {
    let mut setup = format!(
        "SET TIME ZONE '{}'; SET statement_timeout = {}; SET tally.origin = 'tally'",
        args.time_zone.replace('\'', "''"),
        args.statement_timeout.as_millis()
    );
    if let Some(method) = compression {
        setup.push_str(&format!("; SET default_toast_compression = '{method}'"));
    }
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let pool = Pool::builder(manager)
        .max_size(args.pool_size.max(1))
        .post_create(Hook::async_fn(move |client, _metrics| {
            let setup = setup.clone();
            Box::pin(async move { client.batch_execute(&setup).await.map_err(HookError::Backend) })
        }))
        .build()
        .map_err(|e| StoreError::Pool(e.into()))?;
    Ok(Store { pool, args: args.clone() })
}

/// `url` with its database replaced by `name` (for scratch databases beside a server's
/// default one), or `None` when `url` names no database.
pub fn sibling_database_url(url: &str, name: &str) -> Option<String> {
    let (server, database) = url.rsplit_once('/')?;
    (!database.is_empty() && server.contains("://")).then(|| format!("{server}/{name}"))
}

/// Connection errors that another attempt will not fix.
fn is_permanent(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::INVALID_CATALOG_NAME)
            | Some(&SqlState::INVALID_PASSWORD)
            | Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    )
}

#[cfg(test)]
mod tests {
    use super::{describe, sibling_database_url};

    #[test]
    fn descriptions_carry_no_password() {
        assert_eq!(describe("postgres://tally:secret@db.example:6543/antenna"), "db.example:6543/antenna");
        assert_eq!(describe("postgres://postgres@127.0.0.1/antenna"), "127.0.0.1:5432/antenna");
        assert!(!describe("host=h password=secret dbname=d").contains("secret"));
    }

    #[test]
    fn replaces_only_the_database() {
        assert_eq!(
            sibling_database_url("postgres://postgres@127.0.0.1:5432/postgres", "scratch").as_deref(),
            Some("postgres://postgres@127.0.0.1:5432/scratch")
        );
        assert_eq!(sibling_database_url("postgres://postgres@127.0.0.1:5432/", "x"), None);
        assert_eq!(sibling_database_url("not a url", "x"), None);
    }
}
