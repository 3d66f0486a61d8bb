//! The IronWorker v2 API: `/2/projects/{project_id}/...`.

pub mod clusters;
pub mod codes;
pub mod credentials;
pub mod logs;
pub mod projects;
pub mod schedules;
pub mod stacks;
pub mod tasks;
pub mod usage;

use serde::Deserialize;
use stevedore_model::limits::{DEFAULT_PER_PAGE, MAX_PER_PAGE};
use stevedore_store::Page;

use std::collections::HashMap;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::wire::CodeDefaults;

/// `?page=N&per_page=M`: IronWorker's pages count from 0. Other parameters are refused with
/// 400: these lists have no filters, and one silently ignored would widen the list.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Paging {
    /// The page, counting from 0.
    pub page: Option<i64>,
    /// Items per page, 1 to 100 (default 30).
    pub per_page: Option<i64>,
    /// The token, for clients that cannot set headers (read by the authentication).
    #[param(ignore)]
    pub oauth: Option<String>,
}

impl Paging {
    pub fn page(&self) -> Result<Page, ApiError> {
        let page = self.page.unwrap_or(0);
        if page < 0 {
            return Err(ApiError::BadRequest(format!(
                "page must be 0 or more, got {page}"
            )));
        }
        let per_page = self.per_page.unwrap_or(i64::from(DEFAULT_PER_PAGE));
        if !(1..=i64::from(MAX_PER_PAGE)).contains(&per_page) {
            return Err(ApiError::BadRequest(format!(
                "per_page must be between 1 and {MAX_PER_PAGE}, got {per_page}"
            )));
        }
        Ok(Page {
            page: u32::try_from(page + 1)
                .map_err(|_| ApiError::BadRequest("page is too large".into()))?,
            per_page: u32::try_from(per_page).unwrap_or(MAX_PER_PAGE),
        })
    }
}

/// `{"msg": text}`, the acknowledgement IronWorker sends for most actions.
pub fn message(text: impl Into<String>) -> axum::Json<stevedore_api_types::v2::Message> {
    axum::Json(stevedore_api_types::v2::Message { msg: text.into() })
}

/// The default priority of the code named `name` and its default timeout, looked up once per
/// request.
pub async fn code_defaults(
    state: &AppState,
    project_id: &str,
    name: &str,
    cache: &mut HashMap<String, CodeDefaults>,
) -> ApiResult<CodeDefaults> {
    if let Some(defaults) = cache.get(name) {
        return Ok(*defaults);
    }
    let key = (project_id.to_owned(), name.to_owned());
    if let Some(defaults) = state.recent.code_defaults.get(&key) {
        cache.insert(name.to_owned(), defaults);
        return Ok(defaults);
    }
    let read_at = std::time::Instant::now();
    let code = state.store.get_code_by_name(project_id, name).await?;
    let defaults = CodeDefaults {
        priority: code.spec.default_priority,
        timeout_secs: code.spec.limits.timeout_secs,
    };
    state.recent.code_defaults.insert(key, defaults, read_at);
    cache.insert(name.to_owned(), defaults);
    Ok(defaults)
}

/// Forgets the task defaults read of the project's codes: a code of it changed.
pub fn forget_code_defaults(state: &AppState, project_id: &str) {
    state
        .recent
        .code_defaults
        .forget(|(project, _)| project == project_id);
}

/// The same error, its message placed under `prefix` (e.g. `tasks[3]`).
pub fn prefix_error(error: ApiError, prefix: &str) -> ApiError {
    match error {
        ApiError::BadRequest(message) => ApiError::BadRequest(format!("{prefix}.{message}")),
        ApiError::PayloadTooLarge(message) => {
            ApiError::PayloadTooLarge(format!("{prefix}.{message}"))
        }
        ApiError::NotFound(message) => ApiError::NotFound(format!("{prefix}: {message}")),
        other => other,
    }
}
