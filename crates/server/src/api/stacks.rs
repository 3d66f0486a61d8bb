//! `GET /2/stacks`: the runtimes zip packages can run on.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use stevedore_api_types::v2;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiQuery;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct StacksQuery {
    /// `true`: each stack as an object with its aliases, runtimes and image.
    pub details: Option<String>,
}

/// The names of the configured stacks: a JSON array of strings, as IronWorker documents it;
/// with `details=true`, objects with each stack's aliases, runtimes and image.
#[utoipa::path(get, path = "/2/stacks", tag = "stacks", params(StacksQuery),
    responses((status = 200, body = Vec<String>), (status = 400, body = v2::Message)))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<StacksQuery>,
) -> ApiResult<Response> {
    let stacks = state.config.stacks.stacks();
    let details = match query.details.as_deref() {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "details: must be true or false, not {other:?}"
            )));
        }
    };
    if details {
        let stacks: Vec<v2::StackInfo> = stacks
            .iter()
            .map(|stack| v2::StackInfo {
                name: stack.name.clone(),
                aliases: stack.aliases.clone(),
                runtimes: stack
                    .runtimes
                    .iter()
                    .map(|runtime| runtime.name().to_owned())
                    .collect(),
                image: stack.image.clone(),
            })
            .collect();
        return Ok(Json(stacks).into_response());
    }
    let names: Vec<&str> = stacks.iter().map(|stack| stack.name.as_str()).collect();
    Ok(Json(names).into_response())
}
