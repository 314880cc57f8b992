//! The local PostgreSQL: where it is, a database of its own for each test or
//! benchmark run, and its removal. Shared by the tests and the benchmarks
//! (`#[path]`-included).

use clap::Parser as _;
use keyward::config::Config;
use sqlx::{Connection as _, PgConnection};

/// The server's URL without a database name, from the same setting keyward
/// reads (`DATABASE_URL` or the default).
pub fn server_url() -> String {
    let url = Config::try_parse_from(["keyward"])
        .expect("default config")
        .database_url;
    let (server, _db) = url.rsplit_once('/').expect("database url has a path");
    server.to_owned()
}

/// The URL of a database no one else uses, named `{prefix}_{random}`;
/// keyward creates it when it starts.
///
/// Plaintext (`sslmode=disable`): the shared server may offer TLS (Debian's
/// does, with its snakeoil certificate), and sqlx's default `prefer` would
/// take it, so that a whole test run pays TLS on loopback for nothing and
/// load-bearing tests (floods, 300 concurrent credit checks) lose their
/// margins on a busy 2-core machine. TLS to PostgreSQL is tested against a
/// private server with `verify-full` (tests/api/transport.rs).
pub fn fresh_database_url(prefix: &str) -> String {
    format!(
        "{}/{prefix}_{}?sslmode=disable",
        server_url(),
        uuid::Uuid::now_v7().simple()
    )
}

/// The database a URL names.
pub fn database_name(url: &str) -> &str {
    let db = url.rsplit_once('/').map(|(_, db)| db).unwrap_or_default();
    db.split_once('?').map_or(db, |(name, _)| name)
}

/// A connection to the server's maintenance database, for what a test does
/// to a database itself.
pub async fn maintenance() -> PgConnection {
    connect_maintenance()
        .await
        .expect("connect to the postgres database")
}

async fn connect_maintenance() -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(&format!("{}/postgres", server_url())).await
}

/// Drops the database `url` names, closing the connections still open to it.
pub async fn drop_database(url: &str) -> Result<(), sqlx::Error> {
    let name = database_name(url);
    let mut conn = connect_maintenance().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}
