//! Signing in to the dashboard. The sign-in form takes a project token; the token itself is
//! then kept in an `HttpOnly`, `SameSite=Strict` cookie scoped to `/ui` and looked up on
//! every request, exactly as the API looks up its `Authorization` header. So every server
//! that shares the database accepts the session, deleting the token ends it, and the
//! dashboard holds no secret of its own.
//!
//! Forms change state only by POST, and a POST must come from the dashboard's own origin:
//! `SameSite=Strict` keeps the cookie off other sites' requests, and `same_origin` refuses
//! what a browser marks as cross-site anyway.

use askama::Template;
use axum::extract::{FromRequestParts, State};
use axum::http::header::{COOKIE, HOST, ORIGIN, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use stevedore_store::{Project, TokenRole};

use super::{PageError, PageForm, render};
use crate::AppState;
use crate::auth::token_digest;
use crate::error::ApiError;

/// The cookie that carries a signed-in person's project token.
pub const SESSION_COOKIE: &str = "stevedore_session";

/// How long a browser keeps the session: 30 days, or until the token is deleted.
const SESSION_MAX_AGE_SECS: u32 = 30 * 24 * 3600;

/// A signed-in request: the project whose token the session carries.
#[derive(Debug, Clone)]
pub struct Session {
    pub project: Project,
    /// The id of the token the session carries (live streams are counted per token).
    pub token_id: String,
}

/// Why a request has no session.
#[derive(Debug)]
pub enum SessionRejection {
    /// Not signed in, or the token is no longer valid: go to the sign-in page.
    SignIn {
        htmx: bool,
    },
    /// A state-changing request from another origin.
    CrossSite,
    Failed(PageError),
}

impl FromRequestParts<AppState> for Session {
    type Rejection = SessionRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET
            && parts.method != Method::HEAD
            && !same_origin(&parts.headers)
        {
            return Err(SessionRejection::CrossSite);
        }
        let htmx = parts.headers.contains_key("hx-request");
        let Some(secret) = session_token(&parts.headers) else {
            return Err(SessionRejection::SignIn { htmx });
        };
        match project_of_token(state, &secret).await {
            Ok(Some((project, token_id))) => Ok(Session { project, token_id }),
            Ok(None) => Err(SessionRejection::SignIn { htmx }),
            Err(error) => Err(SessionRejection::Failed(error)),
        }
    }
}

impl IntoResponse for SessionRejection {
    fn into_response(self) -> Response {
        match self {
            // htmx follows `HX-Redirect` with a full page load; a plain redirect would swap
            // the sign-in page into a fragment.
            SessionRejection::SignIn { htmx: true } => (
                StatusCode::UNAUTHORIZED,
                [("hx-redirect", HeaderValue::from_static("/ui/login"))],
            )
                .into_response(),
            SessionRejection::SignIn { htmx: false } => Redirect::to("/ui/login").into_response(),
            SessionRejection::CrossSite => PageError(ApiError::Forbidden(
                "this form was sent from another site; open the dashboard and try again".into(),
            ))
            .into_response(),
            SessionRejection::Failed(error) => error.into_response(),
        }
    }
}

// === sign in and out ===

#[derive(Template)]
#[template(path = "dashboard/login.html")]
struct LoginPage {
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    token: String,
}

pub async fn login_page() -> Response {
    render(&LoginPage { error: None })
}

/// Checks the token and, when it is a project's, keeps it in the session cookie.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    PageForm(form): PageForm<LoginForm>,
) -> Result<Response, PageError> {
    if !same_origin(&headers) {
        return Err(PageError(ApiError::Forbidden(
            "the sign-in form was sent from another site".into(),
        )));
    }
    let secret = form.token.trim();
    let refuse = |message: &str| {
        (
            StatusCode::UNAUTHORIZED,
            render(&LoginPage {
                error: Some(message.to_owned()),
            }),
        )
            .into_response()
    };
    if secret.is_empty() {
        return Ok(refuse("enter a project token"));
    }
    let Some(token) = state.store.find_token(&token_digest(secret)).await? else {
        return Ok(refuse(
            "that token is not known here; `stevedore token create` makes one",
        ));
    };
    if token.role != TokenRole::Project {
        return Ok(refuse(
            "sign in with a project token: the dashboard shows one project, and admin and runner tokens belong to none",
        ));
    }
    // Only hex digits are ever issued, and a cookie value must not hold `;` or spaces.
    if !secret.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
        return Ok(refuse("that token is not known here"));
    }
    let cookie = format!(
        "{SESSION_COOKIE}={secret}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={SESSION_MAX_AGE_SECS}"
    );
    Ok(session_response(&cookie, "/ui/"))
}

/// Forgets the session in this browser. The token itself stays valid.
pub async fn logout(headers: HeaderMap) -> Result<Response, PageError> {
    if !same_origin(&headers) {
        return Err(PageError(ApiError::Forbidden(
            "the sign-out form was sent from another site".into(),
        )));
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok(session_response(&cookie, "/ui/login"))
}

fn session_response(cookie: &str, to: &str) -> Response {
    let mut response = Redirect::to(to).into_response();
    match HeaderValue::from_str(cookie) {
        Ok(value) => {
            response.headers_mut().insert(SET_COOKIE, value);
            response
        }
        Err(_) => PageError(ApiError::BadRequest("that token is not valid".into())).into_response(),
    }
}

// === checks ===

/// The project a token secret signs in to, if it is a project token that still exists.
async fn project_of_token(
    state: &AppState,
    secret: &str,
) -> Result<Option<(Project, String)>, PageError> {
    let Some(token) = state.store.find_token(&token_digest(secret)).await? else {
        return Ok(None);
    };
    match (token.role, token.project_id) {
        (TokenRole::Project, Some(project_id)) => Ok(Some((
            state.store.get_project(&project_id).await?,
            token.id,
        ))),
        _ => Ok(None),
    }
}

/// The session cookie's value, if the request carries one.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// Whether a state-changing request came from the dashboard's own pages. Browsers send
/// `Sec-Fetch-Site` and `Origin` on every POST; a client without either (a script, curl) is
/// not a browser another site could have steered, and passes.
fn same_origin(headers: &HeaderMap) -> bool {
    let header = |name| {
        headers
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    if let Some(site) = header("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match (header(ORIGIN.as_str()), header(HOST.as_str())) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority == host),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        assert_eq!(
            session_token(&headers(&[(
                "cookie",
                "a=1; stevedore_session=abc123 ; b=2"
            )])),
            Some("abc123".to_owned())
        );
        assert_eq!(
            session_token(&headers(&[
                ("cookie", "a=1"),
                ("cookie", "stevedore_session=x")
            ])),
            Some("x".to_owned())
        );
        assert_eq!(
            session_token(&headers(&[("cookie", "stevedore_session=")])),
            None
        );
        assert_eq!(session_token(&headers(&[])), None);
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(same_origin(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(same_origin(&headers(&[])));
    }
}
