//! A raw HTTP/2 load generator (the `h2` crate, one thread) for what h2load
//! cannot do: a different pre-encoded request on every call (10,000 distinct
//! keys round-robin, or each key exactly once). Every answer is decoded and
//! counted as allowed, denied or failed.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{Request, Uri};
use tokio::net::TcpStream;

use crate::frames::{Door, allowed};

#[derive(Debug, Clone, Copy, Default)]
pub struct H2genRun {
    pub rps: f64,
    pub allowed: u64,
    pub denied: u64,
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    allowed: AtomicU64,
    denied: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn total(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
            + self.denied.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
    }
}

/// Round-robin over `frames` for `warmup + duration` (`once = false`), or
/// each frame exactly once, stopping early when they run out (`once = true`).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    addr: SocketAddr,
    door: Door,
    frames: Arc<Vec<Bytes>>,
    once: bool,
    conns: usize,
    streams: usize,
    warmup: Duration,
    duration: Duration,
) -> H2genRun {
    run_paced(
        addr, door, frames, once, conns, streams, warmup, duration, None,
    )
    .await
}

/// [`run`], optionally offering a fixed rate (calls per second) instead of
/// as many as the server answers: call `i` is sent at `start + i / rate`
/// by whichever of the `conns * streams` workers is free, so the load stays
/// open as long as fewer calls than workers are waiting for answers.
#[allow(clippy::too_many_arguments)]
pub async fn run_paced(
    addr: SocketAddr,
    door: Door,
    frames: Arc<Vec<Bytes>>,
    once: bool,
    conns: usize,
    streams: usize,
    warmup: Duration,
    duration: Duration,
    rate: Option<f64>,
) -> H2genRun {
    let started = tokio::time::Instant::now();
    let uri: Uri = format!("http://{addr}{}", door.path())
        .parse()
        .expect("uri");
    let counters = Arc::new(Counters::default());
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..conns {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .handshake::<_, Bytes>(tcp)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        for _ in 0..streams {
            let (client, uri, frames) = (client.clone(), uri.clone(), frames.clone());
            let (counters, next, stop) = (counters.clone(), next.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if once && i >= frames.len() {
                        break;
                    }
                    if let Some(rate) = rate {
                        tokio::time::sleep_until(
                            started + Duration::from_secs_f64(i as f64 / rate),
                        )
                        .await;
                    }
                    let frame = frames[i % frames.len()].clone();
                    match call(client.clone(), &uri, frame)
                        .await
                        .map(|body| allowed(door, &body))
                    {
                        Some(Some(true)) => counters.allowed.fetch_add(1, Ordering::Relaxed),
                        Some(Some(false)) => counters.denied.fetch_add(1, Ordering::Relaxed),
                        _ => counters.failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
    }
    let all_done = || workers.iter().all(|w| w.is_finished());
    let wait = |d: Duration| async move {
        let until = Instant::now() + d;
        while Instant::now() < until && !all_done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    if !once {
        wait(warmup).await;
    }
    let (start, before) = (Instant::now(), counters.total());
    let before_split = (
        counters.allowed.load(Ordering::Relaxed),
        counters.denied.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
    );
    wait(duration).await;
    let (elapsed, after) = (start.elapsed(), counters.total());
    let run = H2genRun {
        rps: (after - before) as f64 / elapsed.as_secs_f64(),
        allowed: counters.allowed.load(Ordering::Relaxed) - before_split.0,
        denied: counters.denied.load(Ordering::Relaxed) - before_split.1,
        failed: counters.failed.load(Ordering::Relaxed) - before_split.2,
    };
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    run
}

/// One unary gRPC call; the response body, if the call succeeded.
async fn call(client: h2::client::SendRequest<Bytes>, uri: &Uri, frame: Bytes) -> Option<Bytes> {
    let req = Request::post(uri.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .ok()?;
    let mut client = client.ready().await.ok()?;
    let (response, mut send) = client.send_request(req, false).ok()?;
    send.send_data(frame, true).ok()?;
    let response = response.await.ok()?;
    if response.status() != 200 {
        return None;
    }
    let headers_status = grpc_status(response.headers());
    let mut body = response.into_body();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let status = match body.trailers().await.ok()? {
        Some(trailers) => grpc_status(&trailers),
        None => headers_status,
    };
    (status == Some(0)).then(|| data.freeze())
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}
