//! `keyward.v1.KeyService`: mint, list, inspect, change, rotate, revoke.

use std::net::IpAddr;

use chrono::Utc;
use tonic::{Request, Response, Status};

use super::{
    AdminApi, Caller,
    caller::Change,
    key_not_found,
    request::{
        DESCRIPTION_MAX, NAME_MAX, REASON_MAX, credits_field, decode_key_token, duration_field,
        encode_key_token, future_time, key_id, list_field, mask_paths, metadata_field, mint_spec,
        owner_id, page_size, rate_limits_field, text_field,
    },
};
use crate::{
    api::{api_key, api_key_with_usage, reason_pb, status::ApiError},
    key::{Grant, Invalid, KeyId, KeyRecord, MintSpec, Network, NewKey, Resource, Scope},
    pb, policy,
    store::{KeyChanges, ListQuery, Refusal, StoreError},
};

/// Days of usage shown by Get and List.
const USAGE_DAYS: u32 = 30;
const GRACE_DEFAULT: chrono::Duration = chrono::Duration::hours(24);
const GRACE_MAX: chrono::Duration = chrono::Duration::days(7);
const UPDATABLE: [&str; 10] = [
    "name",
    "description",
    "metadata",
    "scopes",
    "resources",
    "ip_allow",
    "expires_at",
    "rate_limits",
    "credits",
    "add_credits",
];

#[tonic::async_trait]
impl pb::key_service_server::KeyService for AdminApi {
    async fn mint(
        &self,
        request: Request<pb::MintRequest>,
    ) -> Result<Response<pb::MintResponse>, Status> {
        let (caller, req) = self.begin("Mint", request).await?;
        let result = self.mint_key(&caller, req).await;
        self.finish("Mint", &caller, result)
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let (caller, req) = self.begin("Revoke", request).await?;
        let result = self.revoke_key(&caller, req).await;
        self.finish("Revoke", &caller, result)
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let (caller, req) = self.begin("List", request).await?;
        let result = self.list_keys(&caller, req).await;
        self.finish("List", &caller, result)
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::ApiKey>, Status> {
        let (caller, req) = self.begin("Get", request).await?;
        let result = self.get_key(&caller, req).await;
        self.finish("Get", &caller, result)
    }

    async fn disable(
        &self,
        request: Request<pb::DisableRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let (caller, req) = self.begin("Disable", request).await?;
        let result = self.set_disabled(&caller, &req.id, true).await;
        self.finish("Disable", &caller, result)
    }

    async fn enable(
        &self,
        request: Request<pb::EnableRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let (caller, req) = self.begin("Enable", request).await?;
        let result = self.set_disabled(&caller, &req.id, false).await;
        self.finish("Enable", &caller, result)
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let (caller, req) = self.begin("Update", request).await?;
        let result = self.update_key(&caller, req).await;
        self.finish("Update", &caller, result)
    }

    async fn rotate(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let (caller, req) = self.begin("Rotate", request).await?;
        let result = self.rotate_key(&caller, req).await;
        self.finish("Rotate", &caller, result)
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let (caller, req) = self.begin("Explain", request).await?;
        let result = self.explain_key(&caller, req).await;
        self.finish("Explain", &caller, result)
    }
}

/// A ceiling violation found on the owner's row, as a refusal.
fn outside_ceiling((field, why): (String, Invalid)) -> StoreError {
    Refusal::PermissionDenied(format!("{field}: {why}")).into()
}

impl AdminApi {
    async fn mint_key(
        &self,
        caller: &Caller,
        req: pb::MintRequest,
    ) -> Result<pb::MintResponse, ApiError> {
        let now = Utc::now();
        let spec = mint_spec(req, &self.default_prefix, now)?;
        if let Some(own) = caller.confined_to()
            && spec.owner_id != *own
        {
            return Err(ApiError::PermissionDenied(
                "owner_id: this management key may only mint keys for its own owner".into(),
            ));
        }
        caller.may_grant(&spec.scopes, spec.expires_at)?;
        if spec.credits.is_some() || spec.rate_limits.is_some() {
            caller.require_admin("minting a key with its own rate limits or credits")?;
        }
        let (secret, new_key) = NewKey::generate(spec);
        let ticket = self.checker.ticket(&new_key.hash());
        let record = self
            .store
            .insert_key(&new_key, &caller.actor(), |owner| {
                let spec = new_key.spec();
                owner
                    .ceiling
                    .permits(&spec.scopes, &spec.resources)
                    .map_err(outside_ceiling)
            })
            .await?;
        tracing::info!(key_id = %record.id, owner_id = %record.owner_id, start = %record.start, "key minted");
        // The first check of a new key here should not miss.
        self.checker
            .remember_new_key(ticket, record.hash, Grant::from(&record));
        Ok(pb::MintResponse {
            key: Some(api_key(&record, now)),
            secret: secret.expose_secret().to_owned(),
        })
    }

    async fn revoke_key(
        &self,
        caller: &Caller,
        req: pb::RevokeRequest,
    ) -> Result<pb::RevokeResponse, ApiError> {
        let id = key_id("id", &req.id)?;
        let reason = text_field("reason", &req.reason, REASON_MAX)?;
        let guard = |k: &KeyRecord| caller.may_change(k, Change::Revoke);
        let record = self
            .store
            .revoke_key(
                id,
                Some(reason.as_str()).filter(|r| !r.is_empty()),
                caller.confined_to(),
                &guard,
                &caller.actor(),
            )
            .await
            .map_err(key_not_found)?;
        self.checker.revoked(&record);
        tracing::info!(key_id = %record.id, owner_id = %record.owner_id, "key revoked");
        Ok(pb::RevokeResponse {
            key: Some(api_key(&record, Utc::now())),
        })
    }

    async fn list_keys(
        &self,
        caller: &Caller,
        req: pb::ListRequest,
    ) -> Result<pb::ListResponse, ApiError> {
        let limit = page_size(req.page_size)?;
        let after = decode_key_token(&req.page_token)?;
        let owner = match req.owner_id.as_str() {
            "" => None,
            id => Some(owner_id("owner_id", id)?),
        };
        let owner = match (caller.confined_to(), owner) {
            (None, owner) => owner,
            (Some(own), None) => Some(own.clone()),
            (Some(own), Some(asked)) if asked == *own => Some(asked),
            (Some(_), Some(_)) => {
                return Err(ApiError::PermissionDenied(
                    "owner_id: this management key may only list its own owner's keys".into(),
                ));
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
            .await?;
        let ids: Vec<KeyId> = page.keys.iter().map(|k| k.id).collect();
        let usage = self.store.daily_usage(&ids, USAGE_DAYS).await?;
        let now = Utc::now();
        Ok(pb::ListResponse {
            keys: page
                .keys
                .iter()
                .map(|k| api_key_with_usage(k, now, usage.get(&k.id).map_or(&[], Vec::as_slice)))
                .collect(),
            next_page_token: page.next.map(encode_key_token).unwrap_or_default(),
        })
    }

    async fn get_key(&self, caller: &Caller, req: pb::GetRequest) -> Result<pb::ApiKey, ApiError> {
        let id = key_id("id", &req.id)?;
        let record = self
            .store
            .get_key(id, caller.confined_to())
            .await
            .map_err(key_not_found)?;
        let usage = self.store.daily_usage(&[record.id], USAGE_DAYS).await?;
        let days = usage.get(&record.id).map_or(&[][..], Vec::as_slice);
        Ok(api_key_with_usage(&record, Utc::now(), days))
    }

    async fn set_disabled(
        &self,
        caller: &Caller,
        id: &str,
        disabled: bool,
    ) -> Result<pb::ApiKey, ApiError> {
        let id = key_id("id", id)?;
        let change = if disabled {
            Change::Disable
        } else {
            Change::Enable
        };
        let guard = |k: &KeyRecord| caller.may_change(k, change);
        let record = self
            .store
            .set_key_disabled(
                id,
                disabled,
                caller.admin,
                caller.confined_to(),
                &guard,
                &caller.actor(),
            )
            .await
            .map_err(key_not_found)?;
        self.checker.invalidate(&record.hash);
        tracing::info!(key_id = %record.id, disabled, "key state changed");
        Ok(api_key(&record, Utc::now()))
    }

    async fn update_key(
        &self,
        caller: &Caller,
        req: pb::UpdateRequest,
    ) -> Result<pb::ApiKey, ApiError> {
        let id = key_id("id", &req.id)?;
        let paths = mask_paths(req.update_mask.as_ref(), &UPDATABLE)?;
        let values = req.key.unwrap_or_default();
        let now = Utc::now();
        let mut changes = KeyChanges::default();
        for path in paths {
            match path {
                "name" => changes.name = Some(text_field("key.name", &values.name, NAME_MAX)?),
                "description" => {
                    changes.description = Some(text_field(
                        "key.description",
                        &values.description,
                        DESCRIPTION_MAX,
                    )?)
                }
                "metadata" => changes.metadata = Some(metadata_field(values.metadata.clone())?),
                "scopes" => {
                    changes.scopes = Some(list_field("key.scopes", &values.scopes, Scope::parse)?)
                }
                "resources" => {
                    changes.resources = Some(list_field(
                        "key.resources",
                        &values.resources,
                        Resource::parse,
                    )?)
                }
                "ip_allow" => {
                    changes.ip_allow = Some(list_field(
                        "key.ip_allow",
                        &values.ip_allow,
                        Network::parse,
                    )?)
                }
                "expires_at" => {
                    changes.expires_at = Some(
                        values
                            .expires_at
                            .as_ref()
                            .map(|ts| future_time("key.expires_at", ts, now))
                            .transpose()?,
                    )
                }
                "rate_limits" => {
                    changes.rate_limits =
                        Some(rate_limits_field("key.rate_limits", &values.rate_limits)?)
                }
                "credits" => {
                    changes.credits = Some(
                        values
                            .credits
                            .as_ref()
                            .map(|c| credits_field("key.credits", c))
                            .transpose()?,
                    )
                }
                "add_credits" => changes.add_credits = Some(req.add_credits),
                _ => unreachable!("mask_paths admits only UPDATABLE"),
            }
        }
        let sets_credits = changes.credits.is_some() || changes.add_credits.is_some();
        if sets_credits || changes.rate_limits.is_some() {
            // An owner's own management key cannot buy itself more use.
            caller.require_admin("changing a key's rate limits or credits")?;
        }
        if let Some(scopes) = &changes.scopes {
            caller.may_grant_scopes(scopes)?;
        }
        if let Some(expires_at) = changes.expires_at {
            caller.may_grant_expiry(expires_at)?;
        }
        let record = self
            .store
            .update_key(
                id,
                &changes,
                caller.confined_to(),
                |current, owner| {
                    caller.may_change(current, Change::Update)?;
                    if changes.scopes.is_some() || changes.resources.is_some() {
                        let scopes = changes.scopes.as_deref().unwrap_or(&current.scopes);
                        let resources = changes.resources.as_deref().unwrap_or(&current.resources);
                        owner
                            .ceiling
                            .permits(scopes, resources)
                            .map_err(outside_ceiling)?;
                    }
                    Ok(())
                },
                &caller.actor(),
            )
            .await
            .map_err(key_not_found)?;
        self.checker.invalidate(&record.hash);
        tracing::info!(key_id = %record.id, owner_id = %record.owner_id, "key updated");
        Ok(api_key(&record, Utc::now()))
    }

    async fn rotate_key(
        &self,
        caller: &Caller,
        req: pb::RotateRequest,
    ) -> Result<pb::RotateResponse, ApiError> {
        let id = key_id("id", &req.id)?;
        let grace = match &req.grace {
            None => GRACE_DEFAULT,
            Some(d) => duration_field("grace", d)?,
        };
        if grace > GRACE_MAX {
            return Err(ApiError::invalid(
                "grace",
                Invalid::new("must be at most 7 days (168h)"),
            ));
        }
        let now = Utc::now();
        let old_expires_at = now + grace;
        // Built from the key as read; the store re-checks under its lock
        // that it was not replaced meanwhile.
        let current = self
            .store
            .get_key(id, caller.confined_to())
            .await
            .map_err(key_not_found)?;
        caller
            .may_change(&current, Change::Rotate)
            .map_err(StoreError::from)?;
        let spec = MintSpec::replacing(&current)
            .map_err(|e| ApiError::Store(StoreError::Corrupt(format!("key {id}: prefix {e}"))))?;
        caller.may_grant(&spec.scopes, spec.expires_at)?;
        let (secret, new_key) = NewKey::generate(spec);
        let ticket = self.checker.ticket(&new_key.hash());
        let guard = |k: &KeyRecord| caller.may_change(k, Change::Rotate);
        let rotation = self
            .store
            .rotate_key(
                &new_key,
                old_expires_at,
                caller.confined_to(),
                &guard,
                &caller.actor(),
            )
            .await
            .map_err(key_not_found)?;
        self.checker.invalidate(&rotation.old.hash);
        self.checker
            .remember_new_key(ticket, rotation.new.hash, Grant::from(&rotation.new));
        tracing::info!(
            key_id = %rotation.old.id,
            replaced_by = %rotation.new.id,
            grace_seconds = grace.num_seconds(),
            "key rotated"
        );
        Ok(pb::RotateResponse {
            key: Some(api_key(&rotation.new, now)),
            secret: secret.expose_secret().to_owned(),
            previous: Some(api_key(&rotation.old, now)),
        })
    }

    async fn explain_key(
        &self,
        caller: &Caller,
        req: pb::ExplainRequest,
    ) -> Result<pb::ExplainResponse, ApiError> {
        caller.require_admin("Explain")?;
        let id = key_id("id", &req.id)?;
        let client_ip = match req.client_ip.as_str() {
            "" => None,
            ip => Some(ip.parse::<IpAddr>().map_err(|_| {
                ApiError::invalid("client_ip", Invalid::new("is not an IP address"))
            })?),
        };
        let record = self.store.get_key(id, None).await.map_err(key_not_found)?;
        let scopes: Vec<&str> = req.required_scopes.iter().map(String::as_str).collect();
        let request = policy::Request {
            resource: Some(req.resource.as_str()).filter(|r| !r.is_empty()),
            required_scopes: &scopes,
            client_ip,
            cost: 1,
        };
        let (decision, verdicts) = policy::explain(&Grant::from(&record), &request, Utc::now());
        Ok(pb::ExplainResponse {
            allowed: decision.allowed(),
            reason: reason_pb(decision.reason).into(),
            http_status: decision.reason.http_status().into(),
            message: decision.message.to_string(),
            rules: verdicts
                .into_iter()
                .map(|v| pb::RuleVerdict {
                    rule: v.rule.to_owned(),
                    passed: v.passed,
                    detail: v.detail.into_owned(),
                })
                .collect(),
        })
    }
}
