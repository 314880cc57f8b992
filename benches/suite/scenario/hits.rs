//! Scenario 1, cache hits: throughput (h2load, h2gen) and one-stream
//! latency against the empty server, and the runtime flavours.

use std::time::Duration;

use crate::{
    Ctx, Suite, all_allowed,
    frames::{Door, frame},
    latency::{Client, Latency},
    servers::Server,
    us, verdict,
};

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    let Ctx {
        kw,
        kw_mt,
        empty,
        empty_mt,
        ..
    } = ctx;
    let hot = ctx.hot();
    eprintln!("1. cache-hit checks");
    let one_key = suite.write_frame("hot", &frame(Door::Envoy, &hot[0]));
    let r = suite
        .h2load(&[kw, empty, kw_mt, empty_mt], Door::Envoy, &one_key, 8, 8)
        .await;
    suite.ratio_row(
        "cache hit, Authorization.Check, 1 key",
        "h2load c8m8",
        &r[0],
        &r[1],
        "empty current_thread",
        Some(0.95),
    );
    suite.ratio_row(
        "runtime: keyward multi_thread(1) / current_thread",
        "h2load c8m8",
        &r[2],
        &r[0],
        "keyward current_thread",
        None,
    );
    suite.ratio_row(
        "runtime: empty multi_thread(1) / current_thread",
        "h2load c8m8",
        &r[3],
        &r[1],
        "empty current_thread",
        None,
    );
    let h2load_empty = r[1].clone();
    suite.empty_h2load = Some(r[1].clone());
    baselines(suite, kw, empty, &one_key).await;
    let r = suite
        .h2load(&[kw, empty], Door::Envoy, &one_key, 1, 64)
        .await;
    suite.ratio_row(
        "cache hit, Authorization.Check, 1 key",
        "h2load c1m64",
        &r[0],
        &r[1],
        "empty current_thread",
        None,
    );

    let hot_envoy = ctx.hot_frames(Door::Envoy);
    let r = suite
        .h2gen(&[kw, empty], Door::Envoy, &hot_envoy, 8, 8, all_allowed)
        .await;
    suite.ratio_row(
        "cache hit, Authorization.Check, 10,000 keys",
        "h2gen c8m8",
        &r[0],
        &r[1],
        "empty current_thread",
        Some(0.95),
    );
    suite.empty_h2gen = Some(r[1].clone());
    suite.ratio_row(
        "load generator check: h2gen / h2load on the empty server",
        "c8m8",
        &r[1],
        &h2load_empty,
        "h2load",
        None,
    );
    let hot_keyward = ctx.hot_frames(Door::Keyward);
    let r = suite
        .h2gen(&[kw, empty], Door::Keyward, &hot_keyward, 8, 8, all_allowed)
        .await;
    suite.ratio_row(
        "cache hit, CheckService.Check, 10,000 keys",
        "h2gen c8m8",
        &r[0],
        &r[1],
        "empty current_thread",
        None,
    );

    let a = &suite.args;
    let mut lat_kw = Vec::new();
    let mut lat_empty = Vec::new();
    for _ in 0..a.reps {
        for (server, out) in [(kw, &mut lat_kw), (empty, &mut lat_empty)] {
            let mut client = Client::connect(server.addr, Door::Envoy).await;
            out.push(client.measure(hot, false, true, a.warmup, a.duration).await);
        }
    }
    let median_p = |v: &[Latency], f: fn(&Latency) -> Duration| {
        let mut d: Vec<Duration> = v.iter().map(f).collect();
        d.sort();
        d[d.len() / 2]
    };
    let (kw_p99, empty_p99) = (
        median_p(&lat_kw, |l| l.p99),
        median_p(&lat_empty, |l| l.p99),
    );
    let ratio = kw_p99.as_secs_f64() / empty_p99.as_secs_f64();
    let show = |v: &[Latency]| {
        format!(
            "p50 {} · p99 {} · p99.9 {}",
            us(median_p(v, |l| l.p50)),
            us(median_p(v, |l| l.p99)),
            us(median_p(v, |l| l.p999))
        )
    };
    suite.table.row(
        "cache hit latency, Authorization.Check, 10,000 keys",
        "tonic c1m1",
        show(&lat_kw),
        format!("empty current_thread {}", show(&lat_empty)),
        format!("p99 {ratio:.2}"),
        &format!("p99 ≤ 1.10: {}", verdict(ratio <= 1.10)),
    );
}

/// The baseline is the ceiling: the empty server as measured beside the
/// same server serving tonic's own TCP connections (no write coalescing),
/// beside it serving tonic's generated service (its `Check` is served on
/// hyper directly, as keyward's is), and beside an ext_authz server written the way the tonic example writes
/// one (`#[tokio::main]`, the generated service, `serve(addr)`), all built
/// with the same profile. And keyward beside the empty server giving
/// keyward's answer (identity headers, headers to remove, dynamic metadata:
/// about 360 bytes of response where the empty server's is 8): what is left
/// of the gap once the answer is the same. That server clones and encodes
/// the answer per call (as the generated service would), so the same answer encoded once (as
/// keyward sends a key's allow) tells what the bytes alone cost.
async fn baselines(suite: &mut Suite, kw: &Server, empty: &Server, one_key: &std::path::Path) {
    let shaped = Server::empty_with(
        &suite.args.empty,
        "empty, keyward-shaped answer",
        "current-thread",
        &["--answer", "keyward-shaped"],
    )
    .await;
    let shaped_once = Server::empty_with(
        &suite.args.empty,
        "empty, keyward-shaped answer encoded once",
        "current-thread",
        &["--answer", "keyward-shaped", "--encode-once", "true"],
    )
    .await;
    let plain = Server::empty_with(
        &suite.args.empty,
        "empty, tonic's connections",
        "current-thread",
        &["--coalescing", "false"],
    )
    .await;
    let generated = Server::empty_with(
        &suite.args.empty,
        "empty, tonic's generated service",
        "current-thread",
        &["--door", "tonic"],
    )
    .await;
    let example = match &suite.args.tonic_example {
        Some(bin) => Some(Server::plain(bin, "tonic example").await),
        None => None,
    };
    let mut targets = vec![kw, &shaped, &shaped_once, empty, &plain, &generated];
    targets.extend(example.as_ref());
    let r = suite.h2load(&targets, Door::Envoy, one_key, 8, 8).await;
    suite.ratio_row(
        "cache hit, 1 key, beside the empty server giving keyward's answer",
        "h2load c8m8",
        &r[0],
        &r[1],
        "empty, keyward-shaped answer",
        None,
    );
    suite.ratio_row(
        "cache hit, 1 key, beside the empty server giving keyward's answer encoded once",
        "h2load c8m8",
        &r[0],
        &r[2],
        "empty, keyward-shaped answer encoded once",
        None,
    );
    suite.ratio_row(
        "baseline: empty giving keyward's answer / empty",
        "h2load c8m8",
        &r[1],
        &r[3],
        "empty",
        None,
    );
    suite.ratio_row(
        "baseline: empty giving keyward's answer encoded once / empty",
        "h2load c8m8",
        &r[2],
        &r[3],
        "empty",
        None,
    );
    let r = &r[3..];
    suite.ratio_row(
        "baseline: empty / empty on tonic's own connections",
        "h2load c8m8",
        &r[0],
        &r[1],
        "empty, tonic's connections",
        None,
    );
    suite.ratio_row(
        "baseline: empty (Check on hyper) / empty through tonic's generated service",
        "h2load c8m8",
        &r[0],
        &r[2],
        "empty, tonic's generated service",
        None,
    );
    if example.is_some() {
        suite.ratio_row(
            "baseline: empty / the tonic example's way",
            "h2load c8m8",
            &r[0],
            &r[3],
            "tonic example",
            None,
        );
    }
}
