//! A bridge for `reqwest` clients (feature `reqwest`): [`ClaudeMiddleware`] is a
//! [`reqwest_middleware::Middleware`] that sends each request through a
//! [`ClaudeStack`](crate::stack::ClaudeStack) (or any `Service<http::Request<RequestBody>>`),
//! so a client built on `reqwest` gets the same rate limiting, retries, fallback and cache as
//! a Tower one, without changing how it builds requests.
//!
//! The middleware is terminal: it answers every request from the service and never calls
//! the next middleware or reqwest's own connection pool (the stack's inner service, e.g.
//! [`HttpClient`](crate::client::HttpClient), does the sending). Put it **last** in the
//! `reqwest_middleware::ClientBuilder`. The `reqwest::Client` it wraps is only used to build
//! requests, so it needs no TLS features of its own.
//!
//! Per request:
//! * the body is buffered once by [`BufferBody`](crate::body::BufferBody) (32 MB limit, as the
//!   API), so retry and fallback can replay it;
//! * the reqwest request extensions (`ClientWithMiddleware::post(..).with_extension(..)`)
//!   become request extensions, so [`Deadline`](crate::retry::Deadline) and
//!   [`NoFallback`](crate::fallback::NoFallback) work per request;
//! * the response keeps its status, headers, streaming body and extensions: a layer's
//!   [`ServedModel`](crate::fallback::ServedModel) or [`RetryInfo`](crate::retry::RetryInfo)
//!   is in `reqwest::Response::extensions()`;
//! * a stack error (no HTTP answer: a spend cap, a connection error after the retries, a
//!   request over 32 MB) is a `reqwest_middleware::Error::Middleware` holding a
//!   [`BridgeError`]; its [`source`](std::error::Error::source) is the stack's error.
//!
//! ```
//! use tower_claude::reqwest::ClaudeMiddleware;
//! use tower_claude::stack::{ClaudeStack, StackConfig};
//!
//! # #[cfg(feature = "testing")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_claude::BoxError> {
//! // The inner service here is the in-process simulator; in production it is
//! // `tower_claude::client::HttpClient::anthropic()` (feature `client`).
//! let upstream = tower_claude::testing::MockClaude::builder().build();
//! let stack = ClaudeStack::from_config(&StackConfig::default())?;
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(ClaudeMiddleware::new(stack.service(upstream)))
//!     .build();
//!
//! let response = client
//!     .post("https://api.anthropic.com/v1/messages")
//!     .header("x-api-key", "sk-ant-example")
//!     .header("anthropic-version", "2023-06-01")
//!     .body(r#"{"model":"claude-haiku-4-5","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}"#)
//!     .send()
//!     .await?;
//! assert_eq!(response.status(), 200);
//! let served = response.extensions().get::<tower_claude::fallback::ServedModel>().unwrap();
//! assert_eq!(&*served.served, "claude-haiku-4-5");
//! let text = response.text().await?;
//! assert!(text.contains(r#""type":"message""#));
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Extensions, Request, Response};
use http_body::{Body, Frame, SizeHint};
use sync_wrapper::SyncWrapper;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::BoxError;
use crate::body::{BufferBodyLayer, RequestBody};
use crate::stack::{ClaudeBody, boxed};

/// A [`reqwest_middleware::Middleware`] that answers each request from a Tower service (a
/// [`ClaudeStack`](crate::stack::ClaudeStack) around an HTTP client, typically). See the
/// [module docs](self).
#[derive(Clone)]
pub struct ClaudeMiddleware {
    /// Boxed with its body buffering: the boxed future keeps `handle`'s future `Send` (the
    /// higher-ranked `Into<BoxError>` bounds of a generic future defeat rustc's proof).
    service: BoxCloneSyncService<Request<::reqwest::Body>, Response<ClaudeBody>, BoxError>,
}

impl fmt::Debug for ClaudeMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaudeMiddleware").finish_non_exhaustive()
    }
}

impl ClaudeMiddleware {
    /// A middleware sending every request through `service`, e.g.
    /// `ClaudeStack::from_config(&config)?.service(HttpClient::anthropic())`. Request bodies
    /// are buffered with the API's 32 MB limit.
    ///
    /// ```
    /// use tower_claude::reqwest::ClaudeMiddleware;
    /// use tower_claude::retry::RetryLayer;
    ///
    /// # #[cfg(feature = "client")]
    /// # fn main() {
    /// // Any layer of the crate, or a whole stack, over any inner service.
    /// let service = tower::ServiceBuilder::new()
    ///     .layer(RetryLayer::new())
    ///     .service(tower_claude::client::HttpClient::anthropic());
    /// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
    ///     .with(ClaudeMiddleware::new(service))
    ///     .build();
    /// # drop(client);
    /// # }
    /// # #[cfg(not(feature = "client"))]
    /// # fn main() {}
    /// ```
    pub fn new<S, B>(service: S) -> Self
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            service: BoxCloneSyncService::new(BufferBodyLayer::default().layer(boxed(service))),
        }
    }

    /// Sends one request through the service.
    async fn send(
        &self,
        req: ::reqwest::Request,
        extensions: &mut Extensions,
    ) -> Result<::reqwest::Response, BridgeError> {
        let url = req.url().clone();
        let mut request: Request<::reqwest::Body> =
            Request::try_from(req).map_err(|e| BridgeError::new(BridgeErrorKind::Request, e))?;
        request.extensions_mut().extend(std::mem::take(extensions));
        let response = self
            .service
            .clone()
            .oneshot(request)
            .await
            .map_err(|e| BridgeError::new(BridgeErrorKind::Service, e))?;
        Ok(into_reqwest(response, url))
    }
}

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for ClaudeMiddleware {
    async fn handle(
        &self,
        req: ::reqwest::Request,
        extensions: &mut Extensions,
        _next: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<::reqwest::Response> {
        self.send(req, extensions)
            .await
            .map_err(reqwest_middleware::Error::middleware)
    }
}

/// A stack response as a `reqwest::Response`: status, headers, extensions and the body,
/// still streaming.
fn into_reqwest(response: Response<ClaudeBody>, url: ::reqwest::Url) -> ::reqwest::Response {
    use ::reqwest::ResponseBuilderExt as _;
    let (parts, body) = response.into_parts();
    let mut builder = http::Response::builder()
        .status(parts.status)
        .version(parts.version)
        .url(url);
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers;
    }
    if let Some(extensions) = builder.extensions_mut() {
        extensions.extend(parts.extensions);
    }
    let body = ::reqwest::Body::wrap(SyncBody(SyncWrapper::new(body)));
    match builder.body(body) {
        Ok(response) => ::reqwest::Response::from(response),
        // Every part was valid in the response it came from: unreachable in practice, but a
        // bridge must not panic.
        Err(err) => {
            let mut response = http::Response::new(::reqwest::Body::from(err.to_string()));
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            ::reqwest::Response::from(response)
        }
    }
}

/// The stack's response body made `Sync`, as `reqwest::Body::wrap` needs: the body is only
/// ever polled through `&mut`, which [`SyncWrapper`] makes shareable without `unsafe` here.
struct SyncBody(SyncWrapper<ClaudeBody>);

impl Body for SyncBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(self.get_mut().0.get_mut()).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        // `SyncWrapper` gives no shared access: the hint is unknown (reqwest does not need it).
        SizeHint::default()
    }
}

/// What went wrong in [`ClaudeMiddleware`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BridgeErrorKind {
    /// The reqwest request could not be turned into an `http::Request` (an invalid URL, say).
    Request,
    /// The service failed without an HTTP answer: its error is the [`source`](std::error::Error::source)
    /// (a [`RetryError`](crate::retry::RetryError) for a spend cap, a
    /// [`BufferBodyError`](crate::body::BufferBodyError) for a body over 32 MB, ...).
    Service,
}

/// The error [`ClaudeMiddleware`] returns inside `reqwest_middleware::Error::Middleware`.
///
/// ```
/// use tower_claude::reqwest::{BridgeError, BridgeErrorKind};
///
/// fn explain(err: &reqwest_middleware::Error) -> Option<BridgeErrorKind> {
///     match err {
///         reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<BridgeError>().map(|b| b.kind()),
///         reqwest_middleware::Error::Reqwest(_) => None,
///     }
/// }
/// # let _ = explain;
/// ```
#[derive(Debug)]
pub struct BridgeError {
    kind: BridgeErrorKind,
    source: BoxError,
}

impl BridgeError {
    fn new(kind: BridgeErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> BridgeErrorKind {
        self.kind
    }
}

impl fmt::Display for BridgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            BridgeErrorKind::Request => {
                write!(f, "cannot convert the reqwest request: {}", self.source)
            }
            BridgeErrorKind::Service => write!(f, "{}", self.source),
        }
    }
}

impl std::error::Error for BridgeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
