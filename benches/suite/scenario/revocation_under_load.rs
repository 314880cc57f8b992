//! Scenario 9: revocation while the replica that must refuse the key is
//! busy. Replica B (the suite's keyward, core 0) serves cache hits at half
//! its top rate; replica A (core 1, beside the driver) takes the Revoke.
//! Measured: from Revoke returning on A to B refusing the key, idle and
//! under that load, in one run.
//!
//! The watcher (the Revoke client and the client polling B) runs on a
//! thread and runtime of its own, not in the driver's runtime beside the
//! load generator's 256 streams: there each poll waited its turn behind the
//! load's own requests and answers, and the figure measured the driver.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use keyward::pb::{self, key_service_client::KeyServiceClient};
use tonic::transport::Channel;

use crate::{
    Ctx, Suite, all_allowed, frames::Door, grpc::with_key as admin, h2gen, k, latency::Client,
    servers::Server, verdict,
};

/// Longest wait for B to refuse one key.
const DEADLINE: Duration = Duration::from_secs(2);

/// Revokes each key through A and polls B until it refuses it: the delays
/// from Revoke returning.
async fn revoke_and_watch(
    a: &mut KeyServiceClient<Channel>,
    b: &mut Client,
    admin_key: &str,
    keys: &[(String, String)],
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(keys.len());
    for (id, secret) in keys {
        assert!(b.allowed(secret).await, "a key to revoke was refused first");
        a.revoke(admin(
            pb::RevokeRequest {
                id: id.clone(),
                reason: "bench".into(),
            },
            admin_key,
        ))
        .await
        .expect("revoke");
        let returned = Instant::now();
        while b.allowed(secret).await {
            assert!(
                returned.elapsed() < DEADLINE,
                "replica B never refused a revoked key"
            );
        }
        out.push(returned.elapsed());
    }
    out
}

/// [`revoke_and_watch`] on a thread and current-thread runtime of its own,
/// with clients connected there; the delays arrive when it is done, without
/// blocking the driver's runtime (which may be running the load).
async fn watch_on_own_thread(
    a: SocketAddr,
    b: SocketAddr,
    admin_key: String,
    keys: Vec<(String, String)>,
) -> Vec<Duration> {
    let (done, delays) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("revocation-watcher".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("watcher runtime");
            let out = runtime.block_on(async {
                let channel = Channel::from_shared(format!("http://{a}"))
                    .expect("uri")
                    .connect()
                    .await
                    .expect("connect to replica A");
                let mut a = KeyServiceClient::new(channel);
                let mut b = Client::connect(b, Door::Envoy).await;
                revoke_and_watch(&mut a, &mut b, &admin_key, &keys).await
            });
            let _ = done.send(out);
        })
        .expect("watcher thread");
    delays.await.expect("the watcher thread failed")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn figures(mut d: Vec<Duration>) -> (Duration, Duration, Duration) {
    d.sort();
    (
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        *d.last().expect("samples"),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    eprintln!("9. revocation under load");
    let args = suite.args.clone();
    let keys_per_phase = 200;
    let replica_a =
        Server::keyward_on(&args.keyward, "1", "keyward replica A", &ctx.url, &[]).await;
    let channel = Channel::from_shared(format!("http://{}", replica_a.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect to replica A");
    let mut a = KeyServiceClient::new(channel);
    let mut minted = Vec::with_capacity(2 * keys_per_phase);
    for _ in 0..2 * keys_per_phase {
        let resp = a
            .mint(admin(
                pb::MintRequest {
                    owner_id: "owner-0".into(),
                    // What the suite's Envoy frames ask for (frames.rs).
                    scopes: vec!["invoices:read".into()],
                    ..Default::default()
                },
                &ctx.admin_key,
            ))
            .await
            .expect("mint")
            .into_inner();
        minted.push((resp.key.expect("key").id, resp.secret));
    }
    let mut b = Client::connect(ctx.kw.addr, Door::Envoy).await;
    for (_, secret) in &minted {
        assert!(b.allowed(secret).await, "a minted key is refused on B");
    }
    let (idle_keys, loaded_keys) = minted.split_at(keys_per_phase);

    drop(b);
    let watch = |keys: &[(String, String)]| {
        watch_on_own_thread(
            replica_a.addr,
            ctx.kw.addr,
            ctx.admin_key.clone(),
            keys.to_vec(),
        )
    };
    let idle = watch(idle_keys).await;

    // B's top cache-hit rate, then half of it while keys are revoked.
    let hot = ctx.hot_frames(Door::Envoy);
    let top = h2gen::run(
        ctx.kw.addr,
        Door::Envoy,
        hot.clone(),
        false,
        8,
        8,
        args.warmup,
        args.duration,
    )
    .await;
    all_allowed("keyward (top rate)", &top);
    let rate = top.rps / 2.0;
    let load_for = args.warmup + DEADLINE * keys_per_phase as u32 / 20 + args.duration;
    let load = tokio::spawn(h2gen::run_paced(
        ctx.kw.addr,
        Door::Envoy,
        hot,
        false,
        8,
        32,
        Duration::ZERO,
        load_for,
        Some(rate),
    ));
    tokio::time::sleep(args.warmup).await;
    let started = Instant::now();
    let loaded = watch(loaded_keys).await;
    let watched = started.elapsed();
    assert!(
        !load.is_finished(),
        "the load ended before the revocations did: raise its duration"
    );
    let run = load.await.expect("load");
    all_allowed("keyward (paced load)", &run);
    drop(replica_a);

    let (idle50, idle99, _) = figures(idle);
    let (p50, p99, max) = figures(loaded);
    suite.table.row(
        "revocation under load: Revoke returned on replica A -> loaded replica B refuses",
        &format!(
            "h2gen c8m32 paced at half B's top rate ({} of {}), {keys_per_phase} keys in {:.1?}",
            k(rate),
            k(top.rps),
            watched
        ),
        format!("p50 {} · p99 {} · max {}", ms(p50), ms(p99), ms(max)),
        format!("idle B: p50 {} · p99 {}", ms(idle50), ms(idle99)),
        "—".into(),
        &format!("p99 ≤ 2 ms: {}", verdict(p99 <= Duration::from_millis(2))),
    );
}
