//! Scenario 8: what rate limits and credits cost.
//!
//! - Cache hits on keys with a local rate limit (never reached) against the
//!   same load on keys without one, on the same server, interleaved.
//! - One-stream latency of limited keys on the Redis backend against the
//!   local backend: what the Redis round trip adds at p99.
//! - PostgreSQL statements per 10,000 allowed credit-spending checks (row
//!   updates of the credits table, which only reservations make).

use std::{sync::Arc, time::Duration};

use sqlx::{Connection as _, PgConnection};

use crate::{
    Ctx, Samples, Suite, all_allowed,
    frames::{Door, frame},
    h2gen, lat,
    latency::{Client, Latency},
    seed,
    servers::Server,
    us, verdict,
};

/// Row updates of the credits table so far: only reservations make them.
/// A backend reports its statistics when it goes idle, at most once a
/// second, and otherwise 10 s after it went idle (PGSTAT_IDLE_INTERVAL):
/// `settle` waits that out so that every update is counted.
async fn credit_updates(conn: &mut PgConnection, settle: bool) -> i64 {
    if settle {
        tokio::time::sleep(Duration::from_millis(10_500)).await;
    }
    sqlx::query_scalar("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'credits'")
        .fetch_one(conn)
        .await
        .expect("pg_stat_user_tables")
}

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    eprintln!("8. rate limits and credits");
    let a = suite.args.clone();
    let limited = &ctx.limited;
    let hot = ctx.hot_frames(Door::Envoy);
    let limited_frames = Arc::new(
        limited
            .iter()
            .map(|k| frame(Door::Envoy, k))
            .collect::<Vec<_>>(),
    );
    let mut warm = Client::connect(ctx.kw.addr, Door::Envoy).await;
    for key in limited {
        assert!(warm.allowed(key).await, "a limited key was refused");
    }

    // (a) local limits against none.
    let (mut with, mut without) = (Samples::default(), Samples::default());
    let (mut with_cpu, mut without_cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..a.reps {
        for (frames, out, cpu) in [
            (&hot, &mut without, &mut without_cpu),
            (&limited_frames, &mut with, &mut with_cpu),
        ] {
            let cpu0 = ctx.kw.cpu_time();
            let run = h2gen::run(
                ctx.kw.addr,
                Door::Envoy,
                frames.clone(),
                false,
                8,
                8,
                a.warmup,
                a.duration,
            )
            .await;
            all_allowed("keyward", &run);
            *cpu +=
                (ctx.kw.cpu_time() - cpu0).div_f64(run.rps * (a.warmup + a.duration).as_secs_f64());
            out.0.push(run.rps);
        }
    }
    let reps = u32::try_from(a.reps).expect("reps");
    suite.ratio_row(
        "cache hit with a local rate limit (2 windows) on every key, 10,000 keys",
        "h2gen c8m8",
        &(with, with_cpu / reps),
        &(without, without_cpu / reps),
        "keyward, the same keys' load without limits",
        Some(0.95),
    );

    // (b) Redis against local, one stream.
    let redis_server = Server::redis("redis").await;
    let redis_url = format!("redis://{}", redis_server.addr);
    let redis = Server::keyward(
        &a.keyward,
        "keyward, redis rate limits",
        &ctx.url,
        &["--redis-url", &redis_url],
    )
    .await;
    let mut local_lat = Vec::new();
    let mut redis_lat = Vec::new();
    for server in [&redis] {
        let mut c = Client::connect(server.addr, Door::Envoy).await;
        for key in &limited[..1000] {
            assert!(c.allowed(key).await);
        }
    }
    for _ in 0..a.reps {
        for (server, out) in [(&ctx.kw, &mut local_lat), (&redis, &mut redis_lat)] {
            let mut c = Client::connect(server.addr, Door::Envoy).await;
            out.push(c.measure(limited, false, true, a.warmup, a.duration).await);
        }
    }
    let median = |v: &[Latency], f: fn(&Latency) -> Duration| {
        let mut d: Vec<Duration> = v.iter().map(f).collect();
        d.sort();
        d[d.len() / 2]
    };
    let mut probe = redis::Client::open(redis_url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the bench redis");
    let buckets: u64 = redis::cmd("DBSIZE")
        .query_async(&mut probe)
        .await
        .expect("DBSIZE");
    assert!(
        buckets >= 1000,
        "the Redis backend holds {buckets} windows: checks fell back to local limits"
    );
    let (local_p99, redis_p99) = (median(&local_lat, |l| l.p99), median(&redis_lat, |l| l.p99));
    let added = redis_p99.saturating_sub(local_p99);
    suite.table.row(
        "limited cache hit latency, Redis backend over local",
        "tonic c1m1, 10,000 limited keys",
        format!("redis {}", lat(&redis_lat[redis_lat.len() / 2])),
        format!("local {}", lat(&local_lat[local_lat.len() / 2])),
        format!("p99 +{}", us(added)),
        &format!(
            "p99 added ≤ 0.5 ms: {}",
            verdict(added <= Duration::from_micros(500))
        ),
    );
    drop(redis);
    drop(redis_server);

    // (c) Statements per 10,000 credit-spending checks.
    let credited = seed::seed_limited(&ctx.url, 1, None, Some(1_000_000)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = PgConnection::connect(&ctx.url).await.expect("connect");
    let before = credit_updates(&mut conn, true).await;
    let frames = Arc::new(vec![frame(Door::Envoy, &credited[0]); 10_000]);
    let run = h2gen::run(
        ctx.kw.addr,
        Door::Envoy,
        frames,
        true,
        8,
        8,
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await;
    all_allowed("keyward (credits)", &run);
    let statements = credit_updates(&mut conn, true).await - before;
    suite.table.row(
        "PostgreSQL statements per 10,000 allowed credit-spending checks",
        &format!(
            "h2gen c8m8, {} checks of one key with 1,000,000 credits",
            run.allowed
        ),
        format!("{statements} reservations (credits row updates)"),
        "—".into(),
        "—".into(),
        &format!("≤ 20: {}", verdict(statements <= 20)),
    );
}
