//! [`RequestTemplate`]: a request kept so that it can be sent again.

use http::{Extensions, HeaderMap, Request};

use super::RequestBody;
use crate::anthropic::RequestMeta;

/// A request kept so that it can be sent again (a retry, another model): its head and its
/// body, which is cheap to clone (see [`RequestBody`]). The one place a request is rebuilt
/// from its parts.
pub(crate) struct RequestTemplate {
    parts: http::request::Parts,
    body: RequestBody,
    /// The request's [`RequestMeta`] when it was the request's only extension
    /// ([`copy_of`](Self::copy_of)): kept beside the head, whose extensions are then empty, so
    /// that the copy makes no extension map (a map, its table and a box for the entry). Put
    /// back on every request rebuilt from the template. Boxed: a template is held inline by
    /// retry's future (its own copy, without fallback above).
    meta: Option<Box<RequestMeta>>,
}

impl RequestTemplate {
    pub(crate) fn new(req: Request<RequestBody>) -> Self {
        let (parts, body) = req.into_parts();
        Self {
            parts,
            body,
            meta: None,
        }
    }

    /// A copy of `req` (extensions included), the request left as it is.
    pub(crate) fn copy_of(req: &Request<RequestBody>) -> Self {
        // The head cloned field by field into an empty one, as `Parts::clone` does: the
        // request's `Parts` are reached only by taking the request apart, and taking it apart
        // and putting it back together moved it (~260 bytes) twice. The extensions are
        // copied only when there is more than the `RequestMeta`.
        let (mut copy, ()) = Request::new(()).into_parts();
        copy.method = req.method().clone();
        copy.uri = req.uri().clone();
        copy.version = req.version();
        copy.headers = req.headers().clone();
        let extensions = req.extensions();
        let meta = match RequestMeta::in_extensions(extensions) {
            // Most requests carry nothing else: no map is copied. The key id's memo is
            // left out (a reference count taken and dropped per request for nothing: the
            // layer keeping the copy holds the key id, and a request rebuilt from the copy
            // has its key id derived again, from the same headers, by the layer asking).
            Some(meta) if extensions.len() == 1 => Some(Box::new(meta.copy_without_key_memo())),
            _ => {
                copy.extensions = extensions.clone();
                None
            }
        };
        let body = req.body().clone();
        Self {
            parts: copy,
            body,
            meta,
        }
    }

    /// The request again, with its own body.
    pub(crate) fn request(&self) -> Request<RequestBody> {
        self.with_body(self.body.clone())
    }

    /// The request again, with `body` instead of its own.
    pub(crate) fn with_body(&self, body: RequestBody) -> Request<RequestBody> {
        let mut req = Request::from_parts(self.parts.clone(), body);
        if let Some(meta) = &self.meta {
            req.extensions_mut().insert(RequestMeta::clone(meta));
        }
        req
    }

    /// The request's headers.
    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    /// The request's extensions but its [`RequestMeta`] (read it with [`meta`](Self::meta)).
    pub(crate) fn extensions(&self) -> &Extensions {
        &self.parts.extensions
    }

    /// The request's [`RequestMeta`], if it has one.
    pub(crate) fn meta(&self) -> Option<&RequestMeta> {
        self.meta
            .as_deref()
            .or_else(|| RequestMeta::in_extensions(&self.parts.extensions))
    }

    /// The request's body.
    pub(crate) fn body(&self) -> &RequestBody {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_the_whole_head() {
        let mut req = Request::post("/v1/messages")
            .header("x-api-key", "k")
            .body(RequestBody::from(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        req.extensions_mut().insert(7u32);
        let t = RequestTemplate::new(req);
        for req in [t.request(), t.with_body(RequestBody::empty())] {
            assert_eq!(req.method(), http::Method::POST);
            assert_eq!(req.uri(), "/v1/messages");
            assert_eq!(req.headers()["x-api-key"], "k");
            assert_eq!(req.extensions().get::<u32>(), Some(&7));
        }
        assert_eq!(t.request().body().len(), 2);
        assert_eq!(t.with_body(RequestBody::empty()).body().len(), 0);
    }

    /// A copy rebuilds the request as it was, extensions included, whether its
    /// `RequestMeta` is its only extension (kept beside the head) or one of several.
    #[test]
    fn a_copy_rebuilds_the_request_with_every_extension() {
        let body = r#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#;
        for others in [false, true] {
            let mut req = Request::post("https://api.anthropic.com/v1/messages")
                .version(http::Version::HTTP_2)
                .header("x-api-key", "k")
                .body(RequestBody::from(body))
                .unwrap();
            let meta = RequestMeta::get_or_scan(&mut req).unwrap().clone();
            if others {
                req.extensions_mut().insert(7u32);
            }
            let t = RequestTemplate::copy_of(&req);
            assert_eq!(t.meta.as_deref(), (!others).then_some(&meta));
            assert_eq!(t.meta(), Some(&meta));
            for copy in [t.request(), t.with_body(RequestBody::empty())] {
                assert_eq!(copy.method(), req.method());
                assert_eq!(copy.uri(), req.uri());
                assert_eq!(copy.version(), http::Version::HTTP_2);
                assert_eq!(copy.headers(), req.headers());
                assert_eq!(copy.extensions().get::<RequestMeta>(), Some(&meta));
                assert_eq!(copy.extensions().get::<u32>(), others.then_some(&7));
                assert_eq!(copy.extensions().len(), req.extensions().len());
            }
            assert_eq!(t.request().body().bytes(), req.body().bytes());
            // The original is untouched.
            assert_eq!(req.extensions().get::<RequestMeta>(), Some(&meta));
        }
    }

    /// The copy's meta keeps no memo of the key id (the request's own keeps it); a request
    /// rebuilt from the copy has the same key id, derived again from its headers. Fails if
    /// the copy clones the memo.
    #[test]
    fn a_copy_leaves_the_key_memo_with_the_request() {
        use crate::anthropic::KeyId;
        let mut req = Request::post("https://api.anthropic.com/v1/messages")
            .header("x-api-key", "sk-ant-copy")
            .body(RequestBody::from(
                r#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#,
            ))
            .unwrap();
        RequestMeta::get_or_scan(&mut req).unwrap();
        let id = KeyId::of_request(&mut req).unwrap();
        let memo_kept = |req: &Request<RequestBody>| {
            let meta = req.extensions().get::<RequestMeta>();
            meta.and_then(RequestMeta::key_memo).is_some()
        };
        assert!(memo_kept(&req));
        let t = RequestTemplate::copy_of(&req);
        assert!(t.meta().unwrap().key_memo().is_none());
        assert!(memo_kept(&req), "the request keeps its own");
        for mut copy in [t.request(), t.with_body(RequestBody::empty())] {
            assert_eq!(KeyId::of_request_checked_above(&mut copy), Some(id.clone()));
            assert_eq!(KeyId::of_request(&mut copy), Some(id.clone()));
        }
    }
}
