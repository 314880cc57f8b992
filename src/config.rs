//! Every setting: command-line flags with environment fallbacks. Nothing else
//! in the crate reads the environment.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{cache::CacheSettings, key::KeyPrefix, store::DbOptions};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "keyward",
    version,
    about = "API-key authorization service",
    // A flag given twice takes its last value, as in most CLIs (and lets
    // scripts append overrides).
    args_override_self = true
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// PostgreSQL connection URL; the database is created if it is missing.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/keyward",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// Most connections this process holds to PostgreSQL in its pools (the
    /// LISTEN connection comes on top). Check lookups use at most
    /// `--db-check-connections` of them; the rest is kept for the admin plane
    /// and background work, so a flood of lookups cannot starve a Revoke.
    #[arg(
        long,
        env = "KEYWARD_DB_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub db_max_connections: u32,

    /// Connections (of `--db-max-connections`) that check lookups may use.
    #[arg(
        long,
        env = "KEYWARD_DB_CHECK_CONNECTIONS",
        default_value_t = 6,
        global = true
    )]
    pub db_check_connections: u32,

    /// How long an admin call or background write waits for a database
    /// connection before it fails with UNAVAILABLE; also how long a check
    /// connection may take to open.
    #[arg(long, env = "KEYWARD_DB_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub db_acquire_timeout: Duration,

    /// How long a check lookup waits for one of its connections: when they
    /// are all busy a miss fails fast (UNAVAILABLE, fail closed) rather than
    /// queueing. A connection being opened for it keeps opening (for up to
    /// --db-acquire-timeout, or --db-lookup-timeout if longer) and serves
    /// the next miss.
    #[arg(long, env = "KEYWARD_DB_CHECK_ACQUIRE_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration, global = true)]
    pub db_check_acquire_timeout: Duration,

    /// Deadline of one check lookup (connection, query and answer).
    #[arg(long, env = "KEYWARD_DB_LOOKUP_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration, global = true)]
    pub db_lookup_timeout: Duration,

    /// Deadline of one admin or background database call, client side: it
    /// also bounds a database that stopped answering altogether.
    #[arg(long, env = "KEYWARD_DB_CALL_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub db_call_timeout: Duration,

    /// PostgreSQL's statement_timeout for keyward's connections, sent at
    /// connection start; 0 leaves the server's setting alone (needed behind
    /// PgBouncer, which does not pass startup options: set it on the role).
    #[arg(long, env = "KEYWARD_DB_STATEMENT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub db_statement_timeout: Duration,

    /// Liveness probing of database connections: the LISTEN connection is
    /// probed after this long without a notice, and a pooled connection idle
    /// for longer is pinged before use. (sqlx exposes no TCP keepalive
    /// option; this is keyward's keepalive, with its own deadlines.)
    #[arg(long, env = "KEYWARD_DB_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub db_keepalive: Duration,

    /// Address of the gRPC server (admin, check, Envoy ext_authz, health, reflection).
    #[arg(
        long,
        env = "KEYWARD_GRPC_ADDR",
        default_value = "0.0.0.0:50051",
        global = true
    )]
    pub grpc_addr: SocketAddr,

    /// A second gRPC address for the admin plane (KeyService, OwnerService,
    /// AuditService, LeakService, reflection, health). When set, the main
    /// address serves only the two Check services and health. Unset: one
    /// address serves everything.
    #[arg(long, env = "KEYWARD_ADMIN_ADDR", global = true)]
    pub admin_addr: Option<SocketAddr>,

    /// Prometheus metrics (`/metrics`) and HTTP probes (`/livez`,
    /// `/readyz`); `off` serves none and stops counting per check.
    #[arg(long, env = "KEYWARD_METRICS_ADDR", default_value = "0.0.0.0:9090", value_parser = parse_optional_addr, global = true)]
    // Fully qualified: the parser itself returns the Option (`off`).
    pub metrics_addr: std::option::Option<SocketAddr>,

    /// PEM certificate chain and private key for TLS on the main gRPC
    /// address; re-read when the files change.
    #[arg(long, env = "KEYWARD_TLS_CERT", requires = "tls_key", global = true)]
    pub tls_cert: Option<std::path::PathBuf>,

    #[arg(long, env = "KEYWARD_TLS_KEY", requires = "tls_cert", global = true)]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificates: with it, clients must present a certificate
    /// signed by one of them (mTLS).
    #[arg(
        long,
        env = "KEYWARD_TLS_CLIENT_CA",
        requires = "tls_cert",
        global = true
    )]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// The same for the admin address (`--admin-addr`); unset: the admin
    /// address uses the main address's TLS settings.
    #[arg(
        long,
        env = "KEYWARD_ADMIN_TLS_CERT",
        requires = "admin_tls_key",
        global = true
    )]
    pub admin_tls_cert: Option<std::path::PathBuf>,

    #[arg(
        long,
        env = "KEYWARD_ADMIN_TLS_KEY",
        requires = "admin_tls_cert",
        global = true
    )]
    pub admin_tls_key: Option<std::path::PathBuf>,

    #[arg(
        long,
        env = "KEYWARD_ADMIN_TLS_CLIENT_CA",
        requires = "admin_tls_cert",
        global = true
    )]
    pub admin_tls_client_ca: Option<std::path::PathBuf>,

    /// How often certificate files are checked for changes.
    #[arg(long, env = "KEYWARD_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub tls_reload_interval: Duration,

    /// A direct PostgreSQL connection URL for LISTEN, when `DATABASE_URL`
    /// goes through PgBouncer in transaction mode (which cannot carry
    /// LISTEN). Default: `DATABASE_URL`.
    #[arg(
        long,
        env = "KEYWARD_LISTEN_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    pub listen_database_url: Option<String>,

    /// Apply migrations when the server starts (sqlx's advisory lock
    /// serialises replicas); `false` when a migration job runs them.
    #[arg(long, env = "KEYWARD_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub migrate_on_start: bool,

    /// Prefix of minted keys when a Mint call does not choose one.
    #[arg(long, env = "KEYWARD_KEY_PREFIX", default_value = "kw_live", value_parser = parse_prefix, global = true)]
    pub key_prefix: KeyPrefix,

    /// Memory the cache of known keys may use, by the size of each entry
    /// (a key with long metadata weighs more than one without), e.g. `512MiB`.
    /// Its lookup table takes 8 bytes more per 512 bytes of this (at most
    /// 32 MiB), allocated at start.
    #[arg(long, env = "KEYWARD_CACHE_MAX_BYTES", default_value = "512MiB", value_parser = parse_bytes, global = true)]
    pub cache_max_bytes: u64,

    /// How long a known key is answered from memory before it is re-read
    /// (in the background: the stale entry answers meanwhile). Changes reach
    /// every replica at once through NOTIFY; this is the backstop.
    #[arg(long, env = "KEYWARD_CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub cache_ttl: Duration,

    /// How much longer than the cache TTL a known key is still answered while
    /// the database cannot be reached (RFC 5861 stale-if-error).
    #[arg(long, env = "KEYWARD_STALE_IF_ERROR", default_value = "5m", value_parser = humantime::parse_duration, global = true)]
    pub stale_if_error: Duration,

    /// Unknown keys remembered as unknown (separate, so they cannot evict known keys).
    #[arg(
        long,
        env = "KEYWARD_NEGATIVE_CACHE_CAPACITY",
        default_value_t = 100_000,
        global = true
    )]
    pub negative_cache_capacity: u64,

    /// How long an unknown key is remembered as unknown.
    #[arg(long, env = "KEYWARD_NEGATIVE_CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub negative_cache_ttl: Duration,

    /// How often recorded key usage (last_used_at, daily counts) is written,
    /// in one batched statement.
    #[arg(long, env = "KEYWARD_USAGE_FLUSH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub usage_flush_interval: Duration,

    /// Deadline of one usage write; a write that misses it is retried with
    /// the next one.
    #[arg(long, env = "KEYWARD_USAGE_FLUSH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub usage_flush_timeout: Duration,

    /// Store lookups per second (with `--unknown-key-lookup-burst`) for keys
    /// the membership filter does not contain. Such a key is normally a
    /// forgery and is refused without a lookup; the budget covers a key
    /// minted on another replica a moment ago, before its notice arrived.
    #[arg(
        long,
        env = "KEYWARD_UNKNOWN_KEY_LOOKUPS_PER_SECOND",
        default_value_t = 20,
        global = true
    )]
    pub unknown_key_lookups_per_second: u32,

    /// Burst of the budget above.
    #[arg(
        long,
        env = "KEYWARD_UNKNOWN_KEY_LOOKUP_BURST",
        default_value_t = 100,
        global = true
    )]
    pub unknown_key_lookup_burst: u32,

    /// Failed presentations (malformed, unknown, revoked or expired keys)
    /// one client address (IPv6: its /64) may make per `--brute-force-window`
    /// before it is refused with RATE_LIMITED for `--brute-force-cooldown`,
    /// without any lookup. 0 turns the protection off.
    #[arg(
        long,
        env = "KEYWARD_BRUTE_FORCE_THRESHOLD",
        default_value_t = 20,
        global = true
    )]
    pub brute_force_threshold: u32,

    #[arg(long, env = "KEYWARD_BRUTE_FORCE_WINDOW", default_value = "1m", value_parser = humantime::parse_duration, global = true)]
    pub brute_force_window: Duration,

    #[arg(long, env = "KEYWARD_BRUTE_FORCE_COOLDOWN", default_value = "1m", value_parser = humantime::parse_duration, global = true)]
    pub brute_force_cooldown: Duration,

    /// Redis for exact rate limits across replicas (e.g.
    /// `redis://127.0.0.1:6379`); unset: each replica enforces limits in
    /// memory (see `--rate-limit-local-share`).
    #[arg(long, env = "KEYWARD_REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<String>,

    /// How long a rate-limited check waits for Redis before it falls back to
    /// the replica's own limits.
    #[arg(long, env = "KEYWARD_REDIS_TIMEOUT", default_value = "50ms", value_parser = humantime::parse_duration, global = true)]
    pub redis_timeout: std::time::Duration,

    /// This replica's share of each rate limit when limits are kept in
    /// memory (no Redis, or Redis unreachable): 1 lets every replica allow
    /// the whole limit; 1/N for N replicas keeps the cluster at or under it.
    #[arg(
        long,
        env = "KEYWARD_RATE_LIMIT_LOCAL_SHARE",
        default_value_t = 1.0,
        global = true
    )]
    pub rate_limit_local_share: f64,

    /// The most credits one replica reserves at a time from a key's balance.
    #[arg(
        long,
        env = "KEYWARD_CREDIT_BLOCK_MAX",
        default_value_t = 1000,
        global = true
    )]
    pub credit_block_max: u64,

    /// Also send X-RateLimit-Limit, -Remaining and -Reset (of the window
    /// closest to its limit) through Envoy, for clients that read those.
    #[arg(long, env = "KEYWARD_X_RATELIMIT_HEADERS", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub x_ratelimit_headers: bool,

    /// Leak reports (LeakService, no management key) one client address may
    /// make per minute.
    #[arg(
        long,
        env = "KEYWARD_LEAK_REPORTS_PER_MINUTE",
        default_value_t = 10,
        global = true
    )]
    pub leak_reports_per_minute: u32,

    /// After the LISTEN connection comes back, keys changed since the last
    /// notice heard minus this margin are evicted (the margin covers
    /// transactions still open when their change was stamped, and clock
    /// steps between database servers).
    #[arg(long, env = "KEYWARD_CATCHUP_MARGIN", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub catchup_margin: Duration,

    /// Concurrent streams one HTTP/2 connection may open.
    #[arg(
        long,
        env = "KEYWARD_MAX_CONCURRENT_STREAMS",
        default_value_t = 200,
        global = true
    )]
    pub max_concurrent_streams: u32,

    /// Checks in flight across all connections; beyond it a check is shed
    /// with RESOURCE_EXHAUSTED at once.
    #[arg(
        long,
        env = "KEYWARD_MAX_IN_FLIGHT",
        default_value_t = 4096,
        global = true
    )]
    pub max_in_flight: usize,

    /// Largest request the two Check services accept, e.g. `64KiB`.
    #[arg(long, env = "KEYWARD_CHECK_MAX_MESSAGE_SIZE", default_value = "64KiB", value_parser = parse_bytes, global = true)]
    pub check_max_message_size: u64,

    /// HTTP/2 pings on idle client connections, and how long to wait for the
    /// answer before closing the connection.
    #[arg(long, env = "KEYWARD_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub http2_keepalive_interval: Duration,

    #[arg(long, env = "KEYWARD_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub http2_keepalive_timeout: Duration,

    /// On SIGTERM/SIGINT, how long the server keeps serving after reporting
    /// NOT_SERVING, so that load balancers and Envoy's health checks move
    /// away before it stops accepting.
    #[arg(long, env = "KEYWARD_SHUTDOWN_DELAY", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_delay: Duration,

    /// After the shutdown delay, how long in-flight calls may finish before
    /// the process exits anyway. Keep delay + grace below Kubernetes'
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "KEYWARD_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_grace: Duration,

    /// Whether Envoy answers carry dynamic metadata (keyward_key_id, ...) for
    /// access logs and rate limits. Envoy spends ~10% of its own CPU per
    /// request applying it (BENCHMARKS.md); turn it off if nothing reads it.
    #[arg(long, env = "KEYWARD_ENVOY_DYNAMIC_METADATA", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub envoy_dynamic_metadata: bool,

    /// Envoy checks on a route without a `resource` context extension take
    /// the request's Host header as the resource. Off by default: the client
    /// chooses that header, so such routes fail closed for keys limited to
    /// resources.
    #[arg(long, env = "KEYWARD_ENVOY_HOST_AS_RESOURCE", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub envoy_host_as_resource: bool,

    /// Tokio runtime: `current-thread` runs everything on one thread,
    /// `multi-thread` on `--worker-threads` threads; `auto` picks
    /// current-thread when this process may use only one CPU (affinity or
    /// cgroup quota), multi-thread otherwise. See BENCHMARKS.md for the cost
    /// of each on one core.
    #[arg(long, env = "KEYWARD_RUNTIME", value_enum, default_value_t = RuntimeFlavor::Auto, global = true)]
    pub runtime: RuntimeFlavor,

    /// Worker threads of the multi-thread runtime; default: one per usable CPU.
    #[arg(long, env = "KEYWARD_WORKER_THREADS", global = true)]
    pub worker_threads: Option<std::num::NonZeroUsize>,

    /// Log output: human-readable or one JSON object per line.
    #[arg(long, env = "KEYWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,

    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info,keyward=debug`).
    #[arg(
        long,
        env = "RUST_LOG",
        default_value = "info,sqlx=warn",
        global = true
    )]
    pub log_filter: String,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Create the database if missing, apply migrations, and exit.
    Migrate,
    /// Write an admin key (scope keyward:admin) straight to the database and
    /// print it once, alone on the last line of standard output.
    Bootstrap {
        /// The owner (account id) of the admin key.
        #[arg(long)]
        owner: String,
        /// A name for the key, shown in listings.
        #[arg(long, default_value = "bootstrap admin key")]
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeFlavor {
    Auto,
    CurrentThread,
    MultiThread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// An address, or `off`.
fn parse_optional_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    match s.trim() {
        "off" | "" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .map_err(|_| format!("{addr:?} is neither host:port nor off")),
    }
}

/// `65536`, `64KiB`, `512MiB`, `1GiB` (also `KB`/`MB`/`GB`, as powers of 1000).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 64KiB or 512MiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_prefix(s: &str) -> Result<KeyPrefix, String> {
    KeyPrefix::parse(s).map_err(|e| format!("key prefix {e}"))
}

impl Config {
    /// The tokio runtime these settings ask for.
    pub fn build_runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let single = match self.runtime {
            RuntimeFlavor::Auto => cpus == 1 && self.worker_threads.is_none(),
            RuntimeFlavor::CurrentThread => true,
            RuntimeFlavor::MultiThread => false,
        };
        let mut builder = if single {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(
                self.worker_threads
                    .map_or(cpus, std::num::NonZeroUsize::get),
            );
            b
        };
        builder.enable_all().build()
    }

    pub fn db(&self) -> DbOptions {
        DbOptions {
            url: self.database_url.clone(),
            listen_url: self.listen_database_url.clone(),
            max_connections: self.db_max_connections,
            check_connections: self.db_check_connections,
            acquire_timeout: self.db_acquire_timeout,
            check_acquire_timeout: self.db_check_acquire_timeout,
            lookup_timeout: self.db_lookup_timeout,
            call_timeout: self.db_call_timeout,
            statement_timeout: self.db_statement_timeout,
            keepalive: self.db_keepalive,
            application_name: "keyward".to_owned(),
        }
    }

    pub fn cache(&self) -> CacheSettings {
        CacheSettings {
            max_bytes: self.cache_max_bytes,
            ttl: self.cache_ttl,
            stale_if_error: self.stale_if_error,
            negative_capacity: self.negative_cache_capacity,
            negative_ttl: self.negative_cache_ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_accepted_before_or_after_the_subcommand() {
        let c = Config::try_parse_from(["keyward", "serve", "--grpc-addr", "127.0.0.1:0"]).unwrap();
        assert_eq!(c.grpc_addr.port(), 0);
        let c = Config::try_parse_from(["keyward", "--key-prefix", "kw_test", "migrate"]).unwrap();
        assert_eq!(c.key_prefix.as_str(), "kw_test");
        assert!(matches!(c.command, Some(Command::Migrate)));
    }

    #[test]
    fn a_bad_prefix_is_refused_at_startup() {
        let err = Config::try_parse_from(["keyward", "--key-prefix", "KW"]).unwrap_err();
        assert!(err.to_string().contains("key prefix"), "{err}");
    }

    #[test]
    fn runtime_flavours_build() {
        for flavour in ["auto", "current-thread", "multi-thread"] {
            let c =
                Config::try_parse_from(["keyward", "--runtime", flavour, "--worker-threads", "2"])
                    .unwrap();
            let rt = c.build_runtime().unwrap();
            assert_eq!(rt.block_on(async { 1 + 1 }), 2);
        }
    }

    #[test]
    fn envoy_dynamic_metadata_is_on_unless_turned_off() {
        let c = Config::try_parse_from(["keyward"]).unwrap();
        assert!(c.envoy_dynamic_metadata);
        let c = Config::try_parse_from(["keyward", "--envoy-dynamic-metadata", "false"]).unwrap();
        assert!(!c.envoy_dynamic_metadata);
    }

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("unit"));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
    }

    #[test]
    fn durations_are_human_readable() {
        let c = Config::try_parse_from(["keyward", "--cache-ttl", "1m 30s"]).unwrap();
        assert_eq!(c.cache_ttl, Duration::from_secs(90));
    }
}
