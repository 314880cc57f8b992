//! Assembly: one gRPC server for every plane. `main` and the tests both build
//! an [`Application`] and run it until a shutdown future resolves.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tokio_stream::StreamExt as _;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::server::HealthReporter;

use crate::{
    api::{
        admin::{AdminApi, AdminStats},
        check::CheckApi,
        envoy::{EnvoyApi, EnvoyOptions},
        leaks::LeakApi,
        shed::InFlight,
    },
    cache::KeyCache,
    checker::{Checker, CheckerSettings, Limiting},
    config::Config,
    filter::KeyFilter,
    invalidation::{self, LagStats, Listening},
    key::{ApiKey, KeyRecord, MintSpec, NewKey, OwnerId, Scope},
    limits::{
        credits::{Clock, CreditBook, SystemClock},
        rate::{RateLimiter, RateSettings},
    },
    net::Coalescing,
    pb::{
        self, audit_service_server::AuditServiceServer, check_service_server::CheckServiceServer,
        key_service_server::KeyServiceServer, leak_service_server::LeakServiceServer,
        owner_service_server::OwnerServiceServer,
    },
    store::{Actor, DbOptions, Store, StoreError},
    throttle::ThrottleSettings,
    usage::{self, UsageRecorder},
};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot prepare the database")]
    Store(#[from] StoreError),
    #[error("cannot bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    #[error("invalid --owner: {0}")]
    Owner(crate::key::Invalid),
    #[error("cannot listen for cache invalidations")]
    Listen,
    #[error("invalid --redis-url")]
    Redis(#[source] redis::RedisError),
}

/// A built server, bound to its port, listening for invalidations, but not
/// yet serving.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    checker: Checker,
    admin: AdminApi,
    leaks: LeakApi,
    replica: ReplicaHandle,
    background: Background,
    shutdown_grace: Duration,
    envoy: EnvoyOptions,
    transport: Transport,
}

/// Limits on what clients may make the gRPC server hold.
#[derive(Debug, Clone, Copy)]
struct Transport {
    max_concurrent_streams: u32,
    check_max_message_size: usize,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

/// What a running replica exposes about itself (to tests, benchmarks and
/// later to metrics). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReplicaHandle {
    instance: String,
    store: Store,
    checker: Checker,
    in_flight: InFlight,
    admin: Arc<AdminStats>,
    lag: Arc<LagStats>,
    listen_sessions: watch::Receiver<u64>,
}

impl ReplicaHandle {
    /// A random id for this process; its connections are named
    /// `keyward <id>` and `keyward-listener <id>` in `pg_stat_activity`.
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The hot path, with its counters, cache and filter.
    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    /// What the admin plane refused.
    pub fn admin_stats(&self) -> &AdminStats {
        &self.admin
    }

    /// Checks being served right now.
    pub fn checks_in_flight(&self) -> usize {
        self.in_flight.current()
    }

    /// How long invalidations took to arrive here.
    pub fn revocation_lag(&self) -> &LagStats {
        &self.lag
    }

    /// `LISTEN` sessions established so far (1 after start, +1 per reconnect).
    pub fn listen_sessions(&self) -> u64 {
        *self.listen_sessions.borrow()
    }

    /// Waits until at least `n` `LISTEN` sessions have been established.
    pub async fn wait_for_listen_sessions(&self, n: u64, within: Duration) -> bool {
        let mut rx = self.listen_sessions.clone();
        tokio::time::timeout(within, rx.wait_for(|s| *s >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Tasks that live as long as the application.
struct Background {
    stop: watch::Sender<bool>,
    flusher: Option<JoinHandle<()>>,
    listener: JoinHandle<()>,
    returner: JoinHandle<()>,
}

impl Drop for Background {
    fn drop(&mut self) {
        self.listener.abort();
        self.returner.abort();
        if let Some(flusher) = &self.flusher {
            flusher.abort();
        }
    }
}

impl Application {
    /// Prepares the database (create, migrate), starts listening for
    /// invalidations, binds the gRPC address and wires the services. Port 0
    /// binds a free port; see [`Application::port`].
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Application::build`] with decisions and credit periods on `clock`
    /// (tests move time forward without waiting).
    pub async fn build_with_clock(
        config: &Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        let instance = format!("{:08x}", rand::random::<u32>());
        let db = DbOptions {
            application_name: format!("keyward {instance}"),
            ..config.db()
        };
        let store = Store::connect_and_migrate(&db).await?;
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: config.grpc_addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: config.grpc_addr,
            source,
        })?;

        let cache = KeyCache::new(&config.cache());
        let filter = Arc::new(KeyFilter::default());
        let lag = Arc::new(LagStats::default());
        let credits = CreditBook::new(store.clone(), config.credit_block_max);
        let rate = RateLimiter::new(&RateSettings {
            redis_url: config.redis_url.clone(),
            redis_timeout: config.redis_timeout,
            local_share: config.rate_limit_local_share,
        })
        .map_err(StartupError::Redis)?;
        let (listener_task, listen_sessions) = invalidation::spawn(Listening {
            store: store.clone(),
            cache: cache.clone(),
            filter: filter.clone(),
            application_name: format!("keyward-listener {instance}"),
            lag: lag.clone(),
            catchup_margin: config.catchup_margin,
            credits: credits.clone(),
        });
        let recorder = Arc::new(UsageRecorder::default());
        let (stop, stop_rx) = watch::channel(false);
        let flusher = usage::spawn_flusher(
            store.clone(),
            recorder.clone(),
            config.usage_flush_interval,
            config.usage_flush_timeout,
            stop_rx,
        );
        let returner = credits.spawn_returner(stop.subscribe());
        let background = Background {
            stop,
            flusher: Some(flusher),
            listener: listener_task,
            returner,
        };
        let checker = Checker::new(
            cache,
            filter,
            store.clone(),
            recorder,
            CheckerSettings {
                unknown_lookups_per_second: config.unknown_key_lookups_per_second,
                unknown_lookup_burst: config.unknown_key_lookup_burst,
                throttle: ThrottleSettings {
                    threshold: config.brute_force_threshold,
                    window: config.brute_force_window,
                    cooldown: config.brute_force_cooldown,
                },
                // Half the check connections: the rest stays for misses.
                background_refreshes: (config.db_check_connections as usize / 2).max(1),
            },
            Limiting {
                rate,
                credits: credits.clone(),
                clock,
            },
        );
        let replica = ReplicaHandle {
            instance,
            store: store.clone(),
            checker: checker.clone(),
            in_flight: InFlight::new(config.max_in_flight),
            admin: Arc::default(),
            lag,
            listen_sessions,
        };
        // Serve nothing until invalidations can reach this replica and its
        // membership filter is loaded.
        if !replica
            .wait_for_listen_sessions(1, LISTEN_STARTUP_TIMEOUT)
            .await
        {
            return Err(StartupError::Listen);
        }

        let admin = AdminApi::new(
            checker.clone(),
            store.clone(),
            config.key_prefix.clone(),
            replica.admin.clone(),
        );
        let leaks = LeakApi::new(
            checker.clone(),
            store,
            ThrottleSettings {
                // The report that reaches the threshold is refused.
                threshold: config.leak_reports_per_minute.saturating_add(1),
                window: Duration::from_secs(60),
                cooldown: Duration::from_secs(60),
            },
        );
        Ok(Self {
            listener,
            local_addr,
            checker,
            admin,
            leaks,
            replica,
            background,
            shutdown_grace: config.shutdown_grace,
            envoy: EnvoyOptions {
                dynamic_metadata: config.envoy_dynamic_metadata,
                host_as_resource: config.envoy_host_as_resource,
                x_ratelimit_headers: config.x_ratelimit_headers,
            },
            transport: Transport {
                max_concurrent_streams: config.max_concurrent_streams,
                check_max_message_size: usize::try_from(config.check_max_message_size)
                    .unwrap_or(usize::MAX),
                keepalive_interval: config.http2_keepalive_interval,
                keepalive_timeout: config.http2_keepalive_timeout,
            },
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> &Store {
        self.replica.store()
    }

    pub fn replica(&self) -> ReplicaHandle {
        self.replica.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, reports
    /// NOT_SERVING, lets in-flight calls finish for up to the grace period,
    /// and writes the usage recorded so far.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let Self {
            listener,
            local_addr,
            checker,
            admin,
            leaks,
            replica,
            mut background,
            shutdown_grace,
            envoy,
            transport,
        } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, tonic_health::ServingStatus::Serving).await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        // grpcurl before 1.8.8 speaks only v1alpha.
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let (draining_tx, draining_rx) = oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutdown requested; draining in-flight calls");
            set_health(&health, tonic_health::ServingStatus::NotServing).await;
            let _ = draining_tx.send(());
        };

        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(|conn| conn.map(Coalescing));
        let in_flight = replica.in_flight.clone();
        let max_message = transport.check_max_message_size;
        let server = Server::builder()
            .max_concurrent_streams(Some(transport.max_concurrent_streams))
            .http2_keepalive_interval(Some(transport.keepalive_interval))
            .http2_keepalive_timeout(Some(transport.keepalive_timeout))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(KeyServiceServer::new(admin.clone()))
            .add_service(OwnerServiceServer::new(admin.clone()))
            .add_service(AuditServiceServer::new(admin))
            .add_service(LeakServiceServer::new(leaks))
            .add_service(
                in_flight.wrap(
                    CheckServiceServer::new(CheckApi::new(checker.clone()))
                        .max_decoding_message_size(max_message),
                ),
            )
            .add_service(
                in_flight.wrap(
                    AuthorizationServer::new(EnvoyApi::new(checker, envoy))
                        .max_decoding_message_size(max_message),
                ),
            )
            .serve_with_incoming_shutdown(incoming, signal);

        tracing::info!(addr = %local_addr, "keyward serving");
        tokio::select! {
            served = server => served?,
            () = async {
                if draining_rx.await.is_ok() {
                    tokio::time::sleep(shutdown_grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!(grace = ?shutdown_grace, "grace period over with calls still in flight; exiting");
            }
        }
        // Give back unspent credit reservations and write the usage recorded
        // so far (bounded: the database may be down).
        match tokio::time::timeout(
            FINAL_FLUSH_TIMEOUT,
            replica.checker.credits().give_back(Duration::ZERO),
        )
        .await
        {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!(buckets = n, "unspent credit reservations returned")
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %crate::telemetry::chain(&err), "cannot return credit reservations")
            }
            Err(_) => tracing::warn!("returning credit reservations timed out"),
        }
        let _ = background.stop.send(true);
        if let Some(flusher) = background.flusher.take()
            && tokio::time::timeout(FINAL_FLUSH_TIMEOUT, flusher)
                .await
                .is_err()
        {
            tracing::warn!("final usage write timed out");
        }
        tracing::info!("keyward stopped");
        Ok(())
    }
}

/// The first `LISTEN` must be up before the replica serves.
const LISTEN_STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

async fn set_health(health: &HealthReporter, status: tonic_health::ServingStatus) {
    for service in [
        "",
        <KeyServiceServer<AdminApi> as tonic::server::NamedService>::NAME,
        <OwnerServiceServer<AdminApi> as tonic::server::NamedService>::NAME,
        <AuditServiceServer<AdminApi> as tonic::server::NamedService>::NAME,
        <LeakServiceServer<LeakApi> as tonic::server::NamedService>::NAME,
        <CheckServiceServer<CheckApi> as tonic::server::NamedService>::NAME,
        <AuthorizationServer<EnvoyApi> as tonic::server::NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// `keyward migrate`: creates the database if missing and applies migrations.
pub async fn migrate(config: &Config) -> Result<(), StartupError> {
    Store::connect_and_migrate(&config.db()).await?;
    tracing::info!("migrations applied");
    Ok(())
}

/// `keyward bootstrap`: writes an admin key (scope `keyward:admin`) straight
/// to the database, for the first operator. The caller prints the secret.
pub async fn bootstrap(
    config: &Config,
    owner: &str,
    name: &str,
) -> Result<(KeyRecord, ApiKey), StartupError> {
    let owner = OwnerId::parse(owner).map_err(StartupError::Owner)?;
    let store = Store::connect_and_migrate(&config.db()).await?;
    let (secret, new_key) = NewKey::generate(MintSpec {
        name: name.to_owned(),
        description: "written by keyward bootstrap".to_owned(),
        scopes: vec![Scope::parse(Scope::ADMIN).map_err(StartupError::Owner)?],
        ..MintSpec::new(owner, config.key_prefix.clone())
    });
    // The recovery path: an owner's ceiling or quota does not stop it.
    let record = store
        .insert_key(&new_key, &Actor::bootstrap(), |_| Ok(()))
        .await?;
    tracing::info!(key_id = %record.id, owner_id = %record.owner_id, "admin key written");
    Ok((record, secret))
}
