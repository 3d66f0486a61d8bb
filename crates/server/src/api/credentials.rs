//! A project's registry credentials: `POST`, `GET` and `DELETE /2/projects/{id}/credentials`.
//!
//! `iron docker login` stores them with `{"auth": base64(JSON)}`; the same fields may come
//! directly. The password is sealed with the server's credential key before it reaches the
//! store and is never answered, listed or logged; a runner receives it only inside the lease
//! of one of the project's own tasks whose image lies in that registry.

use axum::Json;
use axum::extract::{Path, Request, State};
use base64::Engine as _;
use serde_json::{Map, Value};
use stevedore_api_types::v2;
use stevedore_model::registry::normalize_registry;
use stevedore_store::StoredCredential;

use super::message;
use crate::AppState;
use crate::auth::ProjectAccess;
use crate::error::{ApiError, ApiResult};
use crate::extract::read_body;
use crate::wire::format_time;

/// The largest credentials document accepted.
const MAX_BODY_BYTES: usize = 64 << 10;
/// The longest user name accepted.
const MAX_USERNAME_BYTES: usize = 255;
/// The longest password (or access token) accepted; registry tokens can be long.
const MAX_PASSWORD_BYTES: usize = 16 << 10;

/// Store the project's credentials for a registry (replacing earlier ones for it).
#[utoipa::path(post, path = "/2/projects/{project_id}/credentials", tag = "credentials",
    params(("project_id" = String, Path)),
    request_body = v2::CredentialsUpload,
    responses((status = 200, body = v2::CredentialStored), (status = 400, body = v2::Message)))]
pub async fn store(
    State(state): State<AppState>,
    access: ProjectAccess,
    request: Request,
) -> ApiResult<Json<v2::CredentialStored>> {
    let body = read_body(request.into_body(), MAX_BODY_BYTES).await?;
    let login = Login::parse(&body)?;
    let sealed = state
        .credentials
        .seal(&access.project_id, &login.registry, &login.password)
        .map_err(|error| ApiError::Internal(error.to_string()))?;
    let stored = state
        .store
        .put_registry_credential(
            &access.project_id,
            &login.registry,
            &login.username,
            &sealed,
            state.clock.now(),
        )
        .await?;
    tracing::info!(
        project_id = %access.project_id,
        registry = %stored.registry,
        username = %stored.username,
        "registry credentials stored"
    );
    Ok(Json(v2::CredentialStored {
        msg: format!("{} as {}", stored.registry, stored.username),
        registry: stored.registry,
        username: stored.username,
    }))
}

/// The project's registry credentials, without their passwords.
#[utoipa::path(get, path = "/2/projects/{project_id}/credentials", tag = "credentials",
    params(("project_id" = String, Path)),
    responses((status = 200, body = v2::CredentialList)))]
pub async fn list(
    State(state): State<AppState>,
    access: ProjectAccess,
) -> ApiResult<Json<v2::CredentialList>> {
    let stored = state
        .store
        .list_registry_credentials(&access.project_id)
        .await?;
    Ok(Json(v2::CredentialList {
        credentials: stored.iter().map(credential).collect(),
    }))
}

/// Forget the project's credentials for a registry (`docker.io` for Docker Hub).
#[utoipa::path(delete, path = "/2/projects/{project_id}/credentials/{registry}", tag = "credentials",
    params(("project_id" = String, Path), ("registry" = String, Path)),
    responses((status = 200, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn delete(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, registry)): Path<(String, String)>,
) -> ApiResult<Json<v2::Message>> {
    let registry = normalize_registry(&registry)?;
    state
        .store
        .delete_registry_credential(&access.project_id, &registry)
        .await?;
    tracing::info!(project_id = %access.project_id, %registry, "registry credentials deleted");
    Ok(message(format!("Deleted the credentials for {registry}")))
}

/// A login as sent, checked.
struct Login {
    registry: String,
    username: String,
    password: String,
}

impl Login {
    /// Reads the document field by field, so that no message ever repeats a value sent (a
    /// password in the wrong field or of the wrong type stays out of the answer).
    fn parse(body: &[u8]) -> ApiResult<Login> {
        let Ok(Value::Object(document)) = serde_json::from_slice::<Value>(body) else {
            return Err(ApiError::BadRequest(
                "the body must be a JSON object: {\"auth\": base64 of {\"username\", \
                 \"password\", \"serveraddress\"}} or those fields directly"
                    .into(),
            ));
        };
        let fields = match document.get("auth").cloned() {
            None | Some(Value::Null) => document,
            Some(Value::String(auth)) => {
                if ["username", "password", "serveraddress"]
                    .iter()
                    .any(|field| document.contains_key(*field))
                {
                    return Err(ApiError::BadRequest(
                        "send either auth or username, password and serveraddress, not both".into(),
                    ));
                }
                decode_auth(&auth)?
            }
            Some(_) => {
                return Err(ApiError::BadRequest("auth must be a base64 string".into()));
            }
        };
        let text = |field: &str| -> ApiResult<Option<String>> {
            match fields.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(value)) => Ok(Some(value.clone())),
                Some(_) => Err(ApiError::BadRequest(format!("{field} must be a string"))),
            }
        };
        let username = text("username")?.unwrap_or_default();
        let password = text("password")?.unwrap_or_default();
        let registry = normalize_registry(&text("serveraddress")?.unwrap_or_default())?;
        if username.trim().is_empty() {
            return Err(ApiError::BadRequest("username must not be empty".into()));
        }
        if username.len() > MAX_USERNAME_BYTES || username.chars().any(char::is_control) {
            return Err(ApiError::BadRequest(format!(
                "username must be at most {MAX_USERNAME_BYTES} bytes without control characters"
            )));
        }
        if password.is_empty() {
            return Err(ApiError::BadRequest("password must not be empty".into()));
        }
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(ApiError::BadRequest(format!(
                "password must be at most {MAX_PASSWORD_BYTES} bytes"
            )));
        }
        Ok(Login {
            registry,
            username,
            password,
        })
    }
}

/// `auth` as `iron docker login` makes it: base64 (standard, padding optional) of a JSON
/// object.
fn decode_auth(auth: &str) -> ApiResult<Map<String, Value>> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let decoded = engine
        .decode(auth.trim())
        .map_err(|_| ApiError::BadRequest("auth is not valid base64".into()))?;
    match serde_json::from_slice::<Value>(&decoded) {
        Ok(Value::Object(fields)) => Ok(fields),
        _ => Err(ApiError::BadRequest(
            "auth must be the base64 of a JSON object with username, password and serveraddress"
                .into(),
        )),
    }
}

fn credential(stored: &StoredCredential) -> v2::Credential {
    v2::Credential {
        registry: stored.registry.clone(),
        username: stored.username.clone(),
        created_at: format_time(stored.created_at),
        updated_at: format_time(stored.updated_at),
    }
}
