use chrono::{DateTime, Utc};

use super::{ApiKey, KeyHash, KeyId, KeyPrefix, Metadata, Network, OwnerId, Resource, Scope};

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
}

impl Grant {
    pub fn state_at(&self, now: DateTime<Utc>) -> KeyState {
        state(self.revoked_at, self.expires_at, self.disabled_at, now)
    }

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
        }
    }
}

/// A key about to be stored: validated fields plus the hash of its secret.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: KeyId,
    pub hash: KeyHash,
    pub prefix: String,
    pub start: String,
    pub owner_id: OwnerId,
    pub name: String,
    pub description: String,
    pub scopes: Vec<Scope>,
    pub resources: Vec<Resource>,
    pub ip_allow: Vec<Network>,
    pub metadata: Metadata,
    pub expires_at: Option<DateTime<Utc>>,
}

impl NewKey {
    /// Draws a fresh secret and the row that will store only its hash. The
    /// optional fields start empty: no name, scopes or limits, no expiry.
    pub fn generate(prefix: &KeyPrefix, owner_id: OwnerId) -> (ApiKey, NewKey) {
        let secret = ApiKey::generate(prefix);
        let new_key = NewKey {
            id: KeyId::new_v7(),
            hash: secret.hash(),
            prefix: secret.prefix().to_owned(),
            start: secret.start().to_owned(),
            owner_id,
            name: String::new(),
            description: String::new(),
            scopes: Vec::new(),
            resources: Vec::new(),
            ip_allow: Vec::new(),
            metadata: Metadata::default(),
            expires_at: None,
        };
        (secret, new_key)
    }
}
