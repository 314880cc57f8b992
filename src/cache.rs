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
//! with `UNAVAILABLE` rather than guess. Entries carry their own load time, so
//! moka keeps no expiry timers: it only bounds the count (TinyLFU), which
//! saves memory on every entry.
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

use moka::sync::Cache;

use crate::{
    key::{Grant, KeyHash, KeyId},
    usage::{KeyUsage, Used},
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

/// A known key as cached: what it may do, when that was read, and its
/// unwritten usage, in one allocation.
#[derive(Debug)]
pub struct CachedKey {
    pub grant: Grant,
    usage: KeyUsage,
    loaded_at: Instant,
}

impl Used for CachedKey {
    fn usage(&self) -> &KeyUsage {
        &self.usage
    }

    fn key_id(&self) -> KeyId {
        self.grant.id
    }
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
    /// `ttl + stale_if_error`: past this an entry is never served.
    hard: Duration,
    generation: Arc<AtomicU64>,
}

/// Taken before a miss is loaded; hands the loaded answer to the cache.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl KeyCache {
    pub fn new(settings: &CacheSettings) -> Self {
        Self {
            known: Cache::builder().max_capacity(settings.capacity).build(),
            unknown: Cache::builder()
                .max_capacity(settings.negative_capacity)
                .time_to_live(settings.negative_ttl)
                .build(),
            ttl: settings.ttl,
            hard: settings.ttl.saturating_add(settings.stale_if_error),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The cached answer for a hash, if any.
    pub fn get(&self, hash: &KeyHash) -> Option<Lookup> {
        if let Some(entry) = self.known.get(hash) {
            let age = entry.loaded_at.elapsed();
            if age < self.ttl {
                return Some(Lookup::Fresh(entry));
            }
            if age < self.hard {
                return Some(Lookup::Stale(entry));
            }
            self.known.invalidate(hash);
            return None;
        }
        self.unknown.get(hash).map(|()| Lookup::Unknown)
    }

    /// Call before reading the store on a miss; pass the ticket to [`fill`].
    ///
    /// [`fill`]: KeyCache::fill
    pub fn ticket(&self) -> Ticket {
        Ticket(self.generation.load(Ordering::SeqCst))
    }

    /// Caches what the store said, unless an invalidation overtook the read,
    /// and returns the entry to answer with.
    pub fn fill(
        &self,
        ticket: Ticket,
        hash: KeyHash,
        found: Option<Grant>,
    ) -> Option<Arc<CachedKey>> {
        let entry = match found {
            Some(grant) => {
                let entry = Arc::new(CachedKey {
                    grant,
                    usage: KeyUsage::default(),
                    loaded_at: Instant::now(),
                });
                self.unknown.invalidate(&hash);
                self.known.insert(hash, entry.clone());
                Some(entry)
            }
            None => {
                self.known.invalidate(&hash);
                self.unknown.insert(hash, ());
                None
            }
        };
        if self.generation.load(Ordering::SeqCst) != ticket.0 {
            self.evict(&hash);
        }
        entry
    }

    /// Drops whatever is cached for this hash; the next check reads the store.
    pub fn invalidate(&self, hash: &KeyHash) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.evict(hash);
    }

    /// Drops everything, e.g. when invalidations may have been missed.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    fn evict(&self, hash: &KeyHash) {
        self.known.invalidate(hash);
        self.unknown.invalidate(hash);
    }

    /// Known keys currently held (approximate, as moka counts lazily).
    pub fn known_len(&self) -> u64 {
        self.known.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{ApiKey, KeyPrefix};

    fn settings(ttl: Duration) -> CacheSettings {
        CacheSettings {
            capacity: 100,
            ttl,
            stale_if_error: Duration::from_secs(60),
            negative_capacity: 100,
            negative_ttl: Duration::from_secs(60),
        }
    }

    /// A grant and the hash it is cached under.
    fn record() -> (KeyHash, Grant) {
        let key = ApiKey::generate(&KeyPrefix::parse("kw_test").unwrap());
        (key.hash(), Grant::for_test("acme", &[]))
    }

    #[test]
    fn filled_entries_are_served_until_invalidated() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        assert!(cache.get(&hash).is_none());
        cache.fill(cache.ticket(), hash, Some(rec));
        assert!(matches!(cache.get(&hash), Some(Lookup::Fresh(_))));
        cache.invalidate(&hash);
        assert!(cache.get(&hash).is_none());
    }

    #[test]
    fn entries_past_the_hard_bound_are_never_served() {
        let cache = KeyCache::new(&CacheSettings {
            ttl: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            ..settings(Duration::ZERO)
        });
        let (hash, rec) = record();
        cache.fill(cache.ticket(), hash, Some(rec));
        assert!(cache.get(&hash).is_none());
    }

    #[test]
    fn entries_past_the_soft_ttl_are_stale_but_still_held() {
        let cache = KeyCache::new(&settings(Duration::ZERO));
        let (hash, rec) = record();
        cache.fill(cache.ticket(), hash, Some(rec));
        assert!(matches!(cache.get(&hash), Some(Lookup::Stale(_))));
    }

    #[test]
    fn unknown_hashes_are_remembered_until_the_key_appears() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        cache.fill(cache.ticket(), hash, None);
        assert!(matches!(cache.get(&hash), Some(Lookup::Unknown)));
        cache.fill(cache.ticket(), hash, Some(rec));
        assert!(matches!(cache.get(&hash), Some(Lookup::Fresh(_))));
    }

    #[test]
    fn a_load_overtaken_by_an_invalidation_is_not_kept() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        let ticket = cache.ticket();
        // The store was read (stale), then the key was revoked elsewhere.
        cache.invalidate(&hash);
        let served = cache.fill(ticket, hash, Some(rec));
        assert!(served.is_some(), "the loader still answers its own request");
        assert!(cache.get(&hash).is_none());
    }

    #[test]
    fn invalidate_all_empties_both_caches() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let ((a_hash, a), (b, _)) = (record(), record());
        cache.fill(cache.ticket(), a_hash, Some(a));
        cache.fill(cache.ticket(), b, None);
        cache.invalidate_all();
        assert!(cache.get(&a_hash).is_none());
        assert!(cache.get(&b).is_none());
    }
}
