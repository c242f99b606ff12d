//! Errors of the stack as Anthropic-style error responses, so SDKs behave as with the real API.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

use crate::BoxError;
use crate::anthropic::{ApiError, ApiErrorKind};
use crate::body::{BufferBodyError, BufferBodyErrorKind};
use crate::key_pool::KeyPoolError;
use crate::quota::{AcquireError, AcquireErrorKind};
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
#[cold]
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

/// Walks the error and its sources; the first error of a known kind decides (layers wrap the
/// errors of the layers below them, e.g. fallback wraps a retry error that wraps a connect
/// error).
fn classify(err: &(dyn StdError + 'static)) -> Shown {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(shown) = classify_one(e) {
            return shown;
        }
        current = e.source();
    }
    Shown::new(ApiError::new(
        ApiErrorKind::Api,
        format!("proxy error: {err}"),
    ))
}

fn classify_one(err: &(dyn StdError + 'static)) -> Option<Shown> {
    if let Some(e) = err.downcast_ref::<BufferBodyError>() {
        let kind = match e.kind() {
            BufferBodyErrorKind::TooLarge => ApiErrorKind::RequestTooLarge,
            _ => ApiErrorKind::InvalidRequest,
        };
        return Some(Shown::new(ApiError::new(kind, e.to_string())));
    }
    if let Some(e) = err.downcast_ref::<ApiError>() {
        return Some(Shown::new(e.clone()));
    }
    if let Some(e) = err.downcast_ref::<AcquireError>() {
        return Some(match e.kind() {
            // Waiting longer locally was not allowed: tell the client when capacity returns.
            AcquireErrorKind::QueueTimeout => {
                Shown::new(ApiError::new(ApiErrorKind::RateLimit, e.to_string()))
                    .retry_after(e.available_in())
            }
            // More than a whole minute of quota: no wait helps.
            _ => Shown::new(ApiError::new(ApiErrorKind::RateLimit, e.to_string()))
                .should_retry(false),
        });
    }
    if let Some(e) = err.downcast_ref::<RetryError>() {
        if e.kind() == RetryErrorKind::SpendLimit {
            let api = e.api_error().cloned().unwrap_or_else(|| {
                ApiError::new(ApiErrorKind::SpendLimit, "monthly spend limit reached")
            });
            return Some(Shown::new(api).should_retry(false));
        }
        if e.kind() == RetryErrorKind::DeadlineExceeded && e.source().is_none() {
            // The deadline passed while the upstream was still to answer.
            return Some(Shown::new(ApiError::new(
                ApiErrorKind::Timeout,
                e.to_string(),
            )));
        }
        if e.source().is_none() {
            return e.api_error().map(|api| Shown::new(api.clone()));
        }
        // Otherwise the cause of the last failed attempt decides.
        return None;
    }
    if let Some(e) = err.downcast_ref::<KeyPoolError>() {
        // Every upstream key is revoked or spend-capped: an operator must act; retrying
        // cannot help.
        return Some(
            Shown::new(ApiError::new(
                ApiErrorKind::Permission,
                format!("the proxy has no usable upstream API key: {e}"),
            ))
            .should_retry(false),
        );
    }
    let connect = match err.downcast_ref::<hyper_util::client::legacy::Error>() {
        Some(e) => Some(e.is_connect()),
        // The pool of a plain `http://` upstream (`client::Http1Pool`).
        None => err
            .downcast_ref::<crate::client::PoolError>()
            .map(crate::client::PoolError::is_connect),
    };
    if let Some(connect) = connect {
        let msg = if connect {
            "the proxy could not connect to the upstream API"
        } else {
            "the upstream connection failed"
        };
        return Some(
            Shown::new(ApiError::new(ApiErrorKind::Api, msg)).status(StatusCode::BAD_GATEWAY),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(err: BoxError) -> (u16, String, Option<String>, Option<String>) {
        let resp = error_response(&err);
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let (retry_after, should_retry) = (h("retry-after"), h("x-should-retry"));
        let status = resp.status().as_u16();
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            resp.into_body(),
        ))
        .unwrap()
        .unwrap()
        .to_bytes();
        let kind = ApiError::from_response(StatusCode::from_u16(status).unwrap(), &body)
            .error_type()
            .to_owned();
        (status, kind, retry_after, should_retry)
    }

    #[test]
    fn typed_errors_become_envelopes_through_the_source_chain() {
        // A plain upstream-style error keeps its status.
        let (status, kind, ..) = shown(Box::new(ApiError::new(ApiErrorKind::Overloaded, "busy")));
        assert_eq!((status, kind.as_str()), (529, "overloaded_error"));

        // A wrapper whose source is a known error: the source decides.
        #[derive(Debug)]
        struct Wrapper(BoxError);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(self.0.as_ref())
            }
        }
        let inner: BoxError = Box::new(ApiError::new(ApiErrorKind::RequestTooLarge, "big"));
        let (status, kind, ..) = shown(Box::new(Wrapper(inner)));
        assert_eq!((status, kind.as_str()), (413, "request_too_large"));

        // Unknown errors are a 500 api_error, never a panic.
        let (status, kind, ..) = shown("something odd".into());
        assert_eq!((status, kind.as_str()), (500, "api_error"));
    }
}
