//! The decision path in process, per operation: parse + SHA-256 + cache
//! lookup + policy + usage recording, over 10,000 distinct cached keys; and
//! each step alone, to show where the time goes.
//!
//!     cargo bench --bench decision

use std::{
    cell::Cell,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use divan::{Bencher, black_box};
use keyward::{
    cache::{CacheSettings, CachedKey, KeyCache, Lookup},
    checker::{Cached, Checker, CheckerSettings, Limiting},
    filter::KeyFilter,
    key::{ApiKey, Grant, KeyHash, KeyId, KeyPrefix, Metadata, OwnerId, Resource, Scope},
    policy::{self, Reason},
    store::{DbOptions, Store},
    usage::UsageRecorder,
};
use prost::Message as _;

const KEYS: usize = 10_000;

// The request as Envoy sends it, shared with the suite (which uses the rest).
#[allow(dead_code)]
#[path = "suite/frames.rs"]
mod frames;

// Measure with the allocator keyward runs with (see src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    divan::main();
}

struct Fixture {
    checker: Checker,
    cache: KeyCache,
    keys: Vec<ApiKey>,
    hashes: Vec<KeyHash>,
    grants: Vec<Grant>,
    // The store is never reached (every key is cached), but sqlx wants a runtime.
    _runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let store = Store::connect_lazy(&DbOptions::new("postgres://postgres@127.0.0.1:1/unused"))
            .expect("lazy store");
        let cache = KeyCache::new(&CacheSettings {
            max_bytes: 1 << 30,
            ttl: Duration::from_secs(3600),
            stale_if_error: Duration::from_secs(3600),
            negative_capacity: 1000,
            negative_ttl: Duration::from_secs(3600),
        });
        let prefix = KeyPrefix::parse("kw_live").expect("prefix");
        let mut keys = Vec::with_capacity(KEYS);
        let mut hashes = Vec::with_capacity(KEYS);
        let mut grants = Vec::with_capacity(KEYS);
        for _ in 0..KEYS {
            let key = ApiKey::generate(&prefix);
            let grant = Grant {
                id: KeyId::new_v7(),
                owner_id: OwnerId::parse("acme").expect("owner"),
                scopes: [Scope::parse("invoices:read").expect("scope")].into(),
                resources: [Resource::parse("billing").expect("resource")].into(),
                ip_allow: [].into(),
                metadata: Metadata::default(),
                expires_at: None,
                disabled_at: None,
                revoked_at: None,
                owner_active: true,
                canary: false,
                limits: None,
            };
            cache.fill(cache.ticket(&key.hash()), key.hash(), Some(grant.clone()));
            hashes.push(key.hash());
            keys.push(key);
            grants.push(grant);
        }
        let checker = Checker::new(
            cache.clone(),
            Arc::new(KeyFilter::default()),
            store.clone(),
            Arc::new(UsageRecorder::default()),
            CheckerSettings::default(),
            Limiting::in_memory(store),
        );
        Fixture {
            checker,
            cache,
            keys,
            hashes,
            grants,
            _runtime: runtime,
        }
    })
}

/// Round-robin over the keys, one per iteration.
fn next(counter: &Cell<usize>) -> usize {
    let i = counter.get();
    counter.set((i + 1) % KEYS);
    i
}

const SCOPES: [&str; 1] = ["invoices:read"];

fn request() -> policy::Request<'static> {
    policy::Request {
        resource: Some("billing"),
        required_scopes: &SCOPES,
        client_ip: Some("10.1.2.3".parse().expect("ip")),
        cost: 1,
    }
}

/// The whole hot path of a cache hit, as `CheckService.Check` runs it.
#[divan::bench(sample_count = 500, sample_size = 200)]
fn decision_path(bencher: Bencher) {
    let f = fixture();
    let credentials: Vec<String> = f
        .keys
        .iter()
        .map(|k| format!("Bearer {}", k.expose_secret()))
        .collect();
    let req = request();
    let i = Cell::new(0);
    bencher.bench_local(|| {
        let outcome = f
            .checker
            .check_cached(Some(&credentials[next(&i)]), &req, Instant::now());
        assert!(matches!(&outcome, Cached::Answered(o) if o.decision.reason == Reason::Ok));
        black_box(outcome)
    });
}

#[divan::bench(sample_count = 500, sample_size = 200)]
fn parse_key(bencher: Bencher) {
    let f = fixture();
    let i = Cell::new(0);
    bencher.bench_local(|| ApiKey::parse(black_box(f.keys[next(&i)].expose_secret())));
}

#[divan::bench(sample_count = 500, sample_size = 200)]
fn sha256_key(bencher: Bencher) {
    let f = fixture();
    let i = Cell::new(0);
    bencher.bench_local(|| black_box(&f.keys[next(&i)]).hash());
}

#[divan::bench(sample_count = 500, sample_size = 200)]
fn cache_get(bencher: Bencher) {
    let f = fixture();
    let i = Cell::new(0);
    bencher.bench_local(|| f.cache.get(black_box(&f.hashes[next(&i)]), Instant::now()));
}

#[divan::bench(sample_count = 500, sample_size = 200)]
fn policy_decide(bencher: Bencher) {
    let f = fixture();
    let req = request();
    let now = Utc::now();
    let i = Cell::new(0);
    bencher.bench_local(|| policy::decide(black_box(&f.grants[next(&i)]), &req, now));
}

#[divan::bench(sample_count = 500, sample_size = 200)]
fn usage_record(bencher: Bencher) {
    let f = fixture();
    let recorder = UsageRecorder::default();
    let entries: Vec<Arc<CachedKey>> = f
        .hashes
        .iter()
        .map(|h| match f.cache.get(h, Instant::now()) {
            Some(Lookup::Fresh(entry)) => entry,
            _ => panic!("every key is cached"),
        })
        .collect();
    let now = Utc::now();
    let i = Cell::new(0);
    bencher.bench_local(|| recorder.record(&entries[next(&i)], now));
}

/// For scale: what decoding Envoy's CheckRequest costs, before any of the above.
#[divan::bench(sample_count = 500, sample_size = 200)]
fn envoy_check_request_decode(bencher: Bencher) {
    use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
    let bytes = frames::envoy_check(fixture().keys[0].expose_secret()).encode_to_vec();
    bencher.bench_local(|| CheckRequest::decode(black_box(bytes.as_slice())));
}

/// A local rate limit (two windows, never reached) over 10,000 buckets: what
/// a limited key adds to a cache hit before its answer is built (each key's
/// hold on its bucket kept, as its cache entry keeps it).
#[divan::bench(sample_count = 500, sample_size = 200)]
fn rate_limit_local(bencher: Bencher) {
    use std::{
        future::Future as _,
        pin::pin,
        task::{Context, Poll, Waker},
    };

    use keyward::{
        key::{Limits, RateLimit},
        limits::rate::{BucketRef, RateLimiter},
    };
    let limiter = RateLimiter::local(1.0);
    let windows = || {
        vec![
            RateLimit::new("burst", 1_000_000_000, Duration::from_secs(1)).expect("window"),
            RateLimit::new("daily", 1_000_000_000, Duration::from_secs(86_400)).expect("window"),
        ]
    };
    let limits: Vec<(std::sync::Arc<Limits>, BucketRef)> = (0..KEYS)
        .map(|_| {
            let limits = Limits::new(KeyId::new_v7(), windows(), false).expect("limits");
            (limits.into(), BucketRef::default())
        })
        .collect();
    let i = Cell::new(0);
    bencher.bench_local(|| {
        let (limits, held) = &limits[next(&i)];
        let mut check = pin!(limiter.check(limits, 1, Some(held), std::time::Instant::now()));
        match check.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(decision) => {
                assert!(decision.allowed);
                black_box(decision)
            }
            Poll::Pending => panic!("the local limiter never waits"),
        }
    });
}
