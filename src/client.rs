//! [`HttpClient`]: the innermost service of a stack that talks to the real API.
//!
//! A hyper-util client over rustls (with the webpki root certificates compiled in: no native
//! certificate store needed) that sends every request to a base URL, by default
//! `https://api.anthropic.com`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::BoxError;
use crate::anthropic::{ApiError, ApiErrorKind};
use crate::body::RequestBody;

mod pool;

pub use pool::{Http1Pool, PoolError, PoolErrorKind};

/// The Anthropic API base URL.
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// A `tower::Service` that sends requests to a base URL over HTTP/1.1 or HTTP/2 (TLS via rustls).
///
/// It rewrites each request's scheme and authority to the base URL (keeping path and query),
/// drops hop-by-hop headers and `host`, and asks for an uncompressed answer
/// (`accept-encoding: identity`) because the layers above read usage from the response body.
/// A path that could leave the base URL's path (`..` or `.` segments, encoded slashes, `//`)
/// is refused with a 400 `invalid_request_error` and never sent. Pooled connections idle for
/// longer than [`pool_idle_timeout`](Self::pool_idle_timeout) (30 s by default) are closed,
/// and at most [`MAX_IDLE_PER_HOST`] idle ones are kept. An `https://` base goes through
/// hyper-util's pool (TLS, HTTP/2 when the server offers it); a plain `http://` base, always
/// HTTP/1.1 to one origin, through an [`Http1Pool`] (about 4k instructions per request less).
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
    // One `Arc`: the stack clones its innermost service for every request (hyper-util's
    // `Client` alone is several `Arc`s).
    inner: Arc<Inner>,
}

struct Inner {
    route: Route,
    base: Uri,
    /// The `host` header of every request to a plain `http://` base (always HTTP/1.1), made
    /// once: hyper-util formats it per request otherwise (`host:port`, ~2.2k instructions
    /// per request in callgrind). `None` for `https://`, where ALPN may choose HTTP/2, which
    /// names the host in `:authority` instead (hyper-util then sets `host` only on HTTP/1.1).
    host: Option<http::HeaderValue>,
}

/// How requests leave.
enum Route {
    /// A plain `http://` base: the pool of HTTP/1.1 connections to its one origin.
    Plain(Http1Pool<RequestBody>),
    /// An `https://` base: hyper-util's pool, over rustls (boxed: ten times the size of
    /// the other, and behind the client's `Arc` anyway).
    Tls(Box<Client<hyper_rustls::HttpsConnector<HttpConnector>, RequestBody>>),
}

impl Route {
    fn new(base: &Uri, idle: Duration) -> Self {
        match base.authority() {
            Some(authority) if base.scheme() == Some(&http::uri::Scheme::HTTP) => {
                Self::Plain(Http1Pool::configured(authority, idle, MAX_IDLE_PER_HOST))
            }
            _ => Self::Tls(Box::new(HttpClient::build(idle))),
        }
    }
}

/// The `host` header hyper-util writes for `base` on HTTP/1.1 (`host`, or `host:port` when
/// the port is not the scheme's default), for a plain `http://` base only.
fn host_header(base: &Uri) -> Option<http::HeaderValue> {
    if base.scheme() != Some(&http::uri::Scheme::HTTP) {
        return None;
    }
    let host = base.host()?;
    let value = match base.port_u16() {
        Some(80) | None => host.to_owned(),
        Some(port) => format!("{host}:{port}"),
    };
    http::HeaderValue::from_str(&value).ok()
}

/// How long an idle pooled upstream connection is kept by default. The pool looks for
/// expired connections once per this period, so an idle connection closes between one and
/// two periods after its last use: 30 s keeps a burst's sockets for at most a minute.
pub const DEFAULT_POOL_IDLE: Duration = Duration::from_secs(30);

/// The most idle connections kept per upstream host. A burst of 2,000 concurrent requests
/// left 1,000+ idle sockets in the pool (one file descriptor each) until they expired; past
/// this bound a connection that comes back to the pool is closed at once.
pub const MAX_IDLE_PER_HOST: usize = 256;

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("base", &self.inner.base)
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
        Self {
            inner: Arc::new(Inner {
                route: Route::new(&base, DEFAULT_POOL_IDLE),
                host: host_header(&base),
                base,
            }),
        }
    }

    /// Closes pooled connections that stayed idle for `idle` (default 60 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_claude::client::HttpClient;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let client = HttpClient::anthropic().pool_idle_timeout(Duration::from_secs(15));
    /// # drop(client);
    /// # }
    /// ```
    pub fn pool_idle_timeout(self, idle: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                route: Route::new(&self.inner.base, idle),
                base: self.inner.base.clone(),
                host: self.inner.host.clone(),
            }),
        }
    }

    fn build(idle: Duration) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, RequestBody> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        // The pool only expires idle connections with a timer: without one,
        // `pool_idle_timeout` is ignored and every socket of a burst stays open for good.
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle)
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .build(https)
    }

    /// The base URL.
    pub fn base_url(&self) -> String {
        self.inner.base.to_string()
    }

    /// The path and query `uri` has under the base URL, or the refusal of a path that could
    /// leave the base URL's.
    fn path_and_query(&self, uri: &Uri) -> Result<PathAndQuery, BoxError> {
        if let Err(reason) = check_path(uri.path()) {
            return Err(
                ApiError::new(ApiErrorKind::InvalidRequest, reason.message(uri.path())).into(),
            );
        }
        let prefix = self.inner.base.path().trim_end_matches('/');
        Ok(match uri.path_and_query() {
            // A base without a path (the API's, a local proxy's): the request's own path and
            // query, shared rather than formatted and parsed again.
            Some(pq) if prefix.is_empty() => pq.clone(),
            pq => {
                let pq = pq.map_or("/", PathAndQuery::as_str);
                format!("{prefix}{pq}").parse()?
            }
        })
    }

    /// The absolute URI `uri` has under the base URL (hyper-util's route takes absolute
    /// URIs; the plain route sends the origin form, [`path_and_query`](Self::path_and_query)).
    fn target(&self, uri: &Uri) -> Result<Uri, BoxError> {
        let base = &self.inner.base;
        let mut parts = http::uri::Parts::default();
        parts.scheme = base.scheme().cloned();
        parts.authority = base.authority().cloned();
        parts.path_and_query = Some(self.path_and_query(uri)?);
        Ok(Uri::from_parts(parts)?)
    }
}

/// Why a request path is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathRefusal {
    /// A `.` or `..` segment, plain or percent-encoded.
    DotSegment,
    /// An empty segment (`//`, or a trailing `/`).
    EmptySegment,
    /// A percent-encoded `/`, `\`, `%` (double encoding) or control byte, a raw `\`, or an
    /// invalid escape.
    Encoding,
}

impl PathRefusal {
    /// The message of the 400 `invalid_request_error`.
    pub(crate) fn message(self, path: &str) -> String {
        let what = match self {
            Self::DotSegment => "a `.` or `..` segment",
            Self::EmptySegment => "an empty segment (`//` or a trailing `/`)",
            Self::Encoding => "an encoded `/`, `\\` or `%`, a `\\`, a control byte or a bad escape",
        };
        // Only a bounded prefix of a hostile path goes back (and into logs).
        let shown: String = path.chars().take(200).collect();
        format!("the request path `{shown}` has {what}: it is refused rather than forwarded")
    }
}

/// Checks that `path` names one resource under the base URL: no dot segments (plain or
/// percent-encoded, any case), no empty segments, no encoded separators, no double encoding.
/// Such paths are refused rather than normalised: an API path never needs them, and a proxy
/// that normalises differently from the upstream is how `/v1/../admin` gets through.
pub(crate) fn check_path(path: &str) -> Result<(), PathRefusal> {
    // The common case in one pass over the bytes: `/a/b` with no `.`, `%` or `\\`, no `//`
    // and no trailing `/` (`/v1/messages`: ~60 instructions instead of ~460). Anything else
    // is decided by the segment walk below.
    if plain_path(path.as_bytes()) {
        return Ok(());
    }
    check_segments(path)
}

/// [`check_path`] segment by segment, for every path.
fn check_segments(path: &str) -> Result<(), PathRefusal> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathRefusal::EmptySegment);
    };
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(PathRefusal::EmptySegment);
        }
        if segment.contains('\\') {
            return Err(PathRefusal::Encoding);
        }
        // Decode only as far as needed: count dots, refuse encoded separators.
        let bytes = segment.as_bytes();
        let (mut i, mut dots, mut len) = (0, 0, 0);
        while i < bytes.len() {
            let b = if bytes[i] == b'%' {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathRefusal::Encoding);
                };
                i += 3;
                let b = (hi * 16 + lo) as u8;
                if matches!(b, b'/' | b'\\' | b'%') || b < 0x20 || b == 0x7f {
                    return Err(PathRefusal::Encoding);
                }
                b
            } else {
                i += 1;
                bytes[i - 1]
            };
            len += 1;
            dots += usize::from(b == b'.');
        }
        if dots == len && len <= 2 {
            return Err(PathRefusal::DotSegment);
        }
    }
    Ok(())
}

/// Whether `path` is `/` followed by non-empty segments of bytes other than `.`, `%` and
/// `\\`: such a path names one resource and [`check_path`] accepts it.
fn plain_path(path: &[u8]) -> bool {
    let [b'/', rest @ .., last] = path else {
        return false;
    };
    if *last == b'/' || matches!(*last, b'.' | b'%' | b'\\') {
        return false;
    }
    let mut after_slash = true;
    for &b in rest {
        match b {
            b'.' | b'%' | b'\\' => return false,
            b'/' if after_slash => return false,
            b'/' => after_slash = true,
            _ => after_slash = false,
        }
    }
    true
}

/// The request headers the client never sends on: the hop-by-hop ones (RFC 9110 section
/// 7.6.1; the first [`HOP_BY_HOP`]), then `host` and the framing headers, which hyper writes.
/// (A `static`: a `const` array of `HeaderName`s is built and dropped at every use.)
static NOT_FORWARDED: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::HOST,
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
];

/// How many of [`NOT_FORWARDED`] are hop-by-hop headers, which a proxy must not forward in
/// either direction. (Only the proxy removes them from an answer.)
#[cfg(any(feature = "proxy", test))]
const HOP_BY_HOP: usize = 7;

/// The index of `host` in [`NOT_FORWARDED`].
const HOST_INDEX: usize = 7;

/// Bit `n` is set when a name of [`NOT_FORWARDED`] is `n` bytes long.
const NOT_FORWARDED_LENGTHS: u32 = {
    let mut bits = 0u32;
    let mut i = 0;
    while i < NOT_FORWARDED_NAMES.len() {
        bits |= 1 << NOT_FORWARDED_NAMES[i].len();
        i += 1;
    }
    bits
};

/// The names of [`NOT_FORWARDED`], in its order.
const NOT_FORWARDED_NAMES: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "host",
    "transfer-encoding",
    "content-length",
];

/// Removes the names of [`NOT_FORWARDED`] whose bit is set in `which` from `headers`: one
/// pass over the headers, then one removal per name present (a removal per name looked each
/// up: ten lookups per request, about 1.2k instructions in callgrind, when one or two are
/// there).
#[cfg(any(feature = "proxy", test))]
fn remove_not_forwarded(headers: &mut HeaderMap, which: u16) {
    let mut present = 0u16;
    let mut connection = Connection::default();
    for (name, value) in headers.iter() {
        if let Some(i) = not_forwarded_index(name) {
            present |= 1 << i;
            if i == CONNECTION_INDEX {
                connection.see(value);
            }
        }
    }
    if which & (1 << CONNECTION_INDEX) != 0 {
        connection.remove_named(headers);
    }
    remove_present(headers, present & which);
}

/// The index of `connection` in [`NOT_FORWARDED`].
const CONNECTION_INDEX: usize = 0;

/// The index of `content-length` in [`NOT_FORWARDED`].
const CONTENT_LENGTH_INDEX: usize = 9;

/// The `connection` values a header walk saw: the names they list are hop-by-hop too (RFC 9110
/// section 7.6.1) and are removed with it. The first value is kept from the walk (a clone
/// shares its bytes); a second one, rare, sends [`remove_named`](Self::remove_named) back to
/// the map for all of them.
#[derive(Default)]
struct Connection {
    first: Option<http::HeaderValue>,
    more: bool,
}

impl Connection {
    fn see(&mut self, value: &http::HeaderValue) {
        if self.first.is_none() {
            self.first = Some(value.clone());
        } else {
            self.more = true;
        }
    }

    /// Removes the headers the `connection` values name, other than those of
    /// [`NOT_FORWARDED`] (removed by their bit). Allocates only when there are such names.
    fn remove_named(self, headers: &mut HeaderMap) {
        let Some(first) = self.first else {
            return;
        };
        let mut named: Vec<HeaderName> = Vec::new();
        let mut collect = |value: &http::HeaderValue| {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                // A name of `NOT_FORWARDED` is never collected (below): `keep-alive`, the
                // usual value, is passed over before `from_bytes`, which allocates a name
                // that is not a standard one (~0.25k instructions per answer).
                if token.is_empty() || is_not_forwarded_name(token) {
                    continue;
                }
                // `from_bytes` lowercases; a token that is no header name names nothing.
                let Ok(name) = HeaderName::from_bytes(token) else {
                    continue;
                };
                if not_forwarded_index(&name).is_none() {
                    named.push(name);
                }
            }
        };
        if self.more {
            for value in headers.get_all(header::CONNECTION) {
                collect(value);
            }
        } else {
            collect(&first);
        }
        for name in named {
            headers.remove(name);
        }
    }
}

/// Whether `value` is the plain decimal `len` (no sign, no leading zero, no space): a
/// `content-length` hyper would write itself for a body of `len` bytes.
fn is_length(value: &http::HeaderValue, len: u64) -> bool {
    let digits = value.as_bytes();
    if digits.is_empty() || digits.len() > 20 || (digits[0] == b'0' && digits.len() > 1) {
        return false;
    }
    let mut n = 0u64;
    for &d in digits {
        if !d.is_ascii_digit() {
            return false;
        }
        n = match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
        {
            Some(n) => n,
            None => return false,
        };
    }
    n == len
}

/// The index of `name` in [`NOT_FORWARDED`], told by equality with its names, never by
/// reading `name`'s text.
///
/// Nine of the ten are standard names, which `http` keeps as a one-byte tag: a standard
/// `name` is told by its tag, a custom one (`anthropic-ratelimit-…`, `request-id`) is
/// compared with `keep-alive` alone, by its length first. Matching `name.as_str()` instead
/// looked every standard name's text up in `http`'s table of names (`StandardHeader::as_str`:
/// 1.4 data-cache read misses per name, 22 per request, in callgrind's simulation) and
/// dispatched on the length through a jump table (6 mispredicted indirect jumps per request).
fn not_forwarded_index(name: &HeaderName) -> Option<usize> {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    Some(if *name == header::CONNECTION {
        0
    } else if *name == header::PROXY_AUTHENTICATE {
        2
    } else if *name == header::PROXY_AUTHORIZATION {
        3
    } else if *name == header::TE {
        4
    } else if *name == header::TRAILER {
        5
    } else if *name == header::UPGRADE {
        6
    } else if *name == header::HOST {
        7
    } else if *name == header::TRANSFER_ENCODING {
        8
    } else if *name == header::CONTENT_LENGTH {
        9
    } else if *name == KEEP_ALIVE {
        1
    } else {
        return None;
    })
}

/// Whether `token` (a `connection` value's token, in any case) is a name of
/// [`NOT_FORWARDED`], told without building a [`HeaderName`].
fn is_not_forwarded_name(token: &[u8]) -> bool {
    token.len() < 32
        && NOT_FORWARDED_LENGTHS & (1 << token.len()) != 0
        && NOT_FORWARDED_NAMES
            .iter()
            .any(|name| name.as_bytes().eq_ignore_ascii_case(token))
}

/// A request's headers made ready to leave: the names of [`NOT_FORWARDED`] whose bit is set in
/// `which` removed (with the names a `connection` header lists), and every `authorization` and
/// `x-api-key` value marked sensitive (kept out of logs and HPACK tables), in the same pass (a
/// lookup of each name to mark it cost ~0.25k instructions per request).
///
/// One exception: a single `content-length` that already says `body_len` in hyper's own form
/// stays (hyper sends it as it would have written it: the removal and hyper's insert cost
/// ~0.4k instructions per request). Any other, such as the client's length of a body that
/// fallback rewrote, goes, and hyper writes the body's.
fn prepare_request_headers(headers: &mut HeaderMap, which: u16, body_len: u64) {
    let mut present = 0u16;
    let mut connection = Connection::default();
    let mut lengths = 0u8;
    let mut length_is_the_bodys = false;
    for (name, value) in headers.iter_mut() {
        if let Some(i) = not_forwarded_index(name) {
            present |= 1 << i;
            if i == CONTENT_LENGTH_INDEX {
                lengths = lengths.saturating_add(1);
                length_is_the_bodys = is_length(value, body_len);
            } else if i == CONNECTION_INDEX {
                connection.see(value);
            }
        } else if *name == header::AUTHORIZATION
            || *name == crate::anthropic::parsed_names::X_API_KEY
        {
            value.set_sensitive(true);
        }
    }
    if lengths == 1 && length_is_the_bodys {
        present &= !(1 << CONTENT_LENGTH_INDEX);
    }
    if which & (1 << CONNECTION_INDEX) != 0 {
        connection.remove_named(headers);
    }
    remove_present(headers, present & which);
}

/// Removes the names of [`NOT_FORWARDED`] whose bit is set in `present`.
fn remove_present(headers: &mut HeaderMap, mut present: u16) {
    while present != 0 {
        headers.remove(&NOT_FORWARDED[present.trailing_zeros() as usize]);
        present &= present - 1;
    }
}

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1) that a proxy must not forward.
#[cfg(any(feature = "proxy", test))]
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    remove_not_forwarded(headers, (1 << HOP_BY_HOP) - 1);
}

impl tower_service::Service<Request<RequestBody>> for HttpClient {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pooled client is always ready; connection errors surface from `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        // Edited in place: taking the request apart and putting it back together moved its
        // head (264 bytes) once more.
        let uri = match &self.inner.route {
            Route::Plain(_) => self.path_and_query(req.uri()).map(Uri::from),
            Route::Tls(_) => self.target(req.uri()),
        };
        *req.uri_mut() = match uri {
            Ok(uri) => uri,
            Err(refused) => {
                return ResponseFuture {
                    state: State::Refused(Some(refused)),
                };
            }
        };
        *req.version_mut() = http::Version::HTTP_11;
        let all = (1 << NOT_FORWARDED.len()) - 1;
        let body_len = req.body().len() as u64;
        let headers = req.headers_mut();
        // Keys stay out of logs (`Debug` shows `Sensitive`) and out of HPACK tables: marked
        // in the same pass.
        match &self.inner.host {
            // A client's `host` is replaced in place rather than removed and written again.
            Some(host) => {
                prepare_request_headers(headers, all & !(1 << HOST_INDEX), body_len);
                headers.insert(header::HOST, host.clone());
            }
            None => prepare_request_headers(headers, all, body_len),
        }
        headers.insert(
            header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
        // Either future does nothing until polled.
        ResponseFuture {
            state: match &self.inner.route {
                Route::Plain(pool) => State::Pooled(Box::pin(pool.send(req))),
                Route::Tls(client) => State::Sent(client.request(req)),
            },
        }
    }
}

/// Response future of [`HttpClient`]: the upstream's answer, or the refusal of a path that
/// could leave the base URL's (a 400 `invalid_request_error`, nothing sent).
pub struct ResponseFuture {
    state: State,
}

enum State {
    Refused(Option<BoxError>),
    Sent(hyper_util::client::legacy::ResponseFuture),
    Pooled(PooledFuture),
}

/// The future of [`Http1Pool::send`], boxed (an `async fn`'s future has no name).
type PooledFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Incoming>, PoolError>> + Send>,
>;

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl std::future::Future for ResponseFuture {
    type Output = Result<Response<Incoming>, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every state is `Unpin` (the futures are boxes).
        match &mut self.get_mut().state {
            State::Refused(refused) => Poll::Ready(Err(refused
                .take()
                .unwrap_or_else(|| "HttpClient's future polled after it ended".into()))),
            State::Sent(sent) => std::pin::Pin::new(sent).poll(cx).map_err(BoxError::from),
            State::Pooled(sent) => sent.as_mut().poll(cx).map_err(BoxError::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_their_place_are_refused() {
        for ok in [
            "/",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/v1/models/claude-opus-4-1",
            "/v1/messages/batches/msgbatch_01.x",
            "/v1/files/a..b",
            "/v1/x%20y",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
            assert_eq!(check_segments(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("/v1/../admin", PathRefusal::DotSegment),
            ("/v1/./messages", PathRefusal::DotSegment),
            ("/v1/%2e%2e/admin", PathRefusal::DotSegment),
            ("/v1/%2E%2e/admin", PathRefusal::DotSegment),
            ("/v1/.%2e/admin", PathRefusal::DotSegment),
            ("/v1/%2e/admin", PathRefusal::DotSegment),
            ("/v1/..", PathRefusal::DotSegment),
            ("/v1//messages", PathRefusal::EmptySegment),
            ("/v1/messages/", PathRefusal::EmptySegment),
            ("//v1/messages", PathRefusal::EmptySegment),
            ("/v1/..%2fadmin", PathRefusal::Encoding),
            ("/v1/%2F..", PathRefusal::Encoding),
            ("/v1/%5c..", PathRefusal::Encoding),
            ("/v1/%252e%252e/admin", PathRefusal::Encoding),
            ("/v1/%zz", PathRefusal::Encoding),
            ("/v1/%2", PathRefusal::Encoding),
            ("/v1/%00", PathRefusal::Encoding),
            ("/v1/a\\..", PathRefusal::Encoding),
            ("v1/messages", PathRefusal::EmptySegment),
        ] {
            assert_eq!(check_path(bad), Err(why), "{bad}");
            assert!(!plain_path(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn the_plain_path_shortcut_accepts_only_what_the_segment_walk_accepts() {
        // Every path of up to five bytes over an alphabet of the bytes that matter.
        let alphabet = [b'/', b'.', b'%', b'2', b'e', b'\\', b'a'];
        let mut paths = vec![Vec::new()];
        for _ in 0..5 {
            let longer: Vec<Vec<u8>> = paths
                .iter()
                .flat_map(|p| {
                    alphabet.iter().map(move |&b| {
                        let mut q = p.clone();
                        q.push(b);
                        q
                    })
                })
                .collect();
            paths.extend(longer);
        }
        let mut plain = 0;
        for path in &paths {
            let text = std::str::from_utf8(path).unwrap();
            if plain_path(path) {
                plain += 1;
                assert_eq!(check_segments(text), Ok(()), "{text}");
            }
            assert_eq!(
                check_path(text),
                check_segments(text),
                "{text}: the shortcut changed the answer"
            );
        }
        assert!(plain > 10, "the shortcut is taken ({plain} paths)");
    }

    #[test]
    fn the_host_header_is_made_once_for_plain_http_bases_only() {
        let host = |base: &str| host_header(&base.parse().unwrap());
        assert_eq!(host("http://127.0.0.1:9").unwrap(), "127.0.0.1:9");
        assert_eq!(host("http://gateway.local").unwrap(), "gateway.local");
        assert_eq!(
            host("http://gateway.local:80/prefix").unwrap(),
            "gateway.local"
        );
        assert_eq!(host("http://[::1]:8080").unwrap(), "[::1]:8080");
        assert_eq!(host("https://api.anthropic.com"), None);
    }

    #[test]
    fn every_header_not_forwarded_is_removed_and_only_those() {
        let mut headers = HeaderMap::new();
        for name in &NOT_FORWARDED {
            headers.append(name, http::HeaderValue::from_static("x"));
        }
        headers.append(header::CONNECTION, http::HeaderValue::from_static("y"));
        headers.insert("x-api-key", http::HeaderValue::from_static("k"));
        headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("t"));
        let mut hop = headers.clone();
        remove_hop_by_hop(&mut hop);
        for (i, name) in NOT_FORWARDED.iter().enumerate() {
            assert_eq!(not_forwarded_index(name), Some(i));
            // A name as parsed from the wire, in any case, is the same name.
            let parsed = HeaderName::from_bytes(name.as_str().to_uppercase().as_bytes()).unwrap();
            assert_eq!(not_forwarded_index(&parsed), Some(i), "{name}");
            assert_eq!(NOT_FORWARDED_NAMES[i], name.as_str());
            assert_eq!(i == HOST_INDEX, name == header::HOST);
            assert_eq!(hop.contains_key(name), i >= HOP_BY_HOP, "{name}");
        }
        // Names of the same lengths as some of the list (standard and not) are not in it.
        for other in [
            "date",
            "request-id",
            "x-proxy-authorize",
            "te-",
            "x-",
            "expect",
            "vary",
        ] {
            let other = HeaderName::from_bytes(other.as_bytes()).unwrap();
            assert_eq!(not_forwarded_index(&other), None, "{other}");
        }
        remove_not_forwarded(&mut headers, (1 << NOT_FORWARDED.len()) - 1);
        let mut left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-api-key"]);
    }

    #[test]
    fn request_headers_lose_what_is_not_forwarded_and_keys_turn_sensitive() {
        let mut headers = HeaderMap::new();
        for name in &NOT_FORWARDED {
            headers.append(name, http::HeaderValue::from_static("x"));
        }
        headers.append("x-api-key", http::HeaderValue::from_static("k1"));
        headers.append("x-api-key", http::HeaderValue::from_static("k2"));
        headers.insert(
            header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer t"),
        );
        headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("t"));
        let all = (1 << NOT_FORWARDED.len()) - 1;
        prepare_request_headers(&mut headers, all & !(1 << HOST_INDEX), 1);
        let mut left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type", "host", "x-api-key"]);
        assert!(
            headers
                .get_all("x-api-key")
                .iter()
                .all(|v| v.is_sensitive())
        );
        assert_eq!(headers.get_all("x-api-key").iter().count(), 2);
        assert!(headers[header::AUTHORIZATION].is_sensitive());
        assert!(!headers[header::CONTENT_TYPE].is_sensitive());
        assert!(!headers[header::HOST].is_sensitive());
    }

    #[test]
    fn names_a_connection_header_lists_are_removed_too() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            http::HeaderValue::from_static("keep-alive, X-Hop-One ,,upgrade"),
        );
        headers.append(
            header::CONNECTION,
            http::HeaderValue::from_static("x-hop-two"),
        );
        headers.insert("x-hop-one", http::HeaderValue::from_static("1"));
        headers.insert("x-hop-two", http::HeaderValue::from_static("2"));
        headers.insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", http::HeaderValue::from_static("3"));
        let mut answer = headers.clone();
        remove_hop_by_hop(&mut answer);
        let left: Vec<_> = answer.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
        // One `connection` value: read from the walk.
        let mut one = HeaderMap::new();
        one.insert(header::CONNECTION, http::HeaderValue::from_static("x-hop"));
        one.insert("x-hop", http::HeaderValue::from_static("1"));
        one.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("t"));
        let mut request = one.clone();
        remove_hop_by_hop(&mut one);
        prepare_request_headers(&mut request, (1 << NOT_FORWARDED.len()) - 1, 0);
        for left in [one, request] {
            let left: Vec<_> = left.keys().map(HeaderName::as_str).collect();
            assert_eq!(left, ["content-type"]);
        }
    }

    #[test]
    fn a_connection_token_is_told_a_name_of_not_forwarded_in_any_case() {
        for name in NOT_FORWARDED_NAMES {
            assert!(is_not_forwarded_name(name.as_bytes()), "{name}");
            let upper = name.to_ascii_uppercase();
            assert!(is_not_forwarded_name(upper.as_bytes()), "{upper}");
        }
        for token in ["keep-alivex", "keep-aliv", "close", "x-hop", "", "tee"] {
            assert!(!is_not_forwarded_name(token.as_bytes()), "{token}");
        }
        assert!(!is_not_forwarded_name(&[b'a'; 40]));
    }

    #[test]
    fn a_content_length_stays_only_when_it_is_the_bodys_as_hyper_writes_it() {
        let all = (1 << NOT_FORWARDED.len()) - 1;
        for (values, body_len, kept) in [
            (&["5"][..], 5, true),
            (&["0"], 0, true),
            (&["18446744073709551615"], u64::MAX, true),
            (&["6"], 5, false),
            (&["05"], 5, false),
            (&["+5"], 5, false),
            (&[" 5"], 5, false),
            (&["5", "5"], 5, false),
            (&[""], 0, false),
            (&["18446744073709551616"], 0, false),
        ] {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::CONTENT_LENGTH, http::HeaderValue::from_static(v));
            }
            prepare_request_headers(&mut headers, all, body_len);
            let left: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
            assert_eq!(left.len(), usize::from(kept), "{values:?} {body_len}");
        }
    }

    #[tokio::test]
    async fn a_base_without_a_path_keeps_the_request_path_and_query() {
        let client = HttpClient::new("http://127.0.0.1:9".parse().unwrap());
        let t = client
            .target(&"/v1/messages?beta=true".parse().unwrap())
            .unwrap();
        assert_eq!(t, "http://127.0.0.1:9/v1/messages?beta=true");
        let t = client.target(&"/v1/messages".parse().unwrap()).unwrap();
        assert_eq!(t, "http://127.0.0.1:9/v1/messages");
    }

    #[tokio::test]
    async fn a_prefixed_base_never_gets_a_path_outside_its_prefix() {
        let client = HttpClient::new("http://127.0.0.1:9/prefix".parse().unwrap());
        let t = client
            .target(&"/v1/messages?beta=true".parse().unwrap())
            .unwrap();
        assert_eq!(t, "http://127.0.0.1:9/prefix/v1/messages?beta=true");
        let err = client
            .target(&"/v1/../../../admin/keys".parse().unwrap())
            .unwrap_err();
        let api = err.downcast_ref::<ApiError>().expect("an API error");
        assert_eq!(api.kind(), ApiErrorKind::InvalidRequest);
    }
}
