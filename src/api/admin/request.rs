//! Turning admin requests into validated domain values. Every refusal names
//! the field and says why; nothing is written before all of it is valid.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    api::{datetime, status::ApiError},
    key::{
        Credits, Invalid, KeyId, KeyPrefix, Metadata, MintSpec, Network, OwnerId, RateLimit,
        RefillInterval, Resource, Scope, check_windows,
    },
    pb,
};

pub(super) const NAME_MAX: usize = 200;
pub(super) const DESCRIPTION_MAX: usize = 2000;
pub(super) const REASON_MAX: usize = 500;
const LIST_MAX: usize = 64;
const PAGE_SIZE_DEFAULT: u32 = 50;
const PAGE_SIZE_MAX: u32 = 1000;

pub(super) fn key_id(field: &'static str, s: &str) -> Result<KeyId, ApiError> {
    KeyId::parse(s).map_err(|e| ApiError::invalid(field, e))
}

pub(super) fn owner_id(field: &'static str, s: &str) -> Result<OwnerId, ApiError> {
    OwnerId::parse(s).map_err(|e| ApiError::invalid(field, e))
}

/// `page_size`: unset 50, else 1 to 1000.
pub(super) fn page_size(requested: Option<i32>) -> Result<u32, ApiError> {
    match requested {
        None => Ok(PAGE_SIZE_DEFAULT),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=PAGE_SIZE_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::invalid("page_size", Invalid::new("must be between 1 and 1000"))
            }),
    }
}

fn malformed_token() -> ApiError {
    ApiError::invalid(
        "page_token",
        Invalid::new("is not a token from a previous List response"),
    )
}

/// Key page tokens are the last id of the previous page, as 32 hex digits.
pub(super) fn encode_key_token(id: KeyId) -> String {
    id.as_uuid().simple().to_string()
}

pub(super) fn decode_key_token(token: &str) -> Result<Option<KeyId>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() != 32 {
        return Err(malformed_token());
    }
    Uuid::try_parse(token)
        .map(|id| Some(KeyId::from(id)))
        .map_err(|_| malformed_token())
}

/// Owner page tokens are the last owner id, hex-encoded (ids are free text).
pub(super) fn encode_owner_token(id: &OwnerId) -> String {
    id.as_str().bytes().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn decode_owner_token(token: &str) -> Result<Option<OwnerId>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .filter(|_| token.len().is_multiple_of(2))
        .ok_or_else(malformed_token)?;
    let id = String::from_utf8(bytes).map_err(|_| malformed_token())?;
    OwnerId::parse(&id).map(Some).map_err(|_| malformed_token())
}

/// Audit page tokens are the last event id, in decimal.
pub(super) fn decode_event_token(token: &str) -> Result<Option<i64>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .map(Some)
        .ok_or_else(malformed_token)
}

/// Free text with a length limit and no control characters.
pub(super) fn text_field(field: &'static str, value: &str, max: usize) -> Result<String, ApiError> {
    if value.chars().count() > max {
        return Err(ApiError::invalid(
            field,
            Invalid::new(format!("must be at most {max} characters")),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(ApiError::invalid(
            field,
            Invalid::new("must not contain control characters"),
        ));
    }
    Ok(value.to_owned())
}

/// Parses each element, naming `field[i]` on failure; drops duplicates.
pub(super) fn list_field<T: Clone + Eq + std::hash::Hash>(
    field: &'static str,
    values: &[String],
    parse: impl Fn(&str) -> Result<T, Invalid>,
) -> Result<Vec<T>, ApiError> {
    if values.len() > LIST_MAX {
        return Err(ApiError::invalid(
            field,
            Invalid::new(format!("must have at most {LIST_MAX} entries")),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let parsed = parse(value).map_err(|e| ApiError::invalid(format!("{field}[{i}]"), e))?;
        if seen.insert(parsed.clone()) {
            out.push(parsed);
        }
    }
    Ok(out)
}

pub(super) fn metadata_field(
    entries: std::collections::HashMap<String, String>,
) -> Result<Metadata, ApiError> {
    Metadata::parse(entries).map_err(|(entry, reason)| match entry {
        Some(k) => ApiError::invalid(format!("metadata[{k:?}]"), reason),
        None => ApiError::invalid("metadata", reason),
    })
}

/// A timestamp that must lie in the future.
pub(super) fn future_time(
    field: &'static str,
    ts: &prost_types::Timestamp,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, ApiError> {
    let at =
        datetime(ts).ok_or_else(|| ApiError::invalid(field, Invalid::new("is out of range")))?;
    if at <= now {
        return Err(ApiError::invalid(
            field,
            Invalid::new("must be in the future"),
        ));
    }
    Ok(at)
}

/// A non-negative duration, as chrono's.
pub(super) fn duration_field(
    field: &'static str,
    d: &prost_types::Duration,
) -> Result<chrono::Duration, ApiError> {
    let invalid = |why| ApiError::invalid(field, Invalid::new(why));
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid("must not be negative"));
    }
    chrono::Duration::new(d.seconds, d.nanos as u32).ok_or_else(|| invalid("is too long"))
}

/// Named windows; empty: none (`None`).
pub(super) fn rate_limits_field(
    field: &'static str,
    values: &[pb::RateLimit],
) -> Result<Option<Vec<RateLimit>>, ApiError> {
    if values.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let window = v
            .window
            .as_ref()
            .map(|d| duration_field("window", d))
            .transpose()?
            .and_then(|d| d.to_std().ok())
            .unwrap_or_default();
        let limit = RateLimit::new(&v.name, v.limit, window)
            .map_err(|(part, why)| ApiError::invalid(format!("{field}[{i}].{part}"), why))?;
        out.push(limit);
    }
    check_windows(&out).map_err(|(i, why)| match i {
        Some(i) => ApiError::invalid(format!("{field}[{i}].name"), why),
        None => ApiError::invalid(field, why),
    })?;
    Ok(Some(out))
}

/// Credits to set.
pub(super) fn credits_field(field: &'static str, c: &pb::Credits) -> Result<Credits, ApiError> {
    let remaining = u64::try_from(c.remaining).map_err(|_| {
        ApiError::invalid(
            format!("{field}.remaining"),
            Invalid::new("must not be negative"),
        )
    })?;
    let refill = match &c.refill {
        None => None,
        Some(r) => {
            let interval = match r.interval() {
                pb::credits::refill::Interval::Daily => RefillInterval::Daily,
                pb::credits::refill::Interval::Monthly => RefillInterval::Monthly,
                pb::credits::refill::Interval::Unspecified => {
                    return Err(ApiError::invalid(
                        format!("{field}.refill.interval"),
                        Invalid::new("must be DAILY or MONTHLY"),
                    ));
                }
            };
            Some((interval, r.amount))
        }
    };
    Ok(Credits { remaining, refill })
}

/// A validated Mint request.
pub(super) fn mint_spec(
    req: pb::MintRequest,
    default_prefix: &KeyPrefix,
    now: DateTime<Utc>,
) -> Result<MintSpec, ApiError> {
    let owner_id = owner_id("owner_id", &req.owner_id)?;
    let prefix = match req.prefix.as_str() {
        "" => default_prefix.clone(),
        p => KeyPrefix::parse(p).map_err(|e| ApiError::invalid("prefix", e))?,
    };
    let expires_at = match req.expiry {
        None => None,
        Some(pb::mint_request::Expiry::ExpiresAt(ts)) => Some(future_time("expires_at", &ts, now)?),
        Some(pb::mint_request::Expiry::Ttl(ttl)) => {
            let invalid = |why| ApiError::invalid("ttl", Invalid::new(why));
            let ttl = duration_field("ttl", &ttl).map_err(|_| invalid("must be positive"))?;
            if ttl.is_zero() {
                return Err(invalid("must be positive"));
            }
            Some(
                now.checked_add_signed(ttl)
                    .ok_or_else(|| invalid("is too long"))?,
            )
        }
    };
    Ok(MintSpec {
        name: text_field("name", &req.name, NAME_MAX)?,
        description: text_field("description", &req.description, DESCRIPTION_MAX)?,
        scopes: list_field("scopes", &req.scopes, Scope::parse)?,
        resources: list_field("resources", &req.resources, Resource::parse)?,
        ip_allow: list_field("ip_allow", &req.ip_allow, Network::parse)?,
        metadata: metadata_field(req.metadata)?,
        expires_at,
        canary: req.canary,
        rate_limits: rate_limits_field("rate_limits", &req.rate_limits)?,
        credits: req
            .credits
            .as_ref()
            .map(|c| credits_field("credits", c))
            .transpose()?,
        ..MintSpec::new(owner_id, prefix)
    })
}

/// The paths of a field mask, each one of `allowed`; at least one.
pub(super) fn mask_paths<'a>(
    mask: Option<&'a prost_types::FieldMask>,
    allowed: &[&str],
) -> Result<Vec<&'a str>, ApiError> {
    let paths: Vec<&str> =
        mask.map_or(Vec::new(), |m| m.paths.iter().map(String::as_str).collect());
    if paths.is_empty() {
        return Err(ApiError::invalid(
            "update_mask",
            Invalid::new(format!(
                "is required: name the fields to change ({})",
                allowed.join(", ")
            )),
        ));
    }
    if let Some(bad) = paths.iter().find(|p| !allowed.contains(p)) {
        return Err(ApiError::invalid(
            "update_mask",
            Invalid::new(format!(
                "{bad:?} cannot be changed; use any of {}",
                allowed.join(", ")
            )),
        ));
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> KeyPrefix {
        KeyPrefix::parse("kw_live").unwrap()
    }

    fn mint(req: pb::MintRequest) -> Result<MintSpec, String> {
        mint_spec(req, &prefix(), Utc::now()).map_err(|e| e.to_string())
    }

    fn base() -> pb::MintRequest {
        pb::MintRequest {
            owner_id: "acme".into(),
            ..Default::default()
        }
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let id = KeyId::new_v7();
        assert_eq!(decode_key_token(&encode_key_token(id)).unwrap(), Some(id));
        for bad in ["x", "not-a-token", &id.to_string(), &"g".repeat(32)] {
            let err = decode_key_token(bad).unwrap_err().to_string();
            assert!(err.starts_with("page_token: "), "{err}");
        }
        let owner = OwnerId::parse("cus_123@example.com").unwrap();
        assert_eq!(
            decode_owner_token(&encode_owner_token(&owner)).unwrap(),
            Some(owner)
        );
        assert!(decode_owner_token("zz").is_err());
        assert!(decode_owner_token("abc").is_err());
        assert_eq!(decode_event_token("42").unwrap(), Some(42));
        assert!(decode_event_token("-1").is_err());
    }

    #[test]
    fn mint_errors_name_the_field_and_index() {
        let err = mint(pb::MintRequest {
            ip_allow: vec!["10.0.0.0/8".into(), "nope".into()],
            ..base()
        })
        .unwrap_err();
        assert!(err.starts_with("ip_allow[1]: "), "{err}");
        let err = mint(pb::MintRequest {
            owner_id: String::new(),
            ..base()
        })
        .unwrap_err();
        assert_eq!(err, "owner_id: is required");
        let err = mint(pb::MintRequest {
            prefix: "Bad".into(),
            ..base()
        })
        .unwrap_err();
        assert!(err.starts_with("prefix: "), "{err}");
    }

    #[test]
    fn ttl_and_expiry_must_lie_in_the_future() {
        let past = pb::mint_request::Expiry::ExpiresAt(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        });
        let err = mint(pb::MintRequest {
            expiry: Some(past),
            ..base()
        })
        .unwrap_err();
        assert_eq!(err, "expires_at: must be in the future");
        let zero = pb::mint_request::Expiry::Ttl(prost_types::Duration::default());
        let err = mint(pb::MintRequest {
            expiry: Some(zero),
            ..base()
        })
        .unwrap_err();
        assert_eq!(err, "ttl: must be positive");
        let hour = pb::mint_request::Expiry::Ttl(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        });
        let spec = mint(pb::MintRequest {
            expiry: Some(hour),
            ..base()
        })
        .unwrap();
        assert!(spec.expires_at.unwrap() > Utc::now() + chrono::Duration::minutes(59));
    }

    #[test]
    fn duplicate_scopes_are_dropped_in_order() {
        let spec = mint(pb::MintRequest {
            scopes: vec!["b".into(), "a".into(), "b".into()],
            ..base()
        })
        .unwrap();
        let scopes: Vec<_> = spec.scopes.iter().map(Scope::as_str).collect();
        assert_eq!(scopes, ["b", "a"]);
    }

    #[test]
    fn default_prefix_applies_when_none_is_chosen() {
        assert_eq!(mint(base()).unwrap().prefix.as_str(), "kw_live");
    }

    #[test]
    fn field_masks_must_name_known_fields() {
        let mask = |paths: &[&str]| prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        };
        let allowed = ["name", "scopes"];
        assert_eq!(
            mask_paths(Some(&mask(&["scopes"])), &allowed).unwrap(),
            ["scopes"]
        );
        let err = mask_paths(None, &allowed).unwrap_err().to_string();
        assert!(err.starts_with("update_mask: is required"), "{err}");
        let err = mask_paths(Some(&mask(&["hash"])), &allowed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"hash\" cannot be changed"), "{err}");
    }
}
