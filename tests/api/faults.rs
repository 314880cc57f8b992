//! keyward when its database fails: a restart, and a server that stops
//! answering altogether. Each test runs its own PostgreSQL (never the shared
//! one on 5432, which other tests use), so it can restart and SIGSTOP it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use keyward::{key::ApiKey, pb::Reason};
use tonic::Code;

use crate::helpers::{
    TestApp, eventually, private::PrivatePostgres, reason, spawn_app_on, spawn_replica,
};

/// Checks every key in turn until `stop`; counts answers that are not allows.
fn keep_checking(
    app: &TestApp,
    keys: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    let checks = app.checks.clone();
    tokio::spawn(async move {
        let mut checks = checks;
        let (mut ok, mut bad) = (0, 0);
        'outer: loop {
            for key in keys.iter() {
                if stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                let resp = checks
                    .check(keyward::pb::CheckRequest {
                        key: key.clone(),
                        ..Default::default()
                    })
                    .await;
                match resp {
                    Ok(r) if r.get_ref().allowed => ok += 1,
                    other => {
                        bad += 1;
                        eprintln!("warm key not allowed: {other:?}");
                    }
                }
            }
        }
        (ok, bad)
    })
}

async fn mint_many(app: &TestApp, n: usize) -> Vec<String> {
    let mut keys = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..16 {
        let admin = app.admin_key.clone();
        let client = app.keys.clone();
        let count = n / 16 + usize::from(chunk < n % 16);
        tasks.spawn(async move {
            let mut client = client;
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                let minted = client
                    .mint(crate::helpers::with_key(
                        keyward::pb::MintRequest {
                            owner_id: "acme".into(),
                            ..Default::default()
                        },
                        &admin,
                    ))
                    .await
                    .expect("mint")
                    .into_inner();
                out.push(minted.secret);
            }
            out
        });
    }
    while let Some(chunk) = tasks.join_next().await {
        keys.extend(chunk.expect("mint task"));
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_causes_no_errors_and_no_herd_of_lookups() {
    const KEYS: usize = 1000;
    let pg = PrivatePostgres::start().await;
    let a = spawn_app_on(pg.url("keyward"), &[]).await;
    let b = spawn_replica(&a, &[]).await;
    let keys = Arc::new(mint_many(&a, KEYS).await);
    // Warm both replicas.
    for replica in [&a, &b] {
        for key in keys.iter() {
            assert!(replica.check_key(key).await.expect("warm").allowed);
        }
    }
    let lookups = |r: &TestApp| r.replica.store().stats().key_lookups();
    let before = (lookups(&a), lookups(&b));

    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        keep_checking(&a, keys.clone(), stop.clone()),
        keep_checking(&b, keys.clone(), stop.clone()),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let restarted = Instant::now();
    pg.restart_fast().await;
    for replica in [&a, &b] {
        assert!(
            replica
                .replica
                .wait_for_listen_sessions(2, Duration::from_secs(20))
                .await,
            "the replica listens again after the restart"
        );
    }
    println!(
        "both replicas listening again {:?} after the restart began",
        restarted.elapsed()
    );
    // Every key is checked at least once more after the reconnect.
    let resumed = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total_ok = 0;
    for load in loads {
        let (ok, bad) = load.await.expect("load");
        assert_eq!(bad, 0, "warm keys failed during the restart");
        total_ok += ok;
    }
    let after = (lookups(&a) - before.0, lookups(&b) - before.1);
    println!(
        "{total_ok} warm checks allowed across the restart; store lookups afterwards: A {}, B {} (for {KEYS} keys, {:?} of load after the reconnect)",
        after.0,
        after.1,
        resumed.elapsed()
    );
    assert!(
        after.0 <= KEYS as u64 && after.1 <= KEYS as u64,
        "{after:?}"
    );

    // A revocation made after the restart is honoured on both replicas.
    let victim = ApiKey::parse(&keys[0]).expect("key");
    let id: String = sqlx::query_scalar("SELECT id::text FROM keys WHERE hash = $1")
        .bind(victim.hash().as_bytes().as_slice())
        .fetch_one(&a.db)
        .await
        .expect("victim id");
    a.revoke(&id).await;
    for replica in [&a, &b] {
        eventually(Duration::from_secs(2), || async {
            let resp = replica.check_key(&keys[0]).await.ok()?;
            (reason(&resp) == Reason::Revoked).then_some(())
        })
        .await
        .expect("the revocation reaches the replica");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_bounds_every_call_and_recovers_without_a_restart() {
    const LOOKUP: Duration = Duration::from_millis(500);
    const CALL: Duration = Duration::from_secs(1);
    let pg = PrivatePostgres::start().await;
    let app = spawn_app_on(
        pg.url("keyward"),
        &[
            "--db-lookup-timeout",
            "500ms",
            "--db-call-timeout",
            "1s",
            "--db-acquire-timeout",
            "1s",
            "--db-keepalive",
            "1s",
        ],
    )
    .await;
    let warm = app.mint_for("acme").await;
    let cold = app.mint_for("acme").await;
    let cold_key = ApiKey::parse(&cold.secret).expect("key");
    assert!(app.check_key(&warm.secret).await.expect("check").allowed);
    // The cold key exists (so the filter passes it) but is not cached.
    app.replica.checker().invalidate(&cold_key.hash());

    pg.sigstop();
    let t = Instant::now();
    let err = app
        .check_key(&cold.secret)
        .await
        .expect_err("cannot be decided");
    let took = t.elapsed();
    println!(
        "uncached key with the database stopped: {:?} after {took:?}",
        err.code()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(took < LOOKUP + Duration::from_millis(500), "took {took:?}");

    assert!(app.check_key(&warm.secret).await.expect("warm").allowed);

    let t = Instant::now();
    let err = app
        .keys
        .clone()
        .revoke(app.admin(keyward::pb::RevokeRequest {
            id: warm.key.as_ref().expect("key").id.clone(),
            reason: "test".into(),
        }))
        .await
        .expect_err("no database");
    let took = t.elapsed();
    println!(
        "Revoke with the database stopped: {:?} after {took:?}",
        err.code()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(took < CALL + Duration::from_millis(500), "took {took:?}");

    pg.sigcont();
    let recovered = Instant::now();
    eventually(Duration::from_secs(15), || async {
        app.check_key(&cold.secret).await.ok().filter(|r| r.allowed)
    })
    .await
    .expect("an uncached key is decided again");
    let revoked = eventually(Duration::from_secs(15), || async {
        app.keys
            .clone()
            .revoke(app.admin(keyward::pb::RevokeRequest {
                id: warm.key.as_ref().expect("key").id.clone(),
                reason: "test".into(),
            }))
            .await
            .ok()
    })
    .await;
    assert!(revoked.is_some(), "Revoke works again");
    println!("recovered {:?} after SIGCONT", recovered.elapsed());
    let resp = app.check_key(&warm.secret).await.expect("check");
    assert_eq!(reason(&resp), Reason::Revoked);
}
