//! The decision: a pure function of the key's grant, the request and the time.
//! Both front doors (`CheckService.Check`, Envoy's `Authorization.Check`) and
//! the admin plane's own authorization go through it.

use std::{borrow::Cow, net::IpAddr, time::Duration};

use chrono::{DateTime, Utc};

use crate::key::Grant;

/// Why a check was allowed or denied. The variants are listed in the order a
/// check evaluates them; the first failure wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    MissingKey,
    MalformedKey,
    UnknownKey,
    Revoked,
    Expired,
    Disabled,
    OwnerInactive,
    IpForbidden,
    ResourceForbidden,
    ScopeMissing,
    RateLimited,
    UsageExceeded,
    Ok,
}

impl Reason {
    /// Every reason, in declaration order (`index` is the position here).
    pub const ALL: [Reason; 13] = [
        Reason::MissingKey,
        Reason::MalformedKey,
        Reason::UnknownKey,
        Reason::Revoked,
        Reason::Expired,
        Reason::Disabled,
        Reason::OwnerInactive,
        Reason::IpForbidden,
        Reason::ResourceForbidden,
        Reason::ScopeMissing,
        Reason::RateLimited,
        Reason::UsageExceeded,
        Reason::Ok,
    ];

    /// The position in [`Reason::ALL`], for per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn is_allowed(self) -> bool {
        self == Reason::Ok
    }

    /// The HTTP status an HTTP front door answers with (DESIGN.md's table).
    pub fn http_status(self) -> u16 {
        match self {
            Reason::Ok => 200,
            Reason::MissingKey
            | Reason::MalformedKey
            | Reason::UnknownKey
            | Reason::Revoked
            | Reason::Expired
            | Reason::Disabled => 401,
            Reason::OwnerInactive
            | Reason::IpForbidden
            | Reason::ResourceForbidden
            | Reason::ScopeMissing => 403,
            Reason::RateLimited | Reason::UsageExceeded => 429,
        }
    }

    /// The wire name, as in the proto enum and deny bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "OK",
            Reason::MissingKey => "MISSING_KEY",
            Reason::MalformedKey => "MALFORMED_KEY",
            Reason::UnknownKey => "UNKNOWN_KEY",
            Reason::Revoked => "REVOKED",
            Reason::Expired => "EXPIRED",
            Reason::Disabled => "DISABLED",
            Reason::OwnerInactive => "OWNER_INACTIVE",
            Reason::IpForbidden => "IP_FORBIDDEN",
            Reason::ResourceForbidden => "RESOURCE_FORBIDDEN",
            Reason::ScopeMissing => "SCOPE_MISSING",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::UsageExceeded => "USAGE_EXCEEDED",
        }
    }

    fn default_message(self) -> &'static str {
        match self {
            Reason::Ok => "allowed",
            Reason::MissingKey => "no API key was presented",
            Reason::MalformedKey => "the API key is malformed",
            Reason::UnknownKey => "the API key is not valid",
            Reason::Revoked => "the API key has been revoked",
            Reason::Expired => "the API key has expired",
            Reason::Disabled => "the API key is disabled",
            Reason::OwnerInactive => "the account that owns the API key is inactive",
            Reason::IpForbidden => "the API key may not be used from this address",
            Reason::ResourceForbidden => "the API key is not valid for this resource",
            Reason::ScopeMissing => "the API key lacks a required scope",
            Reason::RateLimited => "the API key is over its rate limit",
            Reason::UsageExceeded => "the API key's usage credits are spent",
        }
    }
}

/// The outcome of a check: the reason and a message fit for the caller
/// (it never contains a key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    pub message: Cow<'static, str>,
    /// On refusals that end by themselves (429): when to try again.
    pub retry_after: Option<Duration>,
}

impl Decision {
    pub fn new(reason: Reason) -> Self {
        Self {
            reason,
            message: Cow::Borrowed(reason.default_message()),
            retry_after: None,
        }
    }

    fn with_message(reason: Reason, message: String) -> Self {
        Self {
            reason,
            message: Cow::Owned(message),
            retry_after: None,
        }
    }

    /// Over a rate limit: refused until `retry_after`.
    pub fn rate_limited(retry_after: Duration) -> Self {
        Self {
            reason: Reason::RateLimited,
            message: Cow::Borrowed(Reason::RateLimited.default_message()),
            retry_after: Some(retry_after),
        }
    }

    /// The key's credits are spent; with a refill, until it comes.
    pub fn usage_exceeded(retry_after: Option<Duration>) -> Self {
        Self {
            reason: Reason::UsageExceeded,
            message: Cow::Borrowed(Reason::UsageExceeded.default_message()),
            retry_after,
        }
    }

    /// The client's address failed too often: refused until `retry_after`.
    pub fn source_blocked(retry_after: Duration) -> Self {
        Self {
            reason: Reason::RateLimited,
            message: Cow::Borrowed("too many invalid API keys from this address; retry later"),
            retry_after: Some(retry_after),
        }
    }

    /// Whether this refusal counts against the client's address as a failed
    /// presentation (brute-force protection).
    pub fn is_failed_presentation(&self) -> bool {
        matches!(
            self.reason,
            Reason::MalformedKey | Reason::UnknownKey | Reason::Revoked | Reason::Expired
        )
    }

    pub fn allowed(&self) -> bool {
        self.reason.is_allowed()
    }
}

/// What is being asked of a known key.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// The API or resource called; `None` when the caller names none.
    pub resource: Option<&'a str>,
    /// All of these must be held.
    pub required_scopes: &'a [&'a str],
    pub client_ip: Option<IpAddr>,
    /// Credits an allowed check spends (and uses it counts against rate
    /// limits); 0 counts as 1.
    pub cost: u64,
}

/// Decides for a key that exists. Credential presence, format and existence
/// (MISSING_KEY, MALFORMED_KEY, UNKNOWN_KEY) are settled before a record can
/// be looked up, so they are not evaluated here, except that a canary key
/// answers exactly as an unknown one.
pub fn decide(key: &Grant, req: &Request<'_>, now: DateTime<Utc>) -> Decision {
    for rule in RULES {
        if let Err(decision) = (rule.check)(key, req, now) {
            return decision;
        }
    }
    Decision::new(Reason::Ok)
}

/// One rule's verdict, for `Explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub rule: &'static str,
    pub passed: bool,
    /// Why it failed, or what it checked.
    pub detail: Cow<'static, str>,
}

/// Every rule's verdict, in the order a check evaluates them, and the
/// decision (the first failure, as [`decide`] gives it).
pub fn explain(key: &Grant, req: &Request<'_>, now: DateTime<Utc>) -> (Decision, Vec<Verdict>) {
    let mut decision = None;
    let verdicts = RULES
        .iter()
        .map(|rule| match (rule.check)(key, req, now) {
            Ok(()) => Verdict {
                rule: rule.name,
                passed: true,
                detail: Cow::Borrowed(rule.passes),
            },
            Err(d) => {
                let detail = d.message.clone();
                decision.get_or_insert(d);
                Verdict {
                    rule: rule.name,
                    passed: false,
                    detail,
                }
            }
        })
        .collect();
    (
        decision.unwrap_or_else(|| Decision::new(Reason::Ok)),
        verdicts,
    )
}

struct Rule {
    name: &'static str,
    /// What a pass means, for `Explain`.
    passes: &'static str,
    check: fn(&Grant, &Request<'_>, DateTime<Utc>) -> Result<(), Decision>,
}

/// In the decision table's order; the first failure wins.
const RULES: [Rule; 8] = [
    Rule {
        name: "canary",
        passes: "not a canary key",
        check: |key, _, _| {
            if key.canary {
                Err(Decision::with_message(
                    Reason::UnknownKey,
                    "a canary key: refused as an unknown key, and reported".to_owned(),
                ))
            } else {
                Ok(())
            }
        },
    },
    Rule {
        name: "revoked",
        passes: "not revoked",
        check: |key, _, _| match key.revoked_at {
            Some(_) => Err(Decision::new(Reason::Revoked)),
            None => Ok(()),
        },
    },
    Rule {
        name: "expiry",
        passes: "not expired",
        check: |key, _, now| match key.expires_at {
            Some(at) if at <= now => Err(Decision::new(Reason::Expired)),
            _ => Ok(()),
        },
    },
    Rule {
        name: "disabled",
        passes: "not disabled",
        check: |key, _, _| match key.disabled_at {
            Some(_) => Err(Decision::new(Reason::Disabled)),
            None => Ok(()),
        },
    },
    Rule {
        name: "owner",
        passes: "the owner is active",
        check: |key, _, _| {
            if key.owner_active {
                Ok(())
            } else {
                Err(Decision::new(Reason::OwnerInactive))
            }
        },
    },
    Rule {
        name: "ip_allow",
        passes: "the client address is allowed",
        check: |key, req, _| {
            if key.ip_allow.is_empty() {
                return Ok(());
            }
            // An IPv4 client seen through an IPv6 socket must match IPv4 blocks.
            let allowed = req
                .client_ip
                .map(|ip| ip.to_canonical())
                .is_some_and(|ip| key.ip_allow.iter().any(|net| net.contains(&ip)));
            if allowed {
                Ok(())
            } else {
                Err(Decision::new(Reason::IpForbidden))
            }
        },
    },
    Rule {
        name: "resources",
        passes: "the key is valid for the resource",
        check: |key, req, _| {
            if key.resources.is_empty() {
                return Ok(());
            }
            // A key limited to resources fails closed when the caller names none.
            let allowed = req
                .resource
                .is_some_and(|r| key.resources.iter().any(|k| k.as_str() == r));
            if allowed {
                Ok(())
            } else {
                Err(Decision::new(Reason::ResourceForbidden))
            }
        },
    },
    Rule {
        name: "scopes",
        passes: "the key holds every required scope",
        check: |key, req, _| match req.required_scopes.iter().find(|s| !key.has_scope(s)) {
            Some(missing) => Err(Decision::with_message(
                Reason::ScopeMissing,
                format!("the API key lacks the required scope {missing}"),
            )),
            None => Ok(()),
        },
    },
];

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::key::{Network, Resource};

    fn record() -> Grant {
        Grant::for_test("acme", &["orders:read"])
    }

    #[test]
    fn every_reason_is_listed_once_at_its_index() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
    }

    fn reason(key: &Grant, req: &Request<'_>) -> Reason {
        decide(key, req, Utc::now()).reason
    }

    #[test]
    fn an_active_key_with_no_restrictions_is_allowed() {
        assert_eq!(reason(&record(), &Request::default()), Reason::Ok);
    }

    #[test]
    fn lifecycle_states_deny_in_table_order() {
        let now = Utc::now();
        let mut key = record();
        key.disabled_at = Some(now);
        assert_eq!(reason(&key, &Request::default()), Reason::Disabled);
        key.expires_at = Some(now - Duration::seconds(1));
        assert_eq!(reason(&key, &Request::default()), Reason::Expired);
        key.revoked_at = Some(now);
        assert_eq!(reason(&key, &Request::default()), Reason::Revoked);
    }

    #[test]
    fn a_key_is_valid_until_its_expiry_instant() {
        let now = Utc::now();
        let mut key = record();
        key.expires_at = Some(now + Duration::seconds(1));
        assert_eq!(decide(&key, &Request::default(), now).reason, Reason::Ok);
        assert_eq!(
            decide(&key, &Request::default(), now + Duration::seconds(1)).reason,
            Reason::Expired
        );
    }

    #[test]
    fn ip_allow_list_matches_blocks_and_mapped_addresses() {
        let mut key = record();
        key.ip_allow = [Network::parse("10.0.0.0/8").unwrap()].into();
        let from = |ip: &str| Request {
            client_ip: Some(ip.parse().unwrap()),
            ..Request::default()
        };
        assert_eq!(reason(&key, &from("10.1.2.3")), Reason::Ok);
        assert_eq!(reason(&key, &from("::ffff:10.1.2.3")), Reason::Ok);
        assert_eq!(reason(&key, &from("192.0.2.1")), Reason::IpForbidden);
        assert_eq!(reason(&key, &Request::default()), Reason::IpForbidden);
    }

    #[test]
    fn resource_limits_fail_closed() {
        let mut key = record();
        key.resources = [Resource::parse("billing").unwrap()].into();
        let on = |r| Request {
            resource: Some(r),
            ..Request::default()
        };
        assert_eq!(reason(&key, &on("billing")), Reason::Ok);
        assert_eq!(reason(&key, &on("orders")), Reason::ResourceForbidden);
        assert_eq!(reason(&key, &Request::default()), Reason::ResourceForbidden);
    }

    #[test]
    fn every_required_scope_must_be_held_and_is_named_when_missing() {
        let key = record();
        let scopes = ["orders:read", "orders:write"];
        let d = decide(
            &key,
            &Request {
                required_scopes: &scopes,
                ..Request::default()
            },
            Utc::now(),
        );
        assert_eq!(d.reason, Reason::ScopeMissing);
        assert!(d.message.contains("orders:write"), "{}", d.message);
        let held = ["orders:read"];
        let req = Request {
            required_scopes: &held,
            ..Request::default()
        };
        assert_eq!(reason(&key, &req), Reason::Ok);
    }

    #[test]
    fn ip_is_checked_before_resource_and_resource_before_scope() {
        let mut key = record();
        key.ip_allow = [Network::parse("10.0.0.0/8").unwrap()].into();
        key.resources = [Resource::parse("billing").unwrap()].into();
        let scopes = ["orders:write"];
        let req = Request {
            resource: Some("orders"),
            required_scopes: &scopes,
            client_ip: Some("192.0.2.1".parse().unwrap()),
            cost: 1,
        };
        assert_eq!(reason(&key, &req), Reason::IpForbidden);
        let req = Request {
            client_ip: Some("10.0.0.1".parse().unwrap()),
            ..req
        };
        assert_eq!(reason(&key, &req), Reason::ResourceForbidden);
        let req = Request {
            resource: Some("billing"),
            ..req
        };
        assert_eq!(reason(&key, &req), Reason::ScopeMissing);
    }

    #[test]
    fn a_suspended_owners_keys_are_refused_after_their_own_state() {
        let mut key = record();
        key.owner_active = false;
        assert_eq!(reason(&key, &Request::default()), Reason::OwnerInactive);
        key.disabled_at = Some(Utc::now());
        assert_eq!(reason(&key, &Request::default()), Reason::Disabled);
    }

    #[test]
    fn a_canary_key_is_refused_as_unknown_whatever_else_holds() {
        let mut key = record();
        key.canary = true;
        assert_eq!(reason(&key, &Request::default()), Reason::UnknownKey);
        key.revoked_at = Some(Utc::now());
        assert_eq!(reason(&key, &Request::default()), Reason::UnknownKey);
    }

    #[test]
    fn explain_gives_every_rules_verdict_and_the_same_decision() {
        let mut key = record();
        key.resources = [Resource::parse("billing").unwrap()].into();
        key.disabled_at = Some(Utc::now());
        let scopes = ["orders:write"];
        let req = Request {
            resource: Some("orders"),
            required_scopes: &scopes,
            client_ip: None,
            cost: 1,
        };
        let now = Utc::now();
        let (decision, verdicts) = explain(&key, &req, now);
        assert_eq!(decision, decide(&key, &req, now));
        assert_eq!(decision.reason, Reason::Disabled);
        let failed: Vec<_> = verdicts
            .iter()
            .filter(|v| !v.passed)
            .map(|v| v.rule)
            .collect();
        assert_eq!(failed, ["disabled", "resources", "scopes"]);
        assert_eq!(verdicts.len(), 8);
    }

    #[test]
    fn http_statuses_follow_the_design_table() {
        assert_eq!(Reason::Ok.http_status(), 200);
        assert_eq!(Reason::UnknownKey.http_status(), 401);
        assert_eq!(Reason::Disabled.http_status(), 401);
        assert_eq!(Reason::OwnerInactive.http_status(), 403);
        assert_eq!(Reason::ScopeMissing.http_status(), 403);
        assert_eq!(Reason::RateLimited.http_status(), 429);
    }
}
