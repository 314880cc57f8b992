//! Rate limits (local and Redis backends) and usage credits.

use std::time::{Duration, Instant};

use chrono::{Datelike as _, TimeZone as _, Utc};
use keyward::pb::{self, Reason};

use crate::helpers::{
    ManualClock, TestApp, eventually, private::PrivateRedis, reason, spawn_app_with,
    spawn_app_with_clock, spawn_replica,
};

pub fn window(name: &str, limit: u64, seconds: i64) -> pb::RateLimit {
    pb::RateLimit {
        name: name.into(),
        limit,
        window: Some(prost_types::Duration { seconds, nanos: 0 }),
    }
}

pub async fn mint_limited(
    app: &TestApp,
    limits: Vec<pb::RateLimit>,
    credits: Option<pb::Credits>,
) -> pb::MintResponse {
    app.mint(pb::MintRequest {
        owner_id: "acme".into(),
        scopes: vec!["invoices:read".into()],
        rate_limits: limits,
        credits,
        ..Default::default()
    })
    .await
}

pub fn credits(remaining: i64) -> Option<pb::Credits> {
    Some(pb::Credits {
        remaining,
        refill: None,
    })
}

/// `n` checks at once, alternating between the replicas; (allowed, refused
/// with `refusal`) and how long they took.
async fn burst(
    replicas: &[&TestApp],
    key: &str,
    n: usize,
    refusal: Reason,
) -> (usize, usize, Duration) {
    let started = Instant::now();
    let calls = (0..n).map(|i| {
        let mut checks = replicas[i % replicas.len()].checks.clone();
        let key = key.to_owned();
        async move {
            checks
                .check(pb::CheckRequest {
                    key,
                    ..Default::default()
                })
                .await
                .expect("check")
                .into_inner()
        }
    });
    let answers = futures_join_all(calls).await;
    let took = started.elapsed();
    let allowed = answers.iter().filter(|a| a.allowed).count();
    let refused = answers.iter().filter(|a| reason(a) == refusal).count();
    (allowed, refused, took)
}

/// Runs the futures concurrently on this runtime.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_allow_exactly_the_limit() {
    let redis = PrivateRedis::start().await;
    let a = spawn_app_with(&["--redis-url", &redis.url()]).await;
    let b = spawn_replica(&a, &["--redis-url", &redis.url()]).await;
    let key = mint_limited(&a, vec![window("burst", 50, 10)], None)
        .await
        .secret;
    // Both replicas have the key cached and Redis connected.
    for replica in [&a, &b] {
        eventually(Duration::from_secs(5), || async {
            replica.check_key(&key).await.ok()?;
            (replica
                .replica
                .checker()
                .rate_limiter()
                .stats()
                .redis_checks()
                > 0)
            .then_some(())
        })
        .await
        .expect("redis answers");
    }
    let stats = |r: &TestApp| {
        let s = r.replica.checker().rate_limiter().stats();
        (s.redis_checks(), s.fallbacks())
    };
    // The warm-up's uses that reached Redis count against the limit.
    let used = stats(&a).0 + stats(&b).0;
    let fallbacks_before = stats(&a).1 + stats(&b).1;

    let (allowed, refused, took) = burst(&[&a, &b], &key, 200, Reason::RateLimited).await;
    println!("200 checks over two replicas in {took:?}: {allowed} allowed, {refused} rate limited");
    // One use comes back every 10 s / 50 = 200 ms.
    assert!(
        took < Duration::from_millis(200),
        "the test ran too slowly to prove anything: {took:?}"
    );
    assert_eq!(
        allowed as u64 + used,
        50,
        "exactly the limit, across both replicas"
    );
    assert_eq!(allowed + refused, 200);
    assert_eq!(
        stats(&a).1 + stats(&b).1,
        fallbacks_before,
        "Redis answered every check of the burst"
    );

    // The native answer says how the window stands.
    let refusal = a.check_key(&key).await.expect("check");
    assert_eq!(reason(&refusal), Reason::RateLimited);
    assert_eq!(refusal.http_status, 429);
    assert!(refusal.retry_after.is_some());
    assert_eq!(refusal.limits.len(), 1);
    assert_eq!(refusal.limits[0].name, "burst");
    assert_eq!(refusal.limits[0].remaining, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_checks_fall_back_to_local_limits_and_recover_when_it_returns() {
    let mut redis = PrivateRedis::start().await;
    let app = spawn_app_with(&["--redis-url", &redis.url(), "--redis-timeout", "50ms"]).await;
    let stats = || app.replica.checker().rate_limiter().stats();
    // Until Redis is connected, checks already fall back; wait for it with
    // another key, so that this one is counted by Redis alone at first.
    let warm_up = mint_limited(&app, vec![window("burst", 1000, 60)], None)
        .await
        .secret;
    eventually(Duration::from_secs(5), || async {
        app.check_key(&warm_up).await.ok()?;
        (stats().redis_checks() > 0).then_some(())
    })
    .await
    .expect("redis answers");
    let key = mint_limited(&app, vec![window("burst", 3, 60)], None)
        .await
        .secret;
    assert!(app.check_key(&key).await.expect("check").allowed);

    redis.stop().await;
    let fallbacks = stats().fallbacks();
    // Checks go on, limited by this replica alone (it saw none of the key's
    // uses so far): 3 per minute.
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(reason(
            &app.check_key(&key).await.expect("a check, not an error"),
        ));
    }
    assert!(
        stats().fallbacks() >= fallbacks + 5,
        "each fallback is counted"
    );
    assert_eq!(
        answers.iter().filter(|r| **r == Reason::Ok).count(),
        3,
        "{answers:?}"
    );
    assert_eq!(
        answers
            .iter()
            .filter(|r| **r == Reason::RateLimited)
            .count(),
        2
    );

    redis.start_again().await;
    let before = stats().redis_checks();
    eventually(Duration::from_secs(10), || async {
        app.check_key(&key).await.ok()?;
        (stats().redis_checks() > before).then_some(())
    })
    .await
    .expect("Redis answers again, without a restart");
}

#[tokio::test]
async fn the_local_backend_holds_each_replica_to_its_share() {
    // Two replicas, each with half of a limit of 10: the cluster allows
    // between 5 (all traffic on one replica) and 10 (spread evenly).
    let a = spawn_app_with(&["--rate-limit-local-share", "0.5"]).await;
    let b = spawn_replica(&a, &["--rate-limit-local-share", "0.5"]).await;
    let key = mint_limited(&a, vec![window("burst", 10, 60)], None)
        .await
        .secret;
    let (on_one, _, _) = burst(&[&a], &key, 20, Reason::RateLimited).await;
    assert_eq!(on_one, 5, "all on one replica: its half");
    let other = mint_limited(&a, vec![window("burst", 10, 60)], None)
        .await
        .secret;
    let (spread, _, _) = burst(&[&a, &b], &other, 40, Reason::RateLimited).await;
    assert_eq!(spread, 10, "spread over both: the whole limit, no more");
}

#[tokio::test]
async fn a_refused_key_spends_no_quota() {
    let app = spawn_app_with(&[]).await;
    let key = mint_limited(&app, vec![window("burst", 1, 60)], credits(1))
        .await
        .secret;
    for _ in 0..3 {
        let resp = app
            .check(pb::CheckRequest {
                key: key.clone(),
                required_scopes: vec!["invoices:write".into()],
                ..Default::default()
            })
            .await
            .expect("check");
        assert_eq!(reason(&resp), Reason::ScopeMissing);
    }
    let resp = app.check_key(&key).await.expect("check");
    assert!(
        resp.allowed,
        "neither the limit nor the credit was spent: {resp:?}"
    );
    assert_eq!(resp.credits_remaining, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_are_spent_exactly_across_replicas_and_reservations_go_back_at_shutdown() {
    let mut a = spawn_app_with(&[]).await;
    let mut b = spawn_replica(&a, &[]).await;
    let key = mint_limited(&a, vec![], credits(100)).await;
    let bucket = key.key.as_ref().expect("key").id.clone();
    let (allowed, exceeded, _) = burst(&[&a, &b], &key.secret, 300, Reason::UsageExceeded).await;
    assert_eq!(allowed, 100, "exactly the credits, across both replicas");
    assert_eq!(exceeded, 200);
    let refused = a.check_key(&key.secret).await.expect("check");
    assert_eq!(refused.http_status, 429);
    assert_eq!(refused.credits_remaining, Some(0));

    // A bucket with plenty: each replica holds a block; shutdown gives the
    // unspent part back.
    let big = mint_limited(&a, vec![], credits(10_000)).await;
    let big_bucket = big.key.as_ref().expect("key").id.clone();
    for replica in [&a, &b] {
        for _ in 0..25 {
            assert!(replica.check_key(&big.secret).await.expect("check").allowed);
        }
    }
    let remaining = |bucket: String| {
        let db = a.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT remaining FROM credits WHERE bucket_id = $1::uuid")
                .bind(bucket)
                .fetch_one(&db)
                .await
                .expect("credits row")
        }
    };
    let reserved = remaining(big_bucket.clone()).await;
    assert!(
        reserved < 10_000 - 50,
        "blocks are reserved ahead: {reserved}"
    );
    let db = a.db.clone();
    b.stop().await;
    a.stop().await;
    let after: i64 = sqlx::query_scalar("SELECT remaining FROM credits WHERE bucket_id = $1::uuid")
        .bind(&big_bucket)
        .fetch_one(&db)
        .await
        .expect("credits row");
    assert_eq!(after, 10_000 - 50, "what was not spent went back");
    let spent: i64 = sqlx::query_scalar("SELECT remaining FROM credits WHERE bucket_id = $1::uuid")
        .bind(&bucket)
        .fetch_one(&db)
        .await
        .expect("credits row");
    assert_eq!(spent, 0);
}

#[tokio::test]
async fn a_monthly_refill_is_applied_on_the_first_check_of_the_new_month() {
    let clock = ManualClock::starting_now();
    let app = spawn_app_with_clock(&[], clock.clone()).await;
    let key = mint_limited(
        &app,
        vec![],
        Some(pb::Credits {
            remaining: 2,
            refill: Some(pb::credits::Refill {
                interval: pb::credits::refill::Interval::Monthly.into(),
                amount: 5,
            }),
        }),
    )
    .await;
    for _ in 0..2 {
        assert!(app.check_key(&key.secret).await.expect("check").allowed);
    }
    let spent = app.check_key(&key.secret).await.expect("check");
    assert_eq!(reason(&spent), Reason::UsageExceeded);
    let now = Utc::now();
    let next_month = if now.month() == 12 {
        Utc.with_ymd_and_hms(now.year() + 1, 1, 1, 0, 0, 0)
    } else {
        Utc.with_ymd_and_hms(now.year(), now.month() + 1, 1, 0, 0, 0)
    }
    .unwrap();
    let wait = spent.retry_after.expect("retry after the refill");
    let until_refill = (next_month - now).num_seconds();
    assert!(
        (wait.seconds - until_refill).abs() <= 2,
        "{wait:?} vs {until_refill}s"
    );

    // The first check of the next month refills, without any scheduler.
    clock.set(next_month + chrono::Duration::seconds(1));
    let refilled = app.check_key(&key.secret).await.expect("check");
    assert!(refilled.allowed, "{refilled:?}");
    assert_eq!(refilled.credits_remaining, Some(4));
    let refilled_at: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT refilled_at FROM credits WHERE bucket_id = $1::uuid")
            .bind(key.key.expect("key").id)
            .fetch_one(&app.db)
            .await
            .expect("credits row");
    assert_eq!(refilled_at, next_month);
}

#[tokio::test]
async fn rotation_keeps_the_buckets_and_the_remaining_credits() {
    let app = spawn_app_with(&[]).await;
    let old = mint_limited(&app, vec![window("burst", 3, 60)], credits(10)).await;
    for _ in 0..2 {
        assert!(app.check_key(&old.secret).await.expect("check").allowed);
    }
    let rotated = app
        .keys
        .clone()
        .rotate(app.admin(pb::RotateRequest {
            id: old.key.expect("key").id,
            grace: None,
        }))
        .await
        .expect("rotate")
        .into_inner();
    let new = rotated.key.expect("new key");
    assert_eq!(new.rate_limits.len(), 1);
    assert!(new.credits.is_some(), "the credits are shared");
    let resp = app.check_key(&rotated.secret).await.expect("check");
    assert!(resp.allowed);
    assert_eq!(
        resp.limits[0].remaining, 0,
        "the third use of the same bucket"
    );
    assert_eq!(resp.credits_remaining, Some(7));
    let resp = app.check_key(&old.secret).await.expect("check");
    assert_eq!(
        reason(&resp),
        Reason::RateLimited,
        "the old key shares the bucket"
    );
}

#[tokio::test]
async fn admins_set_and_add_credits_and_get_shows_what_remains() {
    let app = spawn_app_with(&[]).await;
    let key = mint_limited(&app, vec![], credits(1)).await;
    let id = key.key.expect("key").id;
    assert!(app.check_key(&key.secret).await.expect("check").allowed);
    assert_eq!(
        reason(&app.check_key(&key.secret).await.expect("check")),
        Reason::UsageExceeded
    );

    let update = |mask: &str, key: Option<pb::ApiKey>, add: i64| pb::UpdateRequest {
        id: id.clone(),
        key,
        update_mask: Some(prost_types::FieldMask {
            paths: vec![mask.to_owned()],
        }),
        add_credits: add,
    };
    app.keys
        .clone()
        .update(app.admin(update("add_credits", None, 5)))
        .await
        .expect("add credits");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        app.check_key(&key.secret).await.expect("check").allowed,
        "added credits count"
    );
    let set = pb::ApiKey {
        credits: credits(50),
        ..Default::default()
    };
    app.keys
        .clone()
        .update(app.admin(update("credits", Some(set), 0)))
        .await
        .expect("set credits");
    let resp = app.check_key(&key.secret).await.expect("check");
    assert!(resp.allowed);
    assert_eq!(
        resp.credits_remaining,
        Some(49),
        "the set replaced the balance at once"
    );
    let shown = app.get(&id).await;
    assert!(shown.credits.expect("credits").remaining <= 49);
}
