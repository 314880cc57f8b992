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
use crate::key::{KeyHash, KeyId, OwnerId};

pub const CHANNEL: &str = "keyward_invalidate";

/// One notice, stamped with the database clock just before its change
/// committed (`at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    pub what: Notice,
    pub at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// This key changed or went away: evict it.
    Changed(KeyHash),
    /// This key was revoked (final), and nothing else that decides changed:
    /// refuse it from now on. `canary`: the key's flag (the one rule before
    /// "revoked").
    Revoked {
        hash: KeyHash,
        at: DateTime<Utc>,
        canary: bool,
    },
    /// This key was just created: add it to the membership filter, forget
    /// that it was unknown.
    Inserted(KeyHash),
    /// Many keys were created at once: reload the membership filter.
    Resync,
    /// This owner changed: re-read its keys before using them again.
    Owner(OwnerId),
    /// An admin set this bucket's credits anew: drop reserved blocks.
    Credits(KeyId),
}

/// What a listener heard.
#[derive(Debug)]
pub enum Heard {
    Invalidation(Invalidation),
    /// A notice on our channel that is not ours to read (logged, skipped).
    Unreadable(String),
    /// Nothing for the idle interval, and the connection answered a probe
    /// at this database time: every notice committed before it has arrived.
    Idle(DateTime<Utc>),
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
        let inner = self
            .bounded("listen", async {
                let mut inner = PgListener::connect_with(&pool).await?;
                // Reconnection is the caller's business: it must catch up
                // after a gap, so a lost connection must surface rather than
                // heal silently.
                inner.eager_reconnect(false);
                inner.listen(CHANNEL).await?;
                Ok(inner)
            })
            .await?;
        Ok(Listener { inner, _pool: pool })
    }
}

impl Listener {
    /// The database clock, read on the listening connection: every notice
    /// committed before it will be delivered to this listener.
    pub async fn now(&mut self, within: Duration) -> Result<DateTime<Utc>, StoreError> {
        let probe = sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&mut self.inner);
        match tokio::time::timeout(within, probe).await {
            Ok(Ok(at)) => Ok(at),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(StoreError::Timeout(within)),
        }
    }

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
            Err(_elapsed) => self.now(idle).await.map(Heard::Idle),
        }
    }
}

/// Payloads of the triggers in migrations/: `{"hash": "<hex>", "at_us": n}`
/// (a change; with `"revoked_at_us": n, "canary": b` when it revoked the
/// key and changed nothing else that decides), with
/// `"op": "insert"` (a new key), `{"op": "resync"}`, or
/// `{"op": "owner", "owner": "<id>"}`.
fn parse(payload: &str) -> Option<Invalidation> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let micros = |field: &str| {
        v.get(field)
            .and_then(serde_json::Value::as_i64)
            .and_then(DateTime::from_timestamp_micros)
    };
    let at = micros("at_us");
    let hash = || v.get("hash")?.as_str().and_then(parse_hash);
    let what = match v.get("op").map(|op| op.as_str()) {
        // A revocation whose fields do not read is still a change.
        None => {
            let revoked_at = micros("revoked_at_us");
            let canary = v.get("canary").and_then(serde_json::Value::as_bool);
            match (revoked_at, canary) {
                (Some(at), Some(canary)) => Notice::Revoked {
                    hash: hash()?,
                    at,
                    canary,
                },
                _ => Notice::Changed(hash()?),
            }
        }
        Some(Some("insert")) => Notice::Inserted(hash()?),
        Some(Some("resync")) => Notice::Resync,
        Some(Some("owner")) => Notice::Owner(OwnerId::parse(v.get("owner")?.as_str()?).ok()?),
        Some(Some("credits")) => Notice::Credits(KeyId::parse(v.get("bucket")?.as_str()?).ok()?),
        Some(_) => return None,
    };
    Some(Invalidation { what, at })
}

fn parse_hash(hex: &str) -> Option<KeyHash> {
    if hex.len() != 64 {
        return None;
    }
    let bytes: Vec<u8> = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    KeyHash::from_slice(&bytes)
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
        let changed = KeyHash::from_slice(&[0xab; 32]).unwrap();
        assert_eq!(n.what, Notice::Changed(changed));
        assert_eq!(n.at.unwrap().timestamp(), 1_795_000_000);
        let n = parse(&format!(
            r#"{{"hash": "{hex}", "at_us": 1795000000000000, "revoked_at_us": 1794999999000000, "canary": true}}"#
        ))
        .unwrap();
        assert_eq!(
            n.what,
            Notice::Revoked {
                hash: changed,
                at: DateTime::from_timestamp(1_794_999_999, 0).unwrap(),
                canary: true,
            }
        );
        // Fields that do not read, or a missing one: a plain change.
        for extra in [
            r#""revoked_at_us": "soon", "canary": false"#,
            r#""revoked_at_us": 1"#,
            r#""revoked_at_us": 1, "canary": "no""#,
        ] {
            let n = parse(&format!(r#"{{"hash": "{hex}", "at_us": 1, {extra}}}"#)).unwrap();
            assert_eq!(n.what, Notice::Changed(changed), "{extra}");
        }
        let n = parse(&format!(
            r#"{{"op": "insert", "hash": "{hex}", "at_us": 1}}"#
        ))
        .unwrap();
        assert_eq!(n.what, Notice::Inserted(changed));
        let n = parse(r#"{"op": "resync", "at_us": 1}"#).unwrap();
        assert_eq!(n.what, Notice::Resync);
        let n = parse(r#"{"op": "owner", "owner": "acme", "at_us": 1}"#).unwrap();
        assert_eq!(n.what, Notice::Owner(OwnerId::parse("acme").unwrap()));
    }

    #[test]
    fn foreign_payloads_are_refused() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse(r#"{"op": "explode"}"#), None);
        assert_eq!(parse(r#"{"op": "insert"}"#), None);
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
