//! Every admin call gets a span (`rpc.*` attributes, the caller recorded by
//! the handler once it is authorized) and is counted by method and gRPC
//! code. One wrapper around each admin service instead of an attribute on
//! each of its handlers: no method can be forgotten.

use std::{
    collections::HashSet,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use prost::Message as _;
use tonic::{body::Body, server::NamedService};
use tower_service::Service;
use tracing::{Instrument as _, field::Empty};

use crate::metrics::{AdminCalls, code_name};

/// The methods metrics may name: those the protos declare, so that a client
/// calling made-up paths cannot grow the label set. Anything else is
/// counted as `unknown`.
#[derive(Debug)]
pub struct KnownMethods {
    methods: HashSet<&'static str>,
}

impl KnownMethods {
    /// `pkg.Service/Method` for every method in the descriptor sets.
    pub fn from_descriptors(sets: &[&[u8]]) -> Self {
        let mut methods = HashSet::new();
        for bytes in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = service.name.unwrap_or_default();
                    for method in service.method {
                        let name = format!(
                            "{package}.{service_name}/{}",
                            method.name.unwrap_or_default()
                        );
                        // Leaked once at start-up: a few dozen short strings.
                        methods.insert(&*Box::leak(name.into_boxed_str()));
                    }
                }
            }
        }
        Self { methods }
    }

    fn name(&self, path: &str) -> &'static str {
        let path = path.strip_prefix('/').unwrap_or(path);
        self.methods.get(path).copied().unwrap_or("unknown")
    }
}

/// What the wrappers share.
#[derive(Debug, Clone)]
pub struct Observing {
    pub known: Arc<KnownMethods>,
    pub calls: Arc<AdminCalls>,
}

impl Observing {
    pub fn wrap<S>(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            observing: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Observed<S> {
    inner: S,
    observing: Observing,
}

impl<S: NamedService> NamedService for Observed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Observed<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = self.observing.known.name(req.uri().path());
        let (service, short) = method.split_once('/').unwrap_or((method, ""));
        let span = tracing::info_span!(
            "admin call",
            otel.name = method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = short,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
            caller = Empty,
            caller_owner = Empty,
        );
        let call = self.inner.call(req).instrument(span.clone());
        let calls = self.observing.calls.clone();
        Box::pin(async move {
            let response = call.await;
            // A refused unary call is trailers-only: its status is in the
            // headers. An answered one has no grpc-status header until its
            // trailers, which only come with OK.
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from),
                Err(never) => match *never {},
            };
            span.record("rpc.grpc.status_code", code as i32);
            if code != tonic::Code::Ok {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", code_name(code));
            }
            calls.record(method, code);
            response
        })
    }
}
