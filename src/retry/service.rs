//! The [`Retry`] service.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::backoff::Need;
use super::future::{Attempts, ResponseFuture, Template, described_key, group_of, set_attempt};
use super::layer::Shared;
use super::{Deadline, MaxServerWait, Resend, RetryBody};
use crate::BoxError;
use crate::anthropic::{KeyId, RequestMeta, is_messages_request};
use crate::body::RequestBody;

/// Retries transient failures of Messages API calls. Built by
/// [`RetryLayer`](super::RetryLayer); see the [module docs](super).
///
/// Like [`tower::retry::Retry`], it needs a `Clone` inner service: the first attempt is sent
/// by the service that was polled ready; a further attempt by a clone (of one spare clone the
/// layer keeps, taken at its first request), on which it calls
/// [`ready`](tower::ServiceExt::ready) first. A request sent once clones nothing.
pub struct Retry<S> {
    inner: S,
    /// The service's state, its spare included: one per service the layer builds, shared by
    /// its clones.
    shared: Arc<Shared>,
    _service: PhantomData<fn() -> S>,
}

impl<S> Retry<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            shared,
            _service: PhantomData,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Retry<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            _service: PhantomData,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("max_attempts", &self.shared.config.max_attempts)
            .finish_non_exhaustive()
    }
}

impl<S, ResBody> Service<Request<RequestBody>> for Retry<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<RetryBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        if !is_messages_request(req.method(), req.uri()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let config = &self.shared.config;
        // The layer directly above (fallback) described how it built this request: its
        // `RequestMeta` and key come with the description, not read from the request again.
        let resend = req.extensions_mut().remove::<Resend>();
        let described = resend.as_ref().and_then(Resend::meta);
        // A description with its meta gives the request's key and group when they are asked
        // for (`Template::quota_key`): not copied here for every request.
        let lazy_key = described.is_some();
        let meta = match described {
            Some(meta) => Ok(meta),
            None => RequestMeta::get_or_scan_in(&mut req, &config.catalog),
        };
        let (group, need) = match meta {
            Ok(meta) => (
                (!lazy_key).then(|| group_of(meta, &config.catalog)),
                Need {
                    input_tokens: meta.input_tokens,
                    output_tokens: meta.max_tokens.unwrap_or(0),
                },
            ),
            // Upstream answers 400: nothing to retry.
            Err(_) => return ResponseFuture::passthrough(self.inner.call(req)),
        };
        let now = Instant::now();
        // The deadline this layer adds (none when the request carries one).
        let mut added = None;
        let deadline = match req.extensions().get::<Deadline>() {
            Some(deadline) => Some(*deadline),
            None => {
                let deadline = config
                    .deadline
                    .and_then(|d| now.checked_add(d))
                    .map(Deadline::at);
                if let Some(deadline) = deadline {
                    // Layers below see the effective deadline too.
                    req.extensions_mut().insert(deadline);
                    added = Some(deadline);
                }
                deadline
            }
        };
        // With a description from fallback the `MaxServerWait` is asked of it when an attempt
        // is rate limited (see `Template::max_server_wait`); else the request's own, now.
        let max_server_wait = match resend {
            Some(_) => None,
            None => req.extensions().get::<MaxServerWait>().map(|m| m.0),
        };
        let key = group.map(|group| {
            let key = match &resend {
                Some(resend) => resend.key().clone(),
                None => KeyId::of_request(&mut req).unwrap_or_else(KeyId::anonymous),
            };
            (key, group)
        });
        let deadline = deadline.map(Deadline::instant);
        // Nothing paced (no 429 seen): no admission to ask for, no key made for it.
        let gate = if config.pacing && !self.shared.pacer.idle() {
            match (&key, &resend) {
                (Some(key), _) => self.shared.pacer.admit(key, deadline),
                (None, Some(resend)) => self
                    .shared
                    .pacer
                    .admit(&described_key(resend, &config.catalog), deadline),
                (None, None) => None,
            }
        } else {
            None
        };
        self.shared.keep_spare(&self.inner);
        if gate.is_some() {
            // The request first waits for a pacing slot: do not sit on what `poll_ready`
            // reserved (a concurrency permit, say) meanwhile; the future readies a clone of
            // the spare.
            let fresh = self.inner.clone();
            drop(std::mem::replace(&mut self.inner, fresh));
        }
        let shared = self.shared.clone();
        let read = deadline.is_some().then_some(config.max_json_read);
        // Every field of the request's state goes where it stays (`attempts!`): built as one
        // value and handed down, the state (~400 bytes) was copied twice before the first
        // attempt's box (~700 bytes, itself copied into its allocation) was.
        macro_rules! attempts {
            ($template:expr) => {
                Attempts {
                    shared,
                    template: $template,
                    need,
                    deadline,
                    max_server_wait,
                    started: now,
                    gate,
                }
            };
        }
        // The layer above said how it built this request: send it as it is and rebuild later
        // attempts from that (no copy of our own). The service driven to readiness sends the
        // first attempt now, unless the request waits for a pacing slot first; later ones are
        // sent by a clone of the spare.
        match resend {
            Some(resend) => {
                // The description goes into the template where the template stays.
                if gate.is_some() {
                    return ResponseFuture::paced::<S>(attempts!(Template::resent(
                        resend, added, key
                    )));
                }
                set_attempt(&mut req, 1);
                let call = self.inner.call(req);
                ResponseFuture::first::<S>(call, deadline, read, || {
                    attempts!(Template::resent(resend, added, key))
                })
            }
            None => {
                let Some(key) = key else {
                    // A request without a description always has its own key.
                    return ResponseFuture::passthrough(self.inner.call(req));
                };
                let template = Template::new(req, key);
                if gate.is_some() {
                    return ResponseFuture::paced::<S>(attempts!(template));
                }
                let call = self.inner.call(template.request(1));
                ResponseFuture::first::<S>(call, deadline, read, || attempts!(template))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::retry::RetryInfo;

    /// An upstream that counts its clones and answers 529 to the calls listed in `fail`.
    struct Counted {
        clones: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
        fail: &'static [usize],
    }

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::Relaxed);
            Self {
                clones: self.clones.clone(),
                calls: self.calls.clone(),
                fail: self.fail,
            }
        }
    }

    impl Service<Request<RequestBody>> for Counted {
        type Response = Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Self::Response, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<RequestBody>) -> Self::Future {
            let call = self.calls.fetch_add(1, Ordering::Relaxed);
            let status = if self.fail.contains(&call) { 529 } else { 200 };
            std::future::ready(Ok(Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"type":"message","usage":{"input_tokens":3,"output_tokens":1}}"#,
                )))
                .unwrap()))
        }
    }

    fn request() -> Request<RequestBody> {
        Request::post("/v1/messages")
            .header("x-api-key", "k")
            .body(RequestBody::from(
                r#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#,
            ))
            .unwrap()
    }

    /// The spare kept in the service's shared state: taken once (the first request), not per
    /// request; an attempt after the first is sent by a clone of it, of the service's type.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn later_attempts_are_sent_by_a_clone_of_the_spare() {
        let clones = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let upstream = Counted {
            clones: clones.clone(),
            calls: calls.clone(),
            fail: &[2],
        };
        let mut svc = super::super::RetryLayer::new().seed(1).layer(upstream);
        for _ in 0..2 {
            let resp = svc.ready().await.unwrap().call(request()).await.unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert_eq!(clones.load(Ordering::Relaxed), 1, "the spare, once");
        // The third call answers 529: the second attempt goes to a clone of the spare.
        let resp = svc.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.extensions().get::<RetryInfo>().unwrap().attempts(), 2);
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        assert_eq!(clones.load(Ordering::Relaxed), 2, "one clone of the spare");
        // A clone of the service shares the spare.
        let mut twin = svc.clone();
        let resp = twin.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            clones.load(Ordering::Relaxed),
            3,
            "the service's clone only"
        );
    }
}
