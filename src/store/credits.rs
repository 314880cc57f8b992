//! Usage credits in PostgreSQL: replicas reserve blocks and spend them from
//! memory (see `limits::credits`); this is the one place the balance moves.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::statements::prepared;
use super::{Store, StoreError};
use crate::key::{KeyId, RefillInterval};

/// A block taken from a bucket's credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Credits now this replica's to spend.
    pub granted: u64,
    /// What is left in the database after the block.
    pub remaining: u64,
    /// The bucket's credits version (an admin's set moves it).
    pub version: i64,
    /// The refill period the block belongs to (`None`: no refill).
    pub period: Option<DateTime<Utc>>,
    pub interval: Option<RefillInterval>,
}

/// Unspent credits to give back (at shutdown).
#[derive(Debug, Clone, Copy)]
pub struct Unspent {
    pub bucket: KeyId,
    pub credits: u64,
    pub version: i64,
    pub period: Option<DateTime<Utc>>,
}

/// granted, remaining, version, period, refill interval.
type ReservationRow = (i64, i64, i64, Option<DateTime<Utc>>, Option<String>);

impl Store {
    /// Takes a block of at least `need` credits from `bucket`, applying a
    /// refill first if `now` is in a period not yet refilled. The block is
    /// `need` when few are left (so that the last credits are spent exactly,
    /// one call at a time), else a share of what is left of up to
    /// `max_block`. `None`: fewer than `need` are left.
    ///
    /// One statement: the row is locked by its UPDATE, so concurrent
    /// reservations from any number of replicas never take more than there
    /// is.
    pub async fn reserve_credits(
        &self,
        bucket: KeyId,
        need: u64,
        max_block: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<Reservation>, StoreError> {
        self.stats
            .credit_reservations
            .fetch_add(1, Ordering::Relaxed);
        let need = i64::try_from(need).unwrap_or(i64::MAX);
        let max_block = i64::try_from(max_block).unwrap_or(i64::MAX);
        let reserve = async {
            let query = sqlx::query_as(
                "WITH cur AS ( \
                     SELECT bucket_id, version, refill_amount, \
                            CASE refill_interval \
                                WHEN 'DAILY' THEN date_trunc('day', $4 AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' \
                                WHEN 'MONTHLY' THEN date_trunc('month', $4 AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' \
                            END AS period, \
                            remaining, refilled_at \
                     FROM credits WHERE bucket_id = $1 FOR UPDATE \
                 ), eff AS ( \
                     SELECT *, CASE WHEN period IS NOT NULL \
                                         AND (refilled_at IS NULL OR refilled_at < period) \
                                    THEN refill_amount ELSE remaining END AS avail \
                     FROM cur \
                 ), take AS ( \
                     SELECT *, LEAST(avail, GREATEST($2::bigint, LEAST($3::bigint, avail / 16))) AS n \
                     FROM eff WHERE avail >= $2::bigint \
                 ) \
                 UPDATE credits c SET remaining = take.avail - take.n, \
                                      refilled_at = COALESCE(take.period, c.refilled_at) \
                 FROM take WHERE c.bucket_id = take.bucket_id \
                 RETURNING take.n, c.remaining, c.version, take.period, c.refill_interval",
            )
            .bind(bucket.as_uuid())
            .bind(need)
            .bind(max_block)
            .bind(now)
            .persistent(prepared());
            let mut conn = self.check_connection().await?;
            let row: Option<ReservationRow> = query.fetch_optional(&mut *conn).await?;
            // Credits are spent from this block as soon as it is returned.
            self.commit_pooled(&mut conn).await?;
            Ok(row.map(
                |(granted, remaining, version, period, interval)| Reservation {
                    granted: u64::try_from(granted).unwrap_or(0),
                    remaining: u64::try_from(remaining).unwrap_or(0),
                    version,
                    period,
                    interval: interval.as_deref().and_then(RefillInterval::parse),
                },
            ))
        };
        super::within(self.lookup_timeout, reserve).await
    }

    /// Gives unspent blocks back, unless their bucket was set anew (another
    /// version) or moved to another refill period meanwhile. One statement.
    pub async fn return_credits(&self, unspent: &[Unspent]) -> Result<(), StoreError> {
        if unspent.is_empty() {
            return Ok(());
        }
        let buckets: Vec<Uuid> = unspent.iter().map(|u| u.bucket.as_uuid()).collect();
        let credits: Vec<i64> = unspent
            .iter()
            .map(|u| i64::try_from(u.credits).unwrap_or(i64::MAX))
            .collect();
        let versions: Vec<i64> = unspent.iter().map(|u| u.version).collect();
        let periods: Vec<Option<DateTime<Utc>>> = unspent.iter().map(|u| u.period).collect();
        let statement = sqlx::query(
            "UPDATE credits c SET remaining = c.remaining + u.credits \
             FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::timestamptz[]) \
                 AS u(bucket_id, credits, version, period) \
             WHERE c.bucket_id = u.bucket_id AND c.version = u.version \
               AND c.refilled_at IS NOT DISTINCT FROM u.period",
        )
        .bind(buckets)
        .bind(credits)
        .bind(versions)
        .bind(periods)
        .persistent(prepared());
        self.execute_write("return_credits", statement).await
    }
}
