//! The admin plane: `KeyService` (keys.rs), `OwnerService` (owners.rs) and
//! `AuditService` (audit.rs), all authorized by a management key
//! (caller.rs), with requests validated in request.rs.
//!
//! Refused calls (no or a bad management key, a caller going beyond what
//! its key may do) are logged with the method and the caller, and counted.

mod audit;
mod caller;
mod keys;
mod owners;
mod request;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tonic::{Code, Request, Status};

pub use caller::ADMIN_RESOURCE;
use caller::Caller;

use crate::{
    api::status::ApiError,
    checker::Checker,
    key::KeyPrefix,
    store::{Store, StoreError},
};

#[derive(Debug, Clone)]
pub struct AdminApi {
    checker: Checker,
    store: Store,
    default_prefix: KeyPrefix,
    stats: Arc<AdminStats>,
}

/// What the admin plane refused.
#[derive(Debug, Default)]
pub struct AdminStats {
    refused: AtomicU64,
}

impl AdminStats {
    /// Calls refused for want of a valid management key, or for asking more
    /// than the key may do.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl AdminApi {
    pub fn new(
        checker: Checker,
        store: Store,
        default_prefix: KeyPrefix,
        stats: Arc<AdminStats>,
    ) -> Self {
        Self {
            checker,
            store,
            default_prefix,
            stats,
        }
    }

    /// Authorizes the call and splits it into the caller and the message.
    async fn begin<T>(
        &self,
        method: &'static str,
        request: Request<T>,
    ) -> Result<(Caller, T), Status> {
        let remote = request.remote_addr().map(|a| a.ip());
        match self.authorize(request.metadata(), remote).await {
            Ok(caller) => {
                // The call's span (see api::observed) names who made it.
                let span = tracing::Span::current();
                span.record("caller", tracing::field::display(&caller.key_id));
                span.record("caller_owner", tracing::field::display(&caller.owner_id));
                Ok((caller, request.into_inner()))
            }
            Err(err) => Err(self.finish_err(method, None, err)),
        }
    }

    /// The answer to a call: a refusal is logged and counted once.
    fn finish<R>(
        &self,
        method: &'static str,
        caller: &Caller,
        result: Result<R, ApiError>,
    ) -> Result<tonic::Response<R>, Status> {
        result
            .map(tonic::Response::new)
            .map_err(|err| self.finish_err(method, Some(caller), err))
    }

    fn finish_err(&self, method: &'static str, caller: Option<&Caller>, err: ApiError) -> Status {
        let status = Status::from(err);
        if matches!(
            status.code(),
            Code::Unauthenticated | Code::PermissionDenied | Code::ResourceExhausted
        ) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                method,
                caller_key_id = caller.map(|c| c.key_id.to_string()),
                caller_owner_id = caller.map(|c| c.owner_id.to_string()),
                remote = ?caller.and_then(|c| c.remote),
                code = ?status.code(),
                reason = status.message(),
                "admin call refused"
            );
        }
        status
    }
}

/// `NotFound` names the key id field; other store errors pass through.
fn key_not_found(err: StoreError) -> ApiError {
    match err {
        StoreError::NotFound => ApiError::NotFound {
            field: "id",
            what: "no key with this id",
        },
        other => ApiError::Store(other),
    }
}

fn owner_not_found(err: StoreError) -> ApiError {
    match err {
        StoreError::NotFound => ApiError::NotFound {
            field: "id",
            what: "no owner with this id",
        },
        other => ApiError::Store(other),
    }
}
