//! The hot path, shared by every front door:
//! credential -> parse (format, checksum) -> SHA-256 -> cache -> (miss: one
//! indexed SELECT) -> decide.

use std::sync::Arc;

use chrono::Utc;

use crate::{
    cache::{KeyCache, Lookup},
    key::{ApiKey, KeyRecord},
    policy::{self, Decision, Reason},
    store::{Store, StoreError},
};

/// A check's answer: the decision and, once the key is known, its record.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub decision: Decision,
    pub key: Option<Arc<KeyRecord>>,
}

impl Outcome {
    /// A denial settled before the key is known.
    pub fn denied(reason: Reason) -> Self {
        Self {
            decision: Decision::new(reason),
            key: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Checker {
    cache: KeyCache,
    store: Store,
}

impl Checker {
    pub fn new(cache: KeyCache, store: Store) -> Self {
        Self { cache, store }
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
        let key = match parse_credential(credential) {
            Ok(key) => key,
            Err(reason) => return Ok(Outcome::denied(reason)),
        };
        let Some(record) = self.lookup(&key).await? else {
            return Ok(Outcome::denied(Reason::UnknownKey));
        };
        Ok(Outcome {
            decision: policy::decide(&record, request, Utc::now()),
            key: Some(record),
        })
    }

    async fn lookup(&self, key: &ApiKey) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let hash = key.hash();
        match self.cache.get(&hash).await {
            Some(Lookup::Known(record)) => return Ok(Some(record)),
            Some(Lookup::Unknown) => return Ok(None),
            None => {}
        }
        let ticket = self.cache.ticket();
        let found = self.store.find_by_hash(&hash).await?.map(Arc::new);
        self.cache.fill(ticket, hash, found.clone()).await;
        Ok(found)
    }
}

/// Accepts `<key>` or `Bearer <key>` (scheme case-insensitive, RFC 6750).
/// Presence and format are settled here, before any cache or store lookup.
fn parse_credential(credential: Option<&str>) -> Result<ApiKey, Reason> {
    let value = credential.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err(Reason::MissingKey);
    }
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim_start(),
        Some(_) => return Err(Reason::MalformedKey),
        None => value,
    };
    ApiKey::parse(token).map_err(|err| {
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
                Ok(k.clone()),
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
