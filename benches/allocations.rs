//! Allocations per cache-hit check, counted by the allocator: keyward's
//! Envoy front door against a plain tonic ext_authz server answering OK (the
//! allocations tonic and h2 make for any call), in one run. Only the
//! servers' threads are counted (each serves on a current-thread runtime of
//! its own thread); the client runs elsewhere.
//!
//!     cargo bench --bench allocations [-- --checks 20000]
//!
//! Loopback only; every loop is bounded in count.

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering},
};

use clap::Parser as _;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest as EnvoyCheck, CheckResponse,
};
use keyward::{config::Config, pb, startup};
use tokio::sync::oneshot;
use tonic::transport::Channel;

// Shared with the tests, which use parts this file does not.
#[allow(dead_code)]
#[path = "../tests/support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "../tests/support/db.rs"]
mod db;
#[allow(dead_code)]
#[path = "suite/frames.rs"]
mod frames;
#[path = "../tests/support/grpc.rs"]
mod grpc;

/// mimalloc (what keyward runs with), counting the allocations made on
/// threads that asked to be counted.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on unchanged to mimalloc, a correct
// allocator; the counting touches only an atomic and a thread-local Cell
// (no allocation of its own, so no recursion).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(clap::Parser)]
struct Args {
    /// Checks measured per server (after as many to warm up).
    #[arg(long, default_value_t = 20_000)]
    checks: usize,
    /// Distinct keys the checks go round.
    #[arg(long, default_value_t = 1_000)]
    keys: usize,
    // Accepted and ignored: cargo bench passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The plain baseline: answers OK, nothing else.
struct Empty;

#[tonic::async_trait]
impl Authorization for Empty {
    async fn check(
        &self,
        _: tonic::Request<EnvoyCheck>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        use envoy_types::ext_authz::v3::CheckResponseExt as _;
        Ok(tonic::Response::new(CheckResponse::with_status(
            tonic::Status::ok(""),
        )))
    }
}

/// The floor: tonic serving `Check` with a codec that decodes nothing and
/// answers bytes encoded once, so every allocation left is tonic's and h2's.
mod floor {
    use std::{convert::Infallible, future::Future, pin::Pin, task::Poll};

    use bytes::{Buf as _, BufMut as _, Bytes};
    use tonic::{
        Status,
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
        server::{Grpc, NamedService, UnaryService},
    };

    #[derive(Clone, Copy)]
    pub struct Raw;

    impl Codec for Raw {
        type Encode = Bytes;
        type Decode = ();
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    impl Encoder for Raw {
        type Item = Bytes;
        type Error = Status;
        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Raw {
        type Item = ();
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
            let n = src.remaining();
            src.advance(n);
            Ok(Some(()))
        }
    }

    #[derive(Clone)]
    pub struct Server(pub Bytes);

    impl NamedService for Server {
        const NAME: &'static str = "envoy.service.auth.v3.Authorization";
    }

    struct Call(Bytes);

    impl UnaryService<()> for Call {
        type Response = Bytes;
        type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;
        fn call(&mut self, _: tonic::Request<()>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(self.0.clone())))
        }
    }

    impl<B> tower_service::Service<http::Request<B>> for Server
    where
        B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            let answer = self.0.clone();
            Box::pin(async move { Ok(Grpc::new(Raw).unary(Call(answer), req).await) })
        }
    }
}

/// Runs `serve` on a counted thread of its own; returns the address it
/// sends back and a stop switch.
fn counted_server<F, Fut>(serve: F) -> (std::net::SocketAddr, oneshot::Sender<()>)
where
    F: FnOnce(oneshot::Sender<std::net::SocketAddr>, oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (addr_tx, addr_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    std::thread::spawn(move || {
        COUNTED.with(|c| c.set(true));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        runtime.block_on(serve(addr_tx, stop_rx));
    });
    let addr = addr_rx.blocking_recv().expect("server address");
    (addr, stop_tx)
}

/// Allocations on the server per check, over `n` sequential checks.
async fn measure(channel: Channel, requests: &[EnvoyCheck], n: usize) -> f64 {
    let mut client =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel,
        );
    for r in requests {
        let answer = client.check(r.clone()).await.expect("check").into_inner();
        assert_eq!(
            answer.status.map(|s| s.code),
            Some(0),
            "a check was refused"
        );
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for i in 0..n {
        let answer = client
            .check(requests[i % requests.len()].clone())
            .await
            .expect("check")
            .into_inner();
        assert_eq!(answer.status.map(|s| s.code), Some(0));
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / n as f64
}

fn main() {
    let args = Args::parse();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");

    // keyward, on a fresh database, with an admin key.
    let url = db::fresh_database_url("keyward_bench");
    let config = Config::try_parse_from([
        "keyward",
        "--grpc-addr",
        "127.0.0.1:0",
        "--database-url",
        &url,
        "--log-filter",
        "warn",
        "--metrics-addr",
        "127.0.0.1:0",
        "--shutdown-delay",
        "0s",
    ])
    .expect("config");
    let admin_key = client_rt
        .block_on(startup::bootstrap(&config, "bench", "bench admin"))
        .expect("bootstrap")
        .1
        .expose_secret()
        .to_owned();
    let (kw_addr, kw_stop) = counted_server(move |addr, stop| async move {
        let running = app::start(&config).await;
        let _ = addr.send(running.addr);
        let _ = stop.await;
        drop(running.stop);
        let _ = running.server.await;
    });
    let (empty_addr, empty_stop) = counted_server(|addr, stop| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let _ = addr.send(listener.local_addr().expect("addr"));
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Empty))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stop.await;
                },
            )
            .await
            .expect("serve");
    });

    let (floor_addr, floor_stop) = counted_server(|addr, stop| async move {
        use envoy_types::ext_authz::v3::CheckResponseExt as _;
        use prost::Message as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let _ = addr.send(listener.local_addr().expect("addr"));
        let ok = CheckResponse::with_status(tonic::Status::ok("")).encode_to_vec();
        tonic::transport::Server::builder()
            .add_service(floor::Server(ok.into()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stop.await;
                },
            )
            .await
            .expect("serve");
    });

    let (keyward, empty, floor) = client_rt.block_on(async {
        let connect = |addr: std::net::SocketAddr| async move {
            Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect")
        };
        let kw = connect(kw_addr).await;
        let mut keys = pb::key_service_client::KeyServiceClient::new(kw.clone());
        let mut requests = Vec::with_capacity(args.keys);
        for _ in 0..args.keys {
            let minted = keys
                .mint(grpc::with_key(
                    pb::MintRequest {
                        owner_id: "acme".into(),
                        resources: vec!["billing".into()],
                        scopes: vec!["invoices:read".into()],
                        ..Default::default()
                    },
                    &admin_key,
                ))
                .await
                .expect("mint")
                .into_inner();
            requests.push(frames::envoy_check(&minted.secret));
        }
        let keyward = measure(kw, &requests, args.checks).await;
        let empty = measure(connect(empty_addr).await, &requests, args.checks).await;
        let floor = measure(connect(floor_addr).await, &requests, args.checks).await;
        (keyward, empty, floor)
    });
    let _ = kw_stop.send(());
    let _ = empty_stop.send(());
    let _ = floor_stop.send(());

    println!();
    println!(
        "allocations per cache-hit check on the server, {} sequential checks over {} keys",
        args.checks, args.keys
    );
    println!();
    println!("| server | allocations per check |");
    println!("|---|---|");
    println!(
        "| keyward, Authorization.Check (allowed, identity headers and metadata) | {keyward:.2} |"
    );
    println!(
        "| plain tonic ext_authz answering OK (prost decodes the whole CheckRequest) | {empty:.2} |"
    );
    println!(
        "| floor: tonic serving Check with a codec that decodes nothing, answering pre-encoded bytes | {floor:.2} |"
    );
    println!(
        "| keyward - floor (keyward serves Check on hyper without tonic's codec, so this is its own less what it saves of tonic's) | {:.2} |",
        keyward - floor
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    if let Err(err) = client_rt.block_on(db::drop_database(&url)) {
        eprintln!("cannot drop the bench database: {err}");
    }
}
