//! `envoy.service.auth.v3.Authorization` on the wire, for the hot path.
//!
//! Envoy's `CheckRequest` carries the whole request (every header, the
//! peers, the TLS session, ...), and keyward reads a handful of its fields.
//! Decoding it with the generated types allocates a string for every field
//! and header. [`EnvoyRequest`] is what keyward reads, decoded straight from
//! the protobuf bytes: unwanted fields and headers are skipped without a
//! copy. The answer goes back either as a message or as bytes encoded
//! before (a key's allow answer, built once per cache entry).
//!
//! [`EnvoyServer`] serves `Check` with that codec, in place of the
//! generated `AuthorizationServer`; Envoy's and any other gRPC client see
//! the same service.

use std::{convert::Infallible, net::IpAddr, sync::Arc};

use bytes::{Buf as _, BufMut as _, Bytes};
use envoy_types::ext_authz::v3::pb::CheckResponse;
use prost::Message as _;
use tonic::{
    Status,
    body::Body,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    server::{Grpc, NamedService, UnaryService},
};
use tower_service::Service;

use super::envoy::EnvoyApi;

/// What keyward reads of Envoy's `CheckRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvoyRequest {
    /// `authorization`, `x-api-key` and `traceparent`, the first of each,
    /// from `headers` or (with `encode_raw_headers`) `header_map`.
    pub authorization: Option<String>,
    pub api_key: Option<String>,
    pub traceparent: Option<String>,
    /// The `:authority`, only when asked for (`--envoy-host-as-resource`).
    pub host: Option<String>,
    /// The route's `context_extensions`.
    pub resource: Option<String>,
    pub scopes: Option<String>,
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

fn malformed(what: &str) -> Status {
    Status::invalid_argument(format!("malformed CheckRequest: {what}"))
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn varint(&mut self) -> Result<u64, Status> {
        let mut value = 0u64;
        for (i, byte) in self.bytes.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.bytes = &self.bytes[i + 1..];
                return Ok(value);
            }
        }
        Err(malformed("bad varint"))
    }

    /// The next field's number and wire type; `None` at the end.
    fn field(&mut self) -> Result<Option<(u32, u8)>, Status> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| malformed("bad field number"))?;
        if number == 0 {
            return Err(malformed("field number 0"));
        }
        Ok(Some((number, (key & 7) as u8)))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Status> {
        let n = usize::try_from(n).map_err(|_| malformed("length"))?;
        if n > self.bytes.len() {
            return Err(malformed("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn len_delimited(&mut self, wire_type: u8) -> Result<&'a [u8], Status> {
        if wire_type != LEN {
            return Err(malformed("wrong wire type"));
        }
        let n = self.varint()?;
        self.take(n)
    }

    fn skip(&mut self, wire_type: u8) -> Result<(), Status> {
        match wire_type {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            LEN => self.len_delimited(LEN).map(drop),
            5 => self.take(4).map(drop),
            _ => Err(malformed("unsupported wire type")),
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, Status> {
    std::str::from_utf8(bytes).map_err(|_| malformed("a string is not UTF-8"))
}

/// A `map<string, string>` entry: (key, value) as bytes.
fn entry(bytes: &[u8]) -> Result<(&[u8], &[u8]), Status> {
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
fn keep(slot: &mut Option<String>, value: &[u8], lossy: bool) -> Result<(), Status> {
    if slot.is_none() {
        *slot = Some(if lossy {
            // Raw header values are bytes; keys are ASCII and anything else
            // fails the key's format check later.
            String::from_utf8_lossy(value).into_owned()
        } else {
            utf8(value)?.to_owned()
        });
    }
    Ok(())
}

impl EnvoyRequest {
    /// Decodes the fields keyward reads from an encoded `CheckRequest`.
    pub fn decode(bytes: &[u8], with_host: bool) -> Result<Self, Status> {
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

    fn attributes(&mut self, bytes: &[u8], with_host: bool) -> Result<(), Status> {
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
                        b"resource" => keep(&mut self.resource, value, false)?,
                        b"scopes" => keep(&mut self.scopes, value, false)?,
                        _ => {}
                    }
                }
                _ => r.skip(wire_type)?,
            }
        }
        Ok(())
    }

    /// `Peer.address.socket_address.address`, parsed.
    fn source(&mut self, bytes: &[u8]) -> Result<(), Status> {
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

    fn http(&mut self, bytes: &[u8], with_host: bool) -> Result<(), Status> {
        let mut r = Reader::new(bytes);
        while let Some((number, wire_type)) = r.field()? {
            match number {
                tag::HTTP_HEADERS => {
                    let (key, value) = entry(r.len_delimited(wire_type)?)?;
                    self.header(key, value, false)?;
                }
                tag::HTTP_HOST if with_host => {
                    self.host = Some(utf8(r.len_delimited(wire_type)?)?.to_owned());
                }
                tag::HTTP_HEADER_MAP => {
                    let mut map = Reader::new(r.len_delimited(wire_type)?);
                    while let Some((number, wire_type)) = map.field()? {
                        if number != tag::HEADER_MAP_HEADERS {
                            map.skip(wire_type)?;
                            continue;
                        }
                        let mut header = Reader::new(map.len_delimited(wire_type)?);
                        let (mut key, mut value, mut raw): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
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
    fn header(&mut self, name: &[u8], value: &[u8], lossy: bool) -> Result<(), Status> {
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

/// An answer: a message, or the bytes of one encoded before, or those
/// followed by more fields of the same message (written one after the other
/// into the response, so the shared part is not copied first).
#[derive(Debug, Clone)]
pub enum Answer {
    Message(Box<CheckResponse>),
    Encoded(Bytes),
    Tailed(Bytes, Bytes),
}

/// Decodes [`EnvoyRequest`]s, encodes [`Answer`]s.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyCodec {
    with_host: bool,
}

impl Codec for EnvoyCodec {
    type Encode = Answer;
    type Decode = EnvoyRequest;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for EnvoyCodec {
    type Item = Answer;
    type Error = Status;

    fn encode(&mut self, item: Answer, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Answer::Encoded(bytes) => dst.put_slice(&bytes),
            Answer::Tailed(head, tail) => {
                dst.put_slice(&head);
                dst.put_slice(&tail);
            }
            Answer::Message(message) => message
                .encode(dst)
                .map_err(|e| Status::internal(format!("cannot encode the answer: {e}")))?,
        }
        Ok(())
    }
}

impl Decoder for EnvoyCodec {
    type Item = EnvoyRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<EnvoyRequest>, Status> {
        let len = src.remaining();
        // tonic buffers the whole message: one chunk, read in place.
        if src.chunk().len() == len {
            let request = EnvoyRequest::decode(src.chunk(), self.with_host)?;
            src.advance(len);
            return Ok(Some(request));
        }
        let bytes = src.copy_to_bytes(len);
        EnvoyRequest::decode(&bytes, self.with_host).map(Some)
    }
}

/// `envoy.service.auth.v3.Authorization`, served with [`EnvoyCodec`].
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

struct CheckCall(Arc<EnvoyApi>);

impl UnaryService<EnvoyRequest> for CheckCall {
    type Response = Answer;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tonic::Response<Answer>, Status>>
                + Send
                + 'static,
        >,
    >;

    fn call(&mut self, request: tonic::Request<EnvoyRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.check(request).await })
    }
}

impl<B> Service<http::Request<B>> for EnvoyServer
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
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
        let codec = EnvoyCodec {
            with_host: api.wants_host(),
        };
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = Grpc::new(codec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(CheckCall(api), req).await)
        })
    }
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
                host: Some("api.example.com:8443".into()),
                resource: Some("billing".into()),
                scopes: Some("a,b".into()),
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
        let request = EnvoyRequest::decode(&full(http).encode_to_vec(), false).unwrap();
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
}
