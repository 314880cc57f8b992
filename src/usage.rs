//! Usage recording for the hot path: an allowed check costs two relaxed
//! atomic updates; a key joins the flush queue (one short lock) only on its
//! first use since the last flush. A background task drains the queue into
//! one batched statement every flush interval.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
};

use chrono::{DateTime, Utc};

use crate::{key::KeyId, store::UsageWrite, sync::lock};

/// Uses of one cached key not yet written. Lives inside the cache entry.
#[derive(Debug, Default)]
pub struct KeyUsage {
    uses: AtomicU64,
    last_used_ms: AtomicI64,
    queued: AtomicBool,
}

/// Something whose usage is recorded: a cache entry, for the recorder.
pub trait Used: Send + Sync {
    fn usage(&self) -> &KeyUsage;
    fn key_id(&self) -> KeyId;
}

#[derive(Default)]
pub struct UsageRecorder {
    queue: Mutex<Vec<Arc<dyn Used>>>,
    stats: UsageStats,
}

/// What the flusher did: for metrics.
#[derive(Debug, Default)]
pub struct UsageStats {
    flushes_ok: AtomicU64,
    flushes_failed: AtomicU64,
    rows_written: AtomicU64,
    carried_over: AtomicU64,
    dropped: AtomicU64,
}

impl UsageStats {
    /// Batched writes that succeeded (empty batches are not written).
    pub fn flushes_ok(&self) -> u64 {
        self.flushes_ok.load(Ordering::Relaxed)
    }

    /// Batched writes that failed (their uses are carried over).
    pub fn flushes_failed(&self) -> u64 {
        self.flushes_failed.load(Ordering::Relaxed)
    }

    /// Keys whose usage was written (one row each per write).
    pub fn rows_written(&self) -> u64 {
        self.rows_written.load(Ordering::Relaxed)
    }

    /// Uses kept for the next write after a failed one.
    pub fn carried_over(&self) -> u64 {
        self.carried_over.load(Ordering::Relaxed)
    }

    /// Uses dropped: too many keys waited, or the database was down at
    /// shutdown.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for UsageRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageRecorder").finish_non_exhaustive()
    }
}

impl UsageRecorder {
    pub fn stats(&self) -> &UsageStats {
        &self.stats
    }

    pub fn record<T: Used + 'static>(&self, entry: &Arc<T>, now: DateTime<Utc>) {
        let usage = entry.usage();
        usage.uses.fetch_add(1, Ordering::Relaxed);
        usage
            .last_used_ms
            .fetch_max(now.timestamp_millis(), Ordering::Relaxed);
        if !usage.queued.swap(true, Ordering::AcqRel) {
            self.lock().push(entry.clone());
        }
    }

    /// Takes everything recorded so far, one row per key.
    ///
    /// `queued` is cleared before the count is taken: a use racing with the
    /// drain is either counted now or re-queues the key for the next drain.
    pub fn drain(&self) -> Vec<UsageWrite> {
        let queued = std::mem::take(&mut *self.lock());
        let mut by_key: HashMap<KeyId, UsageWrite> = HashMap::with_capacity(queued.len());
        for entry in queued {
            let usage = entry.usage();
            usage.queued.store(false, Ordering::Release);
            let uses = usage.uses.swap(0, Ordering::AcqRel);
            if uses == 0 {
                continue;
            }
            let at = DateTime::from_timestamp_millis(usage.last_used_ms.load(Ordering::Relaxed))
                .unwrap_or_else(Utc::now);
            let key_id = entry.key_id();
            by_key
                .entry(key_id)
                .and_modify(|w| {
                    w.uses += uses;
                    w.last_used_at = w.last_used_at.max(at);
                })
                .or_insert(UsageWrite {
                    key_id,
                    last_used_at: at,
                    uses,
                });
        }
        by_key.into_values().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<dyn Used>>> {
        // The queue holds plain data; a panic elsewhere cannot break it.
        lock(&self.queue)
    }
}

/// Merges rows that failed to be written into the next batch, so a short
/// database outage loses no counts (up to `cap` keys). Returns the uses
/// dropped because the cap was reached.
pub fn carry_over(failed: Vec<UsageWrite>, next: &mut Vec<UsageWrite>, cap: usize) -> u64 {
    let mut by_key: HashMap<KeyId, UsageWrite> = next.drain(..).map(|w| (w.key_id, w)).collect();
    let mut dropped = 0;
    for w in failed {
        if by_key.len() >= cap && !by_key.contains_key(&w.key_id) {
            dropped += w.uses;
            continue;
        }
        by_key
            .entry(w.key_id)
            .and_modify(|n| {
                n.uses += w.uses;
                n.last_used_at = n.last_used_at.max(w.last_used_at);
            })
            .or_insert(w);
    }
    next.extend(by_key.into_values());
    dropped
}

/// Writes recorded usage every `interval` (each write bounded by `timeout`),
/// and once more when `stop` fires.
pub fn spawn_flusher(
    store: crate::store::Store,
    recorder: Arc<UsageRecorder>,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    /// Keys whose failed writes are kept for the next attempt.
    const CARRY_CAP: usize = 100_000;
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Vec<UsageWrite> = Vec::new();
        loop {
            let stopping = tokio::select! {
                _ = ticker.tick() => false,
                _ = stop.changed() => true,
            };
            let mut batch = recorder.drain();
            let dropped = carry_over(std::mem::take(&mut pending), &mut batch, CARRY_CAP);
            let stats = recorder.stats();
            if dropped > 0 {
                stats.dropped.fetch_add(dropped, Ordering::Relaxed);
                tracing::warn!(
                    dropped_uses = dropped,
                    keys_kept = CARRY_CAP,
                    "usage not yet written dropped: too many keys waiting for the database"
                );
            }
            // An empty batch costs nothing: record_usage returns at once.
            let written = tokio::time::timeout(timeout, store.record_usage(&batch))
                .await
                .unwrap_or(Err(crate::store::StoreError::Timeout(timeout)));
            match written {
                Ok(()) if !batch.is_empty() => {
                    stats.flushes_ok.fetch_add(1, Ordering::Relaxed);
                    stats
                        .rows_written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Ok(()) => {}
                Err(err) => {
                    tracing::warn!(error = %crate::telemetry::chain(&err), keys = batch.len(), "cannot write key usage; will retry");
                    stats.flushes_failed.fetch_add(1, Ordering::Relaxed);
                    stats
                        .carried_over
                        .fetch_add(batch.iter().map(|w| w.uses).sum(), Ordering::Relaxed);
                    pending = batch;
                }
            }
            if stopping {
                if !pending.is_empty() {
                    stats
                        .dropped
                        .fetch_add(pending.iter().map(|w| w.uses).sum(), Ordering::Relaxed);
                    tracing::warn!(keys = pending.len(), "key usage lost at shutdown");
                }
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Entry(KeyId, KeyUsage);

    impl Used for Entry {
        fn usage(&self) -> &KeyUsage {
            &self.1
        }
        fn key_id(&self) -> KeyId {
            self.0
        }
    }

    fn entry(id: KeyId) -> Arc<Entry> {
        Arc::new(Entry(id, KeyUsage::default()))
    }

    #[test]
    fn uses_are_counted_once_per_key_and_drained_once() {
        let rec = UsageRecorder::default();
        let (a, b) = (entry(KeyId::new_v7()), entry(KeyId::new_v7()));
        let t0 = Utc::now();
        for _ in 0..1000 {
            rec.record(&a, t0);
        }
        rec.record(&b, t0);
        assert_eq!(rec.lock().len(), 2, "each key queued once");

        let mut rows = rec.drain();
        rows.sort_by_key(|w| w.uses);
        assert_eq!(rows.iter().map(|w| w.uses).collect::<Vec<_>>(), [1, 1000]);
        assert!(rec.drain().is_empty(), "nothing left after a drain");

        rec.record(&a, t0);
        assert_eq!(rec.drain().len(), 1, "a key re-queues after a drain");
    }

    #[test]
    fn two_entries_for_one_key_merge() {
        let rec = UsageRecorder::default();
        let id = KeyId::new_v7();
        let (old, new) = (entry(id), entry(id));
        let t0 = Utc::now();
        rec.record(&old, t0);
        rec.record(&new, t0 + chrono::Duration::seconds(1));
        let rows = rec.drain();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].uses, 2);
        assert_eq!(
            rows[0].last_used_at.timestamp_millis(),
            (t0 + chrono::Duration::seconds(1)).timestamp_millis()
        );
    }

    #[test]
    fn failed_writes_carry_over_up_to_the_cap() {
        let id = KeyId::new_v7();
        let now = Utc::now();
        let w = |key_id, uses| UsageWrite {
            key_id,
            last_used_at: now,
            uses,
        };
        let mut next = vec![w(id, 2)];
        let dropped = carry_over(vec![w(id, 3), w(KeyId::new_v7(), 4)], &mut next, 1);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].uses, 5);
        assert_eq!(
            dropped, 4,
            "the uses of the key beyond the cap are reported"
        );
    }
}
