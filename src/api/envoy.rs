//! `envoy.service.auth.v3.Authorization`: keyward as Envoy's `ext_authz`
//! server. Same decision path as `CheckService.Check`; this file only
//! translates Envoy's request attributes in and its HTTP answers out.
//!
//! - Credential: `authorization: Bearer <key>` or `x-api-key: <key>`, from
//!   `headers` or, with Envoy's `encode_raw_headers`, from `header_map`. Both
//!   present with different keys: MALFORMED_KEY.
//! - Policy: `context_extensions` `resource` and `scopes` (comma-separated).
//!   A route without `resource` names none (keys limited to resources are
//!   refused there), unless `--envoy-host-as-resource` makes the request's
//!   host (port stripped) the resource: the client picks that header, so it
//!   is opt-in.
//! - Client address: the downstream peer Envoy reports as the source; it is
//!   matched against `ip_allow` and counts failed keys for brute-force
//!   protection.
//! - Deny: Envoy answers the client itself with the decision's HTTP status
//!   and a JSON body (429s with `Retry-After`); allow: the credential headers
//!   are stripped and every `x-keyward-*` header is set (overwriting what a
//!   client sent) before the request goes upstream.

use std::{collections::HashMap, time::Instant};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::{
    ext_authz::v3::{
        DeniedHttpResponseBuilder, OkHttpResponseBuilder,
        pb::{CheckResponse, HeaderAppendAction, HttpResponse, HttpStatusCode},
    },
    pb::google::{
        protobuf::{ListValue, Struct, Value, value::Kind},
        rpc,
    },
};
use prost::encoding::{encode_varint, encoded_len_varint};
use tonic::Status;
use tracing::Instrument as _;

use super::{
    check_error,
    envoy_wire::{Answer, EnvoyRequest, extend_frame, frame},
    record_outcome, retry_after_secs,
    status::{reason_code, undecided_status},
};
use crate::{
    checker::{Checker, Outcome, Undecided},
    key::{Limits, MAX_WINDOWS, RateLimit},
    limits::{LimitReport, WindowState},
    metrics::Door,
    policy::{self, Reason},
    telemetry,
};

pub const HEADER_KEY_ID: &str = "x-keyward-key-id";
pub const HEADER_OWNER_ID: &str = "x-keyward-owner-id";
pub const HEADER_SCOPES: &str = "x-keyward-scopes";
pub const HEADER_REASON: &str = "x-keyward-reason";
// keyward's facts appear in Envoy's dynamic metadata under
// envoy.filters.http.ext_authz as keyward_reason, keyward_key_id,
// keyward_owner_id and keyward_scopes, e.g.
// %DYNAMIC_METADATA(envoy.filters.http.ext_authz:keyward_owner_id)%.
/// Credential headers, stripped from every allowed request.
const CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

#[derive(Debug, Clone)]
pub struct EnvoyApi {
    checker: Checker,
    options: EnvoyOptions,
}

#[derive(Debug, Clone, Copy)]
pub struct EnvoyOptions {
    /// Whether answers carry keyward's facts as Envoy dynamic metadata (Envoy
    /// pays to apply it on every request).
    pub dynamic_metadata: bool,
    /// Whether a route without a `resource` takes the Host header instead.
    pub host_as_resource: bool,
    /// Whether answers also carry X-RateLimit-Limit/-Remaining/-Reset.
    pub x_ratelimit_headers: bool,
}

impl EnvoyApi {
    pub fn new(checker: Checker, options: EnvoyOptions) -> Self {
        Self { checker, options }
    }
}

impl EnvoyApi {
    /// Whether requests must bring their Host (`--envoy-host-as-resource`).
    pub fn wants_host(&self) -> bool {
        self.options.host_as_resource
    }

    /// One `Check`, as [`EnvoyServer`](super::envoy_wire::EnvoyServer)
    /// serves it.
    pub async fn check(
        &self,
        metadata: &http::HeaderMap,
        req: &EnvoyRequest<'_>,
    ) -> Result<Answer, Status> {
        let doors = self.checker.doors();
        // One reading of the clock for the door's timer, the throttle and
        // the cache entry's age.
        let started = Instant::now();
        // Envoy sends its span's context in the call's metadata when it
        // traces; else the client's may be among the forwarded headers.
        let traceparent = if telemetry::traced() {
            metadata
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .or(req.traceparent.as_deref())
        } else {
            None
        };
        let span = telemetry::check_span(Door::Envoy, traceparent);
        let decided = if span.is_none() {
            self.decide(req, started).await
        } else {
            self.decide(req, started).instrument(span.clone()).await
        };
        let door = doors.counted(Door::Envoy);
        match decided {
            Ok(outcome) => {
                let answer = self.answer(&outcome)?;
                if let Some(door) = door {
                    door.answered(outcome.decision.reason, started.elapsed());
                }
                Ok(answer)
            }
            Err(err) => Err(undecided(door, err, started)),
        }
    }

    /// The answer to send. A key's allow answer, the `RateLimit` header
    /// aside, is the same every time: encoded on first use and kept in its
    /// cache entry (with `RateLimit-Policy`, which depends only on the key).
    /// A key with rate limits gets this answer's `RateLimit` header as a
    /// second `ok_response` field after it: protobuf parsers (Envoy's C++
    /// one, prost) merge a message field that appears twice, so its
    /// `response_headers_to_add` join the first's.
    fn answer(&self, outcome: &Outcome) -> Result<Answer, Status> {
        if outcome.decision.allowed()
            && let Some(entry) = outcome.entry()
        {
            let framed = match entry.envoy_allow.get() {
                Some(framed) => framed,
                None => self.encode_allow(outcome, &entry.envoy_allow)?,
            };
            let limits = outcome.declared_limits().filter(|l| !l.windows.is_empty());
            let (Some(limits), Some(report)) = (limits, &outcome.limits) else {
                return Ok(Answer::Framed(framed.clone()));
            };
            if let Some(frame) =
                limited_allow(framed, limits, report, self.options.x_ratelimit_headers)?
            {
                return Ok(Answer::Framed(frame));
            }
        }
        Ok(self.message(outcome))
    }

    /// A key's allow answer, encoded on its first use and kept in `cell`.
    #[cold]
    #[inline(never)]
    fn encode_allow<'a>(
        &self,
        outcome: &Outcome,
        cell: &'a std::sync::OnceLock<Bytes>,
    ) -> Result<&'a Bytes, Status> {
        let framed = frame(&respond(outcome, &self.options, RateHeaders::Policy))?;
        Ok(cell.get_or_init(|| framed))
    }

    /// An answer built for this check (a denial, or an allow that cannot be
    /// sent from its cached frame): out of the cached allow's way.
    #[inline(never)]
    fn message(&self, outcome: &Outcome) -> Answer {
        Answer::Message(Box::new(respond(outcome, &self.options, RateHeaders::All)))
    }

    async fn decide(&self, req: &EnvoyRequest<'_>, at: Instant) -> Result<Outcome, Undecided> {
        let outcome = match credential(req) {
            Err(reason) => Outcome::denied(reason),
            Ok(credential) => {
                let mut scopes_buf = [""; 8];
                let scopes_vec;
                let scopes: &[&str] = match req.scopes {
                    None => &[],
                    Some(s) => {
                        let mut n = 0;
                        let mut overflow = false;
                        for scope in split_scopes(s) {
                            if n == scopes_buf.len() {
                                overflow = true;
                                break;
                            }
                            scopes_buf[n] = scope;
                            n += 1;
                        }
                        if overflow {
                            scopes_vec = split_scopes(s).collect::<Vec<_>>();
                            &scopes_vec
                        } else {
                            &scopes_buf[..n]
                        }
                    }
                };
                let resource = req
                    .resource
                    .filter(|r| !r.is_empty())
                    .or_else(|| {
                        req.host
                            .filter(|_| self.options.host_as_resource)
                            .map(strip_port)
                    })
                    .filter(|r| !r.is_empty());
                let policy_req = policy::Request {
                    resource,
                    required_scopes: scopes,
                    client_ip: req.source_ip,
                    cost: 1,
                };
                self.checker
                    .check_at(credential, &policy_req, req.source_ip, at)
                    .await?
            }
        };
        record_outcome(&outcome);
        Ok(outcome)
    }
}

/// A check that could not be decided: counted, and its status.
#[cold]
#[inline(never)]
fn undecided(door: Option<&crate::metrics::DoorStats>, err: Undecided, started: Instant) -> Status {
    if let Some(door) = door {
        door.failed(check_error(&err), started.elapsed());
    }
    undecided_status(err)
}

/// Finds the credential in the headers Envoy forwarded.
fn credential<'a>(req: &'a EnvoyRequest<'_>) -> Result<Option<&'a str>, Reason> {
    let authorization = req.authorization.as_deref();
    let api_key = req.api_key.as_deref().filter(|v| !v.trim().is_empty());
    match (authorization, api_key) {
        (None, api_key) => Ok(api_key),
        (Some(auth), None) => Ok(Some(auth)),
        (Some(auth), Some(api_key)) => match bearer_token(auth) {
            // Not a keyward credential (e.g. Basic for the upstream): use x-api-key.
            None => Ok(Some(api_key)),
            Some(token) if token == api_key.trim() => Ok(Some(api_key)),
            Some(_) => Err(Reason::MalformedKey),
        },
    }
}

/// The token of a `Bearer` authorization value; `None` for other schemes.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn split_scopes(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// `api.example.com:8443` -> `api.example.com`; `[::1]:80` -> `[::1]`.
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    }
}

/// The RateLimit headers of an answer (draft-ietf-httpapi-ratelimit-headers):
/// `RateLimit-Policy` (prebuilt per key) and `RateLimit` (this answer's),
/// and on request the older X-RateLimit-* trio for the window closest to
/// its limit. [`limited_allow`] writes the same for an allow
/// without building them.
fn rate_limit_headers(outcome: &Outcome, x_headers: bool) -> Vec<(&'static str, String)> {
    match (outcome.declared_limits(), &outcome.limits) {
        (Some(limits), Some(report)) => rate_limit_headers_of(limits, report, x_headers),
        _ => Vec::new(),
    }
}

fn rate_limit_headers_of(
    limits: &Limits,
    report: &LimitReport,
    x_headers: bool,
) -> Vec<(&'static str, String)> {
    if limits.windows.is_empty() {
        return Vec::new();
    }
    let Some(len) = rate_limit_value_len(limits, report) else {
        return Vec::new();
    };
    let mut current = Vec::with_capacity(len);
    put_rate_limit_value(limits, report, &mut current);
    // ASCII: window names are [A-Za-z0-9_-], the rest digits and signs.
    let current = String::from_utf8_lossy(&current).into_owned();
    let mut headers = vec![
        ("ratelimit-policy", limits.policy_header.to_string()),
        ("ratelimit", current),
    ];
    if x_headers && let Some((w, state)) = closest_to_limit(limits, report) {
        headers.push(("x-ratelimit-limit", w.limit().to_string()));
        headers.push(("x-ratelimit-remaining", state.remaining.to_string()));
        headers.push(("x-ratelimit-reset", state.reset.as_secs().to_string()));
    }
    headers
}

/// Seconds until the window is full again, rounded up.
fn reset_secs(state: &WindowState) -> u64 {
    if state.reset.is_zero() {
        0
    } else {
        retry_after_secs(state.reset)
    }
}

/// The window with the smallest share of its limit left.
fn closest_to_limit<'a>(
    limits: &'a Limits,
    report: &'a LimitReport,
) -> Option<(&'a RateLimit, &'a WindowState)> {
    limits
        .windows
        .iter()
        .zip(&report.windows)
        .min_by_key(|(w, state)| state.remaining.saturating_mul(1000) / w.limit().max(1))
}

/// An encoded allow (`head`, a frame) followed by a second `ok_response`
/// holding only this answer's `RateLimit` header (and, with `x_headers`,
/// X-RateLimit-*), each set with OVERWRITE_IF_EXISTS_OR_ADD on the client's
/// response, as one frame: the tail is byte for byte what prost encodes for
/// that message (tested), written from the key's prebuilt parts straight
/// into the frame, which is allocated once at its exact size. `None`: the
/// report does not fit the limits.
fn limited_allow(
    head: &[u8],
    limits: &Limits,
    report: &LimitReport,
    x_headers: bool,
) -> Result<Option<Bytes>, Status> {
    let Some(value_len) = rate_limit_value_len(limits, report) else {
        return Ok(None);
    };
    let mut x = [
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    ];
    let mut others: [(&str, &[u8]); 3] = [("", &[]); 3];
    let mut n = 0;
    if x_headers && let Some((w, state)) = closest_to_limit(limits, report) {
        let [a, b, c] = &mut x;
        others = [
            ("x-ratelimit-limit", a.format(w.limit()).as_bytes()),
            (
                "x-ratelimit-remaining",
                b.format(state.remaining).as_bytes(),
            ),
            (
                "x-ratelimit-reset",
                c.format(state.reset.as_secs()).as_bytes(),
            ),
        ];
        n = others.len();
    }
    let others = &others[..n];
    // HeaderValue {key = 1, value = 2}; HeaderValueOption {header = 1,
    // append_action = 3}; OkHttpResponse {response_headers_to_add = 6};
    // CheckResponse {ok_response = 3}.
    let field = |len: usize| 1 + encoded_len_varint(len as u64) + len;
    let header_len = |k: &str, v: usize| field(k.len()) + field(v);
    let option_len = |k: &str, v: usize| field(header_len(k, v)) + 2;
    let ok_len = field(option_len("ratelimit", value_len))
        + others
            .iter()
            .map(|(k, v)| field(option_len(k, v.len())))
            .sum::<usize>();
    let mut out = extend_frame(head, field(ok_len))?;
    out.put_u8(0x1a);
    encode_varint(ok_len as u64, &mut out);
    let option = |out: &mut BytesMut, k: &str, v: usize| {
        out.put_u8(0x32);
        encode_varint(option_len(k, v) as u64, out);
        out.put_u8(0x0a);
        encode_varint(header_len(k, v) as u64, out);
        out.put_u8(0x0a);
        encode_varint(k.len() as u64, out);
        out.put_slice(k.as_bytes());
        out.put_u8(0x12);
        encode_varint(v as u64, out);
    };
    let set = HeaderAppendAction::OverwriteIfExistsOrAdd as u8;
    option(&mut out, "ratelimit", value_len);
    put_rate_limit_value(limits, report, &mut out);
    out.put_slice(&[0x18, set]);
    for (k, v) in others {
        option(&mut out, k, v.len());
        out.put_slice(v);
        out.put_slice(&[0x18, set]);
    }
    Ok(Some(out.freeze()))
}

/// The length of the `RateLimit` header's value that
/// [`put_rate_limit_value`] writes. `None`: the report does not fit the
/// limits.
fn rate_limit_value_len(limits: &Limits, report: &LimitReport) -> Option<usize> {
    if report.windows.len() != limits.windows.len() || limits.windows.len() > MAX_WINDOWS {
        return None;
    }
    let digits = |n: u64| n.checked_ilog10().map_or(1, |d| d as usize + 1);
    Some(
        report
            .windows
            .iter()
            .enumerate()
            .map(|(i, state)| {
                limits.rate_prefix(i).len()
                    + digits(state.remaining)
                    + b";t=".len()
                    + digits(reset_secs(state))
            })
            .sum(),
    )
}

/// The `RateLimit` header's value, each window's `"name";r=N;t=S` from the
/// key's prebuilt parts, for a report that fits the limits
/// ([`rate_limit_value_len`]).
fn put_rate_limit_value(limits: &Limits, report: &LimitReport, out: &mut impl BufMut) {
    for (i, state) in report.windows.iter().enumerate() {
        out.put_slice(limits.rate_prefix(i).as_bytes());
        out.put_slice(itoa::Buffer::new().format(state.remaining).as_bytes());
        out.put_slice(b";t=");
        out.put_slice(itoa::Buffer::new().format(reset_secs(state)).as_bytes());
    }
}

/// Headers added to the response Envoy sends the client.
fn add_response_headers(ok: &mut OkHttpResponseBuilder, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        ok.add_response_header(
            name,
            value,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        );
    }
}

/// Which RateLimit headers an allow carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RateHeaders {
    /// Only `RateLimit-Policy`: the part of an allow cached per key (see
    /// `EnvoyApi::answer`).
    Policy,
    /// All of this answer's.
    All,
}

/// The whole answer.
fn respond(outcome: &Outcome, options: &EnvoyOptions, rate: RateHeaders) -> CheckResponse {
    let with_metadata = options.dynamic_metadata;
    let reason = outcome.decision.reason;
    let key = outcome.key();
    let key_id = key.map(|k| k.id.to_string());
    let owner_id = key.map(|k| k.owner_id.to_string());

    let http_response = if reason.is_allowed() {
        let scopes = key.map(|k| {
            k.scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",")
        });
        let mut ok = OkHttpResponseBuilder::new();
        // Overwrite, never append, every header keyward owns: a client cannot
        // smuggle its own identity upstream. Kept when empty for the same
        // reason. (The example Envoy config also strips client-sent
        // x-keyward-* headers on every route, before any filter runs.)
        for (name, value) in [
            (HEADER_KEY_ID, key_id.as_deref()),
            (HEADER_OWNER_ID, owner_id.as_deref()),
            (HEADER_SCOPES, scopes.as_deref()),
            (HEADER_REASON, Some(reason.as_str())),
        ] {
            ok.add_header(
                name,
                value.unwrap_or_default(),
                Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
                true,
            );
        }
        for name in CREDENTIAL_HEADERS {
            ok.remove_header(name);
        }
        let limits = match rate {
            RateHeaders::Policy => outcome
                .declared_limits()
                .filter(|l| !l.windows.is_empty())
                .map(|l| vec![("ratelimit-policy", l.policy_header.to_string())])
                .unwrap_or_default(),
            RateHeaders::All => rate_limit_headers(outcome, options.x_ratelimit_headers),
        };
        add_response_headers(&mut ok, limits);
        HttpResponse::OkResponse(ok.build())
    } else {
        let status = reason.http_status();
        let mut denied = DeniedHttpResponseBuilder::new();
        denied.set_http_status(http_status_code(status));
        denied.set_body(deny_body(reason, &outcome.decision.message, status));
        let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
        denied.add_header("content-type", "application/json", overwrite, false);
        denied.add_header(HEADER_REASON, reason.as_str(), overwrite, false);
        if let Some(retry_after) = outcome.decision.retry_after {
            denied.add_header(
                "retry-after",
                retry_after_secs(retry_after).to_string(),
                overwrite,
                false,
            );
        }
        for (name, value) in rate_limit_headers(outcome, options.x_ratelimit_headers) {
            denied.add_header(name, value, overwrite, false);
        }
        if status == 401 {
            // RFC 6750: a presented but unusable token is "invalid_token".
            let challenge = if reason == Reason::MissingKey {
                r#"Bearer realm="keyward""#
            } else {
                r#"Bearer realm="keyward", error="invalid_token""#
            };
            denied.add_header("www-authenticate", challenge, overwrite, false);
        }
        HttpResponse::DeniedResponse(denied.build())
    };

    let dynamic_metadata = with_metadata.then(|| {
        let mut fields = HashMap::with_capacity(4);
        fields.insert("keyward_reason".to_owned(), string(reason.as_str()));
        if let (Some(key), Some(id), Some(owner)) = (key, key_id, owner_id) {
            fields.insert("keyward_key_id".to_owned(), string(id));
            fields.insert("keyward_owner_id".to_owned(), string(owner));
            if reason.is_allowed() {
                let scopes = key.scopes.iter().map(|s| string(s.as_str())).collect();
                fields.insert(
                    "keyward_scopes".to_owned(),
                    Value {
                        kind: Some(Kind::ListValue(ListValue { values: scopes })),
                    },
                );
            }
        }
        Struct { fields }
    });

    CheckResponse {
        status: Some(rpc::Status {
            code: reason_code(reason) as i32,
            message: if reason.is_allowed() {
                String::new()
            } else {
                reason.as_str().to_owned()
            },
            details: Vec::new(),
        }),
        http_response: Some(http_response),
        dynamic_metadata,
    }
}

/// `{"error":"...","message":"...","status":401}`; only the message needs
/// escaping (reasons are fixed identifiers).
fn deny_body(reason: Reason, message: &str, status: u16) -> String {
    let message = serde_json::to_string(message).unwrap_or_else(|_| "\"\"".to_owned());
    format!(
        r#"{{"error":"{}","message":{message},"status":{status}}}"#,
        reason.as_str()
    )
}

fn string(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn http_status_code(status: u16) -> HttpStatusCode {
    match status {
        401 => HttpStatusCode::Unauthorized,
        403 => HttpStatusCode::Forbidden,
        429 => HttpStatusCode::TooManyRequests,
        503 => HttpStatusCode::ServiceUnavailable,
        _ => HttpStatusCode::Forbidden,
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use prost::Message as _;

    use super::*;
    use crate::api::envoy_wire::PREFIX;

    fn two_windows() -> (Limits, LimitReport) {
        let limits = Limits::new(
            crate::key::KeyId::new_v7(),
            vec![
                RateLimit::new("burst", 100, std::time::Duration::from_secs(1)).unwrap(),
                RateLimit::new("daily-x", 100_000, std::time::Duration::from_secs(86_400)).unwrap(),
            ],
            false,
        )
        .unwrap();
        let report = LimitReport {
            windows: [
                WindowState {
                    remaining: 99,
                    reset: std::time::Duration::from_millis(10),
                },
                WindowState {
                    remaining: 12_345,
                    reset: std::time::Duration::from_secs(75_000),
                },
            ]
            .into_iter()
            .collect(),
            credits_remaining: None,
        };
        (limits, report)
    }

    /// What [`limited_allow`] writes after an allow whose message is empty.
    fn tail(limits: &Limits, report: &LimitReport, x_headers: bool) -> Option<Bytes> {
        let head = frame(&CheckResponse::default()).unwrap();
        let framed = limited_allow(&head, limits, report, x_headers).unwrap()?;
        let len = u32::from_be_bytes(framed[1..PREFIX].try_into().unwrap());
        assert_eq!(
            len as usize,
            framed.len() - PREFIX,
            "the prefix counts the tail"
        );
        Some(framed.slice(PREFIX..))
    }

    #[test]
    fn the_rate_limit_tail_is_what_prost_encodes_for_the_same_headers() {
        let (limits, report) = two_windows();
        for x_headers in [false, true] {
            let tail = tail(&limits, &report, x_headers).unwrap();
            let mut ok = OkHttpResponseBuilder::new();
            let mut headers = rate_limit_headers_of(&limits, &report, x_headers);
            headers.retain(|(name, _)| *name != "ratelimit-policy");
            assert_eq!(headers.len(), if x_headers { 4 } else { 1 });
            add_response_headers(&mut ok, headers);
            let expected = CheckResponse {
                status: None,
                http_response: Some(HttpResponse::OkResponse(ok.build())),
                dynamic_metadata: None,
            }
            .encode_to_vec();
            assert_eq!(&tail[..], &expected[..], "x_headers {x_headers}");
        }
        // The values themselves.
        let headers = rate_limit_headers_of(&limits, &report, true);
        assert_eq!(
            headers,
            [
                (
                    "ratelimit-policy",
                    r#""burst";q=100;w=1, "daily-x";q=100000;w=86400"#.to_owned()
                ),
                (
                    "ratelimit",
                    r#""burst";r=99;t=1, "daily-x";r=12345;t=75000"#.to_owned()
                ),
                ("x-ratelimit-limit", "100000".to_owned()),
                ("x-ratelimit-remaining", "12345".to_owned()),
                ("x-ratelimit-reset", "75000".to_owned()),
            ]
        );
    }

    #[test]
    fn an_allow_and_its_tail_parse_as_one_answer_with_every_header() {
        let (limits, report) = two_windows();
        let mut ok = OkHttpResponseBuilder::new();
        ok.add_header("x-keyward-key-id", "k", None, false);
        ok.add_response_header("ratelimit-policy", &*limits.policy_header, None, false);
        let allow = CheckResponse {
            status: Some(rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(ok.build())),
            dynamic_metadata: None,
        };
        let mut both = allow.encode_to_vec();
        both.extend_from_slice(&tail(&limits, &report, false).unwrap());
        let parsed = CheckResponse::decode(&both[..]).unwrap();
        let Some(HttpResponse::OkResponse(ok)) = parsed.http_response else {
            panic!("not an allow");
        };
        assert_eq!(ok.headers.len(), 1, "the allow's own headers kept");
        let added: Vec<_> = ok
            .response_headers_to_add
            .iter()
            .map(|h| h.header.as_ref().unwrap().key.as_str())
            .collect();
        assert_eq!(added, ["ratelimit-policy", "ratelimit"]);
    }

    #[test]
    fn the_rate_limit_value_is_as_long_as_its_length_says() {
        let (limits, mut report) = two_windows();
        for remaining in [0, 9, 10, 99, 100, 999_999, u64::MAX] {
            for reset in [0, 1, 999, 1_000, 86_400_000] {
                for state in report.windows.iter_mut() {
                    state.remaining = remaining;
                    state.reset = std::time::Duration::from_millis(reset);
                }
                let len = rate_limit_value_len(&limits, &report).unwrap();
                let mut value = Vec::new();
                put_rate_limit_value(&limits, &report, &mut value);
                assert_eq!(len, value.len(), "{}", String::from_utf8_lossy(&value));
                let r = remaining.to_string();
                assert!(
                    String::from_utf8(value)
                        .unwrap()
                        .contains(&format!(";r={r};t="))
                );
            }
        }
    }

    #[test]
    fn a_report_that_does_not_fit_the_limits_writes_no_tail() {
        let (limits, mut report) = two_windows();
        report.windows.pop();
        assert!(tail(&limits, &report, false).is_none());
    }

    fn cred(authorization: Option<&str>, api_key: Option<&str>) -> Result<Option<String>, Reason> {
        let req = EnvoyRequest {
            authorization: authorization.map(Cow::Borrowed),
            api_key: api_key.map(Cow::Borrowed),
            ..Default::default()
        };
        credential(&req).map(|c| c.map(str::to_owned))
    }

    #[test]
    fn the_credential_comes_from_either_header() {
        assert_eq!(cred(None, Some("k1")), Ok(Some("k1".into())));
        assert_eq!(cred(Some("Bearer k1"), None), Ok(Some("Bearer k1".into())));
        assert_eq!(cred(None, None), Ok(None));
        // A blank x-api-key is no credential.
        assert_eq!(cred(None, Some("  ")), Ok(None));
    }

    #[test]
    fn two_different_keys_are_malformed_and_two_equal_ones_are_fine() {
        let both = |auth, key| cred(Some(auth), Some(key));
        assert_eq!(both("Bearer k1", "k1"), Ok(Some("k1".into())));
        assert_eq!(both("bearer  k1 ", "k1"), Ok(Some("k1".into())));
        assert_eq!(both("Bearer k1", "k2"), Err(Reason::MalformedKey));
        // A non-Bearer authorization is not a keyward credential.
        assert_eq!(both("Basic dXNlcjpwdw==", "k1"), Ok(Some("k1".into())));
    }

    #[test]
    fn scopes_split_on_commas_ignoring_blanks() {
        assert_eq!(
            split_scopes("a, b,,c ").collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(split_scopes(" ").count(), 0);
    }

    #[test]
    fn host_ports_are_stripped() {
        assert_eq!(strip_port("api.example.com:8443"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("127.0.0.1:10000"), "127.0.0.1");
    }

    fn options(dynamic_metadata: bool) -> EnvoyOptions {
        EnvoyOptions {
            dynamic_metadata,
            host_as_resource: false,
            x_ratelimit_headers: false,
        }
    }

    #[test]
    fn denials_carry_status_body_and_headers() {
        let resp = respond(
            &Outcome::denied(Reason::MissingKey),
            &options(true),
            RateHeaders::All,
        );
        assert_eq!(
            resp.status.as_ref().map(|s| s.code),
            Some(tonic::Code::Unauthenticated as i32)
        );
        let Some(HttpResponse::DeniedResponse(denied)) = resp.http_response else {
            panic!("not a denial");
        };
        assert_eq!(denied.status.map(|s| s.code), Some(401));
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(body["error"], "MISSING_KEY");
        assert_eq!(body["status"], 401);
        let names: Vec<_> = denied
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref().map(|h| h.key.as_str()))
            .collect();
        assert_eq!(names, ["content-type", HEADER_REASON, "www-authenticate"]);
    }

    #[test]
    fn deny_bodies_are_json_with_the_message_escaped() {
        let body = deny_body(Reason::ScopeMissing, r#"lacks "a\b""#, 403);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "SCOPE_MISSING");
        assert_eq!(v["message"], r#"lacks "a\b""#);
        assert_eq!(v["status"], 403);
    }

    #[test]
    fn dynamic_metadata_can_be_left_out() {
        let with = respond(
            &Outcome::denied(Reason::MissingKey),
            &options(true),
            RateHeaders::All,
        );
        let fields = &with.dynamic_metadata.expect("metadata").fields;
        assert!(fields.contains_key("keyward_reason"));
        let without = respond(
            &Outcome::denied(Reason::MissingKey),
            &options(false),
            RateHeaders::All,
        );
        assert!(without.dynamic_metadata.is_none());
    }
}
