//! Short, non-reversible ids for API keys.

use http::HeaderMap;

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
    /// The id of `api_key`.
    pub fn from_api_key(api_key: &str) -> Self {
        todo!()
    }

    /// The id of the key in `x-api-key` (or `authorization: Bearer ...`), when present.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        todo!()
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
