//! The `LISTEN` side of cache invalidation: a dedicated connection per
//! replica on channel `keyward_invalidate`, fed by the `keys_notify_change`
//! trigger (see migrations).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{
    PgPool,
    postgres::{PgListener, PgPoolOptions},
};

use super::{Store, StoreError};
use crate::key::KeyHash;

pub const CHANNEL: &str = "keyward_invalidate";

/// One notice: this key changed (or went away) at `at`, the database clock
/// just before the change committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    pub hash: KeyHash,
    pub at: Option<DateTime<Utc>>,
}

/// What a listener heard.
#[derive(Debug)]
pub enum Heard {
    Invalidation(Invalidation),
    /// A notice on our channel that is not ours to read (logged, skipped).
    Unreadable(String),
    /// Nothing for the idle interval, and the connection answered a probe.
    Idle,
}

/// A live `LISTEN` connection. Dropping it closes the connection.
pub struct Listener {
    inner: PgListener,
    // Keeps the listener's one-connection pool alive.
    _pool: PgPool,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens a connection named `application_name` (so operators can spot it
    /// in `pg_stat_activity`) and starts listening.
    pub async fn listen(&self, application_name: &str) -> Result<Listener, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(self.connect.clone().application_name(application_name));
        let mut inner = PgListener::connect_with(&pool).await?;
        // Reconnection is the caller's business: it must drop its cache after
        // a gap, so a lost connection must surface rather than heal silently.
        inner.eager_reconnect(false);
        inner.listen(CHANNEL).await?;
        Ok(Listener { inner, _pool: pool })
    }
}

impl Listener {
    /// Waits for the next notice. After `idle` without one, probes the
    /// connection (so a silently dead one is noticed) and returns `Idle`.
    /// Any error, or a closed connection, means notices may have been lost:
    /// drop this listener and open a new one.
    pub async fn next(&mut self, idle: Duration) -> Result<Heard, StoreError> {
        let received = tokio::time::timeout(idle, self.inner.try_recv()).await;
        match received {
            Ok(Ok(Some(n))) => Ok(parse(n.payload())
                .map(Heard::Invalidation)
                .unwrap_or_else(|| Heard::Unreadable(n.payload().to_owned()))),
            Ok(Ok(None)) => Err(StoreError::Unavailable(sqlx::Error::Protocol(
                "listener connection lost".to_owned(),
            ))),
            Ok(Err(e)) => Err(e.into()),
            Err(_elapsed) => {
                let probe = sqlx::query("SELECT 1").execute(&mut self.inner);
                match tokio::time::timeout(idle, probe).await {
                    Ok(Ok(_)) => Ok(Heard::Idle),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)),
                }
            }
        }
    }
}

fn parse(payload: &str) -> Option<Invalidation> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let hex = v.get("hash")?.as_str()?;
    if hex.len() != 64 {
        return None;
    }
    let bytes: Vec<u8> = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let at = v
        .get("at_us")
        .and_then(serde_json::Value::as_i64)
        .and_then(DateTime::from_timestamp_micros);
    Some(Invalidation {
        hash: KeyHash::from_slice(&bytes)?,
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_from_the_trigger_parse() {
        let hex = "ab".repeat(32);
        let n = parse(&format!(
            r#"{{"hash": "{hex}", "at_us": 1795000000000000}}"#
        ))
        .unwrap();
        assert_eq!(n.hash.as_bytes(), &[0xab; 32]);
        assert_eq!(n.at.unwrap().timestamp(), 1_795_000_000);
    }

    #[test]
    fn foreign_payloads_are_refused() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse(r#"{"hash": "abcd"}"#), None);
        assert_eq!(
            parse(&format!(r#"{{"hash": "{}"}}"#, "zz".repeat(32))),
            None
        );
        assert_eq!(
            parse(&format!(r#"{{"hash": "{}é"}}"#, "a".repeat(62))),
            None
        );
    }
}
