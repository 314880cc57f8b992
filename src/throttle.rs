//! Brute-force protection: a client address that keeps presenting bad keys
//! (malformed, unknown, revoked or expired) is cut off for a while.
//!
//! Failures are counted per source in windows of `window`; the failure that
//! reaches `threshold` blocks the source for `cooldown`, logs one WARN line,
//! and starts a fresh count for after the block. While blocked, every
//! presentation from the source is answered `RATE_LIMITED` before any parse
//! or lookup, valid keys included: answering valid keys differently would
//! tell the guesser exactly what it is looking for. The cost is that
//! clients sharing one address with an attacker (a NAT) are blocked with it.
//!
//! IPv4 sources are single addresses; IPv6 sources are /64 networks, the
//! unit one client usually controls. The hot path pays one atomic load while
//! nothing is blocked, and one cache lookup per check while anything is.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::sync::Cache;

/// Sources tracked at most (each costs about 100 bytes).
const MAX_SOURCES: u64 = 100_000;

/// A client as brute-force protection counts it: an IPv4 address, or the
/// /64 network of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(u128);

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source(u128::from(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => Source(u128::from(v6) & !u128::from(u64::MAX)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ThrottleSettings {
    /// Failures per window that block a source; 0: never block.
    pub threshold: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

#[derive(Debug)]
struct Window {
    failures: AtomicU32,
}

#[derive(Debug, Clone)]
pub struct SourceThrottle {
    settings: ThrottleSettings,
    failures: Cache<Source, Arc<Window>>,
    /// Blocked sources and when their block ends.
    blocked: Cache<Source, Instant>,
    origin: Instant,
    /// When the latest block ends, in milliseconds after `origin`: past it,
    /// nothing is blocked and the lookup is skipped.
    blocks_end_ms: Arc<AtomicU64>,
}

impl SourceThrottle {
    pub fn new(settings: ThrottleSettings) -> Self {
        Self {
            settings,
            failures: Cache::builder()
                .max_capacity(MAX_SOURCES)
                .time_to_live(settings.window)
                .build(),
            blocked: Cache::builder()
                .max_capacity(MAX_SOURCES)
                .time_to_live(settings.cooldown)
                .build(),
            origin: Instant::now(),
            blocks_end_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn enabled(&self) -> bool {
        self.settings.threshold > 0
    }

    /// `Some(retry after)` while `source` is blocked.
    pub fn blocked(&self, source: Option<Source>, now: Instant) -> Option<Duration> {
        let source = source?;
        let now_ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        if now_ms >= self.blocks_end_ms.load(Ordering::Relaxed) {
            return None;
        }
        let until = self.blocked.get(&source)?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Counts a failed presentation. Returns `true` when this failure blocked
    /// the source.
    pub fn failed(&self, source: Option<Source>, now: Instant) -> bool {
        let Some(source) = source.filter(|_| self.enabled()) else {
            return false;
        };
        let window = self.failures.get_with(source, || {
            Arc::new(Window {
                failures: AtomicU32::new(0),
            })
        });
        let failures = window.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.settings.threshold {
            return false;
        }
        // Only the failure that reaches the threshold blocks: concurrent ones
        // past it find the window gone or already counted.
        if failures != self.settings.threshold {
            return false;
        }
        let until = now + self.settings.cooldown;
        self.blocked.insert(source, until);
        self.failures.invalidate(&source);
        let end_ms = until.saturating_duration_since(self.origin).as_millis() as u64;
        self.blocks_end_ms.fetch_max(end_ms + 1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(threshold: u32) -> SourceThrottle {
        SourceThrottle::new(ThrottleSettings {
            threshold,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
        })
    }

    fn src(ip: &str) -> Option<Source> {
        Some(Source::from(ip.parse::<IpAddr>().unwrap()))
    }

    #[test]
    fn a_source_is_blocked_at_the_threshold_and_only_that_source() {
        let t = throttle(3);
        let now = Instant::now();
        assert!(!t.failed(src("192.0.2.1"), now));
        assert!(!t.failed(src("192.0.2.1"), now));
        assert_eq!(t.blocked(src("192.0.2.1"), now), None);
        assert!(t.failed(src("192.0.2.1"), now), "the third failure blocks");
        let retry = t.blocked(src("192.0.2.1"), now).expect("blocked");
        assert!(retry <= Duration::from_secs(30) && retry > Duration::from_secs(29));
        assert_eq!(t.blocked(src("192.0.2.2"), now), None);
        assert_eq!(t.blocked(None, now), None);
    }

    #[test]
    fn the_block_ends_after_the_cooldown_with_a_fresh_count() {
        let t = throttle(2);
        let now = Instant::now();
        t.failed(src("192.0.2.1"), now);
        assert!(t.failed(src("192.0.2.1"), now));
        let later = now + Duration::from_secs(31);
        assert_eq!(t.blocked(src("192.0.2.1"), later), None);
        assert!(!t.failed(src("192.0.2.1"), later), "the count restarted");
    }

    #[test]
    fn ipv6_sources_are_counted_by_their_64_network() {
        assert_eq!(src("2001:db8:1:2::1"), src("2001:db8:1:2:ffff::9"));
        assert_ne!(src("2001:db8:1:2::1"), src("2001:db8:1:3::1"));
        assert_eq!(src("::ffff:192.0.2.1"), src("192.0.2.1"));
        assert_ne!(src("192.0.2.1"), src("192.0.2.2"));
    }

    #[test]
    fn a_zero_threshold_never_blocks() {
        let t = throttle(0);
        let now = Instant::now();
        for _ in 0..100 {
            assert!(!t.failed(src("192.0.2.1"), now));
        }
        assert_eq!(t.blocked(src("192.0.2.1"), now), None);
    }
}
