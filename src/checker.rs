//! The hot path, shared by every front door:
//! source throttle -> credential -> parse (format, checksum) -> SHA-256 ->
//! cache -> (miss: membership filter -> one indexed SELECT, single-flight)
//! -> decide.
//!
//! What it costs an attacker's keys, in order: a blocked source is refused
//! before parsing; a malformed key before hashing; a key no replica ever
//! stored (the membership filter rules it out) without a lookup, except for
//! a small per-replica budget of lookups that covers a key minted on another
//! replica whose notice has not arrived yet. Concurrent misses for one hash
//! share one SELECT, and lookups draw on a bounded share of the database
//! connections, so the admin plane always gets one.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::{
    cache::{CachedKey, KeyCache, Lookup, Ticket},
    filter::KeyFilter,
    key::{ApiKey, Grant, KeyHash, KeyId, Limits, OwnerId},
    limits::{
        LimitReport,
        credits::{Clock, CreditBook, NotSpent},
        rate::{RateLimiter, RateStats},
    },
    metrics::{FrontDoors, Histogram, SLOW_BUCKETS},
    policy::{self, Decision, Reason},
    store::{Store, StoreError},
    sync::lock,
    throttle::{Source, SourceThrottle, ThrottleSettings},
    usage::{UsageRecorder, UsageStats},
};

/// A check's answer: the decision and, once the key is known, its grant.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub decision: Decision,
    entry: Option<Arc<CachedKey>>,
    /// How the key's rate limits and credits stand, if it has any.
    pub limits: Option<LimitReport>,
    /// When the key's policy was decided: the limits and the usage count
    /// take the same reading of the clock.
    decided_at: Option<DateTime<Utc>>,
}

impl Outcome {
    /// The key, once known (on allows and on denials after the lookup).
    pub fn key(&self) -> Option<&Grant> {
        self.entry.as_deref().map(|e| &e.grant)
    }

    /// The cache entry the decision was made on, if the key is known.
    pub fn entry(&self) -> Option<&CachedKey> {
        self.entry.as_deref()
    }

    /// A denial settled before the key is known.
    pub fn denied(reason: Reason) -> Self {
        Self {
            decision: Decision::new(reason),
            entry: None,
            limits: None,
            decided_at: None,
        }
    }

    fn blocked(retry_after: Duration) -> Self {
        Self {
            decision: Decision::source_blocked(retry_after),
            entry: None,
            limits: None,
            decided_at: None,
        }
    }

    /// The key's limits, as its grant declares them.
    pub fn declared_limits(&self) -> Option<&Limits> {
        self.key().and_then(|g| g.limits.as_deref())
    }
}

/// Why a check could not be decided. Callers must not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Undecided {
    /// The key is not cached and the store could not be read in time (down,
    /// hung, or every check connection busy).
    #[error("key store unavailable")]
    Unavailable,
    /// The store answered with something unusable (logged where it happened).
    #[error("internal error")]
    Internal,
}

impl From<&StoreError> for Undecided {
    fn from(err: &StoreError) -> Self {
        if err.is_retryable() {
            Undecided::Unavailable
        } else {
            Undecided::Internal
        }
    }
}

/// What the cache alone can say.
#[derive(Debug)]
pub enum Cached {
    Answered(Outcome),
    /// Not cached (or to be re-read first): the store must be read for this
    /// hash. The old entry, if any, may answer only if the store cannot be.
    Miss(KeyHash, Option<Arc<CachedKey>>),
    /// Not cached, and the membership filter says no such key exists; a
    /// lookup was granted from the unknown-key budget, in case the key was
    /// minted elsewhere a moment ago.
    Unlikely(KeyHash),
}

#[derive(Debug, Clone, Copy)]
pub struct CheckerSettings {
    /// Lookups per second for keys the membership filter rules out.
    pub unknown_lookups_per_second: u32,
    pub unknown_lookup_burst: u32,
    pub throttle: ThrottleSettings,
    /// Count each check for metrics (cache hits); off with `--metrics-addr off`.
    pub per_check_metrics: bool,
    /// Re-reads of stale entries at once (a share of the check connections).
    pub background_refreshes: usize,
    /// Budgeted lookups of keys the filter rules out, at once (a share of
    /// the check connections): beyond it the filter's word is taken.
    pub unlikely_lookups: usize,
}

/// The settings' defaults (`config.rs`).
impl Default for CheckerSettings {
    fn default() -> Self {
        Self {
            unknown_lookups_per_second: 20,
            unknown_lookup_burst: 100,
            throttle: ThrottleSettings {
                threshold: 20,
                window: Duration::from_secs(60),
                cooldown: Duration::from_secs(60),
            },
            background_refreshes: 3,
            unlikely_lookups: 2,
            per_check_metrics: true,
        }
    }
}

/// What the checker did that no store counter shows.
#[derive(Debug)]
pub struct CheckerStats {
    filter_rejections: AtomicU64,
    budget_lookups: AtomicU64,
    sources_blocked: AtomicU64,
    blocked_checks: AtomicU64,
    cache_hits: AtomicU64,
    stale_answers: AtomicU64,
    cache_misses: AtomicU64,
    negative_hits: AtomicU64,
    canary_trips: AtomicU64,
    lookups_found: AtomicU64,
    lookups_not_found: AtomicU64,
    lookups_failed: AtomicU64,
    lookup_duration: Histogram,
}

impl Default for CheckerStats {
    fn default() -> Self {
        Self {
            filter_rejections: AtomicU64::new(0),
            budget_lookups: AtomicU64::new(0),
            sources_blocked: AtomicU64::new(0),
            blocked_checks: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            stale_answers: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            negative_hits: AtomicU64::new(0),
            canary_trips: AtomicU64::new(0),
            lookups_found: AtomicU64::new(0),
            lookups_not_found: AtomicU64::new(0),
            lookups_failed: AtomicU64::new(0),
            lookup_duration: Histogram::new(SLOW_BUCKETS),
        }
    }
}

impl CheckerStats {
    /// Checks answered from a fresh cache entry.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    /// Checks answered from an entry past its TTL (re-read in the background).
    pub fn stale_answers(&self) -> u64 {
        self.stale_answers.load(Ordering::Relaxed)
    }

    /// Checks of a key the cache did not hold, or held only to re-read
    /// before use (filter rejections included: they are misses the filter
    /// answered).
    pub fn cache_misses(&self) -> u64 {
        self.cache_misses.load(Ordering::Relaxed)
    }

    /// Checks answered unknown from the cache of unknown keys.
    pub fn negative_hits(&self) -> u64 {
        self.negative_hits.load(Ordering::Relaxed)
    }

    /// Presentations of canary keys.
    pub fn canary_trips(&self) -> u64 {
        self.canary_trips.load(Ordering::Relaxed)
    }

    /// Store reads for checks that found the key.
    pub fn lookups_found(&self) -> u64 {
        self.lookups_found.load(Ordering::Relaxed)
    }

    /// Store reads for checks that found no such key.
    pub fn lookups_not_found(&self) -> u64 {
        self.lookups_not_found.load(Ordering::Relaxed)
    }

    /// Store reads for checks that failed.
    pub fn lookups_failed(&self) -> u64 {
        self.lookups_failed.load(Ordering::Relaxed)
    }

    /// How long store reads for checks took.
    pub fn lookup_duration(&self) -> &Histogram {
        &self.lookup_duration
    }

    /// Keys refused on the membership filter's word, without a lookup.
    pub fn filter_rejections(&self) -> u64 {
        self.filter_rejections.load(Ordering::Relaxed)
    }

    /// Lookups of keys the filter ruled out (spent from the budget).
    pub fn budget_lookups(&self) -> u64 {
        self.budget_lookups.load(Ordering::Relaxed)
    }

    /// Sources blocked by brute-force protection.
    pub fn sources_blocked(&self) -> u64 {
        self.sources_blocked.load(Ordering::Relaxed)
    }

    /// Checks refused because their source was blocked.
    pub fn blocked_checks(&self) -> u64 {
        self.blocked_checks.load(Ordering::Relaxed)
    }
}

type Loaded = Result<Option<Arc<CachedKey>>, Undecided>;

/// What enforces limits after an allow.
#[derive(Debug, Clone)]
pub struct Limiting {
    pub rate: RateLimiter,
    pub credits: CreditBook,
    /// Decisions and credit periods go by this clock (tests inject one).
    pub clock: Arc<dyn Clock>,
}

impl Limiting {
    /// Rate limits in memory (the whole limit per replica), credits in
    /// `store`, the system clock.
    pub fn in_memory(store: Store) -> Self {
        Self {
            rate: RateLimiter::local(1.0),
            credits: CreditBook::new(store, 1000),
            clock: Arc::new(crate::limits::credits::SystemClock),
        }
    }
}

/// Store reads in flight, one per hash.
#[derive(Debug, Default)]
struct Flights(Mutex<HashMap<KeyHash, Flight>>);

#[derive(Debug)]
struct Flight {
    /// The cache's ticket for the hash when the read began.
    ticket: Ticket,
    loaded: watch::Receiver<Option<Loaded>>,
}

/// What [`Flights::join`] found.
#[derive(Debug)]
enum Joined {
    /// A read is in flight: wait for what it loads.
    Waiting(watch::Receiver<Option<Loaded>>),
    /// None that may be joined: read, and send what was loaded.
    Started(
        watch::Sender<Option<Loaded>>,
        watch::Receiver<Option<Loaded>>,
    ),
}

impl Flights {
    fn contains(&self, hash: &KeyHash) -> bool {
        lock(&self.0).contains_key(hash)
    }

    /// The read of `hash` in flight, if it began after everything the
    /// caller's `ticket` (the cache's ticket when it looked) has seen, else
    /// a new read in its place. A read that began before an invalidation
    /// (of its shard, an owner, or a creation) that this caller has already
    /// seen may bring back what the invalidation removed, such as a key
    /// revoked while the read was on its way: its own fill is not kept, and
    /// a check that began after the revocation must not be answered with it
    /// either.
    fn join(&self, hash: KeyHash, ticket: Ticket) -> Joined {
        let mut flights = lock(&self.0);
        if let Some(flight) = flights.get(&hash).filter(|f| f.ticket.covers(&ticket)) {
            return Joined::Waiting(flight.loaded.clone());
        }
        let (tx, rx) = watch::channel(None);
        let loaded = rx.clone();
        flights.insert(hash, Flight { ticket, loaded });
        Joined::Started(tx, rx)
    }

    /// The read of `hash` that began at `ticket` is done: it is no longer
    /// joined, unless a later read with another ticket took its place. (A
    /// read replaces one only with a ticket the other does not cover; racing
    /// misses may still leave a later read with an equal ticket, which this
    /// then removes: the next miss only reads again.)
    fn land(&self, hash: &KeyHash, ticket: Ticket) {
        let mut flights = lock(&self.0);
        if flights.get(hash).is_some_and(|f| f.ticket == ticket) {
            flights.remove(hash);
        }
    }
}

/// Takes a read out of [`Flights`] when dropped, after it sent its result
/// (or panicked, and its waiters saw the sender go).
struct Landing<'a> {
    flights: &'a Flights,
    hash: KeyHash,
    ticket: Ticket,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.flights.land(&self.hash, self.ticket);
    }
}

#[derive(Debug, Clone)]
pub struct Checker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cache: KeyCache,
    filter: Arc<KeyFilter>,
    store: Store,
    usage: Arc<UsageRecorder>,
    /// One store read per hash at a time: misses and revalidations of the
    /// same key wait for the read in flight.
    flights: Flights,
    throttle: SourceThrottle,
    unknown_budget: Budget,
    /// Background re-reads of stale entries allowed at once.
    refreshes: Arc<tokio::sync::Semaphore>,
    /// Budgeted lookups of filter-rejected keys allowed at once.
    unlikely: Arc<tokio::sync::Semaphore>,
    rate: RateLimiter,
    credits: CreditBook,
    clock: Arc<dyn Clock>,
    /// Canary keys reported in the last second.
    canary_reports: moka::sync::Cache<KeyId, ()>,
    stats: CheckerStats,
    doors: FrontDoors,
    /// When the last store failure was logged (ms since `origin`).
    last_failure_log_ms: AtomicU64,
    origin: Instant,
}

impl Checker {
    pub fn new(
        cache: KeyCache,
        filter: Arc<KeyFilter>,
        store: Store,
        usage: Arc<UsageRecorder>,
        settings: CheckerSettings,
        limiting: Limiting,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                rate: limiting.rate,
                credits: limiting.credits,
                clock: limiting.clock,
                cache,
                filter,
                store,
                usage,
                flights: Flights::default(),
                throttle: SourceThrottle::new(settings.throttle),
                unknown_budget: Budget::new(
                    settings.unknown_lookups_per_second,
                    settings.unknown_lookup_burst,
                ),
                refreshes: Arc::new(tokio::sync::Semaphore::new(
                    settings.background_refreshes.max(1),
                )),
                unlikely: Arc::new(tokio::sync::Semaphore::new(
                    settings.unlikely_lookups.max(1),
                )),
                canary_reports: moka::sync::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(Duration::from_secs(1))
                    .build(),
                stats: CheckerStats::default(),
                doors: FrontDoors::new(settings.per_check_metrics),
                last_failure_log_ms: AtomicU64::new(0),
                origin: Instant::now(),
            }),
        }
    }

    pub fn cache(&self) -> &KeyCache {
        &self.inner.cache
    }

    /// What each front door answered, and how fast.
    pub fn doors(&self) -> &FrontDoors {
        &self.inner.doors
    }

    /// What the usage flusher wrote, carried over and dropped.
    pub fn usage_stats(&self) -> &UsageStats {
        self.inner.usage.stats()
    }

    /// What the rate limiter did that no answer shows.
    pub fn rate_stats(&self) -> &RateStats {
        self.inner.rate.stats()
    }

    pub fn filter(&self) -> &KeyFilter {
        &self.inner.filter
    }

    pub fn stats(&self) -> &CheckerStats {
        &self.inner.stats
    }

    /// Decides for a credential as presented: a bare key or a whole
    /// `Authorization` header value (`Bearer <key>`). `None`: none presented.
    /// `client` is the address brute-force protection counts failures
    /// against (Envoy's downstream peer, the caller's `client_ip`, or the
    /// gRPC peer).
    ///
    /// A denial is an `Ok`; `Err` means the answer cannot be known, and
    /// callers must not allow.
    pub async fn check(
        &self,
        credential: Option<&str>,
        request: &policy::Request<'_>,
        client: Option<IpAddr>,
    ) -> Result<Outcome, Undecided> {
        self.check_at(credential, request, client, Instant::now())
            .await
    }

    /// [`check`](Self::check) for a check that began at `now` (a front door
    /// that times its checks reads the clock once for both).
    pub async fn check_at(
        &self,
        credential: Option<&str>,
        request: &policy::Request<'_>,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Result<Outcome, Undecided> {
        let source = client.map(Source::from);
        if let Some(retry_after) = self.inner.throttle.blocked(source, now) {
            self.inner
                .stats
                .blocked_checks
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Outcome::blocked(retry_after));
        }
        let mut outcome = match self.check_cached(credential, request, now) {
            Cached::Answered(outcome) => outcome,
            Cached::Miss(hash, old) => self.check_store(hash, old, request).await?,
            Cached::Unlikely(hash) => match self.inner.unlikely.clone().try_acquire_owned() {
                Ok(_permit) => self.check_store(hash, None, request).await?,
                // Enough such lookups are running: a burst of forged keys
                // must not queue for (and time out on) the check pool.
                Err(_) => {
                    self.inner
                        .stats
                        .filter_rejections
                        .fetch_add(1, Ordering::Relaxed);
                    Outcome::denied(Reason::UnknownKey)
                }
            },
        };
        if let Some(entry) = outcome.entry.as_ref().filter(|e| e.grant.canary) {
            self.canary_tripped(&entry.grant, request.resource, client);
            // Exactly what a never-minted key gets: nothing about the key.
            outcome = Outcome::denied(Reason::UnknownKey);
        }
        if outcome.decision.allowed()
            && outcome
                .entry
                .as_ref()
                .is_some_and(|e| e.grant.limits.is_some())
        {
            // Windows on the local backend are settled in place; credits
            // and Redis may need a round trip.
            if !self.limit_in_memory(&mut outcome, request, now) {
                outcome = self.enforce_limits(outcome, request, now).await?;
            }
        }
        if outcome.decision.is_failed_presentation() && self.inner.throttle.failed(source, now) {
            self.inner
                .stats
                .sources_blocked
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                client = ?client,
                reason = outcome.decision.reason.as_str(),
                "too many invalid API keys from one address; refusing it for the cooldown"
            );
        }
        Ok(outcome)
    }

    /// The hot path without I/O: answers from the credential alone, the
    /// cache or the membership filter, or says which hash must be read.
    /// `now`: when the check began.
    pub fn check_cached(
        &self,
        credential: Option<&str>,
        request: &policy::Request<'_>,
        now: Instant,
    ) -> Cached {
        let hash = match credential_hash(credential) {
            Ok(hash) => hash,
            Err(reason) => return Cached::Answered(Outcome::denied(reason)),
        };
        let inner = &*self.inner;
        let entry = match inner.cache.get(&hash, now) {
            Some(Lookup::Fresh(entry)) => {
                if inner.doors.counting() {
                    inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                }
                entry
            }
            // Stale-while-revalidate: answer now, re-read in the background.
            // While the store is unreachable the stale entry keeps answering
            // until the cache drops it (soft TTL + stale_if_error).
            Some(Lookup::Stale(entry)) => {
                inner.stats.stale_answers.fetch_add(1, Ordering::Relaxed);
                self.refresh_in_background(hash);
                entry
            }
            Some(Lookup::Revalidate(entry)) => {
                inner.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
                return Cached::Miss(hash, Some(entry));
            }
            // A key this replica holds: read without asking the membership
            // filter, which may not know a key cached by a budgeted lookup.
            Some(Lookup::Reread) => {
                inner.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
                return Cached::Miss(hash, None);
            }
            Some(Lookup::Unknown) => {
                inner.stats.negative_hits.fetch_add(1, Ordering::Relaxed);
                return Cached::Answered(Outcome::denied(Reason::UnknownKey));
            }
            None => {
                inner.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
                // A key the filter rules out that is being read already
                // (a burst of checks of a key minted on another replica a
                // moment ago) joins that read: one budget token per read,
                // not per check.
                if !inner.filter.might_contain(&hash) && !self.in_flight(&hash) {
                    if !inner.unknown_budget.take() {
                        inner
                            .stats
                            .filter_rejections
                            .fetch_add(1, Ordering::Relaxed);
                        return Cached::Answered(Outcome::denied(Reason::UnknownKey));
                    }
                    inner.stats.budget_lookups.fetch_add(1, Ordering::Relaxed);
                    return Cached::Unlikely(hash);
                }
                return Cached::Miss(hash, None);
            }
        };
        Cached::Answered(self.decide(&entry, request))
    }

    async fn check_store(
        &self,
        hash: KeyHash,
        old: Option<Arc<CachedKey>>,
        request: &policy::Request<'_>,
    ) -> Result<Outcome, Undecided> {
        let mut flight = self.flight(hash);
        let loaded = match flight.wait_for(Option::is_some).await {
            Ok(loaded) => loaded.clone().unwrap_or(Err(Undecided::Internal)),
            // The loading task died (a panic): nothing was decided.
            Err(_) => Err(Undecided::Internal),
        };
        match loaded {
            Ok(Some(entry)) => Ok(self.decide(&entry, request)),
            Ok(None) => Ok(Outcome::denied(Reason::UnknownKey)),
            // Stale-if-error for an entry that was due for a re-read.
            Err(Undecided::Unavailable) => match old {
                Some(old) if self.inner.cache.within_stale_if_error(&old) => {
                    Ok(self.decide(&old, request))
                }
                _ => Err(Undecided::Unavailable),
            },
            Err(err) => Err(err),
        }
    }

    /// Re-reads a stale entry while it keeps answering, unless as many
    /// re-reads as `background_refreshes` are running already: then the next
    /// check of the key tries again. Re-reads never take every check
    /// connection from misses, whose callers are waiting. Out of line: the
    /// hit path keeps its instructions together (BENCHMARKS.md, "The hot
    /// path's code").
    #[cold]
    #[inline(never)]
    fn refresh_in_background(&self, hash: KeyHash) {
        let Ok(permit) = self.inner.refreshes.clone().try_acquire_owned() else {
            return;
        };
        let flight = self.flight(hash);
        tokio::spawn(async move {
            let mut flight = flight;
            let _ = flight.wait_for(Option::is_some).await;
            drop(permit);
        });
    }

    fn in_flight(&self, hash: &KeyHash) -> bool {
        self.inner.flights.contains(hash)
    }

    /// The store read in flight for `hash`, or a new one (see
    /// [`Flights::join`]). The read runs in its own task, so it completes
    /// (and fills the cache) even when every caller waiting for it gave up.
    fn flight(&self, hash: KeyHash) -> watch::Receiver<Option<Loaded>> {
        let ticket = self.inner.cache.ticket(&hash);
        let (tx, rx) = match self.inner.flights.join(hash, ticket) {
            Joined::Waiting(rx) => return rx,
            Joined::Started(tx, rx) => (tx, rx),
        };
        let this = self.clone();
        // The read runs in its own task: it gets the span of the (traced)
        // check that started it, if any.
        let span = crate::telemetry::store_span("find_grant");
        let read = async move {
            // Lands however the read ends: a panic in it must not leave a
            // dead read for later checks to join.
            let _landing = Landing {
                flights: &this.inner.flights,
                hash,
                ticket,
            };
            let loaded = this.read(hash, ticket).await;
            let _ = tx.send(Some(loaded));
        };
        if span.is_none() {
            tokio::spawn(read);
        } else {
            use tracing::Instrument as _;
            tokio::spawn(read.instrument(span));
        }
        rx
    }

    /// Reads the store for `hash` and fills the cache with what it found,
    /// unless an invalidation since `ticket` overtook the read.
    async fn read(&self, hash: KeyHash, ticket: Ticket) -> Loaded {
        let inner = &*self.inner;
        let started = Instant::now();
        let found = inner.store.find_grant(&hash).await;
        inner.stats.lookup_duration.observe(started.elapsed());
        match found {
            Ok(found) => {
                let counter = if found.is_some() {
                    &inner.stats.lookups_found
                } else {
                    &inner.stats.lookups_not_found
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(inner.cache.fill(ticket, hash, found))
            }
            Err(err) => {
                inner.stats.lookups_failed.fetch_add(1, Ordering::Relaxed);
                if err.is_retryable() {
                    inner.store.suspect_connections();
                }
                self.log_failure(&err);
                Err(Undecided::from(&err))
            }
        }
    }

    /// One line per second at most: during an outage every miss fails.
    fn log_failure(&self, err: &StoreError) {
        let inner = &*self.inner;
        let now_ms = inner.origin.elapsed().as_millis() as u64;
        let last = inner.last_failure_log_ms.load(Ordering::Relaxed);
        if (last == 0 || now_ms >= last + 1000)
            && inner
                .last_failure_log_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %crate::telemetry::chain(err), "cannot read a key from the store");
        }
    }

    fn decide(&self, entry: &Arc<CachedKey>, request: &policy::Request<'_>) -> Outcome {
        let now = self.inner.clock.now();
        let decision = policy::decide(&entry.grant, request, now);
        // A key with limits counts as used only once they allow it.
        if decision.allowed() && entry.grant.limits.is_none() {
            self.inner.usage.record(entry, now);
        }
        Outcome {
            decision,
            entry: Some(entry.clone()),
            limits: None,
            decided_at: Some(now),
        }
    }

    /// Credits first (a refusal there spends no rate limit), then rate limits
    /// (a refusal there gives the credits back): a refused request counts
    /// nowhere. `at`: when the check began.
    async fn enforce_limits(
        &self,
        mut outcome: Outcome,
        request: &policy::Request<'_>,
        at: Instant,
    ) -> Result<Outcome, Undecided> {
        let Some(entry) = outcome.entry.as_ref() else {
            return Ok(outcome);
        };
        let Some(limits) = entry.grant.limits.as_ref() else {
            return Ok(outcome);
        };
        let now = self.decided_at(&outcome);
        let (refusal, report) = self
            .apply_limits(entry, limits, request.cost.max(1), now, at)
            .await?;
        if let Some(refusal) = refusal {
            outcome.decision = refusal;
        }
        outcome.limits = Some(report);
        Ok(outcome)
    }

    /// When the outcome's policy was decided (now, if it was not).
    fn decided_at(&self, outcome: &Outcome) -> DateTime<Utc> {
        outcome.decided_at.unwrap_or_else(|| self.inner.clock.now())
    }

    /// [`enforce_limits`](Self::enforce_limits) for a key with rate limits
    /// but no credits on the local backend: nothing to wait for, so the
    /// outcome is changed where it is rather than moved through a future.
    /// `false`: not such a key, nothing done.
    fn limit_in_memory(
        &self,
        outcome: &mut Outcome,
        request: &policy::Request<'_>,
        at: Instant,
    ) -> bool {
        let Some(entry) = outcome.entry.as_ref() else {
            return false;
        };
        let Some(limits) = entry.grant.limits.as_ref().filter(|l| !l.credits) else {
            return false;
        };
        let inner = &*self.inner;
        let cost = request.cost.max(1);
        let Some(decision) = inner
            .rate
            .check_in_memory(limits, cost, Some(&entry.rate), at)
        else {
            return false;
        };
        if decision.allowed {
            inner.usage.record(entry, self.decided_at(outcome));
        } else {
            outcome.decision = Decision::rate_limited(decision.retry_after);
        }
        outcome.limits = Some(LimitReport {
            windows: decision.windows,
            credits_remaining: None,
        });
        true
    }

    /// Spends `cost` from the key's credits and windows: the refusal, if
    /// any, and how they stand.
    async fn apply_limits(
        &self,
        entry: &Arc<CachedKey>,
        limits: &Arc<Limits>,
        cost: u64,
        now: DateTime<Utc>,
        at: Instant,
    ) -> Result<(Option<Decision>, LimitReport), Undecided> {
        let inner = &*self.inner;
        let mut report = LimitReport::default();
        if limits.credits {
            match inner.credits.spend(limits.bucket, cost, now).await {
                Ok(left) => report.credits_remaining = Some(left),
                Err(NotSpent::Exhausted { next_refill }) => {
                    let retry = next_refill.and_then(|at| (at - now).to_std().ok());
                    report.credits_remaining = Some(0);
                    return Ok((Some(Decision::usage_exceeded(retry)), report));
                }
                Err(NotSpent::Store(err)) => {
                    self.log_failure(&err);
                    return Err(Undecided::from(&err));
                }
            }
        }
        if !limits.windows.is_empty() {
            let decision = inner.rate.check(limits, cost, Some(&entry.rate), at).await;
            report.windows = decision.windows;
            if !decision.allowed {
                if limits.credits {
                    inner.credits.refund(limits.bucket, cost).await;
                    report.credits_remaining = report.credits_remaining.map(|c| c + cost);
                }
                return Ok((Some(Decision::rate_limited(decision.retry_after)), report));
            }
        }
        inner.usage.record(entry, now);
        Ok((None, report))
    }

    /// A canary key was presented: a WARN line with where from and for what,
    /// and an audit event, at most once a second per key (a flood of one
    /// canary must not flood the audit trail).
    fn canary_tripped(&self, key: &Grant, resource: Option<&str>, client: Option<IpAddr>) {
        let inner = &*self.inner;
        inner.stats.canary_trips.fetch_add(1, Ordering::Relaxed);
        if inner.canary_reports.contains_key(&key.id) {
            return;
        }
        inner.canary_reports.insert(key.id, ());
        tracing::warn!(
            key_id = %key.id,
            owner_id = %key.owner_id,
            client = ?client,
            resource,
            "canary key presented"
        );
        let (store, key, resource) = (
            inner.store.clone(),
            key.clone(),
            resource.map(str::to_owned),
        );
        tokio::spawn(async move {
            let actor = crate::store::Actor::presenter(client);
            if let Err(err) = store
                .record_canary_trip(&key, resource.as_deref(), &actor)
                .await
            {
                tracing::warn!(key_id = %key.id, error = %crate::telemetry::chain(&err), "cannot audit a canary presentation");
            }
        });
    }

    /// Call before storing a new key; pass the ticket to [`Checker::remember_new_key`].
    pub fn ticket(&self, hash: &KeyHash) -> Ticket {
        self.inner.cache.ticket(hash)
    }

    /// A key this replica just stored: into the filter and the cache, so its
    /// first check here costs no lookup.
    pub fn remember_new_key(&self, ticket: Ticket, hash: KeyHash, grant: Grant) {
        self.inner.filter.insert(&hash);
        self.inner.cache.fill(ticket, hash, Some(grant));
    }

    /// A key this replica just changed: its next check reads the store.
    pub fn invalidate(&self, hash: &KeyHash) {
        self.inner.cache.invalidate(hash);
    }

    /// A key this replica just revoked (`record`, as the store returned it):
    /// if cached, it stays cached as revoked, as on every other replica when
    /// the notice arrives. A record that is not revoked is re-read instead.
    pub fn revoked(&self, record: &crate::key::KeyRecord) {
        match record.revoked_at {
            Some(at) => self.inner.cache.revoke(&record.hash, at, record.canary),
            None => self.inner.cache.invalidate(&record.hash),
        }
    }

    /// An owner this replica just changed: its keys are re-read before use.
    pub fn invalidate_owner(&self, owner: &OwnerId) {
        self.inner.cache.invalidate_owner(owner);
    }

    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.inner.rate
    }

    pub fn credits(&self) -> &CreditBook {
        &self.inner.credits
    }
}

/// A token bucket: `rate` per second, up to `burst` at once.
#[derive(Debug)]
struct Budget {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Budget {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    fn take(&self) -> bool {
        let mut state = lock(&self.state);
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Accepts `<key>` or `Bearer <key>` (scheme case-insensitive, RFC 6750).
/// Presence and format are settled here, before any cache or store lookup;
/// what comes out is the key's hash (the secret is not copied).
pub fn credential_hash(credential: Option<&str>) -> Result<KeyHash, Reason> {
    let value = credential.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err(Reason::MissingKey);
    }
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim_start(),
        Some(_) => return Err(Reason::MalformedKey),
        None => value,
    };
    ApiKey::parse_hash(token).map_err(|err| {
        tracing::debug!(%err, "malformed key presented");
        Reason::MalformedKey
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyPrefix;

    #[test]
    fn the_budget_allows_its_burst_then_refills_at_its_rate() {
        let budget = Budget::new(10, 3);
        assert!((0..3).all(|_| budget.take()));
        assert!(!budget.take());
        std::thread::sleep(Duration::from_millis(120));
        assert!(budget.take(), "one token back after 100 ms at 10/s");
        assert!(!Budget::new(0, 0).take());
    }

    fn key() -> ApiKey {
        ApiKey::generate(&KeyPrefix::parse("kw_test").unwrap())
    }

    #[test]
    fn a_miss_waits_only_for_a_read_that_began_after_every_invalidation_it_has_seen() {
        let cache = KeyCache::new(&crate::cache::CacheSettings {
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(60),
            negative_capacity: 100,
            negative_ttl: Duration::from_secs(60),
        });
        let flights = Flights::default();
        let hash = key().hash();
        let first = cache.ticket(&hash);
        assert!(matches!(flights.join(hash, first), Joined::Started(..)));
        // Nothing changed: a second miss waits for the read in flight.
        assert!(matches!(
            flights.join(hash, cache.ticket(&hash)),
            Joined::Waiting(_)
        ));
        // The key is revoked here while that read is on its way: a check
        // after it reads again rather than take what the read brings.
        cache.invalidate(&hash);
        let second = cache.ticket(&hash);
        assert!(matches!(flights.join(hash, second), Joined::Started(..)));
        assert!(matches!(flights.join(hash, second), Joined::Waiting(_)));
        // The first read landing does not end the second; the second's does.
        flights.land(&hash, first);
        assert!(flights.contains(&hash));
        assert!(matches!(flights.join(hash, second), Joined::Waiting(_)));
        // A check that looked before the invalidation and joins only now
        // waits for the later read: it began after everything it had seen.
        assert!(matches!(flights.join(hash, first), Joined::Waiting(_)));
        flights.land(&hash, second);
        assert!(!flights.contains(&hash));
        // An owner's change, and a key created in the shard, count as well.
        let third = cache.ticket(&hash);
        assert!(matches!(flights.join(hash, third), Joined::Started(..)));
        cache.invalidate_owner(&OwnerId::parse("acme").unwrap());
        let fourth = cache.ticket(&hash);
        assert!(matches!(flights.join(hash, fourth), Joined::Started(..)));
        cache.forget_unknown(&hash);
        assert!(matches!(
            flights.join(hash, cache.ticket(&hash)),
            Joined::Started(..)
        ));
    }

    #[test]
    fn credentials_are_accepted_bare_or_as_bearer_in_any_case() {
        let k = key();
        let s = k.expose_secret();
        for presented in [
            s.to_owned(),
            format!("Bearer {s}"),
            format!("bearer {s}"),
            format!("BEARER  {s} "),
        ] {
            assert_eq!(
                credential_hash(Some(&presented)),
                Ok(k.hash()),
                "{presented:?}"
            );
        }
    }

    #[test]
    fn absent_and_blank_credentials_are_missing() {
        assert_eq!(credential_hash(None), Err(Reason::MissingKey));
        assert_eq!(credential_hash(Some("")), Err(Reason::MissingKey));
        assert_eq!(credential_hash(Some("   ")), Err(Reason::MissingKey));
    }

    #[test]
    fn other_schemes_and_bad_keys_are_malformed() {
        let k = key();
        let s = k.expose_secret();
        assert_eq!(
            credential_hash(Some(&format!("Basic {s}"))),
            Err(Reason::MalformedKey)
        );
        assert_eq!(credential_hash(Some("Bearer")), Err(Reason::MalformedKey));
        assert_eq!(credential_hash(Some("Bearer ")), Err(Reason::MalformedKey));
        assert_eq!(
            credential_hash(Some(&s[..s.len() - 1])),
            Err(Reason::MalformedKey)
        );
    }
}
