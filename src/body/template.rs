//! [`RequestTemplate`]: a request kept so that it can be sent again.

use http::{Extensions, HeaderMap, Request};

use super::RequestBody;

/// A request kept so that it can be sent again (a retry, another model): its head and its
/// body, which is cheap to clone (see [`RequestBody`]). The one place a request is rebuilt
/// from its parts.
pub(crate) struct RequestTemplate {
    parts: http::request::Parts,
    body: RequestBody,
}

impl RequestTemplate {
    pub(crate) fn new(req: Request<RequestBody>) -> Self {
        let (parts, body) = req.into_parts();
        Self { parts, body }
    }

    /// The request again, with its own body.
    pub(crate) fn request(&self) -> Request<RequestBody> {
        self.with_body(self.body.clone())
    }

    /// The request again, with `body` instead of its own.
    pub(crate) fn with_body(&self, body: RequestBody) -> Request<RequestBody> {
        Request::from_parts(self.parts.clone(), body)
    }

    /// The request's headers.
    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    /// The request's extensions.
    pub(crate) fn extensions(&self) -> &Extensions {
        &self.parts.extensions
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
}
