//! Rate limits and usage credits, enforced after a key is allowed (so a
//! refused key never spends quota, and a refused request counts nowhere).
//!
//! - [`rate`]: named windows as a GCRA, per replica in memory (`local`) or
//!   exact across replicas in Redis (`redis`, falling back to `local` when
//!   Redis cannot answer in time).
//! - [`credits`]: a balance per bucket in PostgreSQL, spent from blocks each
//!   replica reserves, never over-spent.

pub mod credits;
pub mod rate;

use std::time::Duration;

/// How one window stands after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    pub remaining: u64,
    /// Until the window is full again.
    pub reset: Duration,
}

/// What the limits said about an allowed check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitReport {
    /// In the key's window order.
    pub windows: rate::Windows,
    /// This replica's view of the credits left, if the key has credits.
    pub credits_remaining: Option<u64>,
}
