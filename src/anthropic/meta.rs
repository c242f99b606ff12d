//! Request metadata read from a request body without building a JSON tree.

use bytes::Bytes;

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
}

impl RequestMeta {
    /// Scans a request body. Malformed JSON, or a top-level value that is not an object, gives a
    /// typed error.
    pub fn scan(body: &[u8]) -> Result<Self, MetaError> {
        todo!()
    }

    /// Reads the extension from `req`, or scans its body and inserts the result, returning it.
    pub fn get_or_scan<B>(req: &mut http::Request<B>) -> Result<&RequestMeta, MetaError>
    where
        B: AsRef<[u8]>,
    {
        todo!()
    }
}

/// Returns `body` with its top-level `model` value replaced by `model`; every other byte is
/// identical. A body without a top-level `model` gets one inserted as the first member.
///
/// ```
/// use tower_claude::anthropic::rewrite_model;
///
/// let body = br#"{"model": "claude-opus-4-7", "max_tokens":8, "metadata":{"model":"x"}}"#;
/// let out = rewrite_model(body, "claude-haiku-4-5").unwrap();
/// assert_eq!(&out[..], br#"{"model": "claude-haiku-4-5", "max_tokens":8, "metadata":{"model":"x"}}"#);
/// ```
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Bytes, MetaError> {
    todo!()
}

/// What went wrong reading a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetaErrorKind {
    /// The body is not valid JSON (or is truncated).
    InvalidJson,
    /// The top-level value is not an object.
    NotAnObject,
    /// A known field has the wrong type (e.g. `max_tokens` is a string).
    InvalidField,
}

/// A request body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaError {
    kind: MetaErrorKind,
    offset: usize,
    detail: &'static str,
}

impl MetaError {
    pub(crate) fn new(kind: MetaErrorKind, offset: usize, detail: &'static str) -> Self {
        Self {
            kind,
            offset,
            detail,
        }
    }

    /// The kind of error.
    pub fn kind(&self) -> MetaErrorKind {
        self.kind
    }

    /// The byte offset in the body where the problem was found.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid request body at byte {}: {}",
            self.offset, self.detail
        )
    }
}

impl std::error::Error for MetaError {}
