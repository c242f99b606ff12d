use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use pin_project::pin_project;

use super::CacheStatus;
use super::body::{CacheBody, Tee};
use super::config::{Config, storable};
use super::flights::FlightGuard;
use super::key::{CacheKey, KeyBase};
use super::live::{End, Live};
use super::secret::Keys;
use super::store::{CachedResponse, KeptHeaders};
use crate::BoxError;
use crate::anthropic::parsed_names as names;
use crate::anthropic::{KeyId, RequestMeta, UsageTracker};
use crate::body::{Peek, Peeked, Replay, RequestBody};
use crate::fallback::ServedModel;

type Boxed<B> = Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, BoxError>> + Send>>;

/// The response future of [`Cache`](super::Cache).
///
/// What [`Cache::call`](super::Cache) settles at once (a hit, a share of a stream in flight,
/// a miss or a bypass whose store lookup needed no I/O while the inner service was ready)
/// runs without an allocation of its own: the inner service's future and what the miss needs
/// to store its answer, then the read of a JSON answer, are states of this future. The other
/// paths (waiting for an identical request in flight, a store that looks up over the network,
/// an inner service that was not ready) are one boxed `async` block.
#[pin_project]
pub struct ResponseFuture<F, B> {
    #[pin]
    state: State<F, B>,
}

/// What a miss needs once its answer's head arrives.
pub(crate) struct Miss {
    pub(crate) config: Arc<Config>,
    pub(crate) plan: Plan,
    pub(crate) guard: Option<FlightGuard>,
}

#[pin_project(project = StateProj)]
enum State<F, B> {
    /// Answered in `call` (taken once).
    Ready { res: Option<Response<CacheBody<B>>> },
    /// Passed through (`bypass`).
    Bypass {
        #[pin]
        fut: F,
    },
    /// A miss sent to the inner service.
    Upstream {
        #[pin]
        fut: F,
        miss: Option<Miss>,
    },
    /// A miss's JSON answer read whole, to store it.
    Reading {
        #[pin]
        peek: Peek<B>,
        reading: Option<(Arc<Config>, Reading)>,
    },
    /// Every other path.
    Boxed { fut: Boxed<B> },
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn ready(res: Response<CacheBody<B>>) -> Self {
        Self {
            state: State::Ready { res: Some(res) },
        }
    }

    pub(crate) fn bypass(fut: F) -> Self {
        Self {
            state: State::Bypass { fut },
        }
    }

    pub(crate) fn upstream(fut: F, miss: Miss) -> Self {
        Self {
            state: State::Upstream {
                fut,
                miss: Some(miss),
            },
        }
    }

    pub(crate) fn boxed(fut: Boxed<B>) -> Self {
        Self {
            state: State::Boxed { fut },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<CacheBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Ready { res } => {
                    let res = res
                        .take()
                        .expect("cache ResponseFuture polled after completion");
                    return Poll::Ready(Ok(res));
                }
                StateProj::Bypass { fut } => {
                    let mut res = ready!(fut.poll(cx))
                        .map_err(Into::into)?
                        .map(CacheBody::inner);
                    mark(&mut res, CacheStatus::Bypass);
                    return Poll::Ready(Ok(res));
                }
                StateProj::Upstream { fut, miss } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let Miss {
                        config,
                        plan,
                        guard,
                    } = miss
                        .take()
                        .expect("cache ResponseFuture polled after completion");
                    match store_head(&config, plan, res, guard) {
                        Stored::Done(mut res) => {
                            mark(&mut res, CacheStatus::Miss);
                            return Poll::Ready(Ok(res));
                        }
                        Stored::Read(mut peek, reading) => {
                            // Read at once when it can be: a JSON answer that a layer below
                            // read whole already (in `ClaudeStack`, retry) is stored and
                            // returned here, without a state of its own (moving the head and
                            // the read into it and out again). `Peek` is `Unpin`.
                            if let Poll::Ready(read) = Pin::new(&mut peek).poll(cx) {
                                let mut res = store_read(&config, reading, read);
                                mark(&mut res, CacheStatus::Miss);
                                return Poll::Ready(Ok(res));
                            }
                            State::Reading {
                                peek,
                                reading: Some((config, reading)),
                            }
                        }
                    }
                }
                StateProj::Reading { peek, reading } => {
                    let read = ready!(peek.poll(cx));
                    let (config, reading) = reading
                        .take()
                        .expect("cache ResponseFuture polled after completion");
                    let mut res = store_read(&config, reading, read);
                    mark(&mut res, CacheStatus::Miss);
                    return Poll::Ready(Ok(res));
                }
                StateProj::Boxed { fut } => return fut.as_mut().poll(cx),
            };
            state.set(next);
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Ready { .. } => "Ready",
            State::Bypass { .. } => "Bypass",
            State::Upstream { .. } => "Upstream",
            State::Reading { .. } => "Reading",
            State::Boxed { .. } => "Boxed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// What the layer does with one request.
pub(crate) struct Plan {
    /// The key of the request as sent (its requested model).
    pub(super) key: CacheKey,
    /// The key without the body, to derive the key of the same request for another model.
    pub(super) base: KeyBase,
    /// The request body, to derive the key of the same request for another model.
    pub(super) body: Bytes,
    /// The requested model (`None` when none), shared with the request's catalogue entry
    /// when a layer above resolved it.
    pub(super) requested: Option<Arc<str>>,
    /// Look the key up (false for `cache-control: no-cache` and `x-tower-claude-cache: refresh`).
    pub(super) read: bool,
    /// The request turned fallback off: only its own model's answers are served, and it does
    /// not share a flight with requests that may fall back.
    pub(super) no_fallback: bool,
}

impl Plan {
    pub(super) fn requested(&self) -> &str {
        self.requested.as_deref().unwrap_or("")
    }

    /// The flight concurrent twins share.
    pub(super) fn flight(&self) -> CacheKey {
        if self.no_fallback {
            self.key.variant(b"no-fallback")
        } else {
            self.key
        }
    }

    /// The key of the same request for `model` (`keys`: the cache's).
    pub(super) fn key_for(&self, keys: &Keys, model: &str) -> CacheKey {
        if model == self.requested() {
            return self.key;
        }
        // Only when fallback is in play: the body with its `model` replaced, written
        // canonically again. The body was scanned and canonicalised already, so neither fails;
        // if one did, the requested key is the safe answer (a miss, never a wrong hit).
        crate::anthropic::rewrite_model(&self.body, model)
            .ok()
            .and_then(|body| self.base.key_of_body(keys, &body))
            .unwrap_or_else(|| self.key.variant(model.as_bytes()))
    }

    /// The model the fallback layer below would send this request to now, when that is not
    /// the requested model and the request allows fallback. Asked only when another model's
    /// answer may be stored, so the request's key id is found only then.
    pub(super) fn fallback_choice(
        &self,
        config: &Config,
        req: &mut Request<RequestBody>,
    ) -> Option<String> {
        if self.no_fallback {
            return None;
        }
        let fallback = config.fallback.as_ref()?;
        let key_id = KeyId::of_request(req).unwrap_or_else(KeyId::anonymous);
        let meta = req.extensions().get::<RequestMeta>()?;
        let choice = fallback.choice(&key_id, meta)?;
        (choice != self.requested()).then_some(choice)
    }
}

/// Says what the cache did with a response: the `x-tower-claude-cache` header and the
/// [`CacheStatus`] extension. In place: a response is large (its head and the body's state),
/// and moving it in and out of this function (it is not inlined at every call) was a copy.
pub(crate) fn mark<B>(res: &mut Response<B>, status: CacheStatus) {
    // Constants, made where they are used: no clone of a static name, and no check of the
    // value's bytes per response (`from_static` checks them when it is not a constant).
    const NAME: HeaderName =
        HeaderName::from_static(crate::anthropic::header_names::X_TOWER_CLAUDE_CACHE);
    const HIT: HeaderValue = HeaderValue::from_static("hit");
    const MISS: HeaderValue = HeaderValue::from_static("miss");
    const BYPASS: HeaderValue = HeaderValue::from_static("bypass");
    let value = match status {
        CacheStatus::Hit => HIT,
        CacheStatus::Miss => MISS,
        CacheStatus::Bypass => BYPASS,
    };
    res.headers_mut().insert(NAME, value);
    res.extensions_mut().insert(status);
}

/// The model that produced a response: the fallback layer's [`ServedModel`] extension (its
/// name shared, not copied) or `x-tower-claude-model` header, else the requested model
/// (`plan`'s, moved). And the key of the request for it.
fn served_model(
    keys: &Keys,
    parts: &http::response::Parts,
    plan: Plan,
) -> (Option<Arc<str>>, CacheKey) {
    if let Some(served) = parts.extensions.get::<ServedModel>() {
        // Usually the requested model's own name, shared: told without comparing bytes.
        let same = plan
            .requested
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &served.served));
        if !same && *served.served != *plan.requested() {
            return (
                Some(served.served.clone()),
                plan.key_for(keys, &served.served),
            );
        }
        return (plan.requested, plan.key);
    }
    let named = parts
        .headers
        .get(&names::X_TOWER_CLAUDE_MODEL)
        .and_then(|v| v.to_str().ok());
    match named {
        Some(served) if served != plan.requested() => {
            (Some(served.into()), plan.key_for(keys, served))
        }
        _ => (plan.requested, plan.key),
    }
}

/// What [`store_head`] made of a miss's response.
pub(crate) enum Stored<B> {
    /// The response to return.
    Done(Response<CacheBody<B>>),
    /// A JSON answer to read whole ([`store_read`] then).
    Read(Peek<B>, Reading),
}

/// A JSON answer being read whole, to store it.
pub(crate) struct Reading {
    parts: http::response::Parts,
    /// The headers the entry keeps, picked when the head arrived.
    kept: KeptHeaders,
    key: CacheKey,
    served: Option<Arc<str>>,
    tracker: Option<UsageTracker>,
    guard: Option<FlightGuard>,
}

/// Forwards a miss's response, storing it when it is complete and 2xx: a JSON body is read
/// whole (it arrives whole anyway; [`Stored::Read`], then [`store_read`]) and queued for
/// storing before the response is returned, so followers are released at once; an SSE body is
/// recorded by a tee as it flows to the caller. The SSE body of a flight (`guard`) is read by
/// a driver task into a [`Live`] buffer that the caller and every follower read (see
/// [`drive`]). Either way the store itself is written later, by the write-behind task: the
/// caller never waits for it.
pub(crate) fn store_head<ResBody>(
    config: &Arc<Config>,
    plan: Plan,
    res: Response<ResBody>,
    guard: Option<FlightGuard>,
) -> Stored<ResBody>
where
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    if !res.status().is_success() {
        return Stored::Done(res.map(CacheBody::inner));
    }
    // The answer's headers are read once: the entry's and whether it is a stream.
    let kept = KeptHeaders::of(res.headers());
    let (mut parts, body) = res.into_parts();
    let (served, key) = served_model(&config.keys, &parts, plan);
    if kept.is_event_stream() {
        let (body, tracker) = crate::body::track(&mut parts, body, true, 0);
        let tee = Tee::new(config.clone(), key, parts.status, kept, served, tracker);
        let body = CacheBody::tee(body, tee);
        let (Some(guard), Ok(runtime)) = (guard, tokio::runtime::Handle::try_current()) else {
            return Stored::Done(Response::from_parts(parts, body));
        };
        let live = Live::new(parts.status, parts.headers.clone());
        let mine = live.subscribe();
        guard.publish(&live);
        runtime.spawn(drive(body, live, guard, config.max_entry_bytes));
        return Stored::Done(Response::from_parts(parts, CacheBody::live(mine)));
    }
    // The answer's one usage tracker (published by a layer below, in `ClaudeStack` the rate
    // limiter) reads the JSON whole anyway: it says whether it is a Messages API answer.
    let tracker = parts.extensions.get::<UsageTracker>().cloned();
    if let Some(tracker) = &tracker {
        tracker.want_json(config.max_entry_bytes);
    }
    // Read whole, up to one byte over the entry cap (then it is not stored).
    let peek = Replay::peek(body, config.max_entry_bytes.saturating_add(1));
    Stored::Read(
        peek,
        Reading {
            parts,
            kept,
            key,
            served,
            tracker,
            guard,
        },
    )
}

/// The end of [`store_head`] for a JSON answer read whole: the entry is built (only now that
/// the answer is known whole) and queued when it is a complete Messages API answer.
pub(crate) fn store_read<ResBody>(
    config: &Config,
    reading: Reading,
    read: Peeked<ResBody>,
) -> Response<CacheBody<ResBody>>
where
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let Reading {
        parts,
        kept,
        key,
        served,
        tracker,
        guard,
    } = reading;
    if !read.is_whole() || read.has_trailers() {
        // Too large, cut, or with trailers: forward it as it came, store nothing.
        return Response::from_parts(parts, CacheBody::replay(read.into_body()));
    }
    let data = read.into_data();
    // The body is copied: `data` may be a slice of the connection's read buffer.
    let entry = CachedResponse::from_kept(parts.status, kept, Bytes::copy_from_slice(&data), false)
        .with_shared_model(served);
    if storable(key, &entry, tracker.and_then(|t| t.message_json())) {
        let store = |entry| config.writer.enqueue(key, entry, config.ttl);
        match guard {
            // Queued as the flight closes (a request arriving then finds one or the other),
            // and handed to the followers; the usual miss, that nobody follows, queues the
            // entry itself (no copy).
            Some(guard) => guard.finish(entry, store),
            None => store(entry),
        }
    }
    Response::from_parts(parts, CacheBody::full(data))
}

/// Reads a flight's upstream stream (through the tee that stores it) into `live` for every
/// subscriber, as fast as upstream sends, until its end or until no subscriber is left (then
/// the upstream stream is dropped: the request is cancelled upstream, and nothing is stored
/// unless `message_stop` had arrived). The flight stays open to new followers until the
/// stream ends or outgrows `max_bytes` (it would not be stored).
async fn drive<B>(body: CacheBody<B>, live: Arc<Live>, guard: FlightGuard, max_bytes: usize)
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    use futures_util::future::{Either, select};
    let mut body = std::pin::pin!(body);
    let mut guard = Some(guard);
    let mut trailers = None;
    loop {
        let next = {
            let gone = std::pin::pin!(live.all_gone());
            match select(body.as_mut().frame(), gone).await {
                Either::Left((frame, _)) => Some(frame),
                Either::Right(_) => None,
            }
        };
        let frame = match next {
            Some(frame) => frame,
            None => {
                // Close only if nobody joined meanwhile (checked with the flights locked).
                let closed = match &guard {
                    Some(g) => g.close_if_unread(&live),
                    None => live.close_if_unread(),
                };
                if closed {
                    return;
                }
                continue;
            }
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if live.push(data) > max_bytes {
                        // Too large to store: no new follower joins it.
                        guard = None;
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok().or(trailers),
            },
            Some(Err(e)) => {
                live.finish(End::Failed(e.to_string()));
                return;
            }
            None => {
                // The tee queued the complete stream at `message_stop`: later requests find
                // it (in the write queue, then in the store) as the flight closes.
                live.finish(End::Complete(trailers));
                return;
            }
        }
    }
}
