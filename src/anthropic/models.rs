//! The model catalogue: model id -> rate-limit group, and the default fallback chain.

use std::sync::Arc;

/// A rate-limit group: models whose limits are pooled (e.g. every Opus 4.x model shares one).
///
/// Buckets are keyed by group, never by model id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateLimitGroup(Arc<str>);

impl RateLimitGroup {
    /// A group named `name`.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(Arc::from(name.as_ref()))
    }

    /// The group name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RateLimitGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RateLimitGroup({})", self.0)
    }
}

impl std::fmt::Display for RateLimitGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The model family, the unit of the fallback chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelFamily {
    /// Claude Opus.
    Opus,
    /// Claude Sonnet.
    Sonnet,
    /// Claude Haiku.
    Haiku,
}

/// Maps model ids to rate-limit groups and families, and holds the fallback chain.
///
/// The default catalogue knows the current and older Claude ids; unknown ids are placed by
/// prefix rules (`claude-opus-*` is Opus, ...), and anything else is its own group. Every part
/// can be overridden.
///
/// ```
/// use tower_claude::anthropic::{ModelCatalog, ModelFamily};
///
/// let catalog = ModelCatalog::default();
/// assert_eq!(catalog.group("claude-opus-4-7"), catalog.group("claude-opus-4-1-20250805"));
/// assert_eq!(catalog.family("claude-opus-5-preview"), Some(ModelFamily::Opus));
/// assert_eq!(catalog.chain()[0], "claude-opus-4-7");
///
/// let custom = ModelCatalog::default().with_model("my-fine-tune", "claude-sonnet-4", ModelFamily::Sonnet);
/// assert_eq!(custom.group("my-fine-tune"), custom.group("claude-sonnet-4-6"));
/// ```
#[derive(Debug, Clone)]
pub struct ModelCatalog {
    inner: Arc<CatalogInner>,
}

#[derive(Debug, Clone)]
struct CatalogInner {
    /// Exact ids: (id, group, family).
    models: Vec<(String, RateLimitGroup, Option<ModelFamily>)>,
    /// Prefix rules, longest prefix wins: (prefix, group, family).
    prefixes: Vec<(String, RateLimitGroup, Option<ModelFamily>)>,
    /// The fallback chain, best model first.
    chain: Vec<String>,
}

impl Default for ModelCatalog {
    fn default() -> Self {
        todo!()
    }
}

impl ModelCatalog {
    /// An empty catalogue: every model is its own group, the chain is empty.
    pub fn empty() -> Self {
        todo!()
    }

    /// Adds (or replaces) an exact model id.
    pub fn with_model(
        self,
        id: impl Into<String>,
        group: impl AsRef<str>,
        family: ModelFamily,
    ) -> Self {
        todo!()
    }

    /// Adds (or replaces) a prefix rule: ids starting with `prefix` belong to `group`.
    pub fn with_prefix(
        self,
        prefix: impl Into<String>,
        group: impl AsRef<str>,
        family: ModelFamily,
    ) -> Self {
        todo!()
    }

    /// Replaces the fallback chain (best model first).
    pub fn with_chain<I, T>(self, chain: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        todo!()
    }

    /// The rate-limit group of `model`: exact id, then longest prefix, else a group named
    /// after the id itself.
    pub fn group(&self, model: &str) -> RateLimitGroup {
        todo!()
    }

    /// The family of `model`, when known.
    pub fn family(&self, model: &str) -> Option<ModelFamily> {
        todo!()
    }

    /// The fallback chain, best model first.
    pub fn chain(&self) -> &[String] {
        &self.inner.chain
    }

    /// The chain from `model` down: the models a request for `model` may be served by, starting
    /// with `model` itself (never an upgrade). A model outside the chain is placed by family
    /// (an unknown Opus id continues with the chain's Sonnet and Haiku); a model of unknown
    /// family gets only itself.
    pub fn chain_from(&self, model: &str) -> Vec<String> {
        todo!()
    }
}
