use chrono::{DateTime, Utc};

use std::sync::Arc;

use super::{
    ApiKey, Credits, KeyHash, KeyId, KeyPrefix, Limits, Metadata, Network, OwnerId, RateLimit,
    Resource, Scope,
};
use crate::key::OwnerState;

/// Everything known about a stored key except its secret, which is never
/// stored. The decision is a pure function of this record and the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub hash: KeyHash,
    pub prefix: String,
    pub start: String,
    pub owner_id: OwnerId,
    pub name: String,
    pub description: String,
    pub scopes: Vec<Scope>,
    /// Empty: every resource.
    pub resources: Vec<Resource>,
    /// Empty: any client address.
    pub ip_allow: Vec<Network>,
    pub metadata: Metadata,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_reason: Option<String>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub canary: bool,
    /// The key this one replaced (rotation), and the one replacing it.
    pub rotated_from: Option<KeyId>,
    pub replaced_by: Option<KeyId>,
    /// The disable came from a `keyward:admin` key.
    pub disabled_by_admin: bool,
    pub owner_state: OwnerState,
    /// Where its limits and credits are kept (shared along a rotation).
    pub bucket_id: KeyId,
    /// Its own rate limits; `None`: the owner's default.
    pub rate_limits: Option<Vec<RateLimit>>,
    pub owner_rate_limits: Option<Vec<RateLimit>>,
    /// Its bucket's credits, if any.
    pub credits: Option<Credits>,
}

/// A key's lifecycle state at a moment, in the order the decision checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
    Disabled,
}

fn state(
    revoked_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    disabled_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> KeyState {
    if revoked_at.is_some() {
        KeyState::Revoked
    } else if expires_at.is_some_and(|at| at <= now) {
        KeyState::Expired
    } else if disabled_at.is_some() {
        KeyState::Disabled
    } else {
        KeyState::Active
    }
}

impl KeyRecord {
    pub fn state_at(&self, now: DateTime<Utc>) -> KeyState {
        state(self.revoked_at, self.expires_at, self.disabled_at, now)
    }

    /// Holds a `keyward:*` scope: a management key, not a data-plane one.
    pub fn is_management_key(&self) -> bool {
        self.scopes.iter().any(Scope::is_keyward)
    }
}

/// What a key may do: the part of its record that checks and their answers
/// need. Every cached key holds one, so it is kept small: no name, no
/// description, no timestamps beyond the three that decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: KeyId,
    pub owner_id: OwnerId,
    pub scopes: Box<[Scope]>,
    /// Empty: every resource.
    pub resources: Box<[Resource]>,
    /// Empty: any client address.
    pub ip_allow: Box<[Network]>,
    pub metadata: Metadata,
    pub expires_at: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The owner's state when this was read: a suspended owner's keys are
    /// all refused.
    pub owner_active: bool,
    /// Refused exactly as an unknown key, and reported when presented.
    pub canary: bool,
    /// Rate limits and credits to enforce after an allow; `None`: none.
    pub limits: Option<Arc<Limits>>,
}

impl Grant {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s.as_str() == scope)
    }

    /// Heap bytes this grant holds beyond its own size (for cache weights).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let strings = |n: usize, len: usize| n * size_of::<String>() + len;
        strings(self.scopes.len(), self.scopes.iter().map(|s| s.as_str().len()).sum())
            + strings(
                self.resources.len(),
                self.resources.iter().map(|r| r.as_str().len()).sum(),
            )
            + self.ip_allow.len() * size_of::<Network>()
            + self.owner_id.as_str().len()
            // Two strings per entry plus the B-tree's share of a node.
            + self
                .metadata
                .iter()
                .map(|(k, v)| 2 * size_of::<String>() + k.len() + v.len() + 16)
                .sum::<usize>()
    }

    /// A live grant for tests: a fresh id, the given owner and scopes, no
    /// limits, no expiry.
    #[cfg(test)]
    pub fn for_test(owner: &str, scopes: &[&str]) -> Grant {
        Grant {
            id: KeyId::new_v7(),
            owner_id: OwnerId::parse(owner).expect("test owner id"),
            scopes: scopes
                .iter()
                .map(|s| Scope::parse(s).expect("test scope"))
                .collect(),
            resources: [].into(),
            ip_allow: [].into(),
            metadata: Metadata::default(),
            expires_at: None,
            disabled_at: None,
            revoked_at: None,
            owner_active: true,
            canary: false,
            limits: None,
        }
    }
}

impl From<&KeyRecord> for Grant {
    fn from(r: &KeyRecord) -> Self {
        Self {
            id: r.id,
            owner_id: r.owner_id.clone(),
            scopes: r.scopes.clone().into(),
            resources: r.resources.clone().into(),
            ip_allow: r.ip_allow.clone().into(),
            metadata: r.metadata.clone(),
            expires_at: r.expires_at,
            disabled_at: r.disabled_at,
            revoked_at: r.revoked_at,
            owner_active: r.owner_state == OwnerState::Active,
            canary: r.canary,
            limits: Limits::new(
                r.bucket_id,
                r.rate_limits
                    .clone()
                    .or_else(|| r.owner_rate_limits.clone())
                    .unwrap_or_default(),
                r.credits.is_some(),
            )
            .map(Arc::new),
        }
    }
}

/// What a new key will be: validated fields, not yet a secret.
#[derive(Debug, Clone)]
pub struct MintSpec {
    pub owner_id: OwnerId,
    pub prefix: KeyPrefix,
    pub name: String,
    pub description: String,
    pub scopes: Vec<Scope>,
    pub resources: Vec<Resource>,
    pub ip_allow: Vec<Network>,
    pub metadata: Metadata,
    pub expires_at: Option<DateTime<Utc>>,
    pub canary: bool,
    /// The key this one replaces (rotation).
    pub rotated_from: Option<KeyId>,
    /// `None`: the owner's default.
    pub rate_limits: Option<Vec<RateLimit>>,
    /// Credits of a new bucket; a rotation shares its predecessor's.
    pub credits: Option<Credits>,
    /// The bucket to share (rotation); `None`: a bucket of its own.
    pub bucket: Option<KeyId>,
    /// A rotation: whether the shared bucket has credits.
    pub bucket_has_credits: bool,
}

impl MintSpec {
    /// A key of `owner_id` with `prefix` and nothing else: no name, scopes
    /// or limits, no expiry.
    pub fn new(owner_id: OwnerId, prefix: KeyPrefix) -> Self {
        Self {
            owner_id,
            prefix,
            name: String::new(),
            description: String::new(),
            scopes: Vec::new(),
            resources: Vec::new(),
            ip_allow: Vec::new(),
            metadata: Metadata::default(),
            expires_at: None,
            canary: false,
            rotated_from: None,
            rate_limits: None,
            credits: None,
            bucket: None,
            bucket_has_credits: false,
        }
    }

    /// The same grant as `key` (owner, prefix, scopes, limits, metadata,
    /// expiry, name, canary), to replace it.
    pub fn replacing(key: &KeyRecord) -> Result<Self, super::Invalid> {
        Ok(Self {
            owner_id: key.owner_id.clone(),
            prefix: KeyPrefix::parse(&key.prefix)?,
            name: key.name.clone(),
            description: key.description.clone(),
            scopes: key.scopes.clone(),
            resources: key.resources.clone(),
            ip_allow: key.ip_allow.clone(),
            metadata: key.metadata.clone(),
            expires_at: key.expires_at,
            canary: key.canary,
            rotated_from: Some(key.id),
            rate_limits: key.rate_limits.clone(),
            credits: None,
            bucket: Some(key.bucket_id),
            bucket_has_credits: key.credits.is_some(),
        })
    }
}

/// A key about to be stored: its spec, plus what only the generated secret
/// determines (hash, prefix, display hint), so the two cannot disagree.
#[derive(Debug, Clone)]
pub struct NewKey {
    id: KeyId,
    hash: KeyHash,
    prefix: String,
    start: String,
    spec: MintSpec,
}

impl NewKey {
    /// Draws a fresh secret for `spec` and the row that will store only its
    /// hash.
    pub fn generate(spec: MintSpec) -> (ApiKey, NewKey) {
        let secret = ApiKey::generate(&spec.prefix);
        let new_key = NewKey {
            id: KeyId::new_v7(),
            hash: secret.hash(),
            prefix: secret.prefix().to_owned(),
            start: secret.start().to_owned(),
            spec,
        };
        (secret, new_key)
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn hash(&self) -> KeyHash {
        self.hash
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn start(&self) -> &str {
        &self.start
    }

    pub fn spec(&self) -> &MintSpec {
        &self.spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_keys_hash_prefix_and_hint_come_from_its_secret() {
        let spec = MintSpec::new(
            OwnerId::parse("acme").unwrap(),
            KeyPrefix::parse("kw_test").unwrap(),
        );
        let (secret, key) = NewKey::generate(spec);
        assert_eq!(key.hash(), secret.hash());
        assert_eq!(key.prefix(), "kw_test");
        assert_eq!(key.start(), secret.start());
    }
}
