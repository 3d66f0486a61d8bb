//! `GET /2/projects/{project_id}`: the project itself, as IronWorker answered it (its Ruby
//! client's `projects.get` reads `id` and `name`).

use axum::Json;
use axum::extract::State;
use stevedore_api_types::v2;

use crate::AppState;
use crate::auth::ProjectAccess;
use crate::error::ApiResult;
use crate::wire;

/// Show the project the token belongs to.
#[utoipa::path(get, path = "/2/projects/{project_id}", tag = "projects",
    params(("project_id" = String, Path)),
    responses((status = 200, body = v2::ProjectInfo), (status = 403, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn show(
    State(state): State<AppState>,
    access: ProjectAccess,
) -> ApiResult<Json<v2::ProjectInfo>> {
    let project = state.store.get_project(&access.project_id).await?;
    Ok(Json(v2::ProjectInfo {
        id: project.id,
        name: project.name,
        created_at: wire::format_time(project.created_at),
    }))
}
