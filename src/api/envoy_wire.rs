//! `envoy.service.auth.v3.Authorization` on the wire, for the hot path.
//!
//! Envoy's `CheckRequest` carries the whole request (every header, the
//! peers, the TLS session, ...), and keyward reads a handful of its fields.
//! Decoding it with the generated types allocates a string for every field
//! and header. [`EnvoyRequest`] is what keyward reads, decoded straight from
//! the protobuf bytes: unwanted fields and headers are skipped without a
//! copy. The answer goes back either as a message or as a gRPC frame encoded
//! before (a key's allow answer, built once per cache entry).
//!
//! [`EnvoyServer`] serves `Check` with them, in place of the generated
//! `AuthorizationServer`; Envoy and any other gRPC client see the same
//! service.

use std::{borrow::Cow, convert::Infallible, net::IpAddr, sync::Arc};

use bytes::{BufMut as _, Bytes, BytesMut};
use envoy_types::ext_authz::v3::pb::CheckResponse;
use http_body_util::BodyExt as _;
use prost::Message as _;
use tonic::{Status, body::Body, server::NamedService};
use tower_service::Service;

use super::envoy::EnvoyApi;

/// What keyward reads of Envoy's `CheckRequest`, borrowed from its bytes
/// (owned only for a raw header value that is not UTF-8, made lossy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvoyRequest<'a> {
    /// `authorization`, `x-api-key` and `traceparent`, the first of each,
    /// from `headers` or (with `encode_raw_headers`) `header_map`.
    pub authorization: Option<Cow<'a, str>>,
    pub api_key: Option<Cow<'a, str>>,
    pub traceparent: Option<Cow<'a, str>>,
    /// The `:authority`, only when asked for (`--envoy-host-as-resource`).
    pub host: Option<&'a str>,
    /// The route's `context_extensions`.
    pub resource: Option<&'a str>,
    pub scopes: Option<&'a str>,
    /// The downstream peer's address, when it is an IP socket address.
    pub source_ip: Option<IpAddr>,
}

/// Field numbers (envoy/service/auth/v3/*.proto, envoy/config/core/v3).
mod tag {
    pub const CHECK_ATTRIBUTES: u32 = 1;
    pub const ATTR_SOURCE: u32 = 1;
    pub const ATTR_REQUEST: u32 = 4;
    pub const ATTR_CONTEXT_EXTENSIONS: u32 = 10;
    pub const PEER_ADDRESS: u32 = 1;
    pub const ADDRESS_SOCKET: u32 = 1;
    pub const SOCKET_ADDRESS: u32 = 2;
    pub const REQUEST_HTTP: u32 = 2;
    pub const HTTP_HEADERS: u32 = 3;
    pub const HTTP_HOST: u32 = 5;
    pub const HTTP_HEADER_MAP: u32 = 13;
    pub const HEADER_MAP_HEADERS: u32 = 1;
    pub const HEADER_KEY: u32 = 1;
    pub const HEADER_VALUE: u32 = 2;
    pub const HEADER_RAW_VALUE: u32 = 3;
    pub const ENTRY_KEY: u32 = 1;
    pub const ENTRY_VALUE: u32 = 2;
}

const LEN: u8 = 2;

/// A protobuf reader over one contiguous message.
struct Reader<'a> {
    bytes: &'a [u8],
}

/// What is wrong with a request's bytes. Small and `Copy`, so that the
/// reader's many small steps return it in registers; it becomes a
/// [`Status`] once, in [`EnvoyRequest::decode`].
#[derive(Debug, Clone, Copy)]
struct Malformed(&'static str);

impl From<Malformed> for Status {
    #[cold]
    #[inline(never)]
    fn from(Malformed(what): Malformed) -> Self {
        Status::invalid_argument(format!("malformed CheckRequest: {what}"))
    }
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Most varints in a `CheckRequest` (tags, short lengths) are one byte.
    #[inline]
    fn varint(&mut self) -> Result<u64, Malformed> {
        match self.bytes {
            [byte, rest @ ..] if byte & 0x80 == 0 => {
                self.bytes = rest;
                Ok(u64::from(*byte))
            }
            _ => self.long_varint(),
        }
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, Malformed> {
        let mut value = 0u64;
        for (i, byte) in self.bytes.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.bytes = &self.bytes[i + 1..];
                return Ok(value);
            }
        }
        Err(Malformed("bad varint"))
    }

    /// The next field's number and wire type; `None` at the end.
    fn field(&mut self) -> Result<Option<(u32, u8)>, Malformed> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| Malformed("bad field number"))?;
        if number == 0 {
            return Err(Malformed("field number 0"));
        }
        Ok(Some((number, (key & 7) as u8)))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Malformed> {
        match usize::try_from(n) {
            Ok(n) if n <= self.bytes.len() => {
                let (head, rest) = self.bytes.split_at(n);
                self.bytes = rest;
                Ok(head)
            }
            _ => Err(Malformed("truncated")),
        }
    }

    fn len_delimited(&mut self, wire_type: u8) -> Result<&'a [u8], Malformed> {
        if wire_type != LEN {
            return Err(Malformed("wrong wire type"));
        }
        let n = self.varint()?;
        self.take(n)
    }

    fn skip(&mut self, wire_type: u8) -> Result<(), Malformed> {
        match wire_type {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            LEN => self.len_delimited(LEN).map(drop),
            5 => self.take(4).map(drop),
            _ => Err(Malformed("unsupported wire type")),
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, Malformed> {
    std::str::from_utf8(bytes).map_err(|_| Malformed("a string is not UTF-8"))
}

/// A `map<string, string>` entry: (key, value) as bytes.
fn entry(bytes: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let mut r = Reader::new(bytes);
    let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
    while let Some((number, wire_type)) = r.field()? {
        match number {
            tag::ENTRY_KEY => key = r.len_delimited(wire_type)?,
            tag::ENTRY_VALUE => value = r.len_delimited(wire_type)?,
            _ => r.skip(wire_type)?,
        }
    }
    Ok((key, value))
}

/// Keeps the first value of a wanted header.
fn keep<'a>(
    slot: &mut Option<Cow<'a, str>>,
    value: &'a [u8],
    lossy: bool,
) -> Result<(), Malformed> {
    if slot.is_none() {
        *slot = Some(if lossy {
            // Raw header values are bytes; keys are ASCII and anything else
            // fails the key's format check later.
            String::from_utf8_lossy(value)
        } else {
            Cow::Borrowed(utf8(value)?)
        });
    }
    Ok(())
}

/// Keeps the first value of a wanted context extension.
fn keep_str<'a>(slot: &mut Option<&'a str>, value: &'a [u8]) -> Result<(), Malformed> {
    if slot.is_none() {
        *slot = Some(utf8(value)?);
    }
    Ok(())
}

impl<'a> EnvoyRequest<'a> {
    /// Decodes the fields keyward reads from an encoded `CheckRequest`.
    pub fn decode(bytes: &'a [u8], with_host: bool) -> Result<Self, Status> {
        Self::read(bytes, with_host).map_err(Status::from)
    }

    fn read(bytes: &'a [u8], with_host: bool) -> Result<Self, Malformed> {
        let mut out = Self::default();
        let mut r = Reader::new(bytes);
        while let Some((number, wire_type)) = r.field()? {
            if number == tag::CHECK_ATTRIBUTES {
                out.attributes(r.len_delimited(wire_type)?, with_host)?;
            } else {
                r.skip(wire_type)?;
            }
        }
        Ok(out)
    }

    fn attributes(&mut self, bytes: &'a [u8], with_host: bool) -> Result<(), Malformed> {
        let mut r = Reader::new(bytes);
        while let Some((number, wire_type)) = r.field()? {
            match number {
                tag::ATTR_SOURCE => self.source(r.len_delimited(wire_type)?)?,
                tag::ATTR_REQUEST => {
                    let mut request = Reader::new(r.len_delimited(wire_type)?);
                    while let Some((number, wire_type)) = request.field()? {
                        if number == tag::REQUEST_HTTP {
                            self.http(request.len_delimited(wire_type)?, with_host)?;
                        } else {
                            request.skip(wire_type)?;
                        }
                    }
                }
                tag::ATTR_CONTEXT_EXTENSIONS => {
                    let (key, value) = entry(r.len_delimited(wire_type)?)?;
                    match key {
                        b"resource" => keep_str(&mut self.resource, value)?,
                        b"scopes" => keep_str(&mut self.scopes, value)?,
                        _ => {}
                    }
                }
                _ => r.skip(wire_type)?,
            }
        }
        Ok(())
    }

    /// `Peer.address.socket_address.address`, parsed.
    fn source(&mut self, bytes: &'a [u8]) -> Result<(), Malformed> {
        let mut peer = Reader::new(bytes);
        while let Some((number, wire_type)) = peer.field()? {
            if number != tag::PEER_ADDRESS {
                peer.skip(wire_type)?;
                continue;
            }
            let mut address = Reader::new(peer.len_delimited(wire_type)?);
            while let Some((number, wire_type)) = address.field()? {
                if number != tag::ADDRESS_SOCKET {
                    address.skip(wire_type)?;
                    continue;
                }
                let mut socket = Reader::new(address.len_delimited(wire_type)?);
                while let Some((number, wire_type)) = socket.field()? {
                    if number == tag::SOCKET_ADDRESS {
                        let ip = utf8(socket.len_delimited(wire_type)?)?;
                        self.source_ip = ip.parse().ok();
                    } else {
                        socket.skip(wire_type)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn http(&mut self, bytes: &'a [u8], with_host: bool) -> Result<(), Malformed> {
        let mut r = Reader::new(bytes);
        while let Some((number, wire_type)) = r.field()? {
            match number {
                tag::HTTP_HEADERS => {
                    let (key, value) = entry(r.len_delimited(wire_type)?)?;
                    self.header(key, value, false)?;
                }
                tag::HTTP_HOST if with_host => {
                    self.host = Some(utf8(r.len_delimited(wire_type)?)?);
                }
                tag::HTTP_HEADER_MAP => {
                    let mut map = Reader::new(r.len_delimited(wire_type)?);
                    while let Some((number, wire_type)) = map.field()? {
                        if number != tag::HEADER_MAP_HEADERS {
                            map.skip(wire_type)?;
                            continue;
                        }
                        let mut header = Reader::new(map.len_delimited(wire_type)?);
                        let (mut key, mut value, mut raw): (&[u8], &'a [u8], &'a [u8]) =
                            (&[], &[], &[]);
                        while let Some((number, wire_type)) = header.field()? {
                            match number {
                                tag::HEADER_KEY => key = header.len_delimited(wire_type)?,
                                tag::HEADER_VALUE => value = header.len_delimited(wire_type)?,
                                tag::HEADER_RAW_VALUE => raw = header.len_delimited(wire_type)?,
                                _ => header.skip(wire_type)?,
                            }
                        }
                        if raw.is_empty() {
                            self.header(key, value, false)?;
                        } else {
                            self.header(key, raw, true)?;
                        }
                    }
                }
                _ => r.skip(wire_type)?,
            }
        }
        Ok(())
    }

    /// Keeps the headers keyward reads (names compared case-insensitively:
    /// Envoy sends them lower-cased, other clients may not).
    fn header(&mut self, name: &[u8], value: &'a [u8], lossy: bool) -> Result<(), Malformed> {
        if name.eq_ignore_ascii_case(b"authorization") {
            keep(&mut self.authorization, value, lossy)
        } else if name.eq_ignore_ascii_case(b"x-api-key") {
            keep(&mut self.api_key, value, lossy)
        } else if name.eq_ignore_ascii_case(b"traceparent") {
            keep(&mut self.traceparent, value, lossy)
        } else {
            Ok(())
        }
    }
}

/// An answer: a message, or a whole gRPC message frame (a key's allow,
/// encoded before and kept in its cache entry, sent without a copy; or one
/// written from it, see [`extend_frame`]).
#[derive(Debug, Clone)]
pub enum Answer {
    Message(Box<CheckResponse>),
    Framed(Bytes),
}

/// The gRPC length prefix: no compression, then the length, big-endian.
pub const PREFIX: usize = 5;

fn prefix(buf: &mut BytesMut, len: usize) -> Result<(), Status> {
    let len = u32::try_from(len).map_err(|_| internal("the answer is too large"))?;
    buf.put_u8(0);
    buf.put_u32(len);
    Ok(())
}

/// `message` as a gRPC message frame (length prefix and message).
pub fn frame(message: &CheckResponse) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    prefix(&mut buf, len)?;
    message.encode(&mut buf).map_err(|e| cannot_encode(&e))?;
    Ok(buf.freeze())
}

/// A frame of `head`'s message (`head` is a frame) followed by `more`
/// bytes of fields of the same message, which the caller appends: the
/// prefix already counts them, and the buffer has room for exactly them.
pub fn extend_frame(head: &[u8], more: usize) -> Result<BytesMut, Status> {
    let head = head.get(PREFIX..).unwrap_or_default();
    let len = head.len() + more;
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    prefix(&mut buf, len)?;
    buf.put_slice(head);
    Ok(buf)
}

impl Answer {
    /// The response's one gRPC message frame.
    fn into_frame(self) -> Result<Bytes, Status> {
        match self {
            Answer::Framed(frame) => Ok(frame),
            Answer::Message(message) => frame(&message),
        }
    }
}

/// `envoy.service.auth.v3.Authorization`, served straight on hyper's
/// request and response: the request's one message read from the body in
/// place (no copy into a decode buffer when it arrives in one DATA frame,
/// as Envoy sends it) and the answer sent as one DATA frame (a cached allow
/// as it is) and the `grpc-status` trailer. Errors are gRPC statuses as
/// tonic's generated server would send them.
#[derive(Debug, Clone)]
pub struct EnvoyServer {
    api: Arc<EnvoyApi>,
    max_decoding_message_size: usize,
}

impl EnvoyServer {
    pub fn new(api: EnvoyApi, max_decoding_message_size: usize) -> Self {
        Self {
            api: Arc::new(api),
            max_decoding_message_size,
        }
    }
}

impl NamedService for EnvoyServer {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Reads a unary call's request message, as tonic's unary server does: the
/// first message of the body (the rest of the body is drained and
/// ignored), refused with tonic's statuses when it is compressed, larger
/// than `max` or missing. When the message arrives in one DATA frame (as
/// Envoy sends it), the result shares that frame's bytes.
pub async fn read_unary<B>(headers: &http::HeaderMap, body: B, max: usize) -> Result<Bytes, Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(encoding) = headers.get("grpc-encoding")
        && encoding.as_bytes() != b"identity"
    {
        return Err(compressed(encoding));
    }
    let mut body = std::pin::pin!(body);
    let mut pending: Option<Pending> = None;
    let mut message = None;
    while !body.is_end_stream() {
        let Some(frame) = body.as_mut().frame().await else {
            break;
        };
        let frame = frame.map_err(|e| body_error(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing to read
        };
        if message.is_some() || data.is_empty() {
            continue;
        }
        let buffered = Pending::push(pending.take(), data);
        match whole_message(buffered.as_slice(), max)? {
            Some(range) => message = Some(buffered.into_bytes().slice(range)),
            None => pending = Some(buffered),
        }
    }
    match (message, pending.is_some()) {
        (Some(message), _) => Ok(message),
        (None, true) => Err(internal("Unexpected EOF decoding stream.")),
        (None, false) => Err(internal("Missing request message.")),
    }
}

/// The request's bytes so far: the first DATA frame kept as it is while it
/// may hold the whole message, later ones appended to a copy.
enum Pending {
    One(Bytes),
    Joined(BytesMut),
}

impl Pending {
    fn push(pending: Option<Self>, data: Bytes) -> Self {
        match pending {
            None => Self::One(data),
            Some(Self::One(head)) => {
                let mut buf = BytesMut::with_capacity(head.len() + data.len());
                buf.put_slice(&head);
                buf.put_slice(&data);
                Self::Joined(buf)
            }
            Some(Self::Joined(mut buf)) => {
                buf.put_slice(&data);
                Self::Joined(buf)
            }
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Self::One(bytes) => bytes,
            Self::Joined(buf) => buf,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Self::One(bytes) => bytes,
            Self::Joined(buf) => buf.freeze(),
        }
    }
}

/// Where the message is in `buf` once its prefix and all of its bytes are
/// there.
fn whole_message(buf: &[u8], max: usize) -> Result<Option<std::ops::Range<usize>>, Status> {
    let Some(head) = buf.get(..PREFIX) else {
        return Ok(None);
    };
    match head[0] {
        0 => {}
        1 => {
            return Err(internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ));
        }
        flag => return Err(bad_flag(flag)),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > max {
        return Err(too_large(len, max));
    }
    Ok((buf.len() >= PREFIX + len).then_some(PREFIX..PREFIX + len))
}

// A call's errors, each built out of line: the hot path (a request read,
// a cached allow sent) then keeps its instructions together, where
// building a `Status` and formatting its message inline spread it over
// more instruction-cache lines (BENCHMARKS.md, "The hot path's code").

#[cold]
#[inline(never)]
fn internal(message: &'static str) -> Status {
    Status::internal(message)
}

#[cold]
#[inline(never)]
fn cannot_encode(err: &prost::EncodeError) -> Status {
    Status::internal(format!("cannot encode the answer: {err}"))
}

#[cold]
#[inline(never)]
fn compressed(encoding: &http::HeaderValue) -> Status {
    Status::unimplemented(format!(
        "Content is compressed with `{}` which isn't supported",
        String::from_utf8_lossy(encoding.as_bytes())
    ))
}

#[cold]
#[inline(never)]
fn body_error(err: Box<dyn std::error::Error + Send + Sync>) -> Status {
    Status::from_error(err)
}

#[cold]
#[inline(never)]
fn bad_flag(flag: u8) -> Status {
    Status::internal(format!(
        "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1) while receiving request"
    ))
}

#[cold]
#[inline(never)]
fn too_large(len: usize, max: usize) -> Status {
    Status::resource_exhausted(format!(
        "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
    ))
}

#[cold]
#[inline(never)]
fn error_reply(status: Status) -> http::Response<Body> {
    status.into_http()
}

/// A unary gRPC response's body: the message frame, then `grpc-status: 0`
/// (see [`reply`]).
struct Reply {
    frame: Option<Bytes>,
    trailers: bool,
}

impl http_body::Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if let Some(frame) = self.frame.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(frame))));
        }
        if std::mem::take(&mut self.trailers) {
            let mut trailers = http::HeaderMap::with_capacity(1);
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.frame.is_none() && !self.trailers
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.frame.as_ref().map_or(0, |f| f.len() as u64))
    }
}

/// A unary call's successful response: `frame` (a gRPC message frame, as
/// [`frame`] writes one) and the `grpc-status: 0` trailer.
pub fn reply(frame: Bytes) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Reply {
        frame: Some(frame),
        trailers: true,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

impl<B> Service<http::Request<B>> for EnvoyServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let api = self.api.clone();
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            Ok(match answer(&api, &parts.headers, body, max).await {
                Ok(frame) => reply(frame),
                Err(status) => error_reply(status),
            })
        })
    }
}

/// Reads one Check call's message, decodes it and answers it. The request's
/// fields are borrowed from the message, so the message (at most `max`
/// bytes) lives until the answer is made, a store read included.
async fn answer<B>(
    api: &EnvoyApi,
    headers: &http::HeaderMap,
    body: B,
    max: usize,
) -> Result<Bytes, Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let message = read_unary(headers, body, max).await?;
    let request = EnvoyRequest::decode(&message, api.wants_host())?;
    api.check(headers, &request).await?.into_frame()
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        config::core::v3::{
            Address, HeaderMap, HeaderValue, SocketAddress, address, socket_address::PortSpecifier,
        },
        service::auth::v3::{
            AttributeContext, CheckRequest,
            attribute_context::{HttpRequest, Peer, Request},
        },
    };
    use prost::Message as _;

    use super::*;

    fn full(http: HttpRequest) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "2001:db8::7".into(),
                            port_specifier: Some(PortSpecifier::PortValue(40_000)),
                            ..Default::default()
                        })),
                    }),
                    service: "client".into(),
                    principal: "spiffe://x".into(),
                    ..Default::default()
                }),
                destination: Some(Peer {
                    service: "api".into(),
                    ..Default::default()
                }),
                request: Some(Request {
                    http: Some(http),
                    ..Default::default()
                }),
                context_extensions: [
                    ("resource".to_owned(), "billing".to_owned()),
                    ("scopes".to_owned(), "a,b".to_owned()),
                    ("other".to_owned(), "x".to_owned()),
                ]
                .into(),
                ..Default::default()
            }),
        }
    }

    fn http(headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            id: "1".into(),
            method: "GET".into(),
            path: "/billing".into(),
            host: "api.example.com:8443".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn reads_what_keyward_needs_and_skips_the_rest() {
        let bytes = full(http(&[
            ("authorization", "Bearer kw_live_x"),
            ("x-api-key", "kw_live_y"),
            ("traceparent", "00-aa-bb-01"),
            ("user-agent", "curl"),
            (":path", "/billing"),
        ]))
        .encode_to_vec();
        let request = EnvoyRequest::decode(&bytes, true).unwrap();
        assert_eq!(
            request,
            EnvoyRequest {
                authorization: Some("Bearer kw_live_x".into()),
                api_key: Some("kw_live_y".into()),
                traceparent: Some("00-aa-bb-01".into()),
                host: Some("api.example.com:8443"),
                resource: Some("billing"),
                scopes: Some("a,b"),
                source_ip: Some("2001:db8::7".parse().unwrap()),
            }
        );
        assert_eq!(EnvoyRequest::decode(&bytes, false).unwrap().host, None);
    }

    #[test]
    fn raw_headers_and_mixed_case_names_are_read_too() {
        let mut http = http(&[]);
        http.header_map = Some(HeaderMap {
            headers: vec![
                HeaderValue {
                    key: "X-Api-Key".into(),
                    value: String::new(),
                    raw_value: b"kw_live_raw".to_vec(),
                },
                HeaderValue {
                    key: "authorization".into(),
                    value: "Bearer v".into(),
                    raw_value: Vec::new(),
                },
            ],
        });
        let bytes = full(http).encode_to_vec();
        let request = EnvoyRequest::decode(&bytes, false).unwrap();
        assert_eq!(request.api_key.as_deref(), Some("kw_live_raw"));
        assert_eq!(request.authorization.as_deref(), Some("Bearer v"));
    }

    #[test]
    fn an_empty_request_has_nothing_and_garbage_is_refused() {
        assert_eq!(
            EnvoyRequest::decode(&[], false).unwrap(),
            EnvoyRequest::default()
        );
        for garbage in [
            &[0x0a, 0x05, 0x01][..],
            &[0xff; 11][..],
            &[0x0b][..],
            &[0x00][..],
        ] {
            let err = EnvoyRequest::decode(garbage, false).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{garbage:?}");
        }
    }

    #[test]
    fn a_header_that_is_not_utf8_is_refused_unless_raw() {
        let mut bytes = Vec::new();
        // CheckRequest.attributes.request.http.headers{"x-api-key": 0xff}
        let entry = [
            0x0a, 0x09, b'x', b'-', b'a', b'p', b'i', b'-', b'k', b'e', b'y', 0x12, 0x01, 0xff,
        ];
        let http = [&[0x1a, entry.len() as u8][..], &entry].concat();
        let request = [&[0x12, http.len() as u8][..], &http].concat();
        let attributes = [&[0x22, request.len() as u8][..], &request].concat();
        bytes.extend_from_slice(&[0x0a, attributes.len() as u8]);
        bytes.extend_from_slice(&attributes);
        let err = EnvoyRequest::decode(&bytes, false).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    /// A request body that arrives as these DATA frames.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    fn grpc_frame(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    /// The message read from `chunks`, once it decodes.
    async fn read(chunks: &[&[u8]], headers: &http::HeaderMap) -> Result<Bytes, Status> {
        let body = Chunks(chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect());
        let message = read_unary(headers, body, 4096).await?;
        EnvoyRequest::decode(&message, false)?;
        Ok(message)
    }

    /// A request's frame and its message.
    fn keyed() -> (Vec<u8>, Bytes) {
        let message = full(http(&[("x-api-key", "kw_live_y")])).encode_to_vec();
        let expected = EnvoyRequest::decode(&message, false).unwrap();
        assert_eq!(expected.api_key.as_deref(), Some("kw_live_y"));
        (grpc_frame(&message), message.into())
    }

    #[tokio::test]
    async fn the_message_is_read_whole_or_in_pieces_and_what_follows_is_ignored() {
        let (frame, expected) = keyed();
        let none = http::HeaderMap::new();
        assert_eq!(read(&[&frame], &none).await.unwrap(), expected);
        // Split inside the prefix, then inside the message.
        let pieces = [&frame[..3], &frame[3..20], &[][..], &frame[20..]];
        assert_eq!(read(&pieces, &none).await.unwrap(), expected);
        // A second message (or garbage) after the first is drained unread,
        // as tonic's unary server does.
        let after = [&frame[..], &b"\x01garbage"[..]];
        assert_eq!(read(&after, &none).await.unwrap(), expected);
        // One DATA frame: the message is that frame's bytes, not a copy.
        let one = Bytes::from(frame.clone());
        let body = Chunks([one.clone()].into());
        let message = read_unary(&none, body, 4096).await.unwrap();
        assert_eq!(message.as_ptr(), one[PREFIX..].as_ptr());
        let mut identity = http::HeaderMap::new();
        identity.insert("grpc-encoding", http::HeaderValue::from_static("identity"));
        assert_eq!(read(&[&frame], &identity).await.unwrap(), expected);
    }

    #[tokio::test]
    async fn bad_bodies_get_the_status_tonic_would_send() {
        let (frame, _) = keyed();
        let none = http::HeaderMap::new();
        let err = read(&[], &none).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (tonic::Code::Internal, "Missing request message.")
        );
        let err = read(&[&frame[..frame.len() - 1]], &none).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (tonic::Code::Internal, "Unexpected EOF decoding stream.")
        );
        let mut compressed = frame.clone();
        compressed[0] = 1;
        let err = read(&[&compressed], &none).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(
            err.message().contains("compressed-flag"),
            "{}",
            err.message()
        );
        compressed[0] = 7;
        let err = read(&[&compressed], &none).await.unwrap_err();
        assert!(
            err.message().contains("invalid compression flag: 7"),
            "{}",
            err.message()
        );
        let mut gzip = http::HeaderMap::new();
        gzip.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let err = read(&[&frame], &gzip).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        assert!(err.message().contains("`gzip`"), "{}", err.message());
        // Over the limit: refused from the prefix, before the bytes arrive.
        let big = grpc_frame(&vec![0; 5000]);
        let err = read(&[&big[..PREFIX]], &none).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("found 5000 bytes, the limit is: 4096 bytes"),
            "{}",
            err.message()
        );
        // A well-framed message that is not a CheckRequest.
        let err = read(&[&grpc_frame(&[0xff; 11])], &none).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_reply_is_its_frame_then_grpc_status_zero() {
        let answer = CheckResponse {
            status: Some(Default::default()),
            ..Default::default()
        };
        let framed = frame(&answer).unwrap();
        assert_eq!(&framed[..], &grpc_frame(&answer.encode_to_vec())[..]);
        let response = reply(framed.clone());
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers.len(), 1);
        assert_eq!(collected.to_bytes(), framed);
    }

    #[test]
    fn an_extended_frame_is_one_frame_of_both_parts() {
        let head = CheckResponse {
            status: Some(Default::default()),
            ..Default::default()
        };
        let tail = CheckResponse {
            dynamic_metadata: Some(Default::default()),
            ..Default::default()
        }
        .encode_to_vec();
        let mut framed = extend_frame(&frame(&head).unwrap(), tail.len()).unwrap();
        framed.put_slice(&tail);
        let both = [head.encode_to_vec(), tail].concat();
        assert_eq!(&framed[..], &grpc_frame(&both)[..]);
        let parsed = CheckResponse::decode(&framed[PREFIX..]).unwrap();
        assert!(parsed.status.is_some() && parsed.dynamic_metadata.is_some());
    }
}
