//! The front of the proxy's stack, in one layer: what tower-http's
//! `SetSensitiveRequestHeaders`, `SetRequestId` and `PropagateRequestId` did, with the removal
//! of a client's own id between them.
//!
//! - `x-api-key` and `authorization` are marked `Sensitive` (in every Debug, log and span), in
//!   one walk over the headers (tower-http looked each name up with `entry`: a hash and a
//!   probe per name, ~0.36k instructions per request).
//! - A client's `request-id` is removed (it would be echoed unchecked), and a blank `x-api-key`
//!   (no credential: upstream it would shadow an `Authorization` header).
//! - With [`FrontLayer::new`]`(true)` (a proxy that forwards its clients' keys), the id of the
//!   client's key is remembered on the request from the same walk (`KeyId::remember`): the
//!   first layer that needs it finds it instead of looking `x-api-key` and `authorization` up.
//! - The proxy's own `req_proxy_<24 hex>` goes on the request as a [`ProxyRequestId`]
//!   extension, for the `request` span and the handler's log (not as a header, which the
//!   handler would have to remove again before the upstream).
//! - An answer that carries a `request-id` (the upstream's) keeps it; any other answer (the
//!   proxy's own: routes, refusals, errors, a panic) gets the proxy's id.
//!
//! - The `request` span (method, path, request id; at DEBUG, as tower-http's `Trace` made it)
//!   covers the layers below and the answer's body; at TRACE an event lists the request's
//!   headers (credentials show as `Sensitive`); at DEBUG events say when the answer's head came
//!   (`latency`, `status`), when its body ended (`stream_duration`), and when it failed (a 5xx,
//!   a body error). The clock is read only when the span is enabled: tower-http's `Trace` read
//!   it five times per request and moved its future and body through its own wrappers
//!   whatever the log level (~0.8k instructions per request with the span off).
//!
//! The id is kept as 34 bytes and made a header value only for an answer without one:
//! tower-http's pair made a header value for every request, cloned it twice (each clone of a
//! fresh `Bytes` allocates) and inserted a `RequestId` extension on the request and on the
//! answer, which nothing in the proxy reads; the handler then removed the header.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;
use tracing::Span;

use crate::anthropic::KeyId;
use crate::anthropic::parsed_names::X_API_KEY;

/// The request id header: the name Anthropic answers with and the SDKs read.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// `req_proxy_` and 24 hex digits.
type Id = [u8; 34];

/// `req_proxy_` and 24 random hex digits (96 bits).
fn new_id() -> Id {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"req_proxy_000000000000000000000000";
    let mut bits = fastrand::u128(..);
    for byte in id[10..].iter_mut() {
        *byte = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    id
}

/// The proxy's id of a request (`req_proxy_<24 hex>`), a request extension set by
/// [`FrontLayer`]: read by the `request` span and the handler's log.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProxyRequestId(Id);

impl ProxyRequestId {
    /// The id as text.
    pub(crate) fn as_str(&self) -> &str {
        // Always ASCII (`new_id`); "-" is unreachable.
        std::str::from_utf8(&self.0).unwrap_or("-")
    }
}

impl std::fmt::Display for ProxyRequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for ProxyRequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The header value of an id (always visible ASCII).
fn header_value(id: &Id) -> HeaderValue {
    HeaderValue::from_bytes(id).expect("req_proxy_ and hex digits are a valid header value")
}

/// Marks credentials sensitive, sets and propagates the proxy's request id (see the module
/// docs).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FrontLayer {
    remember_keys: bool,
}

impl FrontLayer {
    /// With `remember_keys`, the id of the client's key is remembered on the request from the
    /// front's walk (`KeyId::remember`): for a proxy that forwards the client's key, whose id
    /// the layers key their quota and metrics by. A proxy that holds the upstream keys, or
    /// whose clients are tenants, replaces the client's credential: no id of it is needed.
    pub(crate) fn new(remember_keys: bool) -> Self {
        Self { remember_keys }
    }
}

impl<S> tower::Layer<S> for FrontLayer {
    type Service = Front<S>;

    fn layer(&self, inner: S) -> Front<S> {
        Front {
            inner,
            remember_keys: self.remember_keys,
        }
    }
}

/// The service of [`FrontLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Front<S> {
    inner: S,
    remember_keys: bool,
}

impl<S, B, ResB> tower::Service<Request<B>> for Front<S>
where
    S: tower::Service<Request<B>, Response = Response<ResB>>,
    S::Error: std::fmt::Display,
{
    type Response = Response<TracedBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut client_id = false;
        // The first value of each credential header (a clone shares its bytes).
        let mut x_api_key: Option<HeaderValue> = None;
        let mut authorization: Option<HeaderValue> = None;
        for (name, value) in req.headers_mut().iter_mut() {
            if *name == X_API_KEY {
                value.set_sensitive(true);
                if x_api_key.is_none() {
                    x_api_key = Some(value.clone());
                }
            } else if *name == header::AUTHORIZATION {
                value.set_sensitive(true);
                if authorization.is_none() {
                    authorization = Some(value.clone());
                }
            }
            client_id |= *name == REQUEST_ID;
        }
        let id = new_id();
        // A client's own `request-id` (every value) goes: it is neither echoed nor forwarded.
        // Seen in the walk above: the removal (a hash and a probe, ~0.2k instructions) only
        // when there is one.
        if client_id {
            req.headers_mut().remove(REQUEST_ID);
        }
        // A blank `x-api-key` is no credential: it must not shadow an `Authorization` header
        // upstream either (where `x-api-key` is read first). Seen in the walk: no lookup.
        if x_api_key
            .as_ref()
            .is_some_and(|v| v.as_bytes().trim_ascii().is_empty())
        {
            req.headers_mut().remove(&X_API_KEY);
            x_api_key = None;
        }
        if self.remember_keys {
            KeyId::remember(&mut req, x_api_key.as_ref(), authorization.as_ref());
        }
        req.extensions_mut().insert(ProxyRequestId(id));
        // At DEBUG, as tower-http's default: free when the log is at INFO (the fields are
        // evaluated only when the span is enabled).
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            path = %req.uri().path(),
            request_id = %ProxyRequestId(id),
        );
        let start = (!span.is_disabled()).then(std::time::Instant::now);
        let inner = span.in_scope(|| {
            tracing::trace!(version = ?req.version(), headers = ?req.headers(), "request received");
            self.inner.call(req)
        });
        ResponseFuture {
            inner,
            id,
            span,
            start,
        }
    }
}

/// The future of [`Front`]: the answer, with a `request-id`, its body in the request's span.
#[pin_project]
#[derive(Debug)]
pub(crate) struct ResponseFuture<F> {
    #[pin]
    inner: F,
    id: Id,
    span: Span,
    /// When the request came, if the span is enabled.
    start: Option<std::time::Instant>,
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: std::fmt::Display,
{
    type Output = Result<Response<TracedBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let polled = {
            let _entered = this.span.enter();
            std::task::ready!(this.inner.poll(cx))
        };
        let mut resp = match polled {
            Ok(resp) => resp,
            Err(err) => {
                if let Some(start) = this.start {
                    this.span.in_scope(|| {
                        tracing::debug!(error = %err, latency = ?start.elapsed(), "response failed");
                    });
                }
                return Poll::Ready(Err(err));
            }
        };
        if !resp.headers().contains_key(REQUEST_ID) {
            resp.headers_mut().insert(REQUEST_ID, header_value(this.id));
        }
        if let Some(start) = *this.start {
            let latency = start.elapsed();
            let status = resp.status();
            this.span.in_scope(|| {
                if status.is_server_error() {
                    tracing::debug!(status = status.as_u16(), ?latency, "response failed");
                }
                tracing::debug!(
                    status = status.as_u16(),
                    ?latency,
                    "finished processing request"
                );
            });
        }
        let span = std::mem::replace(this.span, Span::none());
        let start = this.start.take();
        Poll::Ready(Ok(resp.map(|inner| TracedBody { inner, span, start })))
    }
}

/// An answer's body, polled in its request's span (see the module docs).
#[pin_project]
#[derive(Debug)]
pub(crate) struct TracedBody<B> {
    #[pin]
    inner: B,
    span: Span,
    /// When the request came, if the span is enabled; taken when the body ends or fails.
    start: Option<std::time::Instant>,
}

impl<B> Body for TracedBody<B>
where
    B: Body,
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        if this.start.is_some() {
            match &frame {
                Some(Err(err)) => {
                    if let Some(start) = this.start.take() {
                        let stream_duration = start.elapsed();
                        tracing::debug!(error = %err, ?stream_duration, "response failed");
                    }
                }
                Some(Ok(frame)) if !frame.is_trailers() && !this.inner.as_ref().is_end_stream() => {
                }
                _ => {
                    if let Some(start) = this.start.take() {
                        let stream_duration = start.elapsed();
                        tracing::debug!(?stream_duration, "end of stream");
                    }
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    #[test]
    fn request_ids_are_the_proxys_and_distinct() {
        let a = new_id();
        let b = new_id();
        let a = std::str::from_utf8(&a).unwrap();
        assert!(a.starts_with("req_proxy_") && a.len() == 34, "{a}");
        assert!(a[10..].bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a.as_bytes(), b);
    }

    /// Credentials arrive marked sensitive, every value; other headers do not.
    #[tokio::test]
    async fn credentials_are_sensitive() {
        let svc = FrontLayer::default().layer(tower::service_fn(|req: Request<()>| async move {
            for (name, value) in req.headers() {
                let secret = name == "x-api-key" || name == "authorization";
                assert_eq!(value.is_sensitive(), secret, "{name}");
            }
            assert_eq!(req.headers().get_all("x-api-key").iter().count(), 2);
            assert!(!format!("{:?}", req.headers()).contains("sk-"));
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }));
        let mut req = Request::new(());
        let h = req.headers_mut();
        h.append("x-api-key", HeaderValue::from_static("sk-one"));
        h.append("x-api-key", HeaderValue::from_static("sk-two"));
        h.insert("authorization", HeaderValue::from_static("Bearer sk-three"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        svc.oneshot(req).await.unwrap();
    }

    /// A blank `x-api-key` (every value) goes; with `remember_keys` the request carries its
    /// key's id from the walk (the memo `KeyId::of_request` reads, checked against the
    /// headers), without it none.
    #[tokio::test]
    async fn blank_keys_go_and_the_key_id_is_remembered() {
        use crate::anthropic::KeyId;
        for (remember, x_api_key, auth, expected) in [
            (true, Some("sk-one"), Some("Bearer sk-two"), Some("sk-one")),
            (true, Some("  "), Some("Bearer sk-two"), Some("sk-two")),
            (true, Some(""), None, None),
            (true, None, Some("bearer  sk-two "), Some("sk-two")),
            (true, None, Some("Basic sk-two"), None),
            (false, Some("sk-one"), None, Some("sk-one")),
        ] {
            let svc = FrontLayer::new(remember).layer(tower::service_fn(
                move |mut req: Request<()>| async move {
                    let blank = req
                        .headers()
                        .get_all("x-api-key")
                        .iter()
                        .any(|v| v.as_bytes().trim_ascii().is_empty());
                    assert!(!blank, "a blank x-api-key went through");
                    assert_eq!(
                        KeyId::remembered(&req),
                        remember && expected.is_some(),
                        "{x_api_key:?} {auth:?}"
                    );
                    let id = KeyId::of_request(&mut req);
                    assert_eq!(id, expected.map(KeyId::from_api_key));
                    // A key put in the headers afterwards is the one identified.
                    req.headers_mut()
                        .insert(&X_API_KEY, HeaderValue::from_static("sk-three"));
                    assert_eq!(
                        KeyId::of_request(&mut req),
                        Some(KeyId::from_api_key("sk-three"))
                    );
                    Ok::<_, std::convert::Infallible>(Response::new(()))
                },
            ));
            let mut req = Request::new(());
            if let Some(k) = x_api_key {
                req.headers_mut()
                    .append(&X_API_KEY, HeaderValue::from_static(k));
                req.headers_mut()
                    .append(&X_API_KEY, HeaderValue::from_static("sk-later"));
            }
            if let Some(a) = auth {
                req.headers_mut()
                    .insert(header::AUTHORIZATION, HeaderValue::from_static(a));
            }
            svc.oneshot(req).await.unwrap();
        }
    }

    /// One `request` span per request, with the method, the path and the id; the answer's head
    /// (and a 5xx as a failure) and the end of its body are events in it; none of it below
    /// DEBUG.
    #[tokio::test]
    async fn the_request_span_covers_the_answer_and_its_body() {
        use http_body_util::BodyExt;

        #[derive(Clone, Default)]
        struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Log {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        for level in [tracing::Level::DEBUG, tracing::Level::INFO] {
            let log = Log::default();
            let writer = log.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(level)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            let _default = tracing::subscriber::set_default(subscriber);
            let svc =
                FrontLayer::default().layer(tower::service_fn(|req: Request<()>| async move {
                    tracing::debug!(inner = true, "inside the layers");
                    let id = req
                        .extensions()
                        .get::<ProxyRequestId>()
                        .unwrap()
                        .to_string();
                    let mut resp = Response::new(http_body_util::Full::new(bytes::Bytes::from(id)));
                    *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
                    Ok::<_, std::convert::Infallible>(resp)
                }));
            let req = Request::post("/v1/messages").body(()).unwrap();
            let resp = svc.oneshot(req).await.unwrap();
            let id = resp.into_body().collect().await.unwrap().to_bytes();
            let id = std::str::from_utf8(&id).unwrap();
            let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
            if level == tracing::Level::INFO {
                assert_eq!(text, "", "nothing below DEBUG");
                continue;
            }
            let span = format!("request{{method=POST path=/v1/messages request_id={id}}}");
            let lines: Vec<&str> = text.lines().collect();
            for event in [
                "inside the layers",
                "response failed",
                "finished processing request",
                "end of stream",
            ] {
                let line = lines.iter().find(|l| l.contains(event));
                assert!(
                    line.is_some_and(|l| l.contains(&span)),
                    "{event} in {span}: {text}"
                );
            }
            assert!(text.contains("status=502"), "{text}");
        }
    }

    /// The inner service sees the proxy's id, never the client's header; an answer with an id
    /// keeps it, one without gets the id the inner service saw.
    #[tokio::test]
    async fn the_id_is_set_replaced_and_propagated() {
        let svc = FrontLayer::default().layer(tower::service_fn(
            |req: Request<&'static str>| async move {
                assert!(!req.headers().contains_key(REQUEST_ID));
                let seen = *req.extensions().get::<ProxyRequestId>().unwrap();
                let mut resp = Response::new(header_value(&seen.0));
                if *req.body() == "upstream" {
                    resp.headers_mut()
                        .insert(REQUEST_ID, HeaderValue::from_static("req_upstream"));
                }
                Ok::<_, std::convert::Infallible>(resp)
            },
        ));
        for body in ["own", "upstream"] {
            let mut req = Request::new(body);
            req.headers_mut()
                .append(REQUEST_ID, HeaderValue::from_static("client-1"));
            req.headers_mut()
                .append(REQUEST_ID, HeaderValue::from_static("client-2"));
            let resp = svc.clone().oneshot(req).await.unwrap();
            let seen = resp.body().inner.to_str().unwrap();
            assert!(seen.starts_with("req_proxy_") && seen.len() == 34, "{seen}");
            let answered: Vec<_> = resp.headers().get_all(REQUEST_ID).iter().collect();
            assert_eq!(answered.len(), 1);
            if body == "upstream" {
                assert_eq!(answered[0], "req_upstream");
            } else {
                assert_eq!(answered[0], seen);
            }
        }
    }
}
