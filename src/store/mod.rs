//! PostgreSQL persistence with sqlx. Only hashes of keys are stored. Every
//! admin change writes its audit event in the same transaction.

mod error;
mod keys;
mod notify;
mod usage;

use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::{
    PgPool, Postgres,
    migrate::MigrateDatabase as _,
    postgres::{PgConnectOptions, PgPoolOptions},
};

pub use error::StoreError;
pub use keys::{Actor, ListQuery, Page};
pub use notify::{CHANNEL, Heard, Invalidation, Listener};
pub use usage::UsageWrite;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub url: String,
    pub max_connections: u32,
    /// How long a query waits for a connection before the store reports
    /// itself unavailable; bounds a check's latency when the database is down.
    pub acquire_timeout: Duration,
    /// Shown in `pg_stat_activity`, to tell replicas apart.
    pub application_name: String,
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// For connections outside the pool (the `LISTEN` connection).
    connect: PgConnectOptions,
    acquire_timeout: Duration,
    stats: Arc<StoreStats>,
}

/// Statements issued by this process, by kind: lets tests and operators see
/// what the hot path costs the database.
#[derive(Debug, Default)]
pub struct StoreStats {
    key_lookups: AtomicU64,
    usage_writes: AtomicU64,
}

impl StoreStats {
    /// `SELECT`s of a key by hash (cache misses and revalidations).
    pub fn key_lookups(&self) -> u64 {
        self.key_lookups.load(Ordering::Relaxed)
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

    /// A pool that connects on first use.
    pub fn connect_lazy(opts: &DbOptions) -> Result<Self, StoreError> {
        let connect =
            PgConnectOptions::from_str(&opts.url)?.application_name(&opts.application_name);
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .connect_lazy_with(connect.clone());
        Ok(Self {
            pool,
            connect,
            acquire_timeout: opts.acquire_timeout,
            stats: Arc::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }
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
