//! Scenario 3: Invalid keys: bad checksums, unknown well-formed keys, and a mix.

use std::sync::Arc;

use crate::{
    Ctx, HOT, Samples, Suite, all_allowed,
    frames::{Door, bad_checksum, envoy_check_from, frame, grpc_frame},
    h2gen,
};

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    let Ctx {
        kw, empty, unknown, ..
    } = ctx;
    let hot = ctx.hot();
    eprintln!("3. invalid keys");
    let bad = suite.write_frame("bad", &frame(Door::Envoy, &bad_checksum(&hot[1])));
    let unk = suite.write_frame("unknown", &frame(Door::Envoy, &unknown[1]));
    let baseline = match suite.empty_h2load.clone() {
        Some(b) => b,
        None => {
            let hot_frame = suite.write_frame("hot", &frame(Door::Envoy, &hot[0]));
            suite
                .h2load(&[empty], Door::Envoy, &hot_frame, 8, 8)
                .await
                .remove(0)
        }
    };
    for (figure, file) in [
        ("bad checksum (refused before any lookup)", &bad),
        ("unknown well-formed key (negative cache)", &unk),
    ] {
        let r = suite.h2load(&[kw], Door::Envoy, file, 8, 8).await;
        suite.ratio_row(
            figure,
            "h2load c8m8",
            &r[0],
            &baseline,
            "empty current_thread (row 1)",
            None,
        );
    }
    filter_negative(suite, ctx).await;
    let mix = Arc::new(
        (0..HOT)
            .map(|i| match i % 3 {
                0 => frame(Door::Envoy, &hot[i]),
                1 => frame(Door::Envoy, &bad_checksum(&hot[i])),
                _ => frame(Door::Envoy, &unknown[i]),
            })
            .collect::<Vec<_>>(),
    );
    let r = suite
        .h2gen(&[kw], Door::Envoy, &mix, 8, 8, |name, run| {
            assert_eq!(run.failed, 0, "{name}: failures");
            let share = run.allowed as f64 / (run.allowed + run.denied).max(1) as f64;
            assert!(
                (0.30..0.37).contains(&share),
                "keyward allowed {share:.2} of the mix, not a third"
            );
        })
        .await;
    let baseline = match suite.empty_h2gen.clone() {
        Some(b) => b,
        None => suite
            .h2gen(&[empty], Door::Envoy, &mix, 8, 8, all_allowed)
            .await
            .remove(0),
    };
    suite.ratio_row(
        "mix: ⅓ valid, ⅓ bad checksum, ⅓ unknown",
        "h2gen c8m8",
        &r[0],
        &baseline,
        "empty current_thread (10,000 keys row)",
        None,
    );
}

/// Never-minted keys the membership filter rules out, against cache hits on
/// the same server, interleaved: what refusing a forgery costs next to
/// allowing a real key. 10,000 distinct keys round-robin, each from its own
/// address; past the first lookups (the budget for keys minted elsewhere a
/// moment ago) none reaches the store or the negative cache.
async fn filter_negative(suite: &mut Suite, ctx: &Ctx) {
    let a = &suite.args;
    let hot = ctx.hot_frames(Door::Envoy);
    let forged = Arc::new(
        ctx.unknown
            .iter()
            .enumerate()
            .map(|(i, key)| {
                grpc_frame(&envoy_check_from(
                    key,
                    &format!("10.{}.{}.{}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff),
                ))
            })
            .collect::<Vec<_>>(),
    );
    let (mut hits, mut refused) = (Samples::default(), Samples::default());
    let (mut hit_cpu, mut refused_cpu) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for _ in 0..a.reps {
        for (frames, out, cpu, all_denied) in [
            (&hot, &mut hits, &mut hit_cpu, false),
            (&forged, &mut refused, &mut refused_cpu, true),
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
            assert_eq!(run.failed, 0, "keyward: failures");
            if all_denied {
                assert_eq!(run.allowed, 0, "a never-minted key was allowed");
            } else {
                all_allowed("keyward", &run);
            }
            *cpu +=
                (ctx.kw.cpu_time() - cpu0).div_f64(run.rps * (a.warmup + a.duration).as_secs_f64());
            out.0.push(run.rps);
        }
    }
    let reps = u32::try_from(a.reps).expect("reps");
    suite.ratio_row(
        "unknown keys the membership filter rules out (10,000 distinct)",
        "h2gen c8m8",
        &(refused, refused_cpu / reps),
        &(hits, hit_cpu / reps),
        "keyward cache hits (10,000 keys)",
        Some(0.95),
    );
}
