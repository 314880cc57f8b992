//! Usage: recorded in memory, written in batches, shown by Get and List.

use std::time::{Duration, Instant};

use keyward::pb;

use crate::helpers::{eventually, spawn_app_with};

#[tokio::test]
async fn last_used_at_appears_within_the_flush_interval_and_a_thousand_checks_write_a_handful_of_times()
 {
    const FLUSH: Duration = Duration::from_secs(1);
    let app = spawn_app_with(&["--usage-flush-interval", "1s"]).await;
    let minted = app.mint_for("acme").await;
    let id = minted.key.expect("key").id;
    assert!(app.get(&id).await.last_used_at.is_none(), "never used yet");
    let stats = app.replica.store().stats();
    let (writes_before, lookups_before) = (stats.usage_writes(), stats.key_lookups());

    let first_check = Instant::now();
    for _ in 0..1000 {
        assert!(app.check_key(&minted.secret).await.expect("check").allowed);
    }

    // last_used_at shows up within one flush interval (plus scheduling slack).
    let (_, waited) = eventually(FLUSH * 3, || async {
        app.get(&id).await.last_used_at.map(|_| ())
    })
    .await
    .expect("last_used_at was written");
    println!(
        "last_used_at written {:?} after the first check ({waited:?} after the last)",
        first_check.elapsed()
    );
    assert!(
        waited <= FLUSH + Duration::from_millis(500),
        "took {waited:?}"
    );

    // All 1000 uses are counted for today.
    let (key, _) = eventually(FLUSH * 3, || async {
        let key = app.get(&id).await;
        (key.daily_usage.first().map(|d| d.uses) == Some(1000)).then_some(key)
    })
    .await
    .expect("today's count reaches 1000");
    assert_eq!(key.daily_usage.len(), 1);
    assert_eq!(
        key.daily_usage[0].day,
        chrono::Utc::now().format("%Y-%m-%d").to_string()
    );

    let writes = stats.usage_writes() - writes_before;
    println!("1000 checks caused {writes} usage statement(s)");
    assert!((1..=5).contains(&writes), "{writes} usage statements");
    // Usage writes do not invalidate caches: the key was read once.
    assert_eq!(
        stats.key_lookups() - lookups_before,
        0,
        "served from cache throughout"
    );
}

#[tokio::test]
async fn denied_checks_are_not_counted_as_use() {
    let app = spawn_app_with(&["--usage-flush-interval", "100ms"]).await;
    let limited = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            resources: vec!["billing".into()],
            ..Default::default()
        })
        .await;
    let open = app.mint_for("acme").await;
    let check = |key: &str| pb::CheckRequest {
        key: key.into(),
        resource: "orders".into(),
        ..Default::default()
    };
    assert!(
        !app.check(check(&limited.secret))
            .await
            .expect("check")
            .allowed
    );
    assert!(app.check(check(&open.secret)).await.expect("check").allowed);

    // Once the allowed use has been written, the denied one would have been too.
    let open_id = open.key.expect("key").id;
    eventually(Duration::from_secs(3), || async {
        app.get(&open_id).await.last_used_at.map(|_| ())
    })
    .await
    .expect("the allowed use was written");
    let key = app.get(&limited.key.expect("key").id).await;
    assert!(key.last_used_at.is_none());
    assert!(key.daily_usage.is_empty());
}
