//! The real Envoy running the repository's own deploy/envoy/envoy.yaml, with
//! its ports swapped for free loopback ones; and [`binary`] and [`spawn`] for
//! tests that write a config of their own. Shared by tests/api and
//! benches/suite (each includes this file with `#[path]`).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
};

/// Where a started Envoy sends its traffic.
pub struct Targets {
    /// The ext_authz cluster (keyward, or a stand-in).
    pub authz_port: u16,
    /// The upstream cluster; `None`: the config's own demo upstream listener.
    pub upstream_port: Option<u16>,
}

/// How to run it.
#[derive(Default)]
pub struct Options<'a> {
    /// Sets `encode_raw_headers: true` on the ext_authz filter.
    pub raw_headers: bool,
    /// `taskset -c` list to pin Envoy to.
    pub cpus: Option<&'a str>,
}

pub struct Envoy {
    child: Child,
    /// The ingress listener.
    pub port: u16,
    config: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Envoy {
    /// Starts `bin` on the config in `repo` and waits until it is ready.
    pub async fn start(bin: &Path, repo: &Path, targets: Targets, options: Options<'_>) -> Self {
        let template = std::fs::read_to_string(repo.join("deploy/envoy/envoy.yaml"))
            .expect("deploy/envoy/envoy.yaml");
        let (port, admin, demo) = (free_port(), free_port(), free_port());
        let yaml = test_config(
            &template,
            &[
                ("ingress", port),
                ("admin", admin),
                ("demo-upstream", demo),
                ("keyward", targets.authz_port),
                ("upstream", targets.upstream_port.unwrap_or(demo)),
            ],
            options.raw_headers,
        );
        let config = std::env::temp_dir().join(format!("keyward-envoy-{port}.yaml"));
        std::fs::write(&config, yaml).expect("write envoy config");
        let child = spawn(bin, &config, options.cpus);
        let envoy = Self {
            child,
            port,
            config,
        };
        // Ready once its listeners are up and its clusters initialised.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(admin).await {
            assert!(Instant::now() < deadline, "envoy did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        envoy
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("envoy running")
    }
}

/// The Envoy binary the scripts install into `.tools`, else `envoy` on the
/// PATH.
pub fn binary(repo: &Path) -> PathBuf {
    let local = repo.join(".tools/bin/envoy");
    if local.exists() {
        local
    } else {
        PathBuf::from("envoy")
    }
}

/// Starts `bin` on the config file `config`, pinned to the `taskset -c`
/// list `cpus` if given: one worker, no hot restart, quiet unless TEST_LOG
/// is set. Killed when the child is dropped.
pub fn spawn(bin: &Path, config: &Path, cpus: Option<&str>) -> Child {
    let mut cmd = match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let verbose = std::env::var_os("TEST_LOG").is_some();
    cmd.args(["--concurrency", "1", "--disable-hot-restart", "--log-level"])
        .arg(if verbose { "info" } else { "error" })
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if verbose {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .expect("start envoy: ./scripts/test and ./scripts/bench install it into .tools")
}

/// `GET /ready` on the admin port answers 200.
async fn ready(admin: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", admin)).await else {
        return false;
    };
    if conn
        .write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer).await;
    answer.starts_with(b"HTTP/1.1 200")
}

/// Swaps every `port_value` marked `# port:NAME` for the given port, keeps
/// every listener on loopback, and optionally turns on `encode_raw_headers`.
pub fn test_config(template: &str, ports: &[(&str, u16)], raw_headers: bool) -> String {
    let mut used = vec![false; ports.len()];
    let mut out = String::new();
    for line in template.lines() {
        let mut line = line.replace("address: 0.0.0.0", "address: 127.0.0.1");
        if let Some((_, name)) = line.split_once("# port:") {
            let i = ports
                .iter()
                .position(|(n, _)| *n == name.trim())
                .unwrap_or_else(|| panic!("no test port for {name}"));
            used[i] = true;
            let start = line
                .find("port_value: ")
                .expect("marked line has a port_value")
                + 12;
            let end = start
                + line[start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .expect("port ends");
            line.replace_range(start..end, &ports[i].1.to_string());
        }
        out.push_str(&line);
        out.push('\n');
        if raw_headers && line.trim() == "transport_api_version: V3" {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}encode_raw_headers: true\n"));
        }
    }
    assert!(
        used.iter().all(|u| *u),
        "every port marker is in envoy.yaml: {ports:?}"
    );
    assert!(!raw_headers || out.contains("encode_raw_headers: true"));
    out
}
