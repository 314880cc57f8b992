//! `keyward.v1.OwnerService`: accounts, their state, ceiling and quota.

use tonic::{Request, Response, Status};

use super::{
    AdminApi, Caller, owner_not_found,
    request::{
        decode_owner_token, encode_owner_token, list_field, mask_paths, metadata_field, owner_id,
        page_size, rate_limits_field, text_field,
    },
};
use crate::{
    api::{status::ApiError, timestamp},
    key::{Invalid, OwnerRecord, OwnerState, Resource, Scope},
    pb,
    store::{OwnerChanges, StoreError},
};

const DISPLAY_NAME_MAX: usize = 200;
const STATE_REASON_MAX: usize = 500;
const UPDATABLE: [&str; 8] = [
    "display_name",
    "state",
    "state_reason",
    "metadata",
    "allowed_scopes",
    "allowed_resources",
    "max_keys",
    "default_rate_limits",
];

pub(crate) fn owner_pb(owner: &OwnerRecord, key_count: Option<u64>) -> pb::Owner {
    pb::Owner {
        id: owner.id.to_string(),
        display_name: owner.display_name.clone(),
        state: match owner.state {
            OwnerState::Active => pb::owner::State::Active,
            OwnerState::Suspended => pb::owner::State::Suspended,
        }
        .into(),
        state_reason: owner.state_reason.clone(),
        metadata: owner
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        allowed_scopes: owner
            .ceiling
            .scopes
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect(),
        allowed_resources: owner
            .ceiling
            .resources
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect(),
        max_keys: owner.max_keys.unwrap_or(0),
        default_rate_limits: owner
            .default_rate_limits
            .iter()
            .flatten()
            .map(crate::api::rate_limit_pb)
            .collect(),
        created_at: Some(timestamp(owner.created_at)),
        updated_at: Some(timestamp(owner.updated_at)),
        key_count: key_count.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

/// Empty lists mean "no ceiling", as on the wire.
fn ceiling_field<T: Clone + Eq + std::hash::Hash>(
    field: &'static str,
    values: &[String],
    parse: impl Fn(&str) -> Result<T, Invalid>,
) -> Result<Option<Vec<T>>, ApiError> {
    let parsed = list_field(field, values, parse)?;
    Ok((!parsed.is_empty()).then_some(parsed))
}

#[tonic::async_trait]
impl pb::owner_service_server::OwnerService for AdminApi {
    async fn create(
        &self,
        request: Request<pb::OwnerServiceCreateRequest>,
    ) -> Result<Response<pb::Owner>, Status> {
        let (caller, req) = self.begin("OwnerService.Create", request).await?;
        let result = self.create_owner(&caller, req).await;
        self.finish("OwnerService.Create", &caller, result)
    }

    async fn get(
        &self,
        request: Request<pb::OwnerServiceGetRequest>,
    ) -> Result<Response<pb::Owner>, Status> {
        let (caller, req) = self.begin("OwnerService.Get", request).await?;
        let result = self.get_owner(&caller, req).await;
        self.finish("OwnerService.Get", &caller, result)
    }

    async fn update(
        &self,
        request: Request<pb::OwnerServiceUpdateRequest>,
    ) -> Result<Response<pb::Owner>, Status> {
        let (caller, req) = self.begin("OwnerService.Update", request).await?;
        let result = self.update_owner(&caller, req).await;
        self.finish("OwnerService.Update", &caller, result)
    }

    async fn list(
        &self,
        request: Request<pb::OwnerServiceListRequest>,
    ) -> Result<Response<pb::OwnerServiceListResponse>, Status> {
        let (caller, req) = self.begin("OwnerService.List", request).await?;
        let result = self.list_owners(&caller, req).await;
        self.finish("OwnerService.List", &caller, result)
    }
}

impl AdminApi {
    async fn create_owner(
        &self,
        caller: &Caller,
        req: pb::OwnerServiceCreateRequest,
    ) -> Result<pb::Owner, ApiError> {
        caller.require_admin("creating an owner")?;
        let id = owner_id("id", &req.id)?;
        let values = OwnerChanges {
            display_name: Some(text_field(
                "display_name",
                &req.display_name,
                DISPLAY_NAME_MAX,
            )?),
            metadata: Some(metadata_field(req.metadata)?),
            allowed_scopes: Some(ceiling_field(
                "allowed_scopes",
                &req.allowed_scopes,
                Scope::parse,
            )?),
            allowed_resources: Some(ceiling_field(
                "allowed_resources",
                &req.allowed_resources,
                Resource::parse,
            )?),
            max_keys: Some((req.max_keys > 0).then_some(req.max_keys)),
            default_rate_limits: Some(rate_limits_field(
                "default_rate_limits",
                &req.default_rate_limits,
            )?),
            ..OwnerChanges::default()
        };
        let owner = self
            .store
            .create_owner(&id, &values, &caller.actor())
            .await
            .map_err(|err| match err {
                StoreError::Conflict(_) => ApiError::AlreadyExists {
                    field: "id",
                    what: "an owner with this id exists",
                },
                other => ApiError::Store(other),
            })?;
        tracing::info!(owner_id = %owner.id, "owner created");
        Ok(owner_pb(&owner, Some(0)))
    }

    async fn get_owner(
        &self,
        caller: &Caller,
        req: pb::OwnerServiceGetRequest,
    ) -> Result<pb::Owner, ApiError> {
        let id = owner_id("id", &req.id)?;
        if caller.confined_to().is_some_and(|own| *own != id) {
            // Other owners do not exist for an owner key.
            return Err(owner_not_found(StoreError::NotFound));
        }
        let owner = self.store.get_owner(&id).await.map_err(owner_not_found)?;
        let keys = self.store.owner_key_count(&id).await?;
        Ok(owner_pb(&owner, Some(keys)))
    }

    async fn update_owner(
        &self,
        caller: &Caller,
        req: pb::OwnerServiceUpdateRequest,
    ) -> Result<pb::Owner, ApiError> {
        caller.require_admin("changing an owner")?;
        let id = owner_id("id", &req.id)?;
        let paths = mask_paths(req.update_mask.as_ref(), &UPDATABLE)?;
        let values = req.owner.unwrap_or_default();
        let mut changes = OwnerChanges::default();
        for path in paths {
            match path {
                "display_name" => {
                    changes.display_name = Some(text_field(
                        "owner.display_name",
                        &values.display_name,
                        DISPLAY_NAME_MAX,
                    )?)
                }
                "state" => {
                    changes.state = Some(match values.state() {
                        pb::owner::State::Active => OwnerState::Active,
                        pb::owner::State::Suspended => OwnerState::Suspended,
                        pb::owner::State::Unspecified => {
                            return Err(ApiError::invalid(
                                "owner.state",
                                Invalid::new("must be ACTIVE or SUSPENDED"),
                            ));
                        }
                    })
                }
                "state_reason" => {
                    changes.state_reason = Some(text_field(
                        "owner.state_reason",
                        &values.state_reason,
                        STATE_REASON_MAX,
                    )?)
                }
                "metadata" => changes.metadata = Some(metadata_field(values.metadata.clone())?),
                "allowed_scopes" => {
                    changes.allowed_scopes = Some(ceiling_field(
                        "owner.allowed_scopes",
                        &values.allowed_scopes,
                        Scope::parse,
                    )?)
                }
                "allowed_resources" => {
                    changes.allowed_resources = Some(ceiling_field(
                        "owner.allowed_resources",
                        &values.allowed_resources,
                        Resource::parse,
                    )?)
                }
                "max_keys" => {
                    changes.max_keys = Some((values.max_keys > 0).then_some(values.max_keys))
                }
                _ => unreachable!("mask_paths admits only UPDATABLE"),
            }
        }
        let owner = self
            .store
            .update_owner(&id, &changes, &caller.actor())
            .await
            .map_err(owner_not_found)?;
        // This replica need not wait for the notice.
        self.checker.invalidate_owner(&owner.id);
        tracing::info!(owner_id = %owner.id, state = ?owner.state, "owner updated");
        let keys = self.store.owner_key_count(&id).await?;
        Ok(owner_pb(&owner, Some(keys)))
    }

    async fn list_owners(
        &self,
        caller: &Caller,
        req: pb::OwnerServiceListRequest,
    ) -> Result<pb::OwnerServiceListResponse, ApiError> {
        caller.require_admin("listing owners")?;
        let limit = page_size(req.page_size)?;
        let after = decode_owner_token(&req.page_token)?;
        let page = self.store.list_owners(after.as_ref(), limit).await?;
        Ok(pb::OwnerServiceListResponse {
            owners: page.owners.iter().map(|o| owner_pb(o, None)).collect(),
            next_page_token: page
                .next
                .as_ref()
                .map(encode_owner_token)
                .unwrap_or_default(),
        })
    }
}
