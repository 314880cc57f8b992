//! Scenario 10: what observability costs the hot path, interleaved in one
//! run on the same keys:
//!
//! - metrics on (the default: every check counted and timed) against
//!   `--metrics-addr off` (no endpoint, no per-check counting);
//! - traces exported over OTLP with a 1 % sampler
//!   (`parentbased_traceidratio`, 0.01; checks arrive without a parent, as
//!   from an Envoy that does not trace) against no exporter.
//!
//! The OTLP receiver is a tonic TraceService in this driver (core 1) that
//! counts the spans and drops them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

use crate::{
    Ctx, Suite, all_allowed,
    frames::Door,
    servers::{SERVER_CORE, Server},
};

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    eprintln!("10. metrics and traces on the hot path");
    let args = suite.args.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the OTLP sink");
    let sink_addr = listener.local_addr().expect("addr");
    let sink = Sink::default();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let metrics_off = Server::keyward_on(
        &args.keyward,
        SERVER_CORE,
        "keyward, --metrics-addr off",
        &ctx.url,
        &["--metrics-addr", "off"],
    )
    .await;
    let endpoint = format!("http://{sink_addr}");
    let traced = Server::keyward_with_env(
        &args.keyward,
        SERVER_CORE,
        "keyward, traces at 1 %",
        &ctx.url,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
            ("OTEL_BSP_SCHEDULE_DELAY", "1000"),
        ],
    )
    .await;
    let hot = ctx.hot_frames(Door::Envoy);
    // Warm every server's cache with every hot key.
    for server in [&metrics_off, &traced] {
        let run = crate::h2gen::run(
            server.addr,
            Door::Envoy,
            hot.clone(),
            true,
            4,
            8,
            Duration::ZERO,
            Duration::from_secs(30),
        )
        .await;
        all_allowed(&server.name, &run);
    }

    let r = suite
        .h2gen(
            &[&ctx.kw, &metrics_off],
            Door::Envoy,
            &hot,
            8,
            8,
            all_allowed,
        )
        .await;
    suite.ratio_row(
        "cache hit with metrics on (every check counted and timed)",
        "h2gen c8m8, 10,000 keys",
        &r[0],
        &r[1],
        "keyward --metrics-addr off",
        Some(0.97),
    );
    let spans_before = sink.spans.load(Ordering::Relaxed);
    let r = suite
        .h2gen(&[&traced, &ctx.kw], Door::Envoy, &hot, 8, 8, all_allowed)
        .await;
    // Let the last batch go out before counting what arrived.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let exported = sink.spans.load(Ordering::Relaxed) - spans_before;
    suite.ratio_row(
        &format!(
            "cache hit with traces exported at a 1 % sampler ({exported} check spans received)"
        ),
        "h2gen c8m8, 10,000 keys",
        &r[0],
        &r[1],
        "keyward without an exporter",
        Some(0.95),
    );
    assert!(exported > 0, "the traced keyward exported no span");
    drop((metrics_off, traced));
    receiver.abort();
}
