//! Scenario 2: Cache misses: keys this keyward has never seen, each used once.

use std::{sync::Arc, time::Duration};

use crate::{
    Ctx, HOT, Suite, all_allowed,
    frames::{Door, frame},
    h2gen, k, lat,
    latency::Client,
    servers::Server,
    us, verdict,
};

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    let Ctx {
        kw, url, secrets, ..
    } = ctx;
    eprintln!("2. cache-miss checks");
    let a = &suite.args;
    let cold = &secrets[HOT..];
    let (cold_lat, cold_rest) = cold.split_at(cold.len().min(100_000) / 2);
    let (cold_lat, cold_quiet) = cold_lat.split_at(cold_lat.len() / 2);
    let mut client = Client::connect(kw.addr, Door::Keyward).await;
    let miss = client
        .measure(cold_lat, true, true, Duration::ZERO, a.duration * 2)
        .await;
    // The same, on a keyward that writes no usage: every cold key's
    // first use is a row to write; do those writes slow the lookups?
    let quiet = Server::keyward(
        &a.keyward,
        "keyward, usage writes off",
        url,
        &["--usage-flush-interval", "1h"],
    )
    .await;
    let mut client = Client::connect(quiet.addr, Door::Keyward).await;
    let miss_quiet = client
        .measure(cold_quiet, true, true, Duration::ZERO, a.duration * 2)
        .await;
    drop(quiet);
    suite.table.row(
        "cache miss latency (one indexed SELECT), CheckService.Check",
        &format!("tonic c1m1, {} cold keys", miss.calls),
        lat(&miss),
        "—".into(),
        "—".into(),
        &format!(
            "p99 ≤ 2 ms: {}",
            verdict(miss.p99 <= Duration::from_millis(2))
        ),
    );
    suite.table.row(
        "… the same with usage writes off (--usage-flush-interval 1h)",
        &format!("tonic c1m1, {} cold keys", miss_quiet.calls),
        lat(&miss_quiet),
        "—".into(),
        "—".into(),
        "—",
    );
    let miss_frames = Arc::new(
        cold_rest
            .iter()
            .map(|k| frame(Door::Keyward, k))
            .collect::<Vec<_>>(),
    );
    let cpu0 = kw.cpu_time();
    let run = h2gen::run(
        kw.addr,
        Door::Keyward,
        miss_frames,
        true,
        8,
        8,
        Duration::ZERO,
        a.duration * 2,
    )
    .await;
    all_allowed("keyward", &run);
    let calls = run.allowed;
    suite.table.row(
        "cache miss throughput, CheckService.Check",
        &format!("h2gen c8m8, {calls} cold keys"),
        format!(
            "{}, {} CPU/call",
            k(run.rps),
            us((kw.cpu_time() - cpu0).div_f64(calls.max(1) as f64))
        ),
        "—".into(),
        "—".into(),
        "—",
    );
}
