//! Rate limits as a GCRA (generic cell rate algorithm): a window of `limit`
//! uses per `window` lets `limit` through at once and then one every
//! `window / limit`. Each window keeps one number, its theoretical arrival
//! time (TAT); a use is allowed if every window of the key allows it, and
//! only then counted in all of them.
//!
//! - `local`: per replica, in memory. With `share` s (a setting) each replica
//!   lets through `ceil(s × limit)` per window, so across N replicas the
//!   cluster allows between `s × limit` (all traffic on one replica) and
//!   `N × s × limit` (traffic spread evenly); with s = 1/N, at most `limit`,
//!   and as little as `limit / N` when all traffic lands on one replica.
//! - `redis`: one Lua script per check does the same atomically for every
//!   window of the key, on Redis's clock: exact across replicas. A Redis
//!   error or timeout falls back to `local` for that check (WARN, counted),
//!   never a failed check; the connection manager reconnects by itself.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use smallvec::SmallVec;

use super::WindowState;
use crate::{
    key::{KeyId, Limits, RateLimit},
    sync::lock,
};

/// Buckets with state held at most per replica (about 100 bytes each).
const MAX_BUCKETS: u64 = 1_000_000;

/// Allowed or not, with every window's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// When refused: when the same use would be allowed.
    pub retry_after: Duration,
    pub windows: Windows,
}

#[derive(Debug, Clone)]
pub struct RateSettings {
    /// `Some`: the exact, shared backend.
    pub redis_url: Option<String>,
    /// How long a check waits for Redis before falling back.
    pub redis_timeout: Duration,
    /// Each replica's share of a limit on the local backend.
    pub local_share: f64,
}

/// What the limiter did that no answer shows.
#[derive(Debug, Default)]
pub struct RateStats {
    redis_checks: AtomicU64,
    fallbacks: AtomicU64,
}

impl RateStats {
    /// Checks answered by Redis.
    pub fn redis_checks(&self) -> u64 {
        self.redis_checks.load(Ordering::Relaxed)
    }

    /// Checks the local backend answered because Redis did not.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct RateLimiter {
    local: Local,
    redis: Option<Arc<Redis>>,
    stats: Arc<RateStats>,
    /// When the last fallback was logged (ms since `origin`).
    last_warning_ms: Arc<AtomicU64>,
    origin: Instant,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Starts connecting to Redis in the background if it is configured: a
    /// Redis that is down at start only means local limits until it is up.
    pub fn new(settings: &RateSettings) -> Result<Self, redis::RedisError> {
        let redis = match &settings.redis_url {
            None => None,
            Some(url) => {
                let redis = Arc::new(Redis::new(url, settings.redis_timeout)?);
                // Connect now, so that the first checks already find Redis.
                if tokio::runtime::Handle::try_current().is_ok() {
                    let _ = redis.connection();
                }
                Some(redis)
            }
        };
        Ok(Self {
            local: Local::new(settings.local_share),
            redis,
            stats: Arc::default(),
            last_warning_ms: Arc::new(AtomicU64::new(0)),
            origin: Instant::now(),
        })
    }

    /// Limits in memory only, with this replica's `share` of each.
    pub fn local(share: f64) -> Self {
        Self {
            local: Local::new(share),
            redis: None,
            stats: Arc::default(),
            last_warning_ms: Arc::new(AtomicU64::new(0)),
            origin: Instant::now(),
        }
    }

    pub fn stats(&self) -> &RateStats {
        &self.stats
    }

    /// Checks one use of `cost` against every window of `limits`, and
    /// counts it if all allow it. `held`: the cache entry's hold on the
    /// bucket's local state, kept there on first use. `at`: when the check
    /// began (the local backend's clock; Redis counts on its own).
    pub async fn check(
        &self,
        limits: &Arc<Limits>,
        cost: u64,
        held: Option<&BucketRef>,
        at: Instant,
    ) -> RateDecision {
        if let Some(redis) = &self.redis {
            // Boxed: the round trip's future would otherwise be part of
            // every local check's too.
            match Box::pin(redis.check(limits, cost)).await {
                Ok(decision) => {
                    self.stats.redis_checks.fetch_add(1, Ordering::Relaxed);
                    return decision;
                }
                Err(why) => {
                    self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    self.warn_fallback(&why);
                }
            }
        }
        self.local.check(limits, cost, at, held)
    }

    /// [`check`](Self::check) without waiting, when the backend is `local`
    /// (`None` with Redis: that answer needs a round trip).
    pub fn check_in_memory(
        &self,
        limits: &Arc<Limits>,
        cost: u64,
        held: Option<&BucketRef>,
        at: Instant,
    ) -> Option<RateDecision> {
        match self.redis {
            Some(_) => None,
            None => Some(self.local.check(limits, cost, at, held)),
        }
    }

    /// One line every ten seconds at most: while Redis is down every
    /// limited check falls back.
    fn warn_fallback(&self, why: &str) {
        let now = self.origin.elapsed().as_millis() as u64;
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 10_000)
            && self
                .last_warning_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                error = why,
                fallbacks = self.stats.fallbacks(),
                "redis rate limits unavailable; enforcing local (per-replica) limits"
            );
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One window's GCRA state on this replica: its TAT, and the window it
/// counts for (a change to the key's windows resets only the windows that
/// changed).
#[derive(Debug, Clone)]
struct Slot {
    name: Box<str>,
    /// The replica's share of the declared limit.
    limit: u64,
    window: u64,
    interval: u64,
    tat: u64,
}

impl Slot {
    fn new(limit: &RateLimit, share: f64) -> Self {
        let scaled = scaled_limit(limit.limit(), share);
        let window = nanos(limit.window());
        Slot {
            name: limit.name().into(),
            limit: scaled,
            window,
            interval: (window / scaled).max(1),
            tat: 0,
        }
    }

    fn counts_for(&self, limit: &RateLimit, share: f64) -> bool {
        self.limit == scaled_limit(limit.limit(), share)
            && self.window == nanos(limit.window())
            && *self.name == *limit.name()
    }

    /// The GCRA step: the new TAT if the use fits, the window's state after
    /// it (or, if it does not fit, as it stands), and how long until it
    /// would fit.
    fn step(&self, now: u64, cost: u64) -> (Option<u64>, WindowState, u64) {
        let tat = self.tat.max(now);
        let new_tat = tat.saturating_add(cost.saturating_mul(self.interval));
        let fits = new_tat - now <= self.window;
        let after = if fits { new_tat } else { tat };
        let used = after - now;
        let state = WindowState {
            remaining: self.window.saturating_sub(used) / self.interval,
            reset: Duration::from_nanos(used),
        };
        let retry = if fits { 0 } else { new_tat - now - self.window };
        (fits.then_some(new_tat), state, retry)
    }
}

/// A replica's share of `limit`, never below 1.
fn scaled_limit(limit: u64, share: f64) -> u64 {
    ((limit as f64 * share).ceil() as u64).max(1)
}

/// One replica's GCRA state, in memory: a cell per bucket, found through
/// shards of plain hash maps, each behind its own lock, hashed by the
/// bucket id's random bits. A cache entry keeps its bucket's cell (see
/// [`BucketRef`]), so a cache hit locks only that cell: no shard lock, no
/// map lookup, no allocation.
#[derive(Clone)]
struct Local {
    shards: Arc<[Mutex<Buckets>]>,
    /// Buckets per shard before idle ones are dropped.
    shard_capacity: usize,
    share: f64,
    origin: Instant,
}

const SHARDS: usize = 64;

/// One shard: each bucket's cell.
type Buckets = HashMap<KeyId, Arc<BucketCell>, IdHash>;

/// Windows kept inline in a cell and in a decision (more spill to the heap).
const INLINE_WINDOWS: usize = 2;

/// Window states, in the key's window order.
pub type Windows = SmallVec<[WindowState; INLINE_WINDOWS]>;

/// A bucket's state on this replica, shared by the cache entries of every
/// key on the bucket (rotated keys share their predecessor's).
#[derive(Debug, Default)]
pub struct BucketCell {
    state: Mutex<CellState>,
}

impl BucketCell {
    /// What a cell for `windows` windows holds, with its `Arc` and its
    /// window names.
    pub fn bytes(windows: usize) -> usize {
        let spilled = if windows > INLINE_WINDOWS { windows } else { 0 };
        2 * std::mem::size_of::<usize>()
            + std::mem::size_of::<Self>()
            + spilled * std::mem::size_of::<Slot>()
            + windows * 16
    }
}

#[derive(Debug, Default)]
struct CellState {
    /// The limits the slots were last checked against: the same `Arc` (a
    /// pointer compare) needs no comparison of windows. Held, so that its
    /// address cannot be reused by other limits.
    checked_for: Option<Arc<Limits>>,
    slots: SmallVec<[Slot; INLINE_WINDOWS]>,
    /// Dropped from its shard to make room: whoever holds it looks again.
    evicted: bool,
}

/// A cache entry's hold on its bucket's cell; empty until its first
/// limited check on the local backend.
#[derive(Debug, Default)]
pub struct BucketRef(ArcSwapOption<BucketCell>);

/// Hashes a UUID v7 by its last eight bytes, which are random: no need to
/// pay for SipHash on ids nobody outside chooses.
#[derive(Clone, Copy, Default)]
struct IdHash;

impl BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(23) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    // The length prefix of the id's bytes: the same for every id.
    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 31)
    }
}

fn shard_of(id: &KeyId) -> usize {
    // The first random byte of a v7 id (bytes 0-5 are its timestamp), not
    // a bit of the map's own hash.
    usize::from(id.as_uuid().as_bytes()[7]) % SHARDS
}

impl Local {
    fn new(share: f64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_capacity: MAX_BUCKETS as usize / SHARDS,
            share: if share > 0.0 { share.min(1.0) } else { 1.0 },
            origin: Instant::now(),
        }
    }

    /// Makes room in a full shard: drops the buckets whose every window is
    /// full again (their state is what a new bucket starts with), and if
    /// none is, the one closest to full (the least it can forgive). A
    /// dropped cell is marked, so that an entry holding it looks again.
    fn make_room(buckets: &mut Buckets, now: u64) {
        let latest = |cell: &BucketCell| {
            lock(&cell.state)
                .slots
                .iter()
                .map(|s| s.tat)
                .max()
                .unwrap_or(0)
        };
        let before = buckets.len();
        buckets.retain(|_, cell| {
            let keep = latest(cell) > now;
            if !keep {
                lock(&cell.state).evicted = true;
            }
            keep
        });
        if buckets.len() == before
            && let Some(id) = buckets
                .iter()
                .min_by_key(|(_, cell)| latest(cell))
                .map(|(id, _)| *id)
            && let Some(cell) = buckets.remove(&id)
        {
            lock(&cell.state).evicted = true;
        }
    }

    /// The bucket's cell, from its shard (made if it has none).
    fn cell(&self, bucket: &KeyId, now: u64) -> Arc<BucketCell> {
        let mut shard = lock(&self.shards[shard_of(bucket)]);
        if let Some(cell) = shard.get(bucket) {
            return cell.clone();
        }
        if shard.len() >= self.shard_capacity {
            Self::make_room(&mut shard, now);
        }
        shard.entry(*bucket).or_default().clone()
    }

    /// Allocates nothing for up to [`INLINE_WINDOWS`] windows once the
    /// bucket has its cell and the entry holds it (on a key's first use,
    /// or a change of its windows, the bucket's slots are built).
    fn check(
        &self,
        limits: &Arc<Limits>,
        cost: u64,
        at: Instant,
        held: Option<&BucketRef>,
    ) -> RateDecision {
        let now = nanos(at.saturating_duration_since(self.origin));
        loop {
            let guard = held.map(|h| h.0.load());
            let fetched;
            let cell = match guard.as_ref().and_then(|g| g.as_deref()) {
                Some(cell) => cell,
                None => {
                    fetched = self.cell(&limits.bucket, now);
                    if let Some(h) = held {
                        h.0.store(Some(fetched.clone()));
                    }
                    &*fetched
                }
            };
            let mut state = lock(&cell.state);
            if state.evicted {
                drop(state);
                // Look again in the shard: a new cell (what a dropped bucket
                // forgot, it forgives).
                if let Some(h) = held {
                    h.0.store(None);
                }
                continue;
            }
            return self.step(&mut state, limits, cost, now);
        }
    }

    fn step(
        &self,
        state: &mut CellState,
        limits: &Arc<Limits>,
        cost: u64,
        now: u64,
    ) -> RateDecision {
        let share = self.share;
        let same = state
            .checked_for
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(l, limits));
        if !same {
            let current = state.slots.len() == limits.windows.len()
                && state
                    .slots
                    .iter()
                    .zip(limits.windows.iter())
                    .all(|(s, w)| s.counts_for(w, share));
            if !current {
                let rebuilt = limits
                    .windows
                    .iter()
                    .map(|w| {
                        let mut slot = Slot::new(w, share);
                        slot.tat = state
                            .slots
                            .iter()
                            .find(|s| s.counts_for(w, share))
                            .map_or(0, |s| s.tat);
                        slot
                    })
                    .collect();
                state.slots = rebuilt;
            }
            state.checked_for = Some(limits.clone());
        }
        let slots = &mut state.slots;
        let mut allowed = true;
        let mut retry = 0;
        for slot in slots.iter() {
            let (next, _, wait) = slot.step(now, cost);
            if next.is_none() {
                allowed = false;
                retry = retry.max(wait);
            }
        }
        let mut windows = Windows::new();
        for slot in slots.iter_mut() {
            if allowed {
                let (next, state, _) = slot.step(now, cost);
                slot.tat = next.unwrap_or(slot.tat);
                windows.push(state);
            } else {
                windows.push(slot.step(now, 0).1);
            }
        }
        RateDecision {
            allowed,
            retry_after: Duration::from_nanos(retry),
            windows,
        }
    }
}

/// The same GCRA in Redis, over every window of a key at once, on Redis's
/// own clock (microseconds). Keys share a hash tag per bucket, so a Redis
/// Cluster keeps a bucket's windows on one node. Returns
/// `{allowed, retry_us, remaining_1, reset_us_1, ...}`.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local n = #KEYS
local tats = {}
local fits = true
local retry = 0
for i = 1, n do
  local interval = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  tats[i] = tat
  local new_tat = tat + cost * interval
  if new_tat - now > window then
    fits = false
    if new_tat - now - window > retry then retry = new_tat - now - window end
  end
end
local out = { fits and 1 or 0, retry }
for i = 1, n do
  local interval = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local tat = tats[i]
  if fits then
    tat = tat + cost * interval
    redis.call('SET', KEYS[i], tat, 'PX', math.ceil(window / 1000) + 1)
  end
  local used = tat - now
  local remaining = math.floor((window - used) / interval)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = used
end
return out
"#;

struct Redis {
    client: redis::Client,
    connection: ArcSwapOption<ConnectionManager>,
    connecting: AtomicBool,
    script: redis::Script,
    timeout: Duration,
}

impl Redis {
    fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: ArcSwapOption::empty(),
            connecting: AtomicBool::new(false),
            script: redis::Script::new(GCRA),
            timeout,
        })
    }

    /// The connection, or `None` (and a connect attempt in the background).
    fn connection(self: &Arc<Self>) -> Option<ConnectionManager> {
        if let Some(conn) = &*self.connection.load() {
            return Some((**conn).clone());
        }
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(this.timeout.max(Duration::from_millis(200))))
                    .set_response_timeout(Some(this.timeout))
                    .set_number_of_retries(1);
                match ConnectionManager::new_with_config(this.client.clone(), config).await {
                    Ok(conn) => {
                        this.connection.store(Some(Arc::new(conn)));
                        tracing::info!("connected to redis for rate limits");
                    }
                    Err(err) => {
                        tracing::debug!(%err, "cannot connect to redis yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                this.connecting.store(false, Ordering::Release);
            });
        }
        None
    }

    async fn check(self: &Arc<Self>, limits: &Limits, cost: u64) -> Result<RateDecision, String> {
        let Some(mut conn) = self.connection() else {
            return Err("not connected".to_owned());
        };
        let mut invocation = self.script.prepare_invoke();
        for w in limits.windows.iter() {
            invocation.key(format!("kw:rl:{{{}}}:{}", limits.bucket, w.name()));
        }
        invocation.arg(cost);
        for w in limits.windows.iter() {
            let interval = w.emission_interval().as_micros().max(1);
            invocation
                .arg(u64::try_from(interval).unwrap_or(u64::MAX))
                .arg(u64::try_from(w.window().as_micros()).unwrap_or(u64::MAX));
        }
        let answer: Vec<i64> =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| format!("no answer within {:?}", self.timeout))?
                .map_err(|e| e.to_string())?;
        let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        if answer.len() != 2 + 2 * limits.windows.len() {
            return Err(format!("unexpected answer of {} values", answer.len()));
        }
        Ok(RateDecision {
            allowed: answer[0] == 1,
            retry_after: micros(answer[1]),
            windows: answer[2..]
                .chunks(2)
                .map(|c| WindowState {
                    remaining: u64::try_from(c[0]).unwrap_or(0),
                    reset: micros(c[1]),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(windows: &[(&str, u64, u64)]) -> Arc<Limits> {
        Arc::new(limits_on(KeyId::new_v7(), windows))
    }

    fn limits_on(bucket: KeyId, windows: &[(&str, u64, u64)]) -> Limits {
        Limits::new(
            bucket,
            windows
                .iter()
                .map(|(n, l, w)| RateLimit::new(n, *l, Duration::from_secs(*w)).unwrap())
                .collect(),
            false,
        )
        .unwrap()
    }

    #[test]
    fn a_window_lets_its_limit_through_at_once_then_refills_evenly() {
        let local = Local::new(1.0);
        let l = limits(&[("burst", 10, 10)]);
        let t0 = Instant::now();
        for i in 0..10 {
            let d = local.check(&l, 1, t0, None);
            assert!(d.allowed, "use {i}");
            assert_eq!(d.windows[0].remaining, 9 - i);
        }
        let refused = local.check(&l, 1, t0, None);
        assert!(!refused.allowed);
        assert!(
            refused.retry_after <= Duration::from_secs(1)
                && refused.retry_after > Duration::from_millis(900)
        );
        // One use comes back every second.
        assert!(
            local
                .check(&l, 1, t0 + Duration::from_millis(1001), None)
                .allowed
        );
        assert!(
            !local
                .check(&l, 1, t0 + Duration::from_millis(1002), None)
                .allowed
        );
    }

    #[test]
    fn a_use_counts_only_if_every_window_allows_it() {
        let local = Local::new(1.0);
        let l = limits(&[("burst", 100, 1), ("daily", 3, 86_400)]);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(local.check(&l, 1, t0, None).allowed);
        }
        let refused = local.check(&l, 1, t0, None);
        assert!(!refused.allowed);
        // The refused use left the burst window alone.
        assert_eq!(refused.windows[0].remaining, 97);
        assert_eq!(refused.windows[1].remaining, 0);
    }

    #[test]
    fn a_replicas_share_scales_its_limit() {
        let local = Local::new(0.5);
        let l = limits(&[("burst", 10, 10)]);
        let t0 = Instant::now();
        let allowed = (0..20)
            .filter(|_| local.check(&l, 1, t0, None).allowed)
            .count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn a_cost_spends_several_uses() {
        let local = Local::new(1.0);
        let l = limits(&[("burst", 10, 10)]);
        let t0 = Instant::now();
        assert!(local.check(&l, 7, t0, None).allowed);
        assert!(!local.check(&l, 4, t0, None).allowed);
        assert!(local.check(&l, 3, t0, None).allowed);
    }

    #[test]
    fn a_full_shard_forgets_the_buckets_with_nothing_to_remember() {
        let mut local = Local::new(1.0);
        local.shard_capacity = 2;
        let t0 = Instant::now();
        // Keys of one shard: one busy (its window full), the rest idle.
        let mut same_shard = Vec::new();
        while same_shard.len() < 4 {
            let l = limits(&[("burst", 2, 10)]);
            if shard_of(&l.bucket) == 0 {
                same_shard.push(l);
            }
        }
        let [busy, idle, third, fourth] = <[Arc<Limits>; 4]>::try_from(same_shard).ok().unwrap();
        assert!(local.check(&busy, 2, t0, None).allowed);
        assert!(local.check(&idle, 1, t0, None).allowed);
        // Ten seconds on, `idle` is full again, `busy` is not (it spent 2 of
        // 2, refilling one every 5 s, and spends again).
        let later = t0 + Duration::from_secs(10);
        assert!(local.check(&busy, 2, later, None).allowed);
        assert!(local.check(&third, 1, later, None).allowed);
        // `busy` kept its state: it has nothing left.
        assert!(!local.check(&busy, 1, later, None).allowed);
        // With no bucket full again, the one closest to full goes.
        assert!(local.check(&fourth, 1, later, None).allowed);
        assert!(lock(&local.shards[0]).len() <= 2);
        assert!(!local.check(&busy, 1, later, None).allowed);
    }

    #[test]
    fn the_keys_of_one_bucket_share_its_cell_through_their_entries() {
        let local = Local::new(1.0);
        let bucket = KeyId::new_v7();
        // A rotated key and its successor: two entries, two reads of the
        // same limits, one bucket.
        let old = Arc::new(limits_on(bucket, &[("burst", 4, 10)]));
        let new = Arc::new(limits_on(bucket, &[("burst", 4, 10)]));
        let (old_ref, new_ref) = (BucketRef::default(), BucketRef::default());
        let t0 = Instant::now();
        let mut allowed = 0;
        for i in 0..8 {
            let (l, r) = if i % 2 == 0 {
                (&old, &old_ref)
            } else {
                (&new, &new_ref)
            };
            allowed += usize::from(local.check(l, 1, t0, Some(r)).allowed);
        }
        assert_eq!(allowed, 4);
        let (a, b) = (
            old_ref.0.load_full().unwrap(),
            new_ref.0.load_full().unwrap(),
        );
        assert!(Arc::ptr_eq(&a, &b));
        // A change of the windows seen through one entry resets only what
        // changed, for both.
        let wider = Arc::new(limits_on(
            bucket,
            &[("burst", 4, 10), ("daily", 100, 86_400)],
        ));
        let d = local.check(&wider, 1, t0, Some(&new_ref));
        assert!(!d.allowed, "the burst window kept its state");
        assert_eq!(d.windows.len(), 2);
        assert_eq!(d.windows[1].remaining, 100);
    }

    #[test]
    fn an_entry_holding_a_dropped_cell_looks_again() {
        let mut local = Local::new(1.0);
        local.shard_capacity = 1;
        let t0 = Instant::now();
        let mut same_shard = Vec::new();
        while same_shard.len() < 2 {
            let l = limits(&[("burst", 2, 10)]);
            if shard_of(&l.bucket) == 0 {
                same_shard.push(l);
            }
        }
        let (first, second) = (&same_shard[0], &same_shard[1]);
        let (first_ref, sibling_ref) = (BucketRef::default(), BucketRef::default());
        assert!(local.check(first, 2, t0, Some(&first_ref)).allowed);
        // Ten seconds on, `first` is full again: `second` takes its place.
        let later = t0 + Duration::from_secs(10);
        assert!(local.check(second, 1, later, None).allowed);
        let dropped = first_ref.0.load_full().unwrap();
        assert!(lock(&dropped.state).evicted);
        // The entry still holding the dropped cell and a sibling entry that
        // never held one end up on the same new cell, and count together.
        assert!(local.check(first, 1, later, Some(&first_ref)).allowed);
        assert!(local.check(first, 1, later, Some(&sibling_ref)).allowed);
        assert!(!local.check(first, 1, later, Some(&first_ref)).allowed);
        let (a, b) = (
            first_ref.0.load_full().unwrap(),
            sibling_ref.0.load_full().unwrap(),
        );
        assert!(Arc::ptr_eq(&a, &b) && !Arc::ptr_eq(&a, &dropped));
    }
}
