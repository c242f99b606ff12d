//! Short, non-reversible ids for API keys.

use http::HeaderMap;

use super::RequestMeta;
use super::headers::parsed_names::{self, X_API_KEY};

/// A short id for an API key: the first 12 hex digits of a BLAKE3 keyed-derivation hash.
///
/// It identifies a key in logs, metrics labels, status pages and quota state without revealing
/// it. `Debug` and `Display` print only the id.
///
/// ```
/// use tower_claude::anthropic::KeyId;
///
/// let id = KeyId::from_api_key("sk-ant-api03-secret");
/// assert_eq!(id, KeyId::from_api_key("sk-ant-api03-secret"));
/// assert!(!format!("{id:?}").contains("secret"));
/// assert_eq!(id.as_str().len(), 14); // "k-" + 12 hex digits
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(std::sync::Arc<str>);

impl KeyId {
    /// Whether `other` is this very id (the same shared string, not only an equal one): a
    /// test of two pointers, for a memo of the last id looked up (the quota board's).
    #[inline]
    pub(crate) fn same(&self, other: &KeyId) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }

    /// The id of `api_key`.
    ///
    /// `"k-"` followed by the first 6 bytes, as 12 lowercase hex digits, of
    /// `blake3::derive_key("tower-claude key id v1", api_key)`.
    pub fn from_api_key(api_key: &str) -> Self {
        if let Some(id) = recent::get(api_key.as_bytes()) {
            return id;
        }
        let id = Self::derive(api_key);
        recent::put(api_key.as_bytes(), &id);
        id
    }

    /// The derivation itself (a few thousand instructions: three BLAKE3 compressions).
    fn derive(api_key: &str) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hash = blake3::derive_key("tower-claude key id v1", api_key.as_bytes());
        let mut id = String::with_capacity(14);
        id.push_str("k-");
        for byte in &hash[..6] {
            id.push(char::from(HEX[usize::from(byte >> 4)]));
            id.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        Self(std::sync::Arc::from(id))
    }

    /// The id of the key in `x-api-key` (or `authorization: Bearer ...`), when present.
    ///
    /// Surrounding whitespace is ignored; an empty key counts as absent.
    ///
    /// ```
    /// use http::HeaderMap;
    /// use tower_claude::anthropic::KeyId;
    ///
    /// let mut headers = HeaderMap::new();
    /// assert_eq!(KeyId::from_headers(&headers), None);
    /// headers.insert("authorization", "Bearer sk-ant-oat01-token".parse().unwrap());
    /// assert_eq!(KeyId::from_headers(&headers), Some(KeyId::from_api_key("sk-ant-oat01-token")));
    /// headers.insert("x-api-key", "sk-ant-api03-key".parse().unwrap());
    /// assert_eq!(KeyId::from_headers(&headers), Some(KeyId::from_api_key("sk-ant-api03-key")));
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let (_, key) = key_source(headers)?;
        Some(Self::from_api_key(key))
    }

    /// The id of the request's key, as [`from_headers`](Self::from_headers), remembered in
    /// the request's extensions: the layers of a stack derive it once per request instead of
    /// once each. A layer that puts another key in the headers (a key pool) gets that key's
    /// id: the memo is kept with the header value it was derived from.
    ///
    /// ```
    /// use tower_claude::anthropic::KeyId;
    ///
    /// let mut req = http::Request::post("/v1/messages")
    ///     .header("x-api-key", "sk-ant-api03-one")
    ///     .body(())
    ///     .unwrap();
    /// let id = KeyId::of_request(&mut req).unwrap();
    /// assert_eq!(id, KeyId::from_api_key("sk-ant-api03-one"));
    /// assert_eq!(KeyId::of_request(&mut req), Some(id)); // from the memo
    /// req.headers_mut().insert("x-api-key", "sk-ant-api03-two".parse().unwrap());
    /// assert_eq!(KeyId::of_request(&mut req), Some(KeyId::from_api_key("sk-ant-api03-two")));
    /// ```
    pub fn of_request<B>(req: &mut http::Request<B>) -> Option<Self> {
        let memo = KeyIdMemo::of(req);
        // `x-api-key` looked up once: for the memo's check and, when it does not hold, for
        // the key itself.
        let x_api_key = parsed_names::get(req.headers(), &X_API_KEY);
        // The memo's value still in `x-api-key` (read first): its key, without reading it again.
        if let Some(memo) = memo.filter(|m| m.x_api_key) {
            if x_api_key == Some(&memo.source) {
                return Some(memo.id.clone());
            }
        }
        let (source, key) = match key_in(x_api_key, None) {
            Some(found) => found,
            None => key_in(None, req.headers().get(http::header::AUTHORIZATION))?,
        };
        if let Some(memo) = memo {
            if memo.source == *source {
                return Some(memo.id.clone());
            }
        }
        let memo = KeyIdMemo {
            source: source.clone(),
            x_api_key: x_api_key.is_some_and(|v| std::ptr::eq(v, source)),
            id: Self::from_api_key(key),
        };
        let id = memo.id.clone();
        memo.keep(req);
        Some(id)
    }

    /// [`of_request`](Self::of_request) for a caller that only reads the id (metrics' span):
    /// the same checks and the same memo kept on `req`, the id lent to `read` from the memo
    /// instead of cloned (an `Arc`'s clone and drop: two locked instructions a request).
    #[cfg(feature = "metrics")]
    pub(crate) fn with_request<B, T>(
        req: &mut http::Request<B>,
        read: impl FnOnce(Option<&Self>) -> T,
    ) -> T {
        let memo = KeyIdMemo::of(req);
        let x_api_key = parsed_names::get(req.headers(), &X_API_KEY);
        if let Some(memo) = memo.filter(|m| m.x_api_key) {
            if x_api_key == Some(&memo.source) {
                return read(Some(&memo.id));
            }
        }
        let found = match key_in(x_api_key, None) {
            Some(found) => Some(found),
            None => key_in(None, req.headers().get(http::header::AUTHORIZATION)),
        };
        let Some((source, key)) = found else {
            return read(None);
        };
        if let Some(memo) = memo {
            if memo.source == *source {
                return read(Some(&memo.id));
            }
        }
        let memo = KeyIdMemo {
            source: source.clone(),
            x_api_key: x_api_key.is_some_and(|v| std::ptr::eq(v, source)),
            id: Self::from_api_key(key),
        };
        let out = read(Some(&memo.id));
        memo.keep(req);
        out
    }

    /// The id of the request's key as a layer above found it, without checking the memo
    /// against the headers again; [`of_request`](Self::of_request) when there is no memo.
    ///
    /// Crate-private, for the layers of a [`ClaudeStack`](crate::stack::ClaudeStack) below
    /// its metrics layer (which reads the key with [`of_request`](Self::of_request), checked
    /// against the headers, before any other layer): between them only the stack's own
    /// layers run, and the one that changes the key (a key pool) remembers the key it puts
    /// in the headers ([`remember_chosen`](Self::remember_chosen)). One header lookup and
    /// comparison per request instead of one per layer that needs the key.
    pub(crate) fn of_request_checked_above<B>(req: &mut http::Request<B>) -> Option<Self> {
        match KeyIdMemo::of(req) {
            Some(memo) => Some(memo.id.clone()),
            None => Self::of_request(req),
        }
    }

    /// [`of_request_checked_above`](Self::of_request_checked_above) from the request's
    /// [`RequestMeta`] as a layer already holds it, when the memo is kept there (`None`
    /// otherwise: the layer then asks the request): the memo without looking the meta up in
    /// the request's extensions again.
    pub(crate) fn checked_above_in(meta: &RequestMeta) -> Option<Self> {
        meta.key_memo().map(|memo| memo.id.clone())
    }

    /// Remembers that the key now in `req`'s `x-api-key` is `header`, whose id is `id`: for
    /// a layer that puts a key in the headers (a key pool), so that the layers below that
    /// trust the memo ([`of_request_checked_above`](Self::of_request_checked_above)) read
    /// this key's id, and those that check it find it matching.
    pub(crate) fn remember_chosen<B>(
        req: &mut http::Request<B>,
        header: &http::HeaderValue,
        id: &Self,
    ) {
        KeyIdMemo {
            source: header.clone(),
            x_api_key: true,
            id: id.clone(),
        }
        .keep(req);
    }

    /// Remembers, in `req`'s extensions, the id of the key in the given first `x-api-key` and
    /// `authorization` values of its headers, as [`of_request`](Self::of_request) would: for
    /// an edge that has just walked the headers (the proxy's front), so that the first layer
    /// that asks finds the memo instead of looking both names up. The memo is checked against
    /// the headers when read, as every memo is: a layer that changes the key gets its own id.
    #[cfg(feature = "proxy")]
    pub(crate) fn remember<B>(
        req: &mut http::Request<B>,
        x_api_key: Option<&http::HeaderValue>,
        authorization: Option<&http::HeaderValue>,
    ) {
        let Some((source, key)) = key_in(x_api_key, authorization) else {
            return;
        };
        let memo = KeyIdMemo {
            source: source.clone(),
            x_api_key: x_api_key.is_some_and(|v| std::ptr::eq(v, source)),
            id: Self::from_api_key(key),
        };
        memo.keep(req);
    }

    /// Whether `req` carries a memo of its key's id.
    #[cfg(all(test, feature = "proxy"))]
    pub(crate) fn remembered<B>(req: &http::Request<B>) -> bool {
        KeyIdMemo::of(req).is_some()
    }

    /// An id with a given name (for tests, or requests with no key: [`KeyId::anonymous`]).
    pub fn named(name: &str) -> Self {
        Self(std::sync::Arc::from(name))
    }

    /// The id used for requests that carry no key.
    pub fn anonymous() -> Self {
        Self::named("anonymous")
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The header value a key is read from, and the key (trimmed): `x-api-key`, else
/// `authorization: Bearer ...`; an empty key counts as absent.
fn key_source(headers: &HeaderMap) -> Option<(&http::HeaderValue, &str)> {
    let x_api_key = parsed_names::get(headers, &X_API_KEY);
    if let Some(found) = key_in(x_api_key, None) {
        return Some(found);
    }
    key_in(None, headers.get(http::header::AUTHORIZATION))
}

/// [`key_source`] of the first `x-api-key` and `authorization` values.
fn key_in<'a>(
    x_api_key: Option<&'a http::HeaderValue>,
    authorization: Option<&'a http::HeaderValue>,
) -> Option<(&'a http::HeaderValue, &'a str)> {
    if let Some(value) = x_api_key {
        // A value `to_str` accepts is visible ASCII, spaces and tabs: its ASCII trim is its
        // Unicode one, without the Unicode tables (~40 instructions a request).
        if let Some(key) = value
            .to_str()
            .ok()
            .map(str::trim_ascii)
            .filter(|k| !k.is_empty())
        {
            return Some((value, key));
        }
    }
    let value = authorization?;
    let (scheme, token) = value.to_str().ok()?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some((value, token))
}

/// The ids this thread derived last. A proxy sees the same few keys on every request, and every
/// request needs its key's id (the quota board's key, the metrics label): a hit costs a
/// comparison of the key's bytes instead of a BLAKE3 derivation.
///
/// Bounded: [`SLOTS`](super::recent::SLOTS) entries per thread, keys longer than
/// [`MAX_KEY`](recent::MAX_KEY) bytes are not remembered. The keys are held in memory only
/// (as the requests carrying them are), never printed. No crate does this: a cache crate (moka)
/// costs more per lookup than the four comparisons of [`Recent`](super::recent::Recent).
mod recent {
    use std::cell::RefCell;

    use super::KeyId;
    use crate::anthropic::recent::Recent;

    /// Longer keys are derived each time (API keys are about 100 bytes).
    pub(super) const MAX_KEY: usize = 256;

    thread_local! {
        static RECENT: RefCell<Recent<KeyId>> = const { RefCell::new(Recent::new(MAX_KEY)) };
    }

    /// The remembered id of `key`, if this thread derived it lately.
    pub(super) fn get(key: &[u8]) -> Option<KeyId> {
        RECENT.try_with(|r| r.borrow().get(key)).ok().flatten()
    }

    /// Remembers that `key`'s id is `id`, in place of the oldest entry.
    pub(super) fn put(key: &[u8], id: &KeyId) {
        let _ = RECENT.try_with(|r| r.borrow_mut().put(key, id.clone()));
    }
}

/// [`KeyId::of_request`]'s memo: the id and the header value it was derived from. `Debug`
/// shows the id only.
///
/// Kept in the request's [`RequestMeta`] once the request is scanned (no box of its own, and
/// copied with the meta), else as an extension of its own (a request the proxy's front saw
/// before any layer scanned it); the meta's wins when both are there, and a new memo goes to
/// the meta when there is one.
#[derive(Clone)]
pub(crate) struct KeyIdMemo {
    source: http::HeaderValue,
    /// `source` was read from `x-api-key` (else from `authorization`).
    x_api_key: bool,
    id: KeyId,
}

impl KeyIdMemo {
    /// The memo `req` carries: in its [`RequestMeta`], else in an extension of its own.
    fn of<B>(req: &http::Request<B>) -> Option<&Self> {
        let extensions = req.extensions();
        match RequestMeta::in_extensions(extensions) {
            Some(meta) => match meta.key_memo() {
                Some(memo) => Some(memo),
                // The meta is the map's one entry: no memo beside it to look for (the first
                // layer that asks, in a stack called without extensions of its own).
                None if extensions.len() == 1 => None,
                None => extensions.get::<Self>(),
            },
            None => extensions.get::<Self>(),
        }
    }

    /// Keeps this memo on `req`: in its [`RequestMeta`] when it has one, else as an
    /// extension.
    fn keep<B>(self, req: &mut http::Request<B>) {
        let extensions = req.extensions_mut();
        match RequestMeta::in_extensions_mut(extensions) {
            Some(meta) => meta.set_key_memo(self),
            None => {
                extensions.insert(self);
            }
        }
    }
}

impl std::fmt::Debug for KeyIdMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIdMemo").field("id", &self.id).finish()
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `with_request` lends the id `of_request` gives, on every path (no key, a key
    /// derived, the memo's key again through `x-api-key` or `authorization`, a key changed
    /// under the memo, with and without a `RequestMeta`), and keeps the same memo: the next
    /// `of_request` finds it.
    #[cfg(feature = "metrics")]
    #[test]
    fn a_lent_id_is_the_one_of_request_gives() {
        let request = |headers: &[(&'static str, &str)], meta: bool| {
            let mut req = http::Request::post("/v1/messages");
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            let mut req = req.body(()).unwrap();
            if meta {
                req.extensions_mut()
                    .insert(RequestMeta::scan(br#"{"model":"m","max_tokens":1}"#).unwrap());
            }
            req
        };
        let cases: [&[(&str, &str)]; 4] = [
            &[],
            &[("x-api-key", "sk-ant-api03-one")],
            &[("authorization", "Bearer sk-ant-oat01-two")],
            &[
                ("x-api-key", " "),
                ("authorization", "Bearer sk-ant-oat01-three"),
            ],
        ];
        for headers in cases {
            for meta in [false, true] {
                let mut lent = request(headers, meta);
                let mut cloned = request(headers, meta);
                for round in 0..3 {
                    if round == 2 && !headers.is_empty() {
                        // Another key under the memo.
                        for r in [&mut lent, &mut cloned] {
                            r.headers_mut()
                                .insert("x-api-key", "sk-ant-api03-other".parse().unwrap());
                        }
                    }
                    let got = KeyId::with_request(&mut lent, |id| id.cloned());
                    let want = KeyId::of_request(&mut cloned);
                    assert_eq!(got, want, "{headers:?} {meta} {round}");
                    assert_eq!(
                        KeyIdMemo::of(&lent).map(|m| (&m.id, m.x_api_key)),
                        KeyIdMemo::of(&cloned).map(|m| (&m.id, m.x_api_key)),
                    );
                }
                assert_eq!(KeyId::of_request(&mut lent), KeyId::of_request(&mut cloned));
            }
        }
    }

    #[test]
    fn id_is_the_documented_derivation() {
        let hash = blake3::derive_key("tower-claude key id v1", b"sk-ant-api03-secret");
        let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
        let id = KeyId::from_api_key("sk-ant-api03-secret");
        assert_eq!(id.as_str(), format!("k-{hex}"));
        assert_ne!(id, KeyId::from_api_key("sk-ant-api03-other"));
        assert_eq!(id.to_string(), id.as_str());
        assert!(!format!("{id:?}{id}").contains("sk-ant"));
    }

    #[test]
    fn remembered_ids_are_the_derived_ones() {
        // More keys than slots, each twice: every answer is the derivation's, hit or miss.
        let keys: Vec<String> = (0..crate::anthropic::recent::SLOTS * 2 + 1)
            .map(|i| format!("sk-ant-api03-key-{i}"))
            .collect();
        for _ in 0..2 {
            for key in &keys {
                assert_eq!(KeyId::from_api_key(key), KeyId::derive(key));
                assert_eq!(recent::get(key.as_bytes()), Some(KeyId::derive(key)));
            }
        }
        let long = "k".repeat(recent::MAX_KEY + 1);
        assert_eq!(KeyId::from_api_key(&long), KeyId::derive(&long));
        assert_eq!(recent::get(long.as_bytes()), None, "long keys are not kept");
        assert_ne!(KeyId::from_api_key("a"), KeyId::from_api_key("b"));
    }

    /// Without a memo the key is read from the headers (and remembered); with one, the memo
    /// is the answer, and `remember_chosen` replaces it with a key put on the request.
    #[test]
    fn a_memo_checked_above_is_taken_as_it_is() {
        let mut req = http::Request::new(());
        assert_eq!(KeyId::of_request_checked_above(&mut req), None);
        req.headers_mut()
            .insert("x-api-key", "sk-ant-one".parse().unwrap());
        let one = KeyId::from_api_key("sk-ant-one");
        assert_eq!(KeyId::of_request_checked_above(&mut req), Some(one.clone()));
        req.headers_mut()
            .insert("x-api-key", "sk-ant-two".parse().unwrap());
        // The memo is trusted: the header is not read again.
        assert_eq!(KeyId::of_request_checked_above(&mut req), Some(one));
        let three = KeyId::from_api_key("sk-ant-three");
        let header: http::HeaderValue = "sk-ant-three".parse().unwrap();
        req.headers_mut().insert("x-api-key", header.clone());
        KeyId::remember_chosen(&mut req, &header, &three);
        assert_eq!(
            KeyId::of_request_checked_above(&mut req),
            Some(three.clone())
        );
        // A checked read agrees: the memo matches the header.
        assert_eq!(KeyId::of_request(&mut req), Some(three));
    }

    /// Once the request is scanned the memo is kept in its `RequestMeta` (no extension of
    /// its own) and travels with the meta's copies; a memo kept before the scan is still read,
    /// and a new one goes to the meta.
    #[test]
    fn the_memo_rides_in_the_request_meta() {
        let body = br#"{"model":"claude-haiku-4-5","max_tokens":8}"#.to_vec();
        let mut req = http::Request::new(body.clone());
        req.headers_mut()
            .insert("x-api-key", "sk-ant-one".parse().unwrap());
        RequestMeta::get_or_scan(&mut req).unwrap();
        let one = KeyId::from_api_key("sk-ant-one");
        assert_eq!(KeyId::of_request(&mut req), Some(one.clone()));
        assert!(req.extensions().get::<KeyIdMemo>().is_none());
        let meta = req.extensions().get::<RequestMeta>().unwrap();
        assert_eq!(meta.key_memo().map(|m| &m.id), Some(&one));
        // A copy of the meta (fallback's, for another model) carries it.
        let entry = crate::anthropic::ModelCatalog::default().entry("claude-sonnet-4-6");
        assert_eq!(
            meta.with_model(&entry).key_memo().map(|m| &m.id),
            Some(&one)
        );
        assert_eq!(meta.clone().key_memo().map(|m| &m.id), Some(&one));
        assert!(!format!("{meta:?}").contains("sk-ant"));

        // Remembered before the scan: an extension, read until a memo goes to the meta.
        let mut req = http::Request::new(body);
        req.headers_mut()
            .insert("x-api-key", "sk-ant-one".parse().unwrap());
        assert_eq!(KeyId::of_request(&mut req), Some(one.clone()));
        assert!(req.extensions().get::<KeyIdMemo>().is_some());
        RequestMeta::get_or_scan(&mut req).unwrap();
        assert_eq!(KeyId::of_request_checked_above(&mut req), Some(one));
        let two = KeyId::from_api_key("sk-ant-two");
        req.headers_mut()
            .insert("x-api-key", "sk-ant-two".parse().unwrap());
        assert_eq!(KeyId::of_request(&mut req), Some(two.clone()));
        let meta = req.extensions().get::<RequestMeta>().unwrap();
        assert_eq!(meta.key_memo().map(|m| &m.id), Some(&two));
        assert_eq!(KeyId::of_request_checked_above(&mut req), Some(two));
    }

    /// A memo kept as an extension beside the meta (the proxy's front remembers one before
    /// any layer scans) is found; a meta alone in the map has none beside it.
    #[test]
    fn a_memo_beside_the_meta_is_found() {
        let body = br#"{"model":"claude-haiku-4-5","max_tokens":8}"#.to_vec();
        let mut req = http::Request::new(body);
        let header: http::HeaderValue = "sk-ant-one".parse().unwrap();
        req.headers_mut().insert("x-api-key", header.clone());
        // An id the header does not derive: read from the memo, or not at all.
        let chosen = KeyId::named("chosen");
        KeyId::remember_chosen(&mut req, &header, &chosen);
        RequestMeta::get_or_scan(&mut req).unwrap();
        assert_eq!(req.extensions().len(), 2);
        assert_eq!(
            KeyId::of_request_checked_above(&mut req),
            Some(chosen.clone())
        );
        assert_eq!(KeyId::of_request(&mut req), Some(chosen));

        let mut alone = http::Request::new(br#"{"max_tokens":8}"#.to_vec());
        alone.headers_mut().insert("x-api-key", header);
        RequestMeta::get_or_scan(&mut alone).unwrap();
        assert_eq!(alone.extensions().len(), 1);
        assert!(KeyIdMemo::of(&alone).is_none());
        let one = KeyId::from_api_key("sk-ant-one");
        assert_eq!(KeyId::of_request_checked_above(&mut alone), Some(one));
    }

    #[test]
    fn headers_prefer_x_api_key_and_ignore_empty_values() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "  ".parse().unwrap());
        assert_eq!(KeyId::from_headers(&headers), None);
        headers.insert("authorization", "bearer tok".parse().unwrap());
        assert_eq!(
            KeyId::from_headers(&headers),
            Some(KeyId::from_api_key("tok"))
        );
        headers.insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
        assert_eq!(KeyId::from_headers(&headers), None);
        headers.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(KeyId::from_headers(&headers), None);
        headers.insert("x-api-key", " key ".parse().unwrap());
        assert_eq!(
            KeyId::from_headers(&headers),
            Some(KeyId::from_api_key("key"))
        );
        assert_eq!(KeyId::anonymous().as_str(), "anonymous");
    }
}
