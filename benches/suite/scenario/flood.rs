//! Scenario 7: A forged-key flood beside valid traffic.
//!
//! Valid cache hits are offered at half of keyward's top rate (paced, so the
//! offered load is the same with and without the flood), while a flood of
//! distinct forged well-formed keys, each from its own address, runs on its
//! own connections at the generator's top rate. The flood runs in a child
//! process at the lowest CPU priority on the generator core, so it takes
//! what the valid generator leaves of that core rather than slowing it.
//! The figure: valid checks answered with the flood, over without; and what
//! the flood cost the database.

use std::{process::Stdio, sync::Arc, time::Duration};

use sqlx::{Connection as _, PgConnection};
use tokio::process::Command;

use crate::{
    Ctx, Samples, Suite, all_allowed,
    frames::{Door, envoy_check_from, grpc_frame, write_frames},
    h2gen, k,
};

const FORGED: usize = 10_000;

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    eprintln!("7. forged-key flood beside valid cache hits");
    let a = &suite.args;
    let hot = ctx.hot_frames(Door::Envoy);
    let top = h2gen::run(
        ctx.kw.addr,
        Door::Envoy,
        hot.clone(),
        false,
        8,
        8,
        a.warmup,
        a.duration,
    )
    .await;
    all_allowed("keyward", &top);
    let rate = top.rps / 2.0;

    let forged: Vec<_> = ctx
        .unknown
        .iter()
        .take(FORGED)
        .enumerate()
        .map(|(i, key)| {
            grpc_frame(&envoy_check_from(
                key,
                &format!("10.{}.{}.{}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff),
            ))
        })
        .collect();
    let frames_file = suite.tmp.join("forged.bin");
    write_frames(&frames_file, &forged);

    let mut alone = Samples::default();
    let mut beside = Samples::default();
    let mut flood_rates = Samples::default();
    let mut statements = Samples::default();
    let mut conn = PgConnection::connect(&ctx.url).await.expect("connect");
    for _ in 0..a.reps {
        let run = h2gen::run_paced(
            ctx.kw.addr,
            Door::Envoy,
            hot.clone(),
            false,
            8,
            32,
            a.warmup,
            a.duration,
            Some(rate),
        )
        .await;
        all_allowed("keyward (no flood)", &run);
        alone.0.push(run.rps);

        let flood = spawn_flood(
            ctx,
            &frames_file,
            a.warmup + a.duration + Duration::from_secs(1),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let xact0 = transactions(&mut conn).await;
        let run = h2gen::run_paced(
            ctx.kw.addr,
            Door::Envoy,
            hot.clone(),
            false,
            8,
            32,
            a.warmup,
            a.duration,
            Some(rate),
        )
        .await;
        let xact = transactions(&mut conn).await - xact0;
        all_allowed("keyward (beside the flood)", &run);
        beside.0.push(run.rps);
        statements
            .0
            .push(xact as f64 / (a.warmup + a.duration).as_secs_f64());
        let out = flood.wait_with_output().await.expect("flood process");
        let text = String::from_utf8_lossy(&out.stdout);
        let flood_rps: f64 = text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("flood output: {text}"));
        flood_rates.0.push(flood_rps);
    }
    let ratio = beside.median() / alone.median();
    suite.table.row(
        "valid cache hits beside a forged-key flood (10,000 distinct keys, each from its own address)",
        &format!("h2gen paced at {} (half the top rate), c8m32; flood h2gen c4m16, its own connections", k(rate)),
        format!(
            "{} beside the flood ({} forged checks answered); {:.0} database transactions/s during it",
            beside.rate(),
            flood_rates.rate(),
            statements.median()
        ),
        format!("{} without the flood", alone.rate()),
        format!("{ratio:.2}"),
        &format!("≥ 0.90: {}", crate::verdict(ratio >= 0.90)),
    );
}

/// This benchmark binary again, as the flood generator, niced, on the
/// generator core.
fn spawn_flood(ctx: &Ctx, frames: &std::path::Path, run_for: Duration) -> tokio::process::Child {
    let me = std::env::current_exe().expect("the suite binary");
    Command::new("nice")
        .args(["-n", "19", "taskset", "-c", "1"])
        .arg(me)
        .args(["--keyward", "x", "--empty", "x", "--envoy", "x"])
        .arg("--flood-target")
        .arg(ctx.kw.addr.to_string())
        .arg("--flood-frames")
        .arg(frames)
        .arg("--flood-for")
        .arg(format!("{}ms", run_for.as_millis()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the flood")
}

/// Transactions committed in the bench database so far (every lookup is
/// one; usage writes and this query add a few).
async fn transactions(conn: &mut PgConnection) -> i64 {
    // The statistics are reported by backends when they go idle, at most
    // once a second; give them that second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(conn)
    .await
    .expect("pg_stat_database")
}

/// The flood process: round-robin over the forged frames until `run_for`
/// passes, then prints its rate (calls per second) alone on stdout.
pub async fn flood_main(target: std::net::SocketAddr, frames: &std::path::Path, run_for: Duration) {
    let frames = Arc::new(crate::frames::read_frames(frames));
    let run = h2gen::run(
        target,
        Door::Envoy,
        frames,
        false,
        4,
        16,
        Duration::ZERO,
        run_for,
    )
    .await;
    assert_eq!(run.failed, 0, "forged checks failed: {run:?}");
    assert_eq!(run.allowed, 0, "a forged key was allowed: {run:?}");
    println!("{}", run.rps);
}
