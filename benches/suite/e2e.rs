//! End to end: wrk (HTTP/1.1) -> Envoy (one worker, ext_authz) -> upstream,
//! with the repository's deploy/envoy/envoy.yaml. Envoy shares core 0 with
//! the authorization server; wrk runs on core 1.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::process::Command;

use crate::{
    envoy_process,
    servers::{SERVER_CORE, cpu_time_of},
};

/// Envoy on the server core, in front of an authorization server, with the
/// config's own demo listener as its upstream.
pub struct Envoy {
    inner: envoy_process::Envoy,
    pub port: u16,
}

impl Envoy {
    pub async fn start(bin: &Path, repo: &Path, authz_port: u16) -> Self {
        let inner = envoy_process::Envoy::start(
            bin,
            repo,
            envoy_process::Targets {
                authz_port,
                upstream_port: None,
            },
            envoy_process::Options {
                raw_headers: false,
                cpus: Some(SERVER_CORE),
            },
        )
        .await;
        let port = inner.port;
        Self { inner, port }
    }

    /// User + system CPU time Envoy has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.inner.pid())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct WrkRun {
    pub rps: f64,
    pub requests: u64,
    pub non_2xx: u64,
    pub p99: Duration,
}

/// A Lua script giving each request the next key of `keys_file` as x-api-key.
pub fn write_script(dir: &Path, keys_file: &Path, name: &str) -> PathBuf {
    let script = dir.join(format!("keyward-bench-{name}.lua"));
    std::fs::write(
        &script,
        format!(
            r#"local keys = {{}}
for line in io.lines("{}") do keys[#keys + 1] = line end
local i = 0
request = function()
  i = i % #keys + 1
  return wrk.format("GET", nil, {{ ["x-api-key"] = keys[i] }})
end
"#,
            keys_file.display()
        ),
    )
    .expect("write lua");
    script
}

pub async fn wrk(
    bin: &Path,
    url: &str,
    script: Option<&Path>,
    conns: usize,
    duration: Duration,
) -> WrkRun {
    let mut cmd = Command::new(bin);
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{}s", duration.as_secs().max(1)),
        "--latency",
    ]);
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd.arg(url).output().await.expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk output:\n{text}"));
    // "  41234 requests in 5.00s, 6.00MB read"
    let requests = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().to_owned())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| parse_wrk_duration(v.trim()))
        .unwrap_or_default();
    WrkRun {
        rps,
        requests,
        non_2xx,
        p99,
    }
}

fn parse_wrk_duration(v: &str) -> Duration {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(0.0);
    Duration::from_secs_f64(match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => 0.0,
    })
}
