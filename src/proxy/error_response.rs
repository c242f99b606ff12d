//! Errors of the stack as Anthropic-style error responses, so SDKs behave as with the real API.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

use crate::BoxError;
use crate::anthropic::{ApiError, ApiErrorKind};
use crate::body::{BufferBodyError, BufferBodyErrorKind};

/// The response a client sees for an error of the stack: the right status, the official
/// envelope, and `retry-after` when a wait is known.
pub fn error_response(err: &BoxError) -> Response<UnsyncBoxBody<Bytes, BoxError>> {
    let (api, status, retry_after) = classify(err);
    let mut resp = Response::new(
        Full::new(api.to_envelope())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(wait) = retry_after {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from(secs.max(1)));
        resp.headers_mut().insert(
            "retry-after-ms",
            HeaderValue::from(wait.as_millis().min(u128::from(u64::MAX)) as u64),
        );
    }
    resp
}

fn classify(err: &BoxError) -> (ApiError, StatusCode, Option<std::time::Duration>) {
    let (api, retry_after) = classify_kind(err);
    let status = if err.is::<hyper_util::client::legacy::Error>() {
        StatusCode::BAD_GATEWAY
    } else {
        api.status()
    };
    (api, status, retry_after)
}

fn classify_kind(err: &BoxError) -> (ApiError, Option<std::time::Duration>) {
    if let Some(e) = err.downcast_ref::<BufferBodyError>() {
        return match e.kind() {
            BufferBodyErrorKind::TooLarge => (
                ApiError::new(ApiErrorKind::RequestTooLarge, e.to_string()),
                None,
            ),
            _ => (
                ApiError::new(ApiErrorKind::InvalidRequest, e.to_string()),
                None,
            ),
        };
    }
    if let Some(e) = err.downcast_ref::<ApiError>() {
        return (e.clone(), None);
    }
    if let Some(e) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
        let msg = if e.is_connect() {
            "the proxy could not connect to the upstream API"
        } else {
            "the upstream connection failed"
        };
        return (ApiError::new(ApiErrorKind::Api, msg), None);
    }
    (
        ApiError::new(ApiErrorKind::Api, format!("proxy error: {err}")),
        None,
    )
}
