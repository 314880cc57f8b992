//! The benchmark baseline: an ext_authz server that answers OK to every
//! `envoy.service.auth.v3.Authorization/Check` (and every
//! `keyward.v1.CheckService/Check`) and does nothing else (it also answers
//! gRPC health checks, as Envoy asks them of any ext_authz cluster). Served the same way
//! keyward serves (tonic, TCP_NODELAY), on the runtime asked for.
//!
//!     empty_authz --addr 127.0.0.1:50061 --runtime current-thread|multi-thread
//!                 [--answer minimal|headers|metadata|keyward-shaped]
//!                 [--door hyper|tonic] [--encode-once BOOL] [--coalescing BOOL]
//!
//! It is the ceiling the suite measures keyward against, so it is built the
//! fastest way measured (BENCHMARKS.md, "The baseline is the ceiling"): the
//! release profile keyward uses, mimalloc as its allocator (as keyward),
//! with `--coalescing true` (the default) connections served as keyward
//! serves them (keyward::net::Coalescing), and with `--door hyper` (the
//! default) `Authorization.Check` served on hyper's request and response as
//! keyward serves it, the request still decoded whole with prost; each of
//! these made this server faster in the same run than without it.
//! `--door tonic` serves tonic's generated service instead.
//!
//! `--answer keyward-shaped` still does no work, but answers every check with
//! a constant response shaped like keyward's allow (identity headers to set,
//! credential headers to remove, dynamic metadata): it tells how much of an
//! end-to-end difference is Envoy applying the answer rather than keyward
//! computing it. The generated service clones and encodes that constant on
//! every call; `--encode-once true` sends the bytes encoded at start
//! instead (as keyward sends a key's cached allow), the whole request still
//! decoded with prost: what is left of the difference to `--answer minimal`
//! is what the answer's bytes cost.

// Measured: 10 % more checks per core than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser as _;
use envoy_types::{
    ext_authz::v3::{
        CheckResponseExt as _, OkHttpResponseBuilder,
        pb::{Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderAppendAction},
    },
    pb::google::protobuf::{ListValue, Struct, Value, value::Kind},
};
use keyward::{
    config::RuntimeFlavor,
    pb::{self, check_service_server::CheckServiceServer},
};
use prost::Message as _;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// `Authorization.Check` served by hand, two ways:
///
/// - on hyper's request and response directly, as keyward serves it
///   (`keyward::api::envoy_wire`), without tonic's codec machinery: the
///   request read with `read_unary` and decoded whole with prost, the
///   answer's frame (encoded per call, or once) sent with `reply`;
/// - through tonic's codec (`--door tonic --encode-once true`): bytes
///   encoded once, the request decoded with prost as the generated service
///   decodes it.
mod by_hand {
    use std::{convert::Infallible, future::Future, pin::Pin};

    use bytes::{BufMut as _, Bytes};
    use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
    use keyward::api::envoy_wire::{frame, read_unary, reply};
    use prost::Message as _;
    use tonic::{
        Status,
        body::Body,
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
        server::{Grpc, NamedService, UnaryService},
    };

    #[derive(Clone)]
    pub enum Server {
        /// On hyper, the answer cloned and framed per call.
        PerCall(std::sync::Arc<CheckResponse>),
        /// On hyper, the answer's frame encoded once.
        Framed(Bytes),
        /// Through tonic's codec, the answer's message encoded once.
        TonicCodec(Bytes),
    }

    #[derive(Clone, Copy)]
    struct BytesCodec;

    impl Codec for BytesCodec {
        type Encode = Bytes;
        type Decode = CheckRequest;
        type Encoder = Self;
        type Decoder = Self;
        fn encoder(&mut self) -> Self {
            *self
        }
        fn decoder(&mut self) -> Self {
            *self
        }
    }

    impl Encoder for BytesCodec {
        type Item = Bytes;
        type Error = Status;
        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for BytesCodec {
        type Item = CheckRequest;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<CheckRequest>, Status> {
            CheckRequest::decode(src)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }

    struct Call(Bytes);

    impl UnaryService<CheckRequest> for Call {
        type Response = Bytes;
        type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;
        fn call(&mut self, _: tonic::Request<CheckRequest>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(self.0.clone())))
        }
    }

    impl NamedService for Server {
        const NAME: &'static str = "envoy.service.auth.v3.Authorization";
    }

    impl<B> tower_service::Service<http::Request<B>> for Server
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future =
            Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            let server = self.clone();
            Box::pin(async move {
                if req.uri().path() != "/envoy.service.auth.v3.Authorization/Check" {
                    return Ok(Status::unimplemented("no such method").into_http());
                }
                let answer = match server {
                    Server::TonicCodec(encoded) => {
                        return Ok(Grpc::new(BytesCodec).unary(Call(encoded), req).await);
                    }
                    Server::PerCall(message) => Err(message),
                    Server::Framed(framed) => Ok(framed),
                };
                let (parts, body) = req.into_parts();
                let answered = read_unary(&parts.headers, body, 4 << 20)
                    .await
                    .and_then(|message| {
                        CheckRequest::decode(message).map_err(|e| Status::internal(e.to_string()))
                    })
                    .and_then(|_request| match answer {
                        Ok(framed) => Ok(framed),
                        Err(message) => frame(&CheckResponse::clone(&message)),
                    });
                Ok(match answered {
                    Ok(framed) => reply(framed),
                    Err(status) => status.into_http(),
                })
            })
        }
    }
}

#[derive(clap::Parser)]
struct Args {
    #[arg(long)]
    addr: std::net::SocketAddr,
    #[arg(long, value_enum, default_value_t = RuntimeFlavor::CurrentThread)]
    runtime: RuntimeFlavor,
    /// Worker threads when multi-thread.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    #[arg(long, value_enum, default_value_t = Answer::Minimal)]
    answer: Answer,
    /// Serve connections the way keyward does (keyward::net::Coalescing: no
    /// vectored writes, so h2 coalesces small answers into fewer writes);
    /// `false`: tonic's own TCP connections.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    coalescing: bool,
    /// Encode the answer once at start and send its bytes on every call.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    encode_once: bool,
    /// How `Authorization.Check` is served: through tonic's generated
    /// service (or its codec, with `--encode-once`), or on hyper's request
    /// and response directly, as keyward serves it.
    #[arg(long, value_enum, default_value_t = Door::Hyper)]
    door: Door,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Door {
    Tonic,
    Hyper,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Answer {
    /// OK and nothing else.
    Minimal,
    /// OK with keyward's header changes only.
    Headers,
    /// OK with keyward's dynamic metadata only.
    Metadata,
    /// OK with a constant allow shaped like keyward's: both.
    KeywardShaped,
    /// The same, plus RateLimit and RateLimit-Policy headers for the client,
    /// as keyward answers for a key with rate limits.
    KeywardShapedLimited,
}

struct Empty(CheckResponse);

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

fn shaped(answer: Answer) -> CheckResponse {
    let mut resp = CheckResponse::with_status(Status::ok(""));
    if answer == Answer::Minimal {
        return resp;
    }
    if answer != Answer::Metadata {
        resp.set_http_response(header_changes(answer == Answer::KeywardShapedLimited));
    }
    if answer != Answer::Headers {
        resp.set_dynamic_metadata(Some(metadata()));
    }
    resp
}

fn header_changes(limited: bool) -> envoy_types::ext_authz::v3::pb::OkHttpResponse {
    let mut ok = OkHttpResponseBuilder::new();
    for (name, value) in [
        ("x-keyward-key-id", "01a2065a-1b2c-7d3e-8f40-123456789abc"),
        ("x-keyward-owner-id", "owner-500"),
        ("x-keyward-scopes", "invoices:read"),
        ("x-keyward-reason", "OK"),
    ] {
        ok.add_header(
            name,
            value,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            true,
        );
    }
    ok.remove_header("authorization");
    ok.remove_header("x-api-key");
    if limited {
        for (name, value) in [
            (
                "ratelimit-policy",
                r#""burst";q=1000000000;w=1, "daily";q=1000000000000;w=86400"#,
            ),
            (
                "ratelimit",
                r#""burst";r=999999999;t=1, "daily";r=999999999999;t=1"#,
            ),
        ] {
            ok.add_response_header(
                name,
                value,
                Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
                false,
            );
        }
    }
    ok.build()
}

fn metadata() -> Struct {
    Struct {
        fields: [
            ("keyward_reason", string("OK")),
            (
                "keyward_key_id",
                string("01a2065a-1b2c-7d3e-8f40-123456789abc"),
            ),
            ("keyward_owner_id", string("owner-500")),
            (
                "keyward_scopes",
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![string("invoices:read")],
                    })),
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    }
}

#[tonic::async_trait]
impl Authorization for Empty {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.0.clone()))
    }
}

#[tonic::async_trait]
impl pb::check_service_server::CheckService for Empty {
    async fn check(
        &self,
        _: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        Ok(Response::new(pb::CheckResponse {
            allowed: true,
            reason: pb::Reason::Ok.into(),
            http_status: 200,
            ..Default::default()
        }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let answer = shaped(args.answer);
    let runtime = match args.runtime {
        RuntimeFlavor::MultiThread => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()?,
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        // Envoy health-checks its ext_authz cluster; answer it like keyward.
        let (_health, health_service) = tonic_health::server::health_reporter();
        let builder = tonic::transport::Server::builder().add_service(health_service);
        let router = if args.door == Door::Hyper {
            builder.add_service(if args.encode_once {
                by_hand::Server::Framed(keyward::api::envoy_wire::frame(&answer)?)
            } else {
                by_hand::Server::PerCall(answer.into())
            })
        } else if args.encode_once {
            builder.add_service(by_hand::Server::TonicCodec(answer.encode_to_vec().into()))
        } else {
            builder.add_service(AuthorizationServer::new(Empty(answer)))
        }
        .add_service(CheckServiceServer::new(Empty(CheckResponse::default())));
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        if args.coalescing {
            use tokio_stream::StreamExt as _;
            router
                .serve_with_incoming(incoming.map(|c| c.map(keyward::net::Coalescing)))
                .await?;
        } else {
            router.serve_with_incoming(incoming).await?;
        }
        Ok(())
    })
}
