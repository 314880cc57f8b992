//! Who is calling the admin plane, and what they may do.
//!
//! Every call carries a management key in `authorization: Bearer <key>`. It
//! goes through the same check as any key (brute-force protection, format,
//! the cache), then is re-read from the store: a management key revoked on
//! another replica is refused here even if this replica missed the notice.
//!
//! A `keyward:admin` key may do anything. A `keyward:owner` key acts only on
//! its own owner's keys (others' are NOT_FOUND), changes only data-plane keys
//! (none holding a `keyward:*` scope, except that it may revoke itself),
//! mints only keys inside its owner's ceiling without `keyward:*` scopes and
//! not outliving itself when it expires, and cannot re-enable a key an admin
//! disabled.

use std::{borrow::Cow, net::IpAddr};

use chrono::{DateTime, Utc};
use tonic::metadata::MetadataMap;

use super::AdminApi;
use crate::{
    api::status::{ApiError, reason_code},
    checker::credential_hash,
    key::{KeyId, KeyRecord, OwnerId, Scope},
    policy::{self, Reason},
    store::{Actor, Refusal},
};

/// The resource name admin calls are checked against: a management key
/// limited to resources must list it.
pub const ADMIN_RESOURCE: &str = "keyward";

/// An authorized admin caller.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub key_id: KeyId,
    pub owner_id: OwnerId,
    /// `keyward:admin`; otherwise `keyward:owner`, confined to `owner_id`.
    pub admin: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub remote: Option<IpAddr>,
}

/// A change a caller wants to make to an existing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Revoke,
    Disable,
    Enable,
    Update,
    Rotate,
}

impl Caller {
    /// The owner this caller is confined to, if any.
    pub fn confined_to(&self) -> Option<&OwnerId> {
        (!self.admin).then_some(&self.owner_id)
    }

    pub fn actor(&self) -> Actor {
        Actor::key(self.key_id, self.remote)
    }

    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(
                format!("{what} needs a keyward:admin key").into(),
            ))
        }
    }

    /// May this caller make `change` to `target` (as locked in the store)?
    pub fn may_change(&self, target: &KeyRecord, change: Change) -> Result<(), Refusal> {
        if self.admin {
            return Ok(());
        }
        let own_key = target.id == self.key_id;
        if target.is_management_key() && !(change == Change::Revoke && own_key) {
            return Err(Refusal::PermissionDenied(
                "id: a keyward:owner key may change only data-plane keys; this one holds a keyward:* scope"
                    .to_owned(),
            ));
        }
        if change == Change::Enable && target.disabled_by_admin {
            return Err(Refusal::PermissionDenied(
                "id: an admin disabled this key; only a keyward:admin key can enable it".to_owned(),
            ));
        }
        Ok(())
    }

    /// May this caller grant `scopes`, and a key expiring at `expires_at`?
    pub fn may_grant(
        &self,
        scopes: &[Scope],
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(), ApiError> {
        self.may_grant_scopes(scopes)?;
        self.may_grant_expiry(expires_at)
    }

    /// An owner key grants no `keyward:*` scope.
    pub fn may_grant_scopes(&self, scopes: &[Scope]) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        if let Some(i) = scopes.iter().position(Scope::is_keyward) {
            return Err(ApiError::PermissionDenied(
                format!(
                    "scopes[{i}]: a keyward:owner key cannot grant {}; that needs a keyward:admin key",
                    scopes[i]
                )
                .into(),
            ));
        }
        Ok(())
    }

    /// An expiring owner key grants nothing that outlives it.
    pub fn may_grant_expiry(&self, expires_at: Option<DateTime<Utc>>) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        if let Some(own) = self.expires_at
            && expires_at.is_none_or(|at| at > own)
        {
            return Err(ApiError::PermissionDenied(
                format!(
                    "expires_at: this management key expires at {}; a key it grants must expire no later",
                    own.to_rfc3339()
                )
                .into(),
            ));
        }
        Ok(())
    }
}

impl AdminApi {
    /// Authorizes a call: the management key checked like any key, then
    /// re-read from the store.
    pub(super) async fn authorize(
        &self,
        metadata: &MetadataMap,
        remote: Option<IpAddr>,
    ) -> Result<Caller, ApiError> {
        let credential = match metadata.get("authorization") {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                ApiError::Unauthenticated("authorization header is not valid text".into())
            })?),
        };
        if credential.is_none_or(|c| c.trim().is_empty()) {
            return Err(ApiError::Unauthenticated(
                "missing management key: send authorization: Bearer <key>".into(),
            ));
        }
        let request = policy::Request {
            resource: Some(ADMIN_RESOURCE),
            required_scopes: &[],
            client_ip: remote,
            cost: 1,
        };
        let outcome = self.checker.check(credential, &request, remote).await?;
        refuse_unless_ok(outcome.decision.reason, &outcome.decision.message)?;
        // The cache said yes; the store decides.
        let hash = credential_hash(credential).map_err(|_| {
            ApiError::Unauthenticated("management key refused (MALFORMED_KEY)".into())
        })?;
        let Some(key) = self.store.key_by_hash(&hash).await? else {
            return Err(ApiError::Unauthenticated(
                "management key refused (UNKNOWN_KEY): the API key is not valid".into(),
            ));
        };
        let grant = crate::key::Grant::from(&key);
        let decision = policy::decide(&grant, &request, Utc::now());
        if !decision.allowed() {
            // This replica's cache was behind: catch it up now.
            self.checker.invalidate(&hash);
        }
        refuse_unless_ok(decision.reason, &decision.message)?;
        let admin = grant.has_scope(Scope::ADMIN);
        if !admin && !grant.has_scope(Scope::OWNER) {
            return Err(ApiError::PermissionDenied(
                "management key lacks scope keyward:admin (or keyward:owner)".into(),
            ));
        }
        Ok(Caller {
            key_id: key.id,
            owner_id: key.owner_id,
            admin,
            expires_at: key.expires_at,
            remote,
        })
    }
}

fn refuse_unless_ok(reason: Reason, message: &str) -> Result<(), ApiError> {
    if reason == Reason::Ok {
        return Ok(());
    }
    let msg = Cow::Owned(format!(
        "management key refused ({}): {message}",
        reason.as_str()
    ));
    Err(match reason_code(reason) {
        tonic::Code::Unauthenticated => ApiError::Unauthenticated(msg),
        tonic::Code::ResourceExhausted => ApiError::RateLimited(msg),
        _ => ApiError::PermissionDenied(msg),
    })
}
