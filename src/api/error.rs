//! The one place where errors become HTTP statuses and JSON error bodies.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use serde::Serialize;

use crate::service::ServiceError;

/// An error response: status, a stable code, a message safe for any caller.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorBody<'a> {
    message: &'a str,
    error_code: &'a str,
    correlation_id: &'a str,
}

/// Seconds a client should wait before retrying after a transient HSM failure.
pub const RETRY_AFTER_SECS: u32 = 2;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let retry_after =
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER_SECS.into());
        Self {
            status,
            code,
            message: message.into(),
            retry_after,
        }
    }

    pub fn rate_limited(wait: std::time::Duration) -> Self {
        Self {
            retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RateLimited",
                "too many key requests; retry later",
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    pub fn response(&self, correlation_id: &str) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status);
        resp.insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")));
        if self.status == StatusCode::UNAUTHORIZED {
            resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if let Some(secs) = self.retry_after {
            resp.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        resp.json(ErrorBody {
            message: &self.message,
            error_code: self.code,
            correlation_id,
        })
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::BadInput(m) => Self::bad_request(m),
            ServiceError::Forbidden { code, message } => {
                Self::new(StatusCode::FORBIDDEN, code, message)
            }
            ServiceError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, "NotFound", m),
            ServiceError::Conflict(m) => Self::new(StatusCode::CONFLICT, "Conflict", m),
            // 5xx bodies stay generic; the detail goes to the server log.
            ServiceError::Hsm(h) if h.is_transient() => {
                tracing::warn!(error = %h, "HSM unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "HsmUnavailable",
                    "the HSM is unavailable; retry later",
                )
            }
            other => {
                tracing::error!(error = %other, "internal error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "internal error",
                )
            }
        }
    }
}
