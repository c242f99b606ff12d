//! [`Pacing`]: the service built by [`PacingLayer`](super::PacingLayer).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::future::ResponseFuture;
use crate::BoxError;
use crate::anthropic::{KeyId, ModelCatalog, RateLimitGroup, RequestMeta, is_messages_request};
use crate::body::RequestBody;
use crate::metrics::forecast::{Forecast, Forecaster};
use crate::metrics::names;
use crate::quota::{Limits, QuotaBoard};

/// The longest spacing one request can add (a request costing more than a minute of quota
/// is the rate limiter's business).
const MAX_SPACING: Duration = Duration::from_secs(60);

/// The window the ramp compares: releases over the last minute against the minute before.
const RAMP_WINDOW: Duration = Duration::from_secs(60);

/// The most release times a group keeps for the ramp (beyond, the oldest are forgotten).
const MAX_RELEASES: usize = 100_000;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) forecaster: Forecaster,
    pub(crate) catalog: ModelCatalog,
    pub(crate) limits: HashMap<RateLimitGroup, Limits>,
    pub(crate) default_limits: Option<Limits>,
    pub(crate) board: Option<QuotaBoard>,
    pub(crate) trigger: f64,
    pub(crate) release: Option<f64>,
    pub(crate) target: f64,
    pub(crate) ramp: Option<f64>,
    pub(crate) groups: Arc<Mutex<HashMap<RateLimitGroup, GroupPace>>>,
}

#[derive(Debug)]
pub(crate) struct GroupPace {
    active: bool,
    next_free: Instant,
    /// Release times (past, and scheduled in the future) over the last two ramp windows,
    /// oldest first; kept only with a ramp.
    released: VecDeque<Instant>,
}

impl GroupPace {
    /// Releases at or before `t` and after `t - back` (all of them when that is before the
    /// clock's origin).
    fn released_in(&self, t: Instant, back: Duration) -> usize {
        let upto = self.released.partition_point(|&a| a <= t);
        let from = t
            .checked_sub(back)
            .map_or(0, |s| self.released.partition_point(|&a| a <= s));
        upto.saturating_sub(from)
    }

    /// Whether one more release at `t` keeps the ramp: the releases of the last minute
    /// (this one included) exceed those of the minute before by at most `ramp`.
    fn ramp_allows(&self, t: Instant, ramp: f64) -> bool {
        let last = self.released_in(t, RAMP_WINDOW);
        let both = self.released_in(t, RAMP_WINDOW * 2);
        let before = both - last;
        (last + 1) as f64 <= before as f64 + ramp.max(1.0) + 1e-9
    }

    /// The first instant at or after `start` at which the ramp allows a release (nothing
    /// before it can change the counts but releases leaving a window).
    fn ramp_start(&self, start: Instant, ramp: f64) -> Instant {
        if self.ramp_allows(start, ramp) {
            return start;
        }
        // The counts change only when a release leaves the last minute or the one before;
        // each of the two sequences of such instants is sorted, so the earliest instant that
        // allows a release is the earlier of the first one in each sequence.
        let first_in = |shift: Duration| {
            self.released
                .iter()
                .map(|&a| a + shift)
                .filter(|&t| t > start)
                .find(|&t| self.ramp_allows(t, ramp))
        };
        match (first_in(RAMP_WINDOW), first_in(RAMP_WINDOW * 2)) {
            (Some(a), Some(b)) => a.min(b),
            (Some(t), None) | (None, Some(t)) => t,
            // Two minutes after the last release nothing is counted any more.
            (None, None) => start + RAMP_WINDOW * 2,
        }
    }

    fn record_release(&mut self, at: Instant, now: Instant) {
        let keep = RAMP_WINDOW * 2;
        while self
            .released
            .front()
            .is_some_and(|&a| now.saturating_duration_since(a) >= keep)
            || self.released.len() >= MAX_RELEASES
        {
            self.released.pop_front();
        }
        // Releases are scheduled in order, so the log stays sorted.
        let at = self.released.back().map_or(at, |&last| at.max(last));
        self.released.push_back(at);
    }
}

impl Config {
    /// The limits pacing `group` aims under: the layer's own, its default, then the board's
    /// for `key` (configured, else learned from the `anthropic-ratelimit-*-limit` headers of
    /// an answer, so a proxy without configured limits paces once the first answer is in).
    fn limits_of(&self, key: &KeyId, group: &RateLimitGroup) -> Option<Limits> {
        self.limits
            .get(group)
            .copied()
            .or(self.default_limits)
            .or_else(|| {
                let board = self.board.as_ref()?;
                board.key_limits(key, group).or_else(|| {
                    let h = board.headroom(key, group)?;
                    Some(Limits::new(
                        h.requests?.limit,
                        h.input_tokens?.limit,
                        h.output_tokens?.limit,
                    ))
                })
            })
    }

    /// The delay before a request of `group` with this input estimate and `max_tokens`.
    fn delay(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        limits: Limits,
        input: u64,
        max_tokens: Option<u64>,
    ) -> Duration {
        let now = Instant::now();
        let forecast = self.forecaster.forecast(group);
        let share = forecast.as_ref().map_or(0.0, |f| share_of(f, limits));
        let release = self.release.unwrap_or(self.trigger - 0.1).min(self.trigger);
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let pace = groups.entry(group.clone()).or_insert(GroupPace {
            active: false,
            next_free: now,
            released: VecDeque::new(),
        });
        // With a ramp: is the forecast rising faster than the ramp can follow from what was
        // released over the last minute (scheduled releases included)?
        let too_steep = self.ramp.is_some_and(|ramp| {
            let released = pace.released_in(pace.next_free.max(now), RAMP_WINDOW) as f64;
            forecast
                .as_ref()
                .is_some_and(|f| f.forecast.requests > released + ramp)
        });
        if !pace.active && (share >= self.trigger || too_steep) {
            pace.active = true;
            tracing::info!(%group, share, too_steep, "pacing on");
        } else if pace.active && share < release && !too_steep {
            pace.active = false;
            tracing::info!(%group, share, "pacing off");
        }
        metrics::gauge!(names::PACING_ACTIVE, names::LABEL_GROUP => group.as_str().to_owned())
            .set(if pace.active { 1.0 } else { 0.0 });
        if !pace.active {
            pace.next_free = now;
            if self.ramp.is_some() {
                pace.record_release(now, now);
            }
            return Duration::ZERO;
        }
        // Output per request: what answers used lately, else the request's max_tokens.
        let output = forecast
            .filter(|f| f.forecast.requests > 0.0 && f.forecast.output_tokens > 0.0)
            .map(|f| f.forecast.output_tokens / f.forecast.requests)
            .unwrap_or_else(|| max_tokens.unwrap_or(0) as f64);
        // With a board, what is left in the buckets is spent evenly over the horizon on top
        // of the refill rate, instead of in one burst.
        let headroom = self.board.as_ref().and_then(|b| b.headroom(key, group));
        let remaining =
            |b: Option<crate::quota::BucketHeadroom>| b.map_or(0.0, |b| b.remaining as f64);
        let remaining = headroom.map_or([0.0; 3], |h| {
            [
                remaining(h.requests),
                remaining(h.input_tokens),
                remaining(h.output_tokens),
            ]
        });
        let horizon = self.forecaster.horizon().as_secs_f64().max(1.0);
        let mut spacing = 0.0f64;
        for ((cost, limit), left) in [
            (1.0, limits.rpm),
            (input as f64, limits.itpm),
            (output, limits.otpm),
        ]
        .into_iter()
        .zip(remaining)
        {
            if limit > 0 {
                let per_second = limit as f64 * self.target / 60.0 + left / horizon;
                spacing = spacing.max(cost / per_second);
            }
        }
        let spacing = Duration::try_from_secs_f64(spacing)
            .unwrap_or(MAX_SPACING)
            .min(MAX_SPACING);
        let mut start = pace.next_free.max(now);
        let mut spacing = spacing;
        if let Some(ramp) = self.ramp {
            // Never past the ramp counted over whole minutes, and spread evenly: spaced for
            // the rate of the last minute plus the ramp.
            start = pace.ramp_start(start, ramp);
            let rate = pace.released_in(start, RAMP_WINDOW) as f64 + ramp;
            let smooth = Duration::try_from_secs_f64(RAMP_WINDOW.as_secs_f64() / rate.max(1.0))
                .unwrap_or(MAX_SPACING)
                .min(MAX_SPACING);
            spacing = spacing.max(smooth);
            pace.record_release(start, now);
        }
        pace.next_free = start + spacing;
        start - now
    }
}

/// The highest share of a limit the forecast reaches.
fn share_of(forecast: &Forecast, limits: Limits) -> f64 {
    let f = forecast.forecast;
    [
        (f.requests, limits.rpm),
        (f.input_tokens, limits.itpm),
        (f.output_tokens, limits.otpm),
    ]
    .into_iter()
    .filter(|&(_, limit)| limit > 0)
    .map(|(v, limit)| v / limit as f64)
    .fold(0.0, f64::max)
}

/// Spaces admissions while a group's forecast nears its quota; see
/// [`PacingLayer`](super::PacingLayer).
///
/// A paced request waits in the [`ResponseFuture`] with a clone of the inner service.
#[derive(Debug, Clone)]
pub struct Pacing<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Pacing<S> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ResBody> Service<Request<RequestBody>> for Pacing<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        if !is_messages_request(req.method(), req.uri()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        // The request's catalogue entry, looked up once per request.
        let (entry, input, max_tokens) =
            match RequestMeta::get_or_scan_in(&mut req, &self.config.catalog) {
                Ok(meta) => match meta.resolved_entry() {
                    Some(entry) => (entry.clone(), meta.input_tokens, meta.max_tokens),
                    None => return ResponseFuture::passthrough(self.inner.call(req)),
                },
                _ => return ResponseFuture::passthrough(self.inner.call(req)),
            };
        let group = entry.group().clone();
        // An id the catalogue places nowhere is its own group: pace it only when it has
        // limits of its own (arbitrary ids must not create pacing state).
        let unknown = group.as_str() == entry.id() && entry.family().is_none();
        if unknown && !self.config.limits.contains_key(&group) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let key = KeyId::of_request(&mut req).unwrap_or_else(KeyId::anonymous);
        let Some(limits) = self.config.limits_of(&key, &group) else {
            return ResponseFuture::passthrough(self.inner.call(req));
        };
        let delay = self.config.delay(&key, &group, limits, input, max_tokens);
        if delay.is_zero() {
            return ResponseFuture::called(self.inner.call(req), Duration::ZERO);
        }
        metrics::histogram!(names::PACING_DELAY_SECONDS,
            names::LABEL_GROUP => group.as_str().to_owned())
        .record(delay.as_secs_f64());
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::sleeping(delay, service, req)
    }
}
