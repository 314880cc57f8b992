//! Usage credits, spent from blocks each replica reserves from PostgreSQL.
//!
//! A replica takes a block with one conditional `UPDATE ... RETURNING`
//! (a share of what is left, up to `max_block`; exactly the cost when few
//! are left) and spends it from memory, so 10,000 checks cost a handful of
//! statements. The database never gives out more than it has, so across
//! any number of replicas the credits are never over-spent; what a replica
//! holds unspent goes back when it shuts down or when the block has been
//! idle for a while. Refills happen lazily, in the reservation: the first
//! one in a new day or month sets the balance to the refill amount.
//!
//! A bucket found spent is not asked again for a second (a key hammered
//! after its credits ran out costs no statement per check); an admin's set
//! reaches every replica at once through the invalidation channel, an
//! addition within that second.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};

use crate::{
    key::{KeyId, RefillInterval},
    store::{Store, StoreError, Unspent},
    sync::lock,
};

/// How long a spent bucket is taken at its word.
const SPENT_RECHECK: Duration = Duration::from_secs(1);
/// Blocks idle this long go back to the database.
const IDLE_RETURN: Duration = Duration::from_secs(300);

/// Something that tells the time: the system clock, or a test's.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Why credits could not be spent.
#[derive(Debug)]
pub enum NotSpent {
    /// None left; with a refill, when the next one comes.
    Exhausted { next_refill: Option<DateTime<Utc>> },
    /// The database could not be asked.
    Store(StoreError),
}

#[derive(Debug, Default)]
struct Block {
    available: u64,
    /// The database's balance after the last reservation.
    remaining: u64,
    version: i64,
    /// The refill period the block belongs to (`None`: no refill).
    period: Option<DateTime<Utc>>,
    interval: Option<RefillInterval>,
    spent_until: Option<Instant>,
    last_used: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct CreditBook {
    store: Store,
    max_block: u64,
    blocks: Arc<Mutex<HashMap<KeyId, Arc<tokio::sync::Mutex<Block>>>>>,
}

impl CreditBook {
    pub fn new(store: Store, max_block: u64) -> Self {
        Self {
            store,
            max_block: max_block.max(1),
            blocks: Arc::default(),
        }
    }

    fn block(&self, bucket: KeyId) -> Arc<tokio::sync::Mutex<Block>> {
        let mut blocks = lock(&self.blocks);
        blocks.entry(bucket).or_default().clone()
    }

    /// Spends `cost` of `bucket`'s credits at `now` (the clock's); returns
    /// this replica's view of what is left. One bucket's spends on this
    /// replica queue behind one reservation at a time.
    pub async fn spend(
        &self,
        bucket: KeyId,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<u64, NotSpent> {
        let block = self.block(bucket);
        let mut block = block.lock().await;
        let started = Instant::now();
        block.last_used = Some(started);
        // A new refill period: what was reserved in the old one is void.
        if let (Some(interval), Some(period)) = (block.interval, block.period)
            && interval.period_start(now) != period
        {
            *block = Block::default();
        }
        if block.available >= cost {
            block.available -= cost;
            return Ok(block.available + block.remaining);
        }
        if block.spent_until.is_some_and(|until| started < until) {
            return Err(NotSpent::Exhausted {
                next_refill: block.interval.map(|i| i.next_period(now)),
            });
        }
        let need = cost - block.available;
        // Boxed: a reservation is rare, and its statement's future would
        // otherwise be part of every limited check's.
        match Box::pin(
            self.store
                .reserve_credits(bucket, need, self.max_block, now),
        )
        .await
        {
            Ok(Some(r)) => {
                if r.version != block.version || r.period != block.period {
                    // A new version or period: nothing held before counts.
                    block.available = 0;
                }
                block.available += r.granted;
                block.remaining = r.remaining;
                block.version = r.version;
                block.period = r.period;
                block.interval = r.interval;
                block.spent_until = None;
                block.available = block.available.saturating_sub(cost);
                Ok(block.available + block.remaining)
            }
            Ok(None) => {
                block.spent_until = Some(started + SPENT_RECHECK);
                block.remaining = 0;
                Err(NotSpent::Exhausted {
                    next_refill: block.interval.map(|i| i.next_period(now)),
                })
            }
            Err(err) => Err(NotSpent::Store(err)),
        }
    }

    /// Gives back what a refused check had spent (its rate limit refused it).
    pub async fn refund(&self, bucket: KeyId, cost: u64) {
        let block = self.block(bucket);
        let mut block = block.lock().await;
        block.available += cost;
    }

    /// An admin set the bucket's credits anew: what this replica reserved
    /// is void.
    pub fn forget(&self, bucket: &KeyId) {
        let mut blocks = lock(&self.blocks);
        blocks.remove(bucket);
    }

    /// Gives back the unspent blocks idle for `idle` or more (all of them
    /// with zero), in one statement.
    pub async fn give_back(&self, idle: Duration) -> Result<usize, StoreError> {
        let now = Instant::now();
        let candidates: Vec<(KeyId, Arc<tokio::sync::Mutex<Block>>)> = {
            let blocks = lock(&self.blocks);
            blocks.iter().map(|(k, b)| (*k, b.clone())).collect()
        };
        let mut unspent = Vec::new();
        for (bucket, block) in candidates {
            let mut block = block.lock().await;
            if block
                .last_used
                .is_some_and(|t| now.duration_since(t) < idle)
            {
                continue;
            }
            if block.available > 0 {
                unspent.push(Unspent {
                    bucket,
                    credits: block.available,
                    version: block.version,
                    period: block.period,
                });
                block.available = 0;
            }
        }
        let n = unspent.len();
        self.store.return_credits(&unspent).await?;
        Ok(n)
    }

    /// Returns idle blocks every minute until `stop`.
    pub fn spawn_returner(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let book = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(60));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.changed() => return,
                }
                if let Err(err) = book.give_back(IDLE_RETURN).await {
                    tracing::warn!(error = %crate::telemetry::chain(&err), "cannot return idle credit reservations");
                }
            }
        })
    }
}
