//! Scenario 6: end to end through the real Envoy (one worker, pinned to the
//! server core with the authorization server), wrk on the load core.
//!
//! Each row is a pair measured alternately: keyward behind Envoy, and an
//! empty authorization server behind an identical Envoy answering with a
//! constant response of the same shape (the same headers to set and remove,
//! the same dynamic metadata, the same RateLimit headers for the client), so
//! the ratio shows what keyward's own work costs end to end, not what Envoy
//! spends applying any answer.

use std::{path::Path, time::Duration};

use crate::{Ctx, Samples, Suite, e2e, k, servers::Server, us, verdict};

/// One side of a pair: Envoy in front of an authorization server.
struct Side<'a> {
    envoy: &'a e2e::Envoy,
    server: &'a Server,
    script: &'a Path,
}

struct Measured {
    rps: Samples,
    p99: Duration,
    /// CPU per request: Envoy's, the authorization server's.
    cpu: (Duration, Duration),
}

async fn measure(suite: &Suite, sides: [&Side<'_>; 2], conns: usize) -> [Measured; 2] {
    let a = &suite.args;
    let mut out: [(Samples, Duration, Duration, Duration, u64); 2] = Default::default();
    for _ in 0..a.reps {
        for (i, side) in sides.iter().enumerate() {
            let url = format!("http://127.0.0.1:{}/billing/invoices", side.envoy.port);
            let _ = e2e::wrk(&a.wrk, &url, Some(side.script), conns, a.warmup).await;
            let (envoy0, authz0) = (side.envoy.cpu_time(), side.server.cpu_time());
            let run = e2e::wrk(&a.wrk, &url, Some(side.script), conns, a.duration).await;
            assert_eq!(run.non_2xx, 0, "every request should reach the upstream");
            let o = &mut out[i];
            o.0.0.push(run.rps);
            o.1 = o.1.max(run.p99);
            o.2 += side.envoy.cpu_time() - envoy0;
            o.3 += side.server.cpu_time() - authz0;
            o.4 += run.requests;
        }
    }
    out.map(|(rps, p99, envoy, authz, n)| {
        let n = n.max(1) as f64;
        Measured {
            rps,
            p99,
            cpu: (envoy.div_f64(n), authz.div_f64(n)),
        }
    })
}

fn show(m: &Measured) -> String {
    format!(
        "{}, p99 {}, CPU/req Envoy {} + authz {}",
        m.rps.rate(),
        us(m.p99),
        us(m.cpu.0),
        us(m.cpu.1)
    )
}

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    eprintln!("6. end to end through Envoy");
    let a = &suite.args;
    let shaped = Server::empty_with(
        &a.empty,
        "empty, keyward-shaped answer",
        "current-thread",
        &["--answer", "keyward-shaped"],
    )
    .await;
    let shaped_limited = Server::empty_with(
        &a.empty,
        "empty, keyward-shaped answer with RateLimit headers",
        "current-thread",
        &["--answer", "keyward-shaped-limited"],
    )
    .await;
    let envoy_kw = e2e::Envoy::start(&a.envoy, &ctx.repo, ctx.kw.addr.port()).await;
    let envoy_empty = e2e::Envoy::start(&a.envoy, &ctx.repo, ctx.empty.addr.port()).await;
    let envoy_shaped = e2e::Envoy::start(&a.envoy, &ctx.repo, shaped.addr.port()).await;
    let envoy_limited = e2e::Envoy::start(&a.envoy, &ctx.repo, shaped_limited.addr.port()).await;
    let hot_file = suite.tmp.join("hot-keys.txt");
    std::fs::write(&hot_file, ctx.hot().join("\n")).expect("keys file");
    let hot_script = e2e::write_script(&suite.tmp, &hot_file, "hot");
    let limited_file = suite.tmp.join("limited-keys.txt");
    std::fs::write(&limited_file, ctx.limited.join("\n")).expect("keys file");
    let limited_script = e2e::write_script(&suite.tmp, &limited_file, "limited");

    let side = |envoy, server, script| Side {
        envoy,
        server,
        script,
    };
    let keyward = side(&envoy_kw, &ctx.kw, &hot_script);
    let keyward_limited = side(&envoy_kw, &ctx.kw, &limited_script);
    let empty = side(&envoy_empty, &ctx.empty, &hot_script);
    let empty_shaped = side(&envoy_shaped, &shaped, &hot_script);
    let empty_limited = side(&envoy_limited, &shaped_limited, &hot_script);

    let [kw, base] = measure(suite, [&keyward, &empty_shaped], 32).await;
    let ratio = kw.rps.median() / base.rps.median();
    suite.table.row(
        "Envoy → keyward vs Envoy → empty answering in keyward's shape, 10,000 keys",
        "wrk c32",
        show(&kw),
        show(&base),
        format!("{ratio:.2}"),
        &format!("≥ 0.95: {}", verdict(ratio >= 0.95)),
    );
    let [kw_l, base_l] = measure(suite, [&keyward_limited, &empty_limited], 32).await;
    let ratio = kw_l.rps.median() / base_l.rps.median();
    suite.table.row(
        "… keys with rate limits (RateLimit headers on every answer) vs the same shape",
        "wrk c32",
        show(&kw_l),
        show(&base_l),
        format!("{ratio:.2}"),
        &format!("≥ 0.95: {}", verdict(ratio >= 0.95)),
    );
    let [kw_bare, base_bare] = measure(suite, [&keyward, &empty], 32).await;
    suite.table.row(
        "reference: Envoy → keyward vs Envoy → empty answering OK only",
        "wrk c32",
        show(&kw_bare),
        show(&base_bare),
        format!("{:.2}", kw_bare.rps.median() / base_bare.rps.median()),
        "—",
    );
    let [kw_1, base_1] = measure(suite, [&keyward, &empty_shaped], 1).await;
    suite.table.row(
        "Envoy → keyward vs Envoy → empty in keyward's shape, one connection",
        "wrk c1",
        show(&kw_1),
        show(&base_1),
        format!("{:.2}", kw_1.rps.median() / base_1.rps.median()),
        "—",
    );
    let public = e2e::wrk(
        &a.wrk,
        &format!("http://127.0.0.1:{}/public/status", envoy_kw.port),
        None,
        32,
        a.duration,
    )
    .await;
    suite.table.row(
        "reference: Envoy without ext_authz (/public)",
        "wrk c32",
        "—".into(),
        k(public.rps),
        "—".into(),
        "—",
    );
    drop((envoy_kw, envoy_empty, envoy_shaped, envoy_limited));
    drop((shaped, shaped_limited));
}
