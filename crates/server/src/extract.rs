//! Request extractors whose rejections speak the API's error format (`{"msg": ...}`) rather
//! than axum's plain-text defaults.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;

/// A JSON body. An empty body reads as `{}`, so endpoints whose fields are all optional
/// accept a bare POST, as IronWorker's clients send for cancel and retry.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(
        request: Request<Body>,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let limit = state.config.max_tasks_body_bytes();
        let bytes = read_body(request.into_body(), limit).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Reads a whole body, refusing with 413 past `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge(format!(
                "the request body is larger than the limit of {limit} bytes"
            ))
        } else {
            ApiError::BadRequest(format!("could not read the request body: {error}"))
        }
    })
}

/// Parses JSON with an error message that says where and what is wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(text)
        .map_err(|error| ApiError::BadRequest(format!("invalid JSON body: {error}")))
}

/// Query parameters, with rejections in the API's error format.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| {
                ApiError::BadRequest(format!(
                    "invalid query parameters: {}",
                    rejection.body_text()
                ))
            })
    }
}

/// An IronWorker-style flag parameter: `1`, `true`, `yes`, `on` or empty (a bare `?name`)
/// is yes; `0`, `false`, `no`, `off` is no; anything else is a 400 that names `name`.
pub fn parse_flag(name: &str, value: &str) -> Result<bool, ApiError> {
    match value.to_ascii_lowercase().as_str() {
        "" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ApiError::BadRequest(format!(
            "{name} must be true or false (or 1 or 0), got {value:?}"
        ))),
    }
}
