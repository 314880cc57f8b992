//! `keyward.v1.CheckService`: the data plane for services that call keyward
//! directly.

use std::net::IpAddr;

use tonic::{Request, Response, Status};

use super::{
    duration, exact_duration, reason_pb,
    status::{ApiError, undecided_status},
};
use crate::{checker::Checker, key::Invalid, pb, policy};

#[derive(Debug, Clone)]
pub struct CheckApi {
    checker: Checker,
}

impl CheckApi {
    pub fn new(checker: Checker) -> Self {
        Self { checker }
    }
}

#[tonic::async_trait]
impl pb::check_service_server::CheckService for CheckApi {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        let client_ip = match req.client_ip.as_str() {
            "" => None,
            ip => Some(ip.parse::<IpAddr>().map_err(|_| {
                ApiError::invalid("client_ip", Invalid::new("is not an IP address"))
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
            .map_err(undecided_status)?;

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
        Ok(Response::new(resp))
    }
}
