//! The Anthropic error envelope.

use bytes::Bytes;
use http::StatusCode;

/// What kind of error the API returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ApiErrorKind {
    /// 400 `invalid_request_error`.
    InvalidRequest,
    /// 401 `authentication_error`.
    Authentication,
    /// 402 `billing_error`.
    Billing,
    /// 403 `permission_error`.
    Permission,
    /// 404 `not_found_error`.
    NotFound,
    /// 408 request timeout.
    RequestTimeout,
    /// 409 conflict.
    Conflict,
    /// 413 `request_too_large`.
    RequestTooLarge,
    /// 429 `rate_limit_error`.
    RateLimit,
    /// 429 whose `error.details.error_code` is `enforced_spend_limit_reached`: a monthly spend
    /// cap. Never retry it.
    SpendLimit,
    /// 500 `api_error`.
    Api,
    /// 504 `timeout_error`.
    Timeout,
    /// 529 `overloaded_error`.
    Overloaded,
    /// Anything else.
    Other,
}

impl ApiErrorKind {
    /// The HTTP status this kind is sent with.
    pub fn status(self) -> StatusCode {
        todo!()
    }

    /// The `error.type` string of the envelope (`rate_limit_error`, ...).
    pub fn type_str(self) -> &'static str {
        todo!()
    }

    /// Whether the kind is transient and worth retrying (408, 409, 429 but not the spend cap,
    /// 500, 504, 529).
    pub fn is_retryable(self) -> bool {
        todo!()
    }

    /// The kind for an HTTP status alone (used when the body is not an envelope).
    pub fn from_status(status: StatusCode) -> Self {
        todo!()
    }
}

/// An error returned by the API: `{"type":"error","error":{"type":..,"message":..}}`.
///
/// ```
/// use http::StatusCode;
/// use tower_claude::anthropic::{ApiError, ApiErrorKind};
///
/// let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
/// let err = ApiError::from_response(StatusCode::TOO_MANY_REQUESTS, body);
/// assert_eq!(err.kind(), ApiErrorKind::RateLimit);
/// assert_eq!(err.message(), "slow down");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    kind: ApiErrorKind,
    error_type: String,
    message: String,
    error_code: Option<String>,
}

impl ApiError {
    /// A new error of `kind` with `message`, with the kind's status and type string.
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        todo!()
    }

    /// Parses an error response. Never fails: a body that is not an envelope gives an error
    /// whose kind comes from `status` and whose message is the (truncated, lossy) body text.
    pub fn from_response(status: StatusCode, body: &[u8]) -> Self {
        todo!()
    }

    /// Parses the `data` of an SSE `event: error` (same envelope, no status: inferred from the
    /// error type).
    pub fn from_sse_data(data: &[u8]) -> Option<Self> {
        todo!()
    }

    /// The kind.
    pub fn kind(&self) -> ApiErrorKind {
        self.kind
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// `error.type` as sent.
    pub fn error_type(&self) -> &str {
        &self.error_type
    }

    /// `error.message`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// `error.details.error_code`, when present.
    pub fn error_code(&self) -> Option<&str> {
        self.error_code.as_deref()
    }

    /// Sets `error.details.error_code`.
    pub fn with_error_code(mut self, code: impl Into<String>) -> Self {
        self.error_code = Some(code.into());
        self
    }

    /// The JSON envelope for this error.
    pub fn to_envelope(&self) -> Bytes {
        todo!()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.error_type,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}
