//! The model catalogue: model id -> rate-limit group, and the default fallback chain.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A rate-limit group: models whose limits are pooled (e.g. every Opus 4.x model shares one).
///
/// Buckets are keyed by group, never by model id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateLimitGroup(Arc<str>);

impl RateLimitGroup {
    /// Whether `other` is this very group (the same shared string, not only an equal one): a
    /// test of two pointers, for a memo of the last group looked up (the quota board's).
    #[inline]
    pub(crate) fn same(&self, other: &RateLimitGroup) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The name as a shared string (no copy), for a metric label.
    #[cfg(feature = "metrics")]
    pub(crate) fn label(&self) -> Arc<str> {
        self.0.clone()
    }

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
    /// Which catalogue this is: a fresh number for every catalogue built or changed, so that
    /// an entry remembered for a request ([`RequestMeta::model_entry`]) is used only with the
    /// catalogue that made it.
    ///
    /// [`RequestMeta::model_entry`]: crate::anthropic::RequestMeta::model_entry
    id: u64,
    /// The entries of the exact ids, by id (built from `models`, `prefixes` aside).
    exact: hashbrown::HashMap<Arc<str>, ModelEntry>,
    /// Exact ids: (id, group, family).
    models: Vec<(String, RateLimitGroup, Option<ModelFamily>)>,
    /// Prefix rules, longest prefix wins: (prefix, group, family).
    prefixes: Vec<(String, RateLimitGroup, Option<ModelFamily>)>,
    /// The fallback chain, best model first.
    chain: Vec<String>,
    /// Groups whose `cache_read_input_tokens` count toward the input-tokens-per-minute limit.
    cache_reads_count: Vec<RateLimitGroup>,
}

/// The next catalogue's [`CatalogInner::id`].
static NEXT_CATALOG: AtomicU64 = AtomicU64::new(1);

/// One model as a catalogue places it: its id, its rate-limit group, its family and whether
/// its cache reads count toward the input-tokens-per-minute limit, looked up once.
///
/// A request's entry is looked up once per request and catalogue and carried with its
/// [`RequestMeta`](crate::anthropic::RequestMeta)
/// ([`model_entry`](crate::anthropic::RequestMeta::model_entry)): the layers that need the
/// group (rate limit, retry, pacing, fallback, metrics) read it there instead of
/// searching the catalogue each. Cheap to clone (an `Arc`).
///
/// ```
/// use tower_claude::anthropic::{ModelCatalog, ModelFamily};
///
/// let catalog = ModelCatalog::default();
/// let opus = catalog.entry("claude-opus-4-7");
/// assert_eq!(opus.id(), "claude-opus-4-7");
/// assert_eq!(opus.group().as_str(), "claude-opus-4");
/// assert_eq!(opus.family(), Some(ModelFamily::Opus));
/// assert!(!opus.cache_reads_count());
/// assert!(opus.is_placed());
/// assert!(!catalog.entry("gpt-5").is_placed()); // its own group, no family
/// ```
#[derive(Clone)]
pub struct ModelEntry(Arc<EntryInner>);

struct EntryInner {
    id: Arc<str>,
    group: RateLimitGroup,
    family: Option<ModelFamily>,
    cache_reads_count: bool,
    /// Found by exact id or prefix rule (else the model is its own group).
    placed: bool,
    /// The id as an `x-tower-claude-model` header value (`None` when the id is not a valid
    /// header value), made with the entry: an answer's header shares it (a reference count).
    header: Option<http::HeaderValue>,
    /// The [`CatalogInner::id`] of the catalogue that made it.
    catalog: u64,
}

impl ModelEntry {
    /// The model id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The model id as a shared string (no copy: fallback's [`ServedModel`] holds it).
    ///
    /// [`ServedModel`]: crate::fallback::ServedModel
    pub(crate) fn shared_id(&self) -> &Arc<str> {
        &self.0.id
    }

    /// The id as an `x-tower-claude-model` header value, when it is a valid one.
    pub(crate) fn header_value(&self) -> Option<&http::HeaderValue> {
        self.0.header.as_ref()
    }

    /// The rate-limit group: exact id, then longest prefix, else a group named after the id.
    pub fn group(&self) -> &RateLimitGroup {
        &self.0.group
    }

    /// The family, when known.
    pub fn family(&self) -> Option<ModelFamily> {
        self.0.family
    }

    /// Whether the model's `cache_read_input_tokens` count toward its input-tokens-per-minute
    /// limit ([`ModelCatalog::cache_reads_count`]).
    pub fn cache_reads_count(&self) -> bool {
        self.0.cache_reads_count
    }

    /// Whether the catalogue placed the model (an exact id or a prefix rule); `false` for an
    /// id that is its own group.
    pub fn is_placed(&self) -> bool {
        self.0.placed
    }

    /// Whether `other` is this very entry (one shared record, not only an equal one): a test
    /// of two pointers, for a memo of what was derived from the last entry seen (metrics'
    /// labels).
    #[cfg(feature = "metrics")]
    pub(crate) fn same(&self, other: &ModelEntry) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether `catalog` made this entry (it is that catalogue's answer for [`id`](Self::id)).
    pub(crate) fn is_of(&self, catalog: &ModelCatalog) -> bool {
        self.0.catalog == catalog.inner.id
    }

    /// Whether this entry is one of `catalog`'s own table (its answer for the id, the same
    /// record on every request), not one made for a single request (an id the table does
    /// not list): what may be kept for later requests of the model by the entry's address.
    #[cfg(feature = "metrics")]
    pub(crate) fn is_listed_in(&self, catalog: &ModelCatalog) -> bool {
        self.is_of(catalog)
            && (catalog.inner.exact.get(self.id())).is_some_and(|listed| listed.same(self))
    }
}

impl std::fmt::Debug for ModelEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelEntry")
            .field("id", &self.0.id)
            .field("group", &self.0.group)
            .field("family", &self.0.family)
            .field("cache_reads_count", &self.0.cache_reads_count)
            .finish()
    }
}

/// Exact ids of the default catalogue: (id, group, family).
const DEFAULT_MODELS: &[(&str, &str, Option<ModelFamily>)] = {
    use ModelFamily::{Haiku, Opus, Sonnet};
    &[
        // Opus 4.x: one pooled limit.
        ("claude-opus-4-7", "claude-opus-4", Some(Opus)),
        ("claude-opus-4-6", "claude-opus-4", Some(Opus)),
        ("claude-opus-4-5", "claude-opus-4", Some(Opus)),
        ("claude-opus-4-5-20251101", "claude-opus-4", Some(Opus)),
        ("claude-opus-4-1", "claude-opus-4", Some(Opus)),
        ("claude-opus-4-1-20250805", "claude-opus-4", Some(Opus)),
        ("claude-opus-4-0", "claude-opus-4", Some(Opus)),
        ("claude-opus-4-20250514", "claude-opus-4", Some(Opus)),
        ("claude-4-opus-20250514", "claude-opus-4", Some(Opus)),
        // Sonnet 4.x: one pooled limit.
        ("claude-sonnet-4-6", "claude-sonnet-4", Some(Sonnet)),
        ("claude-sonnet-4-5", "claude-sonnet-4", Some(Sonnet)),
        (
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4",
            Some(Sonnet),
        ),
        ("claude-sonnet-4-0", "claude-sonnet-4", Some(Sonnet)),
        ("claude-sonnet-4-20250514", "claude-sonnet-4", Some(Sonnet)),
        ("claude-4-sonnet-20250514", "claude-sonnet-4", Some(Sonnet)),
        // Haiku 4.5.
        ("claude-haiku-4-5", "claude-haiku-4-5", Some(Haiku)),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5", Some(Haiku)),
        // A research preview outside the three families: its own group, never in the chain.
        ("claude-mythos-preview", "claude-mythos", None),
        // Claude 3.x (older code; each generation has its own limit).
        (
            "claude-3-7-sonnet-latest",
            "claude-3-7-sonnet",
            Some(Sonnet),
        ),
        (
            "claude-3-7-sonnet-20250219",
            "claude-3-7-sonnet",
            Some(Sonnet),
        ),
        (
            "claude-3-5-sonnet-latest",
            "claude-3-5-sonnet",
            Some(Sonnet),
        ),
        (
            "claude-3-5-sonnet-20241022",
            "claude-3-5-sonnet",
            Some(Sonnet),
        ),
        (
            "claude-3-5-sonnet-20240620",
            "claude-3-5-sonnet",
            Some(Sonnet),
        ),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku", Some(Haiku)),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku", Some(Haiku)),
        ("claude-3-opus-latest", "claude-3-opus", Some(Opus)),
        ("claude-3-opus-20240229", "claude-3-opus", Some(Opus)),
        ("claude-3-sonnet-20240229", "claude-3-sonnet", Some(Sonnet)),
        ("claude-3-haiku-20240307", "claude-3-haiku", Some(Haiku)),
    ]
};

/// Prefix rules of the default catalogue (longest prefix wins): (prefix, group, family).
const DEFAULT_PREFIXES: &[(&str, &str, ModelFamily)] = {
    use ModelFamily::{Haiku, Opus, Sonnet};
    &[
        ("claude-opus-4-", "claude-opus-4", Opus),
        ("claude-4-opus", "claude-opus-4", Opus),
        ("claude-sonnet-4-", "claude-sonnet-4", Sonnet),
        ("claude-4-sonnet", "claude-sonnet-4", Sonnet),
        ("claude-haiku-4-5", "claude-haiku-4-5", Haiku),
        ("claude-3-7-sonnet", "claude-3-7-sonnet", Sonnet),
        ("claude-3-5-sonnet", "claude-3-5-sonnet", Sonnet),
        ("claude-3-5-haiku", "claude-3-5-haiku", Haiku),
        ("claude-3-opus", "claude-3-opus", Opus),
        ("claude-3-sonnet", "claude-3-sonnet", Sonnet),
        ("claude-3-haiku", "claude-3-haiku", Haiku),
        // Unknown generations: family known, limit not shared with a known group.
        ("claude-opus-", "claude-opus", Opus),
        ("claude-sonnet-", "claude-sonnet", Sonnet),
        ("claude-haiku-", "claude-haiku", Haiku),
    ]
};

/// Groups whose cache reads count toward ITPM: the models marked with a dagger on Anthropic's
/// rate-limits page ("Limits marked with † count `cache_read_input_tokens` towards ITPM
/// usage"), i.e. the Claude 3 and 3.5 models; cache-aware ITPM started with Claude 3.7 Sonnet
/// (Anthropic, "Token-saving updates on the Anthropic API", March 2025) and holds for every
/// Claude 4.x model and Haiku 4.5. Checked on 2026-12-05 against a copy of the rate-limits page
/// (hivebook.wiki/wiki/anthropic-api-rate-limits, "Cache-Aware ITPM"); when unsure a group is
/// flagged, which only makes the estimate higher.
const CACHE_READS_COUNT: &[&str] = &[
    "claude-3-5-sonnet",
    "claude-3-5-haiku",
    "claude-3-opus",
    "claude-3-sonnet",
    "claude-3-haiku",
];

/// The default fallback chain: the best current (not deprecated) model of each family.
const DEFAULT_CHAIN: [&str; 3] = ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"];

/// The default catalogue.
///
/// Checked on 2026-11-28 against the official Python SDK (`anthropics/anthropic-sdk-python`,
/// `src/anthropic/types/model_param.py`, whose current ids are `claude-opus-4-7`,
/// `claude-mythos-preview`, `claude-opus-4-6`, `claude-sonnet-4-6`, `claude-haiku-4-5`, ...)
/// and the SDKs' `DEPRECATED_MODELS` table (Claude 3 Opus / Sonnet, 3.5 Haiku, 3.7 Sonnet,
/// `claude-opus-4-0` / `claude-sonnet-4-0` and their dated ids are deprecated). The deprecated
/// ids stay in the catalogue so that older code is grouped correctly, but the chain is
/// `claude-opus-4-7` -> `claude-sonnet-4-6` -> `claude-haiku-4-5`.
///
/// Groups: every Opus 4.x id shares `claude-opus-4`, every Sonnet 4.x id `claude-sonnet-4`
/// (Anthropic pools these limits), Haiku 4.5 is `claude-haiku-4-5`, and each Claude 3.x line
/// has its own group (`claude-3-opus`, `claude-3-5-sonnet`, ...).
impl Default for ModelCatalog {
    fn default() -> Self {
        let mut catalog = Self::empty();
        {
            let inner = Arc::make_mut(&mut catalog.inner);
            inner.models = DEFAULT_MODELS
                .iter()
                .map(|&(id, group, family)| (id.to_owned(), RateLimitGroup::new(group), family))
                .collect();
            inner.prefixes = DEFAULT_PREFIXES
                .iter()
                .map(|&(prefix, group, family)| {
                    (prefix.to_owned(), RateLimitGroup::new(group), Some(family))
                })
                .collect();
            inner.chain = DEFAULT_CHAIN.iter().map(|&m| m.to_owned()).collect();
            inner.cache_reads_count = CACHE_READS_COUNT
                .iter()
                .map(|&g| RateLimitGroup::new(g))
                .collect();
            inner.seal();
        }
        catalog
    }
}

impl ModelCatalog {
    /// An empty catalogue: every model is its own group, the chain is empty.
    ///
    /// ```
    /// use tower_claude::anthropic::ModelCatalog;
    ///
    /// let catalog = ModelCatalog::empty();
    /// assert_eq!(catalog.group("claude-opus-4-7").as_str(), "claude-opus-4-7");
    /// assert!(catalog.chain().is_empty());
    /// ```
    pub fn empty() -> Self {
        Self {
            inner: Arc::new(CatalogInner {
                id: NEXT_CATALOG.fetch_add(1, Ordering::Relaxed),
                exact: hashbrown::HashMap::new(),
                models: Vec::new(),
                prefixes: Vec::new(),
                chain: Vec::new(),
                cache_reads_count: Vec::new(),
            }),
        }
    }

    /// Adds (or replaces) an exact model id.
    pub fn with_model(
        mut self,
        id: impl Into<String>,
        group: impl AsRef<str>,
        family: ModelFamily,
    ) -> Self {
        let entry = (id.into(), RateLimitGroup::new(group), Some(family));
        let inner = Arc::make_mut(&mut self.inner);
        upsert(&mut inner.models, entry);
        inner.seal();
        self
    }

    /// Adds (or replaces) a prefix rule: ids starting with `prefix` belong to `group`.
    ///
    /// ```
    /// use tower_claude::anthropic::{ModelCatalog, ModelFamily};
    ///
    /// let catalog = ModelCatalog::default().with_prefix("claude-opus-5", "claude-opus-5", ModelFamily::Opus);
    /// assert_eq!(catalog.group("claude-opus-5-20270101").as_str(), "claude-opus-5");
    /// ```
    pub fn with_prefix(
        mut self,
        prefix: impl Into<String>,
        group: impl AsRef<str>,
        family: ModelFamily,
    ) -> Self {
        let entry = (prefix.into(), RateLimitGroup::new(group), Some(family));
        let inner = Arc::make_mut(&mut self.inner);
        upsert(&mut inner.prefixes, entry);
        inner.seal();
        self
    }

    /// Replaces the fallback chain (best model first).
    ///
    /// ```
    /// use tower_claude::anthropic::ModelCatalog;
    ///
    /// let catalog = ModelCatalog::default().with_chain(["claude-sonnet-4-6", "claude-haiku-4-5"]);
    /// assert_eq!(catalog.chain_from("claude-opus-4-7"), ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"]);
    /// ```
    pub fn with_chain<I, T>(mut self, chain: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let inner = Arc::make_mut(&mut self.inner);
        inner.chain = chain.into_iter().map(Into::into).collect();
        inner.seal();
        self
    }

    /// The entry of `model`: its exact id (one hash lookup), else the longest matching prefix
    /// rule, else a group named after the id itself (those two build a new entry).
    ///
    /// A request's entry is looked up once: see [`RequestMeta::model_entry`], which the
    /// stack's layers use instead of this.
    ///
    /// [`RequestMeta::model_entry`]: crate::anthropic::RequestMeta::model_entry
    pub fn entry(&self, model: &str) -> ModelEntry {
        if let Some(entry) = self.inner.exact.get(model) {
            return entry.clone();
        }
        let inner = &self.inner;
        let (group, family, placed) = match inner
            .prefixes
            .iter()
            .filter(|(prefix, _, _)| model.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _, _)| prefix.len())
        {
            Some((_, group, family)) => (group.clone(), *family, true),
            None => (RateLimitGroup::new(model), None, false),
        };
        inner.make_entry(Arc::from(model), group, family, placed)
    }

    /// The exact entry or the longest matching prefix rule.
    fn lookup(&self, model: &str) -> Option<(&RateLimitGroup, Option<ModelFamily>)> {
        if let Some(entry) = self.inner.exact.get(model) {
            return Some((&entry.0.group, entry.0.family));
        }
        self.inner
            .prefixes
            .iter()
            .filter(|(prefix, _, _)| model.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _, _)| prefix.len())
            .map(|(_, group, family)| (group, *family))
    }

    /// The rate-limit group of `model`: exact id, then longest prefix, else a group named
    /// after the id itself.
    pub fn group(&self, model: &str) -> RateLimitGroup {
        match self.lookup(model) {
            Some((group, _)) => group.clone(),
            None => RateLimitGroup::new(model),
        }
    }

    /// The family of `model`, when known.
    pub fn family(&self, model: &str) -> Option<ModelFamily> {
        self.lookup(model).and_then(|(_, family)| family)
    }

    /// Whether `model`'s `cache_read_input_tokens` count toward its input-tokens-per-minute
    /// limit. False for current models (only `input_tokens + cache_creation_input_tokens`
    /// count), true for the older models Anthropic's rate-limits page marks with a dagger: the
    /// default catalogue flags the groups `claude-3-5-sonnet`, `claude-3-5-haiku`,
    /// `claude-3-opus`, `claude-3-sonnet` and `claude-3-haiku`.
    ///
    /// ```
    /// use tower_claude::anthropic::ModelCatalog;
    ///
    /// let catalog = ModelCatalog::default();
    /// assert!(!catalog.cache_reads_count("claude-sonnet-4-6"));
    /// assert!(!catalog.cache_reads_count("claude-3-7-sonnet-20250219"));
    /// assert!(catalog.cache_reads_count("claude-3-5-haiku-20241022"));
    /// let custom = catalog.with_cache_reads_counted("claude-sonnet-4", true);
    /// assert!(custom.cache_reads_count("claude-sonnet-4-6"));
    /// ```
    pub fn cache_reads_count(&self, model: &str) -> bool {
        self.group_cache_reads_count(&self.group(model))
    }

    /// [`cache_reads_count`](Self::cache_reads_count) for a group already looked up.
    pub(crate) fn group_cache_reads_count(&self, group: &RateLimitGroup) -> bool {
        self.inner.cache_reads_count.contains(group)
    }

    /// Sets whether cache reads count toward the input-tokens-per-minute limit of `group`.
    pub fn with_cache_reads_counted(mut self, group: impl AsRef<str>, counted: bool) -> Self {
        let group = RateLimitGroup::new(group);
        let inner = Arc::make_mut(&mut self.inner);
        inner.cache_reads_count.retain(|g| *g != group);
        if counted {
            inner.cache_reads_count.push(group);
        }
        inner.seal();
        self
    }

    /// The fallback chain, best model first.
    pub fn chain(&self) -> &[String] {
        &self.inner.chain
    }

    /// The chain from `model` down: the models a request for `model` may be served by, starting
    /// with `model` itself (never an upgrade). A model outside the chain is placed by family
    /// (an unknown Opus id continues with the chain's Sonnet and Haiku); a model of unknown
    /// family gets only itself.
    ///
    /// ```
    /// use tower_claude::anthropic::ModelCatalog;
    ///
    /// let catalog = ModelCatalog::default();
    /// assert_eq!(catalog.chain_from("claude-sonnet-4-6"), ["claude-sonnet-4-6", "claude-haiku-4-5"]);
    /// assert_eq!(catalog.chain_from("claude-opus-4-1"), ["claude-opus-4-1", "claude-sonnet-4-6", "claude-haiku-4-5"]);
    /// assert_eq!(catalog.chain_from("gpt-5"), ["gpt-5"]);
    /// ```
    pub fn chain_from(&self, model: &str) -> Vec<String> {
        let chain = &self.inner.chain;
        if let Some(at) = chain.iter().position(|m| m == model) {
            return chain[at..].to_vec();
        }
        let mut out = vec![model.to_owned()];
        if let Some(family) = self.family(model) {
            out.extend(
                chain
                    .iter()
                    .filter(|m| self.family(m).is_some_and(|f| f > family))
                    .cloned(),
            );
        }
        out
    }
}

impl CatalogInner {
    /// After a change: a new id (entries made before belong to the old catalogue) and the
    /// exact ids' entries made again.
    fn seal(&mut self) {
        self.id = NEXT_CATALOG.fetch_add(1, Ordering::Relaxed);
        let exact = self
            .models
            .iter()
            .map(|(id, group, family)| {
                let id: Arc<str> = Arc::from(id.as_str());
                let entry = self.make_entry(id.clone(), group.clone(), *family, true);
                (id, entry)
            })
            .collect();
        self.exact = exact;
    }

    fn make_entry(
        &self,
        id: Arc<str>,
        group: RateLimitGroup,
        family: Option<ModelFamily>,
        placed: bool,
    ) -> ModelEntry {
        ModelEntry(Arc::new(EntryInner {
            cache_reads_count: self.cache_reads_count.contains(&group),
            header: http::HeaderValue::from_str(&id).ok(),
            id,
            group,
            family,
            placed,
            catalog: self.id,
        }))
    }
}

/// Replaces the entry with the same key, or appends.
fn upsert(
    entries: &mut Vec<(String, RateLimitGroup, Option<ModelFamily>)>,
    entry: (String, RateLimitGroup, Option<ModelFamily>),
) {
    match entries.iter_mut().find(|(key, _, _)| *key == entry.0) {
        Some(slot) => *slot = entry,
        None => entries.push(entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry belongs to the catalogue that made it: a changed catalogue is another one,
    /// and each answers from its own ids.
    #[test]
    fn entries_belong_to_their_catalogue() {
        let default = ModelCatalog::default();
        let custom =
            default
                .clone()
                .with_model("claude-haiku-4-5", "elsewhere", ModelFamily::Haiku);
        let entry = default.entry("claude-haiku-4-5");
        assert!(entry.is_of(&default) && entry.is_of(&default.clone()));
        assert!(!entry.is_of(&custom));
        assert_eq!(entry.group().as_str(), "claude-haiku-4-5");
        assert_eq!(
            custom.entry("claude-haiku-4-5").group().as_str(),
            "elsewhere"
        );
        let counted = default
            .clone()
            .with_cache_reads_counted("claude-opus-4", true);
        assert!(counted.entry("claude-opus-4-7").cache_reads_count());
        assert!(counted.entry("claude-opus-4-9").cache_reads_count()); // by prefix
        assert!(!default.entry("claude-opus-4-7").cache_reads_count());
        let unknown = default.entry("gpt-5");
        assert_eq!(
            (unknown.group().as_str(), unknown.family()),
            ("gpt-5", None)
        );
        assert!(!unknown.is_placed() && unknown.is_of(&default));
        // The answer's header value, made with the entry.
        let haiku = default.entry("claude-haiku-4-5");
        assert_eq!(haiku.header_value().unwrap(), "claude-haiku-4-5");
        assert!(default.entry("bad\nid").header_value().is_none());
    }

    #[test]
    fn opus_and_sonnet_4x_are_pooled() {
        let c = ModelCatalog::default();
        for id in [
            "claude-opus-4-7",
            "claude-opus-4-6",
            "claude-opus-4-5-20251101",
            "claude-opus-4-1",
            "claude-opus-4-0",
            "claude-4-opus-20250514",
            "claude-opus-4-8", // unknown 4.x: prefix rule
        ] {
            assert_eq!(c.group(id).as_str(), "claude-opus-4", "{id}");
            assert_eq!(c.family(id), Some(ModelFamily::Opus), "{id}");
        }
        for id in [
            "claude-sonnet-4-6",
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4-20250514",
        ] {
            assert_eq!(c.group(id).as_str(), "claude-sonnet-4", "{id}");
            assert_eq!(c.family(id), Some(ModelFamily::Sonnet), "{id}");
        }
        assert_eq!(
            c.group("claude-haiku-4-5-20251001").as_str(),
            "claude-haiku-4-5"
        );
        assert_eq!(c.family("claude-haiku-4-5"), Some(ModelFamily::Haiku));
    }

    #[test]
    fn claude_3_ids_have_their_own_groups() {
        let c = ModelCatalog::default();
        let cases = [
            ("claude-3-opus-20240229", "claude-3-opus", ModelFamily::Opus),
            (
                "claude-3-sonnet-20240229",
                "claude-3-sonnet",
                ModelFamily::Sonnet,
            ),
            (
                "claude-3-haiku-20240307",
                "claude-3-haiku",
                ModelFamily::Haiku,
            ),
            (
                "claude-3-5-sonnet-20241022",
                "claude-3-5-sonnet",
                ModelFamily::Sonnet,
            ),
            (
                "claude-3-5-haiku-latest",
                "claude-3-5-haiku",
                ModelFamily::Haiku,
            ),
            (
                "claude-3-7-sonnet-20250219",
                "claude-3-7-sonnet",
                ModelFamily::Sonnet,
            ),
        ];
        for (id, group, family) in cases {
            assert_eq!(c.group(id).as_str(), group, "{id}");
            assert_eq!(c.family(id), Some(family), "{id}");
        }
    }

    #[test]
    fn unknown_ids_use_the_longest_prefix_or_themselves() {
        let c = ModelCatalog::default();
        assert_eq!(c.group("claude-opus-5-preview").as_str(), "claude-opus");
        assert_eq!(c.family("claude-opus-5-preview"), Some(ModelFamily::Opus));
        assert_eq!(c.group("claude-haiku-5").as_str(), "claude-haiku");
        assert_eq!(c.group("gpt-5").as_str(), "gpt-5");
        assert_eq!(c.family("gpt-5"), None);
        assert_eq!(c.group("claude-mythos-preview").as_str(), "claude-mythos");
        assert_eq!(c.family("claude-mythos-preview"), None);
        let c = c.with_prefix("claude-opus-4-9", "opus-4-9", ModelFamily::Opus);
        assert_eq!(c.group("claude-opus-4-9-x").as_str(), "opus-4-9");
        assert_eq!(c.group("claude-opus-4-8").as_str(), "claude-opus-4");
    }

    #[test]
    fn overrides_replace_entries_and_do_not_touch_clones() {
        let base = ModelCatalog::default();
        let custom = base
            .clone()
            .with_model("claude-opus-4-7", "dedicated", ModelFamily::Opus)
            .with_prefix("claude-opus-", "opus-any", ModelFamily::Opus);
        assert_eq!(custom.group("claude-opus-4-7").as_str(), "dedicated");
        assert_eq!(custom.group("claude-opus-6").as_str(), "opus-any");
        assert_eq!(base.group("claude-opus-4-7").as_str(), "claude-opus-4");
        assert_eq!(base.group("claude-opus-6").as_str(), "claude-opus");
        assert_eq!(
            custom
                .inner
                .models
                .iter()
                .filter(|(id, _, _)| id == "claude-opus-4-7")
                .count(),
            1
        );
    }

    #[test]
    fn default_chain_is_current_and_ordered() {
        let c = ModelCatalog::default();
        assert_eq!(
            c.chain(),
            ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"]
        );
        let families: Vec<_> = c.chain().iter().map(|m| c.family(m)).collect();
        assert_eq!(
            families,
            [
                Some(ModelFamily::Opus),
                Some(ModelFamily::Sonnet),
                Some(ModelFamily::Haiku)
            ]
        );
    }

    #[test]
    fn chain_from_never_upgrades() {
        let c = ModelCatalog::default();
        assert_eq!(c.chain_from("claude-opus-4-7"), c.chain());
        assert_eq!(c.chain_from("claude-haiku-4-5"), ["claude-haiku-4-5"]);
        assert_eq!(
            c.chain_from("claude-3-5-sonnet-latest"),
            ["claude-3-5-sonnet-latest", "claude-haiku-4-5"]
        );
        assert_eq!(
            c.chain_from("claude-3-haiku-20240307"),
            ["claude-3-haiku-20240307"]
        );
        assert_eq!(
            c.chain_from("claude-opus-5-preview"),
            [
                "claude-opus-5-preview",
                "claude-sonnet-4-6",
                "claude-haiku-4-5"
            ]
        );
        assert_eq!(
            c.chain_from("claude-mythos-preview"),
            ["claude-mythos-preview"]
        );
        assert_eq!(
            ModelCatalog::empty().chain_from("claude-opus-4-7"),
            ["claude-opus-4-7"]
        );
    }
}
