//! `GET /2/stacks`: the runtimes zip packages can run on.

use axum::Json;
use axum::extract::State;
use stevedore_api_types::v2;

use crate::AppState;

/// The configured stacks.
#[utoipa::path(get, path = "/2/stacks", tag = "stacks",
    responses((status = 200, body = Vec<v2::StackInfo>)))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<v2::StackInfo>> {
    Json(
        state
            .config
            .stacks
            .iter()
            .map(|stack| v2::StackInfo {
                name: stack.name.clone(),
                image: stack.image.clone(),
                launcher: stack.launcher.clone(),
            })
            .collect(),
    )
}
