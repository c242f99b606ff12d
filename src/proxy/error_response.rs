//! Errors of the stack as Anthropic-style error responses, so SDKs behave as with the real API.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

use crate::BoxError;
use crate::anthropic::{ApiError, ApiErrorKind};
use crate::body::{BufferBodyError, BufferBodyErrorKind};
use crate::retry::{RetryError, RetryErrorKind};

/// How an error is shown to a client.
struct Shown {
    error: ApiError,
    status: StatusCode,
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
}

impl Shown {
    fn new(error: ApiError) -> Self {
        Self {
            status: error.status(),
            error,
            retry_after: None,
            should_retry: None,
        }
    }

    fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    fn retry_after(mut self, wait: Option<Duration>) -> Self {
        self.retry_after = wait;
        self
    }

    fn should_retry(mut self, retry: bool) -> Self {
        self.should_retry = Some(retry);
        self
    }
}

/// The response a client sees for an error of the stack: the right status, the official
/// envelope, `retry-after` / `retry-after-ms` when a wait is known, and `x-should-retry: false`
/// when retrying cannot help (a spend cap, a request larger than the quota).
///
/// ```
/// use tower_claude::BoxError;
/// use tower_claude::anthropic::{ApiError, ApiErrorKind};
/// use tower_claude::proxy::error_response;
///
/// let err: BoxError = Box::new(ApiError::new(ApiErrorKind::Overloaded, "busy"));
/// let resp = error_response(&err);
/// assert_eq!(resp.status().as_u16(), 529);
/// ```
pub fn error_response(err: &BoxError) -> Response<UnsyncBoxBody<Bytes, BoxError>> {
    let shown = classify(err.as_ref());
    let mut resp = Response::new(
        Full::new(shown.error.to_envelope())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = shown.status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(wait) = shown.retry_after {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        headers.insert("retry-after", HeaderValue::from(secs.max(1)));
        headers.insert(
            "retry-after-ms",
            HeaderValue::from(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        );
    }
    if let Some(retry) = shown.should_retry {
        headers.insert(
            "x-should-retry",
            HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
    }
    resp
}

fn classify(err: &(dyn StdError + 'static)) -> Shown {
    if let Some(e) = err.downcast_ref::<BufferBodyError>() {
        let kind = match e.kind() {
            BufferBodyErrorKind::TooLarge => ApiErrorKind::RequestTooLarge,
            _ => ApiErrorKind::InvalidRequest,
        };
        return Shown::new(ApiError::new(kind, e.to_string()));
    }
    if let Some(e) = err.downcast_ref::<ApiError>() {
        return Shown::new(e.clone());
    }
    if let Some(e) = err.downcast_ref::<RetryError>() {
        if e.kind() == RetryErrorKind::SpendLimit {
            let api = e.api_error().cloned().unwrap_or_else(|| {
                ApiError::new(ApiErrorKind::SpendLimit, "monthly spend limit reached")
            });
            return Shown::new(api).should_retry(false);
        }
        // Otherwise the cause of the last failed attempt decides.
        if let Some(source) = e.source() {
            let shown = classify(source);
            return if e.kind() == RetryErrorKind::DeadlineExceeded {
                shown.should_retry(false)
            } else {
                shown
            };
        }
        if let Some(api) = e.api_error() {
            return Shown::new(api.clone());
        }
    }
    if let Some(e) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
        let msg = if e.is_connect() {
            "the proxy could not connect to the upstream API"
        } else {
            "the upstream connection failed"
        };
        return Shown::new(ApiError::new(ApiErrorKind::Api, msg)).status(StatusCode::BAD_GATEWAY);
    }
    Shown::new(ApiError::new(
        ApiErrorKind::Api,
        format!("proxy error: {err}"),
    ))
    .retry_after(None)
}
