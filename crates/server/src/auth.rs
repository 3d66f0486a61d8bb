//! Authentication: `Authorization: OAuth <token>` (IronWorker's form), `Bearer <token>`, or
//! `?oauth=<token>` for webhooks. Tokens are stored as their SHA-256 only.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use stevedore_store::{TokenRecord, TokenRole};

use crate::AppState;
use crate::error::ApiError;

/// A request allowed to act within the project named in its path.
#[derive(Debug, Clone)]
pub struct ProjectAccess {
    pub project_id: String,
    pub token: TokenRecord,
}

/// A request from a runner: a runner token, or an admin's. Project tokens are refused (403).
#[derive(Debug, Clone)]
pub struct RunnerAccess {
    pub token: TokenRecord,
}

/// A request to an account-wide resource (`/2/clusters`): a project token acts for its
/// project, an admin token for every project (`project_id` is `None`). Runner tokens are
/// refused (403).
#[derive(Debug, Clone)]
pub struct TenantAccess {
    pub project_id: Option<String>,
    pub token: TokenRecord,
}

/// A new token's secret: 40 hex digits from the OS's random source.
pub fn new_token_secret() -> String {
    let high = uuid::Uuid::new_v4().simple().to_string();
    let low = uuid::Uuid::new_v4().simple().to_string();
    format!("{}{}", &high[..20], &low[..20])
}

/// The form in which a token is stored and looked up.
pub fn token_digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn token_from_parts(parts: &Parts) -> Option<String> {
    if let Some(value) = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    {
        let (scheme, token) = value.trim().split_once(' ')?;
        if scheme.eq_ignore_ascii_case("oauth") || scheme.eq_ignore_ascii_case("bearer") {
            return Some(token.trim().to_owned());
        }
        return None;
    }
    let Query(pairs) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri).ok()?;
    pairs.get("oauth").cloned()
}

/// The request's path and query as logs may show it: the value of every `oauth` parameter
/// (a token, for clients that cannot set a header) is replaced with `redacted`, however its
/// name was percent-encoded.
pub fn loggable_uri(uri: &axum::http::Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_owned();
    };
    let query = query
        .split('&')
        .map(|pair| {
            let token = form_urlencoded::parse(pair.as_bytes())
                .next()
                .is_some_and(|(name, _)| name == "oauth");
            if token { "oauth=redacted" } else { pair }
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{path}?{query}")
}

/// Resolves the request's token, or refuses with 401.
pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<TokenRecord, ApiError> {
    let secret = token_from_parts(parts).ok_or_else(|| {
        ApiError::Unauthorized(
            "missing token: send `Authorization: OAuth <token>` (or `Bearer <token>`, or `?oauth=<token>`)".into(),
        )
    })?;
    let digest = token_digest(&secret);
    if let Some(token) = state.recent.tokens.get(&digest) {
        return Ok(token);
    }
    let read_at = std::time::Instant::now();
    let token = state
        .store
        .find_token(&digest)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid token".into()))?;
    state.recent.tokens.insert(digest, token.clone(), read_at);
    Ok(token)
}

impl FromRequestParts<AppState> for ProjectAccess {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = authenticate(parts, state).await?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|error| ApiError::BadRequest(format!("bad path: {error}")))?;
        let project_id = params
            .get("project_id")
            .cloned()
            .ok_or_else(|| ApiError::Internal("route without a project id".into()))?;
        match token.role {
            TokenRole::Project if token.project_id.as_deref() == Some(project_id.as_str()) => {}
            TokenRole::Project => {
                return Err(ApiError::Forbidden(format!(
                    "this token does not belong to project {project_id}"
                )));
            }
            TokenRole::Runner => {
                return Err(ApiError::Forbidden(
                    "a runner token may only use the runner protocol".into(),
                ));
            }
            TokenRole::Admin => {
                state.store.get_project(&project_id).await?;
            }
        }
        Ok(ProjectAccess { project_id, token })
    }
}

impl FromRequestParts<AppState> for RunnerAccess {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = authenticate(parts, state).await?;
        match token.role {
            TokenRole::Runner | TokenRole::Admin => Ok(RunnerAccess { token }),
            TokenRole::Project => Err(ApiError::Forbidden(
                "the runner protocol needs a runner token (`stevedore token create --role runner`)"
                    .into(),
            )),
        }
    }
}

impl RunnerAccess {
    /// The project a project's runner token is bound to; `None` for the operator's runner
    /// tokens and admin tokens.
    pub fn project_scope(&self) -> Option<&str> {
        self.token
            .project_id
            .as_deref()
            .filter(|_| self.token.role == TokenRole::Runner)
    }

    /// Whose clusters this runner may lease from, if it may lease from every one of
    /// `clusters`: `None`, the shared clusters; `Some(project)`, that project's own. Refused
    /// (403, naming the clusters) when a cluster is outside the token's: a runner token made
    /// with `--cluster` serves only those, and a project's runner token only clusters that
    /// project owns now. An admin token serves every shared cluster.
    pub async fn lease_owner(
        &self,
        state: &AppState,
        clusters: &[String],
    ) -> Result<Option<String>, ApiError> {
        let token = &self.token;
        if token.role == TokenRole::Runner
            && let Some(allowed) = &token.clusters
        {
            let outside: Vec<&str> = clusters
                .iter()
                .filter(|cluster| !allowed.contains(cluster))
                .map(String::as_str)
                .collect();
            if !outside.is_empty() {
                return Err(ApiError::Forbidden(format!(
                    "this runner token serves only the clusters {allowed:?}, not {outside:?}"
                )));
            }
        }
        let Some(project_id) = token
            .project_id
            .clone()
            .filter(|_| token.role == TokenRole::Runner)
        else {
            return Ok(None);
        };
        for name in clusters {
            let own = state
                .store
                .find_cluster_by_name(Some(&project_id), name)
                .await?
                .is_some_and(|cluster| cluster.project_id.as_deref() == Some(project_id.as_str()));
            if !own {
                return Err(ApiError::Forbidden(format!(
                    "this runner token serves project {project_id}'s own clusters, and {name:?} \
                     is not one of them"
                )));
            }
        }
        Ok(Some(project_id))
    }
}

impl FromRequestParts<AppState> for TenantAccess {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = authenticate(parts, state).await?;
        let project_id = match token.role {
            TokenRole::Project => Some(token.project_id.clone().ok_or_else(|| {
                ApiError::Internal(format!("project token {} has no project", token.id))
            })?),
            TokenRole::Admin => None,
            TokenRole::Runner => {
                return Err(ApiError::Forbidden(
                    "a runner token may only use the runner protocol".into(),
                ));
            }
        };
        Ok(TenantAccess { project_id, token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_in_the_query_never_reaches_the_logs() {
        let uri = |text: &str| text.parse::<axum::http::Uri>().unwrap();
        assert_eq!(
            loggable_uri(&uri("/2/projects/p/tasks")),
            "/2/projects/p/tasks"
        );
        assert_eq!(
            loggable_uri(&uri("/2/projects/p/tasks?oauth=s3cret&per_page=5")),
            "/2/projects/p/tasks?oauth=redacted&per_page=5"
        );
        // Spelled with percent-escapes, the name is still `oauth` to the server.
        assert_eq!(
            loggable_uri(&uri("/x?%6Fauth=s3cret&o%61uth=s3cret&oauth&b=1")),
            "/x?oauth=redacted&oauth=redacted&oauth=redacted&b=1"
        );
    }

    #[test]
    fn secrets_are_long_and_distinct() {
        let first = new_token_secret();
        assert_eq!(first.len(), 40);
        assert_ne!(first, new_token_secret());
        assert_eq!(token_digest("x").len(), 64);
    }
}
