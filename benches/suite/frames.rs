//! Request bodies as they travel: length-prefixed gRPC frames.

use bytes::{BufMut as _, Bytes, BytesMut};
use envoy_types::pb::envoy::{
    config::core::v3::{Address, SocketAddress, address},
    service::auth::v3::{
        AttributeContext, CheckRequest as EnvoyCheck,
        attribute_context::{HttpRequest, Peer, Request},
    },
};
use keyward::pb;
use prost::Message as _;

pub const ENVOY_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
pub const KEYWARD_PATH: &str = "/keyward.v1.CheckService/Check";

/// Which front door a load goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Envoy,
    Keyward,
}

impl Door {
    pub fn path(self) -> &'static str {
        match self {
            Door::Envoy => ENVOY_PATH,
            Door::Keyward => KEYWARD_PATH,
        }
    }
}

/// 5-byte gRPC prefix (uncompressed, big-endian length) + message.
pub fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("message fits a frame"));
    msg.encode(&mut buf).expect("encode");
    buf.freeze()
}

/// What Envoy sends for `GET /billing/invoices` with `x-api-key`, with the
/// example config's `allowed_headers` and route policy.
pub fn envoy_check(key: &str) -> EnvoyCheck {
    envoy_check_from(key, "127.0.0.1")
}

/// [`envoy_check`] from the downstream client `source_ip`.
pub fn envoy_check_from(key: &str, source_ip: &str) -> EnvoyCheck {
    EnvoyCheck {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: source_ip.into(),
                        port_specifier: Some(
                            envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                                40000,
                            ),
                        ),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "11850379405458315436".into(),
                    method: "GET".into(),
                    path: "/billing/invoices".into(),
                    host: "api.example.com".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: [
                ("resource".to_owned(), "billing".to_owned()),
                ("scopes".to_owned(), "invoices:read".to_owned()),
            ]
            .into(),
            ..Default::default()
        }),
    }
}

pub fn keyward_check(key: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        key: key.to_owned(),
        resource: "billing".into(),
        required_scopes: vec!["invoices:read".into()],
        client_ip: String::new(),
        cost: 0,
    }
}

pub fn frame(door: Door, key: &str) -> Bytes {
    match door {
        Door::Envoy => grpc_frame(&envoy_check(key)),
        Door::Keyward => grpc_frame(&keyward_check(key)),
    }
}

/// Frames written back to back (each already length-prefixed), and read.
pub fn write_frames(path: &std::path::Path, frames: &[Bytes]) {
    let all: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
    std::fs::write(path, all).expect("write frames");
}

pub fn read_frames(path: &std::path::Path) -> Vec<Bytes> {
    let all = Bytes::from(std::fs::read(path).expect("read frames"));
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 5 <= all.len() {
        let len = u32::from_be_bytes([all[at + 1], all[at + 2], all[at + 3], all[at + 4]]) as usize;
        frames.push(all.slice(at..at + 5 + len));
        at += 5 + len;
    }
    frames
}

/// A key with its last character changed: wrong checksum.
pub fn bad_checksum(key: &str) -> String {
    let mut k = key.to_owned();
    let last = k.pop().expect("non-empty key");
    k.push(if last == 'a' { 'b' } else { 'a' });
    k
}

/// Whether a response body says "allowed", for either door.
pub fn allowed(door: Door, body: &[u8]) -> Option<bool> {
    let msg = body.get(5..)?;
    match door {
        Door::Envoy => {
            let resp =
                envoy_types::pb::envoy::service::auth::v3::CheckResponse::decode(msg).ok()?;
            Some(resp.status.map_or(0, |s| s.code) == 0)
        }
        Door::Keyward => Some(pb::CheckResponse::decode(msg).ok()?.allowed),
    }
}
