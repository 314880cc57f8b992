//! A global bound on checks in flight: past it a check is refused at once
//! with `RESOURCE_EXHAUSTED` instead of queueing, so an overload shows up as
//! fast refusals (Envoy's `status_on_error`) rather than as timeouts for
//! everyone. Wraps the two Check services; the admin plane and health
//! checks are not shed.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body, server::NamedService};
use tower_service::Service;

use crate::{checker::Checker, metrics::Door};

/// One permit per check in flight, shared by the services it wraps.
#[derive(Debug, Clone)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    max: usize,
}

impl InFlight {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// `inner`, shedding beyond the limit; each shed call is counted on
    /// `door`'s counters.
    pub fn wrap<S>(&self, inner: S, checker: Checker, door: Door) -> Shed<S> {
        Shed {
            inner,
            permits: self.permits.clone(),
            counted: (checker, door),
        }
    }

    /// Checks being served right now (from their request's headers on).
    pub fn current(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    counted: (Checker, Door),
}

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Shedding<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Shedding::Admitted {
                call: self.inner.call(req),
                _permit: permit,
            },
            Err(_) => {
                let (checker, door) = &self.counted;
                if let Some(door) = checker.doors().counted(*door) {
                    door.shed();
                }
                Shedding::Refused
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The wrapped call, holding its permit until it answers; or a refusal.
    #[project = SheddingProj]
    pub enum Shedding<F> {
        Admitted { #[pin] call: F, _permit: OwnedSemaphorePermit },
        Refused,
    }
}

impl<F> Future for Shedding<F>
where
    F: Future<Output = Result<http::Response<Body>, Infallible>>,
{
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            SheddingProj::Admitted { call, .. } => call.poll(cx),
            SheddingProj::Refused => Poll::Ready(Ok(Status::resource_exhausted(
                "too many checks in flight; retry later",
            )
            .into_http())),
        }
    }
}
