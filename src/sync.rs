//! What the crate's locks share.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: keyward's mutexes guard plain data (no
/// invariant spans two fields mid-update), so a panic elsewhere while one
/// was held cannot leave it inconsistent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
