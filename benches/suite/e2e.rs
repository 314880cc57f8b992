//! End to end: wrk (HTTP/1.1) -> Envoy (one worker, ext_authz) -> upstream,
//! with the repository's deploy/envoy/envoy.yaml. Envoy shares core 0 with
//! the authorization server; wrk runs on core 1.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

use crate::servers::{SERVER_CORE, free_port};

#[path = "../../tests/support/envoy_config.rs"]
mod envoy_config;

pub struct Envoy {
    child: Child,
    pub port: u16,
    config: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

impl Envoy {
    /// User + system CPU time Envoy has used so far.
    pub fn cpu_time(&self) -> Duration {
        crate::servers::cpu_time_of(self.child.id().expect("envoy running"))
    }

    /// The example config with `authz_port` as its ext_authz server; its
    /// upstream is the config's own demo listener.
    pub async fn start(bin: &Path, repo: &Path, authz_port: u16) -> Self {
        let template =
            std::fs::read_to_string(repo.join("deploy/envoy/envoy.yaml")).expect("envoy.yaml");
        let (port, admin, demo) = (free_port(), free_port(), free_port());
        let yaml = envoy_config::test_config(
            &template,
            &[
                ("ingress", port),
                ("admin", admin),
                ("demo-upstream", demo),
                ("keyward", authz_port),
                ("upstream", demo),
            ],
            false,
        );
        let config = std::env::temp_dir().join(format!("keyward-bench-envoy-{port}.yaml"));
        std::fs::write(&config, yaml).expect("write config");
        let child = Command::new("taskset")
            .args(["-c", SERVER_CORE])
            .arg(bin)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "error",
                "-c",
            ])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start envoy");
        let envoy = Self {
            child,
            port,
            config,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new("curl")
                .args(["-sf", &format!("http://127.0.0.1:{admin}/ready")])
                .output()
                .await
                .is_ok_and(|o| o.status.success());
            if ready {
                return envoy;
            }
            assert!(Instant::now() < deadline, "envoy did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
pub fn write_script(dir: &Path, keys_file: &Path) -> PathBuf {
    let script = dir.join("keyward-bench-keys.lua");
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
