//! In-process caches of key records, by hash.
//!
//! Known keys and unknown hashes live in separate caches so that a flood of
//! made-up keys can only evict other unknown hashes, never the known keys that
//! real traffic depends on.
//!
//! A known entry is fresh for `ttl` after it was read from the store; after
//! that the next check re-reads it, and if the store cannot be reached the
//! stale entry is still served for up to `stale_if_error` more (RFC 5861's
//! `stale-if-error`). Past both it is gone, and a check that needs it fails
//! with `UNAVAILABLE` rather than guess.
//!
//! Invalidation must not lose a race with a concurrent miss: a lookup that
//! read the row just before a revocation committed could otherwise put the
//! stale record back after the eviction. Every invalidation therefore bumps a
//! generation counter *before* evicting, and a loader re-reads the counter
//! *after* inserting and evicts its own insert if it changed. Either the
//! loader sees the bump, or the eviction comes after its insert.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::future::Cache;

use crate::{
    key::{KeyHash, KeyRecord},
    usage::KeyUsage,
};

/// Sizes and lifetimes of the cache entries.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Known keys held at most.
    pub capacity: u64,
    /// How long a known key is served before it is re-read (soft TTL).
    pub ttl: Duration,
    /// How much longer than `ttl` a known key may be served while the store
    /// cannot be reached (hard bound: `ttl + stale_if_error`).
    pub stale_if_error: Duration,
    /// Unknown hashes held at most.
    pub negative_capacity: u64,
    /// How long an unknown hash is remembered as unknown.
    pub negative_ttl: Duration,
}

/// A known key as cached: its record, when it was read, and its unwritten usage.
#[derive(Debug)]
pub struct CachedKey {
    pub record: Arc<KeyRecord>,
    pub usage: Arc<KeyUsage>,
    loaded_at: Instant,
}

/// A cache lookup's answer.
#[derive(Debug, Clone)]
pub enum Lookup {
    Fresh(Arc<CachedKey>),
    /// Past its soft TTL: re-read it, but it may still answer if the store
    /// cannot be reached.
    Stale(Arc<CachedKey>),
    Unknown,
}

#[derive(Debug, Clone)]
pub struct KeyCache {
    known: Cache<KeyHash, Arc<CachedKey>>,
    unknown: Cache<KeyHash, ()>,
    ttl: Duration,
    generation: Arc<AtomicU64>,
}

/// Taken before a miss is loaded; hands the loaded answer to the cache.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl KeyCache {
    pub fn new(settings: &CacheSettings) -> Self {
        Self {
            known: Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(settings.ttl.saturating_add(settings.stale_if_error))
                .build(),
            unknown: Cache::builder()
                .max_capacity(settings.negative_capacity)
                .time_to_live(settings.negative_ttl)
                .build(),
            ttl: settings.ttl,
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The cached answer for a hash, if any.
    pub async fn get(&self, hash: &KeyHash) -> Option<Lookup> {
        if let Some(entry) = self.known.get(hash).await {
            return Some(if entry.loaded_at.elapsed() < self.ttl {
                Lookup::Fresh(entry)
            } else {
                Lookup::Stale(entry)
            });
        }
        self.unknown.get(hash).await.map(|()| Lookup::Unknown)
    }

    /// Call before reading the store on a miss; pass the ticket to [`fill`].
    ///
    /// [`fill`]: KeyCache::fill
    pub fn ticket(&self) -> Ticket {
        Ticket(self.generation.load(Ordering::SeqCst))
    }

    /// Caches what the store said, unless an invalidation overtook the read,
    /// and returns the entry to answer with.
    pub async fn fill(
        &self,
        ticket: Ticket,
        hash: KeyHash,
        found: Option<Arc<KeyRecord>>,
    ) -> Option<Arc<CachedKey>> {
        let entry = match found {
            Some(record) => {
                let entry = Arc::new(CachedKey {
                    usage: Arc::new(KeyUsage::new(record.id)),
                    record,
                    loaded_at: Instant::now(),
                });
                self.unknown.invalidate(&hash).await;
                self.known.insert(hash, entry.clone()).await;
                Some(entry)
            }
            None => {
                self.known.invalidate(&hash).await;
                self.unknown.insert(hash, ()).await;
                None
            }
        };
        if self.generation.load(Ordering::SeqCst) != ticket.0 {
            self.evict(&hash).await;
        }
        entry
    }

    /// Drops whatever is cached for this hash; the next check reads the store.
    pub async fn invalidate(&self, hash: &KeyHash) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.evict(hash).await;
    }

    /// Drops everything, e.g. when invalidations may have been missed.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    async fn evict(&self, hash: &KeyHash) {
        self.known.invalidate(hash).await;
        self.unknown.invalidate(hash).await;
    }

    /// Known keys currently held (approximate, as moka counts lazily).
    pub fn known_len(&self) -> u64 {
        self.known.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::key::{ApiKey, KeyId, KeyPrefix, Metadata, OwnerId};

    fn settings(ttl: Duration) -> CacheSettings {
        CacheSettings {
            capacity: 100,
            ttl,
            stale_if_error: Duration::from_secs(60),
            negative_capacity: 100,
            negative_ttl: Duration::from_secs(60),
        }
    }

    fn record() -> Arc<KeyRecord> {
        let key = ApiKey::generate(&KeyPrefix::parse("kw_test").unwrap());
        Arc::new(KeyRecord {
            id: KeyId::new_v7(),
            hash: key.hash(),
            prefix: key.prefix().to_owned(),
            start: key.start().to_owned(),
            owner_id: OwnerId::parse("acme").unwrap(),
            name: String::new(),
            description: String::new(),
            scopes: vec![],
            resources: vec![],
            ip_allow: vec![],
            metadata: Metadata::default(),
            created_at: Utc::now(),
            expires_at: None,
            disabled_at: None,
            revoked_at: None,
            revoked_reason: None,
            last_used_at: None,
        })
    }

    #[tokio::test]
    async fn filled_entries_are_served_until_invalidated() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let rec = record();
        let hash = rec.hash;
        assert!(cache.get(&hash).await.is_none());
        cache.fill(cache.ticket(), hash, Some(rec)).await;
        assert!(matches!(cache.get(&hash).await, Some(Lookup::Fresh(_))));
        cache.invalidate(&hash).await;
        assert!(cache.get(&hash).await.is_none());
    }

    #[tokio::test]
    async fn entries_past_the_soft_ttl_are_stale_but_still_held() {
        let cache = KeyCache::new(&settings(Duration::ZERO));
        let rec = record();
        let hash = rec.hash;
        cache.fill(cache.ticket(), hash, Some(rec)).await;
        assert!(matches!(cache.get(&hash).await, Some(Lookup::Stale(_))));
    }

    #[tokio::test]
    async fn unknown_hashes_are_remembered_until_the_key_appears() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let rec = record();
        let hash = rec.hash;
        cache.fill(cache.ticket(), hash, None).await;
        assert!(matches!(cache.get(&hash).await, Some(Lookup::Unknown)));
        cache.fill(cache.ticket(), hash, Some(rec)).await;
        assert!(matches!(cache.get(&hash).await, Some(Lookup::Fresh(_))));
    }

    #[tokio::test]
    async fn a_load_overtaken_by_an_invalidation_is_not_kept() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let rec = record();
        let hash = rec.hash;
        let ticket = cache.ticket();
        // The store was read (stale), then the key was revoked elsewhere.
        cache.invalidate(&hash).await;
        let served = cache.fill(ticket, hash, Some(rec)).await;
        assert!(served.is_some(), "the loader still answers its own request");
        assert!(cache.get(&hash).await.is_none());
    }

    #[tokio::test]
    async fn invalidate_all_empties_both_caches() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (a, b) = (record(), record().hash);
        let a_hash = a.hash;
        cache.fill(cache.ticket(), a_hash, Some(a)).await;
        cache.fill(cache.ticket(), b, None).await;
        cache.invalidate_all();
        assert!(cache.get(&a_hash).await.is_none());
        assert!(cache.get(&b).await.is_none());
    }
}
