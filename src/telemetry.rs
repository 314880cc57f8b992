//! Logs and traces with `tracing`. Keys never reach either: the types that
//! hold them do not print them, and handlers skip request bodies.
//!
//! - Logs: JSON lines (or a human format) on stderr; inside a traced span a
//!   JSON line carries its `trace_id` and `span_id`.
//! - Traces: OTLP over gRPC, configured only by the standard variables
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`,
//!   `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`,
//!   `OTEL_RESOURCE_ATTRIBUTES`); off when no endpoint is set.
//!
//! Checks are the hot path: whether a check is traced is decided before its
//! span exists ([`check_span`]), by the configured sampler's rule applied to
//! the `traceparent` Envoy sent, so an unsampled check costs a branch and no
//! span. Every other span (admin calls, store reads) goes through the SDK's
//! sampler as usual.

use std::{fmt, sync::OnceLock};

use opentelemetry::{
    Context, KeyValue,
    trace::{
        Link, SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    },
};
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample,
};
use tracing::{Subscriber, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::{LevelFilter, Targets},
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    prelude::*,
    registry::LookupSpan,
};

use crate::{config::LogFormat, metrics::Door};

/// The check spans' names: the gRPC methods, as OpenTelemetry's RPC
/// conventions name server spans.
const CHECK_SPAN: &str = "keyward.v1.CheckService/Check";
const ENVOY_CHECK_SPAN: &str = "envoy.service.auth.v3.Authorization/Check";

/// The longest the last spans may take to leave at exit.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still buffered. Call from the runtime the exporter
    /// was built on, before it stops.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // Blocks until the export thread is done, and the export needs
            // this runtime: not on its threads.
            let flushed = tokio::time::timeout(
                FLUSH_TIMEOUT,
                tokio::task::spawn_blocking(move || provider.shutdown()),
            )
            .await;
            match flushed {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => {
                    tracing::warn!(error = %chain(&err), "cannot flush the last spans")
                }
                Ok(Err(_)) => tracing::warn!("flushing the last spans failed"),
                Err(_) => tracing::warn!(
                    timeout = ?FLUSH_TIMEOUT,
                    "the trace collector did not take the last spans in time; exiting without them"
                ),
            }
        }
    }
}

/// Installs the global subscriber: logs always, traces if
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Call inside the tokio runtime (the
/// exporter's gRPC channel lives on it). Fails on a bad filter or sampler,
/// or if a subscriber is already set.
pub fn init(
    format: LogFormat,
    filter: &str,
) -> Result<Telemetry, Box<dyn std::error::Error + Send + Sync>> {
    let filter = EnvFilter::try_new(filter)?;
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .filter(|_| env("OTEL_TRACES_EXPORTER").is_none_or(|e| e != "none"));
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry().with(logs).try_init()?;
        return Ok(Telemetry { provider: None });
    };
    let sampling = Sampling::from_env()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name("keyward");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(PreSampled {
            inner: sampling.sdk_sampler(),
        })
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("keyward");
    // keyward's own spans, whatever the log filter says: a log filter of
    // `warn` must not turn traces off.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target("keyward", LevelFilter::INFO));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    let _ = SAMPLING.set(sampling);
    tracing::info!(endpoint, sampler = %SAMPLING.get().map(|s| s.describe()).unwrap_or_default(), "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Set once traces are exported; checks consult it.
static SAMPLING: OnceLock<Sampling> = OnceLock::new();

/// Whether traces are exported (checks may then be traced).
pub fn traced() -> bool {
    SAMPLING.get().is_some()
}

/// A sampler as `OTEL_TRACES_SAMPLER` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// For a trace that starts here.
    root: Root,
    /// A parent's decision is followed (the `parentbased_*` samplers).
    parent_based: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

impl Sampling {
    fn from_env() -> Result<Self, String> {
        Self::parse(
            env("OTEL_TRACES_SAMPLER").as_deref(),
            env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
    }

    /// The standard's names; the default is `parentbased_always_on`.
    pub fn parse(sampler: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg {
                None => Ok(1.0),
                Some(a) => a
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("OTEL_TRACES_SAMPLER_ARG {a:?} is not a ratio between 0 and 1")
                    }),
            }
        };
        let (root, parent_based) = match sampler.unwrap_or("parentbased_always_on").trim() {
            "always_on" => (Root::AlwaysOn, false),
            "always_off" => (Root::AlwaysOff, false),
            "traceidratio" => (Root::Ratio(ratio()?), false),
            "parentbased_always_on" => (Root::AlwaysOn, true),
            "parentbased_always_off" => (Root::AlwaysOff, true),
            "parentbased_traceidratio" => (Root::Ratio(ratio()?), true),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER {other:?} is not one of always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio"
                ));
            }
        };
        Ok(Self { root, parent_based })
    }

    fn describe(&self) -> String {
        let root = match self.root {
            Root::AlwaysOn => "always_on".to_owned(),
            Root::AlwaysOff => "always_off".to_owned(),
            Root::Ratio(r) => format!("traceidratio {r}"),
        };
        if self.parent_based {
            format!("parentbased_{root}")
        } else {
            root
        }
    }

    /// Whether a check with this parent (if any) is traced.
    pub fn samples(&self, parent: Option<&SpanContext>) -> bool {
        match parent {
            Some(parent) if self.parent_based => parent.is_sampled(),
            _ => match self.root {
                Root::AlwaysOn => true,
                Root::AlwaysOff => false,
                Root::Ratio(r) => rand::random::<f64>() < r,
            },
        }
    }

    fn sdk_sampler(&self) -> Sampler {
        let root = match self.root {
            Root::AlwaysOn => Sampler::AlwaysOn,
            Root::AlwaysOff => Sampler::AlwaysOff,
            Root::Ratio(r) => Sampler::TraceIdRatioBased(r),
        };
        if self.parent_based {
            Sampler::ParentBased(Box::new(root))
        } else {
            root
        }
    }
}

/// The configured sampler, except for check spans: their decision was
/// taken before they were created ([`check_span`]), and is not taken twice.
#[derive(Debug, Clone)]
struct PreSampled {
    inner: Sampler,
}

impl ShouldSample for PreSampled {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if name == CHECK_SPAN || name == ENVOY_CHECK_SPAN {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: parent_context
                    .map(|cx| cx.span().span_context().trace_state().clone())
                    .unwrap_or_default(),
            };
        }
        self.inner
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// A W3C `traceparent` header value, if well formed:
/// `version-traceid-parentid-flags`, ids not all zero.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    // Version 00 has exactly four parts; later versions may add more.
    if version.len() != 2
        || version.eq_ignore_ascii_case("ff")
        || (version == "00" && parts.next().is_some())
        || trace_id.len() != 32
        || span_id.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !(hex(version) && hex(trace_id) && hex(span_id) && hex(flags)) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::default(),
    ))
}

/// The span of one check, or a disabled span when it is not traced (no
/// exporter, or the sampler says no). `traceparent` is the caller's.
pub fn check_span(door: Door, traceparent: Option<&str>) -> tracing::Span {
    let Some(sampling) = SAMPLING.get() else {
        return tracing::Span::none();
    };
    let parent = traceparent.and_then(parse_traceparent);
    if !sampling.samples(parent.as_ref()) {
        return tracing::Span::none();
    }
    let span = match door {
        Door::Check => tracing::info_span!(
            target: "keyward::check",
            "keyward.v1.CheckService/Check",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "keyward.v1.CheckService",
            rpc.method = "Check",
            keyward.reason = Empty,
            keyward.key_id = Empty,
            keyward.owner_id = Empty,
        ),
        Door::Envoy => tracing::info_span!(
            target: "keyward::check",
            "envoy.service.auth.v3.Authorization/Check",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "envoy.service.auth.v3.Authorization",
            rpc.method = "Check",
            keyward.reason = Empty,
            keyward.key_id = Empty,
            keyward.owner_id = Empty,
        ),
    };
    if let Some(parent) = parent {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
    span
}

/// A span for a store call made inside a traced span (a check's miss, an
/// admin call), or a disabled one: outside traces, store calls cost no
/// span.
pub fn store_span(operation: &'static str) -> tracing::Span {
    if !traced() || tracing::Span::current().is_disabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: "keyward::store",
        "store",
        otel.name = operation,
        otel.kind = "client",
        db.system = "postgresql",
        db.operation = operation,
    )
}

/// JSON lines: `timestamp`, `level`, `target`, the event's fields
/// (`message` among them) at the top level, the innermost span's name, and
/// `trace_id`/`span_id` when that span is traced.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
            let otel = tracing::Span::current().context();
            let current = otel.span();
            let context = current.span_context();
            if context.is_valid() {
                line.insert("trace_id".into(), context.trace_id().to_string().into());
                line.insert("span_id".into(), context.span_id().to_string().into());
            }
        }
        let text = serde_json::Value::Object(line).to_string();
        writeln!(writer, "{text}")
    }
}

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0.insert(field.name().to_owned(), chain(value).into());
    }
}

/// `err: cause: cause`, for one log line: the whole chain, so that a store
/// error logged here keeps its sqlx cause (and that one its I/O cause).
pub fn chain(err: &dyn std::error::Error) -> String {
    use std::fmt::Write as _;
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_as_the_w3c_format_says() {
        let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        let unsampled =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("valid");
        assert!(!unsampled.is_sampled());
        // A later version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn samplers_are_the_standard_ones() {
        let parent = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let unsampled =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        let default = Sampling::parse(None, None).unwrap();
        assert!(default.samples(None));
        assert!(default.samples(parent.as_ref()));
        assert!(!default.samples(unsampled.as_ref()));
        let off = Sampling::parse(Some("always_off"), None).unwrap();
        assert!(!off.samples(parent.as_ref()));
        let none = Sampling::parse(Some("parentbased_traceidratio"), Some("0")).unwrap();
        assert!(!none.samples(None));
        assert!(none.samples(parent.as_ref()));
        let ratio = Sampling::parse(Some("parentbased_traceidratio"), Some("0.25")).unwrap();
        let sampled = (0..10_000).filter(|_| ratio.samples(None)).count();
        assert!((2_000..3_000).contains(&sampled), "{sampled}");
        for (name, arg) in [
            ("traceidratio", "2"),
            ("traceidratio", "x"),
            ("sometimes", ""),
        ] {
            let err = Sampling::parse(Some(name), Some(arg)).unwrap_err();
            assert!(err.contains("OTEL_TRACES_SAMPLER"), "{err}");
        }
    }
}
