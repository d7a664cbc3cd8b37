//! A transaction that owns its pooled session, so that it can be committed by another task
//! than the one that wrote it: ingest's pipeline commits batch N in the background while it
//! saves batch N+1 on a second session.
//!
//! `tokio_postgres::Transaction` borrows its client and cannot move to another task. This
//! one owns it: `BEGIN` on creation, `COMMIT` or `ROLLBACK` by value. One that is dropped
//! unfinished (an error, a cancelled future) takes its session out of the pool and closes
//! it, so the server rolls the transaction back and no pooled session is ever handed out in
//! the middle of a transaction.

use deadpool_postgres::Object;

use crate::store::{Store, StoreError};

/// An open transaction on a session of its own.
pub struct OwnedTransaction {
    /// `None` once committed or rolled back.
    session: Option<Object>,
    /// The server process of the session (`pg_backend_pid()`).
    backend_pid: i32,
}

impl OwnedTransaction {
    /// Takes a session from `store`'s pool and begins a transaction on it.
    pub async fn begin(store: &Store) -> Result<Self, StoreError> {
        let session = store.client().await?;
        let mut tx = OwnedTransaction { session: Some(session), backend_pid: 0 };
        // One round trip: the transaction begins, and the server says which process runs it.
        let answer = tx.session_mut().simple_query("BEGIN; SELECT pg_backend_pid()").await?;
        tx.backend_pid = answer
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
                _ => None,
            })
            .unwrap_or(0);
        Ok(tx)
    }

    /// The server process running the transaction (0 if the server did not say), for
    /// `pg_blocking_pids`.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// The session, for the statements of the transaction (it dereferences to a
    /// `tokio_postgres::Client`).
    pub fn client(&self) -> &Object {
        self.session.as_ref().expect("an open transaction has its session")
    }

    fn session_mut(&mut self) -> &mut Object {
        self.session.as_mut().expect("an open transaction has its session")
    }

    /// Commits. An error leaves the outcome unknown to the caller (the session is closed).
    pub async fn commit(mut self) -> Result<(), StoreError> {
        self.session_mut().batch_execute("COMMIT").await?;
        // Committed: the session goes back to the pool.
        self.session = None;
        Ok(())
    }

    /// Rolls back, returning the session to the pool (or closing it when the rollback fails).
    pub async fn rollback(mut self) {
        if self.session_mut().batch_execute("ROLLBACK").await.is_ok() {
            self.session = None;
        }
    }
}

/// Whether server process `waiter` waits for a lock held by server process `holder`
/// (`pg_blocking_pids`, on a session of its own); a check that cannot be made answers no.
pub async fn waits_for(store: &Store, waiter: i32, holder: i32) -> bool {
    let Ok(client) = store.client().await else { return false };
    client
        .query_one("SELECT $2::int4 = ANY(pg_blocking_pids($1::int4))", &[&waiter, &holder])
        .await
        .and_then(|r| r.try_get::<_, bool>(0))
        .unwrap_or(false)
}

impl Drop for OwnedTransaction {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // Unfinished: never back to the pool. Closing the connection rolls it back.
            drop(Object::take(session));
        }
    }
}

impl std::fmt::Debug for OwnedTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedTransaction")
            .field("open", &self.session.is_some())
            .field("backend_pid", &self.backend_pid)
            .finish()
    }
}
