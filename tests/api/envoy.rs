//! keyward behind the real Envoy, configured by the repository's own
//! `deploy/envoy/envoy.yaml` (ports swapped for free loopback ones), with an
//! upstream that records the headers it receives.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, body::Bytes, header::HeaderMap, service::service_fn};
use hyper_util::rt::TokioIo;
use keyward::pb;
use tokio::net::TcpListener;

use crate::helpers::{TestApp, never_minted, spawn_app, spawn_app_with, spawn_replica};

// Shared with benches/suite, which uses parts this file does not.
#[allow(dead_code)]
#[path = "../support/envoy.rs"]
pub mod envoy_process;
use envoy_process::{Envoy, Options, Targets, test_config};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An upstream API that answers 200 and remembers every request's headers.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        record.lock().expect("lock").push(req.headers().clone());
                        async {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                                "upstream ok",
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    fn requests(&self) -> Vec<HeaderMap> {
        self.seen.lock().expect("lock").clone()
    }
}

/// The real Envoy on the example configuration, in front of keyward and the
/// recording upstream.
async fn start_envoy(keyward: SocketAddr, upstream: SocketAddr, raw_headers: bool) -> Envoy {
    Envoy::start(
        &envoy_process::binary(&repo()),
        &repo(),
        Targets {
            authz_port: keyward.port(),
            upstream_port: Some(upstream.port()),
        },
        Options {
            raw_headers,
            cpus: None,
        },
    )
    .await
}

/// A request through Envoy's ingress.
async fn get(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Answer {
    http_get(envoy.port, path, headers)
        .await
        .expect("request through envoy")
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts a keyward denial: status, reason header and JSON body.
    fn assert_denied(&self, status: u16, reason: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("x-keyward-reason"), Some(reason), "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        let body = self.json();
        assert_eq!(body["error"], reason);
        assert_eq!(body["status"], status);
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        if status == 401 {
            let challenge = self
                .header("www-authenticate")
                .expect("www-authenticate on 401");
            assert!(
                challenge.starts_with(r#"Bearer realm="keyward""#),
                "{challenge}"
            );
        } else {
            assert_eq!(self.header("www-authenticate"), None);
        }
    }
}

async fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
    http_get_from("127.0.0.1", port, path, headers).await
}

/// A request from a chosen loopback address (`curl --interface`): Envoy
/// reports it to keyward as the downstream client.
async fn http_get_from(
    from: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(format!("{from}:0").parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| e.to_string())?;
    let stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "api.example.com");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn mint(app: &TestApp, scopes: &[&str], resources: &[&str]) -> (String, String) {
    let minted = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    (minted.secret, minted.key.expect("key").id)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The upstream got exactly one more request, carrying keyward's identity
/// headers and none of the credentials.
fn assert_forwarded(upstream: &Upstream, before: usize, key_id: &str, scopes: &str) {
    let requests = upstream.requests();
    assert_eq!(
        requests.len(),
        before + 1,
        "one request reached the upstream"
    );
    let seen = &requests[before];
    assert_eq!(header(seen, "x-keyward-key-id"), Some(key_id));
    assert_eq!(header(seen, "x-keyward-owner-id"), Some("acme"));
    assert_eq!(header(seen, "x-keyward-scopes"), Some(scopes));
    assert_eq!(
        header(seen, "x-api-key"),
        None,
        "credential leaked upstream"
    );
    assert_eq!(
        header(seen, "authorization"),
        None,
        "credential leaked upstream"
    );
}

#[tokio::test]
async fn envoy_refuses_requests_without_a_valid_key_with_401_json() {
    let app = spawn_app().await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, false).await;
    let stranger = never_minted();

    get(&envoy, "/billing/invoices", &[])
        .await
        .assert_denied(401, "MISSING_KEY");
    get(
        &envoy,
        "/billing/invoices",
        &[("x-api-key", "kw_live_not-a-key")],
    )
    .await
    .assert_denied(401, "MALFORMED_KEY");
    get(
        &envoy,
        "/billing/invoices",
        &[("authorization", "Basic dXNlcjpwYXNz")],
    )
    .await
    .assert_denied(401, "MALFORMED_KEY");
    get(
        &envoy,
        "/billing/invoices",
        &[("x-api-key", stranger.expose_secret())],
    )
    .await
    .assert_denied(401, "UNKNOWN_KEY");
    assert!(
        upstream.requests().is_empty(),
        "a refused request reached the upstream"
    );

    // Routes with ext_authz disabled need no key.
    assert_eq!(get(&envoy, "/public/status", &[]).await.status, 200);
}

#[tokio::test]
async fn envoy_forwards_a_valid_key_as_identity_headers_and_strips_the_credential() {
    let app = spawn_app().await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, false).await;
    let (key, id) = mint(&app, &["invoices:read"], &["billing"]).await;

    let bearer = format!("Bearer {key}");
    let cases: [&[(&str, &str)]; 4] = [
        &[("x-api-key", &key)],
        &[("authorization", &bearer)],
        // Both, carrying the same key.
        &[("authorization", &bearer), ("x-api-key", &key)],
        // A client cannot pass itself off as another owner.
        &[
            ("x-api-key", &key),
            ("x-keyward-owner-id", "globex"),
            ("x-keyward-key-id", "forged"),
        ],
    ];
    for headers in cases {
        let before = upstream.requests().len();
        let answer = get(&envoy, "/billing/invoices", headers).await;
        assert_eq!(answer.status, 200, "{headers:?}: {answer:?}");
        assert_eq!(answer.body, "upstream ok");
        assert_forwarded(&upstream, before, &id, "invoices:read");
    }

    // Two different keys at once are refused.
    let (other, _) = mint(&app, &["invoices:read"], &[]).await;
    get(
        &envoy,
        "/billing/invoices",
        &[("authorization", &bearer), ("x-api-key", &other)],
    )
    .await
    .assert_denied(401, "MALFORMED_KEY");
}

#[tokio::test]
async fn envoy_enforces_the_routes_resource_and_scopes_and_the_client_address() {
    let app = spawn_app().await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, false).await;
    let (orders_key, _) = mint(&app, &["invoices:read"], &["orders"]).await;
    let (reader, reader_id) = mint(&app, &["invoices:read"], &["billing"]).await;

    // /billing is resource "billing": a key for "orders" only is refused.
    get(&envoy, "/billing/invoices", &[("x-api-key", &orders_key)])
        .await
        .assert_denied(403, "RESOURCE_FORBIDDEN");
    // /billing/admin also needs invoices:write.
    let answer = get(&envoy, "/billing/admin/refunds", &[("x-api-key", &reader)]).await;
    answer.assert_denied(403, "SCOPE_MISSING");
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invoices:write")
    );
    assert!(upstream.requests().is_empty());

    // The client address Envoy reports is matched against ip_allow.
    let ip_key = |allow: &'static str| {
        app.mint(pb::MintRequest {
            owner_id: "acme".into(),
            scopes: vec!["invoices:read".into()],
            ip_allow: vec![allow.into()],
            ..Default::default()
        })
    };
    let elsewhere = ip_key("10.0.0.0/8").await.secret;
    get(&envoy, "/billing/invoices", &[("x-api-key", &elsewhere)])
        .await
        .assert_denied(403, "IP_FORBIDDEN");
    assert!(upstream.requests().is_empty());
    let loopback = ip_key("127.0.0.0/8").await.secret;
    assert_eq!(
        get(&envoy, "/billing/invoices", &[("x-api-key", &loopback)])
            .await
            .status,
        200
    );

    // The same key is fine where its resource and scopes suffice.
    assert_eq!(
        get(&envoy, "/billing/invoices", &[("x-api-key", &reader)])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&envoy, "/orders/42", &[("x-api-key", &orders_key)])
            .await
            .status,
        200
    );
    assert_eq!(upstream.requests().len(), 3);
    assert_eq!(
        header(&upstream.requests()[1], "x-keyward-key-id"),
        Some(reader_id.as_str())
    );
}

#[tokio::test]
async fn a_key_revoked_through_the_api_is_refused_by_envoy_on_the_next_request() {
    let app = spawn_app().await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, false).await;
    let (key, id) = mint(&app, &["invoices:read"], &[]).await;
    assert_eq!(
        get(&envoy, "/billing/invoices", &[("x-api-key", &key)])
            .await
            .status,
        200
    );

    app.revoke(&id).await;

    get(&envoy, "/billing/invoices", &[("x-api-key", &key)])
        .await
        .assert_denied(401, "REVOKED");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn envoy_fails_closed_when_keyward_cannot_decide_or_is_down() {
    let mut app = spawn_app().await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, false).await;
    let (key, _) = mint(&app, &["invoices:read"], &[]).await;
    assert_eq!(
        get(&envoy, "/billing/invoices", &[("x-api-key", &key)])
            .await
            .status,
        200
    );

    // keyward up but its database gone: a key it has not cached cannot be
    // decided; keyward answers UNAVAILABLE and Envoy applies status_on_error.
    app.cut_off_database().await;
    let stranger = never_minted();
    let answer = get(
        &envoy,
        "/billing/invoices",
        &[("x-api-key", stranger.expose_secret())],
    )
    .await;
    assert_eq!(answer.status, 503, "{answer:?}");

    // keyward stopped: the same configured failure status, for every key.
    app.stop().await;
    for headers in [&[("x-api-key", key.as_str())][..], &[]] {
        let answer = get(&envoy, "/billing/invoices", headers).await;
        assert_eq!(answer.status, 503, "{answer:?}");
    }
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the request made while keyward was up"
    );
}

#[tokio::test]
async fn envoy_with_encode_raw_headers_works_the_same() {
    let app = spawn_app().await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, true).await;
    let (key, id) = mint(&app, &["invoices:read"], &["billing"]).await;

    get(&envoy, "/billing/invoices", &[])
        .await
        .assert_denied(401, "MISSING_KEY");
    for headers in [
        [("x-api-key", key.clone())],
        [("authorization", format!("bearer {key}"))],
    ] {
        let before = upstream.requests().len();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer = get(&envoy, "/billing/invoices", &headers).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_forwarded(&upstream, before, &id, "invoices:read");
    }
}

#[tokio::test]
async fn a_client_guessing_keys_through_envoy_gets_429_and_other_clients_are_unaffected() {
    let app = spawn_app_with(&["--brute-force-cooldown", "2s"]).await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, false).await;
    let (key, _) = mint(&app, &["invoices:read"], &[]).await;
    let from = |ip: &'static str, key: String| {
        let port = envoy.port;
        async move {
            http_get_from(ip, port, "/billing/invoices", &[("x-api-key", &key)])
                .await
                .expect("request through envoy")
        }
    };

    // 30 unknown keys from 127.0.0.7: the threshold (20) is reached, then
    // that address is refused before any lookup.
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let answer = from("127.0.0.7", never_minted().expose_secret().to_owned()).await;
        statuses.push(answer.status);
        if answer.status == 429 {
            answer.assert_denied(429, "RATE_LIMITED");
            let retry: u64 = answer
                .header("retry-after")
                .expect("retry-after on 429")
                .parse()
                .expect("seconds");
            assert!((1..=2).contains(&retry), "retry-after {retry}");
        } else {
            answer.assert_denied(401, "UNKNOWN_KEY");
        }
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        20,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        10,
        "{statuses:?}"
    );
    // Blocked is blocked: a valid key from there is refused too (answering it
    // differently would tell the guesser which keys are real).
    assert_eq!(from("127.0.0.7", key.clone()).await.status, 429);

    // Another client is not affected.
    assert_eq!(from("127.0.0.8", key.clone()).await.status, 200);

    // After the cooldown the first client is served again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(from("127.0.0.7", key.clone()).await.status, 200);
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_client_sent_identity_header_never_reaches_the_upstream_on_any_route() {
    let app = spawn_app().await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, false).await;
    let (key, id) = mint(&app, &["invoices:read"], &[]).await;
    let forged: &[(&str, &str)] = &[
        ("x-keyward-owner-id", "victim"),
        ("x-keyward-key-id", "forged"),
        ("x-keyward-scopes", "everything"),
        ("x-keyward-reason", "OK"),
        ("x-keyward-anything", "else"),
    ];

    // A route with ext_authz disabled: nothing of keyward's may pass.
    let answer = get(&envoy, "/public/status", forged).await;
    assert_eq!(answer.status, 200);
    // Routes with ext_authz: keyward's own values, and nothing else of theirs.
    for path in ["/billing/invoices", "/orders/1"] {
        let mut headers = forged.to_vec();
        headers.push(("x-api-key", &key));
        assert_eq!(get(&envoy, path, &headers).await.status, 200, "{path}");
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3);
    for name in [
        "x-keyward-owner-id",
        "x-keyward-key-id",
        "x-keyward-scopes",
        "x-keyward-reason",
    ] {
        assert_eq!(header(&seen[0], name), None, "{name} reached /public");
    }
    for authorized in &seen[1..] {
        assert_eq!(header(authorized, "x-keyward-owner-id"), Some("acme"));
        assert_eq!(header(authorized, "x-keyward-key-id"), Some(id.as_str()));
        assert_eq!(
            header(authorized, "x-keyward-scopes"),
            Some("invoices:read")
        );
        assert_eq!(header(authorized, "x-keyward-reason"), Some("OK"));
        assert_eq!(authorized.get_all("x-keyward-owner-id").iter().count(), 1);
    }
    assert!(
        seen.iter()
            .all(|h| header(h, "x-keyward-anything").is_none())
    );
}

#[tokio::test]
async fn a_host_header_naming_another_resource_gains_nothing() {
    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext, CheckRequest as EnvoyCheck, attribute_context,
        authorization_client::AuthorizationClient,
    };
    let app = spawn_app().await;
    let (orders_only, _) = mint(&app, &[], &["orders"]).await;
    let (unlimited, _) = mint(&app, &[], &[]).await;
    // A route without a `resource` context extension, and a client naming
    // the resource it wants in the Host header.
    let check = |key: &str| EnvoyCheck {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    host: "orders".into(),
                    path: "/anything".into(),
                    headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let code = |app: &TestApp, key: String| {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
            .expect("uri")
            .connect_lazy();
        async move {
            AuthorizationClient::new(channel)
                .check(check(&key))
                .await
                .expect("check")
                .into_inner()
                .status
                .expect("status")
                .code
        }
    };
    assert_eq!(
        code(&app, orders_only.clone()).await,
        tonic::Code::PermissionDenied as i32,
        "the Host header is not a resource"
    );
    assert_eq!(
        code(&app, unlimited).await,
        0,
        "keys valid everywhere still are"
    );

    // Only an operator can opt into the Host fallback.
    let opted = spawn_replica(&app, &["--envoy-host-as-resource", "true"]).await;
    assert_eq!(code(&opted, orders_only).await, 0);
}

#[tokio::test]
async fn a_suspended_owners_key_gets_403_through_envoy_on_two_replicas_until_resumed() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let upstream = Upstream::start().await;
    let envoys = [
        start_envoy(a.addr, upstream.addr, false).await,
        start_envoy(b.addr, upstream.addr, false).await,
    ];
    let (key, _) = mint(&a, &["invoices:read"], &[]).await;
    for envoy in &envoys {
        assert_eq!(
            get(envoy, "/billing/invoices", &[("x-api-key", &key)])
                .await
                .status,
            200
        );
    }

    crate::lifecycle::set_owner_state(&a, "acme", pb::owner::State::Suspended, "unpaid").await;
    for envoy in &envoys {
        let answer = eventually_status(envoy, &key, 403).await;
        answer.assert_denied(403, "OWNER_INACTIVE");
    }
    crate::lifecycle::set_owner_state(&a, "acme", pb::owner::State::Active, "").await;
    for envoy in &envoys {
        eventually_status(envoy, &key, 200).await;
    }
}

/// The answer through `envoy` once it has `status`, within a second.
async fn eventually_status(envoy: &Envoy, key: &str, status: u16) -> Answer {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let answer = get(envoy, "/billing/invoices", &[("x-api-key", key)]).await;
        if answer.status == status {
            return answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {} instead of {status}: {answer:?}",
            answer.status
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_canary_keys_denial_through_envoy_is_byte_identical_to_an_unknown_keys() {
    let app = spawn_app().await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(app.addr, upstream.addr, false).await;
    let canary = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            canary: true,
            ..Default::default()
        })
        .await;
    let logs = crate::helpers::CapturedLogs::start();
    let tripped = get(
        &envoy,
        "/billing/invoices",
        &[("x-api-key", &canary.secret)],
    )
    .await;
    let unknown = get(
        &envoy,
        "/billing/invoices",
        &[("x-api-key", never_minted().expose_secret())],
    )
    .await;
    tripped.assert_denied(401, "UNKNOWN_KEY");
    assert_eq!(tripped.status, unknown.status);
    assert_eq!(tripped.body, unknown.body);
    let without_date = |h: &HeaderMap| {
        let mut v: Vec<(String, Vec<u8>)> = h
            .iter()
            .filter(|(k, _)| k.as_str() != "date")
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        without_date(&tripped.headers),
        without_date(&unknown.headers)
    );
    assert!(upstream.requests().is_empty());

    let id = canary.key.expect("key").id;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE key_id = $1::uuid AND action = 'key.canary_tripped' \
         AND details->>'resource' = 'billing' AND host(remote_addr) = '127.0.0.1'",
    )
    .bind(&id)
    .fetch_one(&app.db)
    .await
    .expect("audit");
    let n = if n == 1 {
        n
    } else {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::query_scalar(
            "SELECT count(*) FROM audit_events WHERE key_id = $1::uuid AND action = 'key.canary_tripped'",
        )
        .bind(&id)
        .fetch_one(&app.db)
        .await
        .expect("audit")
    };
    assert_eq!(n, 1, "one audit event for the presentation");
    let line = logs.find("canary key presented").expect("a WARN line");
    assert!(
        line.contains("127.0.0.1") && line.contains("billing"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_limit_a_key_gets_429_through_envoy_with_the_ratelimit_headers() {
    use crate::limits::{mint_limited, window};
    let redis = crate::helpers::private::PrivateRedis::start().await;
    // Redis may take its time on a starved machine: a fall back to the
    // replicas' own limits would allow more than the limit.
    let flags = ["--redis-url", &redis.url(), "--redis-timeout", "2s"];
    let a = spawn_app_with(&flags).await;
    let b = spawn_replica(&a, &flags).await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(a.addr, upstream.addr, false).await;
    // Until a replica is connected to Redis its checks fall back to local
    // limits; wait for both with another key.
    let warm_up = mint_limited(&a, vec![window("burst", 1000, 10)], None)
        .await
        .secret;
    for replica in [&a, &b] {
        crate::helpers::eventually(Duration::from_secs(5), || async {
            replica.check_key(&warm_up).await.ok()?;
            (replica
                .replica
                .checker()
                .rate_limiter()
                .stats()
                .redis_checks()
                > 0)
            .then_some(())
        })
        .await
        .expect("redis answers");
    }
    let key = mint_limited(&a, vec![window("burst", 50, 10)], None)
        .await
        .secret;

    // Allowed answers tell the client how the window stands.
    let started = std::time::Instant::now();
    let first = get(&envoy, "/billing/invoices", &[("x-api-key", &key)]).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(
        first.header("ratelimit-policy"),
        Some(r#""burst";q=50;w=10"#)
    );
    let current = first.header("ratelimit").expect("ratelimit on an allow");
    assert!(current.starts_with(r#""burst";r="#), "{current}");
    // The rest of the allow (it is the cached part, the RateLimit headers
    // come after it) was applied too: identity in, credential out.
    let seen = &upstream.requests()[0];
    assert!(header(seen, "x-keyward-key-id").is_some(), "{seen:?}");
    assert_eq!(header(seen, "x-keyward-reason"), Some("OK"));
    assert_eq!(
        header(seen, "x-api-key"),
        None,
        "credential leaked upstream"
    );

    // Spend the rest over both replicas, then the next through Envoy. One
    // use comes back every 10 s / 50 = 200 ms (GCRA): the next is refused
    // unless the spending took longer than that, as on a starved machine;
    // then the uses that came back meanwhile go through first, and no more.
    let mut spent = 1;
    for i in 0..100 {
        let replica = if i % 2 == 0 { &a } else { &b };
        if replica.check_key(&key).await.expect("check").allowed {
            spent += 1;
        }
        if spent == 50 {
            break;
        }
    }
    assert_eq!(spent, 50);
    let mut refused = get(&envoy, "/billing/invoices", &[("x-api-key", &key)]).await;
    let mut came_back = 0;
    while refused.status == 200 && came_back < 50 {
        came_back += 1;
        refused = get(&envoy, "/billing/invoices", &[("x-api-key", &key)]).await;
    }
    let took = started.elapsed();
    println!("{came_back} uses came back in {took:?}");
    assert!(
        came_back as u128 <= took.as_millis() / 200,
        "{came_back} allowed beyond the limit in {took:?}"
    );
    for replica in [&a, &b] {
        assert_eq!(
            replica.replica.checker().rate_limiter().stats().fallbacks(),
            0,
            "a check fell back to local limits"
        );
    }
    refused.assert_denied(429, "RATE_LIMITED");
    let retry: u64 = refused
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=10).contains(&retry), "{retry}");
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some(r#""burst";q=50;w=10"#)
    );
    let current = refused.header("ratelimit").expect("ratelimit on a 429");
    assert!(current.starts_with(r#""burst";r=0;t="#), "{current}");
    assert_eq!(
        upstream.requests().len(),
        1 + came_back,
        "only the allowed went upstream"
    );
}

#[test]
fn every_port_in_the_example_config_is_swapped() {
    let template = std::fs::read_to_string(repo().join("deploy/envoy/envoy.yaml")).expect("read");
    let yaml = test_config(
        &template,
        &[
            ("ingress", 1),
            ("admin", 2),
            ("demo-upstream", 3),
            ("keyward", 4),
            ("upstream", 5),
        ],
        true,
    );
    for default in ["10000", "9901", "8080", "50051"] {
        let line = format!("port_value: {default}");
        assert!(!yaml.contains(&line), "{line} left in the test config");
    }
    assert!(
        !yaml.contains("address: 0.0.0.0"),
        "a listener left off loopback"
    );
}
