//! [`Metrics`]: the service built by [`MetricsLayer`](super::MetricsLayer).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::body::MetricsBody;
use super::future::{Requested, ResponseFuture};
use super::shared::{Label, RequestInfo, Shared};
use crate::BoxError;
use crate::anthropic::{KeyId, RequestMeta, is_messages_request};
use crate::body::RequestBody;

/// Records metrics and a tracing span for every Messages API request; see
/// [`MetricsLayer`](super::MetricsLayer). Other requests pass through untouched.
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Metrics<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
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

impl<S, ResBody> Service<Request<RequestBody>> for Metrics<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<MetricsBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        if !is_messages_request(req.method(), req.uri()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        // The outermost layer: the request's map gets room for what the layers below add
        // (`RequestMeta`, which carries the key memo, and fallback's description for retry;
        // beside a deadline and a tenant the caller set, the fourth entry grew it).
        crate::exchange::make_room(req.extensions_mut());
        let Ok(meta) = RequestMeta::get_or_scan_in(&mut req, &self.shared.catalog) else {
            return ResponseFuture::passthrough(self.inner.call(req));
        };
        let input_estimate = meta.input_tokens;
        let stream = meta.stream;
        let shared = &self.shared;
        let labels = shared.labels_of(meta.resolved_entry());
        // The requested model, for an answer that names its served model only in a header: a
        // known model is its label (the request's own, not another reference), another one
        // is copied.
        let requested = match meta.model.as_deref() {
            None => Requested::None,
            Some(m) if *labels.model_label == *m => Requested::Labelled,
            Some(m) => Requested::Other(Label::from(m)),
        };
        if let (Some(forecaster), Some(group)) = (&shared.forecaster, &labels.group) {
            forecaster.record(group, 1, input_estimate, 0);
        }
        // The key is read for the span alone: lent from the request's memo, not cloned.
        let span = KeyId::with_request(&mut req, |key| {
            let anonymous;
            let key = match key {
                Some(key) => key,
                None => {
                    anonymous = KeyId::anonymous();
                    &anonymous
                }
            };
            tracing::info_span!(
                "claude_request",
                key = %key,
                group = %labels.group_label,
                model = %labels.model_label,
                stream,
                status = tracing::field::Empty,
                attempts = tracing::field::Empty,
                cache = tracing::field::Empty,
                served_model = tracing::field::Empty,
                queue_wait_ms = tracing::field::Empty,
            )
        });
        shared.handles.in_flight(|g| g.increment(1.0));
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ResponseFuture::observed(
            fut,
            requested,
            RequestInfo {
                shared: self.shared.clone(),
                start: Instant::now(),
                labels,
                span,
            },
        )
    }
}
