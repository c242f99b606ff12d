//! [`Http1Pool`]: keep-alive HTTP/1.1 connections to one plain `http://` origin.
//!
//! Hand-written rather than hyper-util's legacy pool because a proxy talks to one origin, and
//! that pool is built for many: it keeps its idle lists in a `HashMap` keyed by
//! `(Scheme, Authority)`, hashed with SipHash at every checkout and every return; with one
//! upstream connection the list empties at each checkout, so its entry is removed and
//! inserted again; and each connection travels wrapped in `Pooled` with its `Extra` through a
//! boxed future. Here the pool is a `VecDeque` behind a mutex, with the same guarantees:
//! keep-alive, an idle timeout, a bound on the idle connections kept, a connection that
//! failed or closed never reused, and a request sent again only when hyper gave it back
//! unsent. `docs/benchmarks.md` ("The proxy's edge, third pass (ed14)") has the measurements.
//! `https://` stays on hyper-util (TLS, and HTTP/2 chosen by ALPN).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::BoxError;

/// Keep-alive HTTP/1.1 connections to one plain `http://` origin (no TLS, no HTTP/2), for
/// a service that sends every request to the same place (`claude-proxy`'s upstream).
///
/// [`send`](Self::send) takes the most recently used idle connection that is still open
/// and younger than the [idle timeout](Self::idle_timeout), or opens a new one; a
/// connection goes back to the pool once it can take the next request (at once for an
/// answer whose body is already read, else when its body ends). A request that hyper hands
/// back unsent (the connection closed under it) is sent on another connection; a request
/// that may have left is never sent again. A background task closes connections idle for
/// longer than the timeout (between one and two timeouts after their last use), and at most
/// [`max_idle`](Self::max_idle) idle connections are kept. Requests must be in origin form
/// (`/path?query`) and carry a `host` header: the pool sends them as they are.
///
/// ```no_run
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower_claude::client::Http1Pool;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_claude::BoxError> {
/// let pool = Http1Pool::<Full<Bytes>>::new(&"127.0.0.1:8080".parse()?);
/// let req = http::Request::post("/v1/messages")
///     .header("host", "127.0.0.1:8080")
///     .body(Full::new(Bytes::from_static(b"{}")))?;
/// let answer = pool.send(req).await?;
/// let body = answer.into_body().collect().await?.to_bytes();
/// # drop(body);
/// # Ok(())
/// # }
/// ```
pub struct Http1Pool<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Http1Pool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<B> std::fmt::Debug for Http1Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool")
            .field("host", &self.inner.host)
            .field("port", &self.inner.port)
            .field("idle_timeout", &self.inner.idle_timeout)
            .field("max_idle", &self.inner.max_idle)
            .finish_non_exhaustive()
    }
}

struct Inner<B> {
    /// The host to connect to (an IPv6 literal without its brackets) and the port.
    host: String,
    port: u16,
    /// Idle connections, the most recently returned last (taken first); the oldest first
    /// (expired first).
    idle: Mutex<VecDeque<Idle<B>>>,
    idle_timeout: Duration,
    max_idle: usize,
    /// Whether the task that closes expired idle connections runs.
    sweeping: AtomicBool,
}

/// An idle connection and when it became idle.
struct Idle<B> {
    tx: SendRequest<B>,
    since: Instant,
}

impl<B> Http1Pool<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool of connections to `authority` (`host:port`; port 80 when none is given), with
    /// the defaults of [`HttpClient`](super::HttpClient): idle connections closed after
    /// [`DEFAULT_POOL_IDLE`](super::DEFAULT_POOL_IDLE), at most
    /// [`MAX_IDLE_PER_HOST`](super::MAX_IDLE_PER_HOST) kept.
    ///
    /// ```
    /// use tower_claude::client::Http1Pool;
    ///
    /// let pool = Http1Pool::<String>::new(&"[::1]:9000".parse().unwrap());
    /// assert_eq!(pool.idle_count(), 0);
    /// ```
    pub fn new(authority: &http::uri::Authority) -> Self {
        Self::configured(
            authority,
            super::DEFAULT_POOL_IDLE,
            super::MAX_IDLE_PER_HOST,
        )
    }

    /// [`new`](Self::new) with an idle timeout and a bound on idle connections.
    pub(crate) fn configured(
        authority: &http::uri::Authority,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Self::build(
            host.to_owned(),
            authority.port_u16().unwrap_or(80),
            idle_timeout,
            max_idle,
        )
    }

    fn build(host: String, port: u16, idle_timeout: Duration, max_idle: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                host,
                port,
                idle: Mutex::new(VecDeque::new()),
                idle_timeout,
                max_idle,
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Closes connections idle for longer than `idle` (a new, empty pool with that timeout).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_claude::client::Http1Pool;
    ///
    /// let pool = Http1Pool::<String>::new(&"127.0.0.1:9000".parse().unwrap())
    ///     .idle_timeout(Duration::from_secs(5));
    /// # drop(pool);
    /// ```
    pub fn idle_timeout(self, idle: Duration) -> Self {
        Self::build(
            self.inner.host.clone(),
            self.inner.port,
            idle,
            self.inner.max_idle,
        )
    }

    /// Keeps at most `max` idle connections (a new, empty pool with that bound); a
    /// connection that comes back to a full pool is closed.
    ///
    /// ```
    /// use tower_claude::client::Http1Pool;
    ///
    /// let pool = Http1Pool::<String>::new(&"127.0.0.1:9000".parse().unwrap()).max_idle(8);
    /// # drop(pool);
    /// ```
    pub fn max_idle(self, max: usize) -> Self {
        Self::build(
            self.inner.host.clone(),
            self.inner.port,
            self.inner.idle_timeout,
            max,
        )
    }

    /// How many idle connections the pool holds now.
    pub fn idle_count(&self) -> usize {
        self.inner.lock().len()
    }

    /// Sends `req` (origin form, with a `host` header) on an idle connection or a new one;
    /// the answer's head, its body still arriving. Must run inside a Tokio runtime (a new
    /// connection's task is spawned).
    pub fn send(
        &self,
        req: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, PoolError>> + Send + use<B> {
        send(self.inner.clone(), req)
    }
}

impl<B> Inner<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle<B>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently returned idle connection that is open and not expired; the closed
    /// and expired ones met on the way are dropped (closing them).
    fn checkout(&self) -> Option<SendRequest<B>> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(conn) = idle.pop_back() {
            if !conn.tx.is_closed() && now.duration_since(conn.since) <= self.idle_timeout {
                return Some(conn.tx);
            }
        }
        None
    }

    /// Puts a connection ready for its next request back; expired ones at the old end go.
    fn put(&self, tx: SendRequest<B>) {
        let now = Instant::now();
        let mut idle = self.lock();
        while idle
            .front()
            .is_some_and(|old| now.duration_since(old.since) > self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < self.max_idle {
            idle.push_back(Idle { tx, since: now });
        }
    }

    /// Drops the idle connections that expired or closed.
    fn sweep(&self) {
        let now = Instant::now();
        self.lock().retain(|conn| {
            !conn.tx.is_closed() && now.duration_since(conn.since) <= self.idle_timeout
        });
    }
}

impl<B> Inner<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A new connection, its task spawned.
    async fn connect(self: &Arc<Self>) -> Result<SendRequest<B>, PoolError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| PoolError::new(PoolErrorKind::Connect, e))?;
        let _ = tcp.set_nodelay(true);
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| PoolError::new(PoolErrorKind::Connect, e))?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        tracing::debug!(host = %self.host, port = self.port, "new upstream connection");
        self.start_sweeping();
        Ok(tx)
    }

    /// Starts the task that closes expired idle connections, unless it runs: once per idle
    /// timeout until the pool is dropped.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        let every = self.idle_timeout.max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    /// A connection whose answer arrived: back to the pool now if it can take the next
    /// request, else once it can (its body still arriving), unless it closes first.
    fn returned(self: &Arc<Self>, mut tx: SendRequest<B>) {
        if tx.is_ready() {
            self.put(tx);
            return;
        }
        if tx.is_closed() {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if std::future::poll_fn(|cx| tx.poll_ready(cx)).await.is_ok() {
                if let Some(pool) = pool.upgrade() {
                    pool.put(tx);
                }
            }
        });
    }
}

async fn send<B>(inner: Arc<Inner<B>>, mut req: Request<B>) -> Result<Response<Incoming>, PoolError>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    loop {
        let (mut tx, reused) = match inner.checkout() {
            Some(tx) => (tx, true),
            // Boxed: opening a connection is the rare case with keep-alive, and its future (a
            // TCP connect and an HTTP/1 handshake) would otherwise widen every request's
            // future and its poll code.
            None => (Box::pin(inner.connect()).await?, false),
        };
        match tx.try_send_request(req).await {
            Ok(resp) => {
                inner.returned(tx);
                return Ok(resp);
            }
            Err(mut err) => match err.take_message() {
                // Handed back unsent by an idle connection that closed under it: safe to
                // send on another (each such attempt uses up an idle connection, and a new
                // connection's failure is final, so this ends).
                Some(unsent) if reused => {
                    tracing::debug!(error = %err.error(), "idle upstream connection closed; sending on another");
                    req = unsent;
                }
                _ => {
                    return Err(PoolError::new(PoolErrorKind::Connection, err.into_error()));
                }
            },
        }
    }
}

/// Why [`Http1Pool::send`] got no answer.
#[derive(Debug)]
pub struct PoolError {
    kind: PoolErrorKind,
    source: BoxError,
}

/// What kind of [`PoolError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolErrorKind {
    /// No connection could be opened (refused, unreachable, a failed handshake): the
    /// request was not sent.
    Connect,
    /// The connection failed or closed while the request was sent or answered.
    Connection,
}

impl PoolError {
    #[cold]
    fn new(kind: PoolErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }

    /// What went wrong.
    ///
    /// ```
    /// use tower_claude::client::{Http1Pool, PoolErrorKind};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // Nothing listens on port 1 of the loopback address.
    /// let pool = Http1Pool::<String>::new(&"127.0.0.1:1".parse().unwrap());
    /// let req = http::Request::get("/").header("host", "x").body(String::new()).unwrap();
    /// let err = pool.send(req).await.unwrap_err();
    /// assert_eq!(err.kind(), PoolErrorKind::Connect);
    /// # }
    /// ```
    pub fn kind(&self) -> PoolErrorKind {
        self.kind
    }

    /// Whether no connection could be opened (the request was not sent).
    pub fn is_connect(&self) -> bool {
        self.kind == PoolErrorKind::Connect
    }
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            PoolErrorKind::Connect => write!(f, "cannot connect to the upstream: {}", self.source),
            PoolErrorKind::Connection => {
                write!(f, "the upstream connection failed: {}", self.source)
            }
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A loopback HTTP/1.1 server answering every GET with `ok` (after `close` answers, it
    /// closes the connection, saying so); counts the connections it accepted.
    async fn server(close_after: Option<usize>) -> (http::uri::Authority, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            answered += 1;
                            let last = close_after == Some(answered);
                            let head = if last { "connection: close\r\n" } else { "" };
                            let answer =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{head}\r\nok");
                            if stream.write_all(answer.as_bytes()).await.is_err() || last {
                                return;
                            }
                        }
                        let mut chunk = [0u8; 1024];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/v1/models")
            .header("host", "test")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn ok(pool: &Http1Pool<Full<Bytes>>) {
        let resp = pool.send(get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    }

    #[tokio::test]
    async fn one_connection_serves_requests_one_after_the_other() {
        let (authority, accepted) = server(None).await;
        let pool = Http1Pool::new(&authority);
        for _ in 0..5 {
            ok(&pool).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_reused() {
        let (authority, accepted) = server(Some(1)).await;
        let pool = Http1Pool::new(&authority);
        for n in 1..=3 {
            ok(&pool).await;
            // Each answer said `connection: close`: hyper closes its side, and the next
            // request opens a new connection instead of failing on the old one.
            assert_eq!(accepted.load(Ordering::SeqCst), n);
        }
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_and_at_most_max_idle_stay() {
        let (authority, accepted) = server(None).await;
        let pool = Http1Pool::new(&authority).max_idle(2);
        let sent: Vec<_> = (0..6).map(|_| pool.send(get())).collect();
        // All six in flight at once: each needs a connection of its own.
        let answers = futures_util::future::join_all(sent).await;
        for resp in answers {
            let body = resp.unwrap().into_body().collect().await.unwrap();
            assert_eq!(body.to_bytes(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 6);
        assert_eq!(pool.idle_count(), 2);
        ok(&pool).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 6, "an idle one was reused");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_after_the_idle_timeout() {
        let (authority, accepted) = server(None).await;
        let pool = Http1Pool::new(&authority).idle_timeout(Duration::from_secs(30));
        ok(&pool).await;
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_secs(20)).await;
        ok(&pool).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "reused within the timeout"
        );
        // No request for two periods: the sweeper closes it.
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(pool.idle_count(), 0);
        ok(&pool).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        // Bind then drop a listener: the port is (almost certainly) closed.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = Http1Pool::<Full<Bytes>>::new(&closed.to_string().parse().unwrap());
        let err = pool.send(get()).await.unwrap_err();
        assert_eq!(err.kind(), PoolErrorKind::Connect);
        assert!(err.is_connect());
        assert!(
            err.to_string()
                .starts_with("cannot connect to the upstream")
        );
    }
}
