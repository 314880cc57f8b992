//! One call at a time (c1m1) through a tonic client, every answer checked:
//! the clean latency figures, and the correctness preflight.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use hdrhistogram::Histogram;
use keyward::pb::check_service_client::CheckServiceClient;
use tonic::transport::Channel;

use crate::frames::{Door, envoy_check, keyward_check};

#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub calls: u64,
}

impl From<&Histogram<u64>> for Latency {
    /// From a histogram of microseconds.
    fn from(hist: &Histogram<u64>) -> Self {
        let at = |q| Duration::from_micros(hist.value_at_quantile(q));
        Latency {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            calls: hist.len(),
        }
    }
}

pub struct Client {
    door: Door,
    envoy: AuthorizationClient<Channel>,
    keyward: CheckServiceClient<Channel>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, door: Door) -> Self {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect");
        Self {
            door,
            envoy: AuthorizationClient::new(channel.clone()),
            keyward: CheckServiceClient::new(channel),
        }
    }

    /// Whether the key is allowed; panics if the call fails.
    pub async fn allowed(&mut self, key: &str) -> bool {
        match self.door {
            Door::Envoy => {
                let resp = self
                    .envoy
                    .check(envoy_check(key))
                    .await
                    .expect("check")
                    .into_inner();
                resp.status.map_or(0, |s| s.code) == 0
            }
            Door::Keyward => {
                self.keyward
                    .check(keyward_check(key))
                    .await
                    .expect("check")
                    .into_inner()
                    .allowed
            }
        }
    }

    /// Calls one at a time over `keys` (round-robin, or each once when
    /// `once`), asserting each answer is `expect_allowed`.
    pub async fn measure(
        &mut self,
        keys: &[String],
        once: bool,
        expect_allowed: bool,
        warmup: Duration,
        duration: Duration,
    ) -> Latency {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        let warm_until = Instant::now() + if once { Duration::ZERO } else { warmup };
        let mut i = 0usize;
        let mut end = None;
        loop {
            if once && i >= keys.len() {
                break;
            }
            let now = Instant::now();
            if now >= warm_until && end.is_none() {
                end = Some(now + duration);
            }
            if end.is_some_and(|e| now >= e) {
                break;
            }
            let key = &keys[i % keys.len()];
            let t0 = Instant::now();
            let allowed = self.allowed(key).await;
            let took = t0.elapsed();
            assert_eq!(allowed, expect_allowed, "unexpected answer for key #{i}");
            if end.is_some() {
                hist.saturating_record(took.as_micros() as u64);
            }
            i += 1;
        }
        Latency::from(&hist)
    }
}
