//! `keyward.v1.CheckService`: the data plane for services that call keyward
//! directly.

use std::{net::IpAddr, time::Instant};

use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::{
    check_error, duration, exact_duration, reason_pb, record_outcome,
    status::{ApiError, undecided_status},
};
use crate::{
    checker::{Checker, Undecided},
    key::Invalid,
    metrics::Door,
    pb,
    policy::{self, Reason},
    telemetry,
};

#[derive(Debug, Clone)]
pub struct CheckApi {
    checker: Checker,
}

impl CheckApi {
    pub fn new(checker: Checker) -> Self {
        Self { checker }
    }

    async fn answer(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<(Reason, Response<pb::CheckResponse>), Answered> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        let client_ip = match req.client_ip.as_str() {
            "" => None,
            ip => Some(ip.parse::<IpAddr>().map_err(|_| {
                Answered::Invalid(
                    ApiError::invalid("client_ip", Invalid::new("is not an IP address")).into(),
                )
            })?),
        };
        let scopes: Vec<&str> = req.required_scopes.iter().map(String::as_str).collect();
        let policy_req = policy::Request {
            resource: Some(req.resource.as_str()).filter(|r| !r.is_empty()),
            required_scopes: &scopes,
            client_ip,
            cost: req.cost,
        };
        let outcome = self
            .checker
            .check(Some(&req.key), &policy_req, client_ip.or(peer))
            .await
            .map_err(Answered::Undecided)?;
        record_outcome(&outcome);

        let decision = &outcome.decision;
        let mut resp = pb::CheckResponse {
            allowed: decision.allowed(),
            reason: reason_pb(decision.reason).into(),
            http_status: decision.reason.http_status().into(),
            message: decision.message.to_string(),
            retry_after: decision.retry_after.map(duration),
            ..Default::default()
        };
        if let (Some(limits), Some(report)) = (outcome.declared_limits(), &outcome.limits) {
            resp.limits = limits
                .windows
                .iter()
                .zip(&report.windows)
                .map(|(w, state)| pb::LimitState {
                    name: w.name().to_owned(),
                    limit: w.limit(),
                    window: Some(exact_duration(w.window())),
                    remaining: state.remaining,
                    reset: Some(exact_duration(state.reset)),
                })
                .collect();
            resp.credits_remaining = report
                .credits_remaining
                .map(|c| i64::try_from(c).unwrap_or(i64::MAX));
        }
        if let Some(key) = outcome.key() {
            resp.key_id = key.id.to_string();
            resp.owner_id = key.owner_id.to_string();
            if resp.allowed {
                resp.scopes = key.scopes.iter().map(ToString::to_string).collect();
                resp.metadata = key
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
            }
        }
        Ok((outcome.decision.reason, Response::new(resp)))
    }
}

/// Why a check has no answer.
enum Answered {
    /// A malformed request: not a check, not counted.
    Invalid(Status),
    Undecided(Undecided),
}

#[tonic::async_trait]
impl pb::check_service_server::CheckService for CheckApi {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let doors = self.checker.doors();
        let started = doors.counting().then(Instant::now);
        let span = telemetry::check_span(
            Door::Check,
            request
                .metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
        let answered = if span.is_none() {
            self.answer(request).await
        } else {
            self.answer(request).instrument(span.clone()).await
        };
        let door = doors.counted(Door::Check).zip(started);
        match answered {
            Ok((reason, response)) => {
                if let Some((door, started)) = door {
                    door.answered(reason, started.elapsed());
                }
                Ok(response)
            }
            Err(Answered::Invalid(status)) => Err(status),
            Err(Answered::Undecided(err)) => {
                if let Some((door, started)) = door {
                    door.failed(check_error(&err), started.elapsed());
                }
                Err(undecided_status(err))
            }
        }
    }
}
