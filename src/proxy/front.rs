//! The front of the proxy's stack, in one layer: what tower-http's
//! `SetSensitiveRequestHeaders`, `SetRequestId` and `PropagateRequestId` did, with the removal
//! of a client's own id between them.
//!
//! - `x-api-key` and `authorization` are marked `Sensitive` (in every Debug, log and span), in
//!   one walk over the headers (tower-http looked each name up with `entry`: a hash and a
//!   probe per name, ~0.36k instructions per request).
//! - A client's `request-id` is removed (it would be echoed unchecked).
//! - The proxy's own `req_proxy_<24 hex>` goes on the request as a [`ProxyRequestId`]
//!   extension, for the `request` span and the handler's log (not as a header, which the
//!   handler would have to remove again before the upstream).
//! - An answer that carries a `request-id` (the upstream's) keeps it; any other answer (the
//!   proxy's own: routes, refusals, errors, a panic) gets the proxy's id.
//!
//! The id is kept as 34 bytes and made a header value only for an answer without one:
//! tower-http's pair made a header value for every request, cloned it twice (each clone of a
//! fresh `Bytes` allocates) and inserted a `RequestId` extension on the request and on the
//! answer, which nothing in the proxy reads; the handler then removed the header.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response, header};
use pin_project::pin_project;

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
pub(crate) struct FrontLayer;

impl<S> tower::Layer<S> for FrontLayer {
    type Service = Front<S>;

    fn layer(&self, inner: S) -> Front<S> {
        Front { inner }
    }
}

/// The service of [`FrontLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Front<S> {
    inner: S,
}

impl<S, B, ResB> tower::Service<Request<B>> for Front<S>
where
    S: tower::Service<Request<B>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut client_id = false;
        for (name, value) in req.headers_mut().iter_mut() {
            if *name == header::AUTHORIZATION || *name == X_API_KEY {
                value.set_sensitive(true);
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
        req.extensions_mut().insert(ProxyRequestId(id));
        ResponseFuture {
            inner: self.inner.call(req),
            id,
        }
    }
}

/// The future of [`Front`]: the answer, with a `request-id`.
#[pin_project]
#[derive(Debug)]
pub(crate) struct ResponseFuture<F> {
    #[pin]
    inner: F,
    id: Id,
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.inner.poll(cx))?;
        if !resp.headers().contains_key(REQUEST_ID) {
            resp.headers_mut().insert(REQUEST_ID, header_value(this.id));
        }
        Poll::Ready(Ok(resp))
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
        let svc = FrontLayer.layer(tower::service_fn(|req: Request<()>| async move {
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

    /// The inner service sees the proxy's id, never the client's header; an answer with an id
    /// keeps it, one without gets the id the inner service saw.
    #[tokio::test]
    async fn the_id_is_set_replaced_and_propagated() {
        let svc = FrontLayer.layer(tower::service_fn(|req: Request<&'static str>| async move {
            assert!(!req.headers().contains_key(REQUEST_ID));
            let seen = *req.extensions().get::<ProxyRequestId>().unwrap();
            let mut resp = Response::new(header_value(&seen.0));
            if *req.body() == "upstream" {
                resp.headers_mut()
                    .insert(REQUEST_ID, HeaderValue::from_static("req_upstream"));
            }
            Ok::<_, std::convert::Infallible>(resp)
        }));
        for body in ["own", "upstream"] {
            let mut req = Request::new(body);
            req.headers_mut()
                .append(REQUEST_ID, HeaderValue::from_static("client-1"));
            req.headers_mut()
                .append(REQUEST_ID, HeaderValue::from_static("client-2"));
            let resp = svc.clone().oneshot(req).await.unwrap();
            let seen = resp.body().to_str().unwrap();
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
