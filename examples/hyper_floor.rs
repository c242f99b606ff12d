//! The floor: a bare hyper reverse proxy with no layers, to measure `claude-proxy` against.
//!
//! It is what `claude-proxy --cache-mode off` would cost if every Tower layer were free: the
//! same hyper-util `auto` server (HTTP/1 and HTTP/2), the same hyper-util legacy client with its
//! keep-alive pool, the same allocator (mimalloc) and the same runtime (Tokio's multi-threaded
//! one; its current-thread scheduler when `TOKIO_WORKER_THREADS=1`, as `claude-proxy
//! --worker-threads 1` runs), but no rate
//! limit, retry, fallback, metrics, headers or body tracking. The distance between this floor
//! and nginx is hyper's and Tokio's; the distance between `claude-proxy` and this floor is ours.
//! `scripts/bench-proxy.sh` (row `floor`), `scripts/callgrind-proxy.sh` and
//! `scripts/callgrind-miss.sh` run it beside the proxy; `docs/benchmarks.md` ("The proxy hot
//! path, third pass") says what it means for the throughput target.
//!
//! ```text
//! cargo build --release --features proxy --example hyper_floor
//! target/release/examples/hyper_floor --listen 127.0.0.1:8081 --upstream http://127.0.0.1:8080
//! ```
//!
//! Every request is sent to the upstream with its path and query, everything else unchanged
//! (no `Host` rewrite, no header filtering): a measuring tool, not a proxy to deploy.
//!
//! With `--same-task`, each downstream connection has its own keep-alive upstream HTTP/1
//! connection, driven by the downstream connection's task (`select` of the two), instead of
//! the legacy client's pool, whose connections run on tasks of their own and take requests
//! through a channel: it measures what cross-task hand-offs cost (`docs/benchmarks.md`, "The
//! proxy's edge (px14)").
//!
//! With `--own-pool`, requests go through `tower_claude::client::Http1Pool` (the pool of
//! keep-alive HTTP/1.1 connections `HttpClient` uses for a plain `http://` base) instead of
//! hyper-util's legacy client: what that pool saves, measured without the layers
//! (`docs/benchmarks.md`, "The proxy's edge, third pass (ed14)").
//!
//! With `--read-body`, each request's body is read whole in the connection's task before it is
//! sent on (through `Http1Pool`), as `claude-proxy` does to scan it: hyper's request body
//! channel then wakes the connection's own task once per request, which Tokio's scheduler
//! treats as a yield (`docs/benchmarks.md`, "A wake-up per request (issue
//! 14)").

use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use http::Uri;
use http::uri::PathAndQuery;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tower_claude::client::Http1Pool;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: hyper_floor --listen 127.0.0.1:PORT --upstream http://HOST:PORT [--own-pool | --same-task | --read-body]";

/// The two arguments, or a message saying which is missing or malformed.
fn parse_args(args: &[String]) -> Result<(SocketAddr, Uri), String> {
    let value = |name: &str| -> Result<&str, String> {
        let at = args
            .iter()
            .position(|a| a == name)
            .ok_or(format!("missing {name}"))?;
        args.get(at + 1)
            .map(String::as_str)
            .ok_or(format!("{name} needs a value"))
    };
    let listen = value("--listen")?;
    let listen = listen
        .parse()
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    let upstream = value("--upstream")?;
    let upstream: Uri = upstream
        .parse()
        .map_err(|e| format!("--upstream {upstream}: {e}"))?;
    if upstream.scheme().is_none() || upstream.authority().is_none() {
        return Err(format!(
            "--upstream {upstream}: needs a scheme and an authority"
        ));
    }
    Ok((listen, upstream))
}

/// An empty body of the proxied bodies' type.
fn empty() -> BoxBody<Bytes, hyper::Error> {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The upstream connection of one downstream connection, driven by that connection's task
/// (`--same-task`): requests on one HTTP/1 connection come one after the other, so one
/// keep-alive upstream connection serves them all, with no pool, lock or channel between
/// tasks.
struct Slot {
    /// The connection's sender while no request holds it.
    sender: std::sync::Mutex<Option<SendRequest<Incoming>>>,
    /// New upstream connections, to the [`Driver`] of the same task.
    driver: tokio::sync::mpsc::UnboundedSender<UpConn>,
}

type UpConn = hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Incoming>;

/// Polls the current upstream connection of a downstream connection; never completes.
struct Driver {
    rx: tokio::sync::mpsc::UnboundedReceiver<UpConn>,
    conn: Option<UpConn>,
}

impl std::future::Future for Driver {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        while let std::task::Poll::Ready(Some(conn)) = self.rx.poll_recv(cx) {
            if let Some(old) = self.conn.replace(conn) {
                tokio::spawn(old);
            }
        }
        if let Some(conn) = self.conn.as_mut() {
            if std::pin::Pin::new(conn).poll(cx).is_ready() {
                self.conn = None;
            }
        }
        std::task::Poll::Pending
    }
}

/// The error of `--same-task`'s service (a concrete type: hyper-util's auto builder cannot
/// prove a boxed error `Send` for every lifetime).
type FloorError = std::io::Error;

/// Any error as a [`FloorError`].
fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> FloorError {
    std::io::Error::other(e)
}

/// Sends `req` on the downstream connection's own upstream connection (a new one when there
/// is none, or it closed), which the downstream connection's task drives.
async fn same_task_send(
    slot: &Slot,
    addr: &str,
    req: http::Request<Incoming>,
) -> Result<http::Response<Incoming>, FloorError> {
    let taken = slot.sender.lock().unwrap().take();
    let mut sender = match taken {
        Some(s) if !s.is_closed() => s,
        _ => {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(boxed)?;
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(boxed)?;
            let _ = slot.driver.send(conn);
            sender
        }
    };
    sender.ready().await.map_err(boxed)?;
    let resp = sender.send_request(req);
    *slot.sender.lock().unwrap() = Some(sender);
    resp.await.map_err(boxed)
}

fn main() -> ExitCode {
    // The proxy's choice (src/bin/claude-proxy/main.rs): one thread is the current-thread
    // scheduler, more the multi-threaded one (which reads TOKIO_WORKER_THREADS itself).
    let one = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let mut builder = if one {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(serve()),
        Err(e) => {
            eprintln!("hyper_floor: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let same_task = args.iter().any(|a| a == "--same-task");
    let own_pool = args.iter().any(|a| a == "--own-pool");
    let read_body = args.iter().any(|a| a == "--read-body");
    let (listen, upstream) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("hyper_floor: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("hyper_floor: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let pool = match upstream.authority() {
        Some(authority) if own_pool => Some(Http1Pool::<Incoming>::new(authority)),
        _ => None,
    };
    let addr = format!(
        "{}:{}",
        upstream.host().unwrap_or("127.0.0.1"),
        upstream.port_u16().unwrap_or(80)
    );
    let mut read_pool = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors and the like: try the next connection.
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let upstream = upstream.clone();
        let addr = addr.clone();
        if read_body {
            let Some(authority) = upstream.authority() else {
                continue;
            };
            let pool = read_pool
                .get_or_insert_with(|| Http1Pool::<http_body_util::Full<Bytes>>::new(authority))
                .clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let pool = pool.clone();
                    async move {
                        let (mut parts, body) = req.into_parts();
                        let bytes = body.collect().await.map_err(boxed)?.to_bytes();
                        let origin = parts
                            .uri
                            .path_and_query()
                            .cloned()
                            .unwrap_or_else(|| PathAndQuery::from_static("/"));
                        parts.uri = Uri::from(origin);
                        let req =
                            http::Request::from_parts(parts, http_body_util::Full::new(bytes));
                        let resp = pool.send(req).await.map_err(boxed)?;
                        Ok::<_, FloorError>(resp.map(|b| b.boxed()))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            continue;
        }
        if let Some(pool) = &pool {
            let pool = pool.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                    // The pool sends the origin form as it is: the path and query alone.
                    let origin = req
                        .uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| PathAndQuery::from_static("/"));
                    *req.uri_mut() = Uri::from(origin);
                    let sent = pool.send(req);
                    async move {
                        let resp = sent.await?;
                        Ok::<_, tower_claude::client::PoolError>(resp.map(|b| b.boxed()))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            continue;
        }
        if same_task {
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let slot = std::sync::Arc::new(Slot {
                    sender: std::sync::Mutex::new(None),
                    driver: tx,
                });
                let mut driver = Driver { rx, conn: None };
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let slot = slot.clone();
                    let addr = addr.clone();
                    async move {
                        let resp = same_task_send(&slot, &addr, req).await?;
                        Ok::<_, FloorError>(resp.map(|b| b.boxed()))
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let server = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(server);
                let _ = futures_util::future::select(server, &mut driver).await;
                if let Some(conn) = driver.conn.take() {
                    tokio::spawn(conn);
                }
            });
            continue;
        }
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                let client = client.clone();
                let mut parts = upstream.clone().into_parts();
                parts.path_and_query = Some(
                    req.uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| PathAndQuery::from_static("/")),
                );
                let uri = Uri::from_parts(parts);
                async move {
                    // Scheme and authority were checked at start, the path was parsed: this
                    // cannot fail, but an answer is better than a panic.
                    let Ok(uri) = uri else {
                        let mut resp = http::Response::new(empty());
                        *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
                        return Ok(resp);
                    };
                    *req.uri_mut() = uri;
                    let resp = client.request(req).await?;
                    Ok::<_, hyper_util::client::legacy::Error>(resp.map(|b| b.boxed()))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
