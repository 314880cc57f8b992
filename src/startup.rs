//! Assembly: the gRPC servers (one address for every plane, or a main one
//! for checks and an admin one), the metrics server, the background tasks
//! under supervision, and the shutdown that drops no request. `main` and
//! the tests both build an [`Application`] and run it until a shutdown
//! future resolves.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::watch,
    task::{AbortHandle, JoinHandle},
};
use tokio_stream::StreamExt as _;
use tonic::{
    server::NamedService,
    service::{Routes, RoutesBuilder},
    transport::{Server, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{
        admin::{AdminApi, AdminStats},
        check::CheckApi,
        envoy::{EnvoyApi, EnvoyOptions},
        envoy_wire::EnvoyServer,
        leaks::LeakApi,
        observed::{KnownMethods, Observing},
        shed::InFlight,
    },
    cache::KeyCache,
    checker::{Checker, CheckerSettings, Limiting},
    config::Config,
    filter::KeyFilter,
    invalidation::{self, LagStats, Listening, Sessions},
    key::{ApiKey, KeyRecord, MintSpec, NewKey, OwnerId, Scope},
    limits::{
        credits::{Clock, CreditBook, SystemClock},
        rate::{RateLimiter, RateSettings},
    },
    metrics::{self, AdminCalls, Door},
    net::Coalescing,
    pb::{
        self, audit_service_server::AuditServiceServer, check_service_server::CheckServiceServer,
        key_service_server::KeyServiceServer, leak_service_server::LeakServiceServer,
        owner_service_server::OwnerServiceServer,
    },
    store::{Actor, DbOptions, Store, StoreError},
    sync::lock,
    throttle::ThrottleSettings,
    tls::{TlsAcceptor, TlsError, TlsFiles},
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
    #[error("cannot start the invalidation listener's thread")]
    ListenerThread(#[source] std::io::Error),
    #[error("invalid TLS settings for the {listener} address")]
    Tls {
        listener: &'static str,
        #[source]
        source: TlsError,
    },
}

/// The name under which the health service answers SERVING for as long as
/// the process runs (Kubernetes' liveness probe): draining or not ready is
/// no reason to restart it. The empty name is readiness.
pub const LIVENESS: &str = "liveness";

/// A built server, bound to its ports, listening for invalidations, but not
/// yet serving.
pub struct Application {
    main: Endpoint,
    /// `Some` when the admin plane has its own address.
    admin_endpoint: Option<Endpoint>,
    metrics: Option<TcpListener>,
    checker: Checker,
    admin: AdminApi,
    leaks: LeakApi,
    replica: ReplicaHandle,
    background: Background,
    shutdown_delay: Duration,
    shutdown_grace: Duration,
    envoy: EnvoyOptions,
    transport: Transport,
}

/// One gRPC address: its socket, and its TLS if any.
struct Endpoint {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
}

impl Endpoint {
    async fn bind(addr: SocketAddr, tls: Option<TlsAcceptor>) -> Result<Self, StartupError> {
        let bind_error = |source| StartupError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(Self {
            listener,
            addr,
            tls,
        })
    }
}

/// Limits on what clients may make the gRPC server hold.
#[derive(Debug, Clone, Copy)]
struct Transport {
    max_concurrent_streams: u32,
    check_max_message_size: usize,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

/// Whether this replica should get traffic: it serves (not starting, not
/// draining), its invalidation listener is connected and caught up, and no
/// background task is down.
#[derive(Debug, Default)]
pub struct Readiness {
    serving: AtomicBool,
    tasks_down: AtomicUsize,
}

/// What a running replica exposes about itself (to tests, benchmarks and
/// metrics). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReplicaHandle {
    instance: String,
    store: Store,
    checker: Checker,
    in_flight: InFlight,
    admin: Arc<AdminStats>,
    admin_calls: Arc<AdminCalls>,
    lag: Arc<LagStats>,
    listen_sessions: watch::Receiver<u64>,
    readiness: Arc<Readiness>,
    tasks: Arc<Tasks>,
    addrs: Addrs,
}

/// Where a replica listens.
#[derive(Debug, Clone, Copy)]
struct Addrs {
    main: SocketAddr,
    admin: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
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

    /// Admin calls by method and code.
    pub fn admin_calls(&self) -> &AdminCalls {
        &self.admin_calls
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

    /// Serving, listening for invalidations, every background task up.
    pub fn is_ready(&self) -> bool {
        self.readiness.serving.load(Ordering::Relaxed)
            && self.lag.connected()
            && self.readiness.tasks_down.load(Ordering::Relaxed) == 0
    }

    /// The main gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs.main
    }

    /// The admin gRPC address, when the admin plane has its own.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.addrs.admin
    }

    /// The metrics and HTTP probe address, unless metrics are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.addrs.metrics
    }

    /// Kills a background task (`listener`, `usage-flusher` or
    /// `credit-returner`) as a crash would: the supervisor notices, marks
    /// the replica not ready and starts it again. For fault drills and
    /// tests. Returns whether such a task was running.
    pub fn kill_background_task(&self, name: &str) -> bool {
        self.tasks.kill(name)
    }

    /// Times background tasks were started again after dying.
    pub fn background_restarts(&self) -> usize {
        self.tasks.restarts.load(Ordering::Relaxed)
    }
}

/// The running background tasks, by name.
#[derive(Debug, Default)]
struct Tasks {
    running: Mutex<Vec<(&'static str, AbortHandle)>>,
    restarts: AtomicUsize,
}

impl Tasks {
    fn set(&self, name: &'static str, handle: AbortHandle) {
        let mut running = lock(&self.running);
        running.retain(|(n, _)| *n != name);
        running.push((name, handle));
    }

    fn kill(&self, name: &str) -> bool {
        let running = lock(&self.running);
        running
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, h)| h.abort())
            .is_some()
    }
}

/// Keeps a background task running: when it ends before `stop`, the
/// replica is not ready until it has been started again (after a short
/// pause, so a task that dies at once does not spin). Resolves when the
/// task has ended after `stop` (the usage flusher writes once more then).
fn supervise(
    name: &'static str,
    readiness: Arc<Readiness>,
    tasks: Arc<Tasks>,
    mut stop: watch::Receiver<bool>,
    mut start: impl FnMut() -> JoinHandle<()> + Send + 'static,
    on_death: impl Fn() + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut task = start();
            tasks.set(name, task.abort_handle());
            let ended = tokio::select! {
                ended = &mut task => Some(ended),
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(ended) = ended else {
                let _ = task.await;
                return;
            };
            if *stop.borrow() {
                return;
            }
            on_death();
            readiness.tasks_down.fetch_add(1, Ordering::Relaxed);
            match ended {
                Err(err) if err.is_panic() => {
                    tracing::error!(task = name, "background task panicked; restarting it")
                }
                Err(_) => tracing::error!(task = name, "background task was killed; restarting it"),
                Ok(()) => tracing::error!(task = name, "background task ended; restarting it"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            tasks.restarts.fetch_add(1, Ordering::Relaxed);
            readiness.tasks_down.fetch_sub(1, Ordering::Relaxed);
        }
    })
}

/// The invalidation listener's own thread. A notice must not wait in the
/// serving runtime's queue behind the checks in flight: with one core
/// serving tens of thousands of checks a second that queue holds
/// milliseconds of work, and revocation would lag by as much. On its own
/// thread the listener is woken by the kernel as soon as the notice arrives
/// and evicts the key from the (shared, thread-safe) cache at once.
struct ListenerThread {
    handle: tokio::runtime::Handle,
    /// Dropping it ends the thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ListenerThread {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("keyward-invalidations".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

/// Tasks that live as long as the application, each under supervision.
struct Background {
    _listener_thread: ListenerThread,
    stop: watch::Sender<bool>,
    flusher: Option<JoinHandle<()>>,
    listener: JoinHandle<()>,
    returner: JoinHandle<()>,
    tls_reloaders: Vec<JoinHandle<()>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.listener.abort();
        self.returner.abort();
        if let Some(flusher) = &self.flusher {
            flusher.abort();
        }
        for reloader in &self.tls_reloaders {
            reloader.abort();
        }
    }
}

impl Application {
    /// Prepares the database (create, migrate), starts listening for
    /// invalidations, binds the addresses and wires the services. Port 0
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
        let store = if config.migrate_on_start {
            Store::connect_and_migrate(&db).await?
        } else {
            Store::connect_migrated(&db).await?
        };
        let (main_tls, admin_tls) = tls_settings(config)?;
        let main = Endpoint::bind(config.grpc_addr, main_tls).await?;
        let admin_endpoint = match config.admin_addr {
            Some(addr) => Some(Endpoint::bind(addr, admin_tls).await?),
            None => None,
        };
        let metrics = match config.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::Bind { addr, source })?,
            ),
            None => None,
        };
        let metrics_addr = match &metrics {
            Some(l) => Some(l.local_addr().map_err(|source| StartupError::Bind {
                addr: config.metrics_addr.unwrap_or(main.addr),
                source,
            })?),
            None => None,
        };

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
        let readiness = Arc::new(Readiness::default());
        let tasks = Arc::new(Tasks::default());
        let (stop, stop_rx) = watch::channel(false);

        let listener_thread = ListenerThread::start().map_err(StartupError::ListenerThread)?;
        let sessions: Sessions = Arc::new(watch::channel(0u64).0);
        let listen_sessions = sessions.subscribe();
        let listening = Listening {
            store: store.clone(),
            cache: cache.clone(),
            filter: filter.clone(),
            application_name: format!("keyward-listener {instance}"),
            lag: lag.clone(),
            catchup_margin: config.catchup_margin,
            credits: credits.clone(),
            pooled: tokio::runtime::Handle::current(),
        };
        let listener_task = {
            let lag = lag.clone();
            let handle = listener_thread.handle.clone();
            supervise(
                "listener",
                readiness.clone(),
                tasks.clone(),
                stop_rx.clone(),
                move || invalidation::spawn_on(&handle, listening.clone(), sessions.clone()),
                move || lag.mark_disconnected(),
            )
        };
        let recorder = Arc::new(UsageRecorder::default());
        let flusher = {
            let (store, recorder) = (store.clone(), recorder.clone());
            let (interval, timeout) = (config.usage_flush_interval, config.usage_flush_timeout);
            let stop_rx = stop_rx.clone();
            supervise(
                "usage-flusher",
                readiness.clone(),
                tasks.clone(),
                stop_rx.clone(),
                move || {
                    usage::spawn_flusher(
                        store.clone(),
                        recorder.clone(),
                        interval,
                        timeout,
                        stop_rx.clone(),
                    )
                },
                || {},
            )
        };
        let returner = {
            let credits = credits.clone();
            let stop_rx = stop_rx.clone();
            supervise(
                "credit-returner",
                readiness.clone(),
                tasks.clone(),
                stop_rx.clone(),
                move || credits.spawn_returner(stop_rx.clone()),
                || {},
            )
        };
        let tls_reloaders = [
            &main.tls,
            &admin_endpoint.as_ref().and_then(|e| e.tls.clone()),
        ]
        .into_iter()
        .flatten()
        .map(|tls| tls.spawn_reloader(config.tls_reload_interval, stop_rx.clone()))
        .collect();
        let background = Background {
            _listener_thread: listener_thread,
            stop,
            flusher: Some(flusher),
            listener: listener_task,
            returner,
            tls_reloaders,
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
                // A third: most stay for misses of real keys.
                unlikely_lookups: (config.db_check_connections as usize / 3).max(1),
                per_check_metrics: config.metrics_addr.is_some(),
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
            admin_calls: Arc::default(),
            lag,
            listen_sessions,
            readiness,
            tasks,
            addrs: Addrs {
                main: main.addr,
                admin: admin_endpoint.as_ref().map(|e| e.addr),
                metrics: metrics_addr,
            },
        };
        // Best effort: a miss after start-up finds its connection open. A
        // database that is slow now is no reason not to start.
        match tokio::time::timeout(WARM_UP_TIMEOUT, store.warm_check_pool()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %crate::telemetry::chain(&err), "cannot open the check connections yet")
            }
            Err(_) => {
                tracing::warn!("opening the check connections is taking long; serving anyway")
            }
        }
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
            main,
            admin_endpoint,
            metrics,
            checker,
            admin,
            leaks,
            replica,
            background,
            shutdown_delay: config.shutdown_delay,
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
        self.main.addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.main.addr
    }

    pub fn store(&self) -> &Store {
        self.replica.store()
    }

    pub fn replica(&self) -> ReplicaHandle {
        self.replica.clone()
    }

    /// Serves until `shutdown` resolves. Then: reports NOT_SERVING and keeps
    /// serving for the shutdown delay (load balancers and Envoy's health
    /// checks move away meanwhile), stops accepting and lets in-flight calls
    /// finish for up to the grace period, returns unspent credits and
    /// writes the usage recorded so far.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let Self {
            main,
            admin_endpoint,
            metrics,
            checker,
            admin,
            leaks,
            replica,
            mut background,
            shutdown_delay,
            shutdown_grace,
            envoy,
            transport,
        } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        let observing = Observing {
            known: Arc::new(KnownMethods::from_descriptors(&[
                pb::FILE_DESCRIPTOR_SET,
                pb::ENVOY_AUTHZ_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ])),
            calls: replica.admin_calls.clone(),
        };

        // What each address serves.
        let in_flight = replica.in_flight.clone();
        let max_message = transport.check_max_message_size;
        let mut checks = Routes::builder();
        checks
            .add_service(health_service.clone())
            .add_service(
                in_flight.wrap(
                    CheckServiceServer::new(CheckApi::new(checker.clone()))
                        .max_decoding_message_size(max_message),
                    checker.clone(),
                    Door::Check,
                ),
            )
            .add_service(in_flight.wrap(
                EnvoyServer::new(EnvoyApi::new(checker.clone(), envoy), max_message),
                checker,
                Door::Envoy,
            ));
        let add_admin = |routes: &mut RoutesBuilder| {
            routes
                .add_service(observing.wrap(KeyServiceServer::new(admin.clone())))
                .add_service(observing.wrap(OwnerServiceServer::new(admin.clone())))
                .add_service(observing.wrap(AuditServiceServer::new(admin.clone())))
                .add_service(observing.wrap(LeakServiceServer::new(leaks.clone())));
        };
        let admin_services = [
            <KeyServiceServer<AdminApi> as NamedService>::NAME,
            <OwnerServiceServer<AdminApi> as NamedService>::NAME,
            <AuditServiceServer<AdminApi> as NamedService>::NAME,
            <LeakServiceServer<LeakApi> as NamedService>::NAME,
        ];
        let check_services = [
            <CheckServiceServer<CheckApi> as NamedService>::NAME,
            <EnvoyServer as NamedService>::NAME,
        ];
        let health_name = <tonic_health::pb::health_server::HealthServer<
            tonic_health::server::HealthService,
        > as NamedService>::NAME;
        let (main_routes, admin_routes) = match &admin_endpoint {
            None => {
                add_admin(&mut checks);
                let served: Vec<&str> = [health_name]
                    .into_iter()
                    .chain(admin_services)
                    .chain(check_services)
                    .collect();
                add_reflection(&mut checks, &served)?;
                (checks.routes(), None)
            }
            Some(_) => {
                let mut admin_routes = Routes::builder();
                admin_routes.add_service(health_service);
                add_admin(&mut admin_routes);
                let served: Vec<&str> = [health_name].into_iter().chain(admin_services).collect();
                add_reflection(&mut admin_routes, &served)?;
                (checks.routes(), Some(admin_routes.routes()))
            }
        };

        // Shutdown, in steps: `draining` when the signal comes, `stopping`
        // once the delay is over.
        let (stopping_tx, stopping_rx) = watch::channel(false);
        let draining = {
            let health = health.clone();
            let readiness = replica.readiness.clone();
            tokio::spawn(async move {
                shutdown.await;
                readiness.serving.store(false, Ordering::Relaxed);
                set_readiness(&health, false).await;
                tracing::info!(delay = ?shutdown_delay, "shutdown requested; NOT_SERVING, still serving for the delay");
                tokio::time::sleep(shutdown_delay).await;
                tracing::info!("shutdown delay over; draining in-flight calls");
                let _ = stopping_tx.send(true);
            })
        };
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let server = || {
            Server::builder()
                .max_concurrent_streams(Some(transport.max_concurrent_streams))
                .http2_keepalive_interval(Some(transport.keepalive_interval))
                .http2_keepalive_timeout(Some(transport.keepalive_timeout))
        };
        let mut servers = tokio::task::JoinSet::new();
        for (name, endpoint, routes) in [("main", Some(main), Some(main_routes))]
            .into_iter()
            .chain([("admin", admin_endpoint, admin_routes)])
        {
            let (Some(endpoint), Some(routes)) = (endpoint, routes) else {
                continue;
            };
            let signal = stopped(stopping_rx.clone());
            let mut builder = server();
            let addr = endpoint.addr;
            match endpoint.tls {
                Some(tls) => {
                    tracing::info!(%addr, listener = name, "keyward serving (TLS)");
                    let incoming = tls.incoming(endpoint.listener);
                    servers.spawn(async move {
                        builder
                            .add_routes(routes)
                            .serve_with_incoming_shutdown(incoming, signal)
                            .await
                    });
                }
                None => {
                    tracing::info!(%addr, listener = name, "keyward serving");
                    let incoming = TcpIncoming::from(endpoint.listener)
                        .with_nodelay(Some(true))
                        .map(|conn| conn.map(Coalescing));
                    servers.spawn(async move {
                        builder
                            .add_routes(routes)
                            .serve_with_incoming_shutdown(incoming, signal)
                            .await
                    });
                }
            }
        }
        // The HTTP probes answer until the process is done (`/livez` stays
        // 200 while in-flight calls drain); the task is stopped at the end.
        let metrics_server = metrics.map(|listener| {
            tokio::spawn(metrics::serve(
                listener,
                replica.clone(),
                std::future::pending::<()>(),
            ))
        });
        replica.readiness.serving.store(true, Ordering::Relaxed);
        let readiness_watch = tokio::spawn(watch_readiness(
            health.clone(),
            replica.clone(),
            stopping_rx.clone(),
        ));

        // Serve until every server has drained (or failed), or the grace
        // period after the delay is over.
        let mut failed = None;
        let grace_over = async {
            stopped(stopping_rx.clone()).await;
            tokio::time::sleep(shutdown_grace).await;
        };
        tokio::pin!(grace_over);
        loop {
            tokio::select! {
                next = servers.join_next() => match next {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(err))) => {
                        failed.get_or_insert(err);
                        break;
                    }
                    Some(Err(join)) => {
                        tracing::error!(error = %join, "a gRPC server task failed");
                        break;
                    }
                },
                () = &mut grace_over => {
                    tracing::warn!(grace = ?shutdown_grace, "grace period over with calls still in flight; exiting");
                    break;
                }
            }
        }
        servers.abort_all();
        draining.abort();
        readiness_watch.abort();
        replica.readiness.serving.store(false, Ordering::Relaxed);

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
        if let Some(metrics_server) = metrics_server {
            metrics_server.abort();
        }
        if let Some(err) = failed {
            return Err(err.into());
        }
        tracing::info!("keyward stopped");
        Ok(())
    }
}

/// The TLS of the main and admin addresses. The admin address takes the
/// main address's settings unless it has its own.
fn tls_settings(
    config: &Config,
) -> Result<(Option<TlsAcceptor>, Option<TlsAcceptor>), StartupError> {
    let load = |listener: &'static str,
                cert: &Option<std::path::PathBuf>,
                key: &Option<std::path::PathBuf>,
                ca: &Option<std::path::PathBuf>| {
        match (cert, key) {
            (Some(cert), Some(key)) => TlsAcceptor::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            })
            .map(Some)
            .map_err(|source| StartupError::Tls { listener, source }),
            _ => Ok(None),
        }
    };
    let main = load(
        "main",
        &config.tls_cert,
        &config.tls_key,
        &config.tls_client_ca,
    )?;
    let admin = if config.admin_tls_cert.is_some() {
        load(
            "admin",
            &config.admin_tls_cert,
            &config.admin_tls_key,
            &config.admin_tls_client_ca,
        )?
    } else {
        main.clone()
    };
    Ok((main, admin))
}

/// gRPC reflection (v1, and v1alpha for grpcurl before 1.8.8) listing
/// exactly `served`, with every descriptor they need.
fn add_reflection(routes: &mut RoutesBuilder, served: &[&str]) -> Result<(), StartupError> {
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(pb::ENVOY_AUTHZ_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in served {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    routes
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok(())
}

/// Keeps the health service's readiness (the empty name and each served
/// service) in step with [`ReplicaHandle::is_ready`]. `liveness` stays
/// SERVING throughout.
async fn watch_readiness(
    health: HealthReporter,
    replica: ReplicaHandle,
    mut stopping: watch::Receiver<bool>,
) {
    let mut reported = None;
    loop {
        let ready = replica.is_ready() && !*stopping.borrow();
        if reported != Some(ready) {
            set_readiness(&health, ready).await;
            if reported.is_some() {
                tracing::info!(ready, "readiness changed");
            }
            reported = Some(ready);
        }
        tokio::select! {
            _ = tokio::time::sleep(READINESS_POLL) => {}
            _ = stopping.changed() => {}
        }
    }
}

/// How often readiness is re-evaluated for the health service.
const READINESS_POLL: Duration = Duration::from_millis(100);

/// The first `LISTEN` must be up before the replica serves.
const LISTEN_STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(5);

async fn set_readiness(health: &HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in [
        "",
        <KeyServiceServer<AdminApi> as NamedService>::NAME,
        <OwnerServiceServer<AdminApi> as NamedService>::NAME,
        <AuditServiceServer<AdminApi> as NamedService>::NAME,
        <LeakServiceServer<LeakApi> as NamedService>::NAME,
        <CheckServiceServer<CheckApi> as NamedService>::NAME,
        <EnvoyServer as NamedService>::NAME,
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
