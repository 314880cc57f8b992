//! The one place where errors become `tonic::Status`. Clients get a short,
//! stable message; for internal errors the cause chain goes to the log, once,
//! and the client gets an opaque message.

use std::borrow::Cow;

use tonic::{Code, Status};

use crate::{
    checker::Undecided,
    key::Invalid,
    policy::Reason,
    store::{Refusal, StoreError},
    telemetry::chain,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is unacceptable; the message names it.
    #[error("{field}: {reason}")]
    InvalidArgument {
        field: Cow<'static, str>,
        reason: Invalid,
    },
    #[error("{field}: {what}")]
    NotFound {
        field: &'static str,
        what: &'static str,
    },
    #[error("{field}: {what}")]
    AlreadyExists {
        field: &'static str,
        what: &'static str,
    },
    #[error("{0}")]
    Unauthenticated(Cow<'static, str>),
    #[error("{0}")]
    PermissionDenied(Cow<'static, str>),
    /// Refused for now: the caller's address tried too many bad keys.
    #[error("{0}")]
    RateLimited(Cow<'static, str>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Undecided(#[from] Undecided),
}

impl ApiError {
    pub fn invalid(field: impl Into<Cow<'static, str>>, reason: Invalid) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason,
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
            ApiError::NotFound { .. } => Status::not_found(err.to_string()),
            ApiError::AlreadyExists { .. } => Status::already_exists(err.to_string()),
            ApiError::Unauthenticated(msg) => Status::unauthenticated(msg),
            ApiError::PermissionDenied(msg) => Status::permission_denied(msg),
            ApiError::RateLimited(msg) => Status::resource_exhausted(msg),
            ApiError::Store(err) => store_status(&err),
            ApiError::Undecided(err) => undecided_status(err),
        }
    }
}

/// A store failure seen by a client: `UNAVAILABLE` when retrying may help,
/// `INTERNAL` otherwise. `NotFound` is mapped by callers, who know the field.
pub fn store_status(err: &StoreError) -> Status {
    match err {
        StoreError::Refused(refusal) => match refusal {
            Refusal::PermissionDenied(msg) => Status::permission_denied(msg.clone()),
            Refusal::FailedPrecondition(msg) => Status::failed_precondition(msg.clone()),
            Refusal::QuotaExceeded(msg) => Status::resource_exhausted(msg.clone()),
        },
        _ if err.is_retryable() => {
            tracing::warn!(error = %chain(err), "store unavailable");
            Status::unavailable("key store unavailable; retry later")
        }
        _ => {
            tracing::error!(error = %chain(err), "internal error");
            Status::internal("internal error")
        }
    }
}

/// A check that could not be decided (already logged where it happened).
pub fn undecided_status(err: Undecided) -> Status {
    match err {
        Undecided::Unavailable => Status::unavailable("key store unavailable; retry later"),
        Undecided::Internal => Status::internal("internal error"),
    }
}

/// The gRPC code matching a decision (DESIGN.md's table), as carried by
/// Envoy's `CheckResponse.status` and by refused admin calls.
pub fn reason_code(reason: Reason) -> Code {
    match reason.http_status() {
        200 => Code::Ok,
        401 => Code::Unauthenticated,
        429 => Code::ResourceExhausted,
        _ => Code::PermissionDenied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_arguments_name_the_field() {
        let status = Status::from(ApiError::invalid("owner_id", Invalid::new("is required")));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "owner_id: is required");
    }

    #[test]
    fn internal_errors_are_opaque() {
        let status = store_status(&StoreError::Corrupt("key 123: hash length".into()));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn decisions_map_to_the_design_codes() {
        assert_eq!(reason_code(Reason::Ok), Code::Ok);
        assert_eq!(reason_code(Reason::Revoked), Code::Unauthenticated);
        assert_eq!(reason_code(Reason::ScopeMissing), Code::PermissionDenied);
        assert_eq!(reason_code(Reason::RateLimited), Code::ResourceExhausted);
    }
}
