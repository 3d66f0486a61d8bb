//! The one table that maps every failure to an HTTP status and a JSON `{"msg": ...}` body.
//! Internal detail is logged here and never sent to the client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use stevedore_api_types::v2::Message;
use stevedore_model::{QuotaExceeded, ValidationError};
use stevedore_store::StoreError;

/// A failed API request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid input; the message says what to change.
    #[error("{0}")]
    BadRequest(String),
    /// No token, or one that is not known.
    #[error("{0}")]
    Unauthorized(String),
    /// A known token that may not do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (e.g. cancelling a finished task).
    #[error("{0}")]
    Conflict(String),
    /// It was there and is gone for good: retention removed a finished task's log.
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A limit that frees itself as work goes on (a quota on queued tasks or live streams):
    /// the same request may succeed later.
    #[error("{0}")]
    TooManyRequests(String),
    /// Something failed inside stevedore; the detail goes to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "internal server error; the server log has the details".to_owned()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let body = Message {
            msg: self.public_message(),
        };
        (self.status(), Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { what } => ApiError::NotFound(format!("{what} not found")),
            StoreError::PackageRemoved { .. } => ApiError::NotFound(error.to_string()),
            StoreError::Conflict(message) => ApiError::Conflict(message),
            StoreError::Removed { .. } => ApiError::Gone(error.to_string()),
            StoreError::StaleLease { .. } | StoreError::Transition(_) => {
                ApiError::Conflict(error.to_string())
            }
            StoreError::QuotaExceeded(exceeded) => exceeded.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::lease_desk::DeskError> for ApiError {
    fn from(error: crate::lease_desk::DeskError) -> Self {
        match error {
            crate::lease_desk::DeskError::Store(error) => error.into(),
            crate::lease_desk::DeskError::Invalid(message) => ApiError::BadRequest(message),
        }
    }
}

/// Over a quota: 429 for a limit that frees itself as work goes on (queued tasks, live
/// streams), 403 for what the project must remove itself (codes, schedules, revisions,
/// package bytes). The message names the quota, its limit and the use.
impl From<QuotaExceeded> for ApiError {
    fn from(exceeded: QuotaExceeded) -> Self {
        if exceeded.quota.is_rate_like() {
            ApiError::TooManyRequests(exceeded.to_string())
        } else {
            ApiError::Forbidden(exceeded.to_string())
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        ApiError::BadRequest(error.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_table() {
        let cases = [
            (ApiError::BadRequest(String::new()), 400),
            (ApiError::Unauthorized(String::new()), 401),
            (ApiError::Forbidden(String::new()), 403),
            (ApiError::NotFound(String::new()), 404),
            (ApiError::Conflict(String::new()), 409),
            (ApiError::Gone(String::new()), 410),
            (ApiError::PayloadTooLarge(String::new()), 413),
            (ApiError::UnsupportedMediaType(String::new()), 415),
            (ApiError::TooManyRequests(String::new()), 429),
            (ApiError::Internal(String::new()), 500),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
        }
        let over = |quota| {
            ApiError::from(StoreError::QuotaExceeded(QuotaExceeded {
                quota,
                limit: 2,
                used: 2,
            }))
            .status()
            .as_u16()
        };
        use stevedore_model::Quota;
        assert_eq!(over(Quota::QueuedTasks), 429);
        assert_eq!(over(Quota::LogStreamsPerToken), 429);
        for quota in [
            Quota::Schedules,
            Quota::Codes,
            Quota::RevisionsPerCode,
            Quota::PackageBytes,
        ] {
            assert_eq!(over(quota), 403, "{quota}");
        }
        let removed = ApiError::from(StoreError::PackageRemoved {
            code: "hello".into(),
            rev: 3,
        });
        assert_eq!(removed.status().as_u16(), 404);
        assert_eq!(
            removed.public_message(),
            "the package of revision 3 of code hello was removed by retention; push the code again or use a newer revision"
        );
        assert!(
            !ApiError::Internal("secret path".into())
                .public_message()
                .contains("secret")
        );
    }
}
