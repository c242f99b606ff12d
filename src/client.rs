//! [`HttpClient`]: the innermost service of a stack that talks to the real API.
//!
//! A hyper-util client over rustls (with the webpki root certificates compiled in: no native
//! certificate store needed) that sends every request to a base URL, by default
//! `https://api.anthropic.com`.

use std::task::{Context, Poll};

use http::header::{self, HeaderName};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::BoxError;
use crate::body::RequestBody;

/// The Anthropic API base URL.
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// A `tower::Service` that sends requests to a base URL over HTTP/1.1 or HTTP/2 (TLS via rustls).
///
/// It rewrites each request's scheme and authority to the base URL (keeping path and query),
/// drops hop-by-hop headers and `host`, and asks for an uncompressed answer
/// (`accept-encoding: identity`) because the layers above read usage from the response body.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_claude::client::HttpClient;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let client = HttpClient::anthropic();
/// let local = HttpClient::new("http://127.0.0.1:9000".parse().unwrap());
/// assert_eq!(local.base_url(), "http://127.0.0.1:9000/");
/// # }
/// ```
#[derive(Clone)]
pub struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, RequestBody>,
    base: Uri,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client for `https://api.anthropic.com`.
    pub fn anthropic() -> Self {
        Self::new(Uri::from_static(ANTHROPIC_BASE_URL))
    }

    /// A client for any `http://` or `https://` base URL. A path in the base URL is kept as a
    /// prefix (for gateways mounted under a path).
    pub fn new(base: Uri) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build(https);
        Self { client, base }
    }

    /// The base URL.
    pub fn base_url(&self) -> String {
        self.base.to_string()
    }

    fn target(&self, uri: &Uri) -> Result<Uri, BoxError> {
        let prefix = self.base.path().trim_end_matches('/');
        let pq = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(format!("{prefix}{pq}").parse()?);
        Ok(Uri::from_parts(parts)?)
    }
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) that a proxy must not forward.
pub(crate) const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

impl tower_service::Service<Request<RequestBody>> for HttpClient {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Incoming>, BoxError>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pooled client is always ready; connection errors surface from `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let target = self.target(&parts.uri);
        let client = self.client.clone();
        // Boxed: hyper-util's `ResponseFuture` is nameable but the URI rewrite can fail first;
        // one allocation per upstream call is noise next to a network round trip.
        Box::pin(async move {
            parts.uri = target?;
            parts.version = http::Version::HTTP_11;
            for name in HOP_BY_HOP.iter().chain([
                &header::HOST,
                &header::TRANSFER_ENCODING,
                &header::CONTENT_LENGTH,
            ]) {
                parts.headers.remove(name);
            }
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            );
            let resp = client
                .request(Request::from_parts(parts, body))
                .await
                .map_err(BoxError::from)?;
            Ok(resp)
        })
    }
}
