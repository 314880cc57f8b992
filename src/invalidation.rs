//! Keeps this replica's cache and membership filter consistent with every
//! other replica's changes.
//!
//! A background task holds a `LISTEN keyward_invalidate` connection. Each
//! notice names a key: changed (evict it), revoked (keep it cached as
//! revoked, so its next check is refused without a database read; cached
//! only if it was), created (add it to the filter,
//! forget that it was unknown), or many created at once (reload the filter);
//! or an owner that changed (its keys are re-read before their next use).
//!
//! Notices sent while the connection was down are lost, so after every
//! reconnect the replica catches up before it counts as listening again: it
//! reads the keys changed since the last moment it knew it had heard
//! everything (the database time of its last notice or probe), minus a
//! safety margin, and evicts only those; then it reloads the filter. Hot
//! keys stay cached, so a database restart does not send every key of every
//! replica to the database at once, and `stale_if_error` keeps protecting
//! them while it is down. If the catch-up read fails, every entry is marked
//! "revalidate before use" instead. Either way a key revoked while the
//! listener was away is not served once it listens again.
//!
//! Each change notice carries the database time of the change, so the
//! replica can tell how long revocation took to reach it (`revocation_lag`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    cache::KeyCache,
    filter::KeyFilter,
    key::KeyHash,
    limits::credits::CreditBook,
    metrics::{Histogram, SLOW_BUCKETS},
    store::{Heard, Listener, Notice, Store, StoreError},
    telemetry::chain,
};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long changes took to reach this replica: from the change (database
/// clock, just before commit) to the eviction here.
#[derive(Debug)]
pub struct LagStats {
    notices: AtomicU64,
    last_us: AtomicI64,
    max_us: AtomicI64,
    histogram: Histogram,
    /// Notices applied, by [`OPS`].
    by_op: [AtomicU64; OPS.len()],
    connected: AtomicBool,
}

/// The kinds of notice, as metrics name them.
const OPS: [&str; 5] = ["key_changed", "key_created", "resync", "owner", "credits"];

impl Default for LagStats {
    fn default() -> Self {
        Self {
            notices: AtomicU64::new(0),
            last_us: AtomicI64::new(0),
            max_us: AtomicI64::new(0),
            histogram: Histogram::new(SLOW_BUCKETS),
            by_op: Default::default(),
            connected: AtomicBool::new(false),
        }
    }
}

impl LagStats {
    /// Propagation delays of key changes, as a histogram.
    pub fn histogram(&self) -> &Histogram {
        &self.histogram
    }

    /// Notices applied so far, by kind.
    pub fn by_op(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        OPS.iter()
            .zip(&self.by_op)
            .map(|(op, n)| (*op, n.load(Ordering::Relaxed)))
    }

    /// Whether the listener is connected and caught up now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The listener task died: it is not listening until started again.
    pub fn mark_disconnected(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    fn applied(&self, notice: &Notice) {
        let i = match notice {
            Notice::Changed(_) | Notice::Revoked { .. } => 0,
            Notice::Inserted(_) => 1,
            Notice::Resync => 2,
            Notice::Owner(_) => 3,
            Notice::Credits(_) => 4,
        };
        self.by_op[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn notices(&self) -> u64 {
        self.notices.load(Ordering::Relaxed)
    }

    pub fn last(&self) -> Duration {
        micros(self.last_us.load(Ordering::Relaxed))
    }

    pub fn max(&self) -> Duration {
        micros(self.max_us.load(Ordering::Relaxed))
    }

    /// A change to `hash`, made at `at` (database clock), reached this
    /// replica's cache now: records and logs how long that took.
    fn reached(&self, hash: &KeyHash, at: Option<DateTime<Utc>>, revoked: bool) {
        let Some(at) = at else { return };
        let lag_us = (Utc::now() - at).num_microseconds().unwrap_or(i64::MAX);
        self.observe(lag_us);
        tracing::info!(
            key = ?hash,
            revoked,
            revocation_lag_ms = lag_us as f64 / 1000.0,
            "cache entry invalidated"
        );
    }

    fn observe(&self, lag_us: i64) {
        self.histogram.observe(micros(lag_us));
        self.notices.fetch_add(1, Ordering::Relaxed);
        self.last_us.store(lag_us, Ordering::Relaxed);
        self.max_us.fetch_max(lag_us, Ordering::Relaxed);
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// What the listener task works on.
#[derive(Clone)]
pub struct Listening {
    pub store: Store,
    pub cache: KeyCache,
    pub filter: Arc<KeyFilter>,
    pub application_name: String,
    pub lag: Arc<LagStats>,
    /// Subtracted from the last moment known to be heard, when catching up.
    pub catchup_margin: Duration,
    pub credits: CreditBook,
    /// The serving runtime: pooled connections belong to it, so the
    /// listener (on its own thread) reads the store through it.
    pub pooled: tokio::runtime::Handle,
}

impl Listening {
    /// Reloads the membership filter, on the serving runtime.
    async fn load_filter(&self) -> Result<(), StoreError> {
        let (filter, store) = (self.filter.clone(), self.store.clone());
        self.pooled
            .spawn(async move { filter.load(&store).await })
            .await
            .unwrap_or(Err(StoreError::Unavailable(sqlx::Error::WorkerCrashed)))
    }

    /// What changed since `since`, read on the serving runtime.
    async fn changed_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<crate::store::Changed, StoreError> {
        let store = self.store.clone();
        self.pooled
            .spawn(async move { store.changed_since(since).await })
            .await
            .unwrap_or(Err(StoreError::Unavailable(sqlx::Error::WorkerCrashed)))
    }
}

/// Counts `LISTEN` sessions established and caught up, across restarts of
/// the listener task.
pub type Sessions = Arc<watch::Sender<u64>>;

/// Starts the listener, counting its sessions in `sessions`. A listener
/// started again after its task died catches up as after a reconnect, from
/// no record of what was heard: every cached key is re-read before use.
pub fn spawn(listening: Listening, sessions: Sessions) -> JoinHandle<()> {
    tokio::spawn(run(listening, sessions))
}

/// [`spawn`] on the runtime `on` (the listener's own thread).
pub fn spawn_on(
    on: &tokio::runtime::Handle,
    listening: Listening,
    sessions: Sessions,
) -> JoinHandle<()> {
    on.spawn(run(listening, sessions))
}

async fn run(l: Listening, sessions: Sessions) {
    let keepalive = l.store.keepalive();
    let mut backoff = BACKOFF_MIN;
    // The database time up to which every notice is known to have arrived.
    let mut heard_until: Option<DateTime<Utc>> = None;
    loop {
        let sessions_so_far = *sessions.borrow();
        let mut listener = match start_session(&l, heard_until, sessions_so_far).await {
            Ok((listener, listening_since)) => {
                heard_until = Some(listening_since);
                listener
            }
            Err(err) => {
                l.store.suspect_connections();
                tracing::warn!(error = %chain(&err), retry_in = ?backoff, "cannot listen for invalidations");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        l.lag.connected.store(true, Ordering::Relaxed);
        sessions.send_modify(|n| *n += 1);
        tracing::info!(session = sessions_so_far + 1, "listening for invalidations");

        loop {
            let heard = listener.next(keepalive).await;
            match heard {
                Ok(Heard::Invalidation(notice)) => {
                    if let Some(at) = notice.at {
                        heard_until = heard_until.max(Some(at));
                    }
                    if let Err(err) = apply(&l, notice.what, notice.at).await {
                        tracing::warn!(error = %chain(&err), "cannot reload the key filter; reconnecting");
                        break;
                    }
                }
                Ok(Heard::Unreadable(payload)) => {
                    tracing::warn!(payload, "ignoring an unreadable invalidation notice");
                }
                Ok(Heard::Idle(at)) => heard_until = heard_until.max(Some(at)),
                Err(err) => {
                    // Whatever took this connection may have taken the
                    // pooled ones too.
                    l.store.suspect_connections();
                    tracing::warn!(error = %chain(&err), "invalidation listener lost; reconnecting");
                    break;
                }
            }
            if l.filter.outgrown()
                && let Err(err) = l.load_filter().await
            {
                tracing::warn!(error = %chain(&err), "cannot reload the outgrown key filter");
            }
        }
        l.lag.connected.store(false, Ordering::Relaxed);
    }
}

/// Listens, then (after a gap) catches up and reloads the filter. Returns
/// the listener and the database time it was listening from.
async fn start_session(
    l: &Listening,
    heard_until: Option<DateTime<Utc>>,
    sessions_so_far: u64,
) -> Result<(Listener, DateTime<Utc>), StoreError> {
    let mut listener = l.store.listen(&l.application_name).await?;
    let listening_since = listener.now(l.store.keepalive()).await?;
    if sessions_so_far > 0 {
        catch_up(l, heard_until).await;
    }
    // Keys created while nobody listened are missing from the filter.
    l.load_filter().await?;
    Ok((listener, listening_since))
}

/// Evicts what changed while the listener was away.
async fn catch_up(l: &Listening, heard_until: Option<DateTime<Utc>>) {
    let margin = chrono::Duration::from_std(l.catchup_margin).unwrap_or(chrono::Duration::MAX);
    let Some(since) = heard_until.and_then(|t| t.checked_sub_signed(margin)) else {
        l.cache.revalidate_all();
        tracing::warn!("no record of what was heard; every cached key is re-read before use");
        return;
    };
    match l.changed_since(since).await {
        Ok(changed) => {
            for hash in &changed.keys {
                l.cache.invalidate(hash);
            }
            for owner in &changed.owners {
                l.cache.invalidate_owner(owner);
            }
            // Unknown hashes may have become keys meanwhile.
            l.cache.forget_all_unknown();
            tracing::info!(
                changed_keys = changed.keys.len(),
                changed_owners = changed.owners.len(),
                since = %since,
                "caught up on changes missed while not listening"
            );
        }
        Err(err) => {
            l.cache.revalidate_all();
            tracing::warn!(
                error = %chain(&err),
                "cannot read what changed while not listening; every cached key is re-read before use"
            );
        }
    }
}

async fn apply(l: &Listening, what: Notice, at: Option<DateTime<Utc>>) -> Result<(), StoreError> {
    l.lag.applied(&what);
    match what {
        Notice::Changed(hash) => {
            l.cache.invalidate(&hash);
            l.lag.reached(&hash, at, false);
        }
        Notice::Revoked {
            hash,
            at: revoked_at,
            canary,
        } => {
            l.cache.revoke(&hash, revoked_at, canary);
            l.lag.reached(&hash, at, true);
        }
        Notice::Inserted(hash) => {
            l.filter.insert(&hash);
            l.cache.forget_unknown(&hash);
        }
        Notice::Resync => {
            l.load_filter().await?;
            l.cache.forget_all_unknown();
        }
        Notice::Owner(owner) => {
            l.cache.invalidate_owner(&owner);
            tracing::info!(owner_id = %owner, "owner changed; its keys are re-read before use");
        }
        Notice::Credits(bucket) => l.credits.forget(&bucket),
    }
    Ok(())
}
