//! Assembly: one gRPC server for every plane. `main` and the tests both build
//! an [`Application`] and run it until a shutdown future resolves.

use std::{future::Future, net::SocketAddr, time::Duration};

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::{net::TcpListener, sync::oneshot};
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::server::HealthReporter;

use crate::{
    api::{admin::AdminApi, check::CheckApi, envoy::EnvoyApi},
    cache::KeyCache,
    checker::Checker,
    config::Config,
    key::{ApiKey, KeyRecord, NewKey, OwnerId, Scope},
    pb::{self, check_service_server::CheckServiceServer, key_service_server::KeyServiceServer},
    store::{Actor, Store, StoreError},
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
}

/// A built server, bound to its port but not yet serving.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    store: Store,
    checker: Checker,
    admin: AdminApi,
    shutdown_grace: Duration,
}

impl Application {
    /// Prepares the database (create, migrate), binds the gRPC address and
    /// wires the services. Port 0 binds a free port; see [`Application::port`].
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let store = Store::connect_and_migrate(&config.db()).await?;
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
        let checker = Checker::new(KeyCache::new(&config.cache()), store.clone());
        let admin = AdminApi::new(checker.clone(), store.clone(), config.key_prefix.clone());
        Ok(Self {
            listener,
            local_addr,
            store,
            checker,
            admin,
            shutdown_grace: config.shutdown_grace,
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `shutdown` resolves, then stops accepting, reports
    /// NOT_SERVING, and lets in-flight calls finish for up to the grace period.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
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

        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let server = Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(KeyServiceServer::new(self.admin))
            .add_service(CheckServiceServer::new(CheckApi::new(self.checker.clone())))
            .add_service(AuthorizationServer::new(EnvoyApi::new(self.checker)))
            .serve_with_incoming_shutdown(incoming, signal);

        tracing::info!(addr = %self.local_addr, "keyward serving");
        let grace = self.shutdown_grace;
        tokio::select! {
            served = server => served?,
            () = async {
                if draining_rx.await.is_ok() {
                    tokio::time::sleep(grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!(grace = ?grace, "grace period over with calls still in flight; exiting");
            }
        }
        tracing::info!("keyward stopped");
        Ok(())
    }
}

async fn set_health(health: &HealthReporter, status: tonic_health::ServingStatus) {
    for service in [
        "",
        <KeyServiceServer<AdminApi> as tonic::server::NamedService>::NAME,
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
    let (secret, generated) = NewKey::generate(&config.key_prefix, owner);
    let new_key = NewKey {
        name: name.to_owned(),
        description: "written by keyward bootstrap".to_owned(),
        scopes: vec![Scope::parse(Scope::ADMIN).map_err(StartupError::Owner)?],
        ..generated
    };
    let record = store.insert_key(&new_key, &Actor::bootstrap()).await?;
    tracing::info!(key_id = %record.id, owner_id = %record.owner_id, "admin key written");
    Ok((record, secret))
}
