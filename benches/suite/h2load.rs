//! h2load (nghttp2) with a pre-encoded gRPC frame: the throughput ceiling for
//! a fixed request body. It sees HTTP 200, not the gRPC status, so answers are
//! checked separately (see `latency`).

use std::{net::SocketAddr, path::Path, time::Duration};

use tokio::process::Command;

#[derive(Debug, Clone, Copy)]
pub struct H2loadRun {
    pub rps: f64,
    pub failed: u64,
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    h2load: &Path,
    addr: SocketAddr,
    path: &str,
    frame_file: &Path,
    conns: usize,
    streams: usize,
    warmup: Duration,
    duration: Duration,
) -> H2loadRun {
    let out = Command::new(h2load)
        .args([
            "-t",
            "1",
            "-c",
            &conns.to_string(),
            "-m",
            &streams.to_string(),
        ])
        .args(["-D", &format!("{}ms", duration.as_millis())])
        .args(["--warm-up-time", &format!("{}ms", warmup.as_millis())])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(frame_file)
        .arg(format!("http://{addr}{path}"))
        .output()
        .await
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "h2load failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "finished in 5.00s, 48123.40 req/s, 5.91MB/s"
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|f| f.trim_end_matches(" req/s").parse::<f64>().ok())
        .unwrap_or_else(|| panic!("cannot read h2load's rate:\n{text}"));
    // "requests: 240617 total, 240681 started, 240617 done, 240617 succeeded, 0 failed, 0 errored, 0 timeout"
    let failed = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .map(|l| {
            l.split(", ")
                .filter(|f| {
                    f.ends_with(" failed") || f.ends_with(" errored") || f.ends_with(" timeout")
                })
                .filter_map(|f| f.split(' ').next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    H2loadRun { rps, failed }
}
