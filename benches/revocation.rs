//! Revocation propagation across 3 replicas on one PostgreSQL.
//!
//! Mints keys through replica A, warms them on B and C, then revokes each
//! through A and polls B and C until they deny it. Reports p50/p99/max of the
//! delay from Revoke returning to each replica denying, next to a baseline
//! measured in the same run: a bare NOTIFY from one connection reaching a
//! LISTEN on another (the floor for any LISTEN/NOTIFY design here).
//!
//!     cargo bench --bench revocation [-- --keys 200]
//!
//! Loopback only; every loop is bounded in count and time.

use std::time::{Duration, Instant};

use clap::Parser as _;
use keyward::{
    config::Config,
    pb::{
        self, Reason, check_service_client::CheckServiceClient,
        key_service_client::KeyServiceClient,
    },
    startup::{self, ReplicaHandle},
};
use sqlx::{Connection as _, PgConnection, postgres::PgListener};
use tonic::transport::Channel;

// Shared with the tests, which use parts this file does not.
#[allow(dead_code)]
#[path = "../tests/support/app.rs"]
mod app;
// Shared with the tests, which use parts this file does not.
#[allow(dead_code)]
#[path = "../tests/support/db.rs"]
mod db;
#[path = "../tests/support/grpc.rs"]
mod grpc;
use grpc::with_key as admin;

/// Longest wait for one replica to deny one revoked key.
const PER_KEY_DEADLINE: Duration = Duration::from_secs(2);

struct Replica {
    keys: KeyServiceClient<Channel>,
    checks: CheckServiceClient<Channel>,
    handle: ReplicaHandle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn replica(config: &Config) -> Replica {
    let running = app::start(config).await;
    Replica {
        keys: KeyServiceClient::new(running.channel.clone()),
        checks: CheckServiceClient::new(running.channel),
        handle: running.replica,
        _stop: running.stop,
    }
}

async fn reason(r: &Replica, key: &str) -> Reason {
    r.checks
        .clone()
        .check(pb::CheckRequest {
            key: key.to_owned(),
            ..Default::default()
        })
        .await
        .expect("check")
        .into_inner()
        .reason()
}

/// Polls until the replica denies the key as revoked; the delay from `since`.
async fn until_revoked(r: &Replica, key: &str, since: Instant) -> Duration {
    loop {
        if reason(r, key).await == Reason::Revoked {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < PER_KEY_DEADLINE,
            "replica never denied the key"
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(name: &str, mut samples: Vec<Duration>) -> [Duration; 3] {
    samples.sort();
    let figures = [
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
    ];
    println!(
        "| {name:<44} | {:>6} | {:>9.2} | {:>9.2} | {:>9.2} |",
        samples.len(),
        figures[0].as_secs_f64() * 1e3,
        figures[1].as_secs_f64() * 1e3,
        figures[2].as_secs_f64() * 1e3,
    );
    figures
}

/// Baseline: NOTIFY on one connection to LISTEN on another, `n` times.
async fn notify_round_trips(url: &str, n: usize) -> Vec<Duration> {
    let mut listener = PgListener::connect(url).await.expect("listener");
    listener.listen("keyward_bench").await.expect("listen");
    let mut sender = PgConnection::connect(url).await.expect("sender");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        sqlx::query("SELECT pg_notify('keyward_bench', $1)")
            .bind(i.to_string())
            .execute(&mut sender)
            .await
            .expect("notify");
        tokio::time::timeout(PER_KEY_DEADLINE, listener.recv())
            .await
            .expect("notice within deadline")
            .expect("recv");
        out.push(t0.elapsed());
    }
    out
}

#[derive(clap::Parser)]
struct Args {
    /// Keys to revoke (each is observed on 2 replicas).
    #[arg(long, default_value_t = 200)]
    keys: usize,
    // Accepted and ignored: cargo bench passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let url = db::fresh_database_url("keyward_bench");
    let config = Config::try_parse_from([
        "keyward",
        "--grpc-addr",
        "127.0.0.1:0",
        "--database-url",
        &url,
        "--log-filter",
        "warn",
        // Every poll of a revoked key is a failed presentation from one
        // loopback source; brute-force protection would answer 429 instead.
        "--brute-force-threshold",
        "0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--shutdown-delay",
        "0s",
    ])
    .expect("config");

    let (_, secret) = startup::bootstrap(&config, "bench", "bench admin")
        .await
        .expect("bootstrap");
    let admin_key = secret.expose_secret().to_owned();
    let replicas = [
        replica(&config).await,
        replica(&config).await,
        replica(&config).await,
    ];
    let [a, b, c] = &replicas;

    // Mint through A; warm every key on B and C.
    let mut minted = Vec::with_capacity(args.keys);
    for _ in 0..args.keys {
        let resp = a
            .keys
            .clone()
            .mint(admin(
                pb::MintRequest {
                    owner_id: "acme".into(),
                    ..Default::default()
                },
                &admin_key,
            ))
            .await
            .expect("mint")
            .into_inner();
        minted.push((resp.key.expect("key").id, resp.secret));
    }
    for (_, secret) in &minted {
        for r in [b, c] {
            assert_eq!(reason(r, secret).await, Reason::Ok);
        }
    }

    let baseline = notify_round_trips(&url, args.keys).await;

    let mut revoke_rpc = Vec::with_capacity(args.keys);
    let mut observed = Vec::with_capacity(args.keys * 2);
    for (id, secret) in &minted {
        let t0 = Instant::now();
        a.keys
            .clone()
            .revoke(admin(
                pb::RevokeRequest {
                    id: id.clone(),
                    reason: "bench".into(),
                },
                &admin_key,
            ))
            .await
            .expect("revoke");
        let returned = Instant::now();
        revoke_rpc.push(returned - t0);
        let (on_b, on_c) = tokio::join!(
            until_revoked(b, secret, returned),
            until_revoked(c, secret, returned)
        );
        observed.extend([on_b, on_c]);
    }
    let lag_max = [b, c]
        .map(|r| r.handle.revocation_lag().max())
        .into_iter()
        .max()
        .unwrap_or_default();

    println!();
    println!(
        "revocation propagation, 3 replicas, {} revocations through A, observed on B and C",
        args.keys
    );
    println!();
    println!(
        "| {:<44} | {:>6} | {:>9} | {:>9} | {:>9} |",
        "figure", "n", "p50 ms", "p99 ms", "max ms"
    );
    println!(
        "|{:-<46}|{:->8}|{:->11}|{:->11}|{:->11}|",
        "", "", "", "", ""
    );
    let base = row("baseline: bare NOTIFY -> LISTEN round trip", baseline);
    row("Revoke RPC (commit included)", revoke_rpc);
    let prop = row("Revoke returned -> replica denies", observed);
    println!();
    println!(
        "p99 propagation {:.2} ms (target <= 50 ms); ratio to the bare NOTIFY p99: {:.2}x; \
         largest revocation_lag reported by B/C (commit to eviction): {:.2} ms",
        prop[1].as_secs_f64() * 1e3,
        prop[1].as_secs_f64() / base[1].as_secs_f64().max(1e-9),
        lag_max.as_secs_f64() * 1e3,
    );

    drop(replicas);
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Err(err) = db::drop_database(&url).await {
        eprintln!("cannot drop the bench database: {err}");
    }
}
