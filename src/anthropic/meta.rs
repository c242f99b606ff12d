//! Request metadata read from a request body without building a JSON tree: [`RequestMeta`]
//! (what the layers read), read by the scanner of [`super::scan`] with the token estimate of
//! [`super::estimate`], and [`rewrite_model`].

use std::borrow::Cow;

use bytes::Bytes;

use super::estimate::CacheBreakpoint;
use super::key::KeyIdMemo;
use super::models::{ModelCatalog, ModelEntry};
use super::scan::{CanonicalHints, MetaError, MetaErrorKind, Scanner};

/// What the stack needs to know about a Messages API request, read once from its body and
/// carried as a request extension so that no layer parses the body twice.
///
/// ```
/// use tower_claude::anthropic::RequestMeta;
///
/// let body = br#"{"model":"claude-sonnet-4-6","max_tokens":1024,"stream":true,
///                 "messages":[{"role":"user","content":"Write a haiku about Rust."}]}"#;
/// let meta = RequestMeta::scan(body).unwrap();
/// assert_eq!(meta.model.as_deref(), Some("claude-sonnet-4-6"));
/// assert_eq!(meta.max_tokens, Some(1024));
/// assert!(meta.stream);
/// assert!(meta.input_tokens >= 7);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct RequestMeta {
    /// Top-level `model`.
    pub model: Option<String>,
    /// Top-level `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Top-level `stream` (false when absent).
    pub stream: bool,
    /// Top-level `temperature`, when present.
    pub temperature: Option<f64>,
    /// A conservative (high) estimate of the input tokens the request will be charged.
    pub input_tokens: u64,
    /// The prompt-cache breakpoints (`cache_control` on a tool, a system block or a message
    /// content block), in the order the API caches them (tools, system, messages): each is
    /// the hash and token estimate of the prefix up to and including that block. Empty
    /// without `cache_control`.
    pub cache_breakpoints: Vec<CacheBreakpoint>,
    /// How the body differs from its canonical form, for the response cache's key (not part
    /// of the value: equal metas may differ here).
    pub(crate) canonical: CanonicalHints,
    /// The catalogue's entry of `model`, looked up by the first layer that asks
    /// ([`model_entry`](Self::model_entry)); not part of the value.
    entry: Memo<ModelEntry>,
    /// The memo of the request's key id ([`KeyId::of_request`](super::KeyId::of_request)),
    /// kept here rather than in an extension of its own once the request is scanned (the
    /// layers that read one read the other): no box of its own, and one entry fewer in the
    /// request's extensions to copy when fallback copies the request. Not part of the value.
    key: Memo<KeyIdMemo>,
}

/// A memo [`RequestMeta`] carries beside its value: the catalogue's entry of the model, the
/// request's key id. Not part of the value (equal metas may differ here), and `Debug` says only
/// whether it is set (a key id's memo must not print).
#[derive(Clone)]
struct Memo<T>(Option<T>);

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Memo(None)
    }
}

impl<T> PartialEq for Memo<T> {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl<T> std::fmt::Debug for Memo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Memo(set)"
        } else {
            "Memo(unset)"
        })
    }
}

impl RequestMeta {
    /// Scans a request body. Malformed JSON, or a top-level value that is not an object, gives a
    /// typed error.
    ///
    /// The whole document is validated (UTF-8, JSON syntax, nesting up to 256 levels) in one
    /// pass. A top-level `model` that is not a string, `max_tokens` that is not a non-negative
    /// integer, `stream` that is not a boolean or `temperature` that is not a number gives
    /// [`MetaErrorKind::InvalidField`]. Duplicate members: the last one wins.
    ///
    /// # The input-token estimate
    ///
    /// The estimate must not be low: an under-estimate lets requests through that the server
    /// then rejects with 429, while an over-estimate only delays a request a little (the limiter
    /// settles from the actual usage afterwards). It is computed as
    ///
    /// * **text**: `ceil(units / 3)` where `units` counts every byte of every string (keys and
    ///   values, raw, escapes included), number and literal inside the prompt-bearing members
    ///   (everything except `model`, `max_tokens`, `stream`, `temperature`, `top_k`, `top_p`,
    ///   `stop_sequences`, `metadata`, `service_tier`, `thinking`, `container` and
    ///   `inference_geo`), plus one more unit per non-ASCII character. English averages about
    ///   four bytes per token and CJK text about one token per character (three UTF-8 bytes),
    ///   so three bytes per token stays above both;
    /// * **structure**: 8 tokens per request, 8 per message (element of `messages`), 4 per
    ///   content block (element of `system` or of any `content` array), 32 per tool (element of
    ///   `tools`) and, when there is at least one tool, 400 for the tool-use system prompt the
    ///   API adds (346 tokens for Claude 4 models);
    /// * **media**: the base64 `data` of a `source` is not text and is not counted as such. An
    ///   image (a `base64` source with an `image/*` media type, or an `image` block with a `url`
    ///   or `file` source) counts 1,600 tokens, the most an image is charged at standard
    ///   resolution. A base64 document (PDF) counts 3,000 tokens per page, with one page per
    ///   started 50 KB of decoded data (at most 600 pages). A document given by `url` or `file`
    ///   id, whose size is unknown here, counts 30,000 tokens (ten pages). `text` and `content`
    ///   sources are ordinary text.
    ///
    /// # Prompt-cache breakpoints
    ///
    /// A tool, system block or content block (at any depth of `messages`) with a
    /// `cache_control` object member is a breakpoint ([`RequestMeta::cache_breakpoints`]),
    /// with a 1-hour TTL when its `cache_control` has `"ttl":"1h"`. The same pass records the
    /// byte range and the token counts of each prefix; only bodies with breakpoints pay for
    /// hashing their prefixes (XXH3-128, once over the bytes up to the last breakpoint). The API accepts at most
    /// four breakpoints; more than [`MAX_BREAKPOINTS`](super::MAX_BREAKPOINTS) are ignored here.
    ///
    /// ```
    /// use tower_claude::anthropic::{MetaErrorKind, RequestMeta};
    ///
    /// let err = RequestMeta::scan(br#"{"model":"claude-haiku-4-5","max_tokens":"#).unwrap_err();
    /// assert_eq!(err.kind(), MetaErrorKind::InvalidJson);
    /// assert_eq!(err.offset(), 41); // the end of the input
    /// let err = RequestMeta::scan(br#"{"max_tokens":-1}"#).unwrap_err();
    /// assert_eq!(err.kind(), MetaErrorKind::InvalidField);
    /// assert_eq!(RequestMeta::scan(b"[]").unwrap_err().kind(), MetaErrorKind::NotAnObject);
    /// ```
    pub fn scan(body: &[u8]) -> Result<Self, MetaError> {
        Self::scan_held(body, None)
    }

    /// [`scan`](Self::scan); `held` is `body` as `Bytes` when the caller has it, which the
    /// canonical hints then hold instead of fingerprinting the body (read once).
    fn scan_held(body: &[u8], held: Option<&Bytes>) -> Result<Self, MetaError> {
        let scanner = if super::scan::canonical_hints_wanted() {
            Scanner::recording(body, held)
        } else {
            Scanner::new(body, true)
        };
        scanner.run().map(|scan| RequestMeta {
            model: scan.model,
            max_tokens: scan.max_tokens,
            stream: scan.stream,
            temperature: scan.temperature,
            input_tokens: scan.input_tokens,
            cache_breakpoints: scan.cache_breakpoints,
            canonical: scan.canonical,
            entry: Memo::default(),
            key: Memo::default(),
        })
    }

    /// The catalogue's entry of the request's [`model`](Self::model) (`None` without one):
    /// its rate-limit group, family and whether its cache reads count, looked up **once per
    /// request**. The stack's first layer looks the model up in its catalogue and the entry
    /// is remembered here, so every layer of a stack (one catalogue) reads the same entry
    /// instead of searching the catalogue again; fallback's copy of the request for another
    /// model remembers that model's entry.
    ///
    /// A catalogue other than the one remembered, a `model` changed since, or a meta whose
    /// model no layer resolved yet gets a fresh lookup (not remembered).
    ///
    /// ```
    /// use tower_claude::anthropic::{ModelCatalog, RequestMeta};
    ///
    /// let meta = RequestMeta::scan(br#"{"model":"claude-sonnet-4-6","max_tokens":8}"#).unwrap();
    /// let catalog = ModelCatalog::default();
    /// let entry = meta.model_entry(&catalog).unwrap();
    /// assert_eq!(entry.group().as_str(), "claude-sonnet-4");
    /// // Another catalogue has its own answer.
    /// let own = ModelCatalog::empty();
    /// assert_eq!(meta.model_entry(&own).unwrap().group().as_str(), "claude-sonnet-4-6");
    /// assert!(RequestMeta::default().model_entry(&catalog).is_none());
    /// ```
    pub fn model_entry(&self, catalog: &ModelCatalog) -> Option<Cow<'_, ModelEntry>> {
        let model = self.model.as_deref()?;
        Some(match &self.entry.0 {
            Some(entry) if entry.is_of(catalog) && entry.id() == model => Cow::Borrowed(entry),
            _ => Cow::Owned(catalog.entry(model)),
        })
    }

    /// The entry [`get_or_scan_in`](Self::get_or_scan_in) remembered, as it is (not checked
    /// against a catalogue: for the layer that just called it with its own).
    pub(crate) fn resolved_entry(&self) -> Option<&ModelEntry> {
        self.entry.0.as_ref()
    }

    /// Remembers the entry of the model in `catalog` unless it is remembered already.
    fn resolve(&mut self, catalog: &ModelCatalog) {
        if !self.is_resolved_in(catalog) {
            if let Some(model) = self.model.as_deref() {
                self.entry.0 = Some(catalog.entry(model));
            }
        }
    }

    /// Whether [`get_or_scan_in`](Self::get_or_scan_in) with `catalog` would give this meta
    /// as it is (its model's entry in `catalog` remembered, or no model): a layer below the
    /// first one reads it then with one look-up of the extension, instead of the two of
    /// `get_or_scan_in` (a mutable one to resolve, then the one it returns).
    pub(crate) fn is_resolved_in(&self, catalog: &ModelCatalog) -> bool {
        let Some(model) = self.model.as_deref() else {
            return true;
        };
        matches!(&self.entry.0, Some(e) if e.is_of(catalog) && e.id() == model)
    }

    /// The `RequestMeta` among `extensions`, out of line: the layers look it up in several
    /// places for every request, and each look-up in line was a copy of the map's probe (~3
    /// lines of the instruction cache, all run); out of line they share one.
    #[inline(never)]
    pub(crate) fn in_extensions(extensions: &http::Extensions) -> Option<&RequestMeta> {
        extensions.get::<RequestMeta>()
    }

    /// [`in_extensions`](Self::in_extensions), mutable.
    #[inline(never)]
    pub(crate) fn in_extensions_mut(extensions: &mut http::Extensions) -> Option<&mut RequestMeta> {
        extensions.get_mut::<RequestMeta>()
    }

    /// [`get_or_scan`](Self::get_or_scan), the model's entry in `catalog` remembered in the
    /// extension ([`model_entry`](Self::model_entry) then reads it): the layers of the stack
    /// take the request's meta this way, so that the first one resolves the model for all.
    pub(crate) fn get_or_scan_in<'r, B>(
        req: &'r mut http::Request<B>,
        catalog: &ModelCatalog,
    ) -> Result<&'r RequestMeta, MetaError>
    where
        B: AsRef<[u8]> + 'static,
    {
        match Self::in_extensions_mut(req.extensions_mut()) {
            Some(meta) => meta.resolve(catalog),
            None => {
                let held = (req.body() as &dyn std::any::Any)
                    .downcast_ref::<crate::body::RequestBody>()
                    .map(crate::body::RequestBody::bytes);
                let mut meta = Self::scan_held(req.body().as_ref(), held)?;
                meta.resolve(catalog);
                // Inserted and borrowed in one lookup (an insert, then a `get`, before).
                return Ok(req.extensions_mut().get_or_insert_with(|| meta));
            }
        }
        Self::in_extensions(req.extensions()).ok_or(MetaError::new(
            MetaErrorKind::InvalidJson,
            0,
            "request extension lost",
        ))
    }

    /// This meta for another model, whose catalogue entry is `entry` (fallback's copy of a
    /// request rewritten to `entry`'s model): the model and the remembered entry replaced,
    /// everything else cloned.
    pub(crate) fn with_model(&self, entry: &ModelEntry) -> Self {
        self.copy_with(
            Some(entry.id().to_owned()),
            Memo(Some(entry.clone())),
            self.key.clone(),
        )
    }

    /// This meta's value with `model`, its `entry` memo and its `key` memo.
    fn copy_with(
        &self,
        model: Option<String>,
        entry: Memo<ModelEntry>,
        key: Memo<KeyIdMemo>,
    ) -> Self {
        Self {
            model,
            max_tokens: self.max_tokens,
            stream: self.stream,
            temperature: self.temperature,
            input_tokens: self.input_tokens,
            cache_breakpoints: self.cache_breakpoints.clone(),
            canonical: self.canonical.clone(),
            entry,
            key,
        }
    }

    /// A copy of this meta without the memo of the request's key id (a copy kept beside a
    /// request for later attempts: see [`RequestTemplate`](crate::body::RequestTemplate)).
    pub(crate) fn copy_without_key_memo(&self) -> Self {
        self.copy_with(self.model.clone(), self.entry.clone(), Memo::default())
    }

    /// The memo of the request's key id kept here, if any (see [`KeyIdMemo`]).
    pub(crate) fn key_memo(&self) -> Option<&KeyIdMemo> {
        self.key.0.as_ref()
    }

    /// Keeps `memo` as the memo of the request's key id.
    pub(crate) fn set_key_memo(&mut self, memo: KeyIdMemo) {
        self.key.0 = Some(memo);
    }

    /// Reads the extension from `req`, or scans its body and inserts the result, returning it.
    ///
    /// ```
    /// use tower_claude::anthropic::RequestMeta;
    ///
    /// let mut req = http::Request::new(br#"{"model":"claude-opus-4-7","max_tokens":5}"#.to_vec());
    /// assert_eq!(RequestMeta::get_or_scan(&mut req).unwrap().max_tokens, Some(5));
    /// assert!(req.extensions().get::<RequestMeta>().is_some());
    /// ```
    pub fn get_or_scan<B>(req: &mut http::Request<B>) -> Result<&RequestMeta, MetaError>
    where
        B: AsRef<[u8]> + 'static,
    {
        if req.extensions().get::<RequestMeta>().is_none() {
            // A `RequestBody` is `Bytes`: the scan's hints for the cache key hold it.
            let held = (req.body() as &dyn std::any::Any)
                .downcast_ref::<crate::body::RequestBody>()
                .map(crate::body::RequestBody::bytes);
            let meta = Self::scan_held(req.body().as_ref(), held)?;
            req.extensions_mut().insert(meta);
        }
        req.extensions().get::<RequestMeta>().ok_or(MetaError::new(
            MetaErrorKind::InvalidJson,
            0,
            "request extension lost",
        ))
    }
}

/// Returns `body` with its top-level `model` value replaced by `model`; every other byte is
/// identical. A body without a top-level `model` gets one inserted as the first member.
///
/// The body must be a valid JSON object (the types of its members are not checked); `model` is
/// JSON-escaped. Every top-level `model` member is replaced when there are duplicates; nested
/// `model` members (in `metadata`, tool schemas, ...) are never touched.
///
/// ```
/// use tower_claude::anthropic::rewrite_model;
///
/// let body = br#"{"model": "claude-opus-4-7", "max_tokens":8, "metadata":{"model":"x"}}"#;
/// let out = rewrite_model(body, "claude-haiku-4-5").unwrap();
/// assert_eq!(&out[..], br#"{"model": "claude-haiku-4-5", "max_tokens":8, "metadata":{"model":"x"}}"#);
/// assert_eq!(&rewrite_model(b" {} ", "m").unwrap()[..], br#" {"model":"m"} "#);
/// ```
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Bytes, MetaError> {
    let scan = Scanner::with_spans(body).run()?;
    let value = json_string(model);
    let mut out = Vec::with_capacity(body.len() + value.len() + 10);
    if scan.model_spans.is_empty() {
        let brace = scan.open_brace;
        out.extend_from_slice(&body[..=brace]);
        out.extend_from_slice(b"\"model\":");
        out.extend_from_slice(value.as_bytes());
        if scan.has_members {
            out.push(b',');
        }
        out.extend_from_slice(&body[brace + 1..]);
    } else {
        let mut at = 0;
        for &(start, end) in &scan.model_spans {
            out.extend_from_slice(&body[at..start]);
            out.extend_from_slice(value.as_bytes());
            at = end;
        }
        out.extend_from_slice(&body[at..]);
    }
    Ok(Bytes::from(out))
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::super::estimate::{
        BASE_TOKENS, CacheTtl, EXTERNAL_DOCUMENT_TOKENS, IMAGE_TOKENS, MAX_BREAKPOINTS,
        PDF_PAGE_TOKENS, TOOL_PROMPT_TOKENS, TOOL_TOKENS,
    };
    use super::*;

    fn scan(body: &str) -> RequestMeta {
        RequestMeta::scan(body.as_bytes()).unwrap()
    }

    fn err(body: &[u8]) -> (MetaErrorKind, usize) {
        let e = RequestMeta::scan(body).unwrap_err();
        (e.kind(), e.offset())
    }

    fn b64(len: usize) -> String {
        "QUJD".repeat(len / 4)
    }

    #[test]
    fn reads_the_top_level_fields() {
        let meta = scan(
            r#" {"metadata":{"model":"nested","stream":"x"},"model":"claude-opus-4-7","max_tokens":4096,
                "stream":false,"temperature":0.7,"messages":[]} "#,
        );
        assert_eq!(meta.model.as_deref(), Some("claude-opus-4-7"));
        assert_eq!(meta.max_tokens, Some(4096));
        assert!(!meta.stream);
        assert_eq!(meta.temperature, Some(0.7));
        let meta =
            scan(r#"{"model":"claude\u002dhaiku-4-5","stream":true,"stream":true,"max_tokens":0}"#);
        assert_eq!(meta.model.as_deref(), Some("claude-haiku-4-5"));
        assert!(meta.stream);
        assert_eq!(meta.max_tokens, Some(0));
        let meta = scan(r#"{"model":"a","model":"b","temperature":-1e-2}"#);
        assert_eq!(meta.model.as_deref(), Some("b"));
        assert_eq!(meta.temperature, Some(-0.01));
        let meta = scan("{}");
        assert_eq!(
            meta,
            RequestMeta {
                input_tokens: BASE_TOKENS,
                ..Default::default()
            }
        );
    }

    /// The model is its text, ASCII or not, short or long, escaped or not.
    #[test]
    fn the_model_is_its_text() {
        for model in [
            "m",
            "claude-sonnet-4-6",
            "claude-sonnet-4-6-with-a-much-longer-name-than-any",
            "é",
            "claude-sonnet-é",
            "modèle-très-long-au-delà-de-seize-octets",
            "日本語",
        ] {
            let body = format!(r#"{{"model":"{model}","max_tokens":1}}"#);
            assert_eq!(scan(&body).model.as_deref(), Some(model), "{model}");
            let escaped = serde_json::to_string(&serde_json::json!({ "model": model })).unwrap();
            assert_eq!(scan(&escaped).model.as_deref(), Some(model), "{model}");
            let ascii = serde_json::to_string(&model)
                .unwrap()
                .chars()
                .flat_map(|c| {
                    if c.is_ascii() {
                        vec![c]
                    } else {
                        let mut units = [0u16; 2];
                        c.encode_utf16(&mut units)
                            .iter()
                            .flat_map(|u| format!("\\u{u:04x}").chars().collect::<Vec<_>>())
                            .collect()
                    }
                })
                .collect::<String>();
            let body = format!(r#"{{"model":{ascii}}}"#);
            assert_eq!(scan(&body).model.as_deref(), Some(model), "{body}");
        }
    }

    #[test]
    fn malformed_json_is_reported_with_its_offset() {
        let cases: [(&[u8], usize); 16] = [
            (b"", 0),
            (b"   ", 3),
            (b"{", 1),
            (br#"{"model":"x""#, 12),
            (br#"{"model":"x",}"#, 13),
            (br#"{"model" "x"}"#, 9),
            (br#"{"a":[1,2,]}"#, 10),
            (br#"{"a":"\q"}"#, 7),
            (br#"{"a":"\u12g4"}"#, 7),
            (b"{\"a\":\"tab\there\"}", 9),
            (b"{\"a\":\"\xff\"}", 6),
            (br#"{"a":01}"#, 6),
            (br#"{"a":1.}"#, 7),
            (br#"{"a":tru}"#, 5),
            (br#"{"a":1} x"#, 8),
            (br#"{"a":"unterminated"#, 18),
        ];
        for (body, offset) in cases {
            assert_eq!(
                err(body),
                (MetaErrorKind::InvalidJson, offset),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(300), "]".repeat(300));
        assert_eq!(err(deep.as_bytes()).0, MetaErrorKind::InvalidJson);
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(RequestMeta::scan(ok.as_bytes()).is_ok());
    }

    #[test]
    fn non_objects_and_wrong_field_types_are_typed_errors() {
        for body in [&b"[]"[..], b"\"x\"", b"12", b"null", b" true"] {
            assert_eq!(err(body).0, MetaErrorKind::NotAnObject);
        }
        let fields: [&[u8]; 11] = [
            br#"{"model":5}"#,
            br#"{"model":null}"#,
            br#"{"max_tokens":"1"}"#,
            br#"{"max_tokens":1.0}"#,
            br#"{"max_tokens":-1}"#,
            br#"{"max_tokens":1e3}"#,
            br#"{"max_tokens":18446744073709551616}"#,
            br#"{"stream":"true"}"#,
            br#"{"stream":null}"#,
            br#"{"temperature":"0.5"}"#,
            br#"{"temperature":[1]}"#,
        ];
        for body in fields {
            let (kind, offset) = err(body);
            assert_eq!(
                kind,
                MetaErrorKind::InvalidField,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(body[offset - 1], b':');
        }
        let e = RequestMeta::scan(br#"{"stream":1}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid request body at byte 10: `stream` is not a boolean"
        );
    }

    #[test]
    fn estimate_of_a_short_message_is_a_small_overestimate() {
        // The API charges about 10 tokens for this request.
        let meta = scan(
            r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"Hello, Claude"}]}"#,
        );
        assert!(
            (10..=40).contains(&meta.input_tokens),
            "{}",
            meta.input_tokens
        );
    }

    #[test]
    fn estimate_of_long_text_is_between_one_token_per_four_and_per_three_bytes() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(700); // 31,500 bytes
        let body = format!(
            r#"{{"model":"m","max_tokens":10,"system":"Be brief.","messages":[{{"role":"user","content":[{{"type":"text","text":"{text}"}}]}}]}}"#
        );
        let tokens = scan(&body).input_tokens;
        assert!(tokens >= 31_500 / 3, "{tokens}");
        assert!(tokens <= 31_500 / 3 + 100, "{tokens}");
    }

    #[test]
    fn non_ascii_text_counts_at_least_one_token_per_character() {
        let text = "日本語のテキスト".repeat(125); // 1,000 characters, 3,000 bytes
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{text}"}}]}}"#);
        assert!(scan(&body).input_tokens >= 1_333);
    }

    #[test]
    fn base64_images_cost_a_fixed_amount_whatever_their_size() {
        for data in [b64(4_000), b64(1_400_000)] {
            // `data` before `type`: the order of members does not matter.
            let body = format!(
                r#"{{"messages":[{{"role":"user","content":[{{"type":"image","source":{{"data":"{data}","media_type":"image/png","type":"base64"}}}},{{"type":"text","text":"What is this?"}}]}}]}}"#
            );
            let tokens = scan(&body).input_tokens;
            assert!(
                (IMAGE_TOKENS..IMAGE_TOKENS + 80).contains(&tokens),
                "{tokens}"
            );
        }
    }

    #[test]
    fn images_by_url_or_file_and_images_in_tool_results() {
        let url = r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"https://example.com/a.png"}}]}]}"#;
        let tokens = scan(url).input_tokens;
        assert!(
            (IMAGE_TOKENS..IMAGE_TOKENS + 60).contains(&tokens),
            "{tokens}"
        );
        let data = b64(200_000);
        let tool = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t1","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/jpeg","data":"{data}"}}}}]}}]}}]}}"#
        );
        let tokens = scan(&tool).input_tokens;
        assert!(
            (IMAGE_TOKENS..IMAGE_TOKENS + 80).contains(&tokens),
            "{tokens}"
        );
    }

    #[test]
    fn documents_cost_per_estimated_page() {
        // 400,000 base64 bytes = 300,000 bytes of PDF = 6 pages of 50 KB.
        let data = b64(400_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"document","source":{{"type":"base64","media_type":"application/pdf","data":"{data}"}}}}]}}]}}"#
        );
        let tokens = scan(&body).input_tokens;
        assert!(
            (6 * PDF_PAGE_TOKENS..6 * PDF_PAGE_TOKENS + 60).contains(&tokens),
            "{tokens}"
        );
        let by_file = r#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"file_1"}}]}]}"#;
        let tokens = scan(by_file).input_tokens;
        assert!((EXTERNAL_DOCUMENT_TOKENS..EXTERNAL_DOCUMENT_TOKENS + 60).contains(&tokens));
        // A plain-text document source is text.
        let text = "x".repeat(30_000);
        let plain = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"document","source":{{"type":"text","media_type":"text/plain","data":"{text}"}}}}]}}]}}"#
        );
        assert!(scan(&plain).input_tokens >= 10_000);
    }

    #[test]
    fn tools_add_the_tool_prompt_and_their_schemas() {
        let without = r#"{"messages":[{"role":"user","content":"Weather in Paris?"}]}"#;
        let with = r#"{"tools":[{"name":"get_weather","description":"Get the weather for a city.","input_schema":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}],"messages":[{"role":"user","content":"Weather in Paris?"}]}"#;
        let extra = scan(with).input_tokens - scan(without).input_tokens;
        // 111 bytes of names, descriptions and schema: at least 37 tokens.
        assert!(extra >= TOOL_PROMPT_TOKENS + TOOL_TOKENS + 37, "{extra}");
    }

    #[test]
    fn non_prompt_members_are_not_counted() {
        let base = scan(r#"{"messages":[{"role":"user","content":"hi"}]}"#).input_tokens;
        let long = "x".repeat(3_000);
        let body = format!(
            r#"{{"metadata":{{"user_id":"{long}"}},"stop_sequences":["{long}"],"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        assert_eq!(scan(&body).input_tokens, base);
        let counted = format!(
            r#"{{"unknown_member":"{long}","messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        assert!(scan(&counted).input_tokens >= base + 1_000);
    }

    #[test]
    fn rewrite_replaces_only_the_top_level_model() {
        let body = br#"{ "metadata" : {"model":"keep"}, "model" : "claude-opus-4-7" ,"x":[{"model":"keep"}]}"#;
        let out = rewrite_model(body, "claude-sonnet-4-6").unwrap();
        assert_eq!(
            &out[..],
            br#"{ "metadata" : {"model":"keep"}, "model" : "claude-sonnet-4-6" ,"x":[{"model":"keep"}]}"#
        );
        // Non-string values and duplicates are replaced too.
        let out = rewrite_model(br#"{"model":5,"a":1,"model":null}"#, "m").unwrap();
        assert_eq!(&out[..], br#"{"model":"m","a":1,"model":"m"}"#);
    }

    #[test]
    fn rewrite_inserts_a_missing_model_first() {
        assert_eq!(&rewrite_model(b"{}", "m").unwrap()[..], br#"{"model":"m"}"#);
        assert_eq!(
            &rewrite_model(b"\n{ }\n", "m").unwrap()[..],
            b"\n{\"model\":\"m\" }\n"
        );
        assert_eq!(
            &rewrite_model(br#"{"max_tokens":1}"#, "m").unwrap()[..],
            br#"{"model":"m","max_tokens":1}"#
        );
    }

    #[test]
    fn rewrite_escapes_the_model_and_validates_the_body() {
        let weird = "a\"b\\c\n\u{1}é";
        let out = rewrite_model(br#"{"model":"x"}"#, weird).unwrap();
        assert_eq!(
            RequestMeta::scan(&out).unwrap().model.as_deref(),
            Some(weird)
        );
        assert_eq!(
            rewrite_model(br#"{"model":"x""#, "m").unwrap_err().kind(),
            MetaErrorKind::InvalidJson
        );
        assert_eq!(
            rewrite_model(b"[]", "m").unwrap_err().kind(),
            MetaErrorKind::NotAnObject
        );
        // Field types are not checked by the rewrite.
        assert!(rewrite_model(br#"{"max_tokens":"x"}"#, "m").is_ok());
    }

    fn cached(text: &str, ttl: &str) -> String {
        format!(r#"{{"type":"text","text":"{text}","cache_control":{{"type":"ephemeral"{ttl}}}}}"#)
    }

    #[test]
    fn breakpoints_follow_the_cache_order_and_hash_the_prefix() {
        let tools = r#"[{"name":"a","description":"tool a","input_schema":{"type":"object"}},{"name":"b","description":"tool b","input_schema":{"type":"object"},"cache_control":{"type":"ephemeral"}}]"#;
        let system = format!("[{}]", cached(&"s".repeat(3_000), r#","ttl":"1h""#));
        let doc = cached(&"d".repeat(6_000), "");
        let body = |tail: &str, order: bool| {
            let messages = format!(
                r#"[{{"role":"user","content":[{doc},{{"type":"text","text":"{tail}"}}]}}]"#
            );
            if order {
                format!(
                    r#"{{"model":"m","tools":{tools},"system":{system},"messages":{messages}}}"#
                )
            } else {
                format!(
                    r#"{{"messages":{messages},"system":{system},"model":"m","tools":{tools}}}"#
                )
            }
        };
        let a = scan(&body("first question", true));
        assert_eq!(a.cache_breakpoints.len(), 3);
        let [t, s, m] = [0, 1, 2].map(|i| a.cache_breakpoints[i]);
        assert_eq!(s.ttl, CacheTtl::OneHour);
        assert_eq!(
            (t.ttl, m.ttl),
            (CacheTtl::FiveMinutes, CacheTtl::FiveMinutes)
        );
        // Each prefix contains the one before; the tool prompt belongs to the tools prefix.
        assert!(t.tokens > TOOL_PROMPT_TOKENS + 2 * TOOL_TOKENS);
        assert!(s.tokens >= t.tokens + 1_000 && s.tokens < t.tokens + 1_100);
        assert!(m.tokens >= s.tokens + 2_000 && m.tokens < s.tokens + 2_100);
        assert!(m.tokens < a.input_tokens);
        // Another tail, and another member order: same prefixes.
        let b = scan(&body("a different question", false));
        assert_eq!(a.cache_breakpoints, b.cache_breakpoints);
        // A changed tool changes every prefix after it.
        let other = body("first question", true).replace("tool a", "tool A");
        let c = scan(&other);
        for (x, y) in a.cache_breakpoints.iter().zip(&c.cache_breakpoints) {
            assert_ne!(x.prefix, y.prefix);
        }
        // Without cache_control nothing is recorded; a property named so in a schema is not
        // a breakpoint.
        let plain = r#"{"tools":[{"name":"t","input_schema":{"properties":{"cache_control":{"type":"string"}}}}],"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(scan(plain).cache_breakpoints.is_empty());
        assert!(
            scan(&body("x", true).replace("cache_control", "cache_ctrl"))
                .cache_breakpoints
                .is_empty()
        );
    }

    #[test]
    fn breakpoints_are_bounded_and_duplicates_replace() {
        let blocks: Vec<String> = (0..12).map(|i| cached(&format!("block {i}"), "")).collect();
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{}]}}]}}"#,
            blocks.join(",")
        );
        assert_eq!(scan(&body).cache_breakpoints.len(), MAX_BREAKPOINTS);
        let dup = format!(
            r#"{{"system":[{}],"system":"plain","messages":[{{"role":"user","content":"hi"}}]}}"#,
            cached("old", "")
        );
        assert!(scan(&dup).cache_breakpoints.is_empty());
    }

    #[test]
    fn get_or_scan_scans_once() {
        let mut req = http::Request::new(br#"{"model":"a","max_tokens":3}"#.to_vec());
        assert_eq!(
            RequestMeta::get_or_scan(&mut req).unwrap().model.as_deref(),
            Some("a")
        );
        // The extension is reused even if the body changes afterwards.
        *req.body_mut() = b"not json".to_vec();
        assert_eq!(
            RequestMeta::get_or_scan(&mut req).unwrap().max_tokens,
            Some(3)
        );
        let mut bad = http::Request::new(b"not json".to_vec());
        assert!(RequestMeta::get_or_scan(&mut bad).is_err());
        assert!(bad.extensions().get::<RequestMeta>().is_none());
    }
}
