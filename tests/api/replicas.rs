//! Several keyward replicas on one database: revocation reaches all of them
//! through LISTEN/NOTIFY, a lost listener reconnects and drops its cache, and
//! a warm replica rides out a database outage within `stale_if_error`.

use std::time::{Duration, Instant};

use keyward::pb::{self, Reason};
use tonic::Code;

use crate::helpers::{
    TestApp, db, eventually, heard, never_minted, notices, reason, spawn_app, spawn_replica,
};

/// Polls `replica` until it answers `want` for `key`, for at most 1 s.
async fn until_reason(replica: &TestApp, key: &str, want: Reason) -> Duration {
    until_reason_within(replica, key, want, Duration::from_secs(1)).await
}

/// Polls `replica` until it answers `want` for `key`, for at most `within`.
async fn until_reason_within(
    replica: &TestApp,
    key: &str,
    want: Reason,
    within: Duration,
) -> Duration {
    let (_, took) = eventually(within, || async {
        let resp = replica.check_key(key).await.ok()?;
        (reason(&resp) == want).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("replica did not answer {want:?} within {within:?}"));
    took
}

#[tokio::test]
async fn a_revocation_through_one_replica_reaches_another_within_a_second() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let minted = a.mint_for("acme").await;
    let id = minted.key.expect("key").id;
    // B reads the key from the database and caches it.
    assert!(b.check_key(&minted.secret).await.expect("check").allowed);
    assert!(b.check_key(&minted.secret).await.expect("check").allowed);

    a.revoke(&id).await;
    let took = until_reason(&b, &minted.secret, Reason::Revoked).await;
    println!("revocation through A reached replica B after {took:?}");
    let lag = b.replica.revocation_lag();
    println!(
        "B's own revocation_lag (commit to eviction): {:?}",
        lag.last()
    );
    assert!(lag.notices() >= 1, "B heard the notice");
}

#[tokio::test]
async fn a_warm_replica_refuses_a_key_revoked_elsewhere_without_reading_the_database() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let minted = a.mint_for("acme").await;
    let id = minted.key.expect("key").id;
    warm(&b, &[&minted.secret]).await;
    let lookups = b.replica.store().stats().key_lookups();

    a.revoke(&id).await;
    until_reason(&b, &minted.secret, Reason::Revoked).await;
    // Twice more: the revoked entry answers from the cache.
    for _ in 0..2 {
        let resp = b.check_key(&minted.secret).await.expect("check");
        assert_eq!(reason(&resp), Reason::Revoked);
    }
    assert_eq!(
        b.replica.store().stats().key_lookups(),
        lookups,
        "B read the database to refuse a key the notice said was revoked"
    );
    // A replica that never held the key reads it, and refuses it too.
    let c = spawn_replica(&a, &[]).await;
    let resp = c.check_key(&minted.secret).await.expect("check");
    assert_eq!(reason(&resp), Reason::Revoked);
    assert_eq!(c.replica.store().stats().key_lookups(), 1);
}

#[tokio::test]
async fn any_other_change_to_a_revoked_key_evicts_it_from_a_warm_replica() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let (first, second) = (a.mint_for("acme").await, a.mint_for("acme").await);
    warm(&b, &[&first.secret, &second.secret]).await;
    let id = |m: &keyward::pb::MintResponse| m.key.clone().expect("key").id;

    // Revoked, then made a canary by hand: B must not keep answering from
    // its revoked copy of the old row (a canary is refused as unknown).
    a.revoke(&id(&first)).await;
    until_reason(&b, &first.secret, Reason::Revoked).await;
    update_by_hand(&a, "canary = true", id(&first)).await;
    until_reason(&b, &first.secret, Reason::UnknownKey).await;

    // Both in one statement: not a revocation notice either.
    update_by_hand(&a, "revoked_at = now(), canary = true", id(&second)).await;
    until_reason(&b, &second.secret, Reason::UnknownKey).await;
}

#[tokio::test]
async fn a_change_made_directly_in_sql_reaches_every_replica() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let minted = a.mint_for("acme").await;
    for replica in [&a, &b] {
        assert!(
            replica
                .check_key(&minted.secret)
                .await
                .expect("check")
                .allowed
        );
    }

    // An operator disables the key by hand: the trigger still notifies.
    update_by_hand(&a, "disabled_at = now()", minted.key.expect("key").id).await;

    for replica in [&a, &b] {
        until_reason(replica, &minted.secret, Reason::Disabled).await;
    }
}

/// `UPDATE keys SET <set> WHERE id = <id>`, as an operator would by hand.
async fn update_by_hand(app: &TestApp, set: &str, id: String) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE keys SET {set} WHERE id = $1::uuid"
    )))
    .bind(id)
    .execute(&app.db)
    .await
    .expect("update");
}

/// Caches `keys` on `replica`.
async fn warm(replica: &TestApp, keys: &[&String]) {
    for key in keys {
        assert!(replica.check_key(key).await.expect("check").allowed);
    }
}

async fn terminate_listener(of: &TestApp) {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("keyward-listener {}", of.replica.instance_id()))
    .fetch_all(&mut db::maintenance().await)
    .await
    .expect("terminate");
    assert_eq!(
        killed,
        [true],
        "exactly the replica's listener was terminated"
    );
}

async fn allow_connections(app: &TestApp, allow: bool) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"ALTER DATABASE "{}" ALLOW_CONNECTIONS {allow}"#,
        app.database_name()
    )))
    .execute(&mut db::maintenance().await)
    .await
    .expect("alter database");
}

/// The outage: `app`'s database refuses connections and drops the ones it
/// has.
async fn close_database(app: &TestApp) {
    allow_connections(app, false).await;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(app.database_name())
        .execute(&mut db::maintenance().await)
        .await
        .expect("terminate connections");
}

#[tokio::test]
async fn a_replica_whose_listener_is_killed_keeps_its_cache_and_hears_later_revocations() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let first = a.mint_for("acme").await;
    let second = a.mint_for("acme").await;
    warm(&b, &[&first.secret, &second.secret]).await;
    let lookups = b.replica.store().stats().key_lookups();

    terminate_listener(&b).await;
    assert!(
        b.replica
            .wait_for_listen_sessions(2, Duration::from_secs(10))
            .await,
        "B re-established its LISTEN"
    );
    // Nothing changed meanwhile: the cache was kept, no key is re-read.
    assert!(b.check_key(&first.secret).await.expect("check").allowed);
    assert_eq!(
        b.replica.store().stats().key_lookups(),
        lookups,
        "cache kept across the reconnect"
    );

    // Revocations made after the reconnect reach B.
    a.revoke(&second.key.expect("key").id).await;
    let took = until_reason(&b, &second.secret, Reason::Revoked).await;
    println!("after B's reconnect, a revocation reached B after {took:?}");
}

#[tokio::test]
async fn a_key_revoked_while_a_replicas_listener_was_away_is_refused_once_it_listens_again() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let doomed = a.mint_for("acme").await;
    let kept = a.mint_for("acme").await;
    warm(&b, &[&doomed.secret, &kept.secret]).await;
    // Keep A's admin pool warm: new connections are about to be refused.
    a.get(&kept.key.as_ref().expect("key").id).await;

    // B's listener goes away and cannot come back yet; meanwhile A revokes.
    allow_connections(&a, false).await;
    terminate_listener(&b).await;
    a.revoke(&doomed.key.as_ref().expect("key").id).await;
    let lookups = b.replica.store().stats().key_lookups();
    allow_connections(&a, true).await;
    assert!(
        b.replica
            .wait_for_listen_sessions(2, Duration::from_secs(15))
            .await,
        "B listens again"
    );

    // The very first check after B listens again refuses the key, and only
    // the changed key was re-read.
    let resp = b.check_key(&doomed.secret).await.expect("check");
    assert_eq!(reason(&resp), Reason::Revoked);
    assert!(b.check_key(&kept.secret).await.expect("check").allowed);
    assert_eq!(
        b.replica.store().stats().key_lookups(),
        lookups + 1,
        "only the revoked key was re-read"
    );
}

#[tokio::test]
async fn a_warm_replica_rides_out_a_database_outage_within_stale_if_error() {
    const TTL: Duration = Duration::from_millis(300);
    const STALE_IF_ERROR: Duration = Duration::from_secs(3);
    let a = spawn_app().await;
    let b = spawn_replica(
        &a,
        &[
            "--cache-ttl",
            "300ms",
            "--stale-if-error",
            "3s",
            "--db-acquire-timeout",
            "300ms",
        ],
    )
    .await;
    let minted = a.mint_for("acme").await;
    let id = minted.key.expect("key").id;
    let loaded = Instant::now();
    assert!(b.check_key(&minted.secret).await.expect("check").allowed);

    close_database(&a).await;

    // A key B has not cached cannot be decided: UNAVAILABLE, never an allow.
    let err = b
        .check_key(never_minted().expose_secret())
        .await
        .expect_err("no store");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Past its soft TTL but within stale_if_error, the cached key still answers.
    tokio::time::sleep(
        (loaded + TTL + Duration::from_millis(100)).saturating_duration_since(Instant::now()),
    )
    .await;
    let resp = b.check_key(&minted.secret).await.expect("served stale");
    assert!(resp.allowed, "{resp:?}");
    assert!(
        loaded.elapsed() < TTL + STALE_IF_ERROR,
        "the test ran too slowly to prove anything"
    );

    // Past the hard bound it cannot be decided any more.
    tokio::time::sleep(
        (loaded + TTL + STALE_IF_ERROR + Duration::from_millis(300))
            .saturating_duration_since(Instant::now()),
    )
    .await;
    let err = b
        .check_key(&minted.secret)
        .await
        .expect_err("beyond stale_if_error");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The database comes back: checks and revocations work without a restart.
    allow_connections(&a, true).await;
    let recovered = eventually(Duration::from_secs(10), || async {
        b.check_key(&minted.secret).await.ok().filter(|r| r.allowed)
    })
    .await;
    assert!(
        recovered.is_some(),
        "B answers again once the database is back"
    );
    assert!(
        b.replica
            .wait_for_listen_sessions(2, Duration::from_secs(15))
            .await,
        "B's listener came back"
    );
    a.revoke(&id).await;
    until_reason(&b, &minted.secret, Reason::Revoked).await;
}

#[tokio::test]
async fn a_replica_that_heard_of_a_suspension_does_not_ride_out_an_outage_on_the_owners_old_entries()
 {
    let a = spawn_app().await;
    let b = spawn_replica(
        &a,
        &["--stale-if-error", "60s", "--db-acquire-timeout", "300ms"],
    )
    .await;
    let minted = a.mint_for("acme").await;
    warm(&b, &[&minted.secret]).await;
    let before = notices(&b, "owner");
    crate::lifecycle::set_owner_state(&a, "acme", pb::owner::State::Suspended, "unpaid").await;
    heard(&b, "owner", before + 1).await;
    // (The notice is counted just before it is applied.)
    tokio::time::sleep(Duration::from_millis(50)).await;

    // The database goes away before B checks the key again. B's entry was
    // read while the owner was active and is well within stale_if_error,
    // but B knows the owner changed since: it cannot decide.
    close_database(&a).await;
    let err = b
        .check_key(&minted.secret)
        .await
        .expect_err("answered from the entry read before the suspension");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Once the database is back, B refuses the key.
    allow_connections(&a, true).await;
    until_reason_within(
        &b,
        &minted.secret,
        Reason::OwnerInactive,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test]
async fn a_replica_started_after_a_revocation_denies_the_key() {
    // A replica started after the revocation never saw the notice; it must
    // read the truth from the database.
    let a = spawn_app().await;
    let minted = a.mint_for("acme").await;
    a.revoke(&minted.key.expect("key").id).await;
    let b = spawn_replica(&a, &[]).await;
    let resp = b.check_key(&minted.secret).await.expect("check");
    assert_eq!(reason(&resp), Reason::Revoked);
}

#[tokio::test]
async fn a_replica_starts_on_a_database_a_newer_release_has_migrated() {
    // After a rollback, the database holds a migration this binary does not
    // know; migrations only add, so the older binary must still start.
    let a = spawn_app().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (29991231000000, 'from a newer release', true, '\\x00', 1)",
    )
    .execute(&a.db)
    .await
    .expect("record a newer migration");
    let b = spawn_replica(&a, &[]).await;
    let minted = a.mint_for("acme").await;
    assert!(b.check_key(&minted.secret).await.expect("check").allowed);
}
