//! [`ResponseFuture`] of the [`KeyPool`](super::KeyPool) service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;
use pin_project::pin_project;
use tokio::time::Instant;

use super::body::KeyPoolBody;
use super::config::Config;
use super::error::KeyPoolError;
use super::pool::{ChosenKey, Pick, Pool, RemovalReason};
use crate::BoxError;
use crate::anthropic::{
    ApiError, ApiErrorKind, BucketSnapshot, RateLimitGroup, RateLimitSnapshot, retry_after,
};
use crate::body::{ErrorAnswer, ReadErrorAnswer, Replay, read_error_answer};
use crate::quota::Cost;
use crate::retry::RetrySooner;

/// The most of a 429 or 400 body read to classify it (error envelopes are a few hundred bytes).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A request sent with a pool key, until its response is observed. Dropping it ends the
/// key's in-flight count.
pub(crate) struct Sent {
    pool: Arc<Pool>,
    config: Arc<Config>,
    pick: Pick,
    group: Option<RateLimitGroup>,
    /// The request's cost in `group` (what another key must fit).
    cost: Option<Cost>,
    /// The request went to a Messages API endpoint, whose 401 or 402 proves the key bad
    /// (see [`judges_the_key`]).
    judges_key: bool,
    /// The pool admitted it through the board (its group's line): a retry waits there too.
    admitted: bool,
    in_flight: bool,
}

/// Whether a 401 or 402 answer to a request on `path` says the key itself is bad: only on the
/// Messages API endpoints the pool exists for (`/v1/messages`, `/v1/messages/count_tokens`,
/// `/v1/messages/batches...`), spelled plainly (no `.` / `..` segment, no percent-encoding).
///
/// A client chooses the path: a 401 on another one (an admin or organisation endpoint that
/// an ordinary key may not call, a path the upstream does not know) is returned to that
/// client and the key stays in rotation, so that one client cannot take the proxy's keys out.
fn judges_the_key(path: &str) -> bool {
    let plain = path
        .split('/')
        .all(|s| s != "." && s != ".." && !s.contains('%'));
    let path = path.trim_end_matches('/');
    plain && (path.ends_with("/v1/messages") || path.contains("/v1/messages/"))
}

impl Sent {
    pub(crate) fn new(
        pool: Arc<Pool>,
        config: Arc<Config>,
        pick: Pick,
        target: Option<(RateLimitGroup, Cost)>,
        path: &str,
    ) -> Self {
        let (group, cost) = target.unzip();
        Self {
            pool,
            config,
            pick,
            group,
            cost,
            judges_key: judges_the_key(path),
            admitted: false,
            in_flight: true,
        }
    }

    /// The pool admitted this request through the board (see [`admitted`](Self::admitted)).
    pub(crate) fn admitted(mut self) -> Self {
        self.admitted = true;
        self
    }

    /// After this key failed the request (429, spend cap, 401, 402, 403): how soon another key
    /// in rotation can take it, as a [`RetrySooner`] for a retry layer above. `None` when no
    /// other key can.
    fn sooner(&self) -> Option<RetrySooner> {
        let target = self.group.as_ref().zip(self.cost.as_ref());
        self.pool
            .sooner_elsewhere(self.pick.index, target, &self.config.board, Instant::now())
            .map(RetrySooner)
    }

    /// After a 429 rate limit: another key sooner as [`sooner`](Self::sooner), else, when the
    /// pool admits through the board, this key after its cooldown. The retry waits in the
    /// group's line then, which the board paces: a retry layer above must not pace the
    /// group's requests on its own (its pacing, keyed by group across every key of the pool,
    /// went on for good once new requests came faster than its step: after a single 429
    /// from a burst let through unpaced, one request every 2.1 s for the rest of the run
    /// where the quota allowed 2 a second; issue 12, sixth pass).
    fn sooner_after_rate_limit(&self) -> Option<RetrySooner> {
        self.sooner().or_else(|| {
            let group = self.group.as_ref().filter(|_| self.admitted)?;
            let left = self
                .pool
                .cooldown_left(self.pick.index, group, Instant::now());
            tracing::debug!(
                key = %self.pick.id,
                group = %group,
                cooldown_ms = left.as_millis() as u64,
                "key pool: a rate-limited request retries in the group's line after the cooldown"
            );
            Some(RetrySooner(left))
        })
    }

    /// The rate-limit group of a Messages request (`None` for other endpoints).
    pub(crate) fn group(&self) -> &RateLimitGroup {
        static NONE: std::sync::OnceLock<RateLimitGroup> = std::sync::OnceLock::new();
        self.group
            .as_ref()
            .unwrap_or_else(|| NONE.get_or_init(|| RateLimitGroup::new("")))
    }

    fn end_in_flight(&mut self) {
        if std::mem::take(&mut self.in_flight) {
            self.pool.done(self.pick.index);
        }
    }

    /// Observes the response head: feeds the layer's own board, removes a key upstream
    /// rejected with 401 or 402 on a Messages API endpoint, puts a key refused with 403 last
    /// in its group.
    /// Returns whether the headers went into the board.
    fn observe_head(&mut self, status: StatusCode, headers: &HeaderMap) -> bool {
        self.end_in_flight();
        let mut observed = false;
        if self.config.own_board {
            if let Some(group) = &self.group {
                let snap = RateLimitSnapshot::from_headers(headers);
                if !snap.is_empty() {
                    self.config.board.observe(&self.pick.id, group, &snap);
                    observed = true;
                }
            }
        }
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::PAYMENT_REQUIRED if !self.judges_key => {
                tracing::info!(
                    key = %self.pick.id,
                    status = status.as_u16(),
                    "key pool: {} outside the Messages API; the key stays in rotation",
                    status.as_u16()
                );
            }
            StatusCode::UNAUTHORIZED => self.remove(RemovalReason::Unauthorized),
            StatusCode::PAYMENT_REQUIRED => self.remove(RemovalReason::Billing),
            _ => {
                self.pool.validated(self.pick.index);
                if status == StatusCode::FORBIDDEN {
                    self.forbid();
                }
            }
        }
        observed
    }

    /// A 403 `permission_error`: the key authenticated but may not do this in this group
    /// (typically a model its workspace cannot use). Other keys go first there for a while.
    fn forbid(&self) {
        let Some(group) = &self.group else {
            return;
        };
        let until = Instant::now() + self.config.forbidden_cooldown;
        if self.pool.forbid(self.pick.index, group, until) {
            tracing::warn!(
                key = %self.pick.id,
                group = %group,
                for_s = self.config.forbidden_cooldown.as_secs(),
                "key pool: key refused with 403 in this group; other keys go first there"
            );
        }
    }

    fn remove(&self, reason: RemovalReason) {
        if self.pool.remove(self.pick.index, reason) {
            tracing::warn!(
                key = %self.pick.id,
                reason = %reason,
                active = self.pool.active(),
                "key pool: key taken out of rotation"
            );
        }
    }

    /// Observes a 429 or 400 once the start of its body is read: a spend cap (any shape, see
    /// [`ApiError::from_response`]) removes the key, a 429 rate limit cools it down. Returns
    /// whether the key failed the request (another key may take it).
    fn observe_error(&self, status: StatusCode, headers: &HeaderMap, error: &ApiError) -> bool {
        if error.kind() == ApiErrorKind::SpendLimit {
            self.remove(RemovalReason::SpendCap);
            return true;
        }
        if status != StatusCode::TOO_MANY_REQUESTS {
            return false;
        }
        let Some(group) = &self.group else {
            return true;
        };
        let delay = cooldown(headers, self.config.default_cooldown).min(self.config.max_cooldown);
        let until = Instant::now() + delay;
        self.pool.cool_down(self.pick.index, group, until);
        tracing::debug!(
            key = %self.pick.id,
            group = %group,
            cooldown_ms = delay.as_millis() as u64,
            "key pool: key cooling down after 429"
        );
        true
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        self.end_in_flight();
    }
}

/// The cooldown a 429 asks for: `retry-after-ms` / `retry-after`, else the latest reset of an
/// exhausted bucket, else `default`.
fn cooldown(headers: &HeaderMap, default: Duration) -> Duration {
    let now = SystemTime::now();
    if let Some(d) = retry_after(headers, now) {
        return d;
    }
    let snap = RateLimitSnapshot::from_headers(headers);
    let exhausted = |b: &BucketSnapshot| {
        (b.remaining == Some(0))
            .then_some(b.reset)
            .flatten()
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
    };
    [
        &snap.requests,
        &snap.tokens,
        &snap.input_tokens,
        &snap.output_tokens,
    ]
    .into_iter()
    .filter_map(exhausted)
    .max()
    .unwrap_or(default)
}

/// Response future of [`KeyPool`](super::KeyPool): waits for the inner response, observes it
/// (cooldown, removal), and tags it with [`ChosenKey`].
#[pin_project]
pub struct ResponseFuture<F, B> {
    #[pin]
    state: State<F, B>,
}

/// Waiting for the pool to admit the request (see `Pool::admit`), then calling the inner
/// service: the call's future and the request's bookkeeping.
type Admitting<F> = Pin<Box<dyn Future<Output = Result<(F, Sent), BoxError>> + Send>>;

#[pin_project(project = StateProj)]
enum State<F, B> {
    /// Waiting for quota in the pool's line.
    Admitting {
        fut: Admitting<F>,
    },
    Calling {
        #[pin]
        fut: F,
        sent: Option<Sent>,
    },
    /// Reading the start of a 429 or 400 body. Boxed: only those answers get here, and the
    /// layers above hold this future (and move it as theirs are built).
    Reading {
        read: Pin<Box<ReadErrorAnswer<B>>>,
        sent: Option<Sent>,
    },
    Failed {
        error: Option<KeyPoolError>,
    },
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Admitting { .. } => "admitting",
            State::Calling { .. } => "calling",
            State::Reading { .. } => "reading",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn called(fut: F, sent: Sent) -> Self {
        Self {
            state: State::Calling {
                fut,
                sent: Some(sent),
            },
        }
    }

    pub(crate) fn admitting(fut: Admitting<F>) -> Self {
        Self {
            state: State::Admitting { fut },
        }
    }

    pub(crate) fn failed(error: KeyPoolError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<KeyPoolBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Admitting { fut } => {
                    let (fut, sent) = match ready!(fut.as_mut().poll(cx)) {
                        Ok(called) => called,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    this.state.set(State::Calling {
                        fut,
                        sent: Some(sent),
                    });
                }
                StateProj::Failed { error } => {
                    let err = error.take().unwrap_or_else(|| KeyPoolError::all_removed(0));
                    return Poll::Ready(Err(err.into()));
                }
                StateProj::Calling { fut, sent } => {
                    let result = ready!(fut.poll(cx));
                    let mut sent = match sent.take() {
                        Some(s) => s,
                        None => {
                            return Poll::Ready(
                                result.map(|r| r.map(Replay::new)).map_err(Into::into),
                            );
                        }
                    };
                    let mut response = result.map_err(Into::into)?;
                    if sent.observe_head(response.status(), response.headers()) {
                        let mark = sent.config.board.observed_mark();
                        response.extensions_mut().insert(mark);
                    }
                    let chosen = ChosenKey::new(sent.pick.id.clone());
                    // A 429 (rate limit or spend cap) and a 400 (which may be a spend cap in
                    // another shape) are classified from the start of their body.
                    if !matches!(
                        response.status(),
                        StatusCode::TOO_MANY_REQUESTS | StatusCode::BAD_REQUEST
                    ) {
                        let key_failed = match response.status() {
                            StatusCode::UNAUTHORIZED | StatusCode::PAYMENT_REQUIRED => {
                                sent.judges_key
                            }
                            StatusCode::FORBIDDEN => true,
                            _ => false,
                        };
                        let mut response = response.map(Replay::new);
                        response.extensions_mut().insert(chosen);
                        if let Some(sooner) = key_failed.then(|| sent.sooner()).flatten() {
                            response.extensions_mut().insert(sooner);
                        }
                        return Poll::Ready(Ok(response));
                    }
                    this.state.set(State::Reading {
                        read: Box::pin(read_error_answer(response, MAX_ERROR_BODY)),
                        sent: Some(sent),
                    });
                }
                StateProj::Reading { read, sent } => {
                    let (mut parts, body) = ready!(read.as_mut().poll(cx)).into_parts();
                    if let Some(sent) = sent.take() {
                        let answer = parts.extensions.get::<ErrorAnswer>();
                        let key_failed = answer.is_some_and(|a| {
                            sent.observe_error(parts.status, &parts.headers, a.error())
                        });
                        let rate_limited = parts.status == StatusCode::TOO_MANY_REQUESTS
                            && answer.is_some_and(|a| a.error().kind() != ApiErrorKind::SpendLimit);
                        parts
                            .extensions
                            .insert(ChosenKey::new(sent.pick.id.clone()));
                        let sooner = match (key_failed, rate_limited) {
                            (false, _) => None,
                            (true, true) => sent.sooner_after_rate_limit(),
                            (true, false) => sent.sooner(),
                        };
                        if let Some(sooner) = sooner {
                            parts.extensions.insert(sooner);
                        }
                    }
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_messages_paths_judge_the_key() {
        for path in [
            "/v1/messages",
            "/v1/messages/",
            "/v1/messages/count_tokens",
            "/v1/messages/batches/msgbatch_1",
            "/prefix/v1/messages",
        ] {
            assert!(judges_the_key(path), "{path}");
        }
        for path in [
            "/v1/organizations/me",
            "/v1/models",
            "/v1/messagesx",
            "/v1/messages/../organizations/me",
            "/v1/messages/%2e%2e/admin",
            "/v1/./messages",
            "/",
        ] {
            assert!(!judges_the_key(path), "{path}");
        }
    }

    #[test]
    fn cooldown_prefers_retry_after_then_the_exhausted_bucket_reset() {
        let default = Duration::from_secs(1);
        let mut headers = HeaderMap::new();
        assert_eq!(cooldown(&headers, default), default);
        let reset = SystemTime::now() + Duration::from_secs(42);
        let snap = RateLimitSnapshot {
            input_tokens: BucketSnapshot {
                limit: Some(1000),
                remaining: Some(0),
                reset: Some(reset),
            },
            requests: BucketSnapshot {
                limit: Some(50),
                remaining: Some(10),
                reset: Some(SystemTime::now() + Duration::from_secs(300)),
            },
            ..Default::default()
        };
        snap.write_headers(&mut headers);
        let d = cooldown(&headers, default);
        // RFC 3339 with second precision: within a second of 42 s.
        assert!(
            d > Duration::from_secs(40) && d <= Duration::from_secs(42),
            "{d:?}"
        );
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(cooldown(&headers, default), Duration::from_secs(7));
    }
}
