//! What every service, response future and body of one [`MetricsLayer`](super::MetricsLayer)
//! shares: its configuration and state, and what it learned about each request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// When the quota gauges are next refreshed (see [`maybe_refresh`](Self::maybe_refresh)).
    pub(crate) refresh: RefreshClock,
    pub(crate) json_limit: usize,
    /// The per-request metric handles, registered once per label set.
    pub(crate) handles: Handles,
    /// The labels of the entries [`labels_of`](Self::labels_of) was asked about.
    pub(crate) labels: LabelMemo,
}

/// What [`Shared::labels_of`] answers: the group (when placed) and its label, the model's
/// label. Held by a request as one shared record (one reference count to take and drop a
/// request, not three).
#[derive(Debug, PartialEq)]
pub(crate) struct Labels {
    pub(crate) group: Option<RateLimitGroup>,
    pub(crate) group_label: Label,
    pub(crate) model_label: Label,
}

/// The labels of a request without a model.
fn other_labels() -> Arc<Labels> {
    static OTHER: std::sync::LazyLock<Arc<Labels>> = std::sync::LazyLock::new(|| {
        Arc::new(Labels {
            group: None,
            group_label: other(),
            model_label: other(),
        })
    });
    OTHER.clone()
}

/// How many catalogue entries [`LabelMemo`] keeps the labels of without a lock.
const LABEL_SLOTS: usize = 4;

/// The labels [`Shared::labels_of`] derived, by entry: the requests of one model carry the
/// same catalogue entry (the catalogue's own record, an `Arc`), found again by a pointer
/// test instead of a look-up of its id among the known models (a hash and a comparison of
/// the id, ~100 instructions a request: issue 14, sixteenth pass). The answer depends on
/// nothing else (the known models are fixed once the layer is built).
///
/// The first [`LABEL_SLOTS`] entries of the catalogue's own table (not the entries made per
/// request for ids it does not list) are kept each in a slot set once and read without a
/// lock (a lock and its release were two locked instructions a request); any other entry is
/// remembered as the last one, under a mutex, as before.
#[derive(Debug, Default)]
pub(crate) struct LabelMemo {
    slots: [OnceLock<(ModelEntry, Arc<Labels>)>; LABEL_SLOTS],
    last: Mutex<Option<(ModelEntry, Arc<Labels>)>>,
}

impl LabelMemo {
    /// Forgets every entry (what the labels were derived from changed).
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }
}

/// When [`Shared::maybe_refresh`] refreshes next: the nanoseconds since the first request
/// ended (its time, `base`) at which the next refresh is due. Read with a load on every
/// request's end and written with a compare-and-swap once per refresh (a mutex was two
/// locked instructions a request).
#[derive(Debug, Default)]
pub(crate) struct RefreshClock {
    base: OnceLock<Instant>,
    due: AtomicU64,
}

impl RefreshClock {
    /// Whether a refresh is due at `now`, at most once per `every`: the first call says yes,
    /// then the first call at least `every` after the last yes (a `now` before it, from
    /// another thread, says no); when two calls race, one says yes.
    pub(crate) fn due(&self, now: Instant, every: Duration) -> bool {
        let base = *self.base.get_or_init(|| now);
        let at = nanos(now.saturating_duration_since(base));
        let due = self.due.load(Ordering::Relaxed);
        if at < due {
            return false;
        }
        self.due
            .compare_exchange(
                due,
                at.saturating_add(nanos(every)),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Clone for Shared {
    fn clone(&self) -> Self {
        Self {
            catalog: self.catalog.clone(),
            known: self.known.clone(),
            board: self.board.clone(),
            alerts: self.alerts.clone(),
            forecaster: self.forecaster.clone(),
            refresh_every: self.refresh_every,
            refresh: RefreshClock::default(),
            json_limit: self.json_limit,
            handles: Handles::default(),
            labels: LabelMemo::default(),
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
        let labels = self.labels_of(entry.as_ref());
        (labels.group.clone(), labels.group_label.clone())
    }

    /// [`group_of`](Self::group_of) and [`model_label`](Self::model_label) of a model whose
    /// catalogue entry is known (the request's, [`RequestMeta::model_entry`]), with one
    /// lookup of the model among the known ids.
    ///
    /// [`RequestMeta::model_entry`]: crate::anthropic::RequestMeta::model_entry
    pub(crate) fn labels_of(&self, entry: Option<&ModelEntry>) -> Arc<Labels> {
        let Some(entry) = entry else {
            return other_labels();
        };
        for slot in &self.labels.slots {
            match slot.get() {
                Some((e, labels)) if e.same(entry) => return labels.clone(),
                Some(_) => {}
                None => break,
            }
        }
        self.labels_of_unslotted(entry)
    }

    /// [`labels_of`](Self::labels_of) an entry no slot holds: derived, then kept in a free
    /// slot when the entry is the catalogue's own, else remembered as the last one.
    #[inline(never)]
    fn labels_of_unslotted(&self, entry: &ModelEntry) -> Arc<Labels> {
        let last = || {
            self.labels
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((_, labels)) = last().as_ref().filter(|(e, _)| e.same(entry)) {
            return labels.clone();
        }
        let labels = Arc::new(self.labels_of_entry(entry));
        if entry.is_listed_in(&self.catalog) {
            // A slot another thread filled meanwhile (perhaps with this entry) is passed by.
            let mut kept = Some((entry.clone(), labels.clone()));
            for slot in &self.labels.slots {
                match kept.take() {
                    Some(pair) => kept = slot.set(pair).err(),
                    None => break,
                }
            }
            if kept.is_none() {
                return labels;
            }
        }
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
            Labels {
                group: Some(group.clone()),
                group_label: group.label(),
                model_label,
            }
        } else {
            Labels {
                group: None,
                group_label: other(),
                model_label,
            }
        }
    }

    /// Refreshes when a request ends (`now`: its end, read once for its latency too), at
    /// most once per `refresh_every`.
    pub(crate) fn maybe_refresh(&self, now: Instant) {
        if self.board.is_none() && self.forecaster.is_none() {
            return;
        }
        if self.refresh.due(now, self.refresh_every) {
            self.refresh_now();
        }
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
    pub(crate) labels: Arc<Labels>,
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
            refresh: RefreshClock::default(),
            json_limit: 1 << 20,
            handles: Handles::default(),
            labels: LabelMemo::default(),
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
                *labels == shared.labels_of_entry(entry),
                "{entry:?}: {labels:?}"
            );
        }
        let none = shared.labels_of(None);
        assert_eq!(
            (&none.group, &none.group_label, &none.model_label),
            (&None, &other(), &other())
        );
        let labels = shared.labels_of(Some(&catalog.entry("claude-opus-4-7")));
        assert_eq!(&*labels.model_label, "claude-opus-4-7");
        assert_eq!(
            labels.group.as_ref().map(|g| g.as_str().to_owned()),
            Some(labels.group_label.to_string())
        );
        let labels = shared.labels_of(Some(&catalog.entry("gpt-5")));
        assert_eq!(
            (&labels.group, &*labels.group_label, &*labels.model_label),
            (&None, names::OTHER, names::OTHER)
        );
    }

    /// More catalogue entries than slots, and entries made per request (ids the catalogue
    /// does not list, prefix matches), asked in turns: each answered as its look-up, the
    /// slots holding only the catalogue's own entries (an entry made per request would fill
    /// a slot it never hits again), the first of them found without the lock.
    #[test]
    fn the_slots_hold_the_catalogues_entries() {
        let shared = shared(&["claude-opus-4-7", "claude-haiku-4-5"]);
        let catalog = &shared.catalog;
        let listed = [
            "claude-opus-4-7",
            "claude-sonnet-4-6",
            "claude-haiku-4-5",
            "claude-opus-4-6",
            "claude-sonnet-4-5",
            "claude-opus-4-5",
        ]
        .map(|m| catalog.entry(m));
        for m in &listed {
            assert!(m.is_listed_in(catalog), "{m:?}");
        }
        for round in 0..3 {
            for entry in &listed {
                for made in [catalog.entry("gpt-5"), catalog.entry("claude-opus-4-7-x")] {
                    assert!(!made.is_listed_in(catalog));
                    assert!(*shared.labels_of(Some(&made)) == shared.labels_of_entry(&made));
                }
                let labels = shared.labels_of(Some(entry));
                assert!(
                    *labels == shared.labels_of_entry(entry),
                    "{round} {entry:?}"
                );
            }
        }
        let slotted: Vec<_> = (shared.labels.slots.iter())
            .map(|s| s.get().map(|(e, _)| e.id().to_owned()))
            .collect();
        let first: Vec<_> = listed[..LABEL_SLOTS]
            .iter()
            .map(|e| Some(e.id().to_owned()))
            .collect();
        assert_eq!(slotted, first);
        // Another catalogue's entry of a slotted id is not that slot's.
        let other_catalog = ModelCatalog::default();
        let elsewhere = other_catalog.entry("claude-opus-4-7");
        assert!(!elsewhere.is_listed_in(catalog));
        assert!(*shared.labels_of(Some(&elsewhere)) == shared.labels_of_entry(&elsewhere));
    }

    /// A refresh when the first request ends, then at most one per period, the first call a
    /// period after the last refresh; a time before it (another thread's) refreshes nothing.
    #[test]
    fn refreshes_are_a_period_apart() {
        let clock = RefreshClock::default();
        let every = Duration::from_secs(1);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(clock.due(at(0), every));
        assert!(!clock.due(at(0), every));
        assert!(!clock.due(at(999), every));
        assert!(clock.due(at(1_000), every));
        assert!(!clock.due(at(500), every));
        assert!(!clock.due(at(1_999), every));
        assert!(clock.due(at(2_500), every));
        assert!(!clock.due(at(3_499), every));
        assert!(clock.due(at(3_500), every));
        // A period of zero: every end refreshes.
        let every_time = RefreshClock::default();
        for ms in [0, 0, 1, 1, 2] {
            assert!(every_time.due(at(ms), Duration::ZERO));
        }
    }
}
