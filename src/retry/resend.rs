//! [`Resend`]: how the layer directly above a retry layer built the request it sent, so that
//! the retry layer can send it again without keeping a copy of its own.

use std::sync::Arc;

use http::{HeaderMap, Request};

use super::MaxServerWait;
use crate::anthropic::{KeyId, RequestMeta};
use crate::body::{RequestBody, RequestTemplate};

/// A request extension (crate-private): the request is `template` with `body`, its
/// [`RequestMeta`] replaced by `meta` when set; `max_server_wait`, when set, is for the retry
/// layer alone (its one reader), which takes it from here: it is not put on the request.
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
    pub(crate) template: Arc<RequestTemplate>,
    pub(crate) body: RequestBody,
    /// Boxed: set only for another model than the requested one (the extension stays small).
    pub(crate) meta: Option<Box<RequestMeta>>,
    pub(crate) max_server_wait: Option<MaxServerWait>,
    /// The request's key, as [`KeyId::of_request`] read it (the layer above read it already).
    pub(crate) key: KeyId,
}

impl Resend {
    /// The request again, as it was sent.
    pub(crate) fn request(&self) -> Request<RequestBody> {
        let mut req = self.template.with_body(self.body.clone());
        if let Some(meta) = &self.meta {
            req.extensions_mut().insert(RequestMeta::clone(meta));
        }
        req
    }

    /// The request's [`RequestMeta`].
    pub(crate) fn meta(&self) -> Option<&RequestMeta> {
        self.meta
            .as_deref()
            .or_else(|| self.template.extensions().get::<RequestMeta>())
    }

    /// The request's headers.
    pub(crate) fn headers(&self) -> &HeaderMap {
        self.template.headers()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rebuilds_what_was_sent() {
        let mut req = Request::post("/v1/messages")
            .header("x-api-key", "k")
            .body(RequestBody::from(bytes::Bytes::from_static(
                br#"{"model":"a","max_tokens":1,"messages":[]}"#,
            )))
            .unwrap();
        RequestMeta::get_or_scan(&mut req).unwrap();
        let template = Arc::new(RequestTemplate::new(req));
        let other = RequestMeta::scan(br#"{"model":"b","max_tokens":1,"messages":[]}"#).unwrap();
        let resend = Resend {
            template: template.clone(),
            body: RequestBody::from(bytes::Bytes::from_static(b"{}")),
            meta: Some(Box::new(other)),
            max_server_wait: Some(MaxServerWait(Duration::from_secs(3))),
            key: KeyId::named("k"),
        };
        let req = resend.request();
        assert_eq!(req.headers()["x-api-key"], "k");
        assert_eq!(req.body().len(), 2);
        let meta = req.extensions().get::<RequestMeta>().unwrap();
        assert_eq!(meta.model.as_deref(), Some("b"));
        assert_eq!(resend.meta().unwrap().model.as_deref(), Some("b"));
        // The wait is for the retry layer, which reads it here: not on the request.
        assert_eq!(req.extensions().get::<MaxServerWait>(), None);
        assert_eq!(
            resend.max_server_wait,
            Some(MaxServerWait(Duration::from_secs(3)))
        );
        let plain = Resend {
            template,
            body: RequestBody::empty(),
            meta: None,
            max_server_wait: None,
            key: KeyId::named("k"),
        };
        assert_eq!(plain.meta().unwrap().model.as_deref(), Some("a"));
        assert!(
            plain
                .request()
                .extensions()
                .get::<MaxServerWait>()
                .is_none()
        );
    }
}
