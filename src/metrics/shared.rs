//! What every service, response future and body of one [`MetricsLayer`](super::MetricsLayer)
//! shares: its configuration and state, and what it learned about each request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::alerts::Alerts;
use super::forecast::Forecaster;
use super::handles::Handles;
use super::names;
use crate::anthropic::{ModelCatalog, ModelEntry, RateLimitGroup};
use crate::quota::QuotaBoard;

/// A label value: a request's `model` and `group` labels are shared strings (a known model id
/// from [`Shared::known`], a catalogue group's name, or [`names::OTHER`]), cloned per request
/// rather than copied.
pub(crate) type Label = Arc<str>;

/// The [`names::OTHER`] label, allocated once.
pub(crate) fn other() -> Label {
    static OTHER: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Arc::from(names::OTHER));
    OTHER.clone()
}

/// Configuration and state shared by every service of one layer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) catalog: ModelCatalog,
    /// Looked up by every request's model: hashbrown's foldhash, not SipHash (a fixed set:
    /// lookups cannot flood it).
    /// Held as the labels themselves: a request's `model` label is a clone of one of them.
    pub(crate) known: hashbrown::HashSet<Label>,
    pub(crate) board: Option<QuotaBoard>,
    pub(crate) alerts: Option<Alerts>,
    pub(crate) forecaster: Option<Forecaster>,
    pub(crate) refresh_every: Duration,
    pub(crate) last_refresh: Mutex<Option<Instant>>,
    pub(crate) json_limit: usize,
    /// The per-request metric handles, registered once per label set.
    pub(crate) handles: Handles,
    /// The last entry [`labels_of`](Self::labels_of) was asked about, and its answer: the
    /// requests of one model carry the same catalogue entry (the catalogue's own record, an
    /// `Arc`), found again by a pointer test instead of a look-up of its id among the known
    /// models (a hash and a comparison of the id, ~100 instructions a request: issue 14,
    /// sixteenth pass). The answer depends on nothing else (the known models are fixed once
    /// the layer is built).
    pub(crate) last_labels: Mutex<Option<(ModelEntry, Labels)>>,
}

/// What [`Shared::labels_of`] answers: the group (when placed) and its label, the model's
/// label.
pub(crate) type Labels = (Option<RateLimitGroup>, Label, Label);

impl Clone for Shared {
    fn clone(&self) -> Self {
        Self {
            catalog: self.catalog.clone(),
            known: self.known.clone(),
            board: self.board.clone(),
            alerts: self.alerts.clone(),
            forecaster: self.forecaster.clone(),
            refresh_every: self.refresh_every,
            last_refresh: Mutex::new(None),
            json_limit: self.json_limit,
            handles: Handles::default(),
            last_labels: Mutex::new(None),
        }
    }
}

impl Shared {
    /// The `model` label: a known id, or [`names::OTHER`].
    pub(crate) fn model_label(&self, model: Option<&str>) -> Label {
        match model.and_then(|m| self.known.get(m)) {
            Some(label) => label.clone(),
            None => other(),
        }
    }

    /// The rate-limit group of `model` and its label: a catalogue group, or `None` and
    /// [`names::OTHER`] for ids the catalogue places nowhere (so that arbitrary model ids
    /// create neither label values nor forecast state).
    pub(crate) fn group_of(&self, model: Option<&str>) -> (Option<RateLimitGroup>, Label) {
        let entry = model.map(|m| self.catalog.entry(m));
        let (group, label, _) = self.labels_of(entry.as_ref());
        (group, label)
    }

    /// [`group_of`](Self::group_of) and [`model_label`](Self::model_label) of a model whose
    /// catalogue entry is known (the request's, [`RequestMeta::model_entry`]), with one
    /// lookup of the model among the known ids.
    ///
    /// [`RequestMeta::model_entry`]: crate::anthropic::RequestMeta::model_entry
    pub(crate) fn labels_of(&self, entry: Option<&ModelEntry>) -> Labels {
        let Some(entry) = entry else {
            return (None, other(), other());
        };
        let last = || {
            self.last_labels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((_, labels)) = last().as_ref().filter(|(e, _)| e.same(entry)) {
            return labels.clone();
        }
        let labels = self.labels_of_entry(entry);
        *last() = Some((entry.clone(), labels.clone()));
        labels
    }

    /// [`labels_of`](Self::labels_of) an entry, looked up.
    fn labels_of_entry(&self, entry: &ModelEntry) -> Labels {
        let model = entry.id();
        let known = self.known.get(model);
        let model_label = known.cloned().unwrap_or_else(other);
        let group = entry.group();
        if known.is_some() || group.as_str() != model {
            let label = group.label();
            (Some(group.clone()), label, model_label)
        } else {
            (None, other(), model_label)
        }
    }

    /// Refreshes when a request ends (`now`: its end, read once for its latency too), at
    /// most once per `refresh_every`.
    pub(crate) fn maybe_refresh(&self, now: Instant) {
        if self.board.is_none() && self.forecaster.is_none() {
            return;
        }
        {
            let mut last = self
                .last_refresh
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| now.duration_since(t) < self.refresh_every) {
                return;
            }
            *last = Some(now);
        }
        self.refresh_now();
    }

    pub(crate) fn refresh_now(&self) {
        if let Some(board) = &self.board {
            for status in board.statuses() {
                let headroom = &status.headroom;
                let buckets = [
                    (names::BUCKET_REQUESTS, headroom.requests),
                    (names::BUCKET_INPUT_TOKENS, headroom.input_tokens),
                    (names::BUCKET_OUTPUT_TOKENS, headroom.output_tokens),
                ];
                let mut worst: Option<(&'static str, f64)> = None;
                for (bucket, h) in buckets {
                    let Some(h) = h else { continue };
                    let utilisation = (1.0 - h.fraction).clamp(0.0, 1.0);
                    let labels = [
                        (names::LABEL_KEY, status.key.as_str().to_owned()),
                        (names::LABEL_GROUP, status.group.as_str().to_owned()),
                        (names::LABEL_BUCKET, bucket.to_owned()),
                    ];
                    metrics::gauge!(names::QUOTA_LIMIT, &labels).set(h.limit as f64);
                    metrics::gauge!(names::QUOTA_REMAINING, &labels).set(h.remaining as f64);
                    metrics::gauge!(names::QUOTA_UTILISATION, &labels).set(utilisation);
                    if worst.is_none_or(|(_, u)| utilisation > u) {
                        worst = Some((bucket, utilisation));
                    }
                }
                if let (Some(alerts), Some((bucket, utilisation))) = (&self.alerts, worst) {
                    alerts.observe(&status.key, &status.group, bucket, utilisation);
                }
            }
            // Prompt-cache tokens the rate limiter settled, per key and group (totals kept by
            // the board, exported as absolute counter values).
            for (key, group, usage) in board.prompt_cache().usages() {
                let labels = [
                    (names::LABEL_KEY, key.as_str().to_owned()),
                    (names::LABEL_GROUP, group.as_str().to_owned()),
                ];
                metrics::counter!(names::PROMPT_CACHE_READ_TOKENS_TOTAL, &labels)
                    .absolute(usage.read_tokens);
                metrics::counter!(names::PROMPT_CACHE_WRITE_TOKENS_TOTAL, &labels)
                    .absolute(usage.write_tokens);
                metrics::gauge!(names::PROMPT_CACHE_HIT_RATIO, &labels).set(usage.hit_ratio());
            }
        }
        if let Some(forecaster) = &self.forecaster {
            forecaster.export();
        }
    }
}

/// What the service learned about a request when it was called, for its [`Finish`]
/// (moved into it: the labels are built once per request, not copied).
///
/// [`Finish`]: super::body::Finish
#[derive(Debug)]
pub(crate) struct RequestInfo {
    pub(crate) shared: Arc<Shared>,
    pub(crate) start: Instant,
    pub(crate) group: Option<RateLimitGroup>,
    pub(crate) model_label: Label,
    pub(crate) group_label: Label,
    pub(crate) span: tracing::Span,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(known: &[&str]) -> Shared {
        Shared {
            catalog: ModelCatalog::default(),
            known: known.iter().map(|m| Arc::from(*m)).collect(),
            board: None,
            alerts: None,
            forecaster: None,
            refresh_every: Duration::from_secs(1),
            last_refresh: Mutex::new(None),
            json_limit: 1 << 20,
            handles: Handles::default(),
            last_labels: Mutex::new(None),
        }
    }

    /// `labels_of` answers as the look-up does for every entry, whether the last entry's
    /// answer serves it (the same entry again) or not (another model, a model outside the
    /// catalogue, a known one outside it, the same model from another catalogue).
    #[test]
    fn the_last_labels_are_those_of_the_entry() {
        let shared = shared(&["claude-opus-4-7", "my-fine-tune"]);
        let catalog = &shared.catalog;
        let other_catalog = ModelCatalog::default();
        let opus = catalog.entry("claude-opus-4-7");
        let sonnet = catalog.entry("claude-sonnet-4-6");
        let sequence = [
            opus.clone(),
            opus.clone(),
            sonnet.clone(),
            opus.clone(),
            catalog.entry("gpt-5"),
            catalog.entry("gpt-5"),
            catalog.entry("my-fine-tune"),
            other_catalog.entry("claude-sonnet-4-6"),
            sonnet,
            opus,
        ];
        for entry in &sequence {
            let labels = shared.labels_of(Some(entry));
            assert!(
                labels == shared.labels_of_entry(entry),
                "{entry:?}: {labels:?}"
            );
        }
        assert_eq!(shared.labels_of(None), (None, other(), other()));
        let (group, group_label, model) = shared.labels_of(Some(&catalog.entry("claude-opus-4-7")));
        assert_eq!(&*model, "claude-opus-4-7");
        assert_eq!(
            group.map(|g| g.as_str().to_owned()),
            Some(group_label.to_string())
        );
        let (group, group_label, model) = shared.labels_of(Some(&catalog.entry("gpt-5")));
        assert_eq!(
            (group, &*group_label, &*model),
            (None, names::OTHER, names::OTHER)
        );
    }
}
