//! `keyward.v1.AuditService`: the audit trail, read back.

use tonic::{Request, Response, Status};

use super::{
    AdminApi, Caller,
    request::{decode_event_token, key_id, owner_id, page_size, text_field},
};
use crate::{
    api::{datetime, status::ApiError, timestamp},
    key::Invalid,
    pb,
    store::{AuditEvent, AuditQuery},
};

fn event_pb(e: &AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id.to_string(),
        at: Some(timestamp(e.at)),
        actor: e.actor.clone(),
        actor_key_id: e.actor_key_id.map(|k| k.to_string()).unwrap_or_default(),
        action: e.action.clone(),
        key_id: e.key_id.map(|k| k.to_string()).unwrap_or_default(),
        owner_id: e.owner_id.clone().unwrap_or_default(),
        remote_addr: e.remote_addr.map(|a| a.to_string()).unwrap_or_default(),
        details: match &e.details {
            serde_json::Value::Object(map) => Some(struct_pb(map)),
            _ => None,
        },
    }
}

fn struct_pb(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), value_pb(v))).collect(),
    }
}

fn value_pb(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(value_pb).collect(),
        }),
        serde_json::Value::Object(m) => Kind::StructValue(struct_pb(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for AdminApi {
    async fn list(
        &self,
        request: Request<pb::AuditServiceListRequest>,
    ) -> Result<Response<pb::AuditServiceListResponse>, Status> {
        let (caller, req) = self.begin("AuditService.List", request).await?;
        let result = self.list_events(&caller, req).await;
        self.finish("AuditService.List", &caller, result)
    }
}

impl AdminApi {
    async fn list_events(
        &self,
        caller: &Caller,
        req: pb::AuditServiceListRequest,
    ) -> Result<pb::AuditServiceListResponse, ApiError> {
        fn optional(s: &str) -> Option<&str> {
            Some(s).filter(|s| !s.is_empty())
        }
        let owner = optional(&req.owner_id)
            .map(|o| owner_id("owner_id", o))
            .transpose()?;
        let owner = match (caller.confined_to(), owner) {
            (None, owner) => owner,
            (Some(own), None) => Some(own.clone()),
            (Some(own), Some(asked)) if asked == *own => Some(asked),
            (Some(_), Some(_)) => {
                return Err(ApiError::PermissionDenied(
                    "owner_id: this management key may only read its own owner's events".into(),
                ));
            }
        };
        let time = |field: &'static str, ts: &Option<prost_types::Timestamp>| {
            ts.as_ref()
                .map(|ts| {
                    datetime(ts)
                        .ok_or_else(|| ApiError::invalid(field, Invalid::new("is out of range")))
                })
                .transpose()
        };
        let query = AuditQuery {
            owner,
            key: optional(&req.key_id)
                .map(|k| key_id("key_id", k))
                .transpose()?,
            actor_key: optional(&req.actor_key_id)
                .map(|k| key_id("actor_key_id", k))
                .transpose()?,
            action: optional(&req.action)
                .map(|a| text_field("action", a, 64))
                .transpose()?,
            since: time("since", &req.since)?,
            until: time("until", &req.until)?,
            after: decode_event_token(&req.page_token)?,
            limit: page_size(req.page_size)?,
        };
        let page = self.store.list_audit(&query).await?;
        Ok(pb::AuditServiceListResponse {
            events: page.events.iter().map(event_pb).collect(),
            next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
        })
    }
}
