//! Connecting: a pool of sessions with tally's settings, reached with bounded retries.

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tracing::{info, warn};

use crate::config::DbArgs;
use crate::store::StoreError;

/// A pool of Postgres sessions, each with the configured time zone and statement timeout.
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
}

/// Opens the pool, first waiting for the database to answer: up to `connect_attempts`
/// attempts with doubling delays. Errors that retrying cannot fix (no such database, bad
/// credentials) fail at once.
pub async fn connect(args: &DbArgs) -> Result<Store, StoreError> {
    let config: tokio_postgres::Config = args.database_url.parse()?;
    let mut attempt = 1;
    loop {
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                drop(client);
                drop(connection);
                break;
            }
            Err(e) if attempt >= args.connect_attempts.max(1) || is_permanent(&e) => {
                return Err(StoreError::Unreachable { attempts: attempt, source: e });
            }
            Err(e) => {
                let delay = args.backoff(attempt + 1);
                warn!(attempt, error = %e, delay_ms = delay.as_millis() as u64, "database unreachable, retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
    let setup = format!(
        "SET TIME ZONE '{}'; SET statement_timeout = {}",
        args.time_zone.replace('\'', "''"),
        args.statement_timeout.saturating_mul(1000)
    );
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let pool = Pool::builder(manager)
        .max_size(args.pool_size.max(1))
        .post_create(Hook::async_fn(move |client, _metrics| {
            let setup = setup.clone();
            Box::pin(async move { client.batch_execute(&setup).await.map_err(HookError::Backend) })
        }))
        .build()
        .map_err(|e| StoreError::Pool(e.to_string()))?;
    info!(attempts = attempt, "connected to the database");
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
    use super::sibling_database_url;

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
