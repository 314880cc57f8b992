//! PostgreSQL persistence with sqlx. Only hashes of keys are stored. Every
//! admin change writes its audit event in the same transaction.

mod audit;
mod credits;
mod error;
mod keys;
mod notify;
mod owners;
mod usage;

use std::{
    future::Future,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{
    PgPool, Postgres,
    migrate::MigrateDatabase as _,
    postgres::{PgConnectOptions, PgPoolOptions},
};

pub use audit::{AuditEvent, AuditPage, AuditQuery};
pub use credits::{Reservation, Unspent};
pub use error::{Refusal, StoreError};
pub use keys::{Actor, Changed, Guard, KeyChanges, LEAKED, ListQuery, Page, Rotation};
pub use notify::{CHANNEL, Heard, Invalidation, Listener, Notice};
pub use owners::{OwnerChanges, OwnerPage};
pub use usage::UsageWrite;

/// The embedded migrations. A database may hold migrations this binary
/// does not know: a newer release applied them and was rolled back. That is
/// safe because migrations only ever add (tables, columns with defaults,
/// indexes, triggers), so an older binary keeps working on a newer schema;
/// refusing to start would turn every rollback across a migration into an
/// outage.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// How to reach the database, and how long to wait for it.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub url: String,
    /// Connections in both pools together.
    pub max_connections: u32,
    /// Of those, the most that check lookups may use.
    pub check_connections: u32,
    /// How long an admin call waits for a connection.
    pub acquire_timeout: Duration,
    /// How long a check lookup waits for a connection (fail fast).
    pub check_acquire_timeout: Duration,
    /// Deadline of one check lookup, end to end.
    pub lookup_timeout: Duration,
    /// Deadline of one admin or background call, end to end.
    pub call_timeout: Duration,
    /// Sent as `statement_timeout` at connection start; zero: not sent.
    pub statement_timeout: Duration,
    /// An idle pooled connection is pinged before use after this long; the
    /// LISTEN connection is probed after this long without a notice.
    pub keepalive: Duration,
    /// Shown in `pg_stat_activity`, to tell replicas apart.
    pub application_name: String,
}

impl DbOptions {
    /// Defaults fit for tools and tests: the given URL, small pools.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 10,
            check_connections: 6,
            acquire_timeout: Duration::from_secs(2),
            check_acquire_timeout: Duration::from_millis(100),
            lookup_timeout: Duration::from_secs(1),
            call_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(10),
            application_name: "keyward".to_owned(),
        }
    }
}

/// Handle to the database; cheap to clone.
///
/// Two pools: check lookups (the hot path's misses) draw on `checks`, a
/// bounded share of the connections; admin calls and background work draw
/// on `pool`. However many lookups a flood of keys causes, a Revoke still
/// gets a connection.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    checks: PgPool,
    /// For connections outside the pools (the `LISTEN` connection).
    connect: PgConnectOptions,
    acquire_timeout: Duration,
    lookup_timeout: Duration,
    call_timeout: Duration,
    keepalive: Duration,
    health: Arc<ConnectionHealth>,
    stats: Arc<StoreStats>,
}

/// When pooled connections were last put in doubt (a lost listener, a
/// failed query): a connection idle since before then is pinged before use,
/// so that after a database restart the first calls do not each find a dead
/// connection.
#[derive(Debug)]
struct ConnectionHealth {
    origin: Instant,
    /// Nanoseconds after `origin`; 0: never.
    suspect_since: AtomicU64,
}

impl ConnectionHealth {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            suspect_since: AtomicU64::new(0),
        }
    }

    fn suspect_all(&self) {
        let now = self.origin.elapsed().as_nanos() as u64;
        self.suspect_since.fetch_max(now.max(1), Ordering::Relaxed);
    }

    /// Whether a connection idle for `idle_for` must prove itself first.
    fn needs_ping(&self, idle_for: Duration, keepalive: Duration) -> bool {
        if idle_for > keepalive {
            return true;
        }
        let suspect = self.suspect_since.load(Ordering::Relaxed);
        let idle_since = self.origin.elapsed().saturating_sub(idle_for).as_nanos() as u64;
        suspect != 0 && idle_since <= suspect
    }
}

/// Statements issued by this process, by kind: lets tests and operators see
/// what the hot path costs the database.
#[derive(Debug, Default)]
pub struct StoreStats {
    key_lookups: AtomicU64,
    admin_lookups: AtomicU64,
    usage_writes: AtomicU64,
    credit_reservations: AtomicU64,
}

impl StoreStats {
    /// `SELECT`s of a key by hash for checks (cache misses, revalidations).
    pub fn key_lookups(&self) -> u64 {
        self.key_lookups.load(Ordering::Relaxed)
    }

    /// Reads of a key by hash for the admin plane (management keys re-read
    /// on every call, leak reports).
    pub fn admin_lookups(&self) -> u64 {
        self.admin_lookups.load(Ordering::Relaxed)
    }

    /// Credit reservations (each one statement).
    pub fn credit_reservations(&self) -> u64 {
        self.credit_reservations.load(Ordering::Relaxed)
    }

    /// Batched usage statements (each one `UPDATE` of `keys` plus upserts).
    pub fn usage_writes(&self) -> u64 {
        self.usage_writes.load(Ordering::Relaxed)
    }
}

impl Store {
    /// Connects, creating the database if it does not exist, and applies the
    /// migrations (serialised across replicas by sqlx's advisory lock).
    pub async fn connect_and_migrate(opts: &DbOptions) -> Result<Self, StoreError> {
        create_database_if_missing(&opts.url).await?;
        let store = Self::connect_lazy(opts)?;
        store.migrate().await?;
        Ok(store)
    }

    /// Pools that connect on first use.
    pub fn connect_lazy(opts: &DbOptions) -> Result<Self, StoreError> {
        let mut connect =
            PgConnectOptions::from_str(&opts.url)?.application_name(&opts.application_name);
        if !opts.statement_timeout.is_zero() {
            let ms = opts.statement_timeout.as_millis().to_string();
            connect = connect.options([("statement_timeout", ms.as_str())]);
        }
        let checks = opts
            .check_connections
            .clamp(1, opts.max_connections.max(2) - 1);
        let admin = opts.max_connections.saturating_sub(checks).max(1);
        let health = Arc::new(ConnectionHealth::new());
        let pool = pool_options(admin, opts.acquire_timeout, opts.keepalive, &health)
            .connect_lazy_with(connect.clone());
        let check_pool = pool_options(
            checks,
            opts.check_acquire_timeout.min(opts.lookup_timeout),
            opts.keepalive,
            &health,
        )
        .connect_lazy_with(connect.clone());
        Ok(Self {
            pool,
            checks: check_pool,
            connect,
            acquire_timeout: opts.acquire_timeout,
            lookup_timeout: opts.lookup_timeout,
            call_timeout: opts.call_timeout,
            keepalive: opts.keepalive,
            health,
            stats: Arc::default(),
        })
    }

    /// Puts every idle pooled connection in doubt (the listener lost its
    /// connection, a query failed for want of one): each is pinged before
    /// its next use, and replaced if it does not answer.
    pub fn suspect_connections(&self) {
        self.health.suspect_all();
    }

    /// How long the LISTEN connection may stay silent before it is probed.
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// The admin plane's pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes both pools: every later call fails with UNAVAILABLE.
    pub async fn close(&self) {
        self.pool.close().await;
        self.checks.close().await;
    }

    /// Runs an admin or background call within the call deadline.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        within(self.call_timeout, call).await
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrator().run(&self.pool).await?;
        Ok(())
    }
}

/// A pool that hands out a connection idle for longer than `keepalive`, or
/// idle since connections were put in doubt, only after a ping, and others
/// without one. sqlx's default pings before every acquire, a round trip added
/// to every cache miss; a connection in steady use proves itself alive by
/// answering.
fn pool_options(
    max: u32,
    acquire_timeout: Duration,
    keepalive: Duration,
    health: &Arc<ConnectionHealth>,
) -> PgPoolOptions {
    let health = health.clone();
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            let ping = health.needs_ping(meta.idle_for, keepalive);
            Box::pin(async move {
                if ping {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// `call`, or [`StoreError::Timeout`] if it has not finished within `limit`.
async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(StoreError::Timeout(limit)))
}

async fn create_database_if_missing(url: &str) -> Result<(), StoreError> {
    if Postgres::database_exists(url).await? {
        return Ok(());
    }
    match Postgres::create_database(url).await {
        Ok(()) => {
            tracing::info!("database created");
            Ok(())
        }
        // Another replica created it first.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_idle_since_they_were_put_in_doubt_are_pinged() {
        let health = ConnectionHealth::new();
        let keepalive = Duration::from_secs(10);
        assert!(!health.needs_ping(Duration::from_millis(1), keepalive));
        assert!(health.needs_ping(Duration::from_secs(11), keepalive));
        std::thread::sleep(Duration::from_millis(5));
        health.suspect_all();
        // Idle since before the doubt: ping. Released after it: no ping.
        assert!(health.needs_ping(Duration::from_millis(4), keepalive));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!health.needs_ping(Duration::from_millis(1), keepalive));
    }
}
