//! Owners: read-or-create on first Mint, and the admin plane's CRUD.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Postgres, QueryBuilder, types::Json};
use std::collections::BTreeMap;

use super::statements::prepared;
use super::{Store, StoreError, keys::Actor};
use crate::key::{Ceiling, Metadata, OwnerId, OwnerRecord, OwnerState, RateLimit, Resource, Scope};

/// Every column of `owners`: [`OwnerRow`].
macro_rules! owner_columns {
    () => {
        "id, active, display_name, state_reason, metadata, allowed_scopes, allowed_resources, \
         max_keys, created_at, updated_at, default_rate_limits"
    };
}
pub(super) use owner_columns;

pg_row! {
    pub(super) struct OwnerRow {
        id: String,
        active: bool,
        display_name: String,
        state_reason: String,
        metadata: Json<BTreeMap<String, String>>,
        allowed_scopes: Option<Vec<String>>,
        allowed_resources: Option<Vec<String>>,
        max_keys: Option<i32>,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        default_rate_limits: Option<Json<Vec<RateLimit>>>,
    }
}

fn corrupt(id: &str, what: &str) -> StoreError {
    StoreError::Corrupt(format!("owner {id}: {what}"))
}

fn parse_list<T>(
    id: &str,
    what: &str,
    values: &Option<Vec<String>>,
    parse: impl Fn(&str) -> Result<T, crate::key::Invalid>,
) -> Result<Option<Vec<T>>, StoreError> {
    values
        .as_ref()
        .map(|v| {
            v.iter()
                .map(|s| parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| corrupt(id, what))
        })
        .transpose()
}

impl TryFrom<OwnerRow> for OwnerRecord {
    type Error = StoreError;

    fn try_from(row: OwnerRow) -> Result<Self, Self::Error> {
        let scopes = parse_list(&row.id, "allowed_scopes", &row.allowed_scopes, Scope::parse)?;
        let resources = parse_list(
            &row.id,
            "allowed_resources",
            &row.allowed_resources,
            Resource::parse,
        )?;
        Ok(OwnerRecord {
            id: OwnerId::parse(&row.id).map_err(|_| corrupt(&row.id, "id"))?,
            display_name: row.display_name,
            state: if row.active {
                OwnerState::Active
            } else {
                OwnerState::Suspended
            },
            state_reason: row.state_reason,
            metadata: Metadata::from(row.metadata.0),
            ceiling: Ceiling { scopes, resources },
            max_keys: row.max_keys.and_then(|n| u32::try_from(n).ok()),
            default_rate_limits: row.default_rate_limits.map(|w| w.0),
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// A new owner, or the values of an update (`None`: left as it is).
#[derive(Debug, Clone, Default)]
pub struct OwnerChanges {
    pub display_name: Option<String>,
    pub state: Option<OwnerState>,
    pub state_reason: Option<String>,
    pub metadata: Option<Metadata>,
    /// `Some(None)`: no ceiling.
    pub allowed_scopes: Option<Option<Vec<Scope>>>,
    pub allowed_resources: Option<Option<Vec<Resource>>>,
    /// `Some(None)`: no quota.
    pub max_keys: Option<Option<u32>>,
    /// `Some(None)`: none.
    pub default_rate_limits: Option<Option<Vec<RateLimit>>>,
}

/// One page of owners.
#[derive(Debug, Clone)]
pub struct OwnerPage {
    pub owners: Vec<OwnerRecord>,
    pub next: Option<OwnerId>,
}

impl Store {
    /// The owner, created (active, no ceiling, no quota) if it does not
    /// exist yet: owners come into being with their first key.
    pub(super) async fn read_or_create_owner(
        &self,
        id: &OwnerId,
    ) -> Result<OwnerRecord, StoreError> {
        let mut conn = self.pool.acquire().await?;
        loop {
            let row: Option<OwnerRow> = sqlx::query_as(concat!(
                "WITH created AS ( \
                     INSERT INTO owners (id) VALUES ($1) ON CONFLICT (id) DO NOTHING RETURNING ",
                owner_columns!(),
                " ) SELECT * FROM created UNION ALL SELECT ",
                owner_columns!(),
                " FROM owners WHERE id = $1 LIMIT 1"
            ))
            .bind(id.as_str())
            .persistent(prepared())
            .fetch_optional(&mut *conn)
            .await?;
            // None only if another transaction created it after this one's
            // snapshot was taken: it exists now.
            if let Some(row) = row {
                self.commit_pooled(&mut conn).await?;
                return row.try_into();
            }
        }
    }

    /// Creates an owner; an existing id is a conflict.
    pub async fn create_owner(
        &self,
        id: &OwnerId,
        values: &OwnerChanges,
        actor: &Actor,
    ) -> Result<OwnerRecord, StoreError> {
        let scopes = values.allowed_scopes.clone().flatten().map(strings);
        let resources = values.allowed_resources.clone().flatten().map(strings);
        let query = sqlx::query_as(concat!(
            "WITH o AS ( \
                 INSERT INTO owners (id, display_name, metadata, allowed_scopes, allowed_resources, \
                                     max_keys, default_rate_limits) \
                 VALUES ($1, $2, $3, $4, $5, $6, $11) RETURNING * \
             ), audit AS ( \
                 INSERT INTO audit_events (actor, actor_key_id, action, owner_id, details, remote_addr) \
                 SELECT $7, $8, 'owner.create', o.id, $9, $10 FROM o \
             ) SELECT ",
            owner_columns!(),
            " FROM o"
        ))
        .bind(id.as_str())
        .bind(values.display_name.clone().unwrap_or_default())
        .bind(Json(
            values
                .metadata
                .clone()
                .unwrap_or_default()
                .into_map(),
        ))
        .bind(&scopes)
        .bind(&resources)
        .bind(values.max_keys.flatten().map(|n| i32::try_from(n).unwrap_or(i32::MAX)))
        .bind(actor.label())
        .bind(actor.key_uuid())
        .bind(Json(json!({
            "display_name": values.display_name,
            "allowed_scopes": scopes,
            "allowed_resources": resources,
            "max_keys": values.max_keys.flatten(),
            "default_rate_limits": values.default_rate_limits.clone().flatten(),
        })))
        .bind(actor.remote())
        .bind(values.default_rate_limits.clone().flatten().map(Json));
        let row: OwnerRow = self
            .bounded("create_owner", async {
                let mut conn = self.pool.acquire().await?;
                let row = query.persistent(prepared()).fetch_one(&mut *conn).await?;
                self.commit_pooled(&mut conn).await?;
                Ok(row)
            })
            .await?;
        row.try_into()
    }

    pub async fn get_owner(&self, id: &OwnerId) -> Result<OwnerRecord, StoreError> {
        let query = sqlx::query_as(concat!(
            "SELECT ",
            owner_columns!(),
            " FROM owners WHERE id = $1"
        ))
        .bind(id.as_str());
        let row: OwnerRow = self
            .bounded("get_owner", async {
                Ok(query.persistent(prepared()).fetch_one(&self.pool).await?)
            })
            .await?;
        row.try_into()
    }

    /// Keys the owner holds now (neither revoked nor expired).
    pub async fn owner_key_count(&self, id: &OwnerId) -> Result<u64, StoreError> {
        let query = sqlx::query_scalar(
            "SELECT count(*) FROM keys WHERE owner_id = $1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > now())",
        )
        .bind(id.as_str());
        let n: i64 = self
            .bounded("owner_key_count", async {
                Ok(query.persistent(prepared()).fetch_one(&self.pool).await?)
            })
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Applies `changes` with an audit event listing what changed. The
    /// owners trigger tells every replica, whose caches then re-read that
    /// owner's keys before using them again.
    pub async fn update_owner(
        &self,
        id: &OwnerId,
        changes: &OwnerChanges,
        actor: &Actor,
    ) -> Result<OwnerRecord, StoreError> {
        self.bounded("update_owner", async {
            let mut tx = self.begin().await?;
            let current: OwnerRow = sqlx::query_as(concat!(
                "SELECT ",
                owner_columns!(),
                " FROM owners WHERE id = $1 FOR UPDATE"
            ))
            .bind(id.as_str())
            .persistent(prepared())
            .fetch_one(&mut *tx)
            .await?;
            let current = OwnerRecord::try_from(current)?;
            let diff = diff(&current, changes);
            if diff.is_empty() {
                return Ok(current);
            }
            let mut update = QueryBuilder::<Postgres>::new("UPDATE owners SET ");
            let mut set = update.separated(", ");
            if let Some(v) = &changes.display_name {
                set.push("display_name = ").push_bind_unseparated(v);
            }
            if let Some(v) = changes.state {
                set.push("active = ").push_bind_unseparated(v == OwnerState::Active);
            }
            if let Some(v) = &changes.state_reason {
                set.push("state_reason = ").push_bind_unseparated(v);
            }
            if let Some(v) = &changes.metadata {
                set.push("metadata = ").push_bind_unseparated(Json(v.as_map().clone()));
            }
            if let Some(v) = &changes.allowed_scopes {
                set.push("allowed_scopes = ").push_bind_unseparated(v.clone().map(strings));
            }
            if let Some(v) = &changes.allowed_resources {
                set.push("allowed_resources = ")
                    .push_bind_unseparated(v.clone().map(strings));
            }
            if let Some(v) = changes.max_keys {
                set.push("max_keys = ")
                    .push_bind_unseparated(v.map(|n| i32::try_from(n).unwrap_or(i32::MAX)));
            }
            if let Some(v) = &changes.default_rate_limits {
                set.push("default_rate_limits = ")
                    .push_bind_unseparated(v.clone().map(Json));
            }
            update
                .push(" WHERE id = ")
                .push_bind(id.as_str())
                .push(concat!(" RETURNING ", owner_columns!()));
            let row: OwnerRow = update.build_query_as().persistent(prepared()).fetch_one(&mut *tx).await?;
            sqlx::query(
                "INSERT INTO audit_events (actor, actor_key_id, action, owner_id, details, remote_addr) \
                 VALUES ($1, $2, 'owner.update', $3, $4, $5)",
            )
            .bind(actor.label())
            .bind(actor.key_uuid())
            .bind(id.as_str())
            .bind(Json(serde_json::Value::Object(diff)))
            .bind(actor.remote())
            .persistent(prepared())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            row.try_into()
        })
        .await
    }

    /// One page of owners in id order, after the cursor.
    pub async fn list_owners(
        &self,
        after: Option<&OwnerId>,
        limit: u32,
    ) -> Result<OwnerPage, StoreError> {
        let query = sqlx::query_as(concat!(
            "SELECT ",
            owner_columns!(),
            " FROM owners WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after.map_or("", OwnerId::as_str))
        .bind(i64::from(limit) + 1);
        let rows: Vec<OwnerRow> = self
            .bounded("list_owners", async {
                Ok(query.persistent(prepared()).fetch_all(&self.pool).await?)
            })
            .await?;
        let mut owners = rows
            .into_iter()
            .map(OwnerRecord::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if owners.len() > limit as usize {
            owners.truncate(limit as usize);
            owners.last().map(|o| o.id.clone())
        } else {
            None
        };
        Ok(OwnerPage { owners, next })
    }
}

fn strings<T: std::fmt::Display>(values: Vec<T>) -> Vec<String> {
    values.iter().map(ToString::to_string).collect()
}

fn diff(
    current: &OwnerRecord,
    changes: &OwnerChanges,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let mut put = |field: &str, from: serde_json::Value, to: serde_json::Value| {
        if from != to {
            out.insert(field.to_owned(), json!({ "from": from, "to": to }));
        }
    };
    let state = |s: OwnerState| match s {
        OwnerState::Active => "ACTIVE",
        OwnerState::Suspended => "SUSPENDED",
    };
    if let Some(v) = &changes.display_name {
        put("display_name", json!(current.display_name), json!(v));
    }
    if let Some(v) = changes.state {
        put("state", json!(state(current.state)), json!(state(v)));
    }
    if let Some(v) = &changes.state_reason {
        put("state_reason", json!(current.state_reason), json!(v));
    }
    if let Some(v) = &changes.metadata {
        put(
            "metadata",
            json!(current.metadata.as_map()),
            json!(v.as_map()),
        );
    }
    if let Some(v) = &changes.allowed_scopes {
        put(
            "allowed_scopes",
            json!(current.ceiling.scopes.clone().map(strings)),
            json!(v.clone().map(strings)),
        );
    }
    if let Some(v) = &changes.allowed_resources {
        put(
            "allowed_resources",
            json!(current.ceiling.resources.clone().map(strings)),
            json!(v.clone().map(strings)),
        );
    }
    if let Some(v) = changes.max_keys {
        put("max_keys", json!(current.max_keys), json!(v));
    }
    if let Some(v) = &changes.default_rate_limits {
        put(
            "default_rate_limits",
            json!(current.default_rate_limits),
            json!(v),
        );
    }
    out
}
