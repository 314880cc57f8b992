use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, Once},
    time::Duration,
};

use clap::Parser as _;
use keyward::{
    config::Config,
    key::ApiKey,
    limits::credits::{Clock, SystemClock},
    pb::{
        self, audit_service_client::AuditServiceClient, check_service_client::CheckServiceClient,
        key_service_client::KeyServiceClient, leak_service_client::LeakServiceClient,
        owner_service_client::OwnerServiceClient,
    },
    startup::{self, ReplicaHandle, StartupError},
    telemetry,
};
use sqlx::PgPool;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Request, Status, transport::Channel};

// Shared with the benchmarks, which use parts the tests do not.
#[allow(dead_code)]
#[path = "../support/app.rs"]
mod app;
// Shared with the benchmarks, which use parts the tests do not.
#[allow(dead_code)]
#[path = "../support/db.rs"]
pub mod db;
#[path = "../support/grpc.rs"]
mod grpc;
// Shared with the benchmarks, which use parts the tests do not.
#[allow(dead_code)]
#[path = "../support/private.rs"]
pub mod private;
pub use grpc::with_key;

/// A running keyward on its own database, with an admin key and clients.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The server's admin pool: inspect rows with it.
    pub db: PgPool,
    pub database_url: String,
    pub replica: ReplicaHandle,
    pub admin_key: String,
    pub admin_id: String,
    pub keys: KeyServiceClient<Channel>,
    pub checks: CheckServiceClient<Channel>,
    pub owners: OwnerServiceClient<Channel>,
    pub audit: AuditServiceClient<Channel>,
    pub leaks: LeakServiceClient<Channel>,
    // Sending (or dropping) stops the server.
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), StartupError>>>,
}

static TRACING: Once = Once::new();

/// A database name no other test uses; scripts/test drops leftovers.
pub fn fresh_database_url() -> String {
    db::fresh_database_url("keyward_test")
}

/// The test settings, then `extra` flags (a flag given again wins).
pub fn test_config(database_url: &str, extra: &[&str]) -> Config {
    let mut args = vec![
        "keyward",
        "--grpc-addr",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--key-prefix",
        "kw_live",
        "--shutdown-grace",
        "2s",
        // Tests stop servers all the time; the drain delay is tested apart.
        "--shutdown-delay",
        "0s",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Config::try_parse_from(args).expect("test config")
}

/// A server on a fresh database, with an admin key.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// [`spawn_app`] with extra settings.
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    spawn_app_on(fresh_database_url(), extra).await
}

/// A server on the database `database_url` names (created if missing), with
/// an admin key: e.g. on a private PostgreSQL the test controls.
pub async fn spawn_app_on(database_url: String, extra: &[&str]) -> TestApp {
    spawn_app_at(database_url, extra, Arc::new(SystemClock)).await
}

/// A server whose decisions and credit periods go by `clock`.
pub async fn spawn_app_with_clock(extra: &[&str], clock: Arc<dyn Clock>) -> TestApp {
    spawn_app_at(fresh_database_url(), extra, clock).await
}

async fn spawn_app_at(database_url: String, extra: &[&str], clock: Arc<dyn Clock>) -> TestApp {
    let config = test_config(&database_url, extra);
    let (admin, secret) = startup::bootstrap(&config, "ops", "test admin")
        .await
        .expect("bootstrap");
    start(
        config,
        database_url,
        secret.expose_secret().to_owned(),
        admin.id.to_string(),
        clock,
    )
    .await
}

/// Another replica on the same database as `of`, sharing its admin key.
pub async fn spawn_replica(of: &TestApp, extra: &[&str]) -> TestApp {
    let config = test_config(&of.database_url, extra);
    start(
        config,
        of.database_url.clone(),
        of.admin_key.clone(),
        of.admin_id.clone(),
        Arc::new(SystemClock),
    )
    .await
}

async fn start(
    config: Config,
    database_url: String,
    admin_key: String,
    admin_id: String,
    clock: Arc<dyn Clock>,
) -> TestApp {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            telemetry::init(keyward::config::LogFormat::Pretty, "info,keyward=debug")
                .expect("init logging");
        }
    });
    let running = app::start_with_clock(&config, clock).await;
    TestApp {
        addr: running.addr,
        db: running.db,
        database_url,
        replica: running.replica,
        admin_key,
        admin_id,
        keys: KeyServiceClient::new(running.channel.clone()),
        checks: CheckServiceClient::new(running.channel.clone()),
        owners: OwnerServiceClient::new(running.channel.clone()),
        audit: AuditServiceClient::new(running.channel.clone()),
        leaks: LeakServiceClient::new(running.channel),
        shutdown: Some(running.stop),
        server: Some(running.server),
    }
}

/// Polls `probe` until it returns `Some`, for at most `deadline`; returns the
/// value and how long it took.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut probe: F) -> Option<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = probe().await {
            return Some((v, start.elapsed()));
        }
        if start.elapsed() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Invalidation notices of kind `op` (`"owner"`, `"key_changed"`, ...) this
/// replica has applied.
pub fn notices(app: &TestApp, op: &str) -> u64 {
    app.replica
        .revocation_lag()
        .by_op()
        .find(|(o, _)| *o == op)
        .map_or(0, |(_, n)| n)
}

/// Waits until this replica has applied `n` notices of kind `op`.
pub async fn heard(app: &TestApp, op: &str, n: u64) {
    eventually(Duration::from_secs(5), || async {
        (notices(app, op) >= n).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{op} notices never reached {n}: {}", notices(app, op)));
}

/// A well-formed key that was never minted.
pub fn never_minted() -> ApiKey {
    ApiKey::generate(&keyward::key::KeyPrefix::parse("kw_live").expect("prefix"))
}

/// A server's gRPC clients, cheap to clone.
#[derive(Clone)]
pub struct Clients {
    pub keys: KeyServiceClient<Channel>,
    pub owners: OwnerServiceClient<Channel>,
    pub audit: AuditServiceClient<Channel>,
}

impl TestApp {
    pub fn clients(&self) -> Clients {
        Clients {
            keys: self.keys.clone(),
            owners: self.owners.clone(),
            audit: self.audit.clone(),
        }
    }

    /// Stops the server the way SIGTERM does, and waits until it has exited.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("server stops within its grace period")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    pub fn admin<T>(&self, message: T) -> Request<T> {
        with_key(message, &self.admin_key)
    }

    /// Cuts the server off from its database (both of its pools close).
    pub async fn cut_off_database(&self) {
        self.replica.store().close().await;
    }

    /// The name of this test's database.
    pub fn database_name(&self) -> &str {
        db::database_name(&self.database_url)
    }

    /// Mints through the API with the admin key; panics on refusal.
    pub async fn mint(&self, req: pb::MintRequest) -> pb::MintResponse {
        self.keys
            .clone()
            .mint(self.admin(req))
            .await
            .expect("mint")
            .into_inner()
    }

    pub async fn mint_for(&self, owner: &str) -> pb::MintResponse {
        self.mint(pb::MintRequest {
            owner_id: owner.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn check(&self, req: pb::CheckRequest) -> Result<pb::CheckResponse, Status> {
        self.checks.clone().check(req).await.map(|r| r.into_inner())
    }

    /// Checks a key with no resource, scope or address.
    pub async fn check_key(&self, key: &str) -> Result<pb::CheckResponse, Status> {
        self.check(pb::CheckRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn revoke(&self, id: &str) -> pb::ApiKey {
        self.keys
            .clone()
            .revoke(self.admin(pb::RevokeRequest {
                id: id.into(),
                reason: "test".into(),
            }))
            .await
            .expect("revoke")
            .into_inner()
            .key
            .expect("revoked key")
    }

    pub async fn get(&self, id: &str) -> pb::ApiKey {
        self.keys
            .clone()
            .get(self.admin(pb::GetRequest { id: id.into() }))
            .await
            .expect("get")
            .into_inner()
    }

    /// Rows in (keys, owners, audit_events).
    pub async fn row_counts(&self) -> (i64, i64, i64) {
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM keys), (SELECT count(*) FROM owners), \
             (SELECT count(*) FROM audit_events)",
        )
        .fetch_one(&self.db)
        .await
        .expect("count rows")
    }
}

pub fn reason(resp: &pb::CheckResponse) -> pb::Reason {
    resp.reason()
}

/// Log lines written while this is alive, on this thread (the tests'
/// runtime runs the server's tasks on the test's own thread).
pub struct CapturedLogs {
    lines: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    pub fn start() -> Self {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(sink.clone()))
            .finish();
        Self {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// The first line containing `needle`.
    pub fn find(&self, needle: &str) -> Option<String> {
        let all = String::from_utf8_lossy(&self.lines.lock().expect("log buffer")).into_owned();
        all.lines().find(|l| l.contains(needle)).map(str::to_owned)
    }
}

/// A clock the test moves by hand.
#[derive(Debug)]
pub struct ManualClock(Mutex<chrono::DateTime<chrono::Utc>>);

impl ManualClock {
    pub fn starting_now() -> Arc<Self> {
        Arc::new(Self(Mutex::new(chrono::Utc::now())))
    }

    pub fn set(&self, at: chrono::DateTime<chrono::Utc>) {
        *self.0.lock().expect("clock") = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        *self.0.lock().expect("clock")
    }
}
