//! A keyward `Application` running in this process, with a gRPC channel to
//! it. Shared by the tests and the benchmarks (`#[path]`-included).

use std::net::SocketAddr;

use keyward::{
    config::Config,
    startup::{Application, ReplicaHandle, StartupError},
};
use sqlx::PgPool;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub struct Running {
    pub addr: SocketAddr,
    /// The server's own pool.
    pub db: PgPool,
    pub replica: ReplicaHandle,
    pub channel: Channel,
    /// Sending (or dropping) stops the server, as SIGTERM would.
    pub stop: oneshot::Sender<()>,
    pub server: JoinHandle<Result<(), StartupError>>,
}

pub async fn start(config: &Config) -> Running {
    start_with_clock(
        config,
        std::sync::Arc::new(keyward::limits::credits::SystemClock),
    )
    .await
}

/// [`start`] on a clock the caller controls.
pub async fn start_with_clock(
    config: &Config,
    clock: std::sync::Arc<dyn keyward::limits::credits::Clock>,
) -> Running {
    let app = Application::build_with_clock(config, clock)
        .await
        .expect("build app");
    let addr = app.local_addr();
    let db = app.store().pool().clone();
    let replica = app.replica();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    Running {
        addr,
        db,
        replica,
        channel,
        stop,
        server,
    }
}
