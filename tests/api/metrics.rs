//! `/metrics` counts exactly what was done, as an independent parser (the
//! Python `prometheus_client` one, scripts/parse_metrics.py) reads it; the
//! dashboard and alert rules name only metrics it exposes; and the HTTP
//! probes answer.

use std::{collections::BTreeMap, path::Path, process::Stdio, time::Duration};

use keyward::pb::{self, Reason};
use prost_types::FieldMask;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::Command,
};

use crate::{
    helpers::{TestApp, eventually, heard, never_minted, reason, spawn_app_with, with_key},
    limits::{credits, window},
};

/// Adds an expected change to a series.
type Add<'a> = dyn FnMut(&str, &[(&str, &str)], f64) + 'a;

/// One sample as scripts/parse_metrics.py prints it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Sample {
    family: String,
    #[serde(rename = "type")]
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: serde_json::Value,
}

/// A parsed scrape: samples by name and labels.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .and_then(|s| s.value.as_f64())
            .unwrap_or(0.0)
    }

    /// Every counter sample (and histogram count), keyed by name and labels.
    fn counters(&self) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|s| {
                (s.kind == "counter" && s.name.ends_with("_total"))
                    || (s.kind == "histogram" && s.name.ends_with("_count"))
            })
            .map(|s| {
                (
                    series(&s.name, &s.labels),
                    s.value.as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    }

    fn families(&self) -> Vec<String> {
        let mut f: Vec<String> = self.samples.iter().map(|s| s.family.clone()).collect();
        f.sort();
        f.dedup();
        f
    }
}

fn series(name: &str, labels: &BTreeMap<String, String>) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> std::path::PathBuf {
    repo().join(".tools/bin/python3")
}

/// An HTTP/1.1 GET on the metrics address: (status, content type, body).
async fn get(app: &TestApp, path: &str, accept: &str) -> (u16, String, String) {
    let addr = app.replica.metrics_addr().expect("metrics are on");
    let mut conn = TcpStream::connect(addr).await.expect("connect to metrics");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw))
        .await
        .expect("metrics answer in time")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// The scrape in `format` (`text` or `openmetrics`), through the parser.
async fn scrape(app: &TestApp, format: &str) -> Scrape {
    let accept = match format {
        "openmetrics" => "application/openmetrics-text; version=1.0.0",
        _ => "text/plain",
    };
    let (status, content_type, body) = get(app, "/metrics", accept).await;
    assert_eq!(status, 200, "{body}");
    match format {
        "openmetrics" => assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        ),
        _ => assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        ),
    }
    let mut parser = Command::new(python())
        .arg(repo().join("scripts/parse_metrics.py"))
        .args(["--format", format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/parse_metrics.py (scripts/test installs its Python tools)");
    let mut stdin = parser.stdin.take().expect("stdin");
    stdin.write_all(body.as_bytes()).await.expect("feed");
    drop(stdin);
    let out = parser.wait_with_output().await.expect("parser output");
    assert!(
        out.status.success(),
        "the Prometheus parser refused the {format} scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    Scrape {
        samples: serde_json::from_slice(&out.stdout).expect("parser JSON"),
    }
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

async fn check(app: &TestApp, req: pb::CheckRequest) -> Reason {
    reason(&app.check(req).await.expect("check"))
}

fn key(secret: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        key: secret.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_counter_moves_by_exactly_what_was_done() {
    // No usage write, and no background re-read, during the test.
    let app = spawn_app_with(&["--usage-flush-interval", "1h", "--cache-ttl", "1h"]).await;
    let mint = |req: pb::MintRequest| {
        let app = &app;
        async move { app.mint(req).await }
    };
    let owned = |owner: &str| pb::MintRequest {
        owner_id: owner.into(),
        ..Default::default()
    };
    let valid = mint(owned("acme")).await.secret;
    let doomed = mint(owned("acme")).await;
    let disabled = mint(owned("acme")).await;
    let expiring = mint(pb::MintRequest {
        expiry: Some(pb::mint_request::Expiry::Ttl(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        })),
        ..owned("acme")
    })
    .await;
    let ip_bound = mint(pb::MintRequest {
        ip_allow: vec!["10.0.0.0/8".into()],
        ..owned("acme")
    })
    .await
    .secret;
    let billing_only = mint(pb::MintRequest {
        resources: vec!["billing".into()],
        ..owned("acme")
    })
    .await
    .secret;
    let reader = mint(pb::MintRequest {
        scopes: vec!["invoices:read".into()],
        ..owned("acme")
    })
    .await
    .secret;
    let limited = mint(pb::MintRequest {
        rate_limits: vec![window("minute", 1, 60)],
        ..owned("acme")
    })
    .await
    .secret;
    let credited = mint(pb::MintRequest {
        credits: credits(1),
        ..owned("acme")
    })
    .await
    .secret;
    let suspended = mint(owned("globex")).await.secret;
    // Every creation notice is in before the first scrape.
    heard(&app, "key_created", 10).await;
    let before = scrape(&app, "text").await;

    let mut expected: BTreeMap<String, f64> = BTreeMap::new();
    let mut add = |name: &str, labels: &[(&str, &str)], n: f64| {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        *expected.entry(series(name, &labels)).or_default() += n;
    };
    let checked = |add: &mut Add<'_>, reason: &str| {
        add(
            "keyward_checks_total",
            &[("door", "check"), ("reason", reason)],
            1.0,
        );
        add(
            "keyward_check_duration_seconds_count",
            &[("door", "check")],
            1.0,
        );
    };
    // A key evicted (or due for a re-read) is read from the store. (Keys are
    // cached on the replica that minted them: their first check is a hit.)
    let first = |add: &mut Add<'_>| {
        add("keyward_cache_misses_total", &[], 1.0);
        add("keyward_store_lookups_total", &[("result", "found")], 1.0);
        add("keyward_store_lookup_duration_seconds_count", &[], 1.0);
    };
    let hit = |add: &mut Add<'_>| {
        add("keyward_cache_hits_total", &[], 1.0);
    };

    // Allowed three times, from the cache.
    for _ in 0..3 {
        assert_eq!(check(&app, key(&valid)).await, Reason::Ok);
        checked(&mut add, "OK");
        hit(&mut add);
    }
    // And once through the Envoy front door, from the cache.
    let envoy = {
        use envoy_types::pb::envoy::service::auth::v3::{
            AttributeContext, CheckRequest as EnvoyCheck, attribute_context,
            authorization_client::AuthorizationClient,
        };
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
            .expect("uri")
            .connect_lazy();
        AuthorizationClient::new(channel)
            .check(EnvoyCheck {
                attributes: Some(AttributeContext {
                    request: Some(attribute_context::Request {
                        http: Some(attribute_context::HttpRequest {
                            headers: [("authorization".to_owned(), format!("Bearer {valid}"))]
                                .into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            })
            .await
            .expect("envoy check")
            .into_inner()
    };
    assert_eq!(envoy.status.expect("status").code, 0);
    add(
        "keyward_checks_total",
        &[("door", "envoy"), ("reason", "OK")],
        1.0,
    );
    add(
        "keyward_check_duration_seconds_count",
        &[("door", "envoy")],
        1.0,
    );
    hit(&mut add);

    // No key, and a malformed one: answered before any lookup.
    assert_eq!(check(&app, key("")).await, Reason::MissingKey);
    checked(&mut add, "MISSING_KEY");
    assert_eq!(check(&app, key("not-a-key")).await, Reason::MalformedKey);
    checked(&mut add, "MALFORMED_KEY");

    // A key never minted: the filter rules it out, the budget pays for one
    // lookup (in case it was minted elsewhere a moment ago), and the second
    // time the cache of unknown keys answers.
    let forged = never_minted();
    for i in 0..2 {
        assert_eq!(
            check(&app, key(forged.expose_secret())).await,
            Reason::UnknownKey
        );
        checked(&mut add, "UNKNOWN_KEY");
        if i == 0 {
            add("keyward_cache_misses_total", &[], 1.0);
            add("keyward_unknown_key_budget_lookups_total", &[], 1.0);
            add(
                "keyward_store_lookups_total",
                &[("result", "not_found")],
                1.0,
            );
            add("keyward_store_lookup_duration_seconds_count", &[], 1.0);
        } else {
            add("keyward_negative_cache_hits_total", &[], 1.0);
        }
    }

    // Each admin call's management key is checked too, from the cache.
    let admin_call = |add: &mut Add<'_>, method: &str| {
        add(
            "keyward_admin_requests_total",
            &[("method", method), ("code", "OK")],
            1.0,
        );
        add("keyward_cache_hits_total", &[], 1.0);
    };

    // Revoked: allowed once, revoked (this replica keeps it cached as
    // revoked, and its notice finds it so), denied from the cache.
    assert_eq!(check(&app, key(&doomed.secret)).await, Reason::Ok);
    checked(&mut add, "OK");
    hit(&mut add);
    app.revoke(&doomed.key.as_ref().expect("key").id).await;
    admin_call(&mut add, "keyward.v1.KeyService/Revoke");
    heard(&app, "key_changed", 1).await;
    add("keyward_invalidations_total", &[("op", "key_changed")], 1.0);
    add("keyward_revocation_lag_seconds_count", &[], 1.0);
    assert_eq!(check(&app, key(&doomed.secret)).await, Reason::Revoked);
    checked(&mut add, "REVOKED");
    hit(&mut add);

    // Disabled (never checked before, so its first check reads it).
    app.keys
        .clone()
        .disable(app.admin(pb::DisableRequest {
            id: disabled.key.as_ref().expect("key").id.clone(),
        }))
        .await
        .expect("disable");
    admin_call(&mut add, "keyward.v1.KeyService/Disable");
    heard(&app, "key_changed", 2).await;
    add("keyward_invalidations_total", &[("op", "key_changed")], 1.0);
    add("keyward_revocation_lag_seconds_count", &[], 1.0);
    assert_eq!(check(&app, key(&disabled.secret)).await, Reason::Disabled);
    checked(&mut add, "DISABLED");
    first(&mut add);

    // Expired: its one-second TTL runs out (the cached entry says so).
    let expires_at = expiring
        .key
        .as_ref()
        .and_then(|k| k.expires_at)
        .expect("expires_at");
    let deadline = std::time::SystemTime::UNIX_EPOCH
        + Duration::new(expires_at.seconds as u64, expires_at.nanos as u32);
    if let Ok(left) = deadline.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }
    assert_eq!(check(&app, key(&expiring.secret)).await, Reason::Expired);
    checked(&mut add, "EXPIRED");
    hit(&mut add);

    // The address, the resource and the scopes a request brings.
    let outside = pb::CheckRequest {
        client_ip: "192.0.2.1".into(),
        ..key(&ip_bound)
    };
    assert_eq!(check(&app, outside).await, Reason::IpForbidden);
    checked(&mut add, "IP_FORBIDDEN");
    hit(&mut add);
    let elsewhere = pb::CheckRequest {
        resource: "orders".into(),
        ..key(&billing_only)
    };
    assert_eq!(check(&app, elsewhere).await, Reason::ResourceForbidden);
    checked(&mut add, "RESOURCE_FORBIDDEN");
    hit(&mut add);
    let writing = pb::CheckRequest {
        required_scopes: vec!["invoices:write".into()],
        ..key(&reader)
    };
    assert_eq!(check(&app, writing).await, Reason::ScopeMissing);
    checked(&mut add, "SCOPE_MISSING");
    hit(&mut add);

    // A rate limit of one a minute, and a single credit: allowed, then not.
    assert_eq!(check(&app, key(&limited)).await, Reason::Ok);
    checked(&mut add, "OK");
    hit(&mut add);
    assert_eq!(check(&app, key(&limited)).await, Reason::RateLimited);
    checked(&mut add, "RATE_LIMITED");
    hit(&mut add);
    assert_eq!(check(&app, key(&credited)).await, Reason::Ok);
    checked(&mut add, "OK");
    hit(&mut add);
    assert_eq!(check(&app, key(&credited)).await, Reason::UsageExceeded);
    checked(&mut add, "USAGE_EXCEEDED");
    hit(&mut add);
    // One reservation took the credit; the second found none left.
    add("keyward_credit_reservations_total", &[], 2.0);

    // A suspended owner: its keys are re-read before their next use.
    app.owners
        .clone()
        .update(app.admin(pb::OwnerServiceUpdateRequest {
            id: "globex".into(),
            owner: Some(pb::Owner {
                state: pb::owner::State::Suspended.into(),
                state_reason: "unpaid".into(),
                ..Default::default()
            }),
            update_mask: mask(&["state", "state_reason"]),
        }))
        .await
        .expect("suspend");
    admin_call(&mut add, "keyward.v1.OwnerService/Update");
    heard(&app, "owner", 1).await;
    add("keyward_invalidations_total", &[("op", "owner")], 1.0);
    assert_eq!(check(&app, key(&suspended)).await, Reason::OwnerInactive);
    checked(&mut add, "OWNER_INACTIVE");
    first(&mut add);

    // Admin calls: one refused for a bad management key, one Mint.
    let refused = app
        .keys
        .clone()
        .list(with_key(
            pb::ListRequest {
                owner_id: "acme".into(),
                ..Default::default()
            },
            never_minted().expose_secret(),
        ))
        .await
        .expect_err("a forged management key is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    add(
        "keyward_admin_requests_total",
        &[
            ("method", "keyward.v1.KeyService/List"),
            ("code", "UNAUTHENTICATED"),
        ],
        1.0,
    );
    add("keyward_admin_refused_total", &[], 1.0);
    // Its forged management key went the way of any forged key.
    add("keyward_cache_misses_total", &[], 1.0);
    add("keyward_unknown_key_budget_lookups_total", &[], 1.0);
    add(
        "keyward_store_lookups_total",
        &[("result", "not_found")],
        1.0,
    );
    add("keyward_store_lookup_duration_seconds_count", &[], 1.0);
    mint(owned("initech")).await;
    admin_call(&mut add, "keyward.v1.KeyService/Mint");
    heard(&app, "key_created", 11).await;
    add("keyward_invalidations_total", &[("op", "key_created")], 1.0);

    let after = scrape(&app, "text").await;
    let (before, after_counters) = (before.counters(), after.counters());
    let mut moved = BTreeMap::new();
    for (series, value) in &after_counters {
        let delta = value - before.get(series).copied().unwrap_or(0.0);
        if delta != 0.0 {
            moved.insert(series.clone(), delta);
        }
    }
    assert_eq!(
        moved, expected,
        "counters moved (left) other than by what was done (right)"
    );

    // Gauges and the build info say what they should.
    assert_eq!(
        after.value(
            "keyward_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("git_sha", keyward::metrics::GIT_SHA)
            ]
        ),
        1.0
    );
    assert_eq!(after.value("keyward_ready", &[]), 1.0);
    assert_eq!(after.value("keyward_listener_connected", &[]), 1.0);
    assert!(after.value("keyward_cache_entries", &[]) >= 10.0);
    assert!(after.value("keyward_cache_bytes", &[]) > 0.0);
    assert!(after.value("keyward_db_pool_connections", &[("pool", "check")]) >= 1.0);

    // The same counters in OpenMetrics, which the stricter parser accepts.
    let open = scrape(&app, "openmetrics").await;
    for series in [
        "keyward_checks_total{door=check,reason=OK}",
        "keyward_admin_refused_total{}",
        "keyward_store_lookups_total{result=found}",
    ] {
        assert_eq!(
            open.counters().get(series),
            after_counters.get(series),
            "{series}"
        );
    }
}

#[tokio::test]
async fn the_dashboard_and_alert_rules_name_only_exposed_metrics() {
    let app = spawn_app_with(&[]).await;
    // Labelled families have series once something happened.
    app.mint_for("acme").await;
    let exposed = scrape(&app, "text").await;
    let mut names: Vec<String> = exposed.samples.iter().map(|s| s.name.clone()).collect();
    names.extend(exposed.families());
    let out = Command::new(python())
        .arg(repo().join("scripts/promql_names.py"))
        .arg(repo().join("deploy/grafana/keyward-dashboard.json"))
        .arg(repo().join("deploy/prometheus/keyward-alerts.yaml"))
        .output()
        .await
        .expect("run scripts/promql_names.py");
    assert!(
        out.status.success(),
        "a PromQL expression does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[derive(serde::Deserialize)]
    struct Referenced {
        expressions: usize,
        metrics: Vec<String>,
    }
    let referenced: Referenced = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(referenced.expressions >= 20, "{}", referenced.expressions);
    let missing: Vec<&String> = referenced
        .metrics
        .iter()
        .filter(|m| {
            // A histogram's series are named after its family.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| m.strip_suffix(s))
                .unwrap_or(m);
            !names.iter().any(|n| n == *m || n == family)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard or rules use metrics keyward does not expose: {missing:?}"
    );
}

#[tokio::test]
async fn http_probes_answer_liveness_and_readiness() {
    let app = spawn_app_with(&[]).await;
    let (status, _, body) = get(&app, "/livez", "*/*").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _, body) = get(&app, "/readyz", "*/*").await;
    assert_eq!((status, body.trim()), (200, "ready"));
    let (status, _, _) = get(&app, "/nothing", "*/*").await;
    assert_eq!(status, 404);

    // A dead background task makes the replica not ready until it is
    // running again.
    assert!(app.replica.kill_background_task("listener"));
    eventually(Duration::from_secs(2), || async {
        (get(&app, "/readyz", "*/*").await.0 == 503).then_some(())
    })
    .await
    .expect("not ready while the listener is down");
    eventually(Duration::from_secs(10), || async {
        (get(&app, "/readyz", "*/*").await.0 == 200).then_some(())
    })
    .await
    .expect("ready again once the listener is back");
    assert_eq!(app.replica.background_restarts(), 1);
    assert_eq!(app.replica.listen_sessions(), 2);
}
