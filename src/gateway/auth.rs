//! Workers authenticate as with Antenna's DRF `TokenAuthentication`: `Authorization: Token
//! <key>` names a row of `authtoken_token` whose user is active, else 401 with DRF's message.
//!
//! Antenna checks no per-action permission a worker could hold (there is no
//! `tasks_ml_job`), so in practice worker tokens are superusers'; tally asks for an active
//! user and nothing more. Verified keys are cached for `--gateway-auth-cache` seconds, so
//! the hot path (a handful of worker tokens, hundreds of calls a second) does not touch
//! Postgres; unknown keys are not cached, so a key created in Django works at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::{Gateway, GatewayError};

/// Tokens kept at most; the cache is emptied when full (assumes far fewer worker tokens).
const MAX_CACHED_TOKENS: usize = 10_000;

/// An authenticated worker: handlers take it as an argument, so no handler runs (and no body
/// is read) without a valid token.
#[derive(Clone, Copy, Debug)]
pub struct Worker {
    /// `users_user.id` of the token's owner.
    pub user_id: i64,
}

/// Keys verified recently, with their user and when they were verified.
pub struct TokenCache {
    /// How long a verification is trusted.
    ttl: Duration,
    /// Key → (user, verified at).
    verified: Mutex<HashMap<String, (i64, Instant)>>,
}

impl TokenCache {
    /// An empty cache trusting verifications for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        TokenCache { ttl, verified: Mutex::new(HashMap::new()) }
    }

    fn get(&self, key: &str) -> Option<i64> {
        let verified = self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        verified.get(key).filter(|(_, at)| at.elapsed() < self.ttl).map(|(user, _)| *user)
    }

    fn put(&self, key: &str, user: i64) {
        let mut verified = self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if verified.len() >= MAX_CACHED_TOKENS {
            verified.clear();
        }
        verified.insert(key.to_string(), (user, Instant::now()));
    }
}

/// The key of an `Authorization` header value, or DRF's 401 message.
pub fn token_of(header: Option<&[u8]>) -> Result<&str, GatewayError> {
    const NOT_PROVIDED: &str = "Authentication credentials were not provided.";
    let header = header.ok_or(GatewayError::Unauthorized(NOT_PROVIDED))?;
    let mut words = header.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty());
    match words.next() {
        Some(keyword) if keyword.eq_ignore_ascii_case(b"token") => {}
        // Another scheme (Basic, Bearer): DRF's token authentication does not apply.
        _ => return Err(GatewayError::Unauthorized(NOT_PROVIDED)),
    }
    let key = words.next().ok_or(GatewayError::Unauthorized("Invalid token header. No credentials provided."))?;
    if words.next().is_some() {
        return Err(GatewayError::Unauthorized("Invalid token header. Token string should not contain spaces."));
    }
    std::str::from_utf8(key).map_err(|_| {
        GatewayError::Unauthorized("Invalid token header. Token string should not contain invalid characters.")
    })
}

impl FromRequestParts<Arc<Gateway>> for Worker {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, gateway: &Arc<Gateway>) -> Result<Self, GatewayError> {
        let key = token_of(parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes()))?;
        if let Some(user_id) = gateway.tokens.get(key) {
            return Ok(Worker { user_id });
        }
        let client = gateway.store()?.client().await.map_err(GatewayError::db)?;
        let statement = client
            .prepare_cached(
                "SELECT u.id, u.is_active FROM authtoken_token t JOIN users_user u ON u.id = t.user_id
                 WHERE t.key = $1",
            )
            .await
            .map_err(GatewayError::db)?;
        let row = client.query_opt(&statement, &[&key]).await.map_err(GatewayError::db)?;
        let Some(row) = row else {
            return Err(GatewayError::Unauthorized("Invalid token."));
        };
        let user_id: i64 = row.try_get(0).map_err(GatewayError::db)?;
        let active: bool = row.try_get(1).map_err(GatewayError::db)?;
        if !active {
            return Err(GatewayError::Unauthorized("User inactive or deleted."));
        }
        gateway.tokens.put(key, user_id);
        Ok(Worker { user_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(header: Option<&str>) -> &'static str {
        match token_of(header.map(str::as_bytes)) {
            Err(GatewayError::Unauthorized(m)) => m,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn reads_headers_as_drf_does() {
        assert_eq!(token_of(Some(b"Token abc123")).ok(), Some("abc123"));
        assert_eq!(token_of(Some(b"token   abc123 ")).ok(), Some("abc123"));
        assert_eq!(refusal(None), "Authentication credentials were not provided.");
        assert_eq!(refusal(Some("Bearer abc")), "Authentication credentials were not provided.");
        assert_eq!(refusal(Some("Token")), "Invalid token header. No credentials provided.");
        assert_eq!(refusal(Some("Token a b")), "Invalid token header. Token string should not contain spaces.");
    }

    #[test]
    fn cache_expires_and_stays_bounded() {
        let cache = TokenCache::new(Duration::from_millis(30));
        cache.put("k", 7);
        assert_eq!(cache.get("k"), Some(7));
        assert_eq!(cache.get("other"), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get("k"), None);
        for i in 0..MAX_CACHED_TOKENS + 5 {
            cache.put(&i.to_string(), 1);
        }
        assert!(cache.verified.lock().map(|m| m.len()).unwrap_or(0) <= MAX_CACHED_TOKENS);
    }
}
