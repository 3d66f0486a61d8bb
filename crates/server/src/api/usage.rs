//! `GET usage`: the project's usage report (see `crate::usage`).

use axum::Json;
use axum::extract::State;
use stevedore_api_types::v2;

use crate::AppState;
use crate::auth::ProjectAccess;
use crate::error::ApiResult;
use crate::extract::ApiQuery;
use crate::usage::{UsageParams, report};

/// Finished tasks per bucket, by code and by stack, with queue-wait percentiles and the
/// status mix, over a window (default: the last 24 hours).
#[utoipa::path(get, path = "/2/projects/{project_id}/usage", tag = "usage",
    params(("project_id" = String, Path), UsageParams),
    responses((status = 200, body = v2::UsageReport), (status = 400, body = v2::Message)))]
pub async fn usage(
    State(state): State<AppState>,
    access: ProjectAccess,
    ApiQuery(params): ApiQuery<UsageParams>,
) -> ApiResult<Json<v2::UsageReport>> {
    Ok(Json(report(&state, &access.project_id, &params).await?))
}
