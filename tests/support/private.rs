//! Private PostgreSQL, Redis and PgBouncer servers for fault tests, so a test
//! that restarts, stops, kills or SIGSTOPs a server never touches the
//! machine's shared PostgreSQL (5432) or Redis (6379), which other tests use
//! at the same time. Shared by the tests and the benchmarks
//! (`#[path]`-included).
//!
//! Tests run in parallel (nextest: one process per test), so every server
//! gets fresh loopback ports and a fresh temporary directory, and is killed
//! and its directory removed on drop, panics included. A small watchdog
//! process also cleans up when the test process dies without unwinding (a
//! nextest timeout, Ctrl-C): `pg_ctl` detaches PostgreSQL from the test's
//! process group, so nothing else would ever stop it.
//!
//! `initdb`, `postgres` and `pgbouncer` refuse to run as root; as root they
//! run as the `postgres` OS user through `setpriv`, which execs the server
//! (where `runuser` and `su` fork and wait), so a child's pid is the server's
//! own and killing it kills the server. `scripts/lib.sh`'s
//! `ensure_private_servers` installs the binaries.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    process::Stdio,
    sync::OnceLock,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
};

/// How long a server gets to start or stop before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
/// Fresh ports to try when another process took the one picked between the
/// probe and the server's own bind.
const PORT_ATTEMPTS: usize = 5;
/// What a bind failure says in PostgreSQL's, Redis's and PgBouncer's logs.
const PORT_TAKEN: &str = "Address already in use";
const INSTALL_HINT: &str = "scripts/lib.sh's ensure_private_servers installs it";

/// A private PostgreSQL: its own cluster (`initdb`), on a free loopback port,
/// with its unix socket in its own directory. Started with
/// `--auth=trust -U postgres`, and with durability off (`fsync`,
/// `synchronous_commit`, `full_page_writes`): the data is thrown away anyway.
pub struct PrivatePostgres {
    port: u16,
    bin: &'static Path,
    // Dropped in this order, after the server is stopped: the directory,
    // then the watchdog, which finds it gone and exits.
    dir: TempDir,
    _watchdog: Watchdog,
}

/// How to configure a [`PrivatePostgres`].
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// Turns on `ssl` with this certificate and key.
    pub ssl: Option<SslFiles>,
    /// More `postgresql.conf` settings (name, value), after (so over) the
    /// module's own; not `port`, `listen_addresses` or
    /// `unix_socket_directories`.
    pub settings: Vec<(String, String)>,
}

/// A server certificate and key the test wrote (PEM); they are copied into
/// the data directory, where PostgreSQL requires the key to be owned by the
/// server's user and not readable by others.
#[derive(Clone, Debug)]
pub struct SslFiles {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl PrivatePostgres {
    pub async fn start() -> Self {
        Self::start_with(PgOptions::default()).await
    }

    /// Creates the cluster and starts it; returns once it accepts
    /// connections on 127.0.0.1.
    pub async fn start_with(opts: PgOptions) -> Self {
        let bin = pg_bin_dir();
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        init_cluster(bin, dir.path(), &data).await;
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {}\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
            conf_value(&dir.path().to_string_lossy())
        );
        if let Some(ssl) = &opts.ssl {
            copy_private(&ssl.cert_pem, &data.join("server.crt"));
            copy_private(&ssl.key_pem, &data.join("server.key"));
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for (name, value) in &opts.settings {
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.".contains(c)),
                "not a PostgreSQL setting name: {name:?}"
            );
            assert!(
                !["port", "listen_addresses", "unix_socket_directories"].contains(&name.as_str()),
                "{name} is the module's own: a free port, loopback, the private directory"
            );
            conf.push_str(&format!("{name} = {}\n", conf_value(value)));
        }
        // Its own file, rewritten with each port tried; `postgresql.conf`
        // only includes it.
        std::fs::write(data.join("private.conf"), &conf).expect("write private.conf");
        give_to_server_user(&data.join("private.conf"));
        append(&data.join("postgresql.conf"), "include = 'private.conf'\n");

        let watchdog = Watchdog::spawn(dir.path(), PG_CLEANUP);
        let mut pg = Self {
            port: 0,
            bin,
            dir,
            _watchdog: watchdog,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            pg.port = free_port();
            std::fs::write(data.join("port.conf"), format!("port = {}\n", pg.port))
                .expect("write port.conf");
            give_to_server_user(&data.join("port.conf"));
            if attempt == 1 {
                append(&data.join("postgresql.conf"), "include = 'port.conf'\n");
            }
            match pg.pg_ctl_start().await {
                Ok(()) => {
                    pg.wait_ready().await;
                    return pg;
                }
                Err(e) if attempt < PORT_ATTEMPTS && pg.log_tail().contains(PORT_TAKEN) => {
                    eprintln!(
                        "private postgres: port {} taken, trying another ({e})",
                        pg.port
                    );
                }
                Err(e) => pg.fail("start", &e),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// `pg_ctl restart -m fast`: open connections are closed, the server is
    /// back on the same port when this returns. A SIGSTOPped server must be
    /// continued first.
    pub async fn restart_fast(&self) {
        let mut cmd = Command::from(self.pg_ctl("restart"));
        cmd.args(["-m", "fast", "-l"]).arg(self.log_path());
        if let Err(e) = run(&mut cmd).await {
            self.fail("restart", &e);
        }
        self.wait_ready().await;
    }

    /// `pg_ctl stop -m fast`: returns once the server is gone.
    pub async fn stop_fast(&self) {
        let mut cmd = Command::from(self.pg_ctl("stop"));
        cmd.args(["-m", "fast"]);
        if let Err(e) = run(&mut cmd).await {
            self.fail("stop", &e);
        }
    }

    /// Starts the stopped server again on the same port.
    pub async fn start_again(&self) {
        if let Err(e) = self.pg_ctl_start().await {
            self.fail("start again", &e);
        }
        self.wait_ready().await;
    }

    /// The postmaster and all its descendants (backends, background
    /// workers), read fresh: backends come and go with connections. Empty
    /// while the server is stopped.
    pub fn pids(&self) -> Vec<u32> {
        let Some(postmaster) = self.postmaster() else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        let table = process_table();
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            pids.extend(
                table
                    .iter()
                    .filter(|(_, ppid)| *ppid == parent)
                    .map(|(pid, _)| *pid),
            );
            i += 1;
        }
        pids
    }

    /// SIGSTOPs every process of the server: connections stay open and new
    /// ones are still accepted by the kernel (the listen backlog), but
    /// nothing answers, like a hung host.
    pub fn sigstop(&self) {
        // The postmaster first, so it starts no process that would be missed.
        let postmaster = self.postmaster().expect("sigstop: the server is running");
        signal("STOP", &[postmaster])
            .unwrap_or_else(|e| panic!("SIGSTOP postmaster {postmaster}: {e}"));
        let rest: Vec<u32> = self
            .pids()
            .into_iter()
            .filter(|p| *p != postmaster)
            .collect();
        // A backend may exit between the listing and the signal.
        let _ = signal("STOP", &rest);
    }

    /// SIGCONTs every process of the server.
    pub fn sigcont(&self) {
        let pids = self.pids();
        assert!(!pids.is_empty(), "sigcont: the server is running");
        let _ = signal("CONT", &pids[1..]);
        signal("CONT", &pids[..1])
            .unwrap_or_else(|e| panic!("SIGCONT postmaster {}: {e}", pids[0]));
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    fn postmaster(&self) -> Option<u32> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        let pid = pid_file.lines().next()?.trim().parse().ok()?;
        running(pid).then_some(pid)
    }

    /// `pg_ctl ACTION -w`, bounded by its own timeout. A std command, for the
    /// drop too.
    fn pg_ctl(&self, action: &str) -> std::process::Command {
        let mut cmd = server_command(&self.bin.join("pg_ctl"), self.dir.path());
        cmd.arg(action)
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-s", "-t"])
            .arg(DEADLINE.as_secs().to_string());
        cmd
    }

    async fn pg_ctl_start(&self) -> Result<(), String> {
        let mut cmd = Command::from(self.pg_ctl("start"));
        cmd.arg("-l").arg(self.log_path());
        run(&mut cmd).await
    }

    /// `pg_ctl -w` waits for the postmaster's own "ready"; this also proves
    /// it answers on its TCP port.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut cmd = Command::new(self.bin.join("pg_isready"));
            cmd.args([
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-t",
                "2",
                "-p",
            ])
            .arg(self.port.to_string());
            match run(&mut cmd).await {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => self.fail("accept connections", &e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn fail(&self, what: &str, error: &str) -> ! {
        panic!(
            "private postgres on 127.0.0.1:{} did not {what}: {error}\nlog tail ({}):\n{}",
            self.port,
            self.log_path().display(),
            self.log_tail()
        )
    }
}

impl Drop for PrivatePostgres {
    /// Stops the server `-m immediate` (nothing to keep; unlike SIGKILL it
    /// still removes its shared memory), continuing it first in case it is
    /// SIGSTOPped; SIGKILLs whatever is left. Never panics: it also runs
    /// while a failing test unwinds.
    fn drop(&mut self) {
        let pids = self.pids();
        if pids.is_empty() {
            return;
        }
        let _ = signal("CONT", &pids);
        let stopped = self
            .pg_ctl("stop")
            .args(["-m", "immediate"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = signal("KILL", &self.pids());
        }
        // `pg_ctl -w` returns when the pid file is gone, a moment before the
        // processes are.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|pid| running(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `initdb`'s arguments, up to the data directory; part of the template's
/// key.
const INITDB_ARGS: [&str; 9] = [
    "--auth=trust",
    "-U",
    "postgres",
    "--no-sync",
    "-E",
    "UTF8",
    "--locale=C",
    "--no-instructions",
    "-D",
];

/// A fresh cluster in `data`: a copy (`cp -a`, keeping owner and modes) of
/// a pristine `initdb` output kept in cargo's target tmp dir, else `initdb`
/// itself, whose output then becomes that template. `initdb` takes 0.6 s
/// on an idle machine and well over a second on a busy one, the copy about
/// 0.1 s. The template is keyed by the binaries and the arguments, appears
/// only whole (renamed into place), and one test makes it while the others
/// wait (a lock directory), so a fresh checkout's parallel tests do not all
/// run `initdb` at once.
async fn init_cluster(bin: &Path, dir: &Path, data: &Path) {
    let template = template_dir(bin);
    let deadline = Instant::now() + 2 * DEADLINE;
    while Instant::now() < deadline {
        if template.join("PG_VERSION").is_file() {
            let mut copy = Command::new("cp");
            copy.arg("-a").arg(&template).arg(data);
            if run(&mut copy).await.is_ok() {
                return;
            }
            let _ = std::fs::remove_dir_all(data);
            break;
        }
        match TemplateLock::take(&template) {
            Ok(_lock) => {
                initdb(bin, dir, data).await;
                save_template(data, &template).await;
                return;
            }
            // Another test is making it.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Not writable here: no template.
            Err(_) => break,
        }
    }
    initdb(bin, dir, data).await;
}

async fn initdb(bin: &Path, dir: &Path, data: &Path) {
    let mut initdb = Command::from(server_command(&bin.join("initdb"), dir));
    initdb.args(INITDB_ARGS).arg(data);
    if let Err(e) = run(&mut initdb).await {
        panic!("initdb in {} failed: {e}", dir.display());
    }
}

/// Best effort: without a template the next test runs `initdb` too.
async fn save_template(data: &Path, template: &Path) {
    let Some(parent) = template.parent() else {
        return;
    };
    let random = uuid::Uuid::now_v7().simple().to_string();
    let staging = parent.join(format!("keyward-pg-staging-{}", &random[16..]));
    let mut copy = Command::new("cp");
    copy.arg("-a").arg(data).arg(&staging);
    let saved = run(&mut copy).await.is_ok() && std::fs::rename(&staging, template).is_ok();
    if !saved {
        let _ = std::fs::remove_dir_all(&staging);
    }
}

/// The right to make the template: a directory beside it, removed on drop.
struct TemplateLock(PathBuf);

impl TemplateLock {
    fn take(template: &Path) -> std::io::Result<Self> {
        let lock = template.with_extension("lock");
        if let Some(parent) = lock.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // A holder that died without its drop (SIGKILL) left it behind; one
        // alive is done within `run`'s bound on `initdb` and the copy.
        let stale = std::fs::metadata(&lock)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > 3 * DEADLINE));
        if stale {
            let _ = std::fs::remove_dir(&lock);
        }
        std::fs::create_dir(&lock).map(|()| Self(lock))
    }
}

impl Drop for TemplateLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Where the template cluster for these binaries lives: cargo's per-target
/// tmp dir for tests and benchmarks (removed by `cargo clean`), else the
/// system temp dir.
fn template_dir(bin: &Path) -> PathBuf {
    use std::hash::{Hash as _, Hasher as _};
    let mut key = std::collections::hash_map::DefaultHasher::new();
    bin.hash(&mut key);
    INITDB_ARGS.hash(&mut key);
    if let Ok(meta) = std::fs::metadata(bin.join("postgres")) {
        meta.len().hash(&mut key);
        meta.modified().ok().hash(&mut key);
    }
    let root = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    root.join(format!("keyward-pg-template-{:016x}", key.finish()))
}

/// The watchdog's cleanup for a [`PrivatePostgres`] in directory `$1`: the
/// same as its drop, by signals (SIGQUIT is `pg_ctl stop -m immediate`).
const PG_CLEANUP: &str = r#"
pm=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
if [ -n "$pm" ]; then
  kill -CONT $pm $(cat /proc/$pm/task/*/children 2>/dev/null) 2>/dev/null
  kill -QUIT $pm 2>/dev/null
  i=0
  while alive $pm && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL $pm $(cat /proc/$pm/task/*/children 2>/dev/null) 2>/dev/null
fi
"#;

/// A private Redis: `redis-server` as a child process (not daemonized) on a
/// free loopback port, without persistence (`--save ''`, no AOF).
pub struct PrivateRedis {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
    _watchdog: Watchdog,
}

impl PrivateRedis {
    /// Starts it; returns once it answers `PING`.
    pub async fn start() -> Self {
        let dir = TempDir::new("redis");
        let watchdog = Watchdog::spawn(dir.path(), CHILD_CLEANUP);
        let mut redis = Self {
            port: 0,
            child: None,
            dir,
            _watchdog: watchdog,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            redis.port = free_port();
            match redis.spawn().await {
                Ok(()) => return redis,
                Err(e) if attempt < PORT_ATTEMPTS && redis.log_tail().contains(PORT_TAKEN) => {
                    eprintln!(
                        "private redis: port {} taken, trying another ({e})",
                        redis.port
                    );
                }
                Err(e) => redis.fail("start", &e),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the server and waits for it to exit: its port refuses
    /// connections when this returns. Does nothing if it is stopped.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the stopped server again on the same port (empty: nothing was
    /// persisted); returns once it answers `PING`.
    pub async fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "private redis on 127.0.0.1:{} is running: stop it first",
            self.port
        );
        if let Err(e) = self.spawn().await {
            self.fail("start again", &e);
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let log = append_log(&self.log_path());
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone redis log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("run redis-server ({INSTALL_HINT}): {e}"));
        let child = self.child.insert(child);
        write_pid(self.dir.path(), child);
        wait_until(child, || redis_pong(self.port)).await
    }

    fn fail(&self, what: &str, error: &str) -> ! {
        panic!(
            "private redis on 127.0.0.1:{} did not {what}: {error}\nlog tail ({}):\n{}",
            self.port,
            self.log_path().display(),
            self.log_tail()
        )
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            kill_and_reap(child);
        }
    }
}

/// `PING` answers `+PONG`: a real protocol round trip, not just a listening
/// socket.
async fn redis_pong(port: u16) -> bool {
    let exchange = async {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
        conn.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
        let mut answer = [0; 7];
        conn.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer == *b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), exchange).await,
        Ok(Ok(true))
    )
}

/// A private PgBouncer in transaction pooling mode in front of a PostgreSQL
/// on 127.0.0.1 (`[databases] *`: every database name, as the client's user),
/// as a child process on a free loopback port, trusting `postgres`.
pub struct PgBouncer {
    port: u16,
    child: Child,
    _dir: TempDir,
    _watchdog: Watchdog,
}

impl PgBouncer {
    /// Starts it; returns once it answers the protocol (an `SSLRequest`),
    /// which needs no upstream: `upstream_port` may be down.
    pub async fn start(upstream_port: u16) -> Self {
        let dir = TempDir::new("pgbouncer");
        let users = dir.path().join("userlist.txt");
        // `auth_type = trust` still wants the user in the auth file.
        std::fs::write(&users, "\"postgres\" \"\"\n").expect("write userlist.txt");
        give_to_server_user(&users);
        let watchdog = Watchdog::spawn(dir.path(), CHILD_CLEANUP);
        let log = dir.path().join("pgbouncer.log");
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            let ini = dir.path().join("pgbouncer.ini");
            std::fs::write(&ini, pgbouncer_ini(dir.path(), port, upstream_port))
                .expect("write pgbouncer.ini");
            give_to_server_user(&ini);
            let mut child = Command::from(server_command(&pgbouncer_bin(), dir.path()))
                .arg(&ini)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("run pgbouncer ({INSTALL_HINT}): {e}"));
            write_pid(dir.path(), &child);
            match wait_until(&mut child, || pg_protocol_answers(port)).await {
                Ok(()) => {
                    return Self {
                        port,
                        child,
                        _dir: dir,
                        _watchdog: watchdog,
                    };
                }
                Err(e) if attempt < PORT_ATTEMPTS && log_tail(&log).contains(PORT_TAKEN) => {
                    eprintln!("private pgbouncer: port {port} taken, trying another ({e})");
                }
                Err(e) => panic!(
                    "private pgbouncer on 127.0.0.1:{port} did not start: {e}\nlog tail ({}):\n{}",
                    log.display(),
                    log_tail(&log)
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Transaction pooling hands each transaction (for sqlx: each protocol
    /// `Sync`) whichever server connection is free, PgBouncer 1.18 tracks no
    /// prepared statements, and sqlx 0.9 prepares every `sqlx::query*` in
    /// one `Sync` and binds it in the next. So connect with
    /// `PgConnectOptions::statement_cache_capacity(0)` and one client
    /// connection (`max_connections(1)`). Measured: with more, sqlx's
    /// statement names (`sqlx_s_1`, ..., still named and never closed with
    /// no cache) collide across clients ("prepared statement already
    /// exists"), and with `.persistent(false)` concurrent clients run each
    /// other's unnamed statements and get wrong answers. `sqlx::raw_sql`
    /// (the simple protocol) is safe with any number.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// The ini for a [`PgBouncer`] in `dir`. `ignore_startup_parameters`: sqlx
/// sends `extra_float_digits` in every startup packet (and `options` when
/// set), and PgBouncer refuses a connection with a startup parameter it does
/// not know; ignored, `options` settings do not reach the server.
fn pgbouncer_ini(dir: &Path, port: u16, upstream_port: u16) -> String {
    let dir = dir.display();
    format!(
        "[databases]\n\
         * = host=127.0.0.1 port={upstream_port}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {dir}/userlist.txt\n\
         pool_mode = transaction\n\
         max_client_conn = 200\n\
         default_pool_size = 10\n\
         ignore_startup_parameters = extra_float_digits,options\n\
         logfile = {dir}/pgbouncer.log\n"
    )
}

/// An `SSLRequest` gets its one-byte answer (`N` or `S`): the server speaks
/// the PostgreSQL protocol on `port`.
async fn pg_protocol_answers(port: u16) -> bool {
    let exchange = async {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
        conn.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await?;
        let answer = conn.read_u8().await?;
        Ok::<_, std::io::Error>(answer == b'N' || answer == b'S')
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), exchange).await,
        Ok(Ok(true))
    )
}

fn pgbouncer_bin() -> PathBuf {
    find_on_path("pgbouncer").unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"))
}

/// The watchdog's cleanup for a child server whose pid is in `$1/pid`.
const CHILD_CLEANUP: &str = r#"kill -KILL $(cat "$1/pid" 2>/dev/null) 2>/dev/null"#;

/// Records a child's pid for the [`Watchdog`].
fn write_pid(dir: &Path, child: &Child) {
    if let Some(pid) = child.id() {
        std::fs::write(dir.join("pid"), pid.to_string()).expect("write pid file");
    }
}

/// SIGKILLs a child server and reaps it, leaving no zombie behind (where
/// PID 1 reaps no orphans, an unreaped one would stay for good).
fn kill_and_reap(child: &mut Child) {
    let _ = child.start_kill();
    let deadline = Instant::now() + Duration::from_secs(2);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `ready` until it holds, failing early if `child` exits.
async fn wait_until<F, Fut>(child: &mut Child, mut ready: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited: {status}"));
        }
        if ready().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not ready within {DEADLINE:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops a server and removes its directory if the test process dies
/// without running the server's drop (a nextest timeout, Ctrl-C, `abort`):
/// a shell waiting on a pipe from this process, which the kernel closes
/// however the process ends. No polling: it wakes the moment the process
/// is gone. It runs in its own process group, so the signals that end the
/// test's group leave it running. The server's drop removes the directory
/// first, then drops this, which closes the pipe: the shell finds no
/// directory, exits and is reaped.
struct Watchdog(std::process::Child);

impl Watchdog {
    /// `cleanup` is a shell snippet; `$1` in it is the directory.
    fn spawn(dir: &Path, cleanup: &str) -> Self {
        use std::os::unix::process::CommandExt as _;
        let script = format!(
            "{ALIVE}\nread -r _ || true\n[ -d \"$1\" ] || exit 0\n{cleanup}\nrm -rf \"$1\"\n"
        );
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(dir)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the cleanup watchdog (sh)");
        Self(child)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// A shell function for the watchdog: the process exists and is not a
/// zombie (`kill -0` counts zombies, and a stopped postmaster is one for good
/// where PID 1 reaps no orphans).
const ALIVE: &str = r#"alive() { s=$(sed 's/^.*) \(.\).*$/\1/' "/proc/$1/stat" 2>/dev/null) && [ -n "$s" ] && [ "$s" != Z ]; }"#;

/// A fresh directory `keyward-{kind}-{random}` under the temp dir, owned by
/// the servers' user, removed on drop. Short, because PostgreSQL's unix
/// socket path in it must fit in 107 bytes.
struct TempDir(PathBuf);

impl TempDir {
    fn new(kind: &str) -> Self {
        loop {
            let random = uuid::Uuid::now_v7().simple().to_string();
            let path = std::env::temp_dir().join(format!("keyward-{kind}-{}", &random[16..]));
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    give_to_server_user(&path);
                    return Self(path);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback TCP port free right now, below the kernel's ephemeral range:
/// outgoing connections (tests make many) take their local ports from that
/// range, and one could take a server's port while it is down between a stop
/// and a start on the same port.
fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        for _ in 0..200 {
            // A v7 UUID's low bits are random.
            let random = uuid::Uuid::now_v7().as_u128() as u16;
            let port = 10_000 + random % (low - 10_000);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The last lines of a server's log, for a failure message.
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        }
        Err(e) => format!("(no log: {e})"),
    }
}

fn append_log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn append(path: &Path, text: &str) {
    use std::io::Write as _;
    append_log(path)
        .write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// A `postgresql.conf` string value.
fn conf_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Copies a file for the server to read, owned by its user, mode 0600.
fn copy_private(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", to.display()));
    give_to_server_user(to);
}

/// Runs a short-lived tool to completion, bounded in time; the error says how
/// it failed, with its output.
async fn run(cmd: &mut Command) -> Result<(), String> {
    let limit = DEADLINE + Duration::from_secs(5);
    let output = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let result = tokio::time::timeout(limit, output).await;
    match result {
        Err(_) => Err(format!(
            "{:?} did not finish within {limit:?}",
            cmd.as_std()
        )),
        Ok(Err(e)) => Err(format!(
            "{:?} could not run ({INSTALL_HINT}): {e}",
            cmd.as_std()
        )),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "{:?}: {}\n{}{}",
            cmd.as_std(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// `kill -s SIGNAL pids`; the error is `kill`'s own message.
fn signal(name: &str, pids: &[u32]) -> Result<(), String> {
    if pids.is_empty() {
        return Ok(());
    }
    let out = std::process::Command::new("kill")
        .args(["-s", name, "--"])
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run kill: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// The process exists and is not a zombie (exited, waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Every process's (pid, parent pid), from `/proc/<pid>/stat`.
fn process_table() -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// A command for a PostgreSQL or PgBouncer binary, which refuse to run as
/// root: as root it runs as `postgres` (through `setpriv`, which execs), else
/// as this process's user. Runs in `dir`, which that user can enter.
fn server_command(program: &Path, dir: &Path) -> std::process::Command {
    let mut cmd = if running_as_root() {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        cmd
    } else {
        std::process::Command::new(program)
    };
    cmd.current_dir(dir).env("LC_ALL", "C");
    cmd
}

/// Hands a file or directory to the servers' user (as root: `postgres`).
fn give_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    }
}

/// The `postgres` user's uid and gid when running as root; `None` otherwise.
fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        if !running_as_root() {
            return None;
        }
        let id = |flag: &str| {
            let out = std::process::Command::new("id")
                .args([flag, "postgres"])
                .output()
                .expect("run id");
            assert!(
                out.status.success(),
                "running as root, the private servers run as the postgres user, but there is none: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .expect("id prints a number")
        };
        Some((id("-u"), id("-g")))
    })
}

/// Whether the effective uid is 0, from `/proc/self/status` (no libc crate).
fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        let uids = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .expect("/proc/self/status has a Uid line");
        uids.split_whitespace().nth(1) == Some("0")
    })
}

/// The PostgreSQL server binaries' directory: beside `initdb` on PATH
/// (symlinks resolved, so one installation's tools are used together), else
/// the newest `/usr/lib/postgresql/<version>/bin`.
fn pg_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    const TOOLS: [&str; 4] = ["initdb", "pg_ctl", "postgres", "pg_isready"];
    let complete = |dir: &Path| TOOLS.iter().all(|t| dir.join(t).is_file());
    DIR.get_or_init(|| {
        let on_path = find_on_path("initdb")
            .and_then(|initdb| std::fs::canonicalize(initdb).ok())
            .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
            .filter(|dir| complete(dir));
        on_path
            .or_else(|| {
                let versions = std::fs::read_dir("/usr/lib/postgresql").ok()?;
                versions
                    .filter_map(|v| {
                        let v = v.ok()?;
                        let key: Vec<u32> = v
                            .file_name()
                            .to_str()?
                            .split('.')
                            .map(|part| part.parse().ok())
                            .collect::<Option<_>>()?;
                        Some((key, v.path().join("bin")))
                    })
                    .filter(|(_, bin)| complete(bin))
                    .max()
                    .map(|(_, bin)| bin)
            })
            .unwrap_or_else(|| {
                panic!("no PostgreSQL server binaries ({TOOLS:?}) beside initdb on PATH or under /usr/lib/postgresql/*/bin; {INSTALL_HINT}")
            })
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}
