//! keyward as an attacker meets it: floods of forged keys, guessing from one
//! address, and connections that try to hold the server's resources.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use keyward::pb::{self, Reason, check_service_client::CheckServiceClient};
use tokio::net::TcpStream;
use tonic::{Code, transport::Channel};

use crate::helpers::{eventually, never_minted, reason, spawn_app_with};

const FORGED: usize = 50_000;

fn forged_check(i: usize) -> pb::CheckRequest {
    pb::CheckRequest {
        key: never_minted().expose_secret().to_owned(),
        // A botnet: every forged key from its own address, so no single
        // source trips brute-force protection and only the filter stands
        // between the flood and the database.
        client_ip: format!("10.{}.{}.{}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff),
        ..Default::default()
    }
}

/// The attacker's 64 checks in flight, on a runtime and a connection of
/// their own, as from another machine: on the test's runtime they would take
/// turns on the server's own threads, which no attacker can, and every
/// round trip of the Revoke measured beside them would wait behind them.
fn flood_from_elsewhere(
    addr: SocketAddr,
    next: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the flood's runtime");
        runtime.block_on(async move {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect");
            let flood: Vec<_> = (0..64)
                .map(|_| {
                    let mut checks = CheckServiceClient::new(channel.clone());
                    let (next, refused) = (next.clone(), refused.clone());
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                            if i >= FORGED {
                                return;
                            }
                            let resp = checks.check(forged_check(i)).await.expect("forged check");
                            assert_eq!(resp.into_inner().reason(), Reason::UnknownKey);
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for task in flood {
                task.await.expect("flood task");
            }
        });
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_keys_costs_no_lookups_and_blocks_neither_valid_keys_nor_revocation() {
    const RATE: u32 = 20;
    const BURST: u32 = 50;
    let app = spawn_app_with(&[
        "--unknown-key-lookups-per-second",
        &RATE.to_string(),
        "--unknown-key-lookup-burst",
        &BURST.to_string(),
    ])
    .await;
    let valid = app.mint_for("acme").await.secret;
    let doomed = app.mint_for("acme").await;
    let doomed_id = doomed.key.expect("key").id;
    assert!(app.check_key(&valid).await.expect("check").allowed);
    assert!(app.check_key(&doomed.secret).await.expect("check").allowed);
    let lookups_before = app.replica.store().stats().key_lookups();
    let started = Instant::now();

    // The flood: 50,000 distinct forged well-formed keys, 64 in flight, from
    // elsewhere (see `flood_from_elsewhere`).
    let next = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let flood = flood_from_elsewhere(app.addr, next.clone(), refused.clone());

    // Meanwhile: the valid key is allowed throughout, and a revocation
    // through the same replica returns promptly.
    let mut valid_checks = 0;
    let mut revoke_took = None;
    while !flood.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the flood has not ended after two minutes"
        );
        let resp = app
            .check_key(&valid)
            .await
            .expect("valid check during the flood");
        assert!(
            resp.allowed,
            "the valid key was refused during the flood: {resp:?}"
        );
        valid_checks += 1;
        if revoke_took.is_none() && next.load(Ordering::Relaxed) > FORGED as u64 / 2 {
            let t = Instant::now();
            app.revoke(&doomed_id).await;
            revoke_took = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    flood
        .join()
        .expect("the flood's checks all answered UNKNOWN_KEY");
    let elapsed = started.elapsed();
    let lookups = app.replica.store().stats().key_lookups() - lookups_before;
    let revoke_took = revoke_took.expect("revoked during the flood");
    println!(
        "{FORGED} forged keys in {elapsed:?}: {lookups} store lookups, {valid_checks} valid checks allowed, Revoke took {revoke_took:?}"
    );

    assert_eq!(refused.load(Ordering::Relaxed), FORGED as u64);
    let budget = u64::from(BURST) + (elapsed.as_secs_f64() * f64::from(RATE)).ceil() as u64;
    assert!(
        lookups <= budget,
        "{lookups} lookups for forged keys, over the budget of {budget}"
    );
    assert!(
        revoke_took < Duration::from_millis(100),
        "Revoke took {revoke_took:?} during the flood"
    );
    assert!(valid_checks > 0);
    let resp = app.check_key(&doomed.secret).await.expect("check");
    assert_eq!(reason(&resp), Reason::Revoked);
}

#[tokio::test]
async fn a_source_that_keeps_failing_is_refused_with_retry_after_and_others_are_unaffected() {
    let app = spawn_app_with(&[
        "--brute-force-threshold",
        "5",
        "--brute-force-cooldown",
        "1s",
    ])
    .await;
    let valid = app.mint_for("acme").await.secret;
    let from = |key: &str, ip: &str| pb::CheckRequest {
        key: key.into(),
        client_ip: ip.into(),
        ..Default::default()
    };

    // Five failures from one address, then it is refused outright.
    for _ in 0..5 {
        let resp = app
            .check(from(never_minted().expose_secret(), "192.0.2.7"))
            .await
            .expect("check");
        assert_eq!(reason(&resp), Reason::UnknownKey);
    }
    let blocked = app.check(from(&valid, "192.0.2.7")).await.expect("check");
    assert_eq!(reason(&blocked), Reason::RateLimited, "{blocked:?}");
    assert_eq!(blocked.http_status, 429);
    let retry = blocked.retry_after.expect("retry_after on RATE_LIMITED");
    assert!((1..=1).contains(&retry.seconds), "{retry:?}");

    // Other addresses, and the IPv6 /64 rule: another /64 is another source.
    assert!(
        app.check(from(&valid, "192.0.2.8"))
            .await
            .expect("check")
            .allowed
    );
    for _ in 0..5 {
        app.check(from(never_minted().expose_secret(), "2001:db8:0:1::1"))
            .await
            .expect("check");
    }
    let same_64 = app
        .check(from(&valid, "2001:db8:0:1::ffff"))
        .await
        .expect("check");
    assert_eq!(reason(&same_64), Reason::RateLimited);
    let other_64 = app
        .check(from(&valid, "2001:db8:0:2::1"))
        .await
        .expect("check");
    assert!(other_64.allowed);

    // After the cooldown the address is served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        app.check(from(&valid, "192.0.2.7"))
            .await
            .expect("check")
            .allowed
    );
    assert_eq!(app.replica.checker().stats().sources_blocked(), 2);
}

#[tokio::test]
async fn brute_force_through_the_admin_plane_is_throttled_too() {
    let app = spawn_app_with(&["--brute-force-threshold", "3"]).await;
    let mut keys = app.keys.clone();
    for _ in 0..3 {
        let err = keys
            .list(crate::helpers::with_key(
                pb::ListRequest::default(),
                never_minted().expose_secret(),
            ))
            .await
            .expect_err("unknown management key");
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // The tests' client is 127.0.0.1: now even the real admin key is refused
    // from there until the cooldown passes.
    let err = keys
        .list(app.admin(pb::ListRequest::default()))
        .await
        .expect_err("blocked source");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("RATE_LIMITED"), "{err:?}");
}

#[tokio::test]
async fn one_connection_opening_a_thousand_streams_is_limited_and_others_are_still_served() {
    const LIMIT: u32 = 100;
    let app = spawn_app_with(&["--max-concurrent-streams", &LIMIT.to_string()]).await;
    let valid = app.mint_for("acme").await.secret;

    // A raw HTTP/2 client that opens streams and never finishes them.
    let tcp = TcpStream::connect(app.addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client;
    // The server's SETTINGS arrive once the connection task has run.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.current_max_send_streams() == usize::MAX {
        assert!(Instant::now() < deadline, "no SETTINGS from the server");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut opened = Vec::new();
    for _ in 0..1000 {
        // Let the connection task send what was opened so far.
        tokio::task::yield_now().await;
        let ready = tokio::time::timeout(Duration::from_millis(200), client.clone().ready()).await;
        let Ok(Ok(mut ready)) = ready else {
            break;
        };
        let request =
            http::Request::post(format!("http://{}/keyward.v1.CheckService/Check", app.addr))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .expect("request");
        let (response, body) = ready.send_request(request, false).expect("open a stream");
        opened.push((response, body));
        client = ready;
    }
    // The client queues what the server will not take; the server holds at
    // most LIMIT of them.
    let (held, _) = eventually(Duration::from_secs(5), || async {
        let held = app.replica.checks_in_flight();
        (held >= LIMIT as usize).then_some(held)
    })
    .await
    .expect("the connection's streams reach the server");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = held.max(app.replica.checks_in_flight());
    println!(
        "the client opened {} streams on one connection; the server advertises {} and holds {held}",
        opened.len(),
        client.current_max_send_streams(),
    );
    assert_eq!(opened.len(), 1000, "the client did try 1000 at once");
    assert_eq!(client.current_max_send_streams(), LIMIT as usize);
    assert_eq!(held, LIMIT as usize, "concurrent streams the server took");

    // Another client is served while those streams hang.
    let t = Instant::now();
    assert!(app.check_key(&valid).await.expect("check").allowed);
    assert!(t.elapsed() < Duration::from_secs(1));
    // The hanging streams cost nothing but their slots; finishing one with
    // an empty body gets an answer.
    let (response, mut body) = opened.swap_remove(0);
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .expect("send");
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(response.status(), 200);
}
