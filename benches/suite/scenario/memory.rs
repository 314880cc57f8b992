//! Scenario 5: Memory: a fresh keyward warmed with every seeded key.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    Ctx, Suite, all_allowed,
    frames::{Door, frame},
    h2gen,
    latency::Client,
    servers::Server,
    verdict,
};

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    let Ctx { url, secrets, .. } = ctx;
    let hot = ctx.hot();
    eprintln!("5. memory");
    let n = secrets.len();
    filter_memory(suite, ctx).await;
    let a = &suite.args;
    // Both cores: only its memory is measured here, and warming a million
    // keys through one core would take minutes.
    let mem = Server::keyward_on(
        &a.keyward,
        "0,1",
        "keyward (memory)",
        url,
        &[
            "--cache-max-bytes",
            "16GiB",
            "--db-max-connections",
            "16",
            "--db-check-connections",
            "12",
            // Usage writes are measured elsewhere; here they would only
            // slow the warm-up (every key's first use is written).
            "--usage-flush-interval",
            "1h",
        ],
    )
    .await;
    let mut client = Client::connect(mem.addr, Door::Keyward).await;
    assert!(client.allowed(&hot[0]).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = mem.rss();
    let frames_all = Arc::new(
        secrets
            .iter()
            .map(|k| frame(Door::Keyward, k))
            .collect::<Vec<_>>(),
    );
    let warm_started = Instant::now();
    let run = h2gen::run(
        mem.addr,
        Door::Keyward,
        frames_all,
        true,
        8,
        16,
        Duration::ZERO,
        Duration::from_secs(600),
    )
    .await;
    all_allowed("keyward (memory)", &run);
    let warm_time = warm_started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = mem.rss();
    let per_key = after.saturating_sub(before) as f64 / n as f64;
    suite.table.row(
        &format!("RSS per cached key ({n} keys warmed in {warm_time:.0?})"),
        "h2gen, each key once",
        format!(
            "{per_key:.0} B/key ({} MiB → {} MiB)",
            before >> 20,
            after >> 20
        ),
        "—".into(),
        "—".into(),
        &format!("≤ 1 KiB: {}", verdict(per_key <= 1024.0)),
    );
    drop(mem);
}

/// The membership filter's memory per key, loaded in this process from the
/// seeded table exactly as a replica loads it at start.
async fn filter_memory(suite: &mut Suite, ctx: &Ctx) {
    let store =
        keyward::store::Store::connect_lazy(&keyward::store::DbOptions::new(ctx.url.clone()))
            .expect("store");
    let filter = keyward::filter::KeyFilter::default();
    let t = Instant::now();
    filter.load(&store).await.expect("load the filter");
    let took = t.elapsed();
    let per_key = filter.bytes() as f64 / filter.items().max(1) as f64;
    suite.table.row(
        &format!(
            "membership filter per key ({} keys, loaded in {took:.1?})",
            filter.items()
        ),
        "streamed from the table",
        format!(
            "{per_key:.2} B/key ({:.1} MiB)",
            filter.bytes() as f64 / f64::from(1 << 20)
        ),
        "—".into(),
        "—".into(),
        &format!("a few bytes: {}", verdict(per_key <= 8.0)),
    );
}
