//! Keeps this replica's cache consistent with every other replica's changes.
//!
//! A background task holds a `LISTEN keyward_invalidate` connection and evicts
//! the entry each notice names. Whenever a new `LISTEN` is established (at
//! start, and after any loss of the connection) it drops the whole cache,
//! because notices sent while it was not listening are lost. It does *not*
//! drop the cache when the connection is lost: during a database outage the
//! cached keys are exactly what `stale_if_error` keeps serving.
//!
//! Each notice carries the database time of the change, so the replica can
//! tell how long revocation took to reach it (`revocation_lag`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    cache::KeyCache,
    store::{Heard, Store},
};

/// With no notice for this long, the connection is probed.
const HEARTBEAT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long changes took to reach this replica: from the change (database
/// clock, just before commit) to the eviction here.
#[derive(Debug, Default)]
pub struct LagStats {
    notices: AtomicU64,
    last_us: AtomicI64,
    max_us: AtomicI64,
}

impl LagStats {
    pub fn notices(&self) -> u64 {
        self.notices.load(Ordering::Relaxed)
    }

    pub fn last(&self) -> Duration {
        micros(self.last_us.load(Ordering::Relaxed))
    }

    pub fn max(&self) -> Duration {
        micros(self.max_us.load(Ordering::Relaxed))
    }

    fn observe(&self, lag_us: i64) {
        self.notices.fetch_add(1, Ordering::Relaxed);
        self.last_us.store(lag_us, Ordering::Relaxed);
        self.max_us.fetch_max(lag_us, Ordering::Relaxed);
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// Starts the listener. The receiver counts established `LISTEN` sessions.
pub fn spawn(
    store: Store,
    cache: KeyCache,
    application_name: String,
    lag: Arc<LagStats>,
) -> (JoinHandle<()>, watch::Receiver<u64>) {
    let (sessions_tx, sessions_rx) = watch::channel(0u64);
    let task = tokio::spawn(run(store, cache, application_name, lag, sessions_tx));
    (task, sessions_rx)
}

async fn run(
    store: Store,
    cache: KeyCache,
    application_name: String,
    lag: Arc<LagStats>,
    sessions: watch::Sender<u64>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut listener = match store.listen(&application_name).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(%err, retry_in = ?backoff, "cannot listen for invalidations");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        // Anything cached before this LISTEN took effect may have missed its notice.
        cache.invalidate_all();
        sessions.send_modify(|n| *n += 1);
        tracing::info!(
            session = *sessions.borrow(),
            "listening for invalidations; cache cleared"
        );

        loop {
            match listener.next(HEARTBEAT).await {
                Ok(Heard::Invalidation(notice)) => {
                    cache.invalidate(&notice.hash);
                    if let Some(at) = notice.at {
                        let lag_us = (Utc::now() - at).num_microseconds().unwrap_or(i64::MAX);
                        lag.observe(lag_us);
                        tracing::info!(
                            key = ?notice.hash,
                            revocation_lag_ms = lag_us as f64 / 1000.0,
                            "cache entry invalidated"
                        );
                    }
                }
                Ok(Heard::Unreadable(payload)) => {
                    tracing::warn!(payload, "ignoring an unreadable invalidation notice");
                }
                Ok(Heard::Idle) => {}
                Err(err) => {
                    tracing::warn!(%err, "invalidation listener lost; reconnecting");
                    break;
                }
            }
        }
    }
}
