use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde_json::json;
use sqlx::{PgConnection, Postgres, QueryBuilder, types::Json};
use uuid::Uuid;

use super::statements::prepared;
use super::{Refusal, Store, StoreError, owners::OwnerRow};
use crate::key::{
    Credits, Grant, KeyHash, KeyId, KeyRecord, Limits, Metadata, Network, NewKey, OwnerId,
    OwnerRecord, OwnerState, RateLimit, RefillInterval, Resource, Scope,
};

/// The columns a check needs: [`GrantRow`]. The keys table is always `k`.
macro_rules! grant_columns {
    () => {
        "k.id, k.owner_id, k.scopes, k.resources, k.ip_allow, k.metadata, k.expires_at, \
         k.disabled_at, k.revoked_at, k.canary, \
         (SELECT o.active FROM owners o WHERE o.id = k.owner_id) AS owner_active, \
         COALESCE(k.bucket_id, k.id) AS bucket_id, k.rate_limits, k.has_credits, \
         (SELECT o.default_rate_limits FROM owners o WHERE o.id = k.owner_id) AS owner_rate_limits"
    };
}

/// An audit event's columns, in the order `audit_key` binds them.
macro_rules! audit_columns {
    () => {
        "(actor, actor_key_id, action, key_id, owner_id, details, remote_addr)"
    };
}

/// Every column but the usage counters: [`KeyRow`].
macro_rules! key_columns {
    () => {
        concat!(
            grant_columns!(),
            ", k.hash, k.prefix, k.start, k.name, k.description, k.created_at, \
             k.revoked_reason, k.last_used_at, k.rotated_from, k.replaced_by, k.disabled_by_admin, \
             (SELECT c.remaining FROM credits c WHERE c.bucket_id = COALESCE(k.bucket_id, k.id)) \
                 AS credits_remaining, \
             (SELECT c.refill_interval FROM credits c WHERE c.bucket_id = COALESCE(k.bucket_id, k.id)) \
                 AS credits_refill_interval, \
             (SELECT c.refill_amount FROM credits c WHERE c.bucket_id = COALESCE(k.bucket_id, k.id)) \
                 AS credits_refill_amount"
        )
    };
}

/// The reason a reported leak is revoked with.
pub const LEAKED: &str = "LEAKED";

/// Who made an admin change, and from where, as the audit trail records it.
#[derive(Debug, Clone)]
pub struct Actor {
    key_id: Option<KeyId>,
    label: String,
    remote: Option<IpAddr>,
}

impl Actor {
    /// A change made through the API with a management key.
    pub fn key(id: KeyId, remote: Option<IpAddr>) -> Self {
        Self {
            key_id: Some(id),
            label: format!("key:{id}"),
            remote,
        }
    }

    /// A change made with direct database access (`keyward bootstrap`).
    pub fn bootstrap() -> Self {
        Self {
            key_id: None,
            label: "bootstrap".to_owned(),
            remote: None,
        }
    }

    /// A leaked key reported from `remote` (LeakService, no management key).
    pub fn leak_report(remote: Option<IpAddr>) -> Self {
        Self {
            key_id: None,
            label: "leak-report".to_owned(),
            remote,
        }
    }

    /// A canary key presented from `remote`.
    pub fn presenter(remote: Option<IpAddr>) -> Self {
        Self {
            key_id: None,
            label: "presenter".to_owned(),
            remote,
        }
    }

    pub(super) fn label(&self) -> &str {
        &self.label
    }

    pub(super) fn key_uuid(&self) -> Option<Uuid> {
        self.key_id.map(|id| id.as_uuid())
    }

    pub(super) fn remote(&self) -> Option<IpNet> {
        self.remote.map(IpNet::from)
    }
}

/// What changed while a replica was not listening.
#[derive(Debug, Clone, Default)]
pub struct Changed {
    pub keys: Vec<KeyHash>,
    pub owners: Vec<OwnerId>,
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

/// The fields `UpdateKey` may set; `None`: left as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub metadata: Option<Metadata>,
    pub scopes: Option<Vec<Scope>>,
    pub resources: Option<Vec<Resource>>,
    pub ip_allow: Option<Vec<Network>>,
    /// `Some(None)`: no expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// `Some(None)`: the owner's default.
    pub rate_limits: Option<Option<Vec<RateLimit>>>,
    /// Sets the bucket's credits; `Some(None)`: no credits.
    pub credits: Option<Option<Credits>>,
    /// Adds to the bucket's credits (never below zero).
    pub add_credits: Option<i64>,
}

/// What a rotation produced.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub old: KeyRecord,
    pub new: KeyRecord,
}

pg_row! {
    struct KeyRow {
        #[flatten] grant: GrantRow,
        hash: Vec<u8>,
        prefix: String,
        start: String,
        name: String,
        description: String,
        created_at: DateTime<Utc>,
        revoked_reason: Option<String>,
        last_used_at: Option<DateTime<Utc>>,
        rotated_from: Option<Uuid>,
        replaced_by: Option<Uuid>,
        disabled_by_admin: bool,
        credits_remaining: Option<i64>,
        credits_refill_interval: Option<String>,
        credits_refill_amount: Option<i64>,
    }
}

pg_row! {
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
        canary: bool,
        owner_active: Option<bool>,
        bucket_id: Uuid,
        rate_limits: Option<Json<Vec<RateLimit>>>,
        has_credits: bool,
        owner_rate_limits: Option<Json<Vec<RateLimit>>>,
    }
}

impl GrantRow {
    fn limits(&self) -> Option<Arc<Limits>> {
        let windows = self
            .rate_limits
            .as_ref()
            .or(self.owner_rate_limits.as_ref())
            .map(|w| w.0.clone())
            .unwrap_or_default();
        Limits::new(self.bucket_id.into(), windows, self.has_credits).map(Arc::new)
    }
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
        let limits = row.limits();
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
            // The foreign key guarantees the owner exists.
            owner_active: row.owner_active.ok_or_else(|| corrupt(row.id, "owner"))?,
            canary: row.canary,
            limits,
        })
    }
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, Self::Error> {
        let bucket_id = KeyId::from(row.grant.bucket_id);
        let rate_limits = row.grant.rate_limits.as_ref().map(|w| w.0.clone());
        let owner_rate_limits = row.grant.owner_rate_limits.as_ref().map(|w| w.0.clone());
        let credits = match row.credits_remaining {
            None => None,
            Some(remaining) => Some(Credits {
                remaining: u64::try_from(remaining).unwrap_or(0),
                refill: match (&row.credits_refill_interval, row.credits_refill_amount) {
                    (Some(interval), Some(amount)) => Some((
                        RefillInterval::parse(interval)
                            .ok_or_else(|| corrupt(row.grant.id, "refill interval"))?,
                        u64::try_from(amount).unwrap_or(0),
                    )),
                    _ => None,
                },
            }),
        };
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
            canary: grant.canary,
            rotated_from: row.rotated_from.map(KeyId::from),
            replaced_by: row.replaced_by.map(KeyId::from),
            disabled_by_admin: row.disabled_by_admin,
            owner_state: if grant.owner_active {
                OwnerState::Active
            } else {
                OwnerState::Suspended
            },
            bucket_id,
            rate_limits,
            owner_rate_limits,
            credits,
        })
    }
}

/// Rules a change must pass on the row as locked: `Err` refuses it.
pub type Guard<'a> = &'a (dyn Fn(&KeyRecord) -> Result<(), Refusal> + Sync);

impl Store {
    /// Stores a new key with its audit event, creating its owner on first
    /// use. `check_owner` sees the owner (its state and ceiling) and may
    /// refuse. The owner's quota, if it has one, is enforced under a lock on
    /// the owner's row; otherwise the insert is one statement, which fails
    /// (and is retried once) if the owner changed after it was read.
    pub async fn insert_key(
        &self,
        new: &NewKey,
        actor: &Actor,
        check_owner: impl Fn(&OwnerRecord) -> Result<(), StoreError>,
    ) -> Result<KeyRecord, StoreError> {
        self.bounded("insert_key", async {
            for _ in 0..2 {
                let owner = self.read_or_create_owner(&new.spec().owner_id).await?;
                check_owner(&owner)?;
                let inserted = match owner.max_keys {
                    None => {
                        let mut conn = self.pool.acquire().await?;
                        let row = insert_key_row(&mut conn, new, actor, owner.updated_at).await?;
                        self.commit_pooled(&mut conn).await?;
                        row
                    }
                    Some(max) => {
                        let mut tx = self.begin().await?;
                        let locked: Option<DateTime<Utc>> = sqlx::query_scalar(
                            "SELECT updated_at FROM owners WHERE id = $1 FOR UPDATE",
                        )
                        .bind(owner.id.as_str())
                        .persistent(prepared())
                        .fetch_optional(&mut *tx)
                        .await?;
                        if locked != Some(owner.updated_at) {
                            continue;
                        }
                        let held = count_live_keys(&mut tx, &owner.id).await?;
                        if held >= u64::from(max) {
                            return Err(Refusal::QuotaExceeded(format!(
                                "owner_id: the owner holds {held} keys, its quota (max_keys {max}); revoke one first"
                            ))
                            .into());
                        }
                        let row = insert_key_row(&mut tx, new, actor, owner.updated_at).await?;
                        tx.commit().await?;
                        row
                    }
                };
                if let Some(row) = inserted {
                    return KeyRecord::try_from(row);
                }
            }
            Err(Refusal::FailedPrecondition(
                "owner_id: the owner changed while the key was minted; retry".to_owned(),
            )
            .into())
        })
        .await
    }

    /// The hot path's one query on a cache miss: only what a check needs.
    /// On the check pool, within the lookup deadline.
    pub async fn find_grant(&self, hash: &KeyHash) -> Result<Option<Grant>, StoreError> {
        self.stats.key_lookups.fetch_add(1, Ordering::Relaxed);
        let lookup = async {
            let mut conn = {
                let _waiting = self.stats.waiting_for_check_connection();
                self.check_connection().await?
            };
            let row: Option<GrantRow> = sqlx::query_as(concat!(
                "SELECT ",
                grant_columns!(),
                " FROM keys k WHERE k.hash = $1"
            ))
            .bind(hash.as_bytes().as_slice())
            .persistent(prepared())
            .fetch_optional(&mut *conn)
            .await?;
            row.map(Grant::try_from).transpose()
        };
        super::within(self.lookup_timeout, lookup).await
    }

    /// A key by hash, read on the admin pool whatever any cache says: how
    /// management keys are re-checked on every admin call, and leaks found.
    pub async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        self.stats.admin_lookups.fetch_add(1, Ordering::Relaxed);
        let query = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            " FROM keys k WHERE k.hash = $1"
        ))
        .bind(hash.as_bytes().as_slice());
        let row: Option<KeyRow> = self
            .bounded("key_by_hash", async {
                Ok(query
                    .persistent(prepared())
                    .fetch_optional(&self.pool)
                    .await?)
            })
            .await?;
        row.map(KeyRecord::try_from).transpose()
    }

    /// The first 8 bytes of every stored key's hash, streamed (for the
    /// membership filter); returns how many there were.
    pub async fn key_hash_prefixes(&self, mut each: impl FnMut(u64)) -> Result<u64, StoreError> {
        use tokio_stream::StreamExt as _;
        let mut conn = self.pool.acquire().await?;
        let mut rows =
            sqlx::query_scalar::<_, Vec<u8>>("SELECT substring(hash FROM 1 FOR 8) FROM keys")
                .persistent(prepared())
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
        self.bounded("estimated_key_count", async {
            let n: f32 = sqlx::query_scalar(
                "SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = 'keys'::regclass",
            )
            .persistent(prepared())
            .fetch_one(&self.pool)
            .await?;
            Ok(n as u64)
        })
        .await
    }

    /// Keys changed or deleted, and owners changed, at or after `since`
    /// (database clock), for a replica catching up after its listener was
    /// away. Keys merely created since (`changed_at` is their creation time)
    /// are left out: an entry filled from the new row cannot be stale, and
    /// unknown hashes are forgotten wholesale by the caller.
    pub async fn changed_since(&self, since: DateTime<Utc>) -> Result<Changed, StoreError> {
        self.bounded("changed_since", async {
            let hashes: Vec<Vec<u8>> = sqlx::query_scalar(
                "SELECT hash FROM keys WHERE changed_at >= $1 AND changed_at > created_at \
                 UNION ALL SELECT hash FROM key_tombstones WHERE deleted_at >= $1",
            )
            .bind(since)
            .persistent(prepared())
            .fetch_all(&self.pool)
            .await?;
            let owners: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM owners WHERE updated_at >= $1 AND updated_at > created_at",
            )
            .bind(since)
            .persistent(prepared())
            .fetch_all(&self.pool)
            .await?;
            let keys = hashes
                .iter()
                .map(|h| KeyHash::from_slice(h).ok_or_else(|| corrupt("?", "hash length")))
                .collect::<Result<_, _>>()?;
            let owners = owners
                .iter()
                .map(|o| OwnerId::parse(o).map_err(|_| corrupt("?", "owner id")))
                .collect::<Result<_, _>>()?;
            Ok(Changed { keys, owners })
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
            " FROM keys k WHERE k.id = $1 AND ($2::text IS NULL OR k.owner_id = $2)"
        ))
        .bind(id.as_uuid())
        .bind(owner.map(OwnerId::as_str));
        let row: KeyRow = self
            .bounded("get_key", async {
                Ok(query.persistent(prepared()).fetch_one(&self.pool).await?)
            })
            .await?;
        row.try_into()
    }

    /// Revokes a key. Revoking a revoked key changes nothing and writes no
    /// audit event; it returns the key as it is. The last active
    /// `keyward:admin` key cannot be revoked.
    pub async fn revoke_key(
        &self,
        id: KeyId,
        reason: Option<&str>,
        owner: Option<&OwnerId>,
        guard: Guard<'_>,
        actor: &Actor,
    ) -> Result<KeyRecord, StoreError> {
        self.revoke(
            id,
            reason,
            json!({ "reason": reason }),
            owner,
            guard,
            true,
            actor,
        )
        .await
    }

    /// Revokes a reported leak with reason `LEAKED`, recording where it was
    /// found. A leaked key goes even if it is the last admin key: `keyward
    /// bootstrap` is the way back in, and a leaked admin key must not work.
    pub async fn revoke_leaked(
        &self,
        id: KeyId,
        found_at: &str,
        guard: Guard<'_>,
        actor: &Actor,
    ) -> Result<KeyRecord, StoreError> {
        let details = json!({ "reason": LEAKED, "found_at": found_at });
        self.revoke(id, Some(LEAKED), details, None, guard, false, actor)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn revoke(
        &self,
        id: KeyId,
        reason: Option<&str>,
        details: serde_json::Value,
        owner: Option<&OwnerId>,
        guard: Guard<'_>,
        keep_admin: bool,
        actor: &Actor,
    ) -> Result<KeyRecord, StoreError> {
        self.bounded("revoke", async {
            let unlocked = self
                .revoke_as_read(id, reason, &details, owner, guard, keep_admin, actor)
                .await?;
            if let Some(record) = unlocked {
                return Ok(record);
            }
            let mut tx = self.begin().await?;
            let current = lock_key(&mut tx, id, owner).await?;
            if current.revoked_at.is_some() {
                return Ok(current);
            }
            guard(&current)?;
            if keep_admin {
                keep_an_admin(&mut tx, &current).await?;
            }
            let row: KeyRow = sqlx::query_as(concat!(
                "UPDATE keys k SET revoked_at = now(), revoked_reason = $2 WHERE k.id = $1 RETURNING ",
                key_columns!()
            ))
            .bind(id.as_uuid())
            .bind(reason)
            .persistent(prepared())
            .fetch_one(&mut *tx)
            .await?;
            let record = KeyRecord::try_from(row)?;
            audit(&mut tx, actor, "key.revoke", &record, details).await?;
            tx.commit().await?;
            Ok(record)
        })
        .await
    }

    /// Revokes a key in two round trips instead of the locked transaction's
    /// five (under a flood of checks each waits its turn behind the checks
    /// in flight): it reads the key without a lock, applies `guard`, then
    /// revokes it and writes the audit event in one statement, on condition
    /// that the row is still the version it read (`xmin`). `None` leaves it
    /// to the locked transaction: the row changed in between, or it is an
    /// admin key whose revocation must leave another (that takes a lock on
    /// every admin key, see `keep_an_admin`).
    #[allow(clippy::too_many_arguments)]
    async fn revoke_as_read(
        &self,
        id: KeyId,
        reason: Option<&str>,
        details: &serde_json::Value,
        owner: Option<&OwnerId>,
        guard: Guard<'_>,
        keep_admin: bool,
        actor: &Actor,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut tx = self.begin_one_write().await?;
        let (current, version) = read_key(&mut tx, id, owner, Read::AsIs).await?;
        if current.revoked_at.is_some() {
            return Ok(Some(current));
        }
        guard(&current)?;
        if keep_admin && current.scopes.iter().any(|s| s.as_str() == Scope::ADMIN) {
            return Ok(None);
        }
        let revoked: Option<KeyRow> = sqlx::query_as(concat!(
            "WITH r AS (UPDATE keys k SET revoked_at = now(), revoked_reason = $2 \
             WHERE k.id = $1 AND k.xmin = $3::text::xid AND k.revoked_at IS NULL RETURNING ",
            key_columns!(),
            "), a AS (INSERT INTO audit_events ",
            audit_columns!(),
            " SELECT $4, $5, 'key.revoke', r.id, r.owner_id, $6, $7 FROM r) SELECT * FROM r"
        ))
        .bind(id.as_uuid())
        .bind(reason)
        .bind(version)
        .bind(actor.label())
        .bind(actor.key_uuid())
        .bind(Json(details))
        .bind(actor.remote())
        .persistent(prepared())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = revoked else {
            return Ok(None);
        };
        let record = KeyRecord::try_from(row)?;
        tx.commit().await?;
        Ok(Some(record))
    }

    /// Disables or re-enables a key. A no-op change writes no audit event.
    /// The last active `keyward:admin` key cannot be disabled.
    pub async fn set_key_disabled(
        &self,
        id: KeyId,
        disabled: bool,
        by_admin: bool,
        owner: Option<&OwnerId>,
        guard: Guard<'_>,
        actor: &Actor,
    ) -> Result<KeyRecord, StoreError> {
        self.bounded("set_key_disabled", async {
            let mut tx = self.begin().await?;
            let current = lock_key(&mut tx, id, owner).await?;
            if current.disabled_at.is_some() == disabled {
                return Ok(current);
            }
            guard(&current)?;
            if disabled {
                keep_an_admin(&mut tx, &current).await?;
            }
            let row: KeyRow = sqlx::query_as(concat!(
                "UPDATE keys k SET disabled_at = CASE WHEN $2 THEN now() END, \
                 disabled_by_admin = $2 AND $3 WHERE k.id = $1 RETURNING ",
                key_columns!()
            ))
            .bind(id.as_uuid())
            .bind(disabled)
            .bind(by_admin)
            .persistent(prepared())
            .fetch_one(&mut *tx)
            .await?;
            let record = KeyRecord::try_from(row)?;
            let action = if disabled {
                "key.disable"
            } else {
                "key.enable"
            };
            audit(&mut tx, actor, action, &record, json!({})).await?;
            tx.commit().await?;
            Ok(record)
        })
        .await
    }

    /// Applies `changes` to a key, with an audit event listing what changed
    /// (from, to). `check` sees the key as locked, with the owner's record,
    /// and may refuse. Nothing to change: the key as it is, no event.
    pub async fn update_key(
        &self,
        id: KeyId,
        changes: &KeyChanges,
        owner: Option<&OwnerId>,
        check: impl Fn(&KeyRecord, &OwnerRecord) -> Result<(), StoreError>,
        actor: &Actor,
    ) -> Result<KeyRecord, StoreError> {
        self.bounded("update_key", async {
            let mut tx = self.begin().await?;
            let current = lock_key(&mut tx, id, owner).await?;
            let owner_row: OwnerRow = sqlx::query_as(concat!(
                "SELECT ",
                super::owners::owner_columns!(),
                " FROM owners WHERE id = $1 FOR SHARE"
            ))
            .bind(current.owner_id.as_str())
            .persistent(prepared())
            .fetch_one(&mut *tx)
            .await?;
            check(&current, &OwnerRecord::try_from(owner_row)?)?;
            let diff = diff(&current, changes);
            if diff.is_empty() {
                return Ok(current);
            }
            let loses_admin = changes
                .scopes
                .as_ref()
                .is_some_and(|s| !s.iter().any(|s| s.as_str() == Scope::ADMIN));
            if loses_admin {
                keep_an_admin(&mut tx, &current).await?;
            }
            let mut update = QueryBuilder::<Postgres>::new("UPDATE keys k SET ");
            let mut set = update.separated(", ");
            if let Some(v) = &changes.name {
                set.push("name = ").push_bind_unseparated(v);
            }
            if let Some(v) = &changes.description {
                set.push("description = ").push_bind_unseparated(v);
            }
            if let Some(v) = &changes.metadata {
                set.push("metadata = ")
                    .push_bind_unseparated(Json(v.as_map().clone()));
            }
            if let Some(v) = &changes.scopes {
                let v: Vec<&str> = v.iter().map(Scope::as_str).collect();
                set.push("scopes = ").push_bind_unseparated(v);
            }
            if let Some(v) = &changes.resources {
                let v: Vec<&str> = v.iter().map(Resource::as_str).collect();
                set.push("resources = ").push_bind_unseparated(v);
            }
            if let Some(v) = &changes.ip_allow {
                let v: Vec<IpNet> = v.iter().map(Network::as_ipnet).collect();
                set.push("ip_allow = ")
                    .push_bind_unseparated(v)
                    .push_unseparated("::cidr[]");
            }
            if let Some(v) = &changes.expires_at {
                set.push("expires_at = ").push_bind_unseparated(*v);
            }
            if let Some(v) = &changes.rate_limits {
                set.push("rate_limits = ")
                    .push_bind_unseparated(v.as_ref().map(|w| Json(w.clone())));
            }
            // The credits flag changes on every key of the bucket (below);
            // setting it here too keeps the statement non-empty.
            if let Some(v) = &changes.credits {
                set.push("has_credits = ")
                    .push_bind_unseparated(v.is_some());
            }
            if changes.add_credits.is_some() && set_is_empty(changes) {
                set.push("has_credits = has_credits");
            }
            update
                .push(" WHERE k.id = ")
                .push_bind(id.as_uuid())
                .push(concat!(" RETURNING ", key_columns!()));
            let _: KeyRow = update
                .build_query_as()
                .persistent(prepared())
                .fetch_one(&mut *tx)
                .await?;
            let bucket = current.bucket_id.as_uuid();
            apply_credit_changes(&mut tx, bucket, &current, changes).await?;
            let row: KeyRow = sqlx::query_as(concat!(
                "SELECT ",
                key_columns!(),
                " FROM keys k WHERE k.id = $1"
            ))
            .bind(id.as_uuid())
            .persistent(prepared())
            .fetch_one(&mut *tx)
            .await?;
            let record = KeyRecord::try_from(row)?;
            audit(
                &mut tx,
                actor,
                "key.update",
                &record,
                serde_json::Value::Object(diff),
            )
            .await?;
            tx.commit().await?;
            Ok(record)
        })
        .await
    }

    /// Replaces a key: stores `new` (the same grant, a new secret), links
    /// both ways, and makes the old key expire at `old_expires_at` unless it
    /// expires sooner. A key already replaced or revoked cannot be rotated.
    pub async fn rotate_key(
        &self,
        new: &NewKey,
        old_expires_at: DateTime<Utc>,
        owner: Option<&OwnerId>,
        guard: Guard<'_>,
        actor: &Actor,
    ) -> Result<Rotation, StoreError> {
        let old_id = new
            .spec()
            .rotated_from
            .ok_or_else(|| StoreError::Corrupt("a rotation without the key it replaces".into()))?;
        self.bounded("rotate_key", async {
            let mut tx = self.begin().await?;
            let current = lock_key(&mut tx, old_id, owner).await?;
            guard(&current)?;
            if let Some(by) = current.replaced_by {
                return Err(Refusal::FailedPrecondition(format!(
                    "id: the key was already rotated; its replacement is {by}"
                ))
                .into());
            }
            if current.revoked_at.is_some() {
                return Err(Refusal::FailedPrecondition(
                    "id: a revoked key cannot be rotated".to_owned(),
                )
                .into());
            }
            let owner_updated: DateTime<Utc> =
                sqlx::query_scalar("SELECT updated_at FROM owners WHERE id = $1")
                    .bind(current.owner_id.as_str())
                    .persistent(prepared())
                    .fetch_one(&mut *tx)
                    .await?;
            let new_row = insert_key_row(&mut tx, new, actor, owner_updated)
                .await?
                .ok_or_else(|| {
                    StoreError::from(Refusal::FailedPrecondition(
                        "id: the key's owner changed during the rotation; retry".to_owned(),
                    ))
                })?;
            let old_row: KeyRow = sqlx::query_as(concat!(
                "UPDATE keys k SET replaced_by = $2, \
                 expires_at = CASE WHEN k.expires_at IS NULL OR k.expires_at > $3 THEN $3 \
                              ELSE k.expires_at END \
                 WHERE k.id = $1 RETURNING ",
                key_columns!()
            ))
            .bind(old_id.as_uuid())
            .bind(new.id().as_uuid())
            .bind(old_expires_at)
            .persistent(prepared())
            .fetch_one(&mut *tx)
            .await?;
            let old = KeyRecord::try_from(old_row)?;
            audit(
                &mut tx,
                actor,
                "key.rotate",
                &old,
                json!({
                    "replaced_by": new.id().to_string(),
                    "expires_at": { "from": current.expires_at.map(|t| t.to_rfc3339()),
                                    "to": old.expires_at.map(|t| t.to_rfc3339()) },
                }),
            )
            .await?;
            tx.commit().await?;
            Ok(Rotation {
                old,
                new: KeyRecord::try_from(new_row)?,
            })
        })
        .await
    }

    /// Records that a canary key was presented (from `actor`'s address, for
    /// `resource`).
    pub async fn record_canary_trip(
        &self,
        key: &Grant,
        resource: Option<&str>,
        actor: &Actor,
    ) -> Result<(), StoreError> {
        self.bounded("record_canary_trip", async {
            let mut conn = self.pool.acquire().await?;
            audit_key(
                &mut conn,
                actor,
                "key.canary_tripped",
                key.id,
                &key.owner_id,
                json!({ "resource": resource }),
            )
            .await?;
            self.commit_pooled(&mut conn).await
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
            .bounded("list_keys", async {
                Ok(match &q.owner {
                    Some(owner) => {
                        sqlx::query_as(concat!(
                            "SELECT ",
                            key_columns!(),
                            " FROM keys k \
                              WHERE k.owner_id = $1 AND k.id > $2 AND ($3 OR k.revoked_at IS NULL) \
                              ORDER BY k.owner_id, k.id LIMIT $4"
                        ))
                        .bind(owner.as_str())
                        .bind(after)
                        .bind(q.include_revoked)
                        .bind(limit)
                        .persistent(prepared())
                        .fetch_all(&self.pool)
                        .await?
                    }
                    None => {
                        sqlx::query_as(concat!(
                            "SELECT ",
                            key_columns!(),
                            " FROM keys k \
                              WHERE k.id > $1 AND ($2 OR k.revoked_at IS NULL) \
                              ORDER BY k.id LIMIT $3"
                        ))
                        .bind(after)
                        .bind(q.include_revoked)
                        .bind(limit)
                        .persistent(prepared())
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

/// Inserts a key row and its `key.mint` audit event in one statement, if
/// the owner's row is still as it was read (`updated_at`): `None` if it
/// changed meanwhile (a suspension, a new ceiling), so the caller re-checks.
/// `FOR SHARE` lets concurrent mints for one owner through together while
/// an owner update waits for them (and they for it).
async fn insert_key_row(
    conn: &mut PgConnection,
    new: &NewKey,
    actor: &Actor,
    owner_updated_at: DateTime<Utc>,
) -> Result<Option<KeyRow>, StoreError> {
    let spec = new.spec();
    let scopes: Vec<&str> = spec.scopes.iter().map(Scope::as_str).collect();
    let resources: Vec<&str> = spec.resources.iter().map(Resource::as_str).collect();
    let details = json!({
        "name": spec.name,
        "prefix": new.prefix(),
        "start": new.start(),
        "scopes": scopes,
        "resources": resources,
        "expires_at": spec.expires_at.map(|at| at.to_rfc3339()),
        "canary": spec.canary,
        "rotated_from": spec.rotated_from.map(|id| id.to_string()),
    });
    // A new bucket's credits row goes in with the key, in the same statement.
    let credits = spec.credits;
    let row: Option<KeyRow> = sqlx::query_as(concat!(
        "WITH owner AS ( \
             SELECT id FROM owners WHERE id = $5 AND updated_at = $18 FOR SHARE \
         ), k AS ( \
             INSERT INTO keys (id, hash, prefix, start, owner_id, name, description, \
                               scopes, resources, ip_allow, metadata, expires_at, canary, rotated_from, \
                               bucket_id, rate_limits, has_credits) \
             SELECT $1, $2, $3, $4, owner.id, $6, $7, $8, $9, $10::cidr[], $11, $12, $13, $14, \
                    $20, $21, $22 \
             FROM owner \
             RETURNING * \
         ), c AS ( \
             INSERT INTO credits (bucket_id, remaining, refill_interval, refill_amount, refilled_at) \
             SELECT k.id, $23, $24, $25, CASE WHEN $24::text IS NULL THEN NULL ELSE $26::timestamptz END \
             FROM k WHERE $23::bigint IS NOT NULL \
         ), audit AS ( \
             INSERT INTO audit_events ",
        audit_columns!(),
        " SELECT $15, $16, 'key.mint', k.id, k.owner_id, $17, $19 FROM k \
         ) \
         SELECT ",
        key_columns!(),
        " FROM k"
    ))
    .bind(new.id().as_uuid())
    .bind(new.hash().as_bytes().as_slice())
    .bind(new.prefix())
    .bind(new.start())
    .bind(spec.owner_id.as_str())
    .bind(&spec.name)
    .bind(&spec.description)
    .bind(&scopes)
    .bind(&resources)
    .bind(
        spec.ip_allow
            .iter()
            .map(Network::as_ipnet)
            .collect::<Vec<_>>(),
    )
    .bind(Json(spec.metadata.as_map()))
    .bind(spec.expires_at)
    .bind(spec.canary)
    .bind(spec.rotated_from.map(|id| id.as_uuid()))
    .bind(actor.label())
    .bind(actor.key_uuid())
    .bind(Json(details))
    .bind(owner_updated_at)
    .bind(actor.remote())
    .bind(spec.bucket.map(|b| b.as_uuid()))
    .bind(spec.rate_limits.as_ref().map(|w| Json(w.clone())))
    .bind(spec.bucket_has_credits || credits.is_some())
    .bind(credits.map(|c| i64::try_from(c.remaining).unwrap_or(i64::MAX)))
    .bind(credits.and_then(|c| c.refill).map(|(i, _)| i.as_str()))
    .bind(
        credits
            .and_then(|c| c.refill)
            .map(|(_, amount)| i64::try_from(amount).unwrap_or(i64::MAX)),
    )
    .bind(
        credits
            .and_then(|c| c.refill)
            .map(|(interval, _)| interval.period_start(Utc::now())),
    )
    .persistent(prepared())
    .fetch_optional(conn)
    .await?;
    // The statement's one snapshot cannot see its own credits row.
    Ok(row.map(|mut row| {
        if let Some(c) = credits {
            row.credits_remaining = Some(i64::try_from(c.remaining).unwrap_or(i64::MAX));
            row.credits_refill_interval = c.refill.map(|(i, _)| i.as_str().to_owned());
            row.credits_refill_amount = c.refill.map(|(_, a)| i64::try_from(a).unwrap_or(i64::MAX));
        }
        row
    }))
}

async fn count_live_keys(conn: &mut PgConnection, owner: &OwnerId) -> Result<u64, StoreError> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keys WHERE owner_id = $1 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(owner.as_str())
    .persistent(prepared())
    .fetch_one(conn)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Refuses to take away the last active `keyward:admin` key: `keyward
/// bootstrap` would be the only way back in. Locks every active admin key
/// (in id order), so two such changes at once cannot both pass.
async fn keep_an_admin(conn: &mut PgConnection, target: &KeyRecord) -> Result<(), StoreError> {
    let now = Utc::now();
    let is_active_admin = target.scopes.iter().any(|s| s.as_str() == Scope::ADMIN)
        && target.state_at(now) == crate::key::KeyState::Active
        && target.owner_state == OwnerState::Active;
    if !is_active_admin {
        return Ok(());
    }
    let admins: Vec<Uuid> = sqlx::query_scalar(
        "SELECT k.id FROM keys k JOIN owners o ON o.id = k.owner_id \
         WHERE 'keyward:admin' = ANY (k.scopes) AND k.revoked_at IS NULL \
           AND k.disabled_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()) \
           AND o.active \
         ORDER BY k.id FOR UPDATE OF k",
    )
    .persistent(prepared())
    .fetch_all(&mut *conn)
    .await?;
    if admins.iter().all(|id| *id == target.id.as_uuid()) {
        return Err(Refusal::FailedPrecondition(
            "id: this is the last active keyward:admin key; mint another admin key first \
             (`keyward bootstrap` writes one when none is left)"
                .to_owned(),
        )
        .into());
    }
    Ok(())
}

/// Whether `changes` sets no column of the key row itself.
fn set_is_empty(changes: &KeyChanges) -> bool {
    changes.name.is_none()
        && changes.description.is_none()
        && changes.metadata.is_none()
        && changes.scopes.is_none()
        && changes.resources.is_none()
        && changes.ip_allow.is_none()
        && changes.expires_at.is_none()
        && changes.rate_limits.is_none()
        && changes.credits.is_none()
}

/// Sets, removes or adds to a bucket's credits. A set (or removal) bumps the
/// version, whose notice makes every replica drop the blocks it reserved;
/// an addition does not (reserved blocks stay good).
async fn apply_credit_changes(
    conn: &mut PgConnection,
    bucket: Uuid,
    current: &KeyRecord,
    changes: &KeyChanges,
) -> Result<(), StoreError> {
    match &changes.credits {
        Some(Some(c)) => {
            let refill = c.refill;
            sqlx::query(
                "INSERT INTO credits (bucket_id, remaining, refill_interval, refill_amount, refilled_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (bucket_id) DO UPDATE SET remaining = EXCLUDED.remaining, \
                     refill_interval = EXCLUDED.refill_interval, \
                     refill_amount = EXCLUDED.refill_amount, refilled_at = EXCLUDED.refilled_at, \
                     version = credits.version + 1",
            )
            .bind(bucket)
            .bind(i64::try_from(c.remaining).unwrap_or(i64::MAX))
            .bind(refill.map(|(i, _)| i.as_str()))
            .bind(refill.map(|(_, a)| i64::try_from(a).unwrap_or(i64::MAX)))
            .bind(refill.map(|(i, _)| i.period_start(Utc::now())))
            .persistent(prepared())
            .execute(&mut *conn)
            .await?;
        }
        Some(None) => {
            // Deleting notifies nobody: the flag on the keys below does.
            sqlx::query("DELETE FROM credits WHERE bucket_id = $1")
                .bind(bucket)
                .persistent(prepared())
                .execute(&mut *conn)
                .await?;
        }
        None => {}
    }
    if let Some(c) = &changes.credits {
        sqlx::query(
            "UPDATE keys SET has_credits = $2 WHERE COALESCE(bucket_id, id) = $1 AND has_credits <> $2",
        )
        .bind(bucket)
        .bind(c.is_some())
        .persistent(prepared())
        .execute(&mut *conn)
        .await?;
    }
    if let Some(n) = changes.add_credits {
        let has = changes
            .credits
            .as_ref()
            .map_or(current.credits.is_some(), Option::is_some);
        if !has {
            return Err(Refusal::FailedPrecondition(
                "add_credits: the key has no credits; set them with `credits` first".to_owned(),
            )
            .into());
        }
        sqlx::query(
            "UPDATE credits SET remaining = GREATEST(0, remaining + $2) WHERE bucket_id = $1",
        )
        .bind(bucket)
        .bind(n)
        .persistent(prepared())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// `field: {from, to}` for every field `changes` sets to a new value.
fn diff(current: &KeyRecord, changes: &KeyChanges) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let mut put = |field: &str, from: serde_json::Value, to: serde_json::Value| {
        if from != to {
            out.insert(field.to_owned(), json!({ "from": from, "to": to }));
        }
    };
    let strings = |v: &[String]| json!(v);
    if let Some(v) = &changes.name {
        put("name", json!(current.name), json!(v));
    }
    if let Some(v) = &changes.description {
        put("description", json!(current.description), json!(v));
    }
    if let Some(v) = &changes.metadata {
        put(
            "metadata",
            json!(current.metadata.as_map()),
            json!(v.as_map()),
        );
    }
    if let Some(v) = &changes.scopes {
        let from: Vec<String> = current.scopes.iter().map(ToString::to_string).collect();
        let to: Vec<String> = v.iter().map(ToString::to_string).collect();
        put("scopes", strings(&from), strings(&to));
    }
    if let Some(v) = &changes.resources {
        let from: Vec<String> = current.resources.iter().map(ToString::to_string).collect();
        let to: Vec<String> = v.iter().map(ToString::to_string).collect();
        put("resources", strings(&from), strings(&to));
    }
    if let Some(v) = &changes.ip_allow {
        let from: Vec<String> = current.ip_allow.iter().map(ToString::to_string).collect();
        let to: Vec<String> = v.iter().map(ToString::to_string).collect();
        put("ip_allow", strings(&from), strings(&to));
    }
    if let Some(v) = &changes.expires_at {
        put(
            "expires_at",
            json!(current.expires_at.map(|t| t.to_rfc3339())),
            json!(v.map(|t| t.to_rfc3339())),
        );
    }
    if let Some(v) = &changes.rate_limits {
        put("rate_limits", json!(current.rate_limits), json!(v));
    }
    let credits = |c: &Option<Credits>| {
        c.map(|c| {
            json!({
                "remaining": c.remaining,
                "refill": c.refill.map(|(i, a)| json!({"interval": i.as_str(), "amount": a})),
            })
        })
    };
    if let Some(v) = &changes.credits {
        put(
            "credits",
            json!(credits(&current.credits)),
            json!(credits(v)),
        );
    }
    if let Some(n) = changes.add_credits {
        out.insert("add_credits".to_owned(), json!(n));
    }
    out
}

async fn lock_key(
    conn: &mut PgConnection,
    id: KeyId,
    owner: Option<&OwnerId>,
) -> Result<KeyRecord, StoreError> {
    Ok(read_key(conn, id, owner, Read::Locked).await?.0)
}

/// How [`read_key`] reads a key's row.
#[derive(Clone, Copy)]
enum Read {
    /// Without a lock: a write that follows checks the row version.
    AsIs,
    /// `FOR UPDATE`, until the transaction ends.
    Locked,
}

/// A key by id (and owner, when the caller is confined to one), with its
/// row version (`xmin`), which changes with every update of the row.
async fn read_key(
    conn: &mut PgConnection,
    id: KeyId,
    owner: Option<&OwnerId>,
    read: Read,
) -> Result<(KeyRecord, String), StoreError> {
    use sqlx::{FromRow, Row};
    macro_rules! key_by_id {
        ($lock:literal) => {
            concat!(
                "SELECT ",
                key_columns!(),
                ", k.xmin::text AS row_version FROM keys k \
                 WHERE k.id = $1 AND ($2::text IS NULL OR k.owner_id = $2)",
                $lock
            )
        };
    }
    let statement = match read {
        Read::AsIs => key_by_id!(""),
        Read::Locked => key_by_id!(" FOR UPDATE OF k"),
    };
    let row = sqlx::query(statement)
        .bind(id.as_uuid())
        .bind(owner.map(OwnerId::as_str))
        .persistent(prepared())
        .fetch_one(&mut *conn)
        .await?;
    let version: String = row.try_get("row_version")?;
    Ok((KeyRow::from_row(&row)?.try_into()?, version))
}

pub(super) async fn audit(
    conn: &mut PgConnection,
    actor: &Actor,
    action: &str,
    key: &KeyRecord,
    details: serde_json::Value,
) -> Result<(), StoreError> {
    audit_key(conn, actor, action, key.id, &key.owner_id, details).await
}

async fn audit_key(
    conn: &mut PgConnection,
    actor: &Actor,
    action: &str,
    key_id: KeyId,
    owner_id: &OwnerId,
    details: serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query(concat!(
        "INSERT INTO audit_events ",
        audit_columns!(),
        " VALUES ($1, $2, $3, $4, $5, $6, $7)"
    ))
    .bind(actor.label())
    .bind(actor.key_uuid())
    .bind(action)
    .bind(key_id.as_uuid())
    .bind(owner_id.as_str())
    .bind(Json(details))
    .bind(actor.remote())
    .persistent(prepared())
    .execute(conn)
    .await?;
    Ok(())
}
