//! The admin plane under load: Mint throughput, and List page latency with
//! the seeded table behind it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use keyward::pb::{self, key_service_client::KeyServiceClient};
use tonic::transport::Channel;

use crate::grpc::with_key as admin;
use crate::latency::Latency;
use crate::seed::OWNERS;

async fn client(addr: SocketAddr) -> KeyServiceClient<Channel> {
    KeyServiceClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect"),
    )
}

/// Mints per second with `concurrency` calls in flight.
pub async fn mint_rate(
    addr: SocketAddr,
    admin_key: &str,
    concurrency: usize,
    duration: Duration,
) -> f64 {
    let keys = client(addr).await;
    let (count, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (mut keys, count, stop, admin_key) = (
            keys.clone(),
            count.clone(),
            stop.clone(),
            admin_key.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = pb::MintRequest {
                    owner_id: format!("owner-{}", t % OWNERS),
                    name: "bench mint".into(),
                    scopes: vec!["invoices:read".into()],
                    ..Default::default()
                };
                keys.mint(admin(req, &admin_key)).await.expect("mint");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    let minted = count.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    minted as f64 / elapsed.as_secs_f64()
}

/// List pages of 100, one call at a time: an owner's keys page after page
/// (`owner` = Some), or the whole table from random positions (`tokens`).
pub async fn list_latency(
    addr: SocketAddr,
    admin_key: &str,
    owner: Option<&str>,
    tokens: &[String],
    duration: Duration,
) -> Latency {
    let mut keys = client(addr).await;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let end = Instant::now() + duration;
    let mut token = String::new();
    let mut i = 0usize;
    while Instant::now() < end {
        if owner.is_none() {
            token = tokens[i % tokens.len()].clone();
        }
        let req = pb::ListRequest {
            owner_id: owner.unwrap_or_default().to_owned(),
            page_size: Some(100),
            page_token: token.clone(),
            include_revoked: false,
        };
        let t0 = Instant::now();
        let page = keys
            .list(admin(req, admin_key))
            .await
            .expect("list")
            .into_inner();
        hist.saturating_record(t0.elapsed().as_micros() as u64);
        assert!(!page.keys.is_empty(), "a page of keys");
        token = page.next_page_token;
        i += 1;
    }
    Latency::from(&hist)
}
