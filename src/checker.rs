//! The hot path, shared by every front door:
//! credential -> parse (format, checksum) -> SHA-256 -> cache -> (miss: one
//! indexed SELECT) -> decide.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use chrono::Utc;

use crate::{
    cache::{CachedKey, KeyCache, Lookup},
    key::{ApiKey, Grant, KeyHash},
    policy::{self, Decision, Reason},
    store::{Store, StoreError},
    usage::UsageRecorder,
};

/// A check's answer: the decision and, once the key is known, its grant.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub decision: Decision,
    entry: Option<Arc<CachedKey>>,
}

impl Outcome {
    /// The key, once known (on allows and on denials after the lookup).
    pub fn key(&self) -> Option<&Grant> {
        self.entry.as_deref().map(|e| &e.grant)
    }

    /// A denial settled before the key is known.
    pub fn denied(reason: Reason) -> Self {
        Self {
            decision: Decision::new(reason),
            entry: None,
        }
    }
}

/// What the cache alone can say.
#[derive(Debug)]
pub enum Cached {
    Answered(Outcome),
    /// Not cached: the store must be read for this hash.
    Miss(KeyHash),
}

#[derive(Debug, Clone)]
pub struct Checker {
    cache: KeyCache,
    store: Store,
    usage: Arc<UsageRecorder>,
    /// Hashes with a background re-read in flight (one per key at a time).
    refreshing: Arc<Mutex<HashSet<KeyHash>>>,
}

impl Checker {
    pub fn new(cache: KeyCache, store: Store, usage: Arc<UsageRecorder>) -> Self {
        Self {
            cache,
            store,
            usage,
            refreshing: Arc::default(),
        }
    }

    pub fn cache(&self) -> &KeyCache {
        &self.cache
    }

    /// Decides for a credential as presented: a bare key or a whole
    /// `Authorization` header value (`Bearer <key>`). `None`: none presented.
    ///
    /// A denial is an `Ok`; `Err` means the answer cannot be known (the key is
    /// not cached and the store cannot be read), and callers must not allow.
    pub async fn check(
        &self,
        credential: Option<&str>,
        request: &policy::Request<'_>,
    ) -> Result<Outcome, StoreError> {
        let hash = match self.check_cached(credential, request) {
            Cached::Answered(outcome) => return Ok(outcome),
            Cached::Miss(hash) => hash,
        };
        let ticket = self.cache.ticket();
        let found = self.store.find_grant(&hash).await?;
        Ok(match self.cache.fill(ticket, hash, found) {
            Some(entry) => self.decide(&entry, request),
            None => Outcome::denied(Reason::UnknownKey),
        })
    }

    /// The hot path without I/O: answers from the credential alone or from
    /// the cache, or says which hash must be read from the store.
    pub fn check_cached(&self, credential: Option<&str>, request: &policy::Request<'_>) -> Cached {
        let hash = match parse_credential(credential) {
            Ok(hash) => hash,
            Err(reason) => return Cached::Answered(Outcome::denied(reason)),
        };
        let entry = match self.cache.get(&hash) {
            Some(Lookup::Fresh(entry)) => entry,
            // Stale-while-revalidate: answer now, re-read in the background.
            // While the store is unreachable the stale entry keeps answering
            // until the cache drops it (soft TTL + stale_if_error).
            Some(Lookup::Stale(entry)) => {
                self.refresh_in_background(hash);
                entry
            }
            Some(Lookup::Unknown) => return Cached::Answered(Outcome::denied(Reason::UnknownKey)),
            None => return Cached::Miss(hash),
        };
        Cached::Answered(self.decide(&entry, request))
    }

    fn decide(&self, entry: &Arc<CachedKey>, request: &policy::Request<'_>) -> Outcome {
        let now = Utc::now();
        let decision = policy::decide(&entry.grant, request, now);
        if decision.allowed() {
            self.usage.record(entry, now);
        }
        Outcome {
            decision,
            entry: Some(entry.clone()),
        }
    }

    fn refresh_in_background(&self, hash: KeyHash) {
        if !lock(&self.refreshing).insert(hash) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let ticket = this.cache.ticket();
            match this.store.find_grant(&hash).await {
                Ok(found) => {
                    this.cache.fill(ticket, hash, found);
                }
                Err(err) => {
                    tracing::debug!(%err, "cannot re-read a stale cache entry; still serving it");
                }
            }
            lock(&this.refreshing).remove(&hash);
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data; a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts `<key>` or `Bearer <key>` (scheme case-insensitive, RFC 6750).
/// Presence and format are settled here, before any cache or store lookup;
/// what comes out is the key's hash (the secret is not copied).
fn parse_credential(credential: Option<&str>) -> Result<KeyHash, Reason> {
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

    fn key() -> ApiKey {
        ApiKey::generate(&KeyPrefix::parse("kw_test").unwrap())
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
                parse_credential(Some(&presented)),
                Ok(k.hash()),
                "{presented:?}"
            );
        }
    }

    #[test]
    fn absent_and_blank_credentials_are_missing() {
        assert_eq!(parse_credential(None), Err(Reason::MissingKey));
        assert_eq!(parse_credential(Some("")), Err(Reason::MissingKey));
        assert_eq!(parse_credential(Some("   ")), Err(Reason::MissingKey));
    }

    #[test]
    fn other_schemes_and_bad_keys_are_malformed() {
        let k = key();
        let s = k.expose_secret();
        assert_eq!(
            parse_credential(Some(&format!("Basic {s}"))),
            Err(Reason::MalformedKey)
        );
        assert_eq!(parse_credential(Some("Bearer")), Err(Reason::MalformedKey));
        assert_eq!(parse_credential(Some("Bearer ")), Err(Reason::MalformedKey));
        assert_eq!(
            parse_credential(Some(&s[..s.len() - 1])),
            Err(Reason::MalformedKey)
        );
    }
}
