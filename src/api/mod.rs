//! gRPC handlers. They translate between the wire and the domain; the
//! decision lives in `policy`, persistence in `store`, and error mapping in
//! `status`.

pub mod admin;
pub mod check;
pub mod envoy;
pub mod envoy_wire;
pub mod leaks;
pub mod observed;
pub mod shed;
pub mod status;

use chrono::{DateTime, NaiveDate, Utc};

use crate::{
    key::{Credits, KeyRecord, KeyState, RateLimit, RefillInterval},
    pb,
    policy::Reason,
};

/// Names the decision on the check's span, when the check is traced.
pub(crate) fn record_outcome(outcome: &crate::checker::Outcome) {
    if !crate::telemetry::traced() {
        return;
    }
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    span.record("keyward.reason", outcome.decision.reason.as_str());
    if let Some(key) = outcome.key() {
        span.record("keyward.key_id", tracing::field::display(&key.id));
        span.record("keyward.owner_id", tracing::field::display(&key.owner_id));
    }
}

/// A check without a decision, as metrics count it.
pub(crate) fn check_error(err: &crate::checker::Undecided) -> crate::metrics::CheckError {
    match err {
        crate::checker::Undecided::Unavailable => crate::metrics::CheckError::Unavailable,
        crate::checker::Undecided::Internal => crate::metrics::CheckError::Internal,
    }
}

pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        // Always below 2e9, so it fits.
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// A duration on the wire, rounded up to whole seconds for anything a client
/// should wait (HTTP's Retry-After has no fractions).
pub(crate) fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(retry_after_secs(d)).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// Whole seconds to wait, rounded up, at least 1.
pub(crate) fn retry_after_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

/// `None` when the timestamp is outside what chrono can represent.
pub(crate) fn datetime(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(ts.nanos).ok()?;
    DateTime::from_timestamp(ts.seconds, nanos)
}

/// A key as the admin plane shows it: no secret, no hash.
pub(crate) fn api_key(key: &KeyRecord, now: DateTime<Utc>) -> pb::ApiKey {
    api_key_with_usage(key, now, &[])
}

/// [`api_key`] with its recent daily usage, newest first.
pub(crate) fn api_key_with_usage(
    key: &KeyRecord,
    now: DateTime<Utc>,
    usage: &[(NaiveDate, u64)],
) -> pb::ApiKey {
    let state = match key.state_at(now) {
        KeyState::Active => pb::api_key::State::Active,
        KeyState::Disabled => pb::api_key::State::Disabled,
        KeyState::Revoked => pb::api_key::State::Revoked,
        KeyState::Expired => pb::api_key::State::Expired,
    };
    pb::ApiKey {
        id: key.id.to_string(),
        owner_id: key.owner_id.to_string(),
        name: key.name.clone(),
        description: key.description.clone(),
        prefix: key.prefix.clone(),
        start: key.start.clone(),
        scopes: key.scopes.iter().map(ToString::to_string).collect(),
        resources: key.resources.iter().map(ToString::to_string).collect(),
        ip_allow: key.ip_allow.iter().map(ToString::to_string).collect(),
        metadata: key
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        state: state.into(),
        created_at: Some(timestamp(key.created_at)),
        expires_at: key.expires_at.map(timestamp),
        revoked_at: key.revoked_at.map(timestamp),
        last_used_at: key.last_used_at.map(timestamp),
        disabled_at: key.disabled_at.map(timestamp),
        revoked_reason: key.revoked_reason.clone().unwrap_or_default(),
        canary: key.canary,
        rotated_from: key
            .rotated_from
            .map(|id| id.to_string())
            .unwrap_or_default(),
        replaced_by: key.replaced_by.map(|id| id.to_string()).unwrap_or_default(),
        rate_limits: key
            .rate_limits
            .iter()
            .flatten()
            .map(rate_limit_pb)
            .collect(),
        credits: key.credits.map(credits_pb),
        daily_usage: usage
            .iter()
            .map(|(day, uses)| pb::DailyUsage {
                day: day.format("%Y-%m-%d").to_string(),
                uses: *uses,
            })
            .collect(),
    }
}

pub(crate) fn rate_limit_pb(limit: &RateLimit) -> pb::RateLimit {
    pb::RateLimit {
        name: limit.name().to_owned(),
        limit: limit.limit(),
        window: Some(exact_duration(limit.window())),
    }
}

pub(crate) fn credits_pb(credits: Credits) -> pb::Credits {
    pb::Credits {
        remaining: i64::try_from(credits.remaining).unwrap_or(i64::MAX),
        refill: credits
            .refill
            .map(|(interval, amount)| pb::credits::Refill {
                interval: match interval {
                    RefillInterval::Daily => pb::credits::refill::Interval::Daily,
                    RefillInterval::Monthly => pb::credits::refill::Interval::Monthly,
                }
                .into(),
                amount,
            }),
    }
}

/// A duration on the wire, as it is.
pub(crate) fn exact_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Below 1e9, so it fits.
        nanos: d.subsec_nanos() as i32,
    }
}

pub(crate) fn reason_pb(reason: Reason) -> pb::Reason {
    match reason {
        Reason::Ok => pb::Reason::Ok,
        Reason::MissingKey => pb::Reason::MissingKey,
        Reason::MalformedKey => pb::Reason::MalformedKey,
        Reason::UnknownKey => pb::Reason::UnknownKey,
        Reason::Revoked => pb::Reason::Revoked,
        Reason::Expired => pb::Reason::Expired,
        Reason::Disabled => pb::Reason::Disabled,
        Reason::OwnerInactive => pb::Reason::OwnerInactive,
        Reason::IpForbidden => pb::Reason::IpForbidden,
        Reason::ResourceForbidden => pb::Reason::ResourceForbidden,
        Reason::ScopeMissing => pb::Reason::ScopeMissing,
        Reason::RateLimited => pb::Reason::RateLimited,
        Reason::UsageExceeded => pb::Reason::UsageExceeded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let now = Utc::now();
        assert_eq!(datetime(&timestamp(now)), Some(now));
        let absurd = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(datetime(&absurd), None);
        let negative_nanos = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(datetime(&negative_nanos), None);
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        use std::time::Duration;
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
        assert_eq!(retry_after_secs(Duration::from_millis(30_001)), 31);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn wire_reasons_carry_the_same_names() {
        for reason in [
            Reason::Ok,
            Reason::UnknownKey,
            Reason::ScopeMissing,
            Reason::RateLimited,
        ] {
            assert_eq!(reason_pb(reason).as_str_name(), reason.as_str());
        }
    }
}
