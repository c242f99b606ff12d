//! [`Resend`]: how the layer directly above a retry layer built the request it sent, so that
//! the retry layer can send it again without keeping a copy of its own.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request};

use super::MaxServerWait;
use crate::anthropic::{KeyId, ModelEntry, RequestMeta};
use crate::body::{RequestBody, RequestTemplate};
use crate::quota::Cost;

/// A request extension (crate-private): the request is the source's template with `body`
/// (the template's own when `None`), its [`RequestMeta`] replaced by `meta` when set; its [`MaxServerWait`] is for the retry layer
/// alone (its one reader), which asks for it here ([`Resend::max_server_wait`]) when an
/// attempt is rate limited: it is not put on the request.
///
/// A layer that keeps its own [`RequestTemplate`] anyway (fallback, for its other models)
/// attaches it to the request it sends **only when the layer directly below it is a retry
/// layer** ([`ClaudeStack`](crate::stack::ClaudeStack) composes them so and says so to the
/// fallback layer): nothing between them can change the request, so the retry layer sends the
/// request it received as the first attempt and rebuilds later attempts from this
/// description. Without it, retry keeps a copy of the request, and the first attempt is a
/// copy of that copy: one request head (headers, extensions, URI) copied and freed fewer per
/// request.
#[derive(Clone)]
pub(crate) struct Resend {
    /// What the layer above keeps of the request for every attempt (the template, its key,
    /// its lower models): one reference count for all of it.
    pub(crate) source: Arc<dyn Described>,
    /// The body sent, when not the template's own (another model's rewritten body).
    pub(crate) body: Option<RequestBody>,
    /// Boxed: set only for another model than the requested one (the extension stays small).
    pub(crate) meta: Option<Box<RequestMeta>>,
    /// The layer above's [`MaxServerWait`] for this request, or how to decide it.
    pub(crate) max_server_wait: ServerWait,
}

/// What the layer directly above a retry layer keeps of a request for all its attempts, and
/// shares with every [`Resend`] it attaches (fallback's walk: the request as received, its
/// key, its chain of models).
pub(crate) trait Described: Send + Sync {
    /// The request as the layer above received it.
    fn template(&self) -> &RequestTemplate;

    /// The request's key, as [`KeyId::of_request`] read it (the layer above read it already).
    fn key(&self) -> &KeyId;

    /// Whether a model below candidate `idx` of the request's chain is left (and the depth
    /// allows moving to it, `visited` models sent to, `idx` included), by the board as it is
    /// now.
    fn lower_left(&self, idx: usize, visited: usize) -> bool;

    /// The longest server-asked wait while a lower model is left.
    fn max_wait(&self) -> Duration;
}

/// The layer above (fallback) deciding whether a lower model than the one sent is left for a
/// request: then a 429 asking for a long wait is not waited out (see [`MaxServerWait`]).
pub(crate) trait LowerModels: Send + Sync {
    /// Whether a model below candidate `idx` of `candidates` is left (and the depth allows
    /// moving to it, `visited` models sent to, `idx` included) for the request described by
    /// `meta` and `headers`, sent with `key` at `cost`, by the board as it is now.
    #[allow(clippy::too_many_arguments)]
    fn lower_left(
        &self,
        meta: &RequestMeta,
        headers: &HeaderMap,
        candidates: &[ModelEntry],
        idx: usize,
        visited: usize,
        key: &KeyId,
        cost: &Cost,
    ) -> bool;

    /// The longest server-asked wait while a lower model is left.
    fn max_wait(&self) -> Duration;
}

/// A [`Resend`]'s [`MaxServerWait`]: decided when the request was built, or left to be
/// decided when retry needs it (a rate-limited attempt; most requests never are), with the
/// board as it is then. Asking costs a look at the lower models' quota, which the request
/// then does not pay when it is answered at once.
#[derive(Clone, Copy)]
pub(crate) enum ServerWait {
    /// Decided (`None`: no lower model can be left, the walk's depth or chain is at its end).
    Set(Option<MaxServerWait>),
    /// Decided by the [`Described`] source when asked: the request was sent to candidate
    /// `idx`, `visited` models sent to.
    Ask { idx: usize, visited: usize },
}

impl Resend {
    /// The request's [`MaxServerWait`] from the layer above, decided now when it was left
    /// to be asked; else the one the request itself carries (the application's), if any.
    pub(crate) fn max_server_wait(&self) -> Option<MaxServerWait> {
        let above = match self.max_server_wait {
            ServerWait::Set(wait) => wait,
            ServerWait::Ask { idx, visited } => self
                .source
                .lower_left(idx, visited)
                .then(|| MaxServerWait(self.source.max_wait())),
        };
        above.or_else(|| {
            self.source
                .template()
                .extensions()
                .get::<MaxServerWait>()
                .copied()
        })
    }

    /// The request again, as it was sent.
    pub(crate) fn request(&self) -> Request<RequestBody> {
        let template = self.source.template();
        let body = match &self.body {
            Some(body) => body.clone(),
            None => template.body().clone(),
        };
        let mut req = template.with_body(body);
        if let Some(meta) = &self.meta {
            req.extensions_mut().insert(RequestMeta::clone(meta));
        }
        req
    }

    /// The request's [`RequestMeta`].
    pub(crate) fn meta(&self) -> Option<&RequestMeta> {
        self.meta
            .as_deref()
            .or_else(|| self.source.template().meta())
    }

    /// The request's headers.
    pub(crate) fn headers(&self) -> &HeaderMap {
        self.source.template().headers()
    }

    /// The request's key.
    pub(crate) fn key(&self) -> &KeyId {
        self.source.key()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A source that says whether a lower model is left as told, counting the questions.
    struct Source {
        template: RequestTemplate,
        key: KeyId,
        lower: AtomicBool,
        asked: AtomicUsize,
    }

    impl Described for Source {
        fn template(&self) -> &RequestTemplate {
            &self.template
        }
        fn key(&self) -> &KeyId {
            &self.key
        }
        fn lower_left(&self, idx: usize, visited: usize) -> bool {
            assert_eq!((idx, visited), (0, 1));
            self.asked.fetch_add(1, Ordering::Relaxed);
            self.lower.load(Ordering::Relaxed)
        }
        fn max_wait(&self) -> Duration {
            Duration::from_secs(5)
        }
    }

    fn source(req: Request<RequestBody>) -> Arc<Source> {
        Arc::new(Source {
            template: RequestTemplate::new(req),
            key: KeyId::named("k"),
            lower: AtomicBool::new(true),
            asked: AtomicUsize::new(0),
        })
    }

    #[test]
    fn rebuilds_what_was_sent() {
        let mut req = Request::post("/v1/messages")
            .header("x-api-key", "k")
            .body(RequestBody::from(bytes::Bytes::from_static(
                br#"{"model":"a","max_tokens":1,"messages":[]}"#,
            )))
            .unwrap();
        RequestMeta::get_or_scan(&mut req).unwrap();
        let source = source(req);
        let other = RequestMeta::scan(br#"{"model":"b","max_tokens":1,"messages":[]}"#).unwrap();
        let resend = Resend {
            source: source.clone(),
            body: Some(RequestBody::from(bytes::Bytes::from_static(b"{}"))),
            meta: Some(Box::new(other)),
            max_server_wait: ServerWait::Set(Some(MaxServerWait(Duration::from_secs(3)))),
        };
        let req = resend.request();
        assert_eq!(req.headers()["x-api-key"], "k");
        assert_eq!(req.body().len(), 2);
        let meta = req.extensions().get::<RequestMeta>().unwrap();
        assert_eq!(meta.model.as_deref(), Some("b"));
        assert_eq!(resend.meta().unwrap().model.as_deref(), Some("b"));
        assert_eq!(resend.key().as_str(), "k");
        // The wait is for the retry layer, which reads it here: not on the request.
        assert_eq!(req.extensions().get::<MaxServerWait>(), None);
        assert_eq!(
            resend.max_server_wait(),
            Some(MaxServerWait(Duration::from_secs(3)))
        );
        let plain = Resend {
            source,
            body: None,
            meta: None,
            max_server_wait: ServerWait::Set(None),
        };
        assert_eq!(plain.meta().unwrap().model.as_deref(), Some("a"));
        let req = plain.request();
        assert!(req.extensions().get::<MaxServerWait>().is_none());
        // No body of its own: the template's.
        assert_eq!(
            req.body().bytes().as_ref(),
            br#"{"model":"a","max_tokens":1,"messages":[]}"#
        );
    }

    /// Left to be asked: decided when asked (each time, by the layer above as it is then);
    /// the request's own wait when no lower model is left.
    #[test]
    fn an_asked_wait_is_decided_when_asked() {
        let mut req = Request::post("/v1/messages")
            .body(RequestBody::from(bytes::Bytes::from_static(
                br#"{"model":"a","max_tokens":1,"messages":[]}"#,
            )))
            .unwrap();
        req.extensions_mut()
            .insert(MaxServerWait(Duration::from_secs(60)));
        RequestMeta::get_or_scan(&mut req).unwrap();
        let source = source(req);
        let resend = Resend {
            source: source.clone(),
            body: None,
            meta: None,
            max_server_wait: ServerWait::Ask { idx: 0, visited: 1 },
        };
        assert_eq!(
            source.asked.load(Ordering::Relaxed),
            0,
            "not asked until needed"
        );
        assert_eq!(
            resend.max_server_wait(),
            Some(MaxServerWait(Duration::from_secs(5)))
        );
        source.lower.store(false, Ordering::Relaxed);
        assert_eq!(
            resend.max_server_wait(),
            Some(MaxServerWait(Duration::from_secs(60))),
            "no lower model left: the request's own"
        );
        assert_eq!(source.asked.load(Ordering::Relaxed), 2);
    }
}
