//! Reading the audit trail (events are written with each change, in its
//! transaction: see keys.rs and owners.rs).

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use sqlx::{Postgres, QueryBuilder, types::Json};
use uuid::Uuid;

use super::statements::prepared;
use super::{Store, StoreError};
use crate::key::{KeyId, OwnerId};

/// One event as stored.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub actor_key_id: Option<KeyId>,
    pub action: String,
    pub key_id: Option<KeyId>,
    pub owner_id: Option<String>,
    pub remote_addr: Option<IpAddr>,
    pub details: serde_json::Value,
}

/// Filters of `AuditService.List`; every one given must match.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub owner: Option<OwnerId>,
    pub key: Option<KeyId>,
    pub actor_key: Option<KeyId>,
    pub action: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Keyset cursor: only ids greater than this.
    pub after: Option<i64>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct AuditPage {
    pub events: Vec<AuditEvent>,
    pub next: Option<i64>,
}

pg_row! {
    struct AuditRow {
        id: i64,
        at: DateTime<Utc>,
        actor: String,
        actor_key_id: Option<Uuid>,
        action: String,
        key_id: Option<Uuid>,
        owner_id: Option<String>,
        remote_addr: Option<IpNet>,
        details: Json<serde_json::Value>,
    }
}

impl Store {
    /// Events matching every filter in `q`, oldest first. The statement
    /// names only the filters given, so each combination gets its own plan
    /// (an index range on (owner, id), (key, id) or (actor, id)) rather than
    /// one generic plan that scans.
    pub async fn list_audit(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        let mut sql = QueryBuilder::<Postgres>::new(
            "SELECT id, at, actor, actor_key_id, action, key_id, owner_id, remote_addr, details \
             FROM audit_events WHERE id > ",
        );
        sql.push_bind(q.after.unwrap_or(0));
        if let Some(owner) = &q.owner {
            sql.push(" AND owner_id = ")
                .push_bind(owner.as_str().to_owned());
        }
        if let Some(key) = q.key {
            sql.push(" AND key_id = ").push_bind(key.as_uuid());
        }
        if let Some(actor) = q.actor_key {
            sql.push(" AND actor_key_id = ").push_bind(actor.as_uuid());
        }
        if let Some(action) = &q.action {
            sql.push(" AND action = ").push_bind(action.clone());
        }
        if let Some(since) = q.since {
            sql.push(" AND at >= ").push_bind(since);
        }
        if let Some(until) = q.until {
            sql.push(" AND at < ").push_bind(until);
        }
        sql.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(q.limit) + 1);
        let rows: Vec<AuditRow> = self
            .bounded("list_audit", async {
                Ok(sql
                    .build_query_as()
                    .persistent(prepared())
                    .fetch_all(&self.pool)
                    .await?)
            })
            .await?;
        let mut events: Vec<AuditEvent> = rows
            .into_iter()
            .map(|r| AuditEvent {
                id: r.id,
                at: r.at,
                actor: r.actor,
                actor_key_id: r.actor_key_id.map(KeyId::from),
                action: r.action,
                key_id: r.key_id.map(KeyId::from),
                owner_id: r.owner_id,
                remote_addr: r.remote_addr.map(|n| n.addr()),
                details: r.details.0,
            })
            .collect();
        let next = if events.len() > q.limit as usize {
            events.truncate(q.limit as usize);
            events.last().map(|e| e.id)
        } else {
            None
        };
        Ok(AuditPage { events, next })
    }
}
