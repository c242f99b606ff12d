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
    /// 408 request timeout. Anthropic documents no type string for it; this crate writes
    /// `timeout_error` (the type of 504) with status 408, and reads a 408 with that type back as
    /// this kind.
    RequestTimeout,
    /// 409 conflict. Anthropic documents no type string for it; this crate writes
    /// `conflict_error`.
    Conflict,
    /// 413 `request_too_large`.
    RequestTooLarge,
    /// 429 `rate_limit_error`.
    RateLimit,
    /// A spend cap (the organisation's monthly spend limit or the API usage limits it set):
    /// never retry it. Recognised by [`ApiError::from_response`] by the rule in
    /// [`is_spend_limit_message`]: the `error.details.error_code`
    /// `enforced_spend_limit_reached` first, then the message patterns of a 429 or 400 (or an
    /// SSE error). Written as a 429.
    SpendLimit,
    /// 500 `api_error`.
    Api,
    /// 504 `timeout_error`.
    Timeout,
    /// 529 `overloaded_error`.
    Overloaded,
    /// Anything else: a status outside the list above (e.g. 418) with no known error type.
    /// Its type string is `unknown_error`; [`ApiError::new`] gives it status 500, so such an
    /// error reads back as [`Api`](Self::Api).
    Other,
}

/// The `error.details.error_code` of a monthly spend cap.
const SPEND_LIMIT_CODE: &str = "enforced_spend_limit_reached";

/// Message patterns of a spend cap without its error code, lower case; a message matches when
/// it contains every part of one pattern. See [`is_spend_limit_message`].
const SPEND_LIMIT_PATTERNS: &[&[&str]] = &[
    // 429 "This request would exceed your account's monthly spend limit ..."
    &["spend limit"],
    // 400 "You have reached your specified API usage limits. You will regain access on ..."
    &["api usage limit", "reached"],
    &["usage limits", "regain access"],
];

/// Whether an error `message` says that a spend cap was reached, as seen in the wild without
/// `error.details.error_code` (the code, when present, decides first: see
/// [`ApiError::from_response`]).
///
/// The rule, case-insensitive: the message mentions a `spend limit` (a 429 saying the request
/// "would exceed your account's monthly spend limit"), or the `API usage limit(s)` together
/// with `reached` (a 400 saying "You have reached your specified API usage limits"), or
/// `usage limits` together with `regain access`. Ordinary rate-limit messages ("would exceed
/// the rate limit for your organization") never match. Only 400, 429 and SSE errors are
/// classified by message.
///
/// ```
/// use tower_claude::anthropic::is_spend_limit_message;
///
/// assert!(is_spend_limit_message("This request would exceed your account's monthly spend limit."));
/// assert!(is_spend_limit_message("You have reached your specified API usage limits. You will regain access on 2026-01-01 at 00:00 UTC."));
/// assert!(!is_spend_limit_message("This request would exceed the rate limit for your organization of 30,000 input tokens per minute."));
/// ```
pub fn is_spend_limit_message(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    SPEND_LIMIT_PATTERNS
        .iter()
        .any(|parts| parts.iter().all(|p| lower.contains(p)))
}

/// The longest message kept from a body that is not an error envelope.
const MAX_RAW_MESSAGE: usize = 512;

impl ApiErrorKind {
    /// The HTTP status this kind is sent with.
    ///
    /// ```
    /// use tower_claude::anthropic::ApiErrorKind;
    ///
    /// assert_eq!(ApiErrorKind::Overloaded.status().as_u16(), 529);
    /// assert_eq!(ApiErrorKind::SpendLimit.status().as_u16(), 429);
    /// ```
    pub fn status(self) -> StatusCode {
        let code = match self {
            Self::InvalidRequest => 400,
            Self::Authentication => 401,
            Self::Billing => 402,
            Self::Permission => 403,
            Self::NotFound => 404,
            Self::RequestTimeout => 408,
            Self::Conflict => 409,
            Self::RequestTooLarge => 413,
            Self::RateLimit | Self::SpendLimit => 429,
            Self::Api | Self::Other => 500,
            Self::Timeout => 504,
            Self::Overloaded => 529,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The `error.type` string of the envelope (`rate_limit_error`, ...).
    ///
    /// The spend cap is a `rate_limit_error` (told apart by `error.details.error_code`); 408 uses
    /// `timeout_error` and 409 `conflict_error` (see the variants).
    pub fn type_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Billing => "billing_error",
            Self::Permission => "permission_error",
            Self::NotFound => "not_found_error",
            Self::RequestTimeout | Self::Timeout => "timeout_error",
            Self::Conflict => "conflict_error",
            Self::RequestTooLarge => "request_too_large",
            Self::RateLimit | Self::SpendLimit => "rate_limit_error",
            Self::Api => "api_error",
            Self::Other => "unknown_error",
            Self::Overloaded => "overloaded_error",
        }
    }

    /// Whether the kind is transient and worth retrying (408, 409, 429 but not the spend cap,
    /// 500, 504, 529).
    ///
    /// ```
    /// use tower_claude::anthropic::ApiErrorKind;
    ///
    /// assert!(ApiErrorKind::RateLimit.is_retryable());
    /// assert!(!ApiErrorKind::SpendLimit.is_retryable());
    /// ```
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RequestTimeout
                | Self::Conflict
                | Self::RateLimit
                | Self::Api
                | Self::Timeout
                | Self::Overloaded
        )
    }

    /// The kind for an HTTP status alone (used when the body is not an envelope).
    ///
    /// A 429 is [`RateLimit`](Self::RateLimit) (the spend cap needs the body); 5xx statuses
    /// without a kind of their own (502, 503, ...) are [`Api`](Self::Api), server errors like
    /// 500, as the official SDKs retry every status >= 500; other statuses are
    /// [`Other`](Self::Other).
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_claude::anthropic::ApiErrorKind;
    ///
    /// assert_eq!(ApiErrorKind::from_status(StatusCode::from_u16(529).unwrap()), ApiErrorKind::Overloaded);
    /// assert_eq!(ApiErrorKind::from_status(StatusCode::BAD_GATEWAY), ApiErrorKind::Api);
    /// assert_eq!(ApiErrorKind::from_status(StatusCode::IM_A_TEAPOT), ApiErrorKind::Other);
    /// ```
    pub fn from_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::InvalidRequest,
            401 => Self::Authentication,
            402 => Self::Billing,
            403 => Self::Permission,
            404 => Self::NotFound,
            408 => Self::RequestTimeout,
            409 => Self::Conflict,
            413 => Self::RequestTooLarge,
            429 => Self::RateLimit,
            504 => Self::Timeout,
            529 => Self::Overloaded,
            500..=599 => Self::Api,
            _ => Self::Other,
        }
    }

    /// The kind for an `error.type` string (and the status, which tells 408 from 504), `None`
    /// for an unknown type.
    fn from_type(error_type: &str, status: Option<StatusCode>) -> Option<Self> {
        let kind = match error_type {
            "invalid_request_error" => Self::InvalidRequest,
            "authentication_error" => Self::Authentication,
            "billing_error" => Self::Billing,
            "permission_error" => Self::Permission,
            "not_found_error" => Self::NotFound,
            "timeout_error" if status.map(|s| s.as_u16()) == Some(408) => Self::RequestTimeout,
            "timeout_error" => Self::Timeout,
            "conflict_error" => Self::Conflict,
            "request_too_large" => Self::RequestTooLarge,
            "rate_limit_error" => Self::RateLimit,
            "api_error" => Self::Api,
            "overloaded_error" => Self::Overloaded,
            _ => return None,
        };
        Some(kind)
    }
}

#[derive(serde::Deserialize)]
struct EnvelopeIn {
    #[serde(rename = "type")]
    ty: Option<String>,
    error: Option<ErrorIn>,
}

#[derive(serde::Deserialize)]
struct ErrorIn {
    #[serde(rename = "type")]
    ty: Option<String>,
    message: Option<String>,
    details: Option<DetailsIn>,
}

#[derive(serde::Deserialize)]
struct DetailsIn {
    error_code: Option<String>,
}

#[derive(serde::Serialize)]
struct EnvelopeOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    error: ErrorOut<'a>,
}

#[derive(serde::Serialize)]
struct ErrorOut<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<DetailsOut<'a>>,
}

#[derive(serde::Serialize)]
struct DetailsOut<'a> {
    error_code: &'a str,
}

/// Parses an envelope: `Some((type, message, error_code))` when `error` is an object.
fn parse_envelope(body: &[u8]) -> Option<(Option<String>, String, Option<String>)> {
    let env: EnvelopeIn = serde_json::from_slice(body).ok()?;
    if env.ty.as_deref().is_some_and(|t| t != "error") {
        return None;
    }
    let error = env.error?;
    Some((
        error.ty,
        error.message.unwrap_or_default(),
        error.details.and_then(|d| d.error_code),
    ))
}

/// Whether `body` is a JSON object with a string `type` (every Messages API answer is).
pub(crate) fn is_typed_object(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        _ty: String,
    }
    serde_json::from_slice::<Typed>(body).is_ok()
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
    ///
    /// [`ApiErrorKind::SpendLimit`] gets its `error_code` (`enforced_spend_limit_reached`).
    ///
    /// ```
    /// use tower_claude::anthropic::{ApiError, ApiErrorKind};
    ///
    /// let err = ApiError::new(ApiErrorKind::Overloaded, "Overloaded");
    /// assert_eq!(err.status().as_u16(), 529);
    /// assert_eq!(
    ///     &err.to_envelope()[..],
    ///     br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
    /// );
    /// ```
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        Self {
            status: kind.status(),
            kind,
            error_type: kind.type_str().to_owned(),
            message: message.into(),
            error_code: (kind == ApiErrorKind::SpendLimit).then(|| SPEND_LIMIT_CODE.to_owned()),
        }
    }

    /// Parses an error response. Never fails: a body that is not an envelope gives an error
    /// whose kind comes from `status` and whose message is the (truncated, lossy) body text.
    ///
    /// The kind comes from `error.type` when it is a known type (`timeout_error` with status
    /// 408 is [`RequestTimeout`](ApiErrorKind::RequestTimeout)), else from the status
    /// ([`ApiErrorKind::from_status`]). Any error whose `error.details.error_code` is
    /// `enforced_spend_limit_reached` is [`SpendLimit`](ApiErrorKind::SpendLimit), and so is a
    /// 429 or 400 whose message matches [`is_spend_limit_message`] (the status is kept).
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_claude::anthropic::{ApiError, ApiErrorKind};
    ///
    /// let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"cap",
    ///   "details":{"error_code":"enforced_spend_limit_reached"}}}"#;
    /// let err = ApiError::from_response(StatusCode::TOO_MANY_REQUESTS, body);
    /// assert_eq!(err.kind(), ApiErrorKind::SpendLimit);
    /// assert!(!err.kind().is_retryable());
    ///
    /// let err = ApiError::from_response(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
    /// assert_eq!(err.kind(), ApiErrorKind::Api);
    /// assert_eq!(err.message(), "<html>bad gateway</html>");
    /// ```
    pub fn from_response(status: StatusCode, body: &[u8]) -> Self {
        match parse_envelope(body) {
            Some((ty, message, error_code)) => {
                let kind = Self::classify(
                    ty.as_deref(),
                    Some(status),
                    error_code.as_deref(),
                    Some(&message),
                );
                Self {
                    status,
                    kind,
                    error_type: ty.unwrap_or_else(|| kind.type_str().to_owned()),
                    message,
                    error_code,
                }
            }
            None => {
                let kind = ApiErrorKind::from_status(status);
                Self {
                    status,
                    kind,
                    error_type: kind.type_str().to_owned(),
                    message: raw_message(status, body),
                    error_code: None,
                }
            }
        }
    }

    /// Parses the `data` of an SSE `event: error` (same envelope, no status: inferred from the
    /// error type).
    ///
    /// ```
    /// use tower_claude::anthropic::{ApiError, ApiErrorKind};
    ///
    /// let data = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    /// let err = ApiError::from_sse_data(data).unwrap();
    /// assert_eq!(err.kind(), ApiErrorKind::Overloaded);
    /// assert_eq!(err.status().as_u16(), 529);
    /// assert!(ApiError::from_sse_data(b"{}").is_none());
    /// ```
    pub fn from_sse_data(data: &[u8]) -> Option<Self> {
        let (ty, message, error_code) = parse_envelope(data)?;
        let kind = Self::classify(ty.as_deref(), None, error_code.as_deref(), Some(&message));
        Some(Self {
            status: kind.status(),
            kind,
            error_type: ty.unwrap_or_else(|| kind.type_str().to_owned()),
            message,
            error_code,
        })
    }

    /// The spend-cap rule: the error code first, then (for a 429 / 400 kind) the message.
    fn classify(
        error_type: Option<&str>,
        status: Option<StatusCode>,
        error_code: Option<&str>,
        message: Option<&str>,
    ) -> ApiErrorKind {
        if error_code == Some(SPEND_LIMIT_CODE) {
            return ApiErrorKind::SpendLimit;
        }
        let kind = error_type
            .and_then(|t| ApiErrorKind::from_type(t, status))
            .or_else(|| status.map(ApiErrorKind::from_status))
            .unwrap_or(ApiErrorKind::Other);
        let by_message = matches!(kind, ApiErrorKind::RateLimit | ApiErrorKind::InvalidRequest)
            && message.is_some_and(is_spend_limit_message);
        if by_message {
            ApiErrorKind::SpendLimit
        } else {
            kind
        }
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

    /// This error as one SSE event, `event: error` carrying the [envelope](Self::to_envelope):
    /// how a stream already answered 200 reports a failure.
    ///
    /// ```
    /// use tower_claude::anthropic::{ApiError, ApiErrorKind};
    ///
    /// let event = ApiError::new(ApiErrorKind::Api, "cut").to_sse_event();
    /// assert!(event.starts_with(b"event: error\ndata: {"));
    /// assert!(event.ends_with(b"}\n\n"));
    /// ```
    pub fn to_sse_event(&self) -> Bytes {
        let envelope = self.to_envelope();
        let mut out = Vec::with_capacity(envelope.len() + 24);
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(&envelope);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    /// The JSON envelope for this error.
    ///
    /// `error.details.error_code` is included when set. Parsing the envelope back with
    /// [`ApiError::from_response`] and this error's status gives an equal error.
    pub fn to_envelope(&self) -> Bytes {
        let env = EnvelopeOut {
            ty: "error",
            error: ErrorOut {
                ty: &self.error_type,
                message: &self.message,
                details: self
                    .error_code
                    .as_deref()
                    .map(|error_code| DetailsOut { error_code }),
            },
        };
        // Serialising borrowed strings into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
    }
}

/// The message for a body that is not an envelope: its text (lossy, trimmed, at most
/// [`MAX_RAW_MESSAGE`] bytes), or the status reason when empty.
fn raw_message(status: StatusCode, body: &[u8]) -> String {
    let cut = &body[..body.len().min(MAX_RAW_MESSAGE + 4)];
    let text = String::from_utf8_lossy(cut);
    let text = text.trim();
    if text.is_empty() {
        return match status.canonical_reason() {
            Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
            None => format!("HTTP {}", status.as_u16()),
        };
    }
    let mut end = text.len().min(MAX_RAW_MESSAGE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut message = text[..end].to_owned();
    if end < text.len() || body.len() > cut.len() {
        message.push('…');
    }
    message
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

#[cfg(test)]
mod tests {
    use super::*;

    // Every kind except [`ApiErrorKind::Other`], in status order.
    const KINDS: [ApiErrorKind; 13] = [
        ApiErrorKind::InvalidRequest,
        ApiErrorKind::Authentication,
        ApiErrorKind::Billing,
        ApiErrorKind::Permission,
        ApiErrorKind::NotFound,
        ApiErrorKind::RequestTimeout,
        ApiErrorKind::Conflict,
        ApiErrorKind::RequestTooLarge,
        ApiErrorKind::RateLimit,
        ApiErrorKind::SpendLimit,
        ApiErrorKind::Api,
        ApiErrorKind::Timeout,
        ApiErrorKind::Overloaded,
    ];

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    #[test]
    fn statuses_and_types_match_the_documented_table() {
        let table = [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (408, "timeout_error"),
            (409, "conflict_error"),
            (413, "request_too_large"),
            (429, "rate_limit_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (504, "timeout_error"),
            (529, "overloaded_error"),
        ];
        for (kind, (code, ty)) in KINDS.iter().zip(table) {
            assert_eq!(kind.status().as_u16(), code, "{kind:?}");
            assert_eq!(kind.type_str(), ty, "{kind:?}");
        }
    }

    #[test]
    fn from_status_inverts_status_except_spend_limit() {
        for kind in KINDS {
            let expected = if kind == ApiErrorKind::SpendLimit {
                ApiErrorKind::RateLimit
            } else {
                kind
            };
            assert_eq!(ApiErrorKind::from_status(kind.status()), expected);
        }
        assert_eq!(ApiErrorKind::from_status(status(503)), ApiErrorKind::Api);
        assert_eq!(ApiErrorKind::from_status(status(418)), ApiErrorKind::Other);
        assert_eq!(ApiErrorKind::from_status(status(302)), ApiErrorKind::Other);
    }

    #[test]
    fn retryable_kinds() {
        let retryable: Vec<_> = KINDS.into_iter().filter(|k| k.is_retryable()).collect();
        assert_eq!(
            retryable,
            [
                ApiErrorKind::RequestTimeout,
                ApiErrorKind::Conflict,
                ApiErrorKind::RateLimit,
                ApiErrorKind::Api,
                ApiErrorKind::Timeout,
                ApiErrorKind::Overloaded,
            ]
        );
        assert!(!ApiErrorKind::Other.is_retryable());
    }

    #[test]
    fn every_kind_round_trips_through_its_envelope() {
        for kind in KINDS {
            let err = ApiError::new(kind, format!("message for {kind:?} with \"quotes\" and é"));
            let back = ApiError::from_response(err.status(), &err.to_envelope());
            assert_eq!(back, err, "{kind:?}");
            // Without a status, `timeout_error` reads as 504.
            if kind != ApiErrorKind::RequestTimeout {
                let sse = ApiError::from_sse_data(&err.to_envelope()).unwrap();
                assert_eq!(sse, err, "{kind:?}");
            }
        }
    }

    #[test]
    fn parsed_errors_round_trip() {
        let cases: [(u16, &[u8]); 5] = [
            (418, b"I'm a teapot"),
            (503, b""),
            (429, br#"{"type":"error","error":{"type":"rate_limit_error","message":"m","details":{"error_code":"other"}}}"#),
            (400, br#"{"error":{"message":"no type"}}"#),
            (500, br#"{"type":"error","error":{"type":"brand_new_error","message":"?"}}"#),
        ];
        for (code, body) in cases {
            let err = ApiError::from_response(status(code), body);
            let back = ApiError::from_response(err.status(), &err.to_envelope());
            assert_eq!(back, err, "{code}");
        }
    }

    #[test]
    fn spend_cap_is_detected_and_written() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified API usage limits.","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        let err = ApiError::from_response(status(429), body);
        assert_eq!(err.kind(), ApiErrorKind::SpendLimit);
        assert_eq!(err.error_code(), Some("enforced_spend_limit_reached"));
        assert_eq!(err.error_type(), "rate_limit_error");
        let env = String::from_utf8(err.to_envelope().to_vec()).unwrap();
        assert!(
            env.contains(r#""details":{"error_code":"enforced_spend_limit_reached"}"#),
            "{env}"
        );
        // A plain 429 has no details.
        let plain = ApiError::new(ApiErrorKind::RateLimit, "slow down").to_envelope();
        assert!(
            !String::from_utf8(plain.to_vec())
                .unwrap()
                .contains("details")
        );
    }

    #[test]
    fn spend_caps_are_recognised_by_code_then_by_message() {
        let envelope = |ty: &str, message: &str| {
            format!(r#"{{"type":"error","error":{{"type":"{ty}","message":"{message}"}}}}"#)
        };
        let shapes = [
            (
                429,
                envelope(
                    "rate_limit_error",
                    "This request would exceed your account's monthly spend limit. Please raise it in the Console.",
                ),
            ),
            (
                400,
                envelope(
                    "invalid_request_error",
                    "You have reached your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC.",
                ),
            ),
        ];
        for (code, body) in shapes {
            let err = ApiError::from_response(status(code), body.as_bytes());
            assert_eq!(err.kind(), ApiErrorKind::SpendLimit, "{body}");
            assert_eq!(err.status().as_u16(), code);
            assert!(!err.kind().is_retryable());
            assert_eq!(
                ApiError::from_sse_data(body.as_bytes()).unwrap().kind(),
                ApiErrorKind::SpendLimit
            );
        }
        // Ordinary rate limits, other 400s and other statuses with the words are not caps.
        let rate = envelope(
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 30,000 input tokens per minute.",
        );
        assert_eq!(
            ApiError::from_response(status(429), rate.as_bytes()).kind(),
            ApiErrorKind::RateLimit
        );
        let bad = envelope("invalid_request_error", "max_tokens: Field required");
        assert_eq!(
            ApiError::from_response(status(400), bad.as_bytes()).kind(),
            ApiErrorKind::InvalidRequest
        );
        let server = envelope("api_error", "spend limit service unavailable");
        assert_eq!(
            ApiError::from_response(status(500), server.as_bytes()).kind(),
            ApiErrorKind::Api
        );
    }

    #[test]
    fn type_wins_over_status_and_408_is_told_from_504() {
        let overloaded =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            ApiError::from_response(status(503), overloaded).kind(),
            ApiErrorKind::Overloaded
        );
        let timeout = br#"{"type":"error","error":{"type":"timeout_error","message":"t"}}"#;
        assert_eq!(
            ApiError::from_response(status(408), timeout).kind(),
            ApiErrorKind::RequestTimeout
        );
        assert_eq!(
            ApiError::from_response(status(504), timeout).kind(),
            ApiErrorKind::Timeout
        );
        assert_eq!(
            ApiError::from_sse_data(timeout).unwrap().kind(),
            ApiErrorKind::Timeout
        );
        let unknown = br#"{"type":"error","error":{"type":"new_error","message":"x"}}"#;
        let err = ApiError::from_response(status(404), unknown);
        assert_eq!(err.kind(), ApiErrorKind::NotFound);
        assert_eq!(err.error_type(), "new_error");
    }

    #[test]
    fn non_envelope_bodies_never_fail() {
        let err = ApiError::from_response(status(502), b"");
        assert_eq!(err.kind(), ApiErrorKind::Api);
        assert_eq!(err.message(), "HTTP 502 Bad Gateway");
        let long = "é".repeat(1000);
        let err = ApiError::from_response(status(500), long.as_bytes());
        assert!(err.message().len() <= MAX_RAW_MESSAGE + '…'.len_utf8());
        assert!(err.message().ends_with('…'));
        let err = ApiError::from_response(status(400), &[0xff, 0xfe, b'x']);
        assert_eq!(err.kind(), ApiErrorKind::InvalidRequest);
        assert!(err.message().ends_with('x'));
        // An object whose `type` is not `error` is not an envelope.
        let err = ApiError::from_response(
            status(500),
            br#"{"type":"message","error":{"type":"overloaded_error"}}"#,
        );
        assert_eq!(err.kind(), ApiErrorKind::Api);
        assert!(ApiError::from_sse_data(b"not json").is_none());
        assert!(ApiError::from_sse_data(br#"{"type":"ping"}"#).is_none());
    }

    #[test]
    fn display_shows_status_type_and_message() {
        let err = ApiError::new(ApiErrorKind::Overloaded, "Overloaded");
        assert_eq!(err.to_string(), "529 overloaded_error: Overloaded");
    }
}
