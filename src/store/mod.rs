//! PostgreSQL persistence with sqlx. Only hashes of keys are stored. Every
//! admin change writes its audit event in the same transaction.

/// A row struct read by column name, one column per field (a field marked
/// `#[flatten]` is a row struct read from the same row): what
/// `#[derive(sqlx::FromRow)]` writes, without building sqlx's macros.
macro_rules! pg_row {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(#[flatten] $flat:ident: $flat_ty:ty,)*
            $($field:ident: $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name { $($flat: $flat_ty,)* $($field: $ty),* }

        impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for $name {
            fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
                use sqlx::Row as _;
                Ok(Self {
                    $($flat: <$flat_ty as sqlx::FromRow<'r, sqlx::postgres::PgRow>>::from_row(row)?,)*
                    $($field: row.try_get(stringify!($field))?),*
                })
            }
        }
    };
}

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
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{
    PgConnection, PgPool, Postgres, SqlStr,
    migrate::{MigrateDatabase as _, Migration, MigrationType, Migrator},
    pool::PoolConnection,
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
fn migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                description.into(),
                MigrationType::Simple,
                SqlStr::from_static(sql),
                sql.starts_with("-- no-transaction"),
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.set_ignore_missing(true);
    migrator
}

/// `(version, description, SQL)` of each file in `migrations/`, in order
/// (listed by build.rs).
const MIGRATIONS: &[(i64, &str, &str)] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// How to reach the database, and how long to wait for it.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub url: String,
    /// A direct connection for LISTEN and migrations when `url` goes
    /// through a transaction-pooling PgBouncer; `None`: `url`.
    pub listen_url: Option<String>,
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
    /// Where LISTEN and migrations connect.
    pub fn direct_url(&self) -> &str {
        self.listen_url.as_deref().unwrap_or(&self.url)
    }

    /// Whether `url` is a transaction-pooling PgBouncer: assumed when a
    /// separate direct URL is given for LISTEN.
    pub fn transaction_pooling(&self) -> bool {
        self.listen_url.as_deref().is_some_and(|l| l != self.url)
    }

    /// Defaults fit for tools and tests: the given URL, small pools.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            listen_url: None,
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
    /// How long a check lookup waits for one of `checks` (see
    /// [`Store::check_connection`]).
    check_acquire_timeout: Duration,
    lookup_timeout: Duration,
    call_timeout: Duration,
    keepalive: Duration,
    health: Arc<ConnectionHealth>,
    stats: Arc<StoreStats>,
    /// Behind a transaction-pooling PgBouncer (see `pool_options`).
    pooling: bool,
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
    check_pool_waiting: AtomicI64,
}

/// One pool's connections, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub name: &'static str,
    pub size: u32,
    pub idle: usize,
}

/// Counts a lookup as waiting for a connection while it lives.
pub(crate) struct Waiting<'a>(&'a AtomicI64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StoreStats {
    pub(crate) fn waiting_for_check_connection(&self) -> Waiting<'_> {
        self.check_pool_waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(&self.check_pool_waiting)
    }

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
        create_database_if_missing(opts.direct_url()).await?;
        let store = Self::connect_lazy(opts)?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without migrating; fails if migrations are missing (a
    /// migration job has not run yet) or unknown (a newer keyward ran them:
    /// this one is older than the schema).
    pub async fn connect_migrated(opts: &DbOptions) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(opts)?;
        store.check_migrated().await?;
        Ok(store)
    }

    /// Pools that connect on first use.
    pub fn connect_lazy(opts: &DbOptions) -> Result<Self, StoreError> {
        let with_timeout = |url: &str| -> Result<PgConnectOptions, StoreError> {
            let mut options =
                PgConnectOptions::from_str(url)?.application_name(&opts.application_name);
            if !opts.statement_timeout.is_zero() {
                let ms = opts.statement_timeout.as_millis().to_string();
                options = options.options([("statement_timeout", ms.as_str())]);
            }
            Ok(options)
        };
        let pooling = opts.transaction_pooling();
        statements::set_prepared(!pooling);
        let pooled = if pooling {
            // Named statements would outlive the server connection
            // PgBouncer lent for one transaction (see `statements`), and
            // PgBouncer refuses startup options it does not know: the
            // statement timeout belongs on the role there.
            PgConnectOptions::from_str(&opts.url)?
                .application_name(&opts.application_name)
                .statement_cache_capacity(0)
        } else {
            with_timeout(&opts.url)?
        };
        let connect = with_timeout(opts.direct_url())?;
        let checks = opts
            .check_connections
            .clamp(1, opts.max_connections.max(2) - 1);
        let admin = opts.max_connections.saturating_sub(checks).max(1);
        let health = Arc::new(ConnectionHealth::new());
        let pool = pool_options(
            admin,
            opts.acquire_timeout,
            opts.keepalive,
            &health,
            pooling,
        )
        .connect_lazy_with(pooled.clone());
        // Check connections stay open (see `warm_check_pool`): a burst of
        // misses must not wait for connections to be set up (a TLS
        // handshake each) within its short acquire timeout. The pool's own
        // timeout is the budget for opening one, which a lookup's wait does
        // not cut short (see `check_connection`).
        let check_pool = pool_options(
            checks,
            opts.acquire_timeout.max(opts.lookup_timeout),
            opts.keepalive,
            &health,
            pooling,
        )
        .min_connections(checks)
        .idle_timeout(None)
        .connect_lazy_with(pooled);
        Ok(Self {
            pool,
            checks: check_pool,
            connect,
            acquire_timeout: opts.acquire_timeout,
            check_acquire_timeout: opts.check_acquire_timeout.min(opts.lookup_timeout),
            lookup_timeout: opts.lookup_timeout,
            call_timeout: opts.call_timeout,
            keepalive: opts.keepalive,
            health,
            stats: Arc::default(),
            pooling,
        })
    }

    /// Opens every check connection now, so that the first misses find
    /// them ready. The pool keeps them open (and replaces one that fails).
    pub async fn warm_check_pool(&self) -> Result<(), StoreError> {
        let opening: Vec<_> = (0..self.checks.options().get_max_connections())
            .map(|_| self.acquire_check_detached())
            .collect();
        // Held until all are open, so that each is a connection of its own.
        // Left early (an error, the caller's deadline), the others go on.
        let mut held = Vec::new();
        for opened in opening {
            if let Ok(conn) = opened.await {
                held.push(conn?);
            }
        }
        Ok(())
    }

    /// Acquires a check connection in a task of its own, which dropping the
    /// handle does not cancel: a connection being opened for a waiter that
    /// gave up still joins the pool.
    fn acquire_check_detached(
        &self,
    ) -> tokio::task::JoinHandle<Result<PoolConnection<Postgres>, sqlx::Error>> {
        let pool = self.checks.clone();
        tokio::spawn(async move { pool.acquire().await })
    }

    /// One of the check pool's connections, waited for at most the check
    /// acquire timeout: when all are busy a lookup fails fast rather than
    /// queueing. When none is idle and the pool has room, the acquire opens
    /// one, and runs in a task of its own, which the wait does not cancel: a
    /// connection slower to open than a lookup may wait (TLS to a distant
    /// server, a loaded machine, a database just restarted) still joins the
    /// pool for the next lookup. Cancelled with the wait, every attempt to
    /// open one would be cut short, and the pool would stay empty.
    pub(crate) async fn check_connection(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        let wait = self.check_acquire_timeout;
        let pool = &self.checks;
        let opens = pool.num_idle() == 0 && pool.size() < pool.options().get_max_connections();
        let acquired = if opens {
            match tokio::time::timeout(wait, self.acquire_check_detached()).await {
                Ok(Ok(acquired)) => acquired,
                // The task panicked (sqlx's acquire does not).
                Ok(Err(_)) => Err(sqlx::Error::WorkerCrashed),
                Err(_) => Err(sqlx::Error::PoolTimedOut),
            }
        } else {
            // An idle one, or a wait for one in use: nothing to lose by
            // cancelling, but for an idle one found dead and replaced here;
            // once the dead are gone, the branch above opens the rest.
            tokio::time::timeout(wait, pool.acquire())
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
        };
        Ok(acquired?)
    }

    /// A transaction on an admin connection, for a change of several
    /// statements (see [`Tx`]).
    pub(crate) async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx(if self.pooling {
            TxState::Pooled(Some(self.pool.acquire().await?), self.call_timeout)
        } else {
            TxState::Own(self.pool.begin().await?)
        }))
    }

    /// A [`Tx`] for a change whose one write is a single statement, after
    /// reads it need not lock (it checks in the statement that what it read
    /// is unchanged). Directly, its statements each commit on their own, and
    /// the change costs no `BEGIN` and `COMMIT` round trips: every round trip
    /// an admin call makes waits its turn among the checks in flight, so
    /// under a flood of checks each one counts. Behind a transaction-pooling
    /// PgBouncer it is [`Store::begin`]'s transaction.
    pub(crate) async fn begin_one_write(&self) -> Result<Tx, StoreError> {
        if self.pooling {
            return self.begin().await;
        }
        Ok(Tx(TxState::Statements(self.pool.acquire().await?)))
    }

    /// Ends a write made on a pooled connection outside a transaction of its
    /// own. Behind a transaction-pooling PgBouncer every use of a pooled
    /// connection is one transaction (see `pool_options`), which sqlx's
    /// release commits in a task of its own after the caller has answered,
    /// and a commit that fails there goes unseen: another replica would not
    /// yet find the key Mint returned, or a check would be allowed on
    /// credits whose reservation is later lost. So the write is committed
    /// here, before it is answered, and the next transaction opened for the
    /// release to end. Elsewhere each statement commits on its own, and this
    /// does nothing.
    pub(crate) async fn commit_pooled(
        &self,
        conn: &mut PoolConnection<Postgres>,
    ) -> Result<(), StoreError> {
        if self.pooling {
            end_pooled(conn, COMMIT_POOLED).await?;
        }
        Ok(())
    }

    /// One statement that writes, on an admin connection, committed before
    /// it returns (see [`Store::commit_pooled`]).
    pub(crate) async fn execute_write(
        &self,
        name: &'static str,
        statement: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<(), StoreError> {
        self.bounded(name, async {
            let mut conn = self.pool.acquire().await?;
            statement.execute(&mut *conn).await?;
            self.commit_pooled(&mut conn).await
        })
        .await
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

    /// Runs an admin or background call within the call deadline, in a
    /// span named `operation` when the caller is traced.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        use tracing::Instrument as _;
        let span = crate::telemetry::store_span(operation);
        if span.is_none() {
            within(self.call_timeout, call).await
        } else {
            within(self.call_timeout, call).instrument(span).await
        }
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Both pools' open and idle connections.
    pub fn pool_stats(&self) -> [PoolStats; 2] {
        [("check", &self.checks), ("admin", &self.pool)].map(|(name, pool)| PoolStats {
            name,
            size: pool.size(),
            idle: pool.num_idle(),
        })
    }

    /// Check lookups waiting for a connection right now.
    pub fn check_pool_waiting(&self) -> i64 {
        self.stats.check_pool_waiting.load(Ordering::Relaxed).max(0)
    }

    /// Applies the migrations, on a direct connection: sqlx's advisory lock
    /// is a session lock, which a transaction-pooling PgBouncer cannot hold.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.direct().await?;
        migrator().run(&mut conn).await?;
        Ok(())
    }

    /// Read-only (a replica that does not migrate may lack the right to
    /// create tables): the migrations table must exist and hold every
    /// migration this build has.
    async fn check_migrated(&self) -> Result<(), StoreError> {
        let migrator = migrator();
        let mut conn = self.direct().await?;
        let table: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(migrator.table_name.as_ref())
            .fetch_one(&mut conn)
            .await
            .map_err(StoreError::from)?;
        let applied: std::collections::HashSet<i64> = match table {
            None => Default::default(),
            Some(table) => sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT version FROM {table} WHERE success"
            )))
            .fetch_all(&mut conn)
            .await
            .map_err(StoreError::from)?
            .into_iter()
            .collect(),
        };
        // Migrations this build does not know are a newer keyward's (a
        // rollback runs against the newer schema, as `migrate` allows).
        let missing = migrator
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .count();
        if missing > 0 {
            return Err(StoreError::Schema { missing });
        }
        Ok(())
    }

    /// A connection outside the pools, straight to PostgreSQL.
    async fn direct(&self) -> Result<PgConnection, StoreError> {
        use sqlx::ConnectOptions as _;
        self.bounded("direct", async { Ok(self.connect.connect().await?) })
            .await
    }
}

/// A pool that hands out a connection idle for longer than `keepalive`, or
/// idle since connections were put in doubt, only after a ping, and others
/// without one. sqlx's default pings before every acquire, a round trip added
/// to every cache miss; a connection in steady use proves itself alive by
/// answering.
///
/// Behind a transaction-pooling PgBouncer (`pooling`), every use of a
/// pooled connection is one transaction: `BEGIN` when it is handed out,
/// `COMMIT` when it comes back. PgBouncer then keeps one server connection
/// for the whole use, so the two round trips of an unnamed statement (parse,
/// then bind) reach the same server (see `statements`). `BEGIN` also proves
/// the connection alive, so no ping is needed. sqlx releases a connection
/// after its user has gone on, so a write does not wait for that `COMMIT`:
/// it commits first ([`Store::commit_pooled`], [`Tx`]).
fn pool_options(
    max: u32,
    acquire_timeout: Duration,
    keepalive: Duration,
    health: &Arc<ConnectionHealth>,
    pooling: bool,
) -> PgPoolOptions {
    use sqlx::Executor as _;
    let health = health.clone();
    let options = PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false);
    if pooling {
        return options
            .after_connect(|conn, _| Box::pin(async move { conn.execute("BEGIN").await.map(drop) }))
            .before_acquire(|conn, _| {
                Box::pin(async move { conn.execute("BEGIN").await.map(|_| true) })
            })
            .after_release(|conn, _| {
                // A failed statement left the transaction aborted: COMMIT
                // then rolls it back, which is what it needs.
                Box::pin(async move { Ok(conn.execute("COMMIT").await.is_ok()) })
            });
    }
    options.before_acquire(move |conn, meta| {
        let ping = health.needs_ping(meta.idle_for, keepalive);
        Box::pin(async move {
            if ping {
                sqlx::Connection::ping(conn).await?;
            }
            Ok(true)
        })
    })
}

/// Behind a transaction-pooling PgBouncer, ends a pooled connection's
/// transaction and opens the next, in one round trip (see `pool_options`).
const COMMIT_POOLED: &str = "COMMIT; BEGIN";
/// The same, rolling back.
const ROLLBACK_POOLED: &str = "ROLLBACK; BEGIN";

/// Ends a pooled connection's transaction with `end` ([`COMMIT_POOLED`] or
/// [`ROLLBACK_POOLED`]), which opens the next. If that fails (a failed
/// `COMMIT` rolls back and skips the `BEGIN`), the connection is outside a
/// transaction: it is closed rather than handed out again.
async fn end_pooled(
    conn: &mut PoolConnection<Postgres>,
    end: &'static str,
) -> Result<(), sqlx::Error> {
    use sqlx::Executor as _;
    let done = conn.execute(end).await.map(drop);
    if done.is_err() {
        conn.close_on_drop();
    }
    done
}

/// A transaction for a change of several statements: committed by
/// [`Tx::commit`], rolled back if dropped (or, from
/// [`Store::begin_one_write`] on a direct connection, statements that each
/// commit on their own). Behind a transaction-pooling
/// PgBouncer the pooled connection is in a transaction already (see
/// `pool_options`): that one is used, and its end opens the next for the
/// release to end, so that PostgreSQL is never sent a `BEGIN` in a
/// transaction or a `COMMIT` out of one (each a WARNING in the log).
pub(crate) struct Tx(TxState);

enum TxState {
    Own(sqlx::Transaction<'static, Postgres>),
    /// A direct connection outside a transaction, for a change whose one
    /// write is a single statement: it commits on its own.
    Statements(PoolConnection<Postgres>),
    /// `None` once committed; how long a rollback may take.
    Pooled(Option<PoolConnection<Postgres>>, Duration),
}

impl Tx {
    pub(crate) async fn commit(mut self) -> Result<(), StoreError> {
        match std::mem::replace(&mut self.0, TxState::Pooled(None, Duration::ZERO)) {
            TxState::Own(tx) => tx.commit().await?,
            TxState::Pooled(Some(mut conn), _) => end_pooled(&mut conn, COMMIT_POOLED).await?,
            TxState::Statements(_) | TxState::Pooled(None, _) => {}
        }
        Ok(())
    }
}

impl Drop for Tx {
    /// A pooled connection's transaction is rolled back before the
    /// connection goes back, which would commit it. A statement cut short is
    /// still running: the rollback waits for it, within the call deadline
    /// (PgBouncer passes no `statement_timeout`). If the rollback fails or
    /// runs out of time, the connection is closed, and PgBouncer rolls its
    /// transaction back. sqlx's own transaction rolls itself back.
    fn drop(&mut self) {
        let TxState::Pooled(Some(mut conn), limit) =
            std::mem::replace(&mut self.0, TxState::Pooled(None, Duration::ZERO))
        else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let rollback = end_pooled(&mut conn, ROLLBACK_POOLED);
                    if tokio::time::timeout(limit, rollback).await.is_err() {
                        conn.close_on_drop();
                    }
                });
            }
            Err(_) => conn.close_on_drop(),
        }
    }
}

impl std::ops::Deref for Tx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match &self.0 {
            TxState::Own(tx) => tx,
            TxState::Pooled(Some(conn), _) | TxState::Statements(conn) => conn,
            TxState::Pooled(None, _) => unreachable!("a committed Tx is consumed"),
        }
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match &mut self.0 {
            TxState::Own(tx) => tx,
            TxState::Pooled(Some(conn), _) | TxState::Statements(conn) => conn,
            TxState::Pooled(None, _) => unreachable!("a committed Tx is consumed"),
        }
    }
}

/// How statements are sent. Normally each is prepared once per connection
/// under a name and reused (one round trip per query after the first).
/// Behind a transaction-pooling PgBouncer before 1.21, a named statement
/// stays on the server connection PgBouncer lent for one transaction, and
/// the next transaction may get another: so statements are sent unnamed
/// (parse and bind anew each time, inside the pool's transaction). A
/// process talks to one database, so this is set once, when the store is
/// built.
pub(crate) mod statements {
    use std::sync::atomic::{AtomicBool, Ordering};

    static PREPARED: AtomicBool = AtomicBool::new(true);

    pub(super) fn set_prepared(prepared: bool) {
        PREPARED.store(prepared, Ordering::Relaxed);
    }

    /// For `Query::persistent`.
    pub(crate) fn prepared() -> bool {
        PREPARED.load(Ordering::Relaxed)
    }
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

    /// The embedded list is what sqlx's own resolver (the one behind
    /// `sqlx::migrate!`) reads from `migrations/`: the same versions,
    /// descriptions, checksums and transaction mode, so databases migrated
    /// by either agree.
    #[test]
    fn embedded_migrations_are_what_sqlx_resolves_from_the_folder() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let resolved = sqlx::migrate::resolve_blocking(&dir).unwrap();
        let embedded = migrator();
        assert_eq!(embedded.migrations.len(), resolved.len());
        assert!(!resolved.is_empty());
        for (ours, (theirs, _)) in embedded.migrations.iter().zip(&resolved) {
            assert_eq!(ours.version, theirs.version);
            assert_eq!(ours.description, theirs.description);
            assert_eq!(ours.migration_type, theirs.migration_type);
            assert_eq!(ours.checksum, theirs.checksum, "{}", ours.version);
            assert_eq!(ours.no_tx, theirs.no_tx);
            assert_eq!(ours.sql.as_str(), theirs.sql.as_str());
        }
        assert!(embedded.ignore_missing);
    }
}
