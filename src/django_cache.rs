//! Django's query cache: after every commit in which tally wrote Antenna tables, the
//! django-cachalot keys of exactly those tables are invalidated in Django's cache Redis, so
//! Antenna's API never serves what tally has replaced (SPEC §5, `antenna/data-model.md` §0).
//!
//! cachalot 2.6.3 keeps, per database alias and table, a **table key** whose value is the time
//! of the table's last invalidation; a cached query result is served only while every table key
//! it depends on exists and is older than the result. The table key is
//! `sha1("<db alias>:<table>")` in hex (`cachalot/utils.py` `get_table_cache_key`), and
//! django-redis stores a Django cache key `k` as `<KEY_PREFIX>:<VERSION>:k` (Django's
//! `default_key_func`). Deleting the table key is the invalidation tally performs: a missing
//! table key makes every cached query on the table miss, exactly as a newer timestamp does,
//! and needs no knowledge of django-redis's value encoding.
//!
//! A Redis that is down never stops ingest: the tables are remembered, the failure is counted
//! (`tally_django_cache_invalidations_total{outcome="failed"}`) and logged, and the next
//! invalidation (or the periodic [`DjangoCache::run_retries`]) retries them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use metrics::counter;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::names;

/// Where Django's cache is and how it names keys.
#[derive(Clone, Debug, Args)]
pub struct DjangoCacheArgs {
    /// Redis URL of Django's `default` cache (Antenna's `REDIS_URL`, e.g.
    /// redis://127.0.0.1:6379/0). Unset: tally does not invalidate django-cachalot, and Django
    /// keeps serving cached reads of the tables tally writes until a Django write touches them.
    #[arg(long, env = "TALLY_DJANGO_CACHE_URL")]
    pub django_cache_url: Option<String>,
    /// Django's `CACHES["default"]["KEY_PREFIX"]` (Antenna: unset, "").
    #[arg(long, env = "TALLY_DJANGO_CACHE_KEY_PREFIX", default_value = "")]
    pub django_cache_key_prefix: String,
    /// Django's `CACHES["default"]["VERSION"]` (default 1).
    #[arg(long, env = "TALLY_DJANGO_CACHE_VERSION", default_value_t = 1)]
    pub django_cache_version: i64,
    /// The Django database alias of Antenna's database (cachalot keys include it).
    #[arg(long, env = "TALLY_DJANGO_DB_ALIAS", default_value = "default")]
    pub django_db_alias: String,
}

impl Default for DjangoCacheArgs {
    /// Every flag's default, as its `#[arg]` states it.
    fn default() -> Self {
        crate::config::from_flags(&[])
    }
}

/// The Redis key of cachalot's table key for `table`.
pub fn table_key(args: &DjangoCacheArgs, table: &str) -> String {
    let digest = sha1_smol::Sha1::from(format!("{}:{table}", args.django_db_alias)).digest().to_string();
    format!("{}:{}:{digest}", args.django_cache_key_prefix, args.django_cache_version)
}

struct Inner {
    args: DjangoCacheArgs,
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// Tables whose invalidation failed, to retry.
    pending: Mutex<BTreeSet<String>>,
    /// Tables invalidated since the last echo, to invalidate once more.
    echo: Mutex<BTreeSet<String>>,
}

/// Invalidates django-cachalot table keys; a no-op when no cache URL is configured.
#[derive(Clone)]
pub struct DjangoCache {
    inner: Option<Arc<Inner>>,
}

/// How long one invalidation may take before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(2);

impl DjangoCache {
    /// No Django cache: invalidations do nothing.
    pub fn disabled() -> Self {
        DjangoCache { inner: None }
    }

    /// From the flags; says once, when no URL is set, that Django will serve stale reads.
    /// Fails only on a malformed URL (an unreachable Redis is retried later).
    pub fn new(args: &DjangoCacheArgs) -> anyhow::Result<Self> {
        let Some(url) = &args.django_cache_url else {
            warn!(
                "--django-cache-url is not set: Django (django-cachalot) keeps serving cached reads of the \
                 tables tally writes (counts, detections, job progress) until a Django write touches them"
            );
            return Ok(DjangoCache::disabled());
        };
        let client = redis::Client::open(url.as_str())
            .map_err(|e| anyhow::anyhow!("--django-cache-url {url:?} is not a Redis URL: {e}"))?;
        info!(url = %url, prefix = %args.django_cache_key_prefix, version = args.django_cache_version, "invalidating django-cachalot keys after each write");
        Ok(DjangoCache {
            inner: Some(Arc::new(Inner {
                args: args.clone(),
                client,
                connection: tokio::sync::Mutex::new(None),
                pending: Mutex::new(BTreeSet::new()),
                echo: Mutex::new(BTreeSet::new()),
            })),
        })
    }

    /// Whether a cache is configured.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Tables whose invalidation failed and waits for a retry.
    pub fn pending(&self) -> Vec<String> {
        match &self.inner {
            Some(inner) => inner.pending.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect(),
            None => Vec::new(),
        }
    }

    /// Invalidates `tables` (and any whose invalidation failed before). Never fails: a failure
    /// is counted, logged and retried later.
    pub async fn invalidate<'a>(&self, tables: impl IntoIterator<Item = &'a str>) {
        self.delete(tables, true).await;
    }

    async fn delete<'a>(&self, tables: impl IntoIterator<Item = &'a str>, echo: bool) {
        let Some(inner) = &self.inner else { return };
        let mut all: BTreeSet<String> = tables.into_iter().map(str::to_string).collect();
        all.extend(inner.pending.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        if all.is_empty() {
            return;
        }
        let keys: Vec<String> = all.iter().map(|t| table_key(&inner.args, t)).collect();
        match tokio::time::timeout(TIMEOUT, inner.delete(&keys)).await {
            Ok(Ok(())) => {
                counter!(names::DJANGO_CACHE_INVALIDATIONS, "outcome" => "ok").increment(all.len() as u64);
                let mut pending = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
                for t in &all {
                    pending.remove(t);
                }
                drop(pending);
                if echo {
                    inner.echo.lock().unwrap_or_else(|p| p.into_inner()).extend(all.iter().cloned());
                }
                debug!(tables = ?all, "django-cachalot table keys invalidated");
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {TIMEOUT:?}"),
                };
                counter!(names::DJANGO_CACHE_INVALIDATIONS, "outcome" => "failed").increment(all.len() as u64);
                warn!(tables = ?all, %error, "cannot invalidate Django's cache; Django may serve stale reads until a retry succeeds");
                *inner.connection.lock().await = None;
                inner.pending.lock().unwrap_or_else(|p| p.into_inner()).extend(all);
            }
        }
    }

    /// Every `period` until `shutdown`: retries failed invalidations, and invalidates once
    /// more the tables invalidated since the last round. The echo closes a race cachalot has
    /// too: a Django read whose SELECT ran before tally's commit can store its stale result
    /// after the invalidation; the second delete, a period later, removes it.
    pub async fn run_retries(self, period: Duration, shutdown: CancellationToken) {
        let Some(inner) = &self.inner else { return };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => return,
            }
            let echo: Vec<String> =
                std::mem::take(&mut *inner.echo.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
            if !self.pending().is_empty() || !echo.is_empty() {
                self.delete(echo.iter().map(String::as_str), false).await;
            }
        }
    }
}

/// For a one-shot command (`verify --fix`, `rebuild`): invalidates `tables` once, and warns on
/// stderr when Redis did not take it (no retry follows the command's exit).
pub async fn invalidate_once(args: &DjangoCacheArgs, tables: &[&str]) -> anyhow::Result<()> {
    let django = DjangoCache::new(args)?;
    django.invalidate(tables.iter().copied()).await;
    let pending = django.pending();
    if !pending.is_empty() {
        eprintln!("warning: Django's cache could not be invalidated for {pending:?}; it may serve the old counts");
    }
    Ok(())
}

impl Inner {
    async fn delete(&self, keys: &[String]) -> redis::RedisResult<()> {
        let mut slot = self.connection.lock().await;
        let connection = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(ConnectionManager::new(self.client.clone()).await?),
        };
        redis::cmd("DEL").arg(keys).query_async::<i64>(connection).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_cachalot_s_table_keys_under_django_redis_naming() {
        let args = DjangoCacheArgs::default();
        // sha1("default:main_sourceimage"), computed with cachalot 2.6.3's own
        // get_table_cache_key.
        assert_eq!(table_key(&args, "main_sourceimage"), ":1:b595f5adbc89359b71e56d12079b6934ff9e8c41");
        let other = DjangoCacheArgs {
            django_cache_key_prefix: "antenna".into(),
            django_cache_version: 2,
            django_db_alias: "replica".into(),
            ..args
        };
        let digest = sha1_smol::Sha1::from("replica:main_event").digest().to_string();
        assert_eq!(table_key(&other, "main_event"), format!("antenna:2:{digest}"));
    }
}
