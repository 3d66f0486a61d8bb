//! `GET /2/projects/{project_id}`: the project itself, as IronWorker answered it (its Ruby
//! client's `projects.get` reads `id` and `name`), with its quotas and what it holds of each;
//! `PUT /2/projects/{project_id}/quotas`: an admin sets the project's own limits.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use stevedore_api_types::v2;
use stevedore_model::Quota;
use stevedore_store::TokenRole;

use crate::AppState;
use crate::auth::ProjectAccess;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::wire;

/// Show the project the token belongs to, with its quotas.
#[utoipa::path(get, path = "/2/projects/{project_id}", tag = "projects",
    params(("project_id" = String, Path)),
    responses((status = 200, body = v2::ProjectInfo), (status = 403, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn show(
    State(state): State<AppState>,
    access: ProjectAccess,
) -> ApiResult<Json<v2::ProjectInfo>> {
    project_info(&state, &access).await.map(Json)
}

/// Set the project's own quota limits (admin tokens only). Each named quota gets the limit
/// given, or with `null` the operator's default again; quotas not named keep theirs.
#[utoipa::path(put, path = "/2/projects/{project_id}/quotas", tag = "projects",
    params(("project_id" = String, Path)),
    request_body = v2::QuotasUpdate,
    responses((status = 200, body = v2::ProjectInfo), (status = 400, body = v2::Message), (status = 403, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn set_quotas(
    State(state): State<AppState>,
    access: ProjectAccess,
    ApiJson(update): ApiJson<v2::QuotasUpdate>,
) -> ApiResult<Json<v2::ProjectInfo>> {
    if access.token.role != TokenRole::Admin {
        return Err(ApiError::Forbidden(
            "only an admin token may set a project's quotas (`stevedore token create --role admin`)"
                .into(),
        ));
    }
    // Every name is checked before anything is written.
    let changes = update
        .0
        .into_iter()
        .map(|(name, limit)| Ok((name.parse::<Quota>()?, limit)))
        .collect::<ApiResult<Vec<_>>>()?;
    let now = state.clock.now();
    for (quota, limit) in changes {
        state
            .store
            .set_project_quota(&access.project_id, quota, limit, now)
            .await?;
        tracing::info!(project_id = %access.project_id, %quota, ?limit, "project quota set");
    }
    project_info(&state, &access).await.map(Json)
}

async fn project_info(state: &AppState, access: &ProjectAccess) -> ApiResult<v2::ProjectInfo> {
    let project = state.store.get_project(&access.project_id).await?;
    let quotas = state.store.project_quotas(&access.project_id).await?;
    let quotas: BTreeMap<String, v2::QuotaInfo> = quotas
        .into_iter()
        .map(|quota| {
            let used = quota
                .used
                .unwrap_or_else(|| state.streams.count(&access.token.id));
            (
                quota.quota.as_str().to_owned(),
                v2::QuotaInfo {
                    limit: quota.limit,
                    used,
                    own_limit: quota.own_limit,
                },
            )
        })
        .collect();
    Ok(v2::ProjectInfo {
        id: project.id,
        name: project.name,
        created_at: wire::format_time(project.created_at),
        quotas,
    })
}
