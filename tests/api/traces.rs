//! Traces: the keyward binary exporting OTLP (configured only by the
//! standard OTEL_* variables) and the real Envoy with its OpenTelemetry
//! tracer, both to one OTLP receiver run by the test. keyward's Check span
//! belongs to Envoy's trace, under Envoy's span; an admin call has a span
//! naming its method and caller.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
};
use tonic::{Request, Response, Status};

use crate::helpers::{eventually, fresh_database_url, test_config, with_key};
use keyward::{pb, startup};

use crate::envoy::envoy_process::{self, free_port};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Spans received, with the `service.name` of the process that sent them.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let receiver = Self::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().expect("lock").clone()
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

/// Envoy with tracing on (every request sampled) and its OpenTelemetry
/// tracer exporting to `otlp`; ext_authz to keyward; a direct 200 upstream.
fn envoy_config(ingress: u16, admin: u16, keyward: SocketAddr, otlp: SocketAddr) -> String {
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
layered_runtime:
  layers:
  - name: flush-fast
    static_layer:
      tracing.opentelemetry.flush_interval_ms: 100
      tracing.opentelemetry.min_flush_spans: 1
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ingress} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          generate_request_id: true
          tracing:
            random_sampling: {{ value: 100 }}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                service_name: envoy
                grpc_service:
                  envoy_grpc: {{ cluster_name: otlp }}
                  timeout: 1s
          route_config:
            virtual_hosts:
            - name: api
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "upstream ok" }} }}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              grpc_service:
                envoy_grpc: {{ cluster_name: keyward }}
                timeout: 2s
              failure_mode_allow: false
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: keyward
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: keyward
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {kw_port} }} }} }}
  - name: otlp
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: otlp
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {otlp_port} }} }} }}
"#,
        kw_port = keyward.port(),
        otlp_port = otlp.port(),
    )
}

async fn wait_for_port(addr: SocketAddr, what: &str) {
    eventually(Duration::from_secs(60), || async {
        TcpStream::connect(addr).await.ok().map(drop)
    })
    .await
    .unwrap_or_else(|| panic!("{what} never listened on {addr}"));
}

/// `GET /` through Envoy with the key: the status line.
async fn through_envoy(port: u16, key: &str) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to envoy");
    let request = format!(
        "GET / HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("envoy answers")
        .expect("read");
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_through_envoy_is_a_child_of_envoys_span_and_admin_calls_name_their_caller() {
    let (receiver, otlp) = Receiver::start().await;

    // The database and the first admin key, then the real binary.
    let database_url = fresh_database_url();
    let (admin, secret) = startup::bootstrap(&test_config(&database_url, &[]), "ops", "admin")
        .await
        .expect("bootstrap");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let log_path = std::env::temp_dir().join(format!("keyward-traces-{}.log", addr.port()));
    let log = std::fs::File::create(&log_path).expect("log file");
    let _keyward = Killed(
        Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("serve")
            .env("DATABASE_URL", &database_url)
            .env("KEYWARD_GRPC_ADDR", addr.to_string())
            .env("KEYWARD_METRICS_ADDR", "off")
            .env("KEYWARD_SHUTDOWN_DELAY", "0s")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
            .env("OTEL_SERVICE_NAME", "keyward-under-test")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_TRACES_SAMPLER")
            .env("KEYWARD_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start keyward"),
    );
    wait_for_port(addr, "keyward").await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut keys = pb::key_service_client::KeyServiceClient::new(channel);
    let refused = keys
        .get(with_key(
            pb::GetRequest {
                id: admin.id.to_string(),
            },
            "kw_live_not0a0real0key",
        ))
        .await
        .expect_err("a bad management key is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let minted = keys
        .mint(with_key(
            pb::MintRequest {
                owner_id: "acme".into(),
                ..Default::default()
            },
            secret.expose_secret(),
        ))
        .await
        .expect("mint")
        .into_inner();

    let (ingress, envoy_admin) = (free_port(), free_port());
    let config = std::env::temp_dir().join(format!("keyward-traces-{ingress}.yaml"));
    std::fs::write(&config, envoy_config(ingress, envoy_admin, addr, otlp)).expect("config");
    let _envoy = Killed(envoy_process::spawn(
        &envoy_process::binary(&repo()),
        &config,
        None,
    ));
    wait_for_port(
        format!("127.0.0.1:{ingress}").parse().expect("addr"),
        "envoy",
    )
    .await;
    let status = eventually(Duration::from_secs(10), || async {
        let status = through_envoy(ingress, &minted.secret).await;
        status.contains(" 200 ").then_some(status)
    })
    .await
    .map(|(s, _)| s);
    let _ = std::fs::remove_file(&config);
    assert!(status.is_some(), "the key was not allowed through Envoy");

    // keyward's check span, and the Envoy span it hangs from.
    let found = eventually(Duration::from_secs(20), || async {
        let spans = receiver.spans();
        let check = spans.iter().find(|(service, span)| {
            service == "keyward-under-test"
                && span.name == "envoy.service.auth.v3.Authorization/Check"
        })?;
        let parent = spans
            .iter()
            .find(|(service, span)| service == "envoy" && span.span_id == check.1.parent_span_id)?;
        Some((check.clone(), parent.clone()))
    })
    .await;
    let spans = receiver.spans();
    let ((_, check), (_, parent)) = found.map(|(f, _)| f).unwrap_or_else(|| {
        panic!(
            "no keyward check span under an Envoy span; received: {:#?}",
            spans
                .iter()
                .map(|(s, span)| (
                    s.clone(),
                    span.name.clone(),
                    hex(&span.trace_id),
                    hex(&span.span_id),
                    hex(&span.parent_span_id)
                ))
                .collect::<Vec<_>>()
        )
    });
    println!(
        "keyward span {:?} ({}) under Envoy span {:?} ({}) in trace {}",
        check.name,
        hex(&check.span_id),
        parent.name,
        hex(&parent.span_id),
        hex(&check.trace_id)
    );
    assert_eq!(check.trace_id, parent.trace_id, "one trace");
    assert!(!check.trace_id.iter().all(|b| *b == 0));
    assert_eq!(
        attribute(&check, "keyward.reason").as_deref(),
        Some("OK"),
        "{check:?}"
    );
    assert_eq!(
        attribute(&check, "keyward.key_id"),
        minted.key.as_ref().map(|k| k.id.clone())
    );
    // Nothing secret on the span.
    let text = format!("{check:?}");
    assert!(!text.contains(&minted.secret));

    // The Mint call's span names the method and the caller.
    let mint = spans
        .iter()
        .map(|(_, span)| span)
        .find(|span| span.name == "keyward.v1.KeyService/Mint")
        .unwrap_or_else(|| {
            panic!(
                "no Mint span: {:?}",
                spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(attribute(mint, "rpc.method").as_deref(), Some("Mint"));
    assert_eq!(
        attribute(mint, "rpc.service").as_deref(),
        Some("keyward.v1.KeyService")
    );
    assert_eq!(attribute(mint, "caller"), Some(admin.id.to_string()));
    assert_eq!(
        attribute(mint, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    assert!(!format!("{mint:?}").contains(secret.expose_secret()));
    // Its store call is a child span.
    let store = eventually_span(&receiver, |s| {
        s.name == "insert_key" && s.parent_span_id == mint.span_id
    })
    .await;
    assert_eq!(
        attribute(&store, "db.system").as_deref(),
        Some("postgresql")
    );
    logged_in_span(&log_path, &spans);
    let _ = std::fs::remove_file(&log_path);
}

/// The refused call's WARN line names the trace and span it was logged in.
fn logged_in_span(log: &std::path::Path, spans: &[(String, Span)]) {
    let text = std::fs::read_to_string(log).expect("keyward's log");
    if std::env::var_os("TEST_LOG").is_some() {
        eprintln!("{text}");
    }
    let line: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "admin call refused")
        .unwrap_or_else(|| panic!("no refusal logged as JSON:\n{text}"));
    let trace_id = line["trace_id"].as_str().expect("trace_id on the line");
    let span_id = line["span_id"].as_str().expect("span_id on the line");
    let get = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "keyward.v1.KeyService/Get")
        .expect("the refused Get has a span");
    assert_eq!(trace_id, hex(&get.trace_id), "{line}");
    assert_eq!(span_id, hex(&get.span_id), "{line}");
    assert_eq!(
        attribute(get, "rpc.grpc.status_code").as_deref(),
        Some("16"),
        "UNAUTHENTICATED"
    );
}

async fn eventually_span(receiver: &Receiver, want: impl Fn(&Span) -> bool) -> Span {
    eventually(Duration::from_secs(10), || async {
        receiver
            .spans()
            .into_iter()
            .map(|(_, s)| s)
            .find(|s| want(s))
    })
    .await
    .map(|(s, _)| s)
    .unwrap_or_else(|| {
        panic!(
            "no such span among {:?}",
            receiver
                .spans()
                .iter()
                .map(|(_, s)| &s.name)
                .collect::<Vec<_>>()
        )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
