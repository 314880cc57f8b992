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
//! loader sees the bump, or the eviction comes after its insert. Until the
//! loader has re-read the counter its insert answers no other lookup (they
//! read the store too), so an overtaken fill is never served, not even in
//! the instant before its eviction. Counters are
//! kept per shard of hashes (1,024 of them), so a change to one key spoils
//! only the fills in flight for keys of its shard, not every fill on every
//! replica: a tenant toggling a key cannot keep caches from filling.
//!
//! After the listener was away, entries may be marked "revalidate before
//! use" ([`KeyCache::revalidate_all`]): the next check of such a key re-reads
//! it, and may answer from the old entry only if the store cannot be reached
//! (within `stale_if_error`, as for any stale entry).
//!
//! The cache of known keys is bounded by bytes: each entry weighs what its
//! grant holds (a key with long metadata weighs more), so a few maximal keys
//! cannot push memory far past the bound the way a count-bounded cache would.
//!
//! A hit is answered from the *front*: a fixed table of entries indexed by
//! the hash's own first bytes (a SHA-256 needs no hashing again), one probe
//! and one pointer per lookup. moka stays the cache: it holds every entry,
//! bounds the bytes and picks what to evict; the front only points at some
//! of its entries. A lookup that misses the front (an empty slot, another
//! key in it) asks moka and puts what it found in the slot. Two rules keep
//! the front from answering with what moka no longer holds:
//!
//! - every entry that leaves moka (invalidated, replaced, evicted) is marked
//!   retired by moka's eviction listener and taken out of its slot, and a
//!   retired entry in a slot is a miss;
//! - an entry in a slot answers only while its hash's shard generation is
//!   the one read before the moka lookup that put it there, and
//!   [`KeyCache::invalidate`] moves the generation both before and after it
//!   evicts. So when an invalidation returns, no lookup can put back an
//!   entry it read from moka before the eviction, even when the eviction
//!   was another thread's (a fill overtaken by the invalidation) whose
//!   listener has not run yet. Another key's invalidation in the same shard
//!   costs the shard's entries one moka lookup each, not a store read.
//!
//! moka is told of about one front hit in [`FRONT_SAMPLE`] (drawn at
//! random, so that no key is never told of), so that its admission and
//! eviction still see which keys are used. Measured in BENCHMARKS.md ("One
//! probe per hit"): moka's lookup hashed the digest again with SipHash,
//! pinned an epoch, read the clock and queued the read for its bookkeeping
//! on every hit, and with 10,000 keys its table, deques and counters were
//! the hit's data misses.

use std::{
    cell::Cell,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};
use moka::{notification::RemovalCause, ops::compute::Op, sync::Cache};

use crate::{
    key::{Grant, KeyHash, KeyId, OwnerId},
    limits::rate::{BucketCell, BucketRef},
    sync::lock,
    usage::{KeyUsage, Used},
};

/// Shards of the fill generation counters.
const SHARDS: usize = 1024;
/// Shards of the owner epochs: a change to one owner makes the keys of
/// about 1/16,384 of all owners re-read (its own among them).
const OWNER_SHARDS: usize = 16_384;
/// moka is told of about one front hit in this many.
const FRONT_SAMPLE: u32 = 32;
/// Front slots per byte of the cache's bound: one per 512 bytes (an entry
/// weighs about 700, so a full cache has more slots than entries), between
/// these two counts, rounded up to a power of two. A slot is a pointer: the
/// default 512 MiB bound has 1,048,576 slots, 8 MiB.
const FRONT_BYTES_PER_SLOT: u64 = 512;
const FRONT_MIN_SLOTS: usize = 1 << 10;
const FRONT_MAX_SLOTS: usize = 1 << 22;

/// Sizes and lifetimes of the cache entries.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Bytes the known keys may take, by each entry's weight.
    pub max_bytes: u64,
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
    /// The hash it is cached under: a front slot holds any key's entry.
    hash: KeyHash,
    /// Set when moka let go of it: the front must not answer with it.
    retired: AtomicBool,
    /// Set once whoever put it in moka found that no invalidation had
    /// overtaken what it read (see [`KeyCache::fill`]); until then it is in
    /// moka but answers no lookup.
    kept: AtomicBool,
    /// The highest shard generation read before a moka lookup that found
    /// it: the front answers with it only while that is the current one.
    front_generation: AtomicU64,
    usage: KeyUsage,
    loaded_at: Instant,
    /// The owner's shard and its epoch when this was read: a change to the
    /// owner moves the epoch, and the entry must be re-read.
    owner_shard: u16,
    owner_epoch: u32,
    /// The Envoy front door's allow answer for this key as a gRPC message
    /// frame, encoded once on first use and sent as is after (see
    /// `api::envoy`): it depends only on the key and the process's settings.
    pub envoy_allow: OnceLock<bytes::Bytes>,
    /// Its bucket's rate-limit state on the local backend, held from the
    /// first limited check on (a cache hit then finds it without a lookup).
    pub rate: BucketRef,
}

/// What an encoded Envoy allow answer adds to an entry, beyond the key's
/// own strings, once built: protobuf framing, header names and the
/// dynamic metadata's field names.
const ENVOY_ANSWER_BYTES: usize = 320;

impl CachedKey {
    /// An entry for `grant`, read when its owner's shard (`owner_shard`)
    /// was at `owner_epoch`.
    fn new(
        hash: KeyHash,
        grant: Grant,
        (owner_shard, owner_epoch): (u16, u32),
        loaded_at: Instant,
    ) -> Self {
        Self {
            owner_shard,
            owner_epoch,
            grant,
            hash,
            retired: AtomicBool::new(false),
            kept: AtomicBool::new(false),
            front_generation: AtomicU64::new(0),
            usage: KeyUsage::default(),
            loaded_at,
            envoy_allow: OnceLock::new(),
            rate: BucketRef::default(),
        }
    }

    /// Bytes this entry holds, with the cache's own bookkeeping for it
    /// (measured: about 100 bytes per moka entry), counting the Envoy answer
    /// it may build (weights are fixed at insertion).
    fn weight(&self) -> u32 {
        let grant = &self.grant;
        let answer = ENVOY_ANSWER_BYTES
            + 2 * (grant.owner_id.as_str().len()
                + grant
                    .scopes
                    .iter()
                    .map(|s| s.as_str().len() + 1)
                    .sum::<usize>());
        // Limits: their own bytes, the policy header again in the answer,
        // and the bucket's cell the entry may come to hold.
        let limits = grant.limits.as_deref().map_or(0, |l| {
            l.heap_bytes() + l.policy_header.len() + 40 + BucketCell::bytes(l.windows.len())
        });
        let bytes = std::mem::size_of::<Self>() + grant.heap_bytes() + 100 + answer + limits;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
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
    /// Past its soft TTL: re-read it, but it may still answer meanwhile.
    Stale(Arc<CachedKey>),
    /// Loaded before the listener lost notices: re-read it before answering;
    /// it may answer only if the store cannot be reached.
    Revalidate(Arc<CachedKey>),
    /// A known key whose owner changed (suspended, perhaps) since it was
    /// read: re-read it, and answer nothing from what is held, not even
    /// while the store cannot be reached.
    Reread,
    Unknown,
}

#[derive(Debug, Clone)]
pub struct KeyCache {
    known: Cache<KeyHash, Arc<CachedKey>>,
    front: Arc<Front>,
    unknown: Cache<KeyHash, ()>,
    ttl: Duration,
    /// `ttl + stale_if_error`: past this an entry is never served.
    hard: Duration,
    /// Per shard: changes to keys (spoil every fill in flight)...
    generations: Arc<[AtomicU64]>,
    /// ...and creations of keys (spoil only fills that found nothing: a
    /// fill that found the new key is right).
    creations: Arc<[AtomicU64]>,
    /// Held while a revocation replaces an entry: the replica that took the
    /// Revoke and its own notice of it revoke the same key at about the
    /// same moment, and one must find the other's revoked entry, not
    /// undo it.
    revoking: Arc<Mutex<()>>,
    origin: Instant,
    /// Entries loaded before `origin` + this many nanoseconds must be re-read
    /// before use; 0: none.
    revalidate_before: Arc<AtomicU64>,
    owner_epochs: Arc<[AtomicU32]>,
    /// Owner changes so far: a fill that raced with one is not kept (the
    /// owner of a key is only known once it is read).
    owner_changes: Arc<AtomicU64>,
}

/// Taken before a miss is loaded; hands the loaded answer to the cache.
/// Two tickets of one hash are equal when nothing that spoils a fill
/// happened between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    shard: usize,
    generation: u64,
    creations: u64,
    owner_changes: u64,
}

impl Ticket {
    /// Whether this ticket (of the same hash) was taken after everything
    /// that spoils a fill which `seen` had seen: a read begun at it may
    /// answer a check that took `seen`. Its counters only grow.
    pub fn covers(&self, seen: &Ticket) -> bool {
        self.shard == seen.shard
            && self.generation >= seen.generation
            && self.creations >= seen.creations
            && self.owner_changes >= seen.owner_changes
    }
}

fn shard(hash: &KeyHash) -> usize {
    let b = hash.as_bytes();
    usize::from(u16::from_le_bytes([b[8], b[9]])) % SHARDS
}

/// FNV-1a of the owner id, into the owner epochs.
fn owner_shard(owner: &OwnerId) -> usize {
    let hash = owner
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    (hash % OWNER_SHARDS as u64) as usize
}

impl KeyCache {
    pub fn new(settings: &CacheSettings) -> Self {
        let slots = usize::try_from(settings.max_bytes / FRONT_BYTES_PER_SLOT)
            .unwrap_or(FRONT_MAX_SLOTS)
            .clamp(FRONT_MIN_SLOTS, FRONT_MAX_SLOTS);
        let front = Arc::new(Front::new(slots));
        let retire = front.clone();
        Self {
            known: Cache::builder()
                .max_capacity(settings.max_bytes)
                .weigher(|_, entry: &Arc<CachedKey>| entry.weight())
                // Must not panic: moka would stop calling it, and the front
                // would keep what moka let go of until the next invalidation.
                .eviction_listener(move |_, entry: Arc<CachedKey>, _: RemovalCause| {
                    retire.retire(&entry);
                })
                .build(),
            front,
            unknown: Cache::builder()
                .max_capacity(settings.negative_capacity)
                .time_to_live(settings.negative_ttl)
                .build(),
            ttl: settings.ttl,
            hard: settings.ttl.saturating_add(settings.stale_if_error),
            generations: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            creations: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            revoking: Arc::new(Mutex::new(())),
            origin: Instant::now(),
            revalidate_before: Arc::new(AtomicU64::new(0)),
            owner_epochs: (0..OWNER_SHARDS).map(|_| AtomicU32::new(0)).collect(),
            owner_changes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The cached answer for a hash, if any, as of `now`.
    pub fn get(&self, hash: &KeyHash, now: Instant) -> Option<Lookup> {
        // Read before either lookup (see the module doc).
        let generation = self.generation(hash);
        let entry = match self.front.get(hash, generation) {
            Some(entry) => {
                if sampled() {
                    // Only so that moka counts the use.
                    drop(self.known.get(hash));
                }
                entry
            }
            None => match self.known.get(hash) {
                Some(entry) if entry.kept.load(Ordering::Acquire) => {
                    entry
                        .front_generation
                        .fetch_max(generation, Ordering::AcqRel);
                    self.front.put(&entry);
                    entry
                }
                // Still being filled: it may be what an invalidation has
                // just overtaken, so this lookup reads the store too.
                Some(_) => return None,
                None => return self.unknown.get(hash).map(|()| Lookup::Unknown),
            },
        };
        let age = now.saturating_duration_since(entry.loaded_at);
        if age >= self.hard {
            self.remove_if_held(hash, &entry);
            return None;
        }
        if self.owner_epochs[usize::from(entry.owner_shard)].load(Ordering::Acquire)
            != entry.owner_epoch
        {
            // What it says of the owner is known to be out of date.
            return Some(Lookup::Reread);
        }
        if self.marked(&entry) {
            return Some(Lookup::Revalidate(entry));
        }
        if age < self.fresh_for(hash) {
            return Some(Lookup::Fresh(entry));
        }
        Some(Lookup::Stale(entry))
    }

    /// The soft TTL, shortened by up to a fifth depending on the hash, so
    /// that keys loaded together (a warm-up, a burst) do not all go stale
    /// together and send a wave of re-reads to the database at once.
    fn fresh_for(&self, hash: &KeyHash) -> Duration {
        let spread = u32::from(hash.as_bytes()[10]);
        self.ttl - self.ttl / 5 * spread / 255
    }

    fn marked(&self, entry: &CachedKey) -> bool {
        let before = self.revalidate_before.load(Ordering::Acquire);
        before != 0
            && (entry
                .loaded_at
                .saturating_duration_since(self.origin)
                .as_nanos() as u64)
                < before
    }

    /// Whether an entry may still answer while the store cannot be reached.
    pub fn within_stale_if_error(&self, entry: &CachedKey) -> bool {
        entry.loaded_at.elapsed() < self.hard
    }

    /// Call before reading the store on a miss; pass the ticket to [`fill`].
    ///
    /// [`fill`]: KeyCache::fill
    pub fn ticket(&self, hash: &KeyHash) -> Ticket {
        let shard = shard(hash);
        Ticket {
            shard,
            generation: self.generations[shard].load(Ordering::SeqCst),
            creations: self.creations[shard].load(Ordering::SeqCst),
            owner_changes: self.owner_changes.load(Ordering::SeqCst),
        }
    }

    /// Caches what the store said, unless an invalidation overtook the read,
    /// and returns the entry to answer with.
    ///
    /// The entry is in moka before the generation is read again (so that
    /// an invalidation after that read evicts it), and answers other
    /// lookups only once that read found no invalidation in between: an
    /// overtaken fill is evicted without ever answering anyone but its own
    /// check, even for the instant between its insert and its eviction.
    pub fn fill(
        &self,
        ticket: Ticket,
        hash: KeyHash,
        found: Option<Grant>,
    ) -> Option<Arc<CachedKey>> {
        let entry = self.insert_unsettled(hash, found);
        self.settle(ticket, &hash, entry.as_ref());
        entry
    }

    /// [`fill`](Self::fill)'s insert: the entry is in moka, not yet kept.
    fn insert_unsettled(&self, hash: KeyHash, found: Option<Grant>) -> Option<Arc<CachedKey>> {
        match found {
            Some(grant) => {
                let owner = owner_shard(&grant.owner_id);
                let epoch = self.owner_epochs[owner].load(Ordering::Acquire);
                let entry = Arc::new(CachedKey::new(
                    hash,
                    grant,
                    (owner as u16, epoch),
                    Instant::now(),
                ));
                self.unknown.invalidate(&hash);
                self.known.insert(hash, entry.clone());
                Some(entry)
            }
            None => {
                self.known.invalidate(&hash);
                self.unknown.insert(hash, ());
                None
            }
        }
    }

    /// The rest of [`fill`](Self::fill) (and of a revocation's insert):
    /// evicts what it inserted if an invalidation overtook the read, else
    /// lets it answer.
    ///
    /// Only its own insert: what has replaced it in moka since came from a
    /// later fill (or revocation), which settles on its own ticket, and the
    /// overtaking invalidation evicts whatever it finds itself.
    fn settle(&self, ticket: Ticket, hash: &KeyHash, entry: Option<&Arc<CachedKey>>) {
        let overtaken = self.generations[ticket.shard].load(Ordering::SeqCst) != ticket.generation
            || self.owner_changes.load(Ordering::SeqCst) != ticket.owner_changes
            || (entry.is_none()
                && self.creations[ticket.shard].load(Ordering::SeqCst) != ticket.creations);
        match entry {
            Some(entry) if overtaken => self.remove_if_held(hash, entry),
            Some(entry) => entry.kept.store(true, Ordering::Release),
            // An "unknown" marker cannot be told from a later fill's; taking
            // that one too costs a read.
            None if overtaken => self.unknown.invalidate(hash),
            None => {}
        }
    }

    /// Takes `entry` out of moka if moka still holds it for `hash`, and
    /// leaves a newer entry for the hash alone. (moka runs this against
    /// other such calls one at a time, not against a plain insert: one that
    /// lands between the look and the removal is removed too, which costs
    /// its key one store read, never a wrong answer.)
    fn remove_if_held(&self, hash: &KeyHash, entry: &Arc<CachedKey>) {
        self.known
            .entry_by_ref(hash)
            .and_compute_with(|held| match held {
                Some(held) if Arc::ptr_eq(held.value(), entry) => Op::Remove,
                _ => Op::Nop,
            });
    }

    /// The owner changed (suspended, resumed, new defaults): every cached
    /// key of it is re-read before its next use.
    pub fn invalidate_owner(&self, owner: &OwnerId) {
        self.owner_changes.fetch_add(1, Ordering::SeqCst);
        self.owner_epochs[owner_shard(owner)].fetch_add(1, Ordering::AcqRel);
    }

    /// The current generation of `hash`'s shard.
    fn generation(&self, hash: &KeyHash) -> u64 {
        self.generations[shard(hash)].load(Ordering::SeqCst)
    }

    fn bump(&self, hash: &KeyHash) {
        self.generations[shard(hash)].fetch_add(1, Ordering::SeqCst);
    }

    /// Drops whatever is cached for this hash; the next check reads the store.
    pub fn invalidate(&self, hash: &KeyHash) {
        self.bump(hash);
        self.evict_and_close(hash);
    }

    /// The rest of [`invalidate`](Self::invalidate) after its first bump:
    /// evicts, then moves the generation again, so that what a lookup read
    /// from moka before the eviction (done here, or by another thread whose
    /// eviction listener has not run yet) no longer answers from the front.
    fn evict_and_close(&self, hash: &KeyHash) {
        self.evict(hash);
        self.bump(hash);
    }

    /// The key was revoked at `revoked_at`, and nothing else that decides
    /// changed (`canary` is its flag, the one rule before "revoked"). What
    /// was cached for it stops answering as with
    /// [`invalidate`](Self::invalidate); if it was cached, it is cached again
    /// as revoked (revocation is final), so its next check is refused without
    /// reading the store. The revoked entry keeps the old one's load time and
    /// owner epoch: it expires, and is re-read after an owner change or a
    /// lost notice, exactly when the old one would have been. Like a fill, it
    /// is not kept if another invalidation of its shard overtook it. An
    /// entry already revoked (with the same canary flag) is left as it is.
    pub fn revoke(&self, hash: &KeyHash, revoked_at: DateTime<Utc>, canary: bool) {
        let _one_at_a_time = lock(&self.revoking);
        if let Some((ticket, revoked)) = self.revoked_copy(hash, revoked_at, canary) {
            self.keep_revoked(ticket, revoked);
        }
    }

    /// [`revoke`](Self::revoke) up to its insert: what was cached stops
    /// answering; if a kept entry was cached, its revoked copy comes back,
    /// with the ticket read after the eviction that the copy is kept on.
    fn revoked_copy(
        &self,
        hash: &KeyHash,
        revoked_at: DateTime<Utc>,
        canary: bool,
    ) -> Option<(Ticket, Arc<CachedKey>)> {
        // An entry still being filled is not copied: it may be what this
        // revocation overtakes.
        let held = self
            .known
            .get(hash)
            .filter(|h| h.kept.load(Ordering::Acquire));
        if held
            .as_ref()
            .is_some_and(|h| h.grant.revoked_at.is_some() && h.grant.canary == canary)
        {
            return None;
        }
        self.bump(hash);
        self.evict_and_close(hash);
        let held = held?;
        let ticket = self.ticket(hash);
        let mut grant = held.grant.clone();
        grant.revoked_at = Some(revoked_at);
        grant.canary = canary;
        let owner = (held.owner_shard, held.owner_epoch);
        let revoked = Arc::new(CachedKey::new(*hash, grant, owner, held.loaded_at));
        Some((ticket, revoked))
    }

    /// The rest of [`revoke`](Self::revoke): the copy is inserted, and kept
    /// only if nothing invalidated its key after the ticket was read.
    fn keep_revoked(&self, ticket: Ticket, revoked: Arc<CachedKey>) {
        let hash = revoked.hash;
        self.known.insert(hash, revoked.clone());
        self.settle(ticket, &hash, Some(&revoked));
    }

    /// A key with this hash was just created: forget that it was unknown
    /// (a known entry, filled from the new row, stays, and so does a fill of
    /// it in flight).
    pub fn forget_unknown(&self, hash: &KeyHash) {
        self.creations[shard(hash)].fetch_add(1, Ordering::SeqCst);
        self.unknown.invalidate(hash);
    }

    /// Many keys were created at once: forget every unknown hash.
    pub fn forget_all_unknown(&self) {
        for creations in self.creations.iter() {
            creations.fetch_add(1, Ordering::SeqCst);
        }
        self.unknown.invalidate_all();
    }

    /// Marks every entry loaded so far "revalidate before use", e.g. when
    /// notices may have been missed and the changes cannot be read.
    pub fn revalidate_all(&self) {
        for generation in self.generations.iter() {
            generation.fetch_add(1, Ordering::SeqCst);
        }
        let now = self.origin.elapsed().as_nanos() as u64 + 1;
        self.revalidate_before.fetch_max(now, Ordering::AcqRel);
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

    /// Bytes the known keys weigh (approximate, as moka counts lazily).
    pub fn known_bytes(&self) -> u64 {
        self.known.weighted_size()
    }

    /// Unknown hashes currently remembered (approximate).
    pub fn unknown_len(&self) -> u64 {
        self.unknown.entry_count()
    }

    /// Applies moka's pending bookkeeping, so sizes are current (tests).
    pub fn sync(&self) {
        self.known.run_pending_tasks();
        self.unknown.run_pending_tasks();
    }
}

/// The front of the known keys: one slot per hash prefix, each pointing at
/// moka's entry for the last key looked up there (see the module doc).
struct Front {
    slots: Box<[ArcSwapOption<CachedKey>]>,
    mask: usize,
}

impl Front {
    /// `slots` rounded up to a power of two.
    fn new(slots: usize) -> Self {
        let slots = slots.next_power_of_two();
        Self {
            slots: (0..slots).map(|_| ArcSwapOption::empty()).collect(),
            mask: slots - 1,
        }
    }

    fn slot(&self, hash: &KeyHash) -> &ArcSwapOption<CachedKey> {
        let b = hash.as_bytes();
        let prefix = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        &self.slots[prefix as usize & self.mask]
    }

    /// The entry of `hash`, if its slot holds it, moka still does and it
    /// was found in moka at `generation` of its shard or later.
    fn get(&self, hash: &KeyHash, generation: u64) -> Option<Arc<CachedKey>> {
        self.slot(hash).load_full().filter(|e| {
            e.hash == *hash
                && !e.retired.load(Ordering::Acquire)
                && e.front_generation.load(Ordering::Acquire) >= generation
        })
    }

    fn put(&self, entry: &Arc<CachedKey>) {
        self.slot(&entry.hash).store(Some(entry.clone()));
    }

    /// moka let go of `entry`: never answer with it again, and free its
    /// slot unless another entry took it meanwhile.
    fn retire(&self, entry: &Arc<CachedKey>) {
        entry.retired.store(true, Ordering::Release);
        self.slot(&entry.hash)
            .compare_and_swap(Arc::as_ptr(entry), None);
    }
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("slots", &self.slots.len())
            .finish()
    }
}

thread_local! {
    /// xorshift32 state (never zero).
    static FRONT_DRAW: Cell<u32> = const { Cell::new(0x9e37_79b9) };
}

/// Whether this front hit is one moka is told of: about one in
/// [`FRONT_SAMPLE`], at random rather than every n-th, so that a key seen
/// at a fixed period (round-robin over a multiple of n keys) is still told.
fn sampled() -> bool {
    FRONT_DRAW.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        state.set(x);
        x < u32::MAX / FRONT_SAMPLE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{ApiKey, KeyPrefix};

    fn settings(ttl: Duration) -> CacheSettings {
        CacheSettings {
            max_bytes: 1 << 20,
            ttl,
            stale_if_error: Duration::from_secs(60),
            negative_capacity: 100,
            negative_ttl: Duration::from_secs(60),
        }
    }

    /// The cache's answer for `hash` now.
    fn get(cache: &KeyCache, hash: &KeyHash) -> Option<Lookup> {
        cache.get(hash, Instant::now())
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
        assert!(get(&cache, &hash).is_none());
        cache.fill(cache.ticket(&hash), hash, Some(rec));
        assert!(matches!(get(&cache, &hash), Some(Lookup::Fresh(_))));
        cache.invalidate(&hash);
        assert!(get(&cache, &hash).is_none());
    }

    #[test]
    fn entries_past_the_hard_bound_are_never_served() {
        let cache = KeyCache::new(&CacheSettings {
            ttl: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            ..settings(Duration::ZERO)
        });
        let (hash, rec) = record();
        cache.fill(cache.ticket(&hash), hash, Some(rec));
        assert!(get(&cache, &hash).is_none());
    }

    #[test]
    fn entries_past_the_soft_ttl_are_stale_but_still_held() {
        let cache = KeyCache::new(&settings(Duration::ZERO));
        let (hash, rec) = record();
        cache.fill(cache.ticket(&hash), hash, Some(rec));
        assert!(matches!(get(&cache, &hash), Some(Lookup::Stale(_))));
    }

    #[test]
    fn unknown_hashes_are_remembered_until_the_key_appears() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        cache.fill(cache.ticket(&hash), hash, None);
        assert!(matches!(get(&cache, &hash), Some(Lookup::Unknown)));
        cache.fill(cache.ticket(&hash), hash, Some(rec));
        assert!(matches!(get(&cache, &hash), Some(Lookup::Fresh(_))));
    }

    #[test]
    fn a_load_overtaken_by_an_invalidation_is_not_kept() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        let ticket = cache.ticket(&hash);
        // The store was read (stale), then the key was revoked elsewhere.
        cache.invalidate(&hash);
        let served = cache.fill(ticket, hash, Some(rec));
        assert!(served.is_some(), "the loader still answers its own request");
        assert!(get(&cache, &hash).is_none());
    }

    #[test]
    fn a_fill_answers_other_lookups_only_once_it_is_known_not_overtaken() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        // The store was read (stale), the key was revoked elsewhere, and
        // the fill's insert lands: until the fill's second look at the
        // generation, another thread's lookup must not answer with it; after
        // it, it is gone.
        let ticket = cache.ticket(&hash);
        cache.invalidate(&hash);
        let stale = cache.insert_unsettled(hash, Some(rec.clone()));
        assert!(get(&cache, &hash).is_none());
        cache.settle(ticket, &hash, stale.as_ref());
        assert!(get(&cache, &hash).is_none());
        // A revocation that finds a fill not yet settled does not copy it.
        let unsettled = cache.insert_unsettled(hash, Some(rec.clone()));
        assert!(unsettled.is_some());
        cache.revoke(&hash, DateTime::from_timestamp(1, 0).unwrap(), false);
        assert!(get(&cache, &hash).is_none());
        // A fill nothing overtook answers from its settling on.
        let ticket = cache.ticket(&hash);
        let fresh = cache.insert_unsettled(hash, Some(rec));
        assert!(get(&cache, &hash).is_none());
        cache.settle(ticket, &hash, fresh.as_ref());
        assert!(matches!(get(&cache, &hash), Some(Lookup::Fresh(_))));
    }

    #[test]
    fn an_overtaken_fill_takes_out_only_its_own_insert() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        // A read begins, the key changes, a read after the change fills and
        // is kept, and only then does the first read's insert settle.
        let before = cache.ticket(&hash);
        let stale = cache.insert_unsettled(hash, Some(rec.clone()));
        cache.invalidate(&hash);
        let newer = cache.fill(cache.ticket(&hash), hash, Some(rec.clone()));
        cache.settle(before, &hash, stale.as_ref());
        let Some(Lookup::Fresh(served)) = get(&cache, &hash) else {
            panic!("the later read's entry was taken out with the overtaken one");
        };
        assert!(Arc::ptr_eq(&served, newer.as_ref().unwrap()));
        // The same order with the overtaken insert still in moka: it goes.
        let before = cache.ticket(&hash);
        cache.invalidate(&hash);
        let stale = cache.insert_unsettled(hash, Some(rec));
        cache.settle(before, &hash, stale.as_ref());
        assert!(get(&cache, &hash).is_none());
        cache.sync();
        assert_eq!(cache.known_len(), 0);
    }

    #[test]
    fn an_expired_entry_is_removed_only_while_it_is_the_one_held() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        let old = cache
            .fill(cache.ticket(&hash), hash, Some(rec.clone()))
            .unwrap();
        let newer = cache.fill(cache.ticket(&hash), hash, Some(rec)).unwrap();
        cache.remove_if_held(&hash, &old);
        let Some(Lookup::Fresh(served)) = get(&cache, &hash) else {
            panic!("removing a replaced entry removed its successor");
        };
        assert!(Arc::ptr_eq(&served, &newer));
        cache.remove_if_held(&hash, &newer);
        assert!(get(&cache, &hash).is_none());
    }

    #[test]
    fn a_change_to_one_key_spoils_only_fills_of_its_shard() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (changed, _) = record();
        // A key in another shard than the changed one.
        let (other, rec) = std::iter::repeat_with(record)
            .find(|(h, _)| shard(h) != shard(&changed))
            .unwrap();
        let ticket = cache.ticket(&other);
        cache.invalidate(&changed);
        cache.fill(ticket, other, Some(rec));
        assert!(matches!(get(&cache, &other), Some(Lookup::Fresh(_))));
    }

    #[test]
    fn entries_marked_for_revalidation_say_so_until_refilled() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let ((a_hash, a), (b, _)) = (record(), record());
        cache.fill(cache.ticket(&a_hash), a_hash, Some(a.clone()));
        cache.fill(cache.ticket(&b), b, None);
        cache.revalidate_all();
        assert!(matches!(get(&cache, &a_hash), Some(Lookup::Revalidate(_))));
        assert!(get(&cache, &b).is_none(), "unknown hashes are forgotten");
        cache.fill(cache.ticket(&a_hash), a_hash, Some(a));
        assert!(matches!(get(&cache, &a_hash), Some(Lookup::Fresh(_))));
    }

    #[test]
    fn a_new_key_spoils_only_fills_that_found_nothing() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let ((found, rec), (missing, _)) = (record(), record());
        let (t_found, t_missing) = (cache.ticket(&found), cache.ticket(&missing));
        cache.forget_unknown(&found);
        cache.forget_unknown(&missing);
        cache.fill(t_found, found, Some(rec));
        cache.fill(t_missing, missing, None);
        assert!(matches!(get(&cache, &found), Some(Lookup::Fresh(_))));
        assert!(get(&cache, &missing).is_none(), "the key may exist now");
    }

    #[test]
    fn a_new_key_forgets_only_that_it_was_unknown() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let ((known, rec), (unknown, _)) = (record(), record());
        cache.fill(cache.ticket(&known), known, Some(rec));
        cache.fill(cache.ticket(&unknown), unknown, None);
        cache.forget_unknown(&known);
        cache.forget_unknown(&unknown);
        assert!(matches!(get(&cache, &known), Some(Lookup::Fresh(_))));
        assert!(get(&cache, &unknown).is_none());
    }

    #[test]
    fn a_change_to_an_owner_has_its_keys_re_read() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let ((hash, rec), (other, other_rec)) = (record(), record());
        let mut other_rec = other_rec;
        other_rec.owner_id = OwnerId::parse("globex").unwrap();
        cache.fill(cache.ticket(&hash), hash, Some(rec.clone()));
        cache.fill(cache.ticket(&other), other, Some(other_rec));
        // Its keys answer nothing until re-read, not even while the store
        // cannot be reached (the change may be a suspension).
        cache.invalidate_owner(&rec.owner_id);
        assert!(matches!(get(&cache, &hash), Some(Lookup::Reread)));
        assert!(matches!(get(&cache, &other), Some(Lookup::Fresh(_))));
        // A fill that read the key while its owner changed is not kept.
        let ticket = cache.ticket(&hash);
        cache.invalidate_owner(&rec.owner_id);
        assert!(cache.fill(ticket, hash, Some(rec.clone())).is_some());
        assert!(get(&cache, &hash).is_none());
        cache.fill(cache.ticket(&hash), hash, Some(rec));
        assert!(matches!(get(&cache, &hash), Some(Lookup::Fresh(_))));
    }

    /// The entry a lookup answers with, which must be there.
    fn entry(lookup: Option<Lookup>) -> Arc<CachedKey> {
        match lookup {
            Some(Lookup::Fresh(e) | Lookup::Stale(e) | Lookup::Revalidate(e)) => e,
            other => panic!("expected a cached entry, got {other:?}"),
        }
    }

    #[test]
    fn a_revoked_key_is_cached_as_revoked_and_answers_from_the_front() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        cache.fill(cache.ticket(&hash), hash, Some(rec.clone()));
        // Twice: the second answers from the front.
        let before = entry(get(&cache, &hash));
        assert!(Arc::ptr_eq(&before, &entry(get(&cache, &hash))));
        let at = DateTime::from_timestamp(1_795_000_000, 0).unwrap();
        cache.revoke(&hash, at, false);
        let revoked = entry(get(&cache, &hash));
        assert!(
            !Arc::ptr_eq(&before, &revoked),
            "the old entry still answers"
        );
        assert_eq!(revoked.grant.revoked_at, Some(at));
        assert!(!revoked.grant.canary);
        assert_eq!(revoked.grant.id, rec.id);
        assert_eq!(revoked.loaded_at, before.loaded_at);
        let front = cache.front.get(&hash, cache.generation(&hash));
        assert!(
            front.is_some_and(|f| Arc::ptr_eq(&f, &revoked)),
            "the revoked entry is not the front's"
        );
        // Revoked again (this replica's Revoke, then its notice): left as is.
        cache.revoke(&hash, at, false);
        assert!(Arc::ptr_eq(&revoked, &entry(get(&cache, &hash))));
        // The notice's canary flag wins over the cached one.
        cache.revoke(&hash, at, true);
        assert!(entry(get(&cache, &hash)).grant.canary);
    }

    #[test]
    fn a_revocations_copy_is_kept_only_if_no_other_change_came_between() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        let at = DateTime::from_timestamp(1_795_000_000, 0).unwrap();
        // Another change to the key is applied after the revocation evicted
        // the old entry and read its ticket, before the copy is inserted:
        // the copy does not outlive it.
        cache.fill(cache.ticket(&hash), hash, Some(rec.clone()));
        let (ticket, copy) = cache.revoked_copy(&hash, at, false).unwrap();
        assert!(get(&cache, &hash).is_none());
        cache.invalidate(&hash);
        cache.keep_revoked(ticket, copy);
        assert!(get(&cache, &hash).is_none());
        cache.sync();
        assert_eq!(cache.known_len(), 0);
        // With nothing between, the copy answers.
        cache.fill(cache.ticket(&hash), hash, Some(rec));
        let (ticket, copy) = cache.revoked_copy(&hash, at, false).unwrap();
        cache.keep_revoked(ticket, copy.clone());
        assert!(Arc::ptr_eq(&entry(get(&cache, &hash)), &copy));
    }

    #[test]
    fn a_fill_that_read_the_store_before_a_revocation_is_not_kept() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        let ticket = cache.ticket(&hash);
        cache.fill(cache.ticket(&hash), hash, Some(rec.clone()));
        cache.revoke(&hash, DateTime::from_timestamp(1, 0).unwrap(), false);
        cache.fill(ticket, hash, Some(rec));
        assert!(get(&cache, &hash).is_none());
    }

    #[test]
    fn a_revoked_key_keeps_its_owners_epoch() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        let at = DateTime::from_timestamp(1_795_000_000, 0).unwrap();
        cache.fill(cache.ticket(&hash), hash, Some(rec.clone()));
        // The owner changed after the entry was read: the revoked entry is
        // re-read before use, as the entry it replaces would have been.
        cache.invalidate_owner(&rec.owner_id);
        cache.revoke(&hash, at, false);
        let held = cache.known.get(&hash).expect("the revoked entry is held");
        assert_eq!(held.grant.revoked_at, Some(at));
        assert!(matches!(get(&cache, &hash), Some(Lookup::Reread)));
    }

    #[test]
    fn the_front_never_answers_with_an_entry_moka_let_go_of() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        cache.fill(cache.ticket(&hash), hash, Some(rec));
        // The first lookup reads moka and fills the front; the second is the
        // front's.
        assert!(matches!(get(&cache, &hash), Some(Lookup::Fresh(_))));
        assert!(cache.front.get(&hash, 0).is_some());
        assert!(matches!(get(&cache, &hash), Some(Lookup::Fresh(_))));
        // A lookup that read moka just before the invalidation puts the
        // old entry back after it: still a miss.
        let old = cache.known.get(&hash).unwrap();
        cache.invalidate(&hash);
        assert!(cache.front.get(&hash, 0).is_none());
        cache.front.put(&old);
        assert!(cache.front.get(&hash, 0).is_none());
        assert!(get(&cache, &hash).is_none());
    }

    #[test]
    fn a_lookup_that_read_moka_before_an_invalidation_cannot_put_it_back_after() {
        // The entry another thread has just taken out of moka, its listener
        // not yet run: not in this cache's moka, not retired.
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let elsewhere = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        let late = elsewhere
            .fill(elsewhere.ticket(&hash), hash, Some(rec))
            .unwrap();
        // Before the invalidation: a lookup that reads the generation and
        // finds the entry in moka, ...
        let before = cache.generation(&hash);
        // ... or one that does so after its first bump, before the entry
        // leaves moka (by another thread, whose listener has not run).
        cache.bump(&hash);
        let during = cache.generation(&hash);
        cache.evict_and_close(&hash);
        // Either puts what it found in the front after the invalidation.
        for read_at in [before, during] {
            late.front_generation.fetch_max(read_at, Ordering::AcqRel);
            cache.front.put(&late);
            assert!(get(&cache, &hash).is_none());
        }
        // Without the invalidation in between it would have answered.
        let now_at = cache.generation(&hash);
        late.front_generation.fetch_max(now_at, Ordering::AcqRel);
        assert!(matches!(get(&cache, &hash), Some(Lookup::Fresh(_))));
    }

    #[test]
    fn another_keys_invalidation_costs_a_front_entry_one_moka_lookup() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        cache.fill(cache.ticket(&hash), hash, Some(rec));
        assert!(get(&cache, &hash).is_some());
        let first = cache.generation(&hash);
        assert!(cache.front.get(&hash, first).is_some());
        // Another key of the same shard changes.
        cache.bump(&hash);
        let after = cache.generation(&hash);
        assert!(cache.front.get(&hash, after).is_none());
        // One lookup through moka puts it back, current.
        assert!(matches!(get(&cache, &hash), Some(Lookup::Fresh(_))));
        assert!(cache.front.get(&hash, after).is_some());
    }

    #[test]
    fn a_replaced_entry_leaves_the_front() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let (hash, rec) = record();
        cache.fill(cache.ticket(&hash), hash, Some(rec.clone()));
        let Some(Lookup::Fresh(first)) = get(&cache, &hash) else {
            panic!("not cached");
        };
        let changed = Grant {
            scopes: Grant::for_test("acme", &["read"]).scopes,
            ..rec
        };
        cache.fill(cache.ticket(&hash), hash, Some(changed));
        let Some(Lookup::Fresh(second)) = get(&cache, &hash) else {
            panic!("not cached");
        };
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(second.grant.has_scope("read"));
        assert!(Arc::ptr_eq(&cache.front.get(&hash, 0).unwrap(), &second));
    }

    #[test]
    fn a_slot_answers_only_for_its_own_key() {
        let cache = KeyCache::new(&settings(Duration::from_secs(60)));
        let front = Front::new(1);
        let (a, a_rec) = record();
        let (b, b_rec) = record();
        let a_entry = cache.fill(cache.ticket(&a), a, Some(a_rec)).unwrap();
        let b_entry = cache.fill(cache.ticket(&b), b, Some(b_rec)).unwrap();
        front.put(&a_entry);
        assert!(Arc::ptr_eq(&front.get(&a, 0).unwrap(), &a_entry));
        front.put(&b_entry);
        assert!(front.get(&a, 0).is_none(), "b took the only slot");
        assert!(Arc::ptr_eq(&front.get(&b, 0).unwrap(), &b_entry));
        // Retiring a, no longer in the slot, leaves b there.
        front.retire(&a_entry);
        assert!(front.get(&b, 0).is_some());
        front.retire(&b_entry);
        assert!(front.get(&b, 0).is_none());
    }

    #[test]
    fn the_cache_is_bounded_by_the_weight_of_its_entries() {
        let cache = KeyCache::new(&CacheSettings {
            max_bytes: 64 * 1024,
            ..settings(Duration::from_secs(60))
        });
        let heavy = || {
            let mut grant = Grant::for_test("acme", &[]);
            grant.metadata =
                crate::key::Metadata::parse((0..16).map(|i| (format!("k{i}"), "v".repeat(1000))))
                    .unwrap();
            grant
        };
        let mut hashes = Vec::new();
        for _ in 0..20 {
            let (hash, _) = record();
            cache.fill(cache.ticket(&hash), hash, Some(heavy()));
            // Looked up once, so that the front points at it.
            assert!(get(&cache, &hash).is_some());
            hashes.push(hash);
        }
        cache.sync();
        assert!(cache.known_bytes() <= 64 * 1024, "{}", cache.known_bytes());
        assert!(
            cache.known_len() < 20,
            "{} heavy keys kept",
            cache.known_len()
        );
        // What moka evicted, the front no longer answers with (a slot may
        // also have gone to another key).
        for hash in &hashes {
            assert!(cache.front.get(hash, 0).is_none() || cache.known.contains_key(hash));
        }
    }
}
