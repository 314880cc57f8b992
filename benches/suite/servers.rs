//! The processes under test, each pinned to core 0 (`taskset -c 0`; the
//! driver and load generators run on core 1).

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

use crate::envoy_process::free_port;

pub const SERVER_CORE: &str = "0";

pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// User + system CPU time a process has used so far.
pub fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn pinned(bin: &Path, cores: &str) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cores).arg(bin);
    cmd.stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

impl Server {
    /// keyward serving `database_url` on core 0, with extra flags.
    pub async fn keyward(bin: &Path, name: &str, database_url: &str, extra: &[&str]) -> Self {
        Self::keyward_on(bin, SERVER_CORE, name, database_url, extra).await
    }

    /// keyward on the given cores (taskset list). Brute-force protection is
    /// off unless `extra` turns it on: the load generators present thousands
    /// of bad keys from one address on purpose. The cache TTL is 10 minutes
    /// (not the default 60 s) so that rows measure cache hits rather than
    /// the backstop re-read of keys warmed together going stale in the
    /// middle of a row.
    pub async fn keyward_on(
        bin: &Path,
        cores: &str,
        name: &str,
        database_url: &str,
        extra: &[&str],
    ) -> Self {
        Self::keyward_with_env(bin, cores, name, database_url, extra, &[]).await
    }

    /// [`Server::keyward_on`] with environment variables (the OTEL_* ones
    /// are read from the environment only).
    pub async fn keyward_with_env(
        bin: &Path,
        cores: &str,
        name: &str,
        database_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = pinned(bin, cores)
            .args([
                "--grpc-addr",
                &addr.to_string(),
                "--database-url",
                database_url,
            ])
            .args(["--log-filter", "warn", "--brute-force-threshold", "0"])
            .args(["--cache-ttl", "10m"])
            .args(["--metrics-addr", "127.0.0.1:0", "--shutdown-delay", "0s"])
            .args(extra)
            .envs(env.iter().copied())
            .spawn()
            .expect("start keyward");
        Self::ready(name, addr, child).await
    }

    /// The empty baseline server on the given runtime.
    pub async fn empty(bin: &Path, name: &str, runtime: &str) -> Self {
        Self::empty_with(bin, name, runtime, &[]).await
    }

    pub async fn empty_with(bin: &Path, name: &str, runtime: &str, extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = pinned(bin, SERVER_CORE)
            .args(["--addr", &addr.to_string(), "--runtime", runtime])
            .args(extra)
            .spawn()
            .expect("start empty_authz");
        Self::ready(name, addr, child).await
    }

    /// A server that takes only `--addr` (examples/tonic_example_authz.rs).
    pub async fn plain(bin: &Path, name: &str) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = pinned(bin, SERVER_CORE)
            .args(["--addr", &addr.to_string()])
            .spawn()
            .expect("start the server");
        Self::ready(name, addr, child).await
    }

    /// A private Redis on the server's core, without persistence: the
    /// system under test (keyward and the Redis it asks) is one core, and
    /// the shared Redis, which other work on the machine uses, stays out of
    /// the figures.
    pub async fn redis(name: &str) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = pinned(Path::new("redis-server"), SERVER_CORE)
            .args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .spawn()
            .expect("start redis-server");
        Self::ready(name, addr, child).await
    }

    async fn ready(name: &str, addr: SocketAddr, child: Child) -> Self {
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "{name} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            name: name.to_owned(),
            addr,
            child,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("server running")
    }

    /// User + system CPU time the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.pid())
    }

    /// Resident set size, bytes.
    pub fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }
}
