//! Shutdown that drops no request: on SIGTERM a replica reports NOT_SERVING
//! and keeps serving for the shutdown delay, so that Envoy's active health
//! checks move traffic to the other replicas before it stops accepting;
//! then it drains and exits 0. Liveness stays SERVING throughout.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use keyward::{pb, startup};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
    sync::oneshot,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    envoy::envoy_process::{self, free_port},
    helpers::{eventually, fresh_database_url, test_config, with_key},
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

async fn channel(addr: SocketAddr) -> Channel {
    tokio::time::timeout(
        Duration::from_secs(10),
        Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

/// The health service's answer for `service` (`""`: readiness).
async fn health(channel: &Channel, service: &str) -> Option<ServingStatus> {
    let answer = tokio::time::timeout(
        Duration::from_secs(2),
        HealthClient::new(channel.clone()).check(HealthCheckRequest {
            service: service.to_owned(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    Some(answer.into_inner().status())
}

// --- the drain delay, in process ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_readiness_is_not_serving_liveness_is_and_calls_are_answered() {
    const DELAY: Duration = Duration::from_secs(1);
    let config = test_config(&fresh_database_url(), &["--shutdown-delay", "1s"]);
    let (_, admin) = startup::bootstrap(&config, "ops", "admin")
        .await
        .expect("bootstrap");
    let app = startup::Application::build(&config)
        .await
        .expect("build app");
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let conn = channel(addr).await;
    eventually(Duration::from_secs(5), || async {
        (health(&conn, "").await == Some(ServingStatus::Serving)).then_some(())
    })
    .await
    .expect("ready within 5 s");
    let minted = pb::key_service_client::KeyServiceClient::new(conn.clone())
        .mint(with_key(
            pb::MintRequest {
                owner_id: "acme".into(),
                ..Default::default()
            },
            admin.expose_secret(),
        ))
        .await
        .expect("mint")
        .into_inner();
    let check = |conn: Channel| {
        let key = minted.secret.clone();
        async move {
            pb::check_service_client::CheckServiceClient::new(conn)
                .check(pb::CheckRequest {
                    key,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    assert!(check(conn.clone()).await.expect("check").allowed);

    // The signal.
    let signalled = Instant::now();
    stop.send(()).expect("the server is running");
    let (_, noticed) = eventually(Duration::from_millis(500), || async {
        (health(&conn, "").await == Some(ServingStatus::NotServing)).then_some(())
    })
    .await
    .expect("readiness turns NOT_SERVING at once");
    println!("NOT_SERVING {noticed:?} after the signal");

    // Within the delay: not ready, alive, and answering, on the open
    // connection and on a new one (it still accepts).
    assert_eq!(
        health(&conn, "envoy.service.auth.v3.Authorization").await,
        Some(ServingStatus::NotServing),
        "the service deploy/envoy/envoy.yaml health-checks"
    );
    assert_eq!(
        health(&conn, startup::LIVENESS).await,
        Some(ServingStatus::Serving)
    );
    let resp = check(conn.clone()).await.expect("check during the delay");
    assert!(resp.allowed, "{resp:?}");
    let fresh = channel(addr).await;
    let resp = check(fresh.clone())
        .await
        .expect("check on a new connection");
    assert!(resp.allowed, "{resp:?}");
    assert_eq!(
        health(&fresh, startup::LIVENESS).await,
        Some(ServingStatus::Serving)
    );
    assert!(
        signalled.elapsed() < DELAY,
        "the probes above ran within the delay ({:?}): slow machine?",
        signalled.elapsed()
    );

    // After the delay the server drains and returns cleanly, not before.
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops within delay + grace")
        .expect("server task")
        .expect("the server ran cleanly");
    let ran = signalled.elapsed();
    println!("server returned {ran:?} after the signal");
    assert!(ran >= DELAY, "stopped before the delay was over: {ran:?}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after it returned"
    );
}

// --- SIGTERM under load, through Envoy --------------------------------------

const SHUTDOWN_DELAY: Duration = Duration::from_secs(2);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A keyward binary (`serve`), its log in a file of its own.
struct Replica {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::env::var_os("TEST_LOG").is_some() {
            eprintln!(
                "--- {} ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Replica {
    /// Starts it on a free port of its own and waits until its health
    /// service reports SERVING.
    ///
    /// The port is picked here rather than read back from the "keyward
    /// serving" log line: that line is missing when the database already
    /// exists (a per-layer log filter drops the first event after sqlx's
    /// `log::log_enabled!` check for a PostgreSQL NOTICE, tokio-rs/tracing
    /// issue 2519).
    async fn start(database_url: &str, name: &str) -> Self {
        let random = uuid::Uuid::now_v7().simple().to_string();
        let log =
            std::env::temp_dir().join(format!("keyward-shutdown-{name}-{}.log", &random[16..]));
        let file = std::fs::File::create(&log).expect("log file");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("KEYWARD_GRPC_ADDR", addr.to_string())
            .env("KEYWARD_METRICS_ADDR", "off")
            .env("KEYWARD_SHUTDOWN_DELAY", "2s")
            .env("KEYWARD_SHUTDOWN_GRACE", "5s")
            .env("KEYWARD_LOG_FORMAT", "json")
            .env_remove("RUST_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start keyward");
        let mut replica = Self { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = replica.child.try_wait() {
                panic!(
                    "{name} exited at start-up ({status}):\n{}",
                    replica.log_text()
                );
            }
            if let Ok(Ok(conn)) = tokio::time::timeout(
                Duration::from_secs(2),
                Channel::from_shared(format!("http://{addr}"))
                    .expect("uri")
                    .connect(),
            )
            .await
                && health(&conn, "").await == Some(ServingStatus::Serving)
            {
                return replica;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not ready on {addr} within 60 s:\n{}",
                replica.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines.
    fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn logged(&self, message: &str) -> bool {
        self.log_lines().iter().any(|l| l["message"] == message)
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
}

/// `kill -TERM pid`.
fn sigterm(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}: {status}");
}

/// Envoy: ext_authz (fail closed) to a cluster of both replicas, which it
/// health-checks over gRPC (readiness, service `""`) every 200 ms, one
/// failure making a host unhealthy; a direct 200 in place of an upstream.
fn envoy_config(ingress: u16, admin: u16, replicas: &[SocketAddr]) -> String {
    let endpoints: String = replicas
        .iter()
        .map(|r| {
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}\n",
                r.port()
            )
        })
        .collect();
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
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
              status_on_error: {{ code: ServiceUnavailable }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: keyward
    type: STATIC
    connect_timeout: 1s
    # One host of two down must not put the cluster in panic mode (which
    # would send traffic to unhealthy hosts too).
    common_lb_config: {{ healthy_panic_threshold: {{ value: 0 }} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: keyward
      endpoints:
      - lb_endpoints:
{endpoints}    health_checks:
    - timeout: 1s
      interval: 0.2s
      no_traffic_interval: 0.2s
      interval_jitter: 0s
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check: {{ service_name: "" }}
"#
    )
}

struct EnvoyProcess {
    child: Child,
    admin: u16,
    ingress: u16,
    config: PathBuf,
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

impl EnvoyProcess {
    async fn start(replicas: &[SocketAddr]) -> Self {
        let (ingress, admin) = (free_port(), free_port());
        let config = std::env::temp_dir().join(format!("keyward-shutdown-envoy-{ingress}.yaml"));
        std::fs::write(&config, envoy_config(ingress, admin, replicas)).expect("envoy config");
        let child = envoy_process::spawn(&envoy_process::binary(&repo()), &config, None);
        let mut envoy = Self {
            child,
            admin,
            ingress,
            config,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy exited at start-up: {status}");
            }
            if admin_get(admin, "/ready")
                .await
                .is_some_and(|(s, _)| s == 200)
            {
                break;
            }
            assert!(Instant::now() < deadline, "envoy not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        envoy
    }

    /// `/clusters`: the keyward cluster's per-host counters and health.
    async fn hosts(&self) -> Vec<HostStats> {
        let (_, body) = admin_get(self.admin, "/clusters")
            .await
            .expect("envoy admin /clusters");
        HostStats::parse(&body)
    }
}

/// A GET on Envoy's admin port: (status, body).
async fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// One keyward host as Envoy's `/clusters` shows it.
#[derive(Debug, Clone, Default)]
struct HostStats {
    port: u16,
    rq_total: u64,
    rq_error: u64,
    health_flags: String,
}

impl HostStats {
    /// Lines such as `keyward::127.0.0.1:4242::rq_total::17`.
    fn parse(body: &str) -> Vec<Self> {
        let mut hosts: Vec<Self> = Vec::new();
        for line in body.lines() {
            let mut parts = line.split("::");
            let (Some("keyward"), Some(host), Some(stat), Some(value)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(port) = host.rsplit_once(':').and_then(|(_, p)| p.parse().ok()) else {
                continue;
            };
            let i = match hosts.iter().position(|h| h.port == port) {
                Some(i) => i,
                None => {
                    hosts.push(Self {
                        port,
                        ..Self::default()
                    });
                    hosts.len() - 1
                }
            };
            let h = &mut hosts[i];
            match stat {
                "rq_total" => h.rq_total = value.parse().unwrap_or(0),
                "rq_error" => h.rq_error = value.parse().unwrap_or(0),
                "health_flags" => h.health_flags = value.to_owned(),
                _ => {}
            }
        }
        hosts
    }

    fn of(hosts: &[Self], addr: SocketAddr) -> Self {
        hosts
            .iter()
            .find(|h| h.port == addr.port())
            .cloned()
            .unwrap_or_else(|| panic!("no host {addr} in envoy's /clusters: {hosts:?}"))
    }
}

/// What one load loop saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// The first few failures, described.
    failures: Vec<String>,
}

/// Requests `GET /` with the key through Envoy, one after another on a
/// kept-alive connection (a new one if it closes), until `stop` or the
/// bounds (`MAX_REQUESTS`, `MAX_TIME`).
async fn load_loop(port: u16, key: String, stop: Arc<AtomicBool>) -> Tally {
    const MAX_REQUESTS: u64 = 200_000;
    const MAX_TIME: Duration = Duration::from_secs(20);
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut sender = None;
    let fail = |tally: &mut Tally, what: String| {
        tally.failed += 1;
        if tally.failures.len() < 10 {
            tally
                .failures
                .push(format!("{:?}: {what}", started.elapsed()));
        }
    };
    while !stop.load(Ordering::Relaxed)
        && tally.ok + tally.failed < MAX_REQUESTS
        && started.elapsed() < MAX_TIME
    {
        if sender.is_none() {
            match connect(port).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    fail(&mut tally, format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else {
            continue;
        };
        let req = hyper::Request::get("/")
            .header("host", "api.example.com")
            .header("authorization", format!("Bearer {key}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes()))
        })
        .await;
        match answer {
            Ok(Ok((200, _))) => tally.ok += 1,
            Ok(Ok((status, body))) => fail(
                &mut tally,
                format!("{status}: {}", String::from_utf8_lossy(&body)),
            ),
            Ok(Err(e)) => {
                fail(&mut tally, e);
                sender = None;
            }
            Err(_) => {
                fail(&mut tally, "no answer within 5 s".to_owned());
                sender = None;
            }
        }
    }
    tally
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(port: u16) -> Result<Sender, String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_through_envoy_drops_no_request_and_the_replica_exits_cleanly() {
    const LOOPS: usize = 4;
    // The database and the first admin key, then two real binaries on it.
    let database_url = fresh_database_url();
    let (_, admin) = startup::bootstrap(&test_config(&database_url, &[]), "ops", "admin")
        .await
        .expect("bootstrap");
    let (leaving, staying) = tokio::join!(
        Replica::start(&database_url, "leaving"),
        Replica::start(&database_url, "staying")
    );
    let mut leaving = leaving;
    let minted = pb::key_service_client::KeyServiceClient::new(channel(staying.addr).await)
        .mint(with_key(
            pb::MintRequest {
                owner_id: "acme".into(),
                ..Default::default()
            },
            admin.expose_secret(),
        ))
        .await
        .expect("mint")
        .into_inner();
    // Both replicas know the key before the load starts.
    for replica in [&leaving, &staying] {
        let resp = pb::check_service_client::CheckServiceClient::new(channel(replica.addr).await)
            .check(pb::CheckRequest {
                key: minted.secret.clone(),
                ..Default::default()
            })
            .await
            .expect("check")
            .into_inner();
        assert!(resp.allowed, "{resp:?}");
    }

    let envoy = EnvoyProcess::start(&[leaving.addr, staying.addr]).await;
    let healthy = eventually(Duration::from_secs(10), || async {
        let hosts = envoy.hosts().await;
        [leaving.addr, staying.addr]
            .iter()
            .all(|a| HostStats::of(&hosts, *a).health_flags == "healthy")
            .then_some(())
    })
    .await;
    if healthy.is_none() {
        panic!(
            "both hosts healthy in envoy within 10 s: {:?}",
            envoy.hosts().await
        );
    }

    let idle = envoy.hosts().await;

    // The load.
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = (0..LOOPS)
        .map(|_| {
            tokio::spawn(load_loop(
                envoy.ingress,
                minted.secret.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = envoy.hosts().await;

    // SIGTERM to one replica, under load.
    let signalled = Instant::now();
    sigterm(leaving.pid());
    let status = tokio::time::timeout(
        SHUTDOWN_DELAY + SHUTDOWN_GRACE + Duration::from_secs(3),
        leaving.child.wait(),
    )
    .await
    .unwrap_or_else(|_| {
        stop.store(true, Ordering::Relaxed);
        panic!(
            "the replica did not exit within delay + grace + 3 s:\n{}",
            leaving.log_text()
        )
    })
    .expect("wait for the replica");
    let exited = signalled.elapsed();
    let at_exit = envoy.hosts().await;
    // The load goes on after the exit.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for load in loads {
        let tally = tokio::time::timeout(Duration::from_secs(30), load)
            .await
            .expect("a load loop ends")
            .expect("load task");
        total.ok += tally.ok;
        total.failed += tally.failed;
        total.failures.extend(tally.failures);
    }
    let after = envoy.hosts().await;
    let (l, s) = (leaving.addr, staying.addr);
    println!(
        "exit {status} {exited:?} after SIGTERM; {} requests allowed, {} failed",
        total.ok, total.failed
    );
    println!(
        "envoy rq_total leaving/staying: before the signal {}/{}, at exit {}/{}, at the end {}/{}",
        HostStats::of(&before, l).rq_total,
        HostStats::of(&before, s).rq_total,
        HostStats::of(&at_exit, l).rq_total,
        HostStats::of(&at_exit, s).rq_total,
        HostStats::of(&after, l).rq_total,
        HostStats::of(&after, s).rq_total,
    );
    println!("leaving host at the end: {:?}", HostStats::of(&after, l));

    assert_eq!(
        total.failed, 0,
        "requests failed at the client: {:?}",
        total.failures
    );
    assert!(total.ok > 0);
    assert!(
        status.success(),
        "the replica exited with {status}:\n{}",
        leaving.log_text()
    );
    assert!(
        exited >= SHUTDOWN_DELAY,
        "exited before the delay was over: {exited:?}"
    );
    // Both replicas had answered checks of the load before the signal.
    for (name, addr) in [("leaving", l), ("staying", s)] {
        let served = HostStats::of(&before, addr).rq_total - HostStats::of(&idle, addr).rq_total;
        assert!(
            served >= 10,
            "envoy sent the {name} replica {served} checks before the signal: {idle:?} -> {before:?}"
        );
    }
    // The staying replica took the load after the leaving one exited.
    assert!(
        HostStats::of(&after, s).rq_total > HostStats::of(&at_exit, s).rq_total,
        "no load after the exit: {at_exit:?} -> {after:?}"
    );
    assert_eq!(
        HostStats::of(&after, l).rq_total,
        HostStats::of(&at_exit, l).rq_total,
        "requests went to the replica after it exited"
    );
    assert_eq!(HostStats::of(&after, l).rq_error, 0, "{after:?}");
    assert_ne!(HostStats::of(&after, l).health_flags, "healthy");
    // The replica went through the steps, and drained within the grace.
    assert!(leaving.logged("shutdown requested; NOT_SERVING, still serving for the delay"));
    assert!(leaving.logged("keyward stopped"), "{}", leaving.log_text());
    assert!(
        !leaving.logged("grace period over with calls still in flight; exiting"),
        "{}",
        leaving.log_text()
    );
    drop(staying);
}
