//! Rate limits and usage credits, as a key (or its owner) declares them.

use std::{fmt::Write as _, time::Duration};

use chrono::{DateTime, Datelike as _, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};

use super::{Invalid, KeyId};

/// Windows a key may declare.
pub const MAX_WINDOWS: usize = 8;
const WINDOW_MIN: Duration = Duration::from_secs(1);
const WINDOW_MAX: Duration = Duration::from_secs(31 * 86_400);
const NAME_MAX: usize = 32;

/// A named window: at most `limit` uses per `window`, enforced as a GCRA
/// (a burst of `limit` at once, refilling evenly over the window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    name: String,
    limit: u64,
    window_ms: u64,
}

impl RateLimit {
    /// On failure, which part (`name`, `limit`, `window`) and why.
    pub fn new(name: &str, limit: u64, window: Duration) -> Result<Self, (&'static str, Invalid)> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(("name", Invalid::new("must be 1 to 32 characters")));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err((
                "name",
                Invalid::new("may contain only a-z, A-Z, 0-9, '-' and '_'"),
            ));
        }
        if limit == 0 {
            return Err(("limit", Invalid::new("must be positive")));
        }
        if !(WINDOW_MIN..=WINDOW_MAX).contains(&window)
            || !window.subsec_nanos().is_multiple_of(1_000_000)
        {
            return Err((
                "window",
                Invalid::new("must be between 1s and 31 days, in whole milliseconds"),
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            limit,
            window_ms: window.as_millis() as u64,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Time one use takes to be forgotten: the window over the limit.
    pub fn emission_interval(&self) -> Duration {
        self.window() / u32::try_from(self.limit).unwrap_or(u32::MAX).max(1)
    }
}

/// Checks a list of windows: at most [`MAX_WINDOWS`], names unique.
pub fn check_windows(windows: &[RateLimit]) -> Result<(), (Option<usize>, Invalid)> {
    if windows.len() > MAX_WINDOWS {
        return Err((
            None,
            Invalid::new(format!("must have at most {MAX_WINDOWS} windows")),
        ));
    }
    for (i, w) in windows.iter().enumerate() {
        if windows[..i].iter().any(|o| o.name == w.name) {
            return Err((Some(i), Invalid::new(format!("names {} twice", w.name))));
        }
    }
    Ok(())
}

/// When credits refill: at the start of each UTC day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefillInterval {
    Daily,
    Monthly,
}

impl RefillInterval {
    pub fn as_str(self) -> &'static str {
        match self {
            RefillInterval::Daily => "DAILY",
            RefillInterval::Monthly => "MONTHLY",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "DAILY" => Some(RefillInterval::Daily),
            "MONTHLY" => Some(RefillInterval::Monthly),
            _ => None,
        }
    }

    /// The start of the period `at` falls in.
    pub fn period_start(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let day = at.date_naive();
        let start = match self {
            RefillInterval::Daily => day,
            RefillInterval::Monthly => day.with_day(1).unwrap_or(day),
        };
        Utc.from_utc_datetime(&start.and_hms_opt(0, 0, 0).unwrap_or_default())
    }

    /// The start of the next period after `at`.
    pub fn next_period(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let start = self.period_start(at);
        match self {
            RefillInterval::Daily => start + chrono::Duration::days(1),
            RefillInterval::Monthly => start
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(start + chrono::Duration::days(31)),
        }
    }
}

/// Credits as declared: what remains, and how they refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    pub remaining: u64,
    pub refill: Option<(RefillInterval, u64)>,
}

/// What the hot path needs of a key's limits. Shared by every cache entry
/// of the bucket's keys; built when the key is read.
#[derive(Debug, PartialEq, Eq)]
pub struct Limits {
    /// Rotated keys share their predecessor's bucket.
    pub bucket: KeyId,
    pub windows: Box<[RateLimit]>,
    /// The bucket has credits to spend.
    pub credits: bool,
    /// The `RateLimit-Policy` header value (draft-ietf-httpapi-ratelimit-
    /// headers): the same on every answer, so built once.
    pub policy_header: Box<str>,
    /// What the `RateLimit` header repeats on every answer, built once:
    /// window `i`'s part up to its numbers (`, "name";r=`) is
    /// `rate_prefixes[rate_prefix_ends[i - 1]..rate_prefix_ends[i]]`.
    rate_prefixes: Box<str>,
    rate_prefix_ends: [u16; MAX_WINDOWS],
}

impl Limits {
    /// `None` when there is nothing to enforce.
    pub fn new(bucket: KeyId, windows: Vec<RateLimit>, credits: bool) -> Option<Self> {
        if windows.is_empty() && !credits {
            return None;
        }
        let mut policy = String::new();
        for (i, w) in windows.iter().enumerate() {
            if i > 0 {
                policy.push_str(", ");
            }
            let _ = write!(
                policy,
                "\"{}\";q={};w={}",
                w.name,
                w.limit,
                w.window().as_secs().max(1)
            );
        }
        let mut rate_prefixes = String::new();
        let mut rate_prefix_ends = [0u16; MAX_WINDOWS];
        for (i, w) in windows.iter().take(MAX_WINDOWS).enumerate() {
            if i > 0 {
                rate_prefixes.push_str(", ");
            }
            let _ = write!(rate_prefixes, "\"{}\";r=", w.name);
            // At most 8 windows of names of at most 32 bytes.
            rate_prefix_ends[i] = u16::try_from(rate_prefixes.len()).unwrap_or(u16::MAX);
        }
        Some(Self {
            bucket,
            windows: windows.into(),
            credits,
            policy_header: policy.into(),
            rate_prefixes: rate_prefixes.into(),
            rate_prefix_ends,
        })
    }

    /// What these limits hold, their own struct included.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .windows
                .iter()
                .map(|w| std::mem::size_of::<RateLimit>() + w.name.len())
                .sum::<usize>()
            + self.policy_header.len()
            + self.rate_prefixes.len()
    }

    /// Window `i`'s part of the `RateLimit` header before its numbers:
    /// `"name";r=`, after `, ` from the second window on.
    pub fn rate_prefix(&self, i: usize) -> &str {
        let start = match i {
            0 => 0,
            _ => self.rate_prefix_ends.get(i - 1).copied().unwrap_or(0),
        };
        let end = self.rate_prefix_ends.get(i).copied().unwrap_or(0);
        self.rate_prefixes
            .get(usize::from(start)..usize::from(end))
            .unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_validated_part_by_part() {
        assert!(RateLimit::new("burst", 100, Duration::from_secs(1)).is_ok());
        assert_eq!(
            RateLimit::new("", 1, Duration::from_secs(1)).unwrap_err().0,
            "name"
        );
        assert_eq!(
            RateLimit::new("a b", 1, Duration::from_secs(1))
                .unwrap_err()
                .0,
            "name"
        );
        assert_eq!(
            RateLimit::new("x", 0, Duration::from_secs(1))
                .unwrap_err()
                .0,
            "limit"
        );
        assert_eq!(
            RateLimit::new("x", 1, Duration::from_millis(10))
                .unwrap_err()
                .0,
            "window"
        );
        let dup = [
            RateLimit::new("x", 1, Duration::from_secs(1)).unwrap(),
            RateLimit::new("x", 2, Duration::from_secs(2)).unwrap(),
        ];
        assert_eq!(check_windows(&dup).unwrap_err().0, Some(1));
    }

    #[test]
    fn the_policy_header_lists_every_window() {
        let limits = Limits::new(
            KeyId::new_v7(),
            vec![
                RateLimit::new("burst", 100, Duration::from_secs(1)).unwrap(),
                RateLimit::new("daily", 100_000, Duration::from_secs(86_400)).unwrap(),
            ],
            false,
        )
        .unwrap();
        assert_eq!(
            &*limits.policy_header,
            r#""burst";q=100;w=1, "daily";q=100000;w=86400"#
        );
        assert_eq!(limits.rate_prefix(0), r#""burst";r="#);
        assert_eq!(limits.rate_prefix(1), r#", "daily";r="#);
        assert_eq!(limits.rate_prefix(2), "");
        assert!(Limits::new(KeyId::new_v7(), vec![], false).is_none());
    }

    #[test]
    fn refill_periods_start_at_midnight_utc() {
        let at = Utc.with_ymd_and_hms(2026, 12, 15, 13, 4, 5).unwrap();
        assert_eq!(
            RefillInterval::Monthly.period_start(at),
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            RefillInterval::Monthly.next_period(at),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            RefillInterval::Daily.next_period(at),
            Utc.with_ymd_and_hms(2026, 12, 16, 0, 0, 0).unwrap()
        );
    }
}
