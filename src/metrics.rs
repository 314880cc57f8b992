//! Prometheus metrics: what the hot path counts (plain relaxed atomics, no
//! lock and no allocation per check), and the exposition, built on each
//! scrape from those counters with the `prometheus-client` encoders (text
//! 0.0.4 by default, OpenMetrics 1.0 when the scraper asks for it).
//!
//! Every component keeps its own counters where it does its work; the
//! [`Collector`] reads them all through a [`ReplicaHandle`]. No global
//! registry: each application (and each test's) has its own.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{policy::Reason, startup::ReplicaHandle, sync::lock};

/// Check latency buckets, in nanoseconds: 25 µs to 1 s.
pub const CHECK_BUCKETS: &[u64] = &[
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// Store call and propagation buckets, in nanoseconds: 250 µs to 10 s.
pub const SLOW_BUCKETS: &[u64] = &[
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A histogram of durations with fixed buckets: an observation is a scan of
/// at most 15 bounds and three relaxed atomic adds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// Per bucket (not cumulative), plus one for above the last bound.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self
            .bounds
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// (sum in seconds, count, buckets as (upper bound in seconds, count in
    /// this bucket alone)), `+Inf` last: the encoders make them cumulative.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let bound = self
                    .bounds
                    .get(i)
                    .map_or(f64::INFINITY, |b| *b as f64 / 1e9);
                (bound, c.load(Ordering::Relaxed))
            })
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

/// The two front doors a check arrives by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// `keyward.v1.CheckService/Check`.
    Check,
    /// `envoy.service.auth.v3.Authorization/Check`.
    Envoy,
}

impl Door {
    pub const ALL: [Door; 2] = [Door::Check, Door::Envoy];

    pub fn as_str(self) -> &'static str {
        match self {
            Door::Check => "check",
            Door::Envoy => "envoy",
        }
    }
}

/// Why a check got no decision, as its gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckError {
    Unavailable,
    Internal,
    /// Shed: too many checks in flight.
    ResourceExhausted,
}

impl CheckError {
    const ALL: [CheckError; 3] = [
        CheckError::Unavailable,
        CheckError::Internal,
        CheckError::ResourceExhausted,
    ];

    fn as_str(self) -> &'static str {
        match self {
            CheckError::Unavailable => "unavailable",
            CheckError::Internal => "internal",
            CheckError::ResourceExhausted => "resource_exhausted",
        }
    }
}

/// What one front door answered, and how fast.
#[derive(Debug)]
pub struct DoorStats {
    answers: [AtomicU64; Reason::ALL.len()],
    errors: [AtomicU64; CheckError::ALL.len()],
    duration: Histogram,
}

impl Default for DoorStats {
    fn default() -> Self {
        Self {
            answers: Default::default(),
            errors: Default::default(),
            duration: Histogram::new(CHECK_BUCKETS),
        }
    }
}

impl DoorStats {
    pub fn answered(&self, reason: Reason, took: Duration) {
        self.answers[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(took);
    }

    pub fn failed(&self, error: CheckError, took: Duration) {
        self.errors[error as usize].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(took);
    }

    /// Shed before any work: not timed.
    pub fn shed(&self) {
        self.errors[CheckError::ResourceExhausted as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Checks answered with `reason` so far.
    pub fn answers(&self, reason: Reason) -> u64 {
        self.answers[reason.index()].load(Ordering::Relaxed)
    }

    /// Checks that got no decision with `error` so far.
    pub fn errors(&self, error: CheckError) -> u64 {
        self.errors[error as usize].load(Ordering::Relaxed)
    }
}

/// Both doors.
#[derive(Debug)]
pub struct FrontDoors {
    check: DoorStats,
    envoy: DoorStats,
    /// Off (`--metrics-addr off`): checks are not counted or timed.
    counting: bool,
}

impl FrontDoors {
    pub fn new(counting: bool) -> Self {
        Self {
            check: DoorStats::default(),
            envoy: DoorStats::default(),
            counting,
        }
    }

    pub fn door(&self, door: Door) -> &DoorStats {
        match door {
            Door::Check => &self.check,
            Door::Envoy => &self.envoy,
        }
    }

    /// The door's counters, if checks are counted.
    pub fn counted(&self, door: Door) -> Option<&DoorStats> {
        self.counting.then(|| self.door(door))
    }

    pub fn counting(&self) -> bool {
        self.counting
    }
}

/// Admin calls by method and gRPC code. The admin plane is not the hot
/// path: one short lock per call.
#[derive(Debug, Default)]
pub struct AdminCalls {
    calls: Mutex<BTreeMap<(&'static str, i32), u64>>,
}

impl AdminCalls {
    pub fn record(&self, method: &'static str, code: tonic::Code) {
        let mut calls = lock(&self.calls);
        *calls.entry((method, code as i32)).or_default() += 1;
    }

    /// Calls of `method` (`keyward.v1.KeyService/Mint`) answered with `code`.
    pub fn count(&self, method: &str, code: tonic::Code) -> u64 {
        let calls = lock(&self.calls);
        calls
            .iter()
            .filter(|((m, c), _)| *m == method && *c == code as i32)
            .map(|(_, n)| *n)
            .sum()
    }

    fn snapshot(&self) -> Vec<((&'static str, i32), u64)> {
        let calls = lock(&self.calls);
        calls.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// The gRPC code's name as grpcurl and the gRPC docs print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The version and commit this binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_SHA: &str = env!("KEYWARD_GIT_SHA");

/// A registry holding one replica's metrics.
pub fn registry(replica: ReplicaHandle) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReplicaCollector { replica }));
    registry
}

/// The exposition: OpenMetrics if `accept` asks for it, else the text
/// format 0.0.4. Returns the body and its content type.
pub fn encode(registry: &Registry, accept: &str) -> (String, &'static str) {
    let mut out = String::with_capacity(16 * 1024);
    if accept.contains("application/openmetrics-text") {
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, registry);
        (
            out,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
        (
            out,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    }
}

/// Serves `/metrics`, `/livez` and `/readyz` over HTTP/1.1 until `stop`
/// resolves. `/livez` is 200 while the process runs; `/readyz` is 200 when
/// the replica is ready (serving, listening for invalidations, every
/// background task up) and 503 otherwise.
pub async fn serve(
    listener: tokio::net::TcpListener,
    replica: ReplicaHandle,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper::{server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;

    let registry = std::sync::Arc::new(registry(replica.clone()));
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics server cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        let registry = registry.clone();
        let replica = replica.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let response = answer(&req, &registry, &replica);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            // A scraper that goes away mid-answer is no concern of ours.
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn answer(
    req: &hyper::Request<hyper::body::Incoming>,
    registry: &Registry,
    replica: &ReplicaHandle,
) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode, header};
    let text = |status: StatusCode, body: &'static str| {
        let mut response = hyper::Response::new(Body::from(body));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let (body, content_type) = encode(registry, accept);
            let mut response = hyper::Response::new(Body::from(body));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type),
            );
            response
        }
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" if replica.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /livez or /readyz\n",
        ),
    }
}

#[derive(Debug)]
struct ReplicaCollector {
    replica: ReplicaHandle,
}

type Labels<'a> = Vec<(Cow<'static, str>, Cow<'a, str>)>;

fn labels<'a>(pairs: &[(&'static str, Cow<'a, str>)]) -> Labels<'a> {
    pairs
        .iter()
        .map(|(k, v)| (Cow::Borrowed(*k), v.clone()))
        .collect()
}

/// Writes one family per call.
struct Out<'e> {
    encoder: DescriptorEncoder<'e>,
}

impl Out<'_> {
    fn counter(&mut self, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
        let m = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(value).encode(m)
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
        let m = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(value).encode(m)
    }

    fn counters<'l>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'l>, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in series {
            ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauges<'l>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'l>, i64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in series {
            ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn histograms<'h, 'l>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'l>, &'h Histogram)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in series {
            let (sum, count, buckets) = h.snapshot();
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for ReplicaCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.replica;
        let checker = r.checker();
        let stats = checker.stats();
        let doors = checker.doors();
        let cache = checker.cache();
        let store = r.store();
        let lag = r.revocation_lag();
        let usage = checker.usage_stats();
        let rate = checker.rate_stats();
        let mut out = Out { encoder };

        out.gauges(
            "keyward_build_info",
            "The version and commit keyward was built from (always 1).",
            [(
                labels(&[("version", VERSION.into()), ("git_sha", GIT_SHA.into())]),
                1,
            )],
        )?;
        out.gauge(
            "keyward_ready",
            "1 when the replica serves and listens for invalidations.",
            i64::from(r.is_ready()),
        )?;

        // Checks.
        out.counters(
            "keyward_checks",
            "Checks answered, by front door and decision reason.",
            Door::ALL.iter().flat_map(|door| {
                Reason::ALL.iter().map(move |reason| {
                    (
                        labels(&[
                            ("door", door.as_str().into()),
                            ("reason", reason.as_str().into()),
                        ]),
                        doors.door(*door).answers(*reason),
                    )
                })
            }),
        )?;
        out.counters(
            "keyward_check_errors",
            "Checks that got no decision (the caller must not allow), by front door and gRPC code.",
            Door::ALL.iter().flat_map(|door| {
                CheckError::ALL.iter().map(move |e| {
                    (
                        labels(&[("door", door.as_str().into()), ("code", e.as_str().into())]),
                        doors.door(*door).errors(*e),
                    )
                })
            }),
        )?;
        out.histograms(
            "keyward_check_duration_seconds",
            "Time to answer a check, from its arrival in the handler to its answer.",
            Door::ALL.iter().map(|door| {
                (
                    labels(&[("door", door.as_str().into())]),
                    &doors.door(*door).duration,
                )
            }),
        )?;
        out.gauge(
            "keyward_checks_in_flight",
            "Checks being served right now.",
            gauge_value(r.checks_in_flight() as u64),
        )?;

        // The cache and the filter.
        out.counter(
            "keyward_cache_hits",
            "Checks answered from a fresh cache entry.",
            stats.cache_hits(),
        )?;
        out.counter(
            "keyward_cache_stale_answers",
            "Checks answered from an entry past its TTL while it is re-read in the background.",
            stats.stale_answers(),
        )?;
        out.counter(
            "keyward_cache_misses",
            "Checks of a key the cache did not hold (or held only for re-reading).",
            stats.cache_misses(),
        )?;
        out.counter(
            "keyward_negative_cache_hits",
            "Checks answered unknown from the cache of unknown keys.",
            stats.negative_hits(),
        )?;
        out.gauge(
            "keyward_cache_entries",
            "Known keys held in the cache.",
            gauge_value(cache.known_len()),
        )?;
        out.gauge(
            "keyward_cache_bytes",
            "Estimated memory of the cached known keys.",
            gauge_value(cache.known_bytes()),
        )?;
        out.gauge(
            "keyward_negative_cache_entries",
            "Unknown keys remembered as unknown.",
            gauge_value(cache.unknown_len()),
        )?;
        out.counter(
            "keyward_filter_rejections",
            "Keys refused on the membership filter's word, without a lookup.",
            stats.filter_rejections(),
        )?;
        out.counter(
            "keyward_unknown_key_budget_lookups",
            "Lookups of keys the filter ruled out, spent from the unknown-key budget.",
            stats.budget_lookups(),
        )?;
        out.counter(
            "keyward_brute_force_sources_blocked",
            "Times a source was blocked for presenting too many invalid keys.",
            stats.sources_blocked(),
        )?;
        out.counter(
            "keyward_brute_force_blocked_checks",
            "Checks refused because their source was blocked.",
            stats.blocked_checks(),
        )?;
        out.counter(
            "keyward_canary_trips",
            "Presentations of canary keys.",
            stats.canary_trips(),
        )?;

        // The store.
        out.counters(
            "keyward_store_lookups",
            "Reads of a key by hash for checks (misses and re-reads), by result.",
            [
                ("found", stats.lookups_found()),
                ("not_found", stats.lookups_not_found()),
                ("error", stats.lookups_failed()),
            ]
            .map(|(result, n)| (labels(&[("result", result.into())]), n)),
        )?;
        out.histograms(
            "keyward_store_lookup_duration_seconds",
            "Time to read a key for a check, including waiting for a connection.",
            [(Labels::new(), stats.lookup_duration())],
        )?;
        let pools = store.pool_stats();
        out.gauges(
            "keyward_db_pool_connections",
            "Open connections, by pool.",
            pools
                .iter()
                .map(|p| (labels(&[("pool", p.name.into())]), i64::from(p.size))),
        )?;
        out.gauges(
            "keyward_db_pool_idle_connections",
            "Idle connections, by pool.",
            pools.iter().map(|p| {
                (
                    labels(&[("pool", p.name.into())]),
                    gauge_value(p.idle as u64),
                )
            }),
        )?;
        out.gauges(
            "keyward_db_pool_waiting",
            "Check lookups waiting for a connection of the check pool.",
            [(
                labels(&[("pool", "check".into())]),
                store.check_pool_waiting(),
            )],
        )?;

        // Invalidations.
        out.counters(
            "keyward_invalidations",
            "Invalidation notices applied, by kind.",
            lag.by_op().map(|(op, n)| (labels(&[("op", op.into())]), n)),
        )?;
        out.histograms(
            "keyward_revocation_lag_seconds",
            "From a key's change (database clock) to its eviction here.",
            [(Labels::new(), lag.histogram())],
        )?;
        out.counter(
            "keyward_listener_reconnects",
            "Times the invalidation listener had to listen again.",
            r.listen_sessions().saturating_sub(1),
        )?;
        out.gauge(
            "keyward_listener_connected",
            "1 while the invalidation listener is connected and caught up.",
            i64::from(lag.connected()),
        )?;

        // Usage.
        out.counters(
            "keyward_usage_flushes",
            "Batched usage writes, by result.",
            [
                ("ok", usage.flushes_ok()),
                ("error", usage.flushes_failed()),
            ]
            .map(|(result, n)| (labels(&[("result", result.into())]), n)),
        )?;
        out.counter(
            "keyward_usage_rows_written",
            "Keys whose usage was written.",
            usage.rows_written(),
        )?;
        out.counter(
            "keyward_usage_carried_over",
            "Uses kept for the next write after a failed one.",
            usage.carried_over(),
        )?;
        out.counter(
            "keyward_usage_dropped",
            "Uses dropped because too many keys waited for the database.",
            usage.dropped(),
        )?;

        // Limits.
        out.counter(
            "keyward_rate_limit_redis_checks",
            "Rate-limited checks answered by Redis.",
            rate.redis_checks(),
        )?;
        out.counter(
            "keyward_rate_limit_redis_fallbacks",
            "Rate-limited checks the local limiter answered because Redis did not.",
            rate.fallbacks(),
        )?;
        out.counter(
            "keyward_credit_reservations",
            "Credit reservation statements: each reserves a block, or finds too few credits left.",
            store.stats().credit_reservations(),
        )?;

        // The admin plane.
        out.counters(
            "keyward_admin_requests",
            "Admin calls, by method and gRPC code.",
            r.admin_calls()
                .snapshot()
                .into_iter()
                .map(|((method, code), n)| {
                    (
                        labels(&[
                            ("method", method.into()),
                            ("code", code_name(tonic::Code::from(code)).into()),
                        ]),
                        n,
                    )
                }),
        )?;
        out.counter(
            "keyward_admin_refused",
            "Admin calls refused for want of a valid management key or for asking more than it may.",
            r.admin_stats().refused(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_in_its_bucket() {
        let h = Histogram::new(&[1_000, 10_000]);
        h.observe(Duration::from_nanos(1_000));
        h.observe(Duration::from_nanos(5_000));
        h.observe(Duration::from_secs(1));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 1.000_006).abs() < 1e-9);
        assert_eq!(buckets, vec![(1e-6, 1), (1e-5, 1), (f64::INFINITY, 1)]);
    }
}
