//! Batched usage writes: `last_used_at` and per-day counts, many keys in one
//! statement, never a write per check.

use std::{collections::HashMap, sync::atomic::Ordering};

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::statements::prepared;
use super::{Store, StoreError};
use crate::key::KeyId;

/// Usage of one key since the previous write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageWrite {
    pub key_id: KeyId,
    pub last_used_at: DateTime<Utc>,
    pub uses: u64,
}

impl Store {
    /// Writes a batch in one statement: the uses are added to the day (UTC)
    /// of the last use, and `keys.last_used_at` moves forward, but only once
    /// it is a minute behind: rewriting every active key's row every few
    /// seconds would cost far more than a last-used time to the minute is
    /// worth (the first use is always written).
    ///
    /// Rows are locked in key-id order, in both tables, so two replicas
    /// flushing overlapping keys at once queue behind each other instead of
    /// deadlocking. `FOR NO KEY UPDATE`, like the UPDATE itself: it does not
    /// conflict with the key-share lock the usage rows' foreign key takes.
    pub async fn record_usage(&self, batch: &[UsageWrite]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut batch = batch.to_vec();
        batch.sort_unstable_by_key(|u| u.key_id);
        let ids: Vec<Uuid> = batch.iter().map(|u| u.key_id.as_uuid()).collect();
        let at: Vec<DateTime<Utc>> = batch.iter().map(|u| u.last_used_at).collect();
        let uses: Vec<i64> = batch
            .iter()
            .map(|u| i64::try_from(u.uses).unwrap_or(i64::MAX))
            .collect();
        self.stats.usage_writes.fetch_add(1, Ordering::Relaxed);
        let statement = sqlx::query(
            "WITH batch AS ( \
                 SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[]) \
                     AS b(key_id, last_used_at, uses) \
             ), stale AS ( \
                 SELECT k.id FROM keys k JOIN batch b ON k.id = b.key_id \
                 WHERE k.last_used_at IS NULL \
                    OR k.last_used_at < b.last_used_at - interval '1 minute' \
                 ORDER BY k.id \
                 FOR NO KEY UPDATE OF k \
             ), touched AS ( \
                 UPDATE keys k SET last_used_at = b.last_used_at \
                 FROM batch b \
                 WHERE k.id = b.key_id AND k.id IN (SELECT id FROM stale) \
                   AND (k.last_used_at IS NULL OR k.last_used_at < b.last_used_at) \
             ) \
             INSERT INTO key_usage_daily (key_id, day, uses) \
             SELECT b.key_id, (b.last_used_at AT TIME ZONE 'UTC')::date, b.uses \
             FROM batch b JOIN keys k ON k.id = b.key_id \
             ORDER BY b.key_id \
             ON CONFLICT (key_id, day) DO UPDATE \
                 SET uses = key_usage_daily.uses + EXCLUDED.uses",
        )
        .bind(ids)
        .bind(at)
        .bind(uses)
        .persistent(prepared());
        self.execute_write("record_usage", statement).await
    }

    /// Uses per day over the last `days` days (UTC), newest first, for each key.
    pub async fn daily_usage(
        &self,
        keys: &[KeyId],
        days: u32,
    ) -> Result<HashMap<KeyId, Vec<(NaiveDate, u64)>>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<Uuid> = keys.iter().map(KeyId::as_uuid).collect();
        let query = sqlx::query_as(
            "SELECT key_id, day, uses FROM key_usage_daily \
             WHERE key_id = ANY($1) AND day > (now() AT TIME ZONE 'UTC')::date - $2::int \
             ORDER BY key_id, day DESC",
        )
        .bind(ids)
        .bind(i32::try_from(days).unwrap_or(i32::MAX));
        let rows: Vec<(Uuid, NaiveDate, i64)> = self
            .bounded("daily_usage", async {
                Ok(query.persistent(prepared()).fetch_all(&self.pool).await?)
            })
            .await?;
        let mut out: HashMap<KeyId, Vec<(NaiveDate, u64)>> = HashMap::new();
        for (id, day, uses) in rows {
            out.entry(id.into())
                .or_default()
                .push((day, u64::try_from(uses).unwrap_or(0)));
        }
        Ok(out)
    }
}
