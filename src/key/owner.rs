//! Owners: the accounts keys belong to, their state and their ceiling.

use chrono::{DateTime, Utc};

use super::{Invalid, Metadata, OwnerId, OwnerState, RateLimit, Resource, Scope};

/// An owner as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRecord {
    pub id: OwnerId,
    pub display_name: String,
    pub state: OwnerState,
    pub state_reason: String,
    pub metadata: Metadata,
    pub ceiling: Ceiling,
    /// Most keys held at once (neither revoked nor expired); `None`: any.
    pub max_keys: Option<u32>,
    /// The rate limits of its keys that declare none.
    pub default_rate_limits: Option<Vec<RateLimit>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What keys of an owner may ever hold. `None`: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ceiling {
    pub scopes: Option<Vec<Scope>>,
    /// Keys must be limited to some of these resources.
    pub resources: Option<Vec<Resource>>,
}

impl Ceiling {
    /// Checks a key's scopes and resources against the ceiling; on failure,
    /// the field (`scopes[i]`, `resources`) and why.
    pub fn permits(
        &self,
        scopes: &[Scope],
        resources: &[Resource],
    ) -> Result<(), (String, Invalid)> {
        if let Some(allowed) = &self.scopes
            && let Some(i) = scopes.iter().position(|s| !allowed.contains(s))
        {
            return Err((
                format!("scopes[{i}]"),
                Invalid::new(format!(
                    "{} is outside the owner's scope ceiling (allowed_scopes)",
                    scopes[i]
                )),
            ));
        }
        if let Some(allowed) = &self.resources {
            if resources.is_empty() {
                return Err((
                    "resources".to_owned(),
                    Invalid::new(
                        "must name resources: the owner's keys are limited to its allowed_resources",
                    ),
                ));
            }
            if let Some(i) = resources.iter().position(|r| !allowed.contains(r)) {
                return Err((
                    format!("resources[{i}]"),
                    Invalid::new(format!(
                        "{} is outside the owner's resource ceiling (allowed_resources)",
                        resources[i]
                    )),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(s: &[&str]) -> Vec<Scope> {
        s.iter().map(|s| Scope::parse(s).unwrap()).collect()
    }

    fn resources(r: &[&str]) -> Vec<Resource> {
        r.iter().map(|r| Resource::parse(r).unwrap()).collect()
    }

    #[test]
    fn no_ceiling_permits_anything() {
        assert!(
            Ceiling::default()
                .permits(&scopes(&["a", "b"]), &[])
                .is_ok()
        );
    }

    #[test]
    fn the_scope_ceiling_names_the_first_scope_outside_it() {
        let ceiling = Ceiling {
            scopes: Some(scopes(&["read", "write"])),
            resources: None,
        };
        assert!(ceiling.permits(&scopes(&["read"]), &[]).is_ok());
        let (field, why) = ceiling
            .permits(&scopes(&["read", "admin"]), &[])
            .unwrap_err();
        assert_eq!(field, "scopes[1]");
        assert!(why.to_string().contains("admin"), "{why}");
    }

    #[test]
    fn the_resource_ceiling_needs_keys_limited_to_it() {
        let ceiling = Ceiling {
            scopes: None,
            resources: Some(resources(&["billing"])),
        };
        assert!(ceiling.permits(&[], &resources(&["billing"])).is_ok());
        assert_eq!(ceiling.permits(&[], &[]).unwrap_err().0, "resources");
        assert_eq!(
            ceiling
                .permits(&[], &resources(&["billing", "orders"]))
                .unwrap_err()
                .0,
            "resources[1]"
        );
    }
}
