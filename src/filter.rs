//! A compact membership filter of every stored key's hash, so that a key that
//! was never minted costs no database round trip.
//!
//! Every replica loads a Bloom filter of all key hashes at start (streamed,
//! 8 bytes per row), adds each new key as its `insert` notice arrives, and
//! reloads it after its listener reconnects (notices may have been missed)
//! or when more keys arrived than it was sized for. A key the filter rules
//! out is unknown for certain; a key it contains may still be unknown (a
//! false positive, at most 1 in 10,000 when full) and is looked up as usual.
//!
//! The filter is fed the first 8 bytes of each key's SHA-256: already
//! uniform, so no second hash function is needed, and a client choosing keys
//! cannot aim at particular bits without inverting SHA-256.
//!
//! Until the first load completes the filter contains everything, so nothing
//! is refused on its word.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use arc_swap::ArcSwapOption;
use fastbloom::AtomicBloomFilter;

use crate::{
    key::KeyHash,
    store::{Store, StoreError},
    sync::lock,
};

/// False positives per lookup of an unknown key, when the filter holds as
/// many keys as it was sized for.
const FALSE_POSITIVE_RATE: f64 = 1e-4;
/// Keys a filter is sized for at least (about 240 KB).
const MIN_CAPACITY: u64 = 100_000;
/// Room for growth over the keys present at load: reloads stay rare.
const HEADROOM: f64 = 1.5;

struct Bloom {
    bits: AtomicBloomFilter,
    capacity: u64,
    items: AtomicU64,
}

impl Bloom {
    fn new(capacity: u64) -> Self {
        Self {
            bits: AtomicBloomFilter::with_false_pos(FALSE_POSITIVE_RATE)
                .expected_items(usize::try_from(capacity).unwrap_or(usize::MAX)),
            capacity,
            items: AtomicU64::new(0),
        }
    }

    fn insert(&self, source: u64) {
        self.bits.insert_hash(source);
        self.items.fetch_add(1, Ordering::Relaxed);
    }
}

fn source(hash: &KeyHash) -> u64 {
    let b = hash.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

#[derive(Default)]
pub struct KeyFilter {
    current: ArcSwapOption<Bloom>,
    /// A filter being loaded: new keys go into it too, so none is lost
    /// between the load's snapshot and the swap.
    building: Mutex<Option<Arc<Bloom>>>,
    outgrown: AtomicBool,
}

impl std::fmt::Debug for KeyFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFilter")
            .field("loaded", &self.loaded())
            .field("items", &self.items())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl KeyFilter {
    /// `false`: no stored key has this hash. `true`: one may.
    pub fn might_contain(&self, hash: &KeyHash) -> bool {
        match &*self.current.load() {
            Some(bloom) => bloom.bits.contains_hash(source(hash)),
            None => true,
        }
    }

    /// Adds a key that was just stored.
    pub fn insert(&self, hash: &KeyHash) {
        let source = source(hash);
        if let Some(bloom) = &*self.current.load() {
            bloom.insert(source);
            if bloom.items.load(Ordering::Relaxed) > bloom.capacity {
                self.outgrown.store(true, Ordering::Relaxed);
            }
        }
        if let Some(bloom) = &*lock(&self.building) {
            bloom.insert(source);
        }
    }

    /// Loads every stored key's hash into a new filter and swaps it in. The
    /// old filter (if any) keeps answering meanwhile.
    pub async fn load(&self, store: &Store) -> Result<(), StoreError> {
        let known = store.estimated_key_count().await?.max(self.items());
        let mut capacity = sized_for(known);
        loop {
            let bloom = Arc::new(Bloom::new(capacity));
            *lock(&self.building) = Some(bloom.clone());
            let loaded = store.key_hash_prefixes(|source| bloom.insert(source)).await;
            let loaded = match loaded {
                Ok(n) => n,
                Err(err) => {
                    *lock(&self.building) = None;
                    return Err(err);
                }
            };
            if loaded > capacity {
                // The planner's estimate was stale: size for what is there.
                capacity = sized_for(loaded);
                continue;
            }
            self.current.store(Some(bloom));
            *lock(&self.building) = None;
            self.outgrown.store(false, Ordering::Relaxed);
            tracing::info!(keys = loaded, bytes = self.bytes(), "key filter loaded");
            return Ok(());
        }
    }

    /// Whether more keys were added than the filter was sized for (its false
    /// positive rate is climbing): time to load it again.
    pub fn outgrown(&self) -> bool {
        self.outgrown.load(Ordering::Relaxed)
    }

    pub fn loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// Keys in the filter.
    pub fn items(&self) -> u64 {
        self.current
            .load()
            .as_ref()
            .map_or(0, |b| b.items.load(Ordering::Relaxed))
    }

    /// Memory held by the filter's bits.
    pub fn bytes(&self) -> u64 {
        self.current
            .load()
            .as_ref()
            .map_or(0, |b| b.bits.num_bits() as u64 / 8)
    }
}

fn sized_for(keys: u64) -> u64 {
    ((keys as f64 * HEADROOM) as u64).max(MIN_CAPACITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{ApiKey, KeyPrefix};

    fn hash() -> KeyHash {
        ApiKey::generate(&KeyPrefix::parse("kw_test").unwrap()).hash()
    }

    fn loaded_with(hashes: &[KeyHash]) -> KeyFilter {
        let filter = KeyFilter::default();
        let bloom = Arc::new(Bloom::new(MIN_CAPACITY));
        for h in hashes {
            bloom.insert(source(h));
        }
        filter.current.store(Some(bloom));
        filter
    }

    #[test]
    fn an_unloaded_filter_rules_nothing_out() {
        assert!(KeyFilter::default().might_contain(&hash()));
    }

    #[test]
    fn stored_keys_are_always_contained_and_strangers_almost_never() {
        let stored: Vec<KeyHash> = (0..1000).map(|_| hash()).collect();
        let filter = loaded_with(&stored);
        assert!(stored.iter().all(|h| filter.might_contain(h)));
        let strangers = (0..10_000)
            .filter(|_| filter.might_contain(&hash()))
            .count();
        // 1,000 keys in a filter sized for 100,000: far below the design rate.
        assert!(strangers <= 2, "{strangers} false positives in 10,000");
    }

    #[test]
    fn inserted_keys_are_contained_in_the_filter_being_built_too() {
        let filter = loaded_with(&[]);
        let building = Arc::new(Bloom::new(MIN_CAPACITY));
        *lock(&filter.building) = Some(building.clone());
        let h = hash();
        filter.insert(&h);
        assert!(filter.might_contain(&h));
        assert!(building.bits.contains_hash(source(&h)));
    }

    #[test]
    fn the_filter_costs_a_few_bytes_per_key() {
        let bytes = Bloom::new(1_000_000).bits.num_bits() / 8;
        assert!((1_500_000..=3_000_000).contains(&bytes), "{bytes} bytes");
    }
}
