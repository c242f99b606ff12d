//! [`PriceTable`]: what a Claude answer costs, in millionths of a US dollar, from its real
//! usage.
//!
//! The default table is the data file `src/tenant/prices.json` (built in with `include_str!`,
//! [`DEFAULT_PRICES_JSON`]): per model id prefix, US dollars per million tokens for base input,
//! output, 5-minute and 1-hour cache writes and cache reads, and the Message Batches discount,
//! with the URL of Anthropic's pricing page it was copied from and the date it was checked
//! ([`PriceTable::source`], [`PriceTable::checked`]). Its schema is documented on
//! [`PriceTable`]. Overrides use the same schema and are merged over the defaults entry by
//! entry: [`PriceTable::merge_json`] and [`PriceTable::with`] always, and, with the cargo
//! feature `price-files` (pulls the `toml` crate; on in `proxy`), the same document in TOML
#![cfg_attr(
    feature = "price-files",
    doc = "([`PriceTable::merge_toml`]) or from a TOML file ([`PriceTable::merge_file`])."
)]
#![cfg_attr(
    not(feature = "price-files"),
    doc = "(`PriceTable::merge_toml`) or from a TOML file (`PriceTable::merge_file`)."
)]
//!
//! ```
//! use tower_claude::anthropic::Usage;
//! use tower_claude::tenant::PriceTable;
//!
//! let prices = PriceTable::default();
//! let usage = Usage {
//!     input_tokens: 1_000,
//!     output_tokens: 500,
//!     cache_creation_input_tokens: 2_000,
//!     cache_read_input_tokens: 10_000,
//!     cache_creation_1h_input_tokens: 0,
//! };
//! // Sonnet 4.6: $3 / MTok input, $15 output, $3.75 5-minute writes, $0.30 reads:
//! // 1,000 × 3 + 500 × 15 + 2,000 × 3.75 + 10,000 × 0.30 = 21,000 micro-USD ($0.021).
//! assert_eq!(prices.cost_micro_usd("claude-sonnet-4-6", &usage), 21_000);
//! ```
//!
//! Money is integer micro-USD (`u64`): sums over millions of requests do not drift the way
//! floating-point dollars would. Each cost is rounded up to the next micro-USD.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
#[cfg(feature = "price-files")]
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::anthropic::{CacheTtl, RequestMeta, Usage};

/// The built-in price table, a JSON document (`src/tenant/prices.json`; its schema is
/// documented on [`PriceTable`]).
pub const DEFAULT_PRICES_JSON: &str = include_str!("prices.json");

/// The prices of one model family, in micro-USD per million tokens (so `$3 / MTok` is
/// `3_000_000`).
///
/// ```
/// use tower_claude::tenant::ModelPrice;
///
/// let p = ModelPrice::usd(3.0, 15.0, 3.75, 6.0, 0.30);
/// assert_eq!(p.input(), 3_000_000);
/// assert_eq!(p.cache_read(), 300_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelPrice {
    input: u64,
    output: u64,
    cache_write_5m: u64,
    cache_write_1h: u64,
    cache_read: u64,
    batch_discount: Option<f64>,
}

/// US dollars per MTok to micro-USD per MTok.
fn micro(usd: f64) -> u64 {
    (usd * 1e6).round() as u64
}

impl ModelPrice {
    /// Prices in US dollars per million tokens: base input, output, 5-minute cache writes,
    /// 1-hour cache writes, cache reads (negative or non-finite values count as 0). The batch
    /// discount is the table's.
    pub fn usd(input: f64, output: f64, write_5m: f64, write_1h: f64, read: f64) -> Self {
        let m = |v: f64| {
            if v.is_finite() && v > 0.0 {
                micro(v)
            } else {
                0
            }
        };
        Self {
            input: m(input),
            output: m(output),
            cache_write_5m: m(write_5m),
            cache_write_1h: m(write_1h),
            cache_read: m(read),
            batch_discount: None,
        }
    }

    /// Its own batch discount (a share, `0.0..=1.0`), instead of the table's.
    pub fn batch_discount(mut self, discount: f64) -> Self {
        self.batch_discount = Some(if discount.is_finite() {
            discount.clamp(0.0, 1.0)
        } else {
            0.0
        });
        self
    }

    /// Base input, micro-USD per MTok.
    pub fn input(&self) -> u64 {
        self.input
    }

    /// Output, micro-USD per MTok.
    pub fn output(&self) -> u64 {
        self.output
    }

    /// 5-minute cache writes, micro-USD per MTok.
    pub fn cache_write_5m(&self) -> u64 {
        self.cache_write_5m
    }

    /// 1-hour cache writes, micro-USD per MTok.
    pub fn cache_write_1h(&self) -> u64 {
        self.cache_write_1h
    }

    /// Cache reads, micro-USD per MTok.
    pub fn cache_read(&self) -> u64 {
        self.cache_read
    }

    /// `usage` at these prices, in micro-USD (rounded up), before any discount.
    fn numerator(&self, usage: &Usage) -> u128 {
        let t = |tokens: u64, price: u64| u128::from(tokens) * u128::from(price);
        t(usage.input_tokens, self.input)
            + t(usage.output_tokens, self.output)
            + t(usage.cache_creation_5m_input_tokens(), self.cache_write_5m)
            + t(usage.cache_creation_1h_input_tokens, self.cache_write_1h)
            + t(usage.cache_read_input_tokens, self.cache_read)
    }
}

/// Divides by a million, rounding up, saturating at `u64::MAX`.
fn per_million_ceil(numerator: u128) -> u64 {
    u64::try_from(numerator.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    name: Option<String>,
    also: Vec<String>,
    price: ModelPrice,
}

#[derive(Debug)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    /// (prefix, entry key), longest prefix first.
    prefixes: Vec<(String, String)>,
    fallback: Option<String>,
    source: String,
    checked: String,
    batch_discount: f64,
    /// Model ids already warned about (bounded: see `MAX_WARNED`).
    warned: Mutex<HashSet<String>>,
}

/// How many unknown model ids are remembered for the warn-once rule; past it, unknown ids are
/// still priced with the fallback but no longer warned about.
const MAX_WARNED: usize = 1_024;

/// A price table: model id prefix to [`ModelPrice`]; see the [module docs](self).
///
/// Cheap to clone (shared). The default is the built-in table ([`DEFAULT_PRICES_JSON`]),
/// parsed once per process.
///
/// # Schema
///
/// The built-in table and every override are one document (a JSON object for
#[cfg_attr(
    feature = "price-files",
    doc = "[`merge_json`](Self::merge_json), a TOML table for [`merge_toml`](Self::merge_toml) and
[`merge_file`](Self::merge_file)); every field is optional in an override:"
)]
#[cfg_attr(
    not(feature = "price-files"),
    doc = "[`merge_json`](Self::merge_json), a TOML table for `merge_toml` and
`merge_file`, feature `price-files`); every field is optional in an override:"
)]
///
/// | field | meaning |
/// |---|---|
/// | `source` | where the prices come from (a URL; [`source`](Self::source)) |
/// | `checked` | when they were last checked against it (`YYYY-MM-DD`; [`checked`](Self::checked)) |
/// | `batch_discount` | share taken off in a Message Batch (`0.0..=1.0`) |
/// | `fallback` | the entry that prices a model id no entry matches ([`fallback`](Self::fallback)) |
/// | `models.<prefix>` | an entry: a model id prefix; the longest matching prefix (of an entry or of its `also` list) prices a model id, e.g. `claude-opus-4-5` prices `claude-opus-4-5-20251101` |
///
/// An entry's fields, prices in US dollars per million tokens (MTok):
///
/// | field | priced usage |
/// |---|---|
/// | `also` | more prefixes priced alike (optional) |
/// | `name` | what the entry is (optional, for humans) |
/// | `input` | base input tokens (`usage.input_tokens`) |
/// | `output` | output tokens (`usage.output_tokens`, thinking included) |
/// | `cache_write_5m` | 5-minute cache writes (`usage.cache_creation.ephemeral_5m_input_tokens`, or all of `cache_creation_input_tokens` when the split is absent) |
/// | `cache_write_1h` | 1-hour cache writes (`usage.cache_creation.ephemeral_1h_input_tokens`) |
/// | `cache_read` | cache hits and refreshes (`usage.cache_read_input_tokens`) |
/// | `batch_discount` | this entry's own batch discount (optional; default: the top-level one) |
///
/// An override entry whose key is already known keeps the fields it leaves out; a new entry
/// needs all five prices. A field the schema does not have is an error naming it. A model id
/// no entry matches is priced with the `fallback` entry (default: the entry with the highest
/// output price), never at zero, and a warning is logged once per id.
///
/// # The built-in prices
///
/// Copied from Anthropic, "Pricing", <https://platform.claude.com/docs/en/about-claude/pricing>
/// (model table "Base input tokens | 5m cache writes | 1h cache writes | Cache hits and
/// refreshes | Output tokens"), and "Batch processing",
/// <https://platform.claude.com/docs/en/build-with-claude/batch-processing> (the Message
/// Batches API costs 50 % of the standard prices); checked on 2026-12-05.
///
/// ```
/// use tower_claude::tenant::{ModelPrice, PriceTable};
///
/// let prices = PriceTable::default()
///     .with("my-fine-tune", ModelPrice::usd(4.0, 20.0, 5.0, 8.0, 0.4))
///     .merge_json(r#"{"models": {"claude-haiku-4-5": {"output": 4.0}}}"#)?;
/// assert_eq!(prices.price("my-fine-tune-v2").output(), 20_000_000);
/// assert_eq!(prices.price("claude-haiku-4-5").output(), 4_000_000);
/// assert_eq!(prices.price("claude-haiku-4-5").input(), 1_000_000); // kept from the default
/// assert!(prices.source().starts_with("https://platform.claude.com/"));
/// # Ok::<(), tower_claude::tenant::PriceError>(())
/// ```
#[derive(Clone)]
pub struct PriceTable {
    inner: Arc<Inner>,
}

impl fmt::Debug for PriceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PriceTable")
            .field("entries", &self.inner.entries.len())
            .field("source", &self.inner.source)
            .field("checked", &self.inner.checked)
            .finish()
    }
}

impl Default for PriceTable {
    fn default() -> Self {
        static DEFAULT: OnceLock<PriceTable> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                // The built-in file is checked by a unit test; an error here is a bug in it.
                PriceTable::empty()
                    .merge_json(DEFAULT_PRICES_JSON)
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "the built-in price table does not parse");
                        PriceTable::empty()
                    })
            })
            .clone()
    }
}

impl PriceTable {
    /// A table with no entries: every model is priced by the fallback, which for an empty
    /// table is [`PriceTable::LAST_RESORT`].
    pub fn empty() -> Self {
        Self::from_parts(BTreeMap::new(), None, String::new(), String::new(), 0.5)
    }

    /// The price of a model no entry matches in a table that has no entries at all (Claude
    /// Opus 4.1's: the most expensive family of the built-in table), so that nothing is ever
    /// free by mistake.
    pub const LAST_RESORT: ModelPrice = ModelPrice {
        input: 15_000_000,
        output: 75_000_000,
        cache_write_5m: 18_750_000,
        cache_write_1h: 30_000_000,
        cache_read: 1_500_000,
        batch_discount: None,
    };

    fn from_parts(
        entries: BTreeMap<String, Entry>,
        fallback: Option<String>,
        source: String,
        checked: String,
        batch_discount: f64,
    ) -> Self {
        let mut prefixes: Vec<(String, String)> = entries
            .values()
            .flat_map(|e| {
                std::iter::once(e.key.clone())
                    .chain(e.also.iter().cloned())
                    .map(move |p| (p, e.key.clone()))
            })
            .collect();
        prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Self {
            inner: Arc::new(Inner {
                entries,
                prefixes,
                fallback,
                source,
                checked,
                batch_discount,
                warned: Mutex::new(HashSet::new()),
            }),
        }
    }

    fn rebuild(&self, f: impl FnOnce(&mut BTreeMap<String, Entry>, &mut Meta)) -> Self {
        let i = &*self.inner;
        let mut entries = i.entries.clone();
        let mut meta = Meta {
            fallback: i.fallback.clone(),
            source: i.source.clone(),
            checked: i.checked.clone(),
            batch_discount: i.batch_discount,
        };
        f(&mut entries, &mut meta);
        Self::from_parts(
            entries,
            meta.fallback,
            meta.source,
            meta.checked,
            meta.batch_discount,
        )
    }

    /// Sets (or replaces) the price of the models whose id starts with `prefix`.
    pub fn with(self, prefix: impl Into<String>, price: ModelPrice) -> Self {
        let key = prefix.into();
        self.rebuild(|entries, _| {
            let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
                key,
                name: None,
                also: Vec::new(),
                price,
            });
            entry.price = price;
        })
    }

    /// Prices unknown model ids with the entry `prefix` (by default: the entry with the highest
    /// output price).
    pub fn fallback(self, prefix: impl Into<String>) -> Self {
        let key = prefix.into();
        self.rebuild(|_, meta| meta.fallback = Some(key))
    }

    /// Merges a JSON document of the [schema](PriceTable#schema) over this table: an entry
    /// whose key is already known keeps the fields the document leaves out; a new entry needs
    /// every price. A bad document is an error naming the field, and the table is left as it
    /// was.
    ///
    /// ```
    /// use tower_claude::tenant::{PriceErrorKind, PriceTable};
    ///
    /// let err = PriceTable::default()
    ///     .merge_json(r#"{"models": {"my-model": {"input": 1.0, "output": -2}}}"#)
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), PriceErrorKind::InvalidValue);
    /// assert_eq!(err.field(), "models.my-model.output");
    /// ```
    pub fn merge_json(&self, text: &str) -> Result<Self, PriceError> {
        let doc: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| PriceError::new(PriceErrorKind::Syntax, "", e.to_string()))?;
        self.merge_value(&doc)
    }

    /// Merges a parsed document (JSON, or TOML converted to JSON values).
    fn merge_value(&self, doc: &serde_json::Value) -> Result<Self, PriceError> {
        let doc = doc.as_object().ok_or_else(|| {
            PriceError::new(PriceErrorKind::Syntax, "", "expected an object (a table)")
        })?;
        let mut result = Ok(());
        let table = self.rebuild(|entries, meta| result = merge_doc(doc, entries, meta));
        result.map(|()| table)
    }

    /// [`merge_json`](Self::merge_json) with the same document in TOML (feature
    /// `price-files`).
    ///
    /// ```
    /// use tower_claude::tenant::{PriceErrorKind, PriceTable};
    ///
    /// let err = PriceTable::default()
    ///     .merge_toml("[models.my-model]\ninput = 1.0\noutput = -2\n")
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), PriceErrorKind::InvalidValue);
    /// assert_eq!(err.field(), "models.my-model.output");
    /// ```
    #[cfg(feature = "price-files")]
    #[cfg_attr(docsrs, doc(cfg(feature = "price-files")))]
    pub fn merge_toml(&self, text: &str) -> Result<Self, PriceError> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            PriceError::new(PriceErrorKind::Syntax, "", e.message())
        })?;
        // TOML values map onto JSON ones (integers and floats to numbers, arrays, tables to
        // objects), so one validator serves both formats. A TOML date is not a string and is
        // refused as one, as it was before; a non-finite float becomes `null`, refused as a
        // price.
        let doc = serde_json::to_value(doc)
            .map_err(|e| PriceError::new(PriceErrorKind::Syntax, "", e.to_string()))?;
        self.merge_value(&doc)
    }

    /// [`merge_toml`](Self::merge_toml) with the contents of a file (feature `price-files`).
    #[cfg(feature = "price-files")]
    #[cfg_attr(docsrs, doc(cfg(feature = "price-files")))]
    pub fn merge_file(&self, path: impl AsRef<Path>) -> Result<Self, PriceError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PriceError::new(
                PriceErrorKind::Io,
                "",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        self.merge_toml(&text)
    }

    /// Where the built-in prices come from (a URL).
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// When they were last checked against the source (`YYYY-MM-DD`).
    pub fn checked(&self) -> &str {
        &self.inner.checked
    }

    /// The entry key (a prefix) that prices `model`, if one matches.
    pub fn entry_for(&self, model: &str) -> Option<&str> {
        self.inner
            .prefixes
            .iter()
            .find(|(p, _)| model.starts_with(p.as_str()))
            .map(|(_, key)| key.as_str())
    }

    /// The price of `model`: the entry with the longest matching prefix, else the fallback
    /// (logged once per model id at WARN).
    pub fn price(&self, model: &str) -> ModelPrice {
        if let Some(key) = self.entry_for(model) {
            if let Some(e) = self.inner.entries.get(key) {
                return e.price;
            }
        }
        let fallback = self.fallback_price();
        let mut warned = self
            .inner
            .warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if warned.len() < MAX_WARNED && warned.insert(model.to_owned()) {
            tracing::warn!(
                model,
                fallback = self.fallback_key().unwrap_or("built-in"),
                "price table: unknown model, priced with the fallback entry"
            );
        }
        fallback
    }

    fn fallback_key(&self) -> Option<&str> {
        let i = &*self.inner;
        if let Some(key) = i.fallback.as_deref().filter(|k| i.entries.contains_key(*k)) {
            return Some(key);
        }
        i.entries
            .values()
            .max_by_key(|e| (e.price.output, e.price.input))
            .map(|e| e.key.as_str())
    }

    /// The price of a model no entry matches (see [`PriceTable::fallback`]).
    pub fn fallback_price(&self) -> ModelPrice {
        self.fallback_key()
            .and_then(|k| self.inner.entries.get(k))
            .map_or(Self::LAST_RESORT, |e| e.price)
    }

    /// The cost of `usage` from `model`, in micro-USD: input, output, 5-minute and 1-hour cache
    /// writes, cache reads, each at its price (rounded up once, on the sum).
    pub fn cost_micro_usd(&self, model: &str, usage: &Usage) -> u64 {
        per_million_ceil(self.price(model).numerator(usage))
    }

    /// The same usage in a Message Batch: the batch discount applied.
    ///
    /// ```
    /// use tower_claude::anthropic::Usage;
    /// use tower_claude::tenant::PriceTable;
    ///
    /// let usage = Usage { input_tokens: 1_000_000, ..Default::default() };
    /// let prices = PriceTable::default();
    /// assert_eq!(prices.cost_micro_usd("claude-opus-4-7", &usage), 5_000_000);
    /// assert_eq!(prices.batch_cost_micro_usd("claude-opus-4-7", &usage), 2_500_000);
    /// ```
    pub fn batch_cost_micro_usd(&self, model: &str, usage: &Usage) -> u64 {
        let price = self.price(model);
        let discount = price.batch_discount.unwrap_or(self.inner.batch_discount);
        let keep = micro(1.0 - discount.clamp(0.0, 1.0));
        per_million_ceil(price.numerator(usage).saturating_mul(u128::from(keep)) / 1_000_000)
    }

    /// The most a request can cost before it is sent, in micro-USD: its input estimate
    /// ([`RequestMeta::input_tokens`], conservative) at the dearest input price it may be
    /// billed (1-hour cache writes when a block asks for them, else 5-minute writes when it has
    /// `cache_control`, else base input), plus `max_tokens` of output. A request without
    /// `max_tokens` is given `default_max_tokens`.
    ///
    /// ```
    /// use tower_claude::anthropic::RequestMeta;
    /// use tower_claude::tenant::PriceTable;
    ///
    /// let meta = RequestMeta::scan(br#"{"model":"claude-haiku-4-5","max_tokens":1000,
    ///     "messages":[{"role":"user","content":"Hi"}]}"#).unwrap();
    /// let max = PriceTable::default().max_cost_micro_usd("claude-haiku-4-5", &meta, 4096);
    /// // 1,000 output tokens at $5 / MTok, plus the input estimate at $1 / MTok.
    /// assert_eq!(max, 5_000 + meta.input_tokens);
    /// ```
    pub fn max_cost_micro_usd(
        &self,
        model: &str,
        meta: &RequestMeta,
        default_max_tokens: u64,
    ) -> u64 {
        let price = self.price(model);
        let input_price = if meta
            .cache_breakpoints
            .iter()
            .any(|b| b.ttl == CacheTtl::OneHour)
        {
            price.cache_write_1h.max(price.input)
        } else if !meta.cache_breakpoints.is_empty() {
            price.cache_write_5m.max(price.input)
        } else {
            price.input
        };
        let output = meta
            .max_tokens
            .unwrap_or(default_max_tokens)
            .min(Usage::MAX_TOKENS);
        let numerator = u128::from(meta.input_tokens.min(Usage::MAX_TOKENS))
            * u128::from(input_price)
            + u128::from(output) * u128::from(price.output);
        per_million_ceil(numerator)
    }
}

struct Meta {
    fallback: Option<String>,
    source: String,
    checked: String,
    batch_discount: f64,
}

fn merge_doc(
    doc: &serde_json::Map<String, serde_json::Value>,
    entries: &mut BTreeMap<String, Entry>,
    meta: &mut Meta,
) -> Result<(), PriceError> {
    for (key, value) in doc {
        match key.as_str() {
            "source" => meta.source = string(value, key)?,
            "checked" => meta.checked = string(value, key)?,
            "fallback" => meta.fallback = Some(string(value, key)?),
            "batch_discount" => meta.batch_discount = share(value, key)?,
            "models" => {
                let models = value.as_object().ok_or_else(|| {
                    PriceError::new(PriceErrorKind::InvalidValue, key, "expected an object")
                })?;
                for (prefix, model) in models {
                    merge_model(prefix, model, entries)?;
                }
            }
            other => {
                return Err(PriceError::new(
                    PriceErrorKind::UnknownField,
                    other,
                    "expected source, checked, fallback, batch_discount or models",
                ));
            }
        }
    }
    Ok(())
}

fn merge_model(
    prefix: &str,
    value: &serde_json::Value,
    entries: &mut BTreeMap<String, Entry>,
) -> Result<(), PriceError> {
    let path = format!("models.{prefix}");
    let table = value.as_object().ok_or_else(|| {
        PriceError::new(PriceErrorKind::InvalidValue, &path, "expected an object")
    })?;
    if prefix.is_empty() {
        return Err(PriceError::new(
            PriceErrorKind::InvalidValue,
            &path,
            "a model prefix cannot be empty",
        ));
    }
    let known = entries.get(prefix);
    let mut prices: [Option<u64>; 5] = match known {
        Some(e) => [
            Some(e.price.input),
            Some(e.price.output),
            Some(e.price.cache_write_5m),
            Some(e.price.cache_write_1h),
            Some(e.price.cache_read),
        ],
        None => [None; 5],
    };
    let mut name = known.and_then(|e| e.name.clone());
    let mut also = known.map(|e| e.also.clone()).unwrap_or_default();
    let mut discount = known.and_then(|e| e.price.batch_discount);
    const PRICE_FIELDS: [&str; 5] = [
        "input",
        "output",
        "cache_write_5m",
        "cache_write_1h",
        "cache_read",
    ];
    for (field, v) in table {
        let at = format!("{path}.{field}");
        if let Some(i) = PRICE_FIELDS.iter().position(|f| f == field) {
            prices[i] = Some(micro(usd(v, &at)?));
            continue;
        }
        match field.as_str() {
            "name" => name = Some(string(v, &at)?),
            "batch_discount" => discount = Some(share(v, &at)?),
            "also" => {
                let list = v.as_array().ok_or_else(|| {
                    PriceError::new(
                        PriceErrorKind::InvalidValue,
                        &at,
                        "expected an array of strings",
                    )
                })?;
                also = list
                    .iter()
                    .map(|p| match p.as_str() {
                        Some(s) if !s.is_empty() => Ok(s.to_owned()),
                        _ => Err(PriceError::new(
                            PriceErrorKind::InvalidValue,
                            &at,
                            "expected non-empty strings",
                        )),
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ => {
                return Err(PriceError::new(
                    PriceErrorKind::UnknownField,
                    &at,
                    "expected name, also, input, output, cache_write_5m, cache_write_1h, cache_read or batch_discount",
                ));
            }
        }
    }
    let mut got = [0u64; 5];
    for (i, field) in PRICE_FIELDS.iter().enumerate() {
        got[i] = prices[i].ok_or_else(|| {
            PriceError::new(
                PriceErrorKind::MissingField,
                format!("{path}.{field}"),
                "a new model entry needs every price",
            )
        })?;
    }
    entries.insert(
        prefix.to_owned(),
        Entry {
            key: prefix.to_owned(),
            name,
            also,
            price: ModelPrice {
                input: got[0],
                output: got[1],
                cache_write_5m: got[2],
                cache_write_1h: got[3],
                cache_read: got[4],
                batch_discount: discount,
            },
        },
    );
    Ok(())
}

fn string(v: &serde_json::Value, at: &str) -> Result<String, PriceError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| PriceError::new(PriceErrorKind::InvalidValue, at, "expected a string"))
}

/// A price in USD per MTok: a finite number, 0 or more (integers allowed), at most $1,000,000.
fn usd(v: &serde_json::Value, at: &str) -> Result<f64, PriceError> {
    let n = match v.as_f64() {
        Some(n) => n,
        None => {
            return Err(PriceError::new(
                PriceErrorKind::InvalidValue,
                at,
                "expected a number of US dollars per million tokens",
            ));
        }
    };
    if !n.is_finite() || !(0.0..=1e6).contains(&n) {
        return Err(PriceError::new(
            PriceErrorKind::InvalidValue,
            at,
            format!("{n} is not a price between 0 and 1000000 dollars per million tokens"),
        ));
    }
    Ok(n)
}

/// A share `0.0..=1.0`.
fn share(v: &serde_json::Value, at: &str) -> Result<f64, PriceError> {
    let n = usd(v, at)?;
    if n > 1.0 {
        return Err(PriceError::new(
            PriceErrorKind::InvalidValue,
            at,
            format!("{n} is not a share between 0 and 1"),
        ));
    }
    Ok(n)
}

/// The kind of a [`PriceError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PriceErrorKind {
    /// The file could not be read.
    Io,
    #[cfg_attr(
        feature = "price-files",
        doc = "Not a JSON document (or, for [`PriceTable::merge_toml`], not a TOML one)."
    )]
    #[cfg_attr(
        not(feature = "price-files"),
        doc = "Not a JSON document (or, for `PriceTable::merge_toml`, not a TOML one)."
    )]
    Syntax,
    /// A field the schema does not have (a typo).
    UnknownField,
    /// A new model entry lacks a price.
    MissingField,
    /// A value of the wrong type or out of range.
    InvalidValue,
}

/// A price file that cannot be used; the running table is kept. Names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceError {
    kind: PriceErrorKind,
    field: String,
    message: String,
}

impl PriceError {
    fn new(kind: PriceErrorKind, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            field: field.into(),
            message: message.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> PriceErrorKind {
        self.kind
    }

    /// The dotted path of the field at fault (e.g. `models.claude-opus-4-5.output`); empty
    /// for a file that cannot be read or parsed.
    pub fn field(&self) -> &str {
        &self.field
    }
}

impl fmt::Display for PriceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "price table: {}", self.message)
        } else {
            write!(f, "price table: `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for PriceError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_table_has_its_source_date_and_sane_entries() {
        let t = PriceTable::empty().merge_json(DEFAULT_PRICES_JSON).unwrap();
        assert_eq!(
            t.source(),
            "https://platform.claude.com/docs/en/about-claude/pricing"
        );
        assert_eq!(t.checked(), "2026-12-05");
        assert_eq!(t.inner.batch_discount, 0.5);
        assert_eq!(t.inner.entries.len(), 8);
        for (key, e) in &t.inner.entries {
            let p = e.price;
            assert!(e.name.as_deref().is_some_and(|n| !n.is_empty()), "{key}");
            assert!(p.input > 0 && p.output > p.input, "{key}: {p:?}");
            assert!(
                p.cache_write_5m > p.input && p.cache_write_1h > p.cache_write_5m,
                "{key}: {p:?}"
            );
            assert!(p.cache_read > 0 && p.cache_read < p.input, "{key}: {p:?}");
            assert_eq!(p.batch_discount, None, "{key}");
            // Every prefix prices itself with its own entry.
            for prefix in std::iter::once(key).chain(&e.also) {
                assert_eq!(t.entry_for(prefix), Some(key.as_str()), "{prefix}");
            }
        }
        // The numbers of the table as checked on 2026-12-05 (the former prices.toml).
        let usd = |p: ModelPrice| {
            [
                p.input(),
                p.output(),
                p.cache_write_5m(),
                p.cache_write_1h(),
                p.cache_read(),
            ]
            .map(|m| m as f64 / 1e6)
        };
        for (model, prices) in [
            ("claude-opus-4-5", [5.0, 25.0, 6.25, 10.0, 0.5]),
            ("claude-opus-4-1", [15.0, 75.0, 18.75, 30.0, 1.5]),
            ("claude-sonnet-4-", [3.0, 15.0, 3.75, 6.0, 0.3]),
            ("claude-haiku-4-5", [1.0, 5.0, 1.25, 2.0, 0.1]),
            ("claude-3-7-sonnet", [3.0, 15.0, 3.75, 6.0, 0.3]),
            ("claude-3-5-haiku", [0.8, 4.0, 1.0, 1.6, 0.08]),
            ("claude-3-opus", [15.0, 75.0, 18.75, 30.0, 1.5]),
            ("claude-3-haiku", [0.25, 1.25, 0.3, 0.5, 0.03]),
        ] {
            assert_eq!(t.entry_for(model), Some(model));
            assert_eq!(usd(t.price(model)), prices, "{model}");
        }
    }

    #[test]
    fn the_built_in_table_parses_and_prices_every_catalogue_family() {
        let t = PriceTable::empty().merge_json(DEFAULT_PRICES_JSON).unwrap();
        assert_eq!(t.checked(), "2026-12-05");
        for (model, input, output) in [
            ("claude-opus-4-7", 5.0, 25.0),
            ("claude-opus-4-5-20251101", 5.0, 25.0),
            ("claude-opus-4-1-20250805", 15.0, 75.0),
            ("claude-opus-4-20250514", 15.0, 75.0),
            ("claude-4-opus-20250514", 15.0, 75.0),
            ("claude-sonnet-4-6", 3.0, 15.0),
            ("claude-sonnet-4-20250514", 3.0, 15.0),
            ("claude-haiku-4-5-20251001", 1.0, 5.0),
            ("claude-3-7-sonnet-latest", 3.0, 15.0),
            ("claude-3-5-haiku-20241022", 0.8, 4.0),
            ("claude-3-opus-20240229", 15.0, 75.0),
            ("claude-3-haiku-20240307", 0.25, 1.25),
        ] {
            let p = t.price(model);
            assert!(t.entry_for(model).is_some(), "{model}");
            assert_eq!(
                (p.input(), p.output()),
                (micro(input), micro(output)),
                "{model}"
            );
            // Anthropic's multipliers: 5 min writes 1.25x, 1 h writes 2x, reads 0.1x; except
            // Claude Haiku 3, whose page prices are $0.30, $0.50 and $0.03 for a $0.25 input.
            if model.starts_with("claude-3-haiku") {
                assert_eq!(p.cache_write_5m(), 300_000);
                assert_eq!(p.cache_read(), 30_000);
                continue;
            }
            assert_eq!(p.cache_write_5m(), p.input() * 5 / 4, "{model}");
            assert_eq!(p.cache_write_1h(), p.input() * 2, "{model}");
            assert_eq!(p.cache_read(), p.input() / 10, "{model}");
        }
    }

    #[test]
    fn cache_writes_are_priced_by_ttl_and_reads_apart() {
        let t = PriceTable::default();
        let usage = Usage {
            input_tokens: 100,
            output_tokens: 10,
            cache_creation_input_tokens: 3_000,
            cache_read_input_tokens: 50_000,
            cache_creation_1h_input_tokens: 1_000,
        };
        // Opus 4.7: 100 × 5 + 10 × 25 + 2,000 × 6.25 + 1,000 × 10 + 50,000 × 0.5.
        assert_eq!(
            t.cost_micro_usd("claude-opus-4-7", &usage),
            500 + 250 + 12_500 + 10_000 + 25_000
        );
    }

    #[test]
    fn costs_round_up_to_a_micro_dollar() {
        let t = PriceTable::default();
        let one = Usage {
            cache_read_input_tokens: 1,
            ..Default::default()
        };
        // Haiku 3 reads: $0.03 / MTok, 0.03 micro-USD a token: rounded up to 1.
        assert_eq!(t.cost_micro_usd("claude-3-haiku-20240307", &one), 1);
        assert_eq!(
            t.cost_micro_usd("claude-3-haiku-20240307", &Usage::default()),
            0
        );
    }

    const OVERRIDE_JSON: &str = r#"{
        "checked": "2027-01-01",
        "models": {
            "claude-sonnet-4-": {"output": 12.5},
            "acme-": {
                "input": 2, "output": 8, "cache_write_5m": 2.5, "cache_write_1h": 4,
                "cache_read": 0.2
            }
        }
    }"#;

    #[test]
    fn an_override_merges_over_the_defaults() {
        let t = PriceTable::default().merge_json(OVERRIDE_JSON).unwrap();
        assert_overridden(&t);
    }

    #[cfg(feature = "price-files")]
    #[test]
    fn a_toml_override_merges_like_the_json_one() {
        const OVERRIDE_TOML: &str = r#"
            checked = "2027-01-01"
            [models.claude-sonnet-4-]
            output = 12.5
            [models.acme-]
            input = 2
            output = 8
            cache_write_5m = 2.5
            cache_write_1h = 4
            cache_read = 0.2
        "#;
        let t = PriceTable::default().merge_toml(OVERRIDE_TOML).unwrap();
        assert_overridden(&t);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.toml");
        std::fs::write(&path, OVERRIDE_TOML).unwrap();
        let from_file = PriceTable::default().merge_file(&path).unwrap();
        assert_overridden(&from_file);
        let from_json = PriceTable::default().merge_json(OVERRIDE_JSON).unwrap();
        assert_eq!(from_file.inner.entries.len(), from_json.inner.entries.len());
        for (key, e) in &from_json.inner.entries {
            assert_eq!(from_file.inner.entries[key].price, e.price, "{key}");
            assert_eq!(from_file.inner.entries[key].also, e.also, "{key}");
        }
    }

    fn assert_overridden(t: &PriceTable) {
        assert_eq!(t.checked(), "2027-01-01");
        assert_eq!(t.price("claude-sonnet-4-6").output(), 12_500_000);
        assert_eq!(t.price("claude-sonnet-4-6").input(), 3_000_000);
        assert_eq!(t.price("acme-large").cache_write_1h(), 4_000_000);
        // Everything else is the default.
        assert_eq!(t.price("claude-opus-4-7").output(), 25_000_000);
        // The default table is untouched.
        assert_eq!(
            PriceTable::default().price("claude-sonnet-4-6").output(),
            15_000_000
        );
    }

    #[test]
    fn a_bad_document_names_the_field() {
        let t = PriceTable::default();
        let err = |text: &str| t.merge_json(text).unwrap_err();
        let e = err(r#"{"models": {"claude-opus-4-5": {"outptu": 3}}}"#);
        assert_eq!(
            (e.kind(), e.field()),
            (
                PriceErrorKind::UnknownField,
                "models.claude-opus-4-5.outptu"
            )
        );
        let e = err(
            r#"{"models": {"new-model": {"input": 1, "output": 2, "cache_write_5m": 1, "cache_read": 0.1}}}"#,
        );
        assert_eq!(
            (e.kind(), e.field()),
            (
                PriceErrorKind::MissingField,
                "models.new-model.cache_write_1h"
            )
        );
        let e = err(r#"{"models": {"claude-haiku-4-5": {"input": "one"}}}"#);
        assert_eq!(
            (e.kind(), e.field()),
            (
                PriceErrorKind::InvalidValue,
                "models.claude-haiku-4-5.input"
            )
        );
        let e = err(r#"{"models": {"claude-haiku-4-5": {"also": ["x", ""]}}}"#);
        assert_eq!(
            (e.kind(), e.field()),
            (PriceErrorKind::InvalidValue, "models.claude-haiku-4-5.also")
        );
        let e = err(r#"{"models": {"claude-haiku-4-5": {"input": 1e7}}}"#);
        assert_eq!(
            (e.kind(), e.field()),
            (
                PriceErrorKind::InvalidValue,
                "models.claude-haiku-4-5.input"
            )
        );
        let e = err(r#"{"batch_discount": 1.5}"#);
        assert_eq!(
            (e.kind(), e.field()),
            (PriceErrorKind::InvalidValue, "batch_discount")
        );
        let e = err(r#"{"checked": 20270101}"#);
        assert_eq!(
            (e.kind(), e.field()),
            (PriceErrorKind::InvalidValue, "checked")
        );
        let e = err(r#"{"currency": "EUR"}"#);
        assert_eq!(
            (e.kind(), e.field()),
            (PriceErrorKind::UnknownField, "currency")
        );
        let e = err(r#"{"models": ["claude-opus-4-5"]}"#);
        assert_eq!(
            (e.kind(), e.field()),
            (PriceErrorKind::InvalidValue, "models")
        );
        for bad in [r#"{"models": "#, "[]", "prices = 1"] {
            let e = err(bad);
            assert_eq!((e.kind(), e.field()), (PriceErrorKind::Syntax, ""), "{bad}");
            assert!(e.to_string().starts_with("price table: "), "{e}");
        }
        // A refused document leaves the table as it was.
        assert_eq!(t.price("claude-haiku-4-5").input(), 1_000_000);
    }

    #[cfg(feature = "price-files")]
    #[test]
    fn a_bad_file_names_the_field() {
        let t = PriceTable::default();
        let err = |text: &str| t.merge_toml(text).unwrap_err();
        let e = err("[models.claude-opus-4-5]\noutptu = 3\n");
        assert_eq!(
            (e.kind(), e.field()),
            (
                PriceErrorKind::UnknownField,
                "models.claude-opus-4-5.outptu"
            )
        );
        let e = err(
            "[models.new-model]\ninput = 1\noutput = 2\ncache_write_5m = 1\ncache_read = 0.1\n",
        );
        assert_eq!(
            (e.kind(), e.field()),
            (
                PriceErrorKind::MissingField,
                "models.new-model.cache_write_1h"
            )
        );
        let e = err("[models.claude-haiku-4-5]\ninput = \"one\"\n");
        assert_eq!(
            (e.kind(), e.field()),
            (
                PriceErrorKind::InvalidValue,
                "models.claude-haiku-4-5.input"
            )
        );
        let e = err("batch_discount = 1.5\n");
        assert_eq!(
            (e.kind(), e.field()),
            (PriceErrorKind::InvalidValue, "batch_discount")
        );
        let e = err("currency = \"EUR\"\n");
        assert_eq!(
            (e.kind(), e.field()),
            (PriceErrorKind::UnknownField, "currency")
        );
        let e = err("[models\n");
        assert_eq!(e.kind(), PriceErrorKind::Syntax);
        assert!(e.to_string().starts_with("price table: "), "{e}");
        let e = t.merge_file("/nonexistent/prices.toml").unwrap_err();
        assert_eq!(e.kind(), PriceErrorKind::Io);
    }

    #[test]
    fn an_unknown_model_is_priced_with_the_dearest_entry_never_zero() {
        let t = PriceTable::default();
        let usage = Usage {
            input_tokens: 1_000,
            output_tokens: 1_000,
            ..Default::default()
        };
        assert_eq!(t.entry_for("gpt-5"), None);
        // Opus 4.1's prices: $15 + $75 per MTok.
        assert_eq!(t.cost_micro_usd("gpt-5", &usage), 15_000 + 75_000);
        assert_eq!(t.cost_micro_usd("gpt-5", &usage), 90_000); // warned once, same price
        // A chosen fallback.
        let t = t.fallback("claude-haiku-4-5");
        assert_eq!(t.cost_micro_usd("gpt-5", &usage), 1_000 + 5_000);
        // An empty table still never prices at zero.
        assert_eq!(PriceTable::empty().price("x"), PriceTable::LAST_RESORT);
    }

    #[test]
    fn the_maximum_cost_bounds_the_real_one() {
        let t = PriceTable::default();
        let body = br#"{"model":"claude-sonnet-4-6","max_tokens":200,"system":[{"type":"text","text":"be brief","cache_control":{"type":"ephemeral","ttl":"1h"}}],"messages":[{"role":"user","content":"Hi"}]}"#;
        let meta = RequestMeta::scan(body).unwrap();
        let max = t.max_cost_micro_usd("claude-sonnet-4-6", &meta, 4096);
        // Every input token as a 1-hour write ($6), 200 output tokens ($15).
        assert_eq!(
            max,
            (meta.input_tokens * 6_000_000 + 200 * 15_000_000).div_ceil(1_000_000)
        );
        let real = Usage {
            input_tokens: meta.input_tokens,
            output_tokens: 200,
            ..Default::default()
        };
        assert!(t.cost_micro_usd("claude-sonnet-4-6", &real) <= max);
    }
}
