//! Scenario 6: End to end through the real Envoy.

use std::time::Duration;

use crate::{Ctx, Samples, Suite, e2e, k, servers::Server, us, verdict};

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    let Ctx {
        kw,
        empty,
        url,
        repo,
        ..
    } = ctx;
    let hot = ctx.hot();
    eprintln!("6. end to end through Envoy");
    let a = &suite.args;
    let shaped = Server::empty_with(
        &a.empty,
        "empty, keyward-shaped answer",
        "current-thread",
        &["--answer", "keyward-shaped"],
    )
    .await;
    let kw_bare = Server::keyward(
        &a.keyward,
        "keyward, no dynamic metadata",
        url,
        &["--envoy-dynamic-metadata", "false"],
    )
    .await;
    let envoy_kw = e2e::Envoy::start(&a.envoy, repo, kw.addr.port()).await;
    let envoy_empty = e2e::Envoy::start(&a.envoy, repo, empty.addr.port()).await;
    let envoy_shaped = e2e::Envoy::start(&a.envoy, repo, shaped.addr.port()).await;
    let envoy_bare = e2e::Envoy::start(&a.envoy, repo, kw_bare.addr.port()).await;
    let keys_file = suite.tmp.join("hot-keys.txt");
    std::fs::write(&keys_file, hot.join("\n")).expect("keys file");
    let script = e2e::write_script(&suite.tmp, &keys_file);
    // c32: keyward, the empty baseline, the baseline answering with
    // keyward's allow shape, and keyward without dynamic metadata; c1:
    // keyward and the baseline.
    for (conns, targets) in [
        (
            32,
            vec![&envoy_kw, &envoy_empty, &envoy_shaped, &envoy_bare],
        ),
        (1, vec![&envoy_kw, &envoy_empty]),
    ] {
        let servers = [kw, empty, &shaped, &kw_bare];
        let mut samples = vec![Samples::default(); targets.len()];
        let mut p99 = vec![Duration::ZERO; targets.len()];
        // CPU per request: (Envoy, authorization server), summed over reps.
        let mut cpu = vec![(Duration::ZERO, Duration::ZERO, 0u64); targets.len()];
        for _ in 0..a.reps {
            for (i, envoy) in targets.iter().enumerate() {
                let url = format!("http://127.0.0.1:{}/billing/invoices", envoy.port);
                let _ = e2e::wrk(&a.wrk, &url, Some(&script), conns, a.warmup).await;
                let (envoy0, authz0) = (envoy.cpu_time(), servers[i].cpu_time());
                let run = e2e::wrk(&a.wrk, &url, Some(&script), conns, a.duration).await;
                cpu[i].0 += envoy.cpu_time() - envoy0;
                cpu[i].1 += servers[i].cpu_time() - authz0;
                cpu[i].2 += run.requests;
                assert_eq!(run.non_2xx, 0, "every request should reach the upstream");
                samples[i].0.push(run.rps);
                p99[i] = p99[i].max(run.p99);
            }
        }
        let split = |i: usize| {
            let n = cpu[i].2.max(1) as f64;
            format!(
                "CPU/req Envoy {} + authz {}",
                us(cpu[i].0.div_f64(n)),
                us(cpu[i].1.div_f64(n))
            )
        };
        let ratio = |i: usize| samples[i].median() / samples[1].median();
        suite.table.row(
            "Envoy → keyward vs Envoy → empty, 10,000 keys",
            &format!("wrk c{conns}"),
            format!("{}, p99 {}, {}", samples[0].rate(), us(p99[0]), split(0)),
            format!("{}, p99 {}, {}", samples[1].rate(), us(p99[1]), split(1)),
            format!("{:.2}", ratio(0)),
            &if conns == 32 {
                format!("≥ 0.97: {}", verdict(ratio(0) >= 0.97))
            } else {
                "—".to_owned()
            },
        );
        if targets.len() == 4 {
            suite.table.row(
                "… Envoy → empty answering with keyward's allow shape",
                &format!("wrk c{conns}"),
                "—".into(),
                format!("{}, p99 {}, {}", samples[2].rate(), us(p99[2]), split(2)),
                format!("{:.2}", ratio(2)),
                "—",
            );
            suite.table.row(
                "… Envoy → keyward --envoy-dynamic-metadata false",
                &format!("wrk c{conns}"),
                format!("{}, p99 {}, {}", samples[3].rate(), us(p99[3]), split(3)),
                "(as above)".into(),
                format!("{:.2}", ratio(3)),
                "—",
            );
        }
    }
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
    drop((
        envoy_kw,
        envoy_empty,
        envoy_shaped,
        envoy_bare,
        shaped,
        kw_bare,
    ));
}
