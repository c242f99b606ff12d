//! The proxy's HTTP stack in front of its handler, built from tower-http:
//!
//! ```text
//! Front (ours, `front.rs`)    x-api-key, authorization: `Sensitive` in every Debug, log and span;
//!                             request-id: req_proxy_<24 hex> (a client's own is replaced);
//!                             the upstream's goes back as is, else the proxy's own;
//!                             the `request` span (method, path, request_id) around the layers
//!                             below and the answer's body; headers at TRACE
//! map_response                tower-http's plain-text 413 becomes an Anthropic envelope
//! CatchPanic (ours, here)     a panic is answered 500 `api_error`; the proxy keeps serving
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
//! limit answers plain text and has no hook for the body). The panic catcher is ours too
//! ([`CatchPanic`]): tower-http's catches the same panics (in the call and in its future) but
//! boxes every response's body again, `UnsyncBoxBody` around the handler's already boxed
//! `ProxyBody`: an allocation and a free per request, and a second indirect call per frame.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::CatchUnwind;
use http::header;
use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use pin_project::pin_project;
use tower::ServiceBuilder;
use tower_http::catch_panic::ResponseForPanic;
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
        .layer_fn(|inner| CatchPanic { inner })
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

/// Answers a panic in the service below, in its `call` or in its future, with
/// [`PanicResponse`]'s 500, as tower-http's `CatchPanicLayer::custom(PanicResponse)` did, but
/// passes the service's response body through as it is (`Either`'s left side) instead of
/// boxing it again. A panic while a body is read is not caught, by this or by tower-http's.
#[derive(Debug, Clone)]
struct CatchPanic<S> {
    inner: S,
}

impl<S, R, B> tower::Service<Request<R>> for CatchPanic<S>
where
    S: tower::Service<Request<R>, Response = Response<B>>,
{
    type Response = Response<Either<B, ProxyBody>>;
    type Error = S::Error;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<R>) -> Self::Future {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(fut) => CatchPanicFuture::Called {
                fut: AssertUnwindSafe(fut).catch_unwind(),
            },
            Err(panic) => CatchPanicFuture::Panicked { panic: Some(panic) },
        }
    }
}

/// The response future of [`CatchPanic`].
#[pin_project(project = CatchPanicProj)]
enum CatchPanicFuture<F> {
    /// The call returned a future; a panic while it is polled is caught.
    Called {
        #[pin]
        fut: CatchUnwind<AssertUnwindSafe<F>>,
    },
    /// The call itself panicked (taken when answered).
    Panicked {
        panic: Option<Box<dyn Any + Send + 'static>>,
    },
}

impl<F, B, E> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Either<B, ProxyBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let panic = match self.project() {
            CatchPanicProj::Called { fut } => match std::task::ready!(fut.poll(cx)) {
                Ok(Ok(resp)) => return Poll::Ready(Ok(resp.map(Either::Left))),
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(panic) => panic,
            },
            CatchPanicProj::Panicked { panic } => panic
                .take()
                .expect("CatchPanicFuture polled after completion"),
        };
        Poll::Ready(Ok(PanicResponse
            .response_for_panic(panic)
            .map(Either::Right)))
    }
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

#[cfg(test)]
mod tests {
    use http_body::Body as _;
    use http_body_util::{BodyExt, Full};

    use super::*;

    type Answer = Result<Response<Full<Bytes>>, std::convert::Infallible>;

    /// Panics in `call` when the path is `/call`, in its future when it is `/future`, else
    /// answers `ok` (a body whose length is known and that ends with its one frame).
    #[derive(Clone)]
    struct Panicky;

    impl tower::Service<Request<()>> for Panicky {
        type Response = Response<Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<()>) -> Self::Future {
            assert!(req.uri().path() != "/call", "the call panicked");
            let in_future = req.uri().path() == "/future";
            Box::pin(async move {
                assert!(!in_future, "the future panicked");
                Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
            })
        }
    }

    async fn answer(path: &str) -> Response<Either<Full<Bytes>, ProxyBody>> {
        let req = Request::get(path).body(()).unwrap();
        tower::ServiceExt::oneshot(CatchPanic { inner: Panicky }, req)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_panic_in_the_call_or_its_future_is_a_500_api_error() {
        for path in ["/call", "/future"] {
            let resp = answer(path).await;
            assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert!(matches!(resp.body(), Either::Right(_)), "{path}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let err =
                crate::anthropic::ApiError::from_response(StatusCode::INTERNAL_SERVER_ERROR, &body);
            assert_eq!(err.kind(), ApiErrorKind::Api, "{path}");
        }
    }

    #[tokio::test]
    async fn an_answer_keeps_its_own_body_unboxed() {
        let resp = answer("/").await;
        assert_eq!(resp.status(), StatusCode::OK);
        // The service's own body, not a box around it: its length and its end still known.
        assert!(matches!(resp.body(), Either::Left(_)));
        assert_eq!(resp.body().size_hint().exact(), Some(2));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }
}
