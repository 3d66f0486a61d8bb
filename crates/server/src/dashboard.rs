//! The web dashboard under `/ui`: server-rendered pages (askama templates compiled into the
//! binary) made live with htmx and Server-Sent Events, and charts drawn by Chart.js. Every
//! script, style and font it uses is embedded with rust-embed and served from `/ui/assets`,
//! so a browser that reaches the server needs nothing else: no CDN, no internet.
//!
//! A person signs in with a project token; the dashboard then acts for that project only,
//! through the same functions the API calls (`api::*`, `usage`), so a page can never show or
//! do more than the project's token could over the API. See `session` for how the sign-in is
//! kept and checked.

mod pages;
mod session;

use askama::Template;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use rust_embed::RustEmbed;

use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::ApiQuery;

pub use session::{SESSION_COOKIE, Session};

/// The dashboard's routes, to merge into the application's router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(pages::overview))
        .route("/ui/login", get(session::login_page).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/usage.json", get(pages::usage_json))
        .route("/ui/codes", get(pages::codes))
        .route("/ui/codes/{code_id}", get(pages::code))
        .route("/ui/codes/{code_id}/pause", post(pages::pause_code))
        .route("/ui/codes/{code_id}/resume", post(pages::resume_code))
        .route("/ui/tasks", get(pages::tasks).post(pages::queue_task))
        .route("/ui/tasks/rows", get(pages::task_rows))
        .route("/ui/tasks/{task_id}", get(pages::task))
        .route("/ui/tasks/{task_id}/events", get(pages::task_events))
        .route("/ui/tasks/{task_id}/cancel", post(pages::cancel_task))
        .route("/ui/tasks/{task_id}/retry", post(pages::retry_task))
        .route("/ui/schedules", get(pages::schedules))
        .route(
            "/ui/schedules/{schedule_id}/cancel",
            post(pages::cancel_schedule),
        )
        .route("/ui/runners", get(pages::runners))
        .route("/ui/assets/{*path}", get(asset))
}

// === assets ===

/// The dashboard's static files: its own script and style, and the vendored htmx and
/// Chart.js (see `assets/vendor/README.md`).
#[derive(RustEmbed)]
#[folder = "assets/"]
#[exclude = "*.md"]
#[exclude = "*LICENSE*"]
struct Assets;

async fn asset(Path(path): Path<String>) -> Response {
    let Some(file) = Assets::get(&path) else {
        return PageError::from(ApiError::NotFound(format!("no asset {path}"))).into_response();
    };
    let mime = file.metadata.mimetype();
    (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_str(mime)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            ),
            // The files change only with the binary; an hour keeps a restart's new ones close.
            (
                CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        file.data,
    )
        .into_response()
}

// === pages and their errors ===

/// A failed dashboard request, shown as a page rather than JSON. Carries the API's error so
/// the status and the message are the ones the API would give.
#[derive(Debug)]
pub struct PageError(pub ApiError);

impl From<ApiError> for PageError {
    fn from(error: ApiError) -> Self {
        PageError(error)
    }
}

impl From<stevedore_store::StoreError> for PageError {
    fn from(error: stevedore_store::StoreError) -> Self {
        PageError(error.into())
    }
}

#[derive(Template)]
#[template(path = "dashboard/error.html")]
struct ErrorPage {
    status: u16,
    reason: String,
    message: String,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        // The API's response logs internal errors and hides their detail; keep that, and
        // take its public message for the page.
        let message = match &self.0 {
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "dashboard request failed");
                "internal server error; the server log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let page = ErrorPage {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("Error").to_owned(),
            message,
        };
        (status, render(&page)).into_response()
    }
}

pub type PageResult<T> = Result<T, PageError>;

/// Query parameters whose rejection is an error page, not axum's plain text.
#[derive(Debug, Clone)]
pub struct PageQuery<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for PageQuery<T> {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ApiQuery(value) = ApiQuery::<T>::from_request_parts(parts, state).await?;
        Ok(PageQuery(value))
    }
}

/// A posted form (`application/x-www-form-urlencoded`) whose rejection is an error page.
#[derive(Debug, Clone)]
pub struct PageForm<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for PageForm<T> {
    type Rejection = PageError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        Form::<T>::from_request(request, state)
            .await
            .map(|Form(value)| PageForm(value))
            .map_err(|rejection| {
                let message = format!("the form could not be read: {}", rejection.body_text());
                PageError(match rejection.status() {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
                    StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(message),
                    _ => ApiError::BadRequest(message),
                })
            })
    }
}

/// Renders a template, or a plain 500 when rendering itself fails (a bug: templates are
/// checked at compile time, so only a value's `Display` can fail).
fn render(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "a dashboard template failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed to render",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_script_is_embedded() {
        for path in [
            "dashboard.js",
            "dashboard.css",
            "vendor/htmx.min.js",
            "vendor/chart.umd.min.js",
        ] {
            assert!(Assets::get(path).is_some(), "{path} is not embedded");
        }
        assert!(Assets::get("vendor/README.md").is_none());
        assert_eq!(
            Assets::get("dashboard.js").map(|file| file.metadata.mimetype().to_owned()),
            Some("text/javascript".to_owned())
        );
    }
}
