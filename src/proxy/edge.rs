//! The proxy's HTTP stack in front of its handler, built from tower-http:
//!
//! ```text
//! Front (ours, `front.rs`)    x-api-key, authorization: `Sensitive` in every Debug, log and span;
//!                             request-id: req_proxy_<24 hex> (a client's own is replaced);
//!                             the upstream's goes back as is, else the proxy's own;
//!                             the `request` span (method, path, request_id) around the layers
//!                             below and the answer's body; headers at TRACE
//! map_response                tower-http's plain-text 413 becomes an Anthropic envelope
//! CatchPanic                  a panic is answered 500 `api_error`; the proxy keeps serving
//! RequestBodyLimit            32 MB: a larger content-length is refused before any byte is
//!                             read, a longer body fails while the handler buffers it
//! Handle                      routing, client tokens, path checks, the ClaudeStack
//! ```
//!
//! What tower-http cannot do, or does at a cost, stays hand-written: the sensitive headers,
//! the request id and the request span (`front.rs`: one walk over the headers, an id made
//! once, the clock read only when the span is enabled; tower-http's four layers looked up each
//! name, cloned the id twice, set two extensions nothing reads and read the clock five times),
//! timeouts and the cap on *connections* (`conn.rs`: tower-http sees requests only), and the Anthropic body of the 413 (tower-http's
//! limit answers plain text and has no hook for the body).

use bytes::Bytes;
use http::header;
use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};
use tower_http::limit::RequestBodyLimitLayer;

use super::front::FrontLayer;
use super::server::{Handle, ProxyBody, api_error};
use crate::anthropic::ApiErrorKind;

/// The request body the handler receives: hyper's, limited by tower-http.
pub(crate) type EdgeBody = tower_http::body::Limited<Incoming>;

/// The proxy's HTTP stack around `handle` (see the module docs for the order and why).
pub(crate) fn stack(
    limit: usize,
    remember_keys: bool,
    handle: Handle,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<
        impl http_body::Body<Data = Bytes, Error = crate::BoxError> + Send + 'static,
    >,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        // Credentials sensitive; the id always the proxy's (a client's `request-id` would be
        // echoed unchecked); the `request` span.
        .layer(FrontLayer::new(remember_keys))
        .map_response(move |resp| anthropic_413(resp, limit))
        .layer(CatchPanicLayer::custom(PanicResponse))
        .layer(RequestBodyLimitLayer::new(limit))
        .service(handle)
}

/// tower-http's body limit answers a `content-length` above the limit itself, in plain text;
/// SDKs expect Anthropic's envelope. Its 413 is the only plain-text one (the handler and the
/// upstream answer JSON), which is how it is told apart.
/// (`Either` rather than re-boxing: tower-http's boxed body type cannot be built outside it,
/// and a second box per response would cost an allocation.)
fn anthropic_413<B>(resp: Response<B>, limit: usize) -> Response<Either<B, ProxyBody>> {
    // The status first: the content type is looked up for a 413 only.
    let plain = resp.status() == StatusCode::PAYLOAD_TOO_LARGE
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if !plain {
        return resp.map(Either::Left);
    }
    api_error(
        ApiErrorKind::RequestTooLarge,
        &format!("request body is larger than the limit of {limit} bytes"),
    )
    .map(Either::Right)
}

/// A panic anywhere below is answered like the API's own internal errors.
#[derive(Debug, Clone, Copy)]
struct PanicResponse;

impl ResponseForPanic for PanicResponse {
    type ResponseBody = ProxyBody;

    fn response_for_panic(
        &mut self,
        err: Box<dyn std::any::Any + Send + 'static>,
    ) -> Response<ProxyBody> {
        let what = err
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| err.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let what: String = what.chars().take(300).collect();
        tracing::error!(panic = %what, "a request panicked; answered 500, the proxy keeps serving");
        api_error(
            ApiErrorKind::Api,
            "internal error in the proxy while handling this request",
        )
    }
}
