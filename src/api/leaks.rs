//! `keyward.v1.LeakService`: whoever finds a leaked key reports it, with no
//! management key, and it is revoked with reason `LEAKED`.
//!
//! The answer is the same, and as fast, for a real key and a made-up one:
//! the revocation runs after the answer, so neither its result nor its
//! timing tells the reporter whether the key exists. Each address may report
//! a few keys a minute (past that, `RESOURCE_EXHAUSTED` whatever the key).

use std::{net::IpAddr, time::Instant};

use tonic::{Request, Response, Status};

use crate::{
    api::status::ApiError,
    checker::{Checker, credential_hash},
    key::Invalid,
    pb,
    store::{Actor, Store},
    throttle::{Source, SourceThrottle, ThrottleSettings},
};

const SOURCE_MAX: usize = 1000;

#[derive(Debug, Clone)]
pub struct LeakApi {
    checker: Checker,
    store: Store,
    throttle: SourceThrottle,
}

impl LeakApi {
    /// `reports_per_window`: reports one address may make per `window`.
    pub fn new(checker: Checker, store: Store, throttle: ThrottleSettings) -> Self {
        Self {
            checker,
            store,
            throttle: SourceThrottle::new(throttle),
        }
    }

    /// Revokes the reported key if it exists and is not revoked yet.
    async fn revoke_reported(
        store: Store,
        checker: Checker,
        secret: String,
        found_at: String,
        remote: Option<IpAddr>,
    ) {
        let Ok(hash) = credential_hash(Some(&secret)) else {
            return;
        };
        drop(secret);
        let key = match store.key_by_hash(&hash).await {
            Ok(Some(key)) if key.revoked_at.is_none() => key,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(error = %crate::telemetry::chain(&err), "cannot look up a reported key");
                return;
            }
        };
        let allow_all = |_: &crate::key::KeyRecord| Ok(());
        match store
            .revoke_leaked(key.id, &found_at, &allow_all, &Actor::leak_report(remote))
            .await
        {
            Ok(record) => {
                checker.revoked(&record);
                tracing::warn!(
                    key_id = %record.id,
                    owner_id = %record.owner_id,
                    reporter = ?remote,
                    "leaked key reported and revoked"
                );
            }
            Err(err) => {
                tracing::warn!(key_id = %key.id, error = %crate::telemetry::chain(&err), "cannot revoke a reported key");
            }
        }
    }
}

#[tonic::async_trait]
impl pb::leak_service_server::LeakService for LeakApi {
    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let remote = request.remote_addr().map(|a| a.ip());
        let source = remote.map(Source::from);
        let now = Instant::now();
        if self.throttle.blocked(source, now).is_some() || self.throttle.failed(source, now) {
            return Err(Status::resource_exhausted(
                "too many leak reports from this address; retry later",
            ));
        }
        let req = request.into_inner();
        if req.secret.trim().is_empty() {
            return Err(ApiError::invalid("secret", Invalid::new("is required")).into());
        }
        if req.source.chars().count() > SOURCE_MAX {
            return Err(ApiError::invalid(
                "source",
                Invalid::new(format!("must be at most {SOURCE_MAX} characters")),
            )
            .into());
        }
        tokio::spawn(Self::revoke_reported(
            self.store.clone(),
            self.checker.clone(),
            req.secret,
            req.source,
            remote,
        ));
        Ok(Response::new(pb::ReportResponse {}))
    }
}
