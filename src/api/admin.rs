//! `keyward.v1.KeyService`: the admin plane.
//!
//! Every call is authorized with a management key from
//! `authorization: Bearer <key>`, checked through the same path as any other
//! key (for resource [`ADMIN_RESOURCE`]). A key holding `keyward:admin` may
//! manage every owner's keys; one holding `keyward:owner` only its own
//! owner's keys, and it cannot mint admin keys.

use std::{borrow::Cow, collections::HashSet, net::IpAddr};

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status, metadata::MetadataMap};
use uuid::Uuid;

use super::{api_key, api_key_with_usage, datetime, status::ApiError, status::reason_code};
use crate::{
    checker::Checker,
    key::{
        ApiKey, Grant, Invalid, KeyId, KeyPrefix, Metadata, Network, NewKey, OwnerId, Resource,
        Scope,
    },
    pb,
    policy::{self, Reason},
    store::{Actor, ListQuery, Store, StoreError},
};

/// The resource name admin calls are checked against: a management key
/// limited to resources must list it.
pub const ADMIN_RESOURCE: &str = "keyward";

const NAME_MAX: usize = 200;
const DESCRIPTION_MAX: usize = 2000;
const REASON_MAX: usize = 500;
const LIST_MAX: usize = 64;
const PAGE_SIZE_DEFAULT: u32 = 50;
const PAGE_SIZE_MAX: u32 = 1000;
/// Days of usage shown by Get and List.
const USAGE_DAYS: u32 = 30;

#[derive(Debug, Clone)]
pub struct AdminApi {
    checker: Checker,
    store: Store,
    default_prefix: KeyPrefix,
}

impl AdminApi {
    pub fn new(checker: Checker, store: Store, default_prefix: KeyPrefix) -> Self {
        Self {
            checker,
            store,
            default_prefix,
        }
    }

    async fn authorize(
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
        };
        let outcome = self.checker.check(credential, &request, remote).await?;
        let reason = outcome.decision.reason;
        let key = match (reason, outcome.key()) {
            (Reason::Ok, Some(key)) => key,
            _ => {
                let msg = Cow::Owned(format!(
                    "management key refused ({}): {}",
                    reason.as_str(),
                    outcome.decision.message
                ));
                return Err(match reason_code(reason) {
                    tonic::Code::Unauthenticated => ApiError::Unauthenticated(msg),
                    tonic::Code::ResourceExhausted => ApiError::RateLimited(msg),
                    _ => ApiError::PermissionDenied(msg),
                });
            }
        };
        let admin = key.has_scope(Scope::ADMIN);
        if !admin && !key.has_scope(Scope::OWNER) {
            return Err(ApiError::PermissionDenied(
                "management key lacks scope keyward:admin (or keyward:owner)".into(),
            ));
        }
        Ok(Caller {
            key_id: key.id,
            owner_id: key.owner_id.clone(),
            admin,
        })
    }
}

/// An authorized admin caller.
#[derive(Debug, Clone)]
struct Caller {
    key_id: KeyId,
    owner_id: OwnerId,
    /// `keyward:admin`; otherwise `keyward:owner`, confined to `owner_id`.
    admin: bool,
}

impl Caller {
    /// The owner this caller is confined to, if any.
    fn confined_to(&self) -> Option<&OwnerId> {
        (!self.admin).then_some(&self.owner_id)
    }

    fn actor(&self) -> Actor {
        Actor::key(self.key_id)
    }
}

/// Authorizes the call and splits it into the caller and the message.
async fn begin<T>(api: &AdminApi, request: Request<T>) -> Result<(Caller, T), ApiError> {
    let remote = request.remote_addr().map(|a| a.ip());
    let caller = api.authorize(request.metadata(), remote).await?;
    Ok((caller, request.into_inner()))
}

fn key_id(field: &'static str, s: &str) -> Result<KeyId, ApiError> {
    KeyId::parse(s).map_err(|e| ApiError::invalid(field, e))
}

fn not_found(err: StoreError) -> ApiError {
    match err {
        StoreError::NotFound => ApiError::NotFound {
            field: "id",
            what: "no key with this id",
        },
        other => ApiError::Store(other),
    }
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for AdminApi {
    async fn mint(
        &self,
        request: Request<pb::MintRequest>,
    ) -> Result<Response<pb::MintResponse>, Status> {
        let (caller, req) = begin(self, request).await?;
        let now = Utc::now();
        let spec = MintSpec::parse(req, &self.default_prefix, now)?;
        if let Some(own) = caller.confined_to() {
            if spec.owner_id != *own {
                return Err(ApiError::PermissionDenied(
                    "owner_id: this management key may only mint keys for its own owner".into(),
                )
                .into());
            }
            if spec.scopes.iter().any(|s| s.as_str() == Scope::ADMIN) {
                return Err(ApiError::PermissionDenied(
                    "scopes: minting keyward:admin needs a keyward:admin key".into(),
                )
                .into());
            }
        }
        let (secret, new_key) = spec.into_new_key();
        let ticket = self.checker.ticket(&new_key.hash);
        let record = self
            .store
            .insert_key(&new_key, &caller.actor())
            .await
            .map_err(ApiError::from)?;
        tracing::info!(key_id = %record.id, owner_id = %record.owner_id, start = %record.start, "key minted");
        let key = api_key(&record, now);
        // The first check of a new key here should not miss.
        self.checker
            .remember_new_key(ticket, record.hash, Grant::from(&record));
        Ok(Response::new(pb::MintResponse {
            key: Some(key),
            secret: secret.expose_secret().to_owned(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let (caller, req) = begin(self, request).await?;
        let id = key_id("id", &req.id)?;
        let reason = text_field("reason", &req.reason, REASON_MAX)?;
        let record = self
            .store
            .revoke_key(
                id,
                Some(reason.as_str()).filter(|r| !r.is_empty()),
                caller.confined_to(),
                &caller.actor(),
            )
            .await
            .map_err(not_found)?;
        self.checker.invalidate(&record.hash);
        tracing::info!(key_id = %record.id, owner_id = %record.owner_id, "key revoked");
        Ok(Response::new(pb::RevokeResponse {
            key: Some(api_key(&record, Utc::now())),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let (caller, req) = begin(self, request).await?;
        let limit = match req.page_size {
            None => PAGE_SIZE_DEFAULT,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=PAGE_SIZE_MAX).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid("page_size", Invalid::new("must be between 1 and 1000"))
                })?,
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(decode_page_token(token)?),
        };
        let owner = match req.owner_id.as_str() {
            "" => None,
            id => Some(OwnerId::parse(id).map_err(|e| ApiError::invalid("owner_id", e))?),
        };
        let owner = match (caller.confined_to(), owner) {
            (None, owner) => owner,
            (Some(own), None) => Some(own.clone()),
            (Some(own), Some(asked)) if asked == *own => Some(asked),
            (Some(_), Some(_)) => {
                return Err(ApiError::PermissionDenied(
                    "owner_id: this management key may only list its own owner's keys".into(),
                )
                .into());
            }
        };
        let page = self
            .store
            .list_keys(&ListQuery {
                owner,
                include_revoked: req.include_revoked,
                after,
                limit,
            })
            .await
            .map_err(ApiError::from)?;
        let ids: Vec<KeyId> = page.keys.iter().map(|k| k.id).collect();
        let usage = self
            .store
            .daily_usage(&ids, USAGE_DAYS)
            .await
            .map_err(ApiError::from)?;
        let now = Utc::now();
        Ok(Response::new(pb::ListResponse {
            keys: page
                .keys
                .iter()
                .map(|k| api_key_with_usage(k, now, usage.get(&k.id).map_or(&[], Vec::as_slice)))
                .collect(),
            next_page_token: page.next.map(encode_page_token).unwrap_or_default(),
        }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::ApiKey>, Status> {
        let (caller, req) = begin(self, request).await?;
        let id = key_id("id", &req.id)?;
        let record = self
            .store
            .get_key(id, caller.confined_to())
            .await
            .map_err(not_found)?;
        let usage = self
            .store
            .daily_usage(&[record.id], USAGE_DAYS)
            .await
            .map_err(ApiError::from)?;
        let days = usage.get(&record.id).map_or(&[][..], Vec::as_slice);
        Ok(Response::new(api_key_with_usage(&record, Utc::now(), days)))
    }

    async fn disable(
        &self,
        request: Request<pb::DisableRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let (caller, req) = begin(self, request).await?;
        let id = key_id("id", &req.id)?;
        self.set_disabled(&caller, id, true).await
    }

    async fn enable(
        &self,
        request: Request<pb::EnableRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let (caller, req) = begin(self, request).await?;
        let id = key_id("id", &req.id)?;
        self.set_disabled(&caller, id, false).await
    }
}

impl AdminApi {
    async fn set_disabled(
        &self,
        caller: &Caller,
        id: KeyId,
        disabled: bool,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let record = self
            .store
            .set_key_disabled(id, disabled, caller.confined_to(), &caller.actor())
            .await
            .map_err(not_found)?;
        self.checker.invalidate(&record.hash);
        tracing::info!(key_id = %record.id, disabled, "key state changed");
        Ok(Response::new(api_key(&record, Utc::now())))
    }
}

/// Page tokens are the last id of the previous page, as 32 hex digits.
fn encode_page_token(id: KeyId) -> String {
    id.as_uuid().simple().to_string()
}

fn decode_page_token(token: &str) -> Result<KeyId, ApiError> {
    let malformed = || {
        ApiError::invalid(
            "page_token",
            Invalid::new("is not a token from a previous List response"),
        )
    };
    if token.len() != 32 {
        return Err(malformed());
    }
    Uuid::try_parse(token)
        .map(KeyId::from)
        .map_err(|_| malformed())
}

/// Free text with a length limit and no control characters.
fn text_field(field: &'static str, value: &str, max: usize) -> Result<String, ApiError> {
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
fn list_field<T: Clone + Eq + std::hash::Hash>(
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

/// A validated Mint request.
#[derive(Debug)]
struct MintSpec {
    owner_id: OwnerId,
    prefix: KeyPrefix,
    name: String,
    description: String,
    scopes: Vec<Scope>,
    resources: Vec<Resource>,
    ip_allow: Vec<Network>,
    metadata: Metadata,
    expires_at: Option<DateTime<Utc>>,
}

impl MintSpec {
    fn parse(
        req: pb::MintRequest,
        default_prefix: &KeyPrefix,
        now: DateTime<Utc>,
    ) -> Result<Self, ApiError> {
        let owner_id =
            OwnerId::parse(&req.owner_id).map_err(|e| ApiError::invalid("owner_id", e))?;
        let prefix = match req.prefix.as_str() {
            "" => default_prefix.clone(),
            p => KeyPrefix::parse(p).map_err(|e| ApiError::invalid("prefix", e))?,
        };
        let name = text_field("name", &req.name, NAME_MAX)?;
        let description = text_field("description", &req.description, DESCRIPTION_MAX)?;
        let scopes = list_field("scopes", &req.scopes, Scope::parse)?;
        let resources = list_field("resources", &req.resources, Resource::parse)?;
        let ip_allow = list_field("ip_allow", &req.ip_allow, Network::parse)?;
        let metadata = Metadata::parse(req.metadata).map_err(|(entry, reason)| match entry {
            Some(k) => ApiError::invalid(format!("metadata[{k:?}]"), reason),
            None => ApiError::invalid("metadata", reason),
        })?;
        let expires_at = match req.expiry {
            None => None,
            Some(pb::mint_request::Expiry::ExpiresAt(ts)) => {
                let at = datetime(&ts).ok_or_else(|| {
                    ApiError::invalid("expires_at", Invalid::new("is out of range"))
                })?;
                if at <= now {
                    return Err(ApiError::invalid(
                        "expires_at",
                        Invalid::new("must be in the future"),
                    ));
                }
                Some(at)
            }
            Some(pb::mint_request::Expiry::Ttl(ttl)) => {
                let invalid = |why| ApiError::invalid("ttl", Invalid::new(why));
                if ttl.seconds < 0 || ttl.nanos < 0 || (ttl.seconds == 0 && ttl.nanos == 0) {
                    return Err(invalid("must be positive"));
                }
                let ttl = chrono::Duration::new(ttl.seconds, ttl.nanos as u32)
                    .ok_or_else(|| invalid("is too long"))?;
                Some(
                    now.checked_add_signed(ttl)
                        .ok_or_else(|| invalid("is too long"))?,
                )
            }
        };
        Ok(Self {
            owner_id,
            prefix,
            name,
            description,
            scopes,
            resources,
            ip_allow,
            metadata,
            expires_at,
        })
    }

    /// Draws the secret and the row that stores only its hash.
    fn into_new_key(self) -> (ApiKey, NewKey) {
        let (secret, generated) = NewKey::generate(&self.prefix, self.owner_id);
        let new_key = NewKey {
            name: self.name,
            description: self.description,
            scopes: self.scopes,
            resources: self.resources,
            ip_allow: self.ip_allow,
            metadata: self.metadata,
            expires_at: self.expires_at,
            ..generated
        };
        (secret, new_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> KeyPrefix {
        KeyPrefix::parse("kw_live").unwrap()
    }

    fn mint(req: pb::MintRequest) -> Result<MintSpec, String> {
        MintSpec::parse(req, &prefix(), Utc::now()).map_err(|e| e.to_string())
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
        assert_eq!(decode_page_token(&encode_page_token(id)).unwrap(), id);
        for bad in ["x", "not-a-token", &id.to_string(), &"g".repeat(32)] {
            let err = decode_page_token(bad).unwrap_err().to_string();
            assert!(err.starts_with("page_token: "), "{err}");
        }
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
        let (secret, row) = mint(base()).unwrap().into_new_key();
        assert_eq!(secret.prefix(), "kw_live");
        assert_eq!(row.hash, secret.hash());
        assert_eq!(row.start, secret.start());
    }
}
