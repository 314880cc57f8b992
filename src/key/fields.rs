//! Newtypes for the non-secret fields of a key. Each `parse` says, in its
//! error, why a value was refused; the API layer adds the field's name.

use std::{borrow::Cow, collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use uuid::Uuid;

/// Why a value was refused, in words fit for a client: never echoes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(Cow<'static, str>);

impl Invalid {
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Self(reason.into())
    }
}

/// A key's id: a UUIDv7, so ids sort by creation time (keyset pagination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(Uuid);

impl KeyId {
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.is_empty() {
            return Err(Invalid::new("is required"));
        }
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| Invalid::new("is not a key id (a UUID)"))
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for KeyId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Checks a free-form identifier: 1..=max visible ASCII characters, no
/// spaces, and none of `,` (the separator of scope lists in Envoy routes).
fn check_token(s: &str, max: usize) -> Result<(), Invalid> {
    if s.is_empty() {
        return Err(Invalid::new("is required"));
    }
    if s.len() > max {
        return Err(Invalid::new(format!("must be at most {max} characters")));
    }
    if !s.bytes().all(|c| c.is_ascii_graphic() && c != b',') {
        return Err(Invalid::new(
            "may contain only visible ASCII characters, without spaces or ','",
        ));
    }
    Ok(())
}

macro_rules! token_newtype {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(s: &str) -> Result<Self, Invalid> {
                check_token(s, Self::MAX_LEN)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

token_newtype!(
    /// The caller's own account id (e.g. a customer or tenant id).
    OwnerId,
    128
);
token_newtype!(
    /// A permission held by a key, such as `invoices:read` or `keyward:admin`.
    Scope,
    128
);
token_newtype!(
    /// An API or resource a key may be limited to, such as `billing` or a host.
    Resource,
    255
);

impl Scope {
    /// Manage every owner's keys.
    pub const ADMIN: &'static str = "keyward:admin";
    /// Manage the keys of the management key's own owner.
    pub const OWNER: &'static str = "keyward:owner";

    /// keyward's own scopes (`keyward:*`): they make a key a management key.
    pub fn is_keyward(&self) -> bool {
        self.0.starts_with("keyward:")
    }
}

/// An owner's state: a suspended owner's keys are all refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnerState {
    Active,
    Suspended,
}

/// One entry of a key's IP allow list: a CIDR block without host bits, or a
/// single address (taken as /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Network(IpNet);

impl Network {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let net = match IpNet::from_str(s) {
            Ok(net) => net,
            Err(_) => IpAddr::from_str(s).map(IpNet::from).map_err(|_| {
                Invalid::new("is not a CIDR block (such as 10.0.0.0/8) or an IP address")
            })?,
        };
        if net.trunc() != net {
            return Err(Invalid::new(format!(
                "has bits set right of the mask; did you mean {}?",
                net.trunc()
            )));
        }
        Ok(Self(net))
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.contains(ip)
    }

    pub fn as_ipnet(&self) -> IpNet {
        self.0
    }
}

impl From<IpNet> for Network {
    fn from(net: IpNet) -> Self {
        Self(net.trunc())
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Free-form labels on a key, returned on allowed checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    pub const MAX_ENTRIES: usize = 64;
    pub const MAX_KEY_LEN: usize = 64;
    pub const MAX_VALUE_LEN: usize = 1024;

    /// On failure, returns the offending entry's key with the reason.
    pub fn parse(
        entries: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, (Option<String>, Invalid)> {
        let map: BTreeMap<String, String> = entries.into_iter().collect();
        if map.len() > Self::MAX_ENTRIES {
            return Err((
                None,
                Invalid::new(format!("must have at most {} entries", Self::MAX_ENTRIES)),
            ));
        }
        for (k, v) in &map {
            let bad = |reason: &'static str| Err((Some(k.clone()), Invalid::new(reason)));
            if k.is_empty() || k.len() > Self::MAX_KEY_LEN {
                return bad("keys must be 1 to 64 characters");
            }
            if k.chars().any(char::is_control) || v.chars().any(char::is_control) {
                return bad("must not contain control characters");
            }
            if v.len() > Self::MAX_VALUE_LEN {
                return bad("values must be at most 1024 bytes");
            }
        }
        Ok(Self(map))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0
    }
}

impl From<BTreeMap<String, String>> for Metadata {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ids_accept_common_account_ids_and_refuse_blanks() {
        for ok in ["acme", "cus_123", "user@example.com", "0190a1b2-c3d4"] {
            assert!(OwnerId::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(OwnerId::parse("").unwrap_err().to_string(), "is required");
        assert!(OwnerId::parse("two words").is_err());
        assert!(OwnerId::parse("a,b").is_err());
        assert!(OwnerId::parse(&"x".repeat(129)).is_err());
    }

    #[test]
    fn networks_accept_blocks_and_addresses_and_refuse_host_bits() {
        assert_eq!(
            Network::parse("10.0.0.0/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            Network::parse("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            Network::parse("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        let err = Network::parse("10.0.0.1/8").unwrap_err().to_string();
        assert!(err.contains("10.0.0.0/8"), "{err}");
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("not-a-network").is_err());
    }

    #[test]
    fn network_membership_covers_v4_and_v6() {
        let net = Network::parse("10.0.0.0/8").unwrap();
        assert!(net.contains(&"10.20.30.40".parse().unwrap()));
        assert!(!net.contains(&"11.0.0.1".parse().unwrap()));
        assert!(!net.contains(&"::1".parse().unwrap()));
    }

    #[test]
    fn key_ids_are_uuids() {
        let id = KeyId::new_v7();
        assert_eq!(KeyId::parse(&id.to_string()), Ok(id));
        assert!(KeyId::parse("nope").is_err());
        assert_eq!(KeyId::parse("").unwrap_err().to_string(), "is required");
    }

    #[test]
    fn metadata_names_the_offending_entry() {
        let (key, _) = Metadata::parse([("team".into(), "a\nb".into())]).unwrap_err();
        assert_eq!(key.as_deref(), Some("team"));
        assert!(Metadata::parse([("team".into(), "billing".into())]).is_ok());
    }
}
