//! The API's error: a status code and a message safe to show; internal causes
//! are logged here and never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_core::spec::{self, FieldError};
use serde_json::json;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (bad JSON, missing field, bad header).
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but names something invalid.
    #[error("{message}")]
    Invalid {
        /// Summary.
        message: String,
        /// Fields at fault.
        fields: Vec<FieldError>,
    },
    /// The request has no valid API token.
    #[error("{0}")]
    Unauthorized(String),
    /// The token is valid but its tenant may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The thing named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The route exists, but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than the limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// Too much work is pending: the caller should retry after the delay.
    #[error("{message}")]
    Busy {
        /// Which ceiling was hit.
        message: String,
        /// When to try again.
        retry_after: std::time::Duration,
    },
    /// The database cannot be reached for now: the caller should retry in a
    /// moment. The cause is logged, not returned.
    #[error("the database is unavailable, try again shortly")]
    Unavailable(String),
    /// Something failed inside; the cause is logged, not returned.
    #[error("internal error")]
    Internal(String),
}

/// What a caller told the database is unavailable is asked to wait.
const UNAVAILABLE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl Error {
    /// The HTTP status of this error.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::Invalid { .. } => "invalid",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::Conflict(_) => "conflict",
            Error::TooLarge(_) => "too_large",
            Error::Busy { .. } => "busy",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
        }
    }
}

impl From<keel_store::Error> for Error {
    fn from(e: keel_store::Error) -> Self {
        match e {
            keel_store::Error::NotFound(what) => Error::NotFound(format!("{what} not found")),
            keel_store::Error::Conflict(message) => Error::Conflict(message),
            keel_store::Error::Unavailable(cause) => Error::Unavailable(cause),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<spec::Error> for Error {
    fn from(e: spec::Error) -> Self {
        match e {
            spec::Error::Syntax(message) => {
                Error::BadRequest(format!("spec is not valid YAML/JSON: {message}"))
            }
            spec::Error::Invalid(fields) => Error::Invalid {
                message: spec::Error::Invalid(fields.clone()).to_string(),
                fields,
            },
        }
    }
}

/// Longest value a message quotes (between backticks), and longest message.
const MAX_QUOTED: usize = 200;
const MAX_MESSAGE: usize = 2048;

/// A message as sent: messages quote what they refuse, so a 500 KB name
/// would come back whole; each quoted value and the message are clipped.
fn shown(message: &str) -> String {
    let parts: Vec<String> = message
        .split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                spec::clip(part, MAX_QUOTED)
            } else {
                part.to_string()
            }
        })
        .collect();
    spec::clip(&parts.join("`"), MAX_MESSAGE)
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match &self {
            Error::Internal(cause) => tracing::error!(cause = %cause, "request failed"),
            Error::Unavailable(cause) => {
                tracing::warn!(cause = %cause, "request failed: database unavailable");
            }
            _ => {}
        }
        let mut body = json!({"error": {"code": self.code(), "message": shown(&self.to_string())}});
        if let Error::Invalid { fields, .. } = &self {
            let fields: Vec<FieldError> = fields
                .iter()
                .map(|f| FieldError {
                    field: shown(&f.field),
                    message: shown(&f.message),
                })
                .collect();
            body["error"]["fields"] = json!(fields);
        }
        let mut response = (self.status_code(), Json(body)).into_response();
        let retry_after = match &self {
            Error::Busy { retry_after, .. } => Some(*retry_after),
            Error::Unavailable(_) => Some(UNAVAILABLE_RETRY_AFTER),
            _ => None,
        };
        if let Error::Unauthorized(_) = &self {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(retry_after) = retry_after {
            // Whole seconds, rounded up: `Retry-After: 0` would invite a storm.
            let seconds = retry_after.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = axum::http::HeaderValue::from_str(&seconds.to_string()) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, value);
            }
        }
        response
    }
}
