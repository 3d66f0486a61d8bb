//! `GET /2/stacks`: the runtimes zip packages can run on.

use axum::Json;
use axum::extract::State;

use crate::AppState;

/// The names of the configured stacks: a JSON array of strings, as IronWorker documents it.
#[utoipa::path(get, path = "/2/stacks", tag = "stacks",
    responses((status = 200, body = Vec<String>)))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<String>> {
    Json(
        state
            .config
            .stacks
            .iter()
            .map(|stack| stack.name.clone())
            .collect(),
    )
}
