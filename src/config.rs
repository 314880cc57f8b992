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

    /// Most connections this process holds to PostgreSQL.
    #[arg(
        long,
        env = "KEYWARD_DB_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub db_max_connections: u32,

    /// How long a query waits for a database connection before the store is
    /// reported unavailable (bounds a cache miss while the database is down).
    #[arg(long, env = "KEYWARD_DB_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub db_acquire_timeout: Duration,

    /// Address of the gRPC server (admin, check, Envoy ext_authz, health, reflection).
    #[arg(
        long,
        env = "KEYWARD_GRPC_ADDR",
        default_value = "0.0.0.0:50051",
        global = true
    )]
    pub grpc_addr: SocketAddr,

    /// Prefix of minted keys when a Mint call does not choose one.
    #[arg(long, env = "KEYWARD_KEY_PREFIX", default_value = "kw_live", value_parser = parse_prefix, global = true)]
    pub key_prefix: KeyPrefix,

    /// Known keys held in memory.
    #[arg(
        long,
        env = "KEYWARD_CACHE_CAPACITY",
        default_value_t = 1_000_000,
        global = true
    )]
    pub cache_capacity: u64,

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

    /// On SIGTERM/SIGINT, how long in-flight calls may finish before the
    /// process exits anyway. Keep it below Kubernetes' terminationGracePeriodSeconds.
    #[arg(long, env = "KEYWARD_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_grace: Duration,

    /// Whether Envoy answers carry dynamic metadata (keyward_key_id, ...) for
    /// access logs and rate limits. Envoy spends ~10% of its own CPU per
    /// request applying it (BENCHMARKS.md); turn it off if nothing reads it.
    #[arg(long, env = "KEYWARD_ENVOY_DYNAMIC_METADATA", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub envoy_dynamic_metadata: bool,

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
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
            application_name: "keyward".to_owned(),
        }
    }

    pub fn cache(&self) -> CacheSettings {
        CacheSettings {
            capacity: self.cache_capacity,
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
    fn durations_are_human_readable() {
        let c = Config::try_parse_from(["keyward", "--cache-ttl", "1m 30s"]).unwrap();
        assert_eq!(c.cache_ttl, Duration::from_secs(90));
    }
}
