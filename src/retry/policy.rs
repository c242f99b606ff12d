//! Which outcomes are retried.
//!
//! For an HTTP response, in order:
//!
//! 1. 2xx is a success (for a stream, see the held-back stream in the [module docs](super)).
//! 2. A 429 whose error envelope says `enforced_spend_limit_reached` is the monthly spend cap:
//!    never retried, whatever the headers say; the layer fails at once with
//!    [`RetryErrorKind::SpendLimit`](super::RetryErrorKind::SpendLimit).
//! 3. `x-should-retry: true` / `false`, when present, decides.
//! 4. Otherwise 408, 409, 429, 500, 502, 503, 504 and 529 are retried; every other status
//!    (400, 401, 403, 404, 413, ...) is returned as it is.
//!
//! An inner service error (connection refused or reset, a timeout before any response byte)
//! is retried, except the errors no wait can cure (see [`is_permanent`]): a key pool with no
//! key left, a request larger than a whole minute of quota, a request body over the limit.
//! Those fail at once. A mid-stream `event: error` received before any content was forwarded is
//! retried when its error type is transient (`overloaded_error`, `api_error`, ...).

use std::error::Error as StdError;

use http::{HeaderMap, StatusCode};

use crate::BoxError;
use crate::anthropic::{ApiError, ApiErrorKind, should_retry};
use crate::body::{BufferBodyError, BufferBodyErrorKind};
use crate::key_pool::KeyPoolError;
use crate::quota::{AcquireError, AcquireErrorKind};

/// Whether an inner service error (or any error in its source chain) is one that no retry can
/// cure, so that the layer fails at once instead of spending its attempts and the caller's
/// time: every key of a pool is out of rotation (the docs promise "fail at once"), a request
/// costs more than a whole bucket of a configured limit, or a request body over the size
/// limit.
pub(crate) fn is_permanent(err: &BoxError) -> bool {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err.as_ref());
    while let Some(e) = current {
        if e.downcast_ref::<KeyPoolError>().is_some() {
            return true;
        }
        if let Some(e) = e.downcast_ref::<AcquireError>() {
            return e.kind() == AcquireErrorKind::RequestTooLarge;
        }
        if let Some(e) = e.downcast_ref::<BufferBodyError>() {
            return e.kind() == BufferBodyErrorKind::TooLarge;
        }
        current = e.source();
    }
    false
}

/// What to do with a non-2xx response before looking at its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusVerdict {
    /// Transient: buffer the (small) error body, then retry.
    Retry,
    /// Final: return the response untouched.
    Stop,
}

/// The statuses retried when the server does not say otherwise.
pub(crate) fn is_retryable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        408 | 409 | 429 | 500 | 502 | 503 | 504 | 529
    )
}

/// The verdict for a non-2xx response from its status and headers.
pub(crate) fn status_verdict(status: StatusCode, headers: &HeaderMap) -> StatusVerdict {
    match should_retry(headers) {
        Some(true) => StatusVerdict::Retry,
        Some(false) => StatusVerdict::Stop,
        None if is_retryable_status(status) => StatusVerdict::Retry,
        None => StatusVerdict::Stop,
    }
}

/// Whether the body of a response with `status` must be read to classify it: every 429 (it
/// may be the spend cap, which `x-should-retry` does not override).
pub(crate) fn needs_body(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
}

/// Whether an error is the monthly spend cap.
pub(crate) fn is_spend_cap(err: &ApiError) -> bool {
    err.kind() == ApiErrorKind::SpendLimit
        || err.error_code() == Some("enforced_spend_limit_reached")
}

/// Whether a 429 is a rate limit (the kind that raises the key / group penalty).
pub(crate) fn is_rate_limit(status: StatusCode, err: Option<&ApiError>) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS && !err.is_some_and(is_spend_cap)
}

/// Whether a mid-stream `event: error` seen before any content is worth retrying.
pub(crate) fn is_retryable_stream_error(err: &ApiError) -> bool {
    !is_spend_cap(err) && err.kind().is_retryable()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn transient_statuses_are_retried() {
        for s in [408, 409, 429, 500, 502, 503, 504, 529] {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(status_verdict(status, &h(&[])), StatusVerdict::Retry, "{s}");
        }
    }

    #[test]
    fn client_errors_are_never_retried() {
        for s in [400, 401, 402, 403, 404, 413, 422, 501] {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(status_verdict(status, &h(&[])), StatusVerdict::Stop, "{s}");
        }
    }

    #[test]
    fn x_should_retry_decides_first() {
        let yes = h(&[("x-should-retry", "true")]);
        let no = h(&[("x-should-retry", "false")]);
        assert_eq!(
            status_verdict(StatusCode::BAD_REQUEST, &yes),
            StatusVerdict::Retry
        );
        assert_eq!(
            status_verdict(StatusCode::from_u16(529).unwrap(), &no),
            StatusVerdict::Stop
        );
        assert_eq!(
            status_verdict(StatusCode::TOO_MANY_REQUESTS, &no),
            StatusVerdict::Stop
        );
    }

    #[test]
    fn spend_cap_is_recognised() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"spend cap","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        let err = ApiError::from_response(StatusCode::TOO_MANY_REQUESTS, body);
        assert!(is_spend_cap(&err));
        assert!(!is_rate_limit(StatusCode::TOO_MANY_REQUESTS, Some(&err)));
        assert!(!is_retryable_stream_error(&err));
        assert!(needs_body(StatusCode::TOO_MANY_REQUESTS));

        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        let err = ApiError::from_response(StatusCode::TOO_MANY_REQUESTS, body);
        assert!(!is_spend_cap(&err));
        assert!(is_rate_limit(StatusCode::TOO_MANY_REQUESTS, Some(&err)));
    }

    #[test]
    fn stream_errors_are_retried_only_when_transient() {
        let overloaded = ApiError::from_sse_data(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        )
        .unwrap();
        assert!(is_retryable_stream_error(&overloaded));
        let invalid = ApiError::from_sse_data(
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#,
        )
        .unwrap();
        assert!(!is_retryable_stream_error(&invalid));
    }
}
