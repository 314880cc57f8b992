use std::{collections::BTreeMap, sync::atomic::Ordering};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde_json::json;
use sqlx::{PgConnection, Postgres, postgres::PgArguments, query::QueryAs, types::Json};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::key::{
    Grant, KeyHash, KeyId, KeyRecord, Metadata, Network, NewKey, OwnerId, Resource, Scope,
};

/// The columns a check needs: [`GrantRow`].
macro_rules! grant_columns {
    () => {
        "id, owner_id, scopes, resources, ip_allow, metadata, expires_at, disabled_at, revoked_at"
    };
}

/// Every column but the usage counters: [`KeyRow`].
macro_rules! key_columns {
    () => {
        concat!(
            grant_columns!(),
            ", hash, prefix, start, name, description, created_at, revoked_reason, last_used_at"
        )
    };
}

/// Who made an admin change, as the audit trail records it.
#[derive(Debug, Clone)]
pub struct Actor {
    key_id: Option<KeyId>,
    label: String,
}

impl Actor {
    /// A change made through the API with a management key.
    pub fn key(id: KeyId) -> Self {
        Self {
            key_id: Some(id),
            label: format!("key:{id}"),
        }
    }

    /// A change made with direct database access (`keyward bootstrap`).
    pub fn bootstrap() -> Self {
        Self {
            key_id: None,
            label: "bootstrap".to_owned(),
        }
    }
}

/// What changed while a replica was not listening.
#[derive(Debug, Clone, Default)]
pub struct Changed {
    pub keys: Vec<KeyHash>,
}

/// One page of `List`.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Only this owner's keys.
    pub owner: Option<OwnerId>,
    pub include_revoked: bool,
    /// Keyset cursor: only ids greater than this.
    pub after: Option<KeyId>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub keys: Vec<KeyRecord>,
    /// The cursor for the next page; `None` on the last page.
    pub next: Option<KeyId>,
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    #[sqlx(flatten)]
    grant: GrantRow,
    hash: Vec<u8>,
    prefix: String,
    start: String,
    name: String,
    description: String,
    created_at: DateTime<Utc>,
    revoked_reason: Option<String>,
    last_used_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct GrantRow {
    id: Uuid,
    owner_id: String,
    scopes: Vec<String>,
    resources: Vec<String>,
    ip_allow: Vec<IpNet>,
    metadata: Json<BTreeMap<String, String>>,
    expires_at: Option<DateTime<Utc>>,
    disabled_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

fn corrupt(id: impl std::fmt::Display, what: &str) -> StoreError {
    StoreError::Corrupt(format!("key {id}: {what}"))
}

/// Parses stored text back into the newtypes it was validated into.
fn parse_all<T>(
    id: Uuid,
    what: &str,
    values: &[String],
    parse: impl Fn(&str) -> Result<T, crate::key::Invalid>,
) -> Result<Box<[T]>, StoreError> {
    values
        .iter()
        .map(|v| parse(v))
        .collect::<Result<_, _>>()
        .map_err(|_| corrupt(id, what))
}

impl TryFrom<GrantRow> for Grant {
    type Error = StoreError;

    fn try_from(row: GrantRow) -> Result<Self, Self::Error> {
        Ok(Grant {
            id: row.id.into(),
            owner_id: OwnerId::parse(&row.owner_id).map_err(|_| corrupt(row.id, "owner_id"))?,
            scopes: parse_all(row.id, "scopes", &row.scopes, Scope::parse)?,
            resources: parse_all(row.id, "resources", &row.resources, Resource::parse)?,
            ip_allow: row.ip_allow.into_iter().map(Network::from).collect(),
            metadata: Metadata::from(row.metadata.0),
            expires_at: row.expires_at,
            disabled_at: row.disabled_at,
            revoked_at: row.revoked_at,
        })
    }
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, Self::Error> {
        let grant = Grant::try_from(row.grant)?;
        let hash =
            KeyHash::from_slice(&row.hash).ok_or_else(|| corrupt(grant.id, "hash length"))?;
        Ok(KeyRecord {
            id: grant.id,
            hash,
            prefix: row.prefix,
            start: row.start,
            owner_id: grant.owner_id,
            name: row.name,
            description: row.description,
            scopes: grant.scopes.into_vec(),
            resources: grant.resources.into_vec(),
            ip_allow: grant.ip_allow.into_vec(),
            metadata: grant.metadata,
            created_at: row.created_at,
            expires_at: grant.expires_at,
            disabled_at: grant.disabled_at,
            revoked_at: grant.revoked_at,
            revoked_reason: row.revoked_reason,
            last_used_at: row.last_used_at,
        })
    }
}

impl Store {
    /// Stores a new key (creating its owner on first use) with its audit
    /// event: one statement, hence one transaction and one round trip.
    pub async fn insert_key(&self, new: &NewKey, actor: &Actor) -> Result<KeyRecord, StoreError> {
        let scopes: Vec<&str> = new.scopes.iter().map(Scope::as_str).collect();
        let resources: Vec<&str> = new.resources.iter().map(Resource::as_str).collect();
        let details = json!({
            "name": new.name,
            "prefix": new.prefix,
            "start": new.start,
            "scopes": scopes,
            "resources": resources,
            "expires_at": new.expires_at.map(|at| at.to_rfc3339()),
        });
        let row = sqlx::query_as(concat!(
            "WITH owner AS ( \
                 INSERT INTO owners (id) VALUES ($5) ON CONFLICT (id) DO NOTHING \
             ), k AS ( \
                 INSERT INTO keys (id, hash, prefix, start, owner_id, name, description, \
                                   scopes, resources, ip_allow, metadata, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::cidr[], $11, $12) \
                 RETURNING * \
             ), audit AS ( \
                 INSERT INTO audit_events (actor, actor_key_id, action, key_id, owner_id, details) \
                 SELECT $13, $14, 'key.mint', k.id, k.owner_id, $15 FROM k \
             ) \
             SELECT ",
            key_columns!(),
            " FROM k"
        ))
        .bind(new.id.as_uuid())
        .bind(new.hash.as_bytes().as_slice())
        .bind(&new.prefix)
        .bind(&new.start)
        .bind(new.owner_id.as_str())
        .bind(&new.name)
        .bind(&new.description)
        .bind(&scopes)
        .bind(&resources)
        .bind(
            new.ip_allow
                .iter()
                .map(Network::as_ipnet)
                .collect::<Vec<_>>(),
        )
        .bind(Json(new.metadata.as_map()))
        .bind(new.expires_at)
        .bind(&actor.label)
        .bind(actor.key_id.map(|id| id.as_uuid()))
        .bind(Json(details));
        let row: KeyRow = self
            .bounded(async { Ok(row.fetch_one(&self.pool).await?) })
            .await?;
        row.try_into()
    }

    /// The hot path's one query on a cache miss: only what a check needs.
    /// On the check pool, within the lookup deadline.
    pub async fn find_grant(&self, hash: &KeyHash) -> Result<Option<Grant>, StoreError> {
        self.stats.key_lookups.fetch_add(1, Ordering::Relaxed);
        let lookup = async {
            let row: Option<GrantRow> = sqlx::query_as(concat!(
                "SELECT ",
                grant_columns!(),
                " FROM keys WHERE hash = $1"
            ))
            .bind(hash.as_bytes().as_slice())
            .fetch_optional(&self.checks)
            .await?;
            row.map(Grant::try_from).transpose()
        };
        super::within(self.lookup_timeout, lookup).await
    }

    /// The first 8 bytes of every stored key's hash, streamed (for the
    /// membership filter), and how many rows the planner expects.
    pub async fn key_hash_prefixes(&self, mut each: impl FnMut(u64)) -> Result<u64, StoreError> {
        use tokio_stream::StreamExt as _;
        let mut conn = self.pool.acquire().await?;
        let mut rows =
            sqlx::query_scalar::<_, Vec<u8>>("SELECT substring(hash FROM 1 FOR 8) FROM keys")
                .fetch(&mut *conn);
        let mut n = 0;
        while let Some(prefix) = rows.next().await {
            let prefix = prefix?;
            let bytes: [u8; 8] = prefix
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("key hash shorter than 8 bytes".into()))?;
            each(u64::from_le_bytes(bytes));
            n += 1;
        }
        Ok(n)
    }

    /// The planner's estimate of the number of keys (cheap: no scan);
    /// 0 when the table was never analysed.
    pub async fn estimated_key_count(&self) -> Result<u64, StoreError> {
        self.bounded(async {
            let n: f32 = sqlx::query_scalar(
                "SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = 'keys'::regclass",
            )
            .fetch_one(&self.pool)
            .await?;
            Ok(n as u64)
        })
        .await
    }

    /// Keys changed or deleted at or after `since` (database clock), for a
    /// replica catching up after its listener was away. Keys merely created
    /// since (`changed_at` is their creation time) are left out: an entry
    /// filled from the new row cannot be stale, and unknown hashes are
    /// forgotten wholesale by the caller.
    pub async fn changed_since(&self, since: DateTime<Utc>) -> Result<Changed, StoreError> {
        self.bounded(async {
            let hashes: Vec<Vec<u8>> = sqlx::query_scalar(
                "SELECT hash FROM keys WHERE changed_at >= $1 AND changed_at > created_at \
                 UNION ALL SELECT hash FROM key_tombstones WHERE deleted_at >= $1",
            )
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
            let keys = hashes
                .iter()
                .map(|h| KeyHash::from_slice(h).ok_or_else(|| corrupt("?", "hash length")))
                .collect::<Result<_, _>>()?;
            Ok(Changed { keys })
        })
        .await
    }

    /// A key by id; with `owner`, only if it belongs to that owner.
    pub async fn get_key(
        &self,
        id: KeyId,
        owner: Option<&OwnerId>,
    ) -> Result<KeyRecord, StoreError> {
        let query = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            " FROM keys WHERE id = $1 AND ($2::text IS NULL OR owner_id = $2)"
        ))
        .bind(id.as_uuid())
        .bind(owner.map(OwnerId::as_str));
        let row: KeyRow = self
            .bounded(async { Ok(query.fetch_one(&self.pool).await?) })
            .await?;
        row.try_into()
    }

    /// Revokes a key. Revoking a revoked key changes nothing and writes no
    /// audit event; it returns the key as it is.
    pub async fn revoke_key(
        &self,
        id: KeyId,
        reason: Option<&str>,
        owner: Option<&OwnerId>,
        actor: &Actor,
    ) -> Result<KeyRecord, StoreError> {
        let update = sqlx::query_as(concat!(
            "UPDATE keys SET revoked_at = now(), revoked_reason = $2 WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id.as_uuid())
        .bind(reason);
        self.change_key(
            id,
            owner,
            |current| current.revoked_at.is_some(),
            update,
            (actor, "key.revoke", json!({ "reason": reason })),
        )
        .await
    }

    /// Disables or re-enables a key. A no-op change writes no audit event.
    pub async fn set_key_disabled(
        &self,
        id: KeyId,
        disabled: bool,
        owner: Option<&OwnerId>,
        actor: &Actor,
    ) -> Result<KeyRecord, StoreError> {
        let update = sqlx::query_as(concat!(
            "UPDATE keys SET disabled_at = CASE WHEN $2 THEN now() END WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id.as_uuid())
        .bind(disabled);
        let action = if disabled {
            "key.disable"
        } else {
            "key.enable"
        };
        self.change_key(
            id,
            owner,
            |current| current.disabled_at.is_some() == disabled,
            update,
            (actor, action, json!({})),
        )
        .await
    }

    /// One change to a key's state, in one transaction: lock the row, stop
    /// there if `unchanged` says the key already is as asked, else run
    /// `update` and write its audit event.
    async fn change_key<'q>(
        &self,
        id: KeyId,
        owner: Option<&OwnerId>,
        unchanged: impl FnOnce(&KeyRecord) -> bool,
        update: QueryAs<'q, Postgres, KeyRow, PgArguments>,
        (actor, action, details): (&Actor, &str, serde_json::Value),
    ) -> Result<KeyRecord, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let current = lock_key(&mut tx, id, owner).await?;
            if unchanged(&current) {
                return Ok(current);
            }
            let record = KeyRecord::try_from(update.fetch_one(&mut *tx).await?)?;
            audit(&mut tx, actor, action, &record, details).await?;
            tx.commit().await?;
            Ok(record)
        })
        .await
    }

    /// One page of keys in id (creation) order, after the cursor.
    ///
    /// Two fixed statements rather than one with optional filters: a generic
    /// plan for `($1 IS NULL OR owner_id = $1) AND ($2 IS NULL OR id > $2)`
    /// cannot use an index range, and Postgres switches prepared statements
    /// to generic plans after a few runs. Each of these is a plain range scan
    /// of an index in order, however deep the page.
    pub async fn list_keys(&self, q: &ListQuery) -> Result<Page, StoreError> {
        // One extra row tells whether another page follows.
        let limit = i64::from(q.limit) + 1;
        let after = q.after.map_or(Uuid::nil(), |id| id.as_uuid());
        let rows: Vec<KeyRow> = self
            .bounded(async {
                Ok(match &q.owner {
                    Some(owner) => {
                        sqlx::query_as(concat!(
                            "SELECT ",
                            key_columns!(),
                            " FROM keys \
                      WHERE owner_id = $1 AND id > $2 AND ($3 OR revoked_at IS NULL) \
                      ORDER BY owner_id, id LIMIT $4"
                        ))
                        .bind(owner.as_str())
                        .bind(after)
                        .bind(q.include_revoked)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await?
                    }
                    None => {
                        sqlx::query_as(concat!(
                            "SELECT ",
                            key_columns!(),
                            " FROM keys \
                      WHERE id > $1 AND ($2 OR revoked_at IS NULL) \
                      ORDER BY id LIMIT $3"
                        ))
                        .bind(after)
                        .bind(q.include_revoked)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await?
                    }
                })
            })
            .await?;
        let mut keys = rows
            .into_iter()
            .map(KeyRecord::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if keys.len() > q.limit as usize {
            keys.truncate(q.limit as usize);
            keys.last().map(|k| k.id)
        } else {
            None
        };
        Ok(Page { keys, next })
    }
}

async fn lock_key(
    conn: &mut PgConnection,
    id: KeyId,
    owner: Option<&OwnerId>,
) -> Result<KeyRecord, StoreError> {
    let row: KeyRow = sqlx::query_as(concat!(
        "SELECT ",
        key_columns!(),
        " FROM keys WHERE id = $1 AND ($2::text IS NULL OR owner_id = $2) FOR UPDATE"
    ))
    .bind(id.as_uuid())
    .bind(owner.map(OwnerId::as_str))
    .fetch_one(&mut *conn)
    .await?;
    row.try_into()
}

async fn audit(
    conn: &mut PgConnection,
    actor: &Actor,
    action: &str,
    key: &KeyRecord,
    details: serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (actor, actor_key_id, action, key_id, owner_id, details) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&actor.label)
    .bind(actor.key_id.map(|id| id.as_uuid()))
    .bind(action)
    .bind(key.id.as_uuid())
    .bind(key.owner_id.as_str())
    .bind(Json(details))
    .execute(conn)
    .await?;
    Ok(())
}
