//! PostgreSQL persistence with sqlx. Only hashes of keys are stored. Every
//! admin change writes its audit event in the same transaction.

mod error;
mod keys;

use std::{str::FromStr, time::Duration};

use sqlx::{
    PgPool, Postgres,
    migrate::MigrateDatabase as _,
    postgres::{PgConnectOptions, PgPoolOptions},
};

pub use error::StoreError;
pub use keys::{Actor, ListQuery, Page};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub url: String,
    pub max_connections: u32,
    /// How long a query waits for a connection before the store reports
    /// itself unavailable; bounds a check's latency when the database is down.
    pub acquire_timeout: Duration,
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
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
        let connect = PgConnectOptions::from_str(&opts.url)?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
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
