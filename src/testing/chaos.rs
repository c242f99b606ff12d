//! [`ChaosUpstream`]: a hostile Anthropic upstream served over loopback, for testing what a
//! client, a layer or the proxy does when the upstream misbehaves.
//!
//! [`MockClaude`](super::MockClaude) simulates the API faithfully (quotas, 429s, 529s);
//! `ChaosUpstream` does what a broken network, a buggy gateway or a hostile server does: it
//! never answers, trickles bytes, resets mid-body, cuts streams, pings forever, sends garbage,
//! absurd headers and usage, any status with any body. Each request picks its misbehaviour
//! with the `x-chaos` request header (see [`Chaos::parse`]), else the upstream's default, so
//! one server serves a whole test suite; `x-chaos-id` names a request so that a test can count
//! how many times it reached the upstream ([`ChaosUpstream::received`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::BoxError;
use crate::anthropic::{ModelCatalog, RequestMeta};

/// The response body of [`ChaosUpstream`].
pub type ChaosBody = BoxBody<Bytes, BoxError>;

/// One misbehaviour of [`ChaosUpstream`], chosen per request by the `x-chaos` header.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Chaos {
    /// A valid answer: a JSON message, or a complete stream for `"stream": true`.
    Ok,
    /// Accepts the request and never answers.
    Silent,
    /// A valid answer sent one byte every `interval`.
    Trickle(Duration),
    /// A 200 whose body stops half-way with a connection reset.
    ResetMidBody,
    /// A stream: `message_start`, then a reset before any content.
    CutBeforeContent,
    /// A stream: content, then a reset.
    CutAfterContent,
    /// A stream: content, then a clean end without `message_stop`.
    NoMessageStop,
    /// A stream: `message_start`, then a `ping` every `interval`, forever.
    PingForever(Duration),
    /// A 200 whose body is garbage (not JSON, not SSE), with the content type of a valid
    /// answer.
    Garbage,
    /// A valid answer with the same header 100 times and one header of 60 KiB.
    HugeHeaders,
    /// A valid answer with every `anthropic-ratelimit-*-limit` and `-remaining` header set to
    /// this value, as sent (`0`, `-1`, `18446744073709551615`, `abc`).
    Limits(String),
    /// A valid answer whose usage reports this many input and output tokens.
    Usage(u64),
    /// This status with this body (`application/json`).
    Status(u16, String),
}

impl Chaos {
    /// Parses an `x-chaos` header value: `ok`, `silent`, `trickle[:ms]`, `reset`,
    /// `cut-before`, `cut-after`, `no-stop`, `ping[:ms]`, `garbage`, `huge-headers`,
    /// `limits:<value>`, `usage:<tokens>`, `status:<code>[:<body>]`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_claude::testing::Chaos;
    ///
    /// assert_eq!(Chaos::parse("ping:250"), Some(Chaos::PingForever(Duration::from_millis(250))));
    /// assert_eq!(Chaos::parse("limits:0"), Some(Chaos::Limits("0".into())));
    /// assert_eq!(Chaos::parse("status:404"), Some(Chaos::Status(404, String::new())));
    /// assert_eq!(Chaos::parse("nonsense"), None);
    /// ```
    pub fn parse(value: &str) -> Option<Chaos> {
        let (name, arg) = match value.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (value, None),
        };
        let ms = |default: u64| {
            Duration::from_millis(arg.and_then(|a| a.parse().ok()).unwrap_or(default))
        };
        Some(match name {
            "ok" => Chaos::Ok,
            "silent" => Chaos::Silent,
            "trickle" => Chaos::Trickle(ms(1_000)),
            "reset" => Chaos::ResetMidBody,
            "cut-before" => Chaos::CutBeforeContent,
            "cut-after" => Chaos::CutAfterContent,
            "no-stop" => Chaos::NoMessageStop,
            "ping" => Chaos::PingForever(ms(1_000)),
            "garbage" => Chaos::Garbage,
            "huge-headers" => Chaos::HugeHeaders,
            "limits" => Chaos::Limits(arg?.to_owned()),
            "usage" => Chaos::Usage(arg?.parse().ok()?),
            "status" => {
                let (code, body) = match arg?.split_once(':') {
                    Some((code, body)) => (code, body.to_owned()),
                    None => (arg?, String::new()),
                };
                Chaos::Status(code.parse().ok()?, body)
            }
            _ => return None,
        })
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: u64,
    by_id: HashMap<String, u64>,
}

#[derive(Debug)]
struct Config {
    default: Chaos,
    unauthorized_paths: Vec<String>,
    known_models_only: bool,
    catalog: ModelCatalog,
}

/// A hostile Anthropic upstream, served over loopback HTTP/1.1.
///
/// [`MockClaude`](super::MockClaude) simulates the API faithfully; `ChaosUpstream` does what a
/// broken network, a buggy gateway or a hostile server does (see [`Chaos`]). Each request
/// picks its misbehaviour with the `x-chaos` request header ([`Chaos::parse`]), else the
/// upstream's default, so one server serves a whole test suite; `x-chaos-id` names a request
/// so that a test can count how many times it reached the upstream
/// ([`received`](Self::received)). A real server rather than a `tower::Service`, so that
/// resets, trickles and huge headers go through hyper on both sides, as in production.
///
/// ```
/// use tower_claude::testing::{Chaos, ChaosUpstream};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let chaos = ChaosUpstream::new(Chaos::Ok)
///     .unauthorized_path("/v1/organizations/me")
///     .known_models_only(true);
/// let (addr, server) = chaos.serve_on_loopback().await?;
/// assert!(addr.ip().is_loopback());
/// assert_eq!(chaos.total(), 0);
/// server.abort();
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ChaosUpstream {
    config: Arc<Config>,
    counts: Arc<Mutex<Counts>>,
}

impl ChaosUpstream {
    /// An upstream doing `default` to every request without an `x-chaos` header.
    pub fn new(default: Chaos) -> Self {
        Self {
            config: Arc::new(Config {
                default,
                unauthorized_paths: Vec::new(),
                known_models_only: false,
                catalog: ModelCatalog::default(),
            }),
            counts: Arc::default(),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::get_mut(&mut self.config).expect("configure a ChaosUpstream before cloning it")
    }

    /// Answers 401 `authentication_error` to every request on `path`.
    pub fn unauthorized_path(mut self, path: impl Into<String>) -> Self {
        self.config_mut().unauthorized_paths.push(path.into());
        self
    }

    /// Answers 404 `not_found_error` to a Messages request for a model of no known family
    /// (as the API does for a made-up model name).
    pub fn known_models_only(mut self, on: bool) -> Self {
        self.config_mut().known_models_only = on;
        self
    }

    /// Requests received.
    pub fn total(&self) -> u64 {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Requests received with `x-chaos-id: id`.
    pub fn received(&self, id: &str) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.by_id.get(id).copied().unwrap_or(0)
    }

    /// Every `x-chaos-id` seen, with how many requests carried it.
    pub fn received_by_id(&self) -> HashMap<String, u64> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.by_id.clone()
    }

    /// Binds `127.0.0.1:0` and serves HTTP/1.1 there on the current runtime, one task per
    /// connection; returns the address and the server task (abort it to stop accepting).
    pub async fn serve_on_loopback(&self) -> io::Result<(SocketAddr, JoinHandle<io::Result<()>>)> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let this = self.clone();
        let server = tokio::spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                    Err(e) => return Err(e),
                };
                let this = this.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.answer(req).await) }
                    });
                    // A reset mid-body is an error here by design.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok((addr, server))
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<ChaosBody> {
        let (parts, body) = req.into_parts();
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            counts.total += 1;
            if let Some(id) = parts
                .headers
                .get("x-chaos-id")
                .and_then(|v| v.to_str().ok())
            {
                *counts.by_id.entry(id.to_owned()).or_default() += 1;
            }
        }
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path();
        if self.config.unauthorized_paths.iter().any(|p| p == path) {
            return error(401, "authentication_error", "invalid x-api-key");
        }
        let meta = RequestMeta::scan(&body).ok();
        let stream = meta.as_ref().is_some_and(|m| m.stream);
        if self.config.known_models_only {
            let model = meta.as_ref().and_then(|m| m.model.as_deref()).unwrap_or("");
            if self.config.catalog.family(model).is_none() {
                return error(404, "not_found_error", &format!("model: {model}"));
            }
        }
        let chaos = parts
            .headers
            .get("x-chaos")
            .and_then(|v| v.to_str().ok())
            .and_then(Chaos::parse)
            .unwrap_or_else(|| self.config.default.clone());
        respond(chaos, stream).await
    }
}

const START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_chaos\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-6\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n";
const CONTENT: &str = "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
const END: &str = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
const PING: &str = "event: ping\ndata: {\"type\": \"ping\"}\n\n";

fn json_message(input: u64, output: u64) -> String {
    format!(
        r#"{{"id":"msg_chaos","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[{{"type":"text","text":"Hi"}}],"stop_reason":"end_turn","usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#
    )
}

fn error(status: u16, kind: &str, message: &str) -> Response<ChaosBody> {
    let body = format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"{message}"}}}}"#);
    full(status, "application/json", body)
}

fn full(status: u16, content_type: &'static str, body: String) -> Response<ChaosBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    response
}

/// A 200 whose body is `chunks`, then each item of `tail` after `every` (forever when
/// `repeat`), then a reset when `reset`.
fn streamed(
    content_type: &'static str,
    chunks: Vec<Bytes>,
    tail: Option<(Bytes, Duration, bool)>,
    reset: bool,
) -> Response<ChaosBody> {
    use futures_util::StreamExt;
    let head = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(c))),
    );
    let tail = futures_util::stream::unfold(tail, |state| async move {
        let (chunk, every, repeat) = state?;
        tokio::time::sleep(every).await;
        let next = repeat.then(|| (chunk.clone(), every, repeat));
        Some((Ok::<_, BoxError>(Frame::data(chunk)), next))
    });
    let end = futures_util::stream::iter(
        reset.then(|| Err::<Frame<Bytes>, BoxError>("chaos: connection reset".into())),
    );
    let body = StreamBody::new(head.chain(tail).chain(end));
    let mut response = Response::new(BodyExt::boxed(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    response
}

fn valid(stream: bool, input: u64, output: u64) -> Response<ChaosBody> {
    if stream {
        let usage_start =
            START.replace("\"input_tokens\":10", &format!("\"input_tokens\":{input}"));
        let usage_end = END.replace(
            "\"output_tokens\":2",
            &format!("\"output_tokens\":{output}"),
        );
        full(
            200,
            "text/event-stream",
            format!("{usage_start}{CONTENT}{usage_end}"),
        )
    } else {
        full(200, "application/json", json_message(input, output))
    }
}

async fn respond(chaos: Chaos, stream: bool) -> Response<ChaosBody> {
    let sse = "text/event-stream";
    match chaos {
        Chaos::Ok => valid(stream, 10, 2),
        Chaos::Silent => std::future::pending().await,
        Chaos::Trickle(every) => {
            let (content_type, text) = if stream {
                (sse, format!("{START}{CONTENT}{END}"))
            } else {
                ("application/json", json_message(10, 2))
            };
            let bytes = Bytes::from(text);
            // One byte per tick: the first at once, the rest on the timer.
            let mut chunks = (0..bytes.len()).map(|i| bytes.slice(i..i + 1));
            let first: Vec<Bytes> = chunks.next().into_iter().collect();
            let rest: Vec<Bytes> = chunks.collect();
            let body = futures_util::stream::unfold(rest.into_iter(), move |mut it| async move {
                let next = it.next()?;
                tokio::time::sleep(every).await;
                Some((Ok::<_, BoxError>(Frame::data(next)), it))
            });
            let head = futures_util::stream::iter(first.into_iter().map(|c| Ok(Frame::data(c))));
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(
                futures_util::StreamExt::chain(head, body),
            )));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
            response
        }
        Chaos::ResetMidBody => {
            let (content_type, text) = if stream {
                (sse, format!("{START}{CONTENT}"))
            } else {
                ("application/json", json_message(10, 2))
            };
            let half = Bytes::from(text[..text.len() / 2].to_owned());
            streamed(content_type, vec![half], None, true)
        }
        Chaos::CutBeforeContent => {
            streamed(sse, vec![Bytes::from_static(START.as_bytes())], None, true)
        }
        Chaos::CutAfterContent => streamed(
            sse,
            vec![Bytes::from(format!("{START}{CONTENT}"))],
            None,
            true,
        ),
        Chaos::NoMessageStop => streamed(
            sse,
            vec![Bytes::from(format!("{START}{CONTENT}"))],
            None,
            false,
        ),
        Chaos::PingForever(every) => streamed(
            sse,
            vec![Bytes::from_static(START.as_bytes())],
            Some((Bytes::from_static(PING.as_bytes()), every, true)),
            false,
        ),
        Chaos::Garbage => {
            let content_type = if stream { sse } else { "application/json" };
            full(
                200,
                content_type,
                "\u{0}\u{1}<html>garbage ]]} {{{ event: data: \n\n".to_owned(),
            )
        }
        Chaos::HugeHeaders => {
            let mut response = valid(stream, 10, 2);
            let headers = response.headers_mut();
            let name = HeaderName::from_static("x-chaos-dup");
            for i in 0..100 {
                headers.append(name.clone(), HeaderValue::from(i));
            }
            headers.insert(
                HeaderName::from_static("x-chaos-huge"),
                HeaderValue::from_str(&"x".repeat(60 * 1024))
                    .unwrap_or(HeaderValue::from_static("x")),
            );
            response
        }
        Chaos::Limits(value) => {
            let mut response = valid(stream, 10, 2);
            let headers = response.headers_mut();
            if let Ok(value) = HeaderValue::from_str(&value) {
                for bucket in ["requests", "tokens", "input-tokens", "output-tokens"] {
                    for field in ["limit", "remaining"] {
                        if let Ok(name) =
                            HeaderName::try_from(format!("anthropic-ratelimit-{bucket}-{field}"))
                        {
                            headers.insert(name, value.clone());
                        }
                    }
                }
            }
            response
        }
        Chaos::Usage(tokens) => valid(stream, tokens, tokens),
        Chaos::Status(code, body) => {
            let body = if body.is_empty() {
                format!(
                    r#"{{"type":"error","error":{{"type":"api_error","message":"chaos {code}"}}}}"#
                )
            } else {
                body
            };
            full(code, "application/json", body)
        }
    }
}
