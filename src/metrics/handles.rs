//! [`Handles`]: the metric handles of one [`MetricsLayer`](super::MetricsLayer), registered
//! once per label set and reused.
//!
//! `metrics::counter!(name, labels)` builds a `Key` (allocating every label value), hashes it
//! and looks it up in the recorder's registry on every call: about 5k instructions per request
//! of the proxy's 166k. The layer's per-request series have label values from bounded sets
//! (known models or `other`, catalogue groups, status codes, `&'static str` outcomes), so their
//! handles are kept here and found by borrowed labels without allocating.
//!
//! Bounded: each map holds at most [`CAP`] series; past it a series is registered on each use,
//! as before (same names, labels and values either way). A handle belongs to the recorder that
//! registered it, so the cache remembers which recorder that was and starts over when another
//! one is current (a test's local recorder, a global recorder installed after the first
//! request).

use std::hash::Hash;
use std::sync::{PoisonError, RwLock};

use hashbrown::{Equivalent, HashMap};
use metrics::{Counter, Gauge, Histogram};

use super::names;

/// The most series each map keeps; further label sets are registered on each use.
const CAP: usize = 1024;

/// The counter and histogram of one finished request.
#[derive(Clone)]
pub(crate) struct RequestSeries {
    /// [`names::REQUESTS_TOTAL`] by model, group, status and outcome.
    pub(crate) requests: Counter,
    /// [`names::REQUEST_DURATION_SECONDS`] by model and outcome.
    pub(crate) duration: Histogram,
    /// The token series of the same model and group, remembered here by the first request
    /// that ends with both (see [`Handles::finished`]): one lookup, not two, from then on.
    tokens: Option<TokenSeries>,
}

/// The token counters of one model and group.
#[derive(Clone)]
pub(crate) struct TokenSeries {
    /// [`names::INPUT_TOKENS_TOTAL`].
    pub(crate) input: Counter,
    /// [`names::OUTPUT_TOKENS_TOTAL`].
    pub(crate) output: Counter,
}

#[derive(Hash, PartialEq, Eq)]
struct RequestKey {
    model: String,
    group: String,
    status: String,
    outcome: &'static str,
}

/// A [`RequestKey`] borrowed: hashes as it (fields of the same types, `&str` hashes as `str`).
#[derive(Hash)]
struct RequestRef<'a> {
    model: &'a str,
    group: &'a str,
    status: &'a str,
    outcome: &'static str,
}

impl Equivalent<RequestKey> for RequestRef<'_> {
    fn equivalent(&self, key: &RequestKey) -> bool {
        self.model == key.model
            && self.group == key.group
            && self.status == key.status
            && self.outcome == key.outcome
    }
}

#[derive(Hash, PartialEq, Eq)]
struct PairKey(String, String);

/// A [`PairKey`] borrowed.
#[derive(Hash)]
struct PairRef<'a>(&'a str, &'a str);

impl Equivalent<PairKey> for PairRef<'_> {
    fn equivalent(&self, key: &PairKey) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

#[derive(Default)]
struct Cache {
    /// The recorder that registered every handle below (its address).
    recorder: usize,
    in_flight: Option<Gauge>,
    requests: HashMap<RequestKey, RequestSeries>,
    tokens: HashMap<PairKey, TokenSeries>,
    fallbacks: HashMap<PairKey, Counter>,
    queue_wait: HashMap<String, Histogram>,
    cache: HashMap<&'static str, Counter>,
}

/// The handle cache of one layer; see the [module docs](self).
#[derive(Default)]
pub(crate) struct Handles {
    cache: RwLock<Cache>,
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Handles")
            .field("requests", &cache.requests.len())
            .field("tokens", &cache.tokens.len())
            .finish_non_exhaustive()
    }
}

/// The address of the recorder the `metrics` macros use here and now.
fn current_recorder() -> usize {
    metrics::with_recorder(|recorder| std::ptr::from_ref(recorder).cast::<()>() as usize)
}

impl Cache {
    /// Forgets every handle if `recorder` is not the one that registered them.
    fn for_recorder(&mut self, recorder: usize) -> &mut Self {
        if self.recorder != recorder {
            tracing::debug!("metrics recorder changed: metric handles registered again");
            *self = Cache {
                recorder,
                ..Cache::default()
            };
        }
        self
    }
}

/// Which map of the [`Cache`] a series lives in, shared and mutable.
struct Field<K, V> {
    get: fn(&Cache) -> &HashMap<K, V>,
    get_mut: fn(&mut Cache) -> &mut HashMap<K, V>,
}

impl Handles {
    /// Finds the handle of `key` in `field`, or registers it with `register` (and keeps it
    /// under `owned()`, below [`CAP`]), and gives it to `use_handle`.
    fn with<K, Q, V>(
        &self,
        field: Field<K, V>,
        key: &Q,
        owned: impl FnOnce() -> K,
        register: impl FnOnce() -> V,
        use_handle: impl FnOnce(&V),
    ) where
        K: Hash + Eq,
        Q: Hash + Equivalent<K> + ?Sized,
        V: Clone,
    {
        let recorder = current_recorder();
        {
            let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
            if cache.recorder == recorder {
                if let Some(handle) = (field.get)(&cache).get(key) {
                    return use_handle(handle);
                }
            }
        }
        let handle = register();
        use_handle(&handle);
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        let map = (field.get_mut)(cache.for_recorder(recorder));
        if map.len() < CAP && !map.contains_key(key) {
            map.insert(owned(), handle);
        }
    }

    /// [`names::IN_FLIGHT_REQUESTS`].
    pub(crate) fn in_flight(&self, use_handle: impl FnOnce(&Gauge)) {
        let recorder = current_recorder();
        {
            let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
            if let (true, Some(gauge)) = (cache.recorder == recorder, &cache.in_flight) {
                return use_handle(gauge);
            }
        }
        let gauge = metrics::gauge!(names::IN_FLIGHT_REQUESTS);
        use_handle(&gauge);
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        cache.for_recorder(recorder).in_flight = Some(gauge);
    }

    /// [`names::REQUESTS_TOTAL`] and [`names::REQUEST_DURATION_SECONDS`] of one label set.
    pub(crate) fn request(
        &self,
        model: &str,
        group: &str,
        status: &str,
        outcome: &'static str,
        use_handle: impl FnOnce(&RequestSeries),
    ) {
        let key = RequestRef {
            model,
            group,
            status,
            outcome,
        };
        self.with(
            Field {
                get: |c| &c.requests,
                get_mut: |c| &mut c.requests,
            },
            &key,
            || RequestKey {
                model: model.to_owned(),
                group: group.to_owned(),
                status: status.to_owned(),
                outcome,
            },
            || RequestSeries {
                requests: metrics::counter!(names::REQUESTS_TOTAL,
                    names::LABEL_MODEL => model.to_owned(),
                    names::LABEL_GROUP => group.to_owned(),
                    names::LABEL_STATUS => status.to_owned(),
                    names::LABEL_OUTCOME => outcome),
                duration: metrics::histogram!(names::REQUEST_DURATION_SECONDS,
                    names::LABEL_MODEL => model.to_owned(),
                    names::LABEL_OUTCOME => outcome),
                tokens: None,
            },
            use_handle,
        );
    }

    /// The end of one request: the in-flight gauge down, its [`request`](Self::request)
    /// series and (with `use_tokens`) its [`tokens`](Self::tokens) series, from one look at
    /// the cache (one recorder check, one read lock, one map lookup once the request's entry
    /// remembers its token series) when every handle is there; else one by one, as those
    /// three.
    pub(crate) fn finished(
        &self,
        model: &str,
        group: &str,
        status: &str,
        outcome: &'static str,
        use_request: impl FnOnce(&RequestSeries),
        use_tokens: Option<impl FnOnce(&TokenSeries)>,
    ) {
        let recorder = current_recorder();
        let key = RequestRef {
            model,
            group,
            status,
            outcome,
        };
        // Ok: done from the cache, with the token series found in its own map (to remember
        // in the request's entry); Err: a handle is missing, the closures are given back.
        let done = {
            let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
            match (
                cache.recorder == recorder,
                &cache.in_flight,
                cache.requests.get(&key),
            ) {
                (true, Some(gauge), Some(series)) => {
                    let (tokens, found) = match (&use_tokens, &series.tokens) {
                        (None, _) => (None, false),
                        (Some(_), Some(tokens)) => (Some(tokens), false),
                        (Some(_), None) => (cache.tokens.get(&PairRef(model, group)), true),
                    };
                    if use_tokens.is_none() || tokens.is_some() {
                        gauge.decrement(1.0);
                        use_request(series);
                        if let (Some(use_tokens), Some(tokens)) = (use_tokens, tokens) {
                            use_tokens(tokens);
                        }
                        Ok(tokens.filter(|_| found).cloned())
                    } else {
                        Err((use_request, use_tokens))
                    }
                }
                _ => Err((use_request, use_tokens)),
            }
        };
        let (use_request, use_tokens) = match done {
            Ok(None) => return,
            Ok(Some(tokens)) => {
                let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
                if cache.recorder == recorder {
                    if let Some(series) = cache.requests.get_mut(&key) {
                        series.tokens = Some(tokens);
                    }
                }
                return;
            }
            Err(closures) => closures,
        };
        self.in_flight(|g| g.decrement(1.0));
        self.request(model, group, status, outcome, use_request);
        if let Some(use_tokens) = use_tokens {
            self.tokens(model, group, use_tokens);
        }
    }

    /// [`names::INPUT_TOKENS_TOTAL`] and [`names::OUTPUT_TOKENS_TOTAL`] of a model and group.
    pub(crate) fn tokens(&self, model: &str, group: &str, use_handle: impl FnOnce(&TokenSeries)) {
        self.with(
            Field {
                get: |c| &c.tokens,
                get_mut: |c| &mut c.tokens,
            },
            &PairRef(model, group),
            || PairKey(model.to_owned(), group.to_owned()),
            || {
                let labels = [
                    (names::LABEL_MODEL, model.to_owned()),
                    (names::LABEL_GROUP, group.to_owned()),
                ];
                TokenSeries {
                    input: metrics::counter!(names::INPUT_TOKENS_TOTAL, &labels),
                    output: metrics::counter!(names::OUTPUT_TOKENS_TOTAL, &labels),
                }
            },
            use_handle,
        );
    }

    /// [`names::FALLBACKS_TOTAL`] from one model label to another.
    pub(crate) fn fallback(&self, from: &str, to: &str, use_handle: impl FnOnce(&Counter)) {
        self.with(
            Field {
                get: |c| &c.fallbacks,
                get_mut: |c| &mut c.fallbacks,
            },
            &PairRef(from, to),
            || PairKey(from.to_owned(), to.to_owned()),
            || {
                metrics::counter!(names::FALLBACKS_TOTAL,
                    names::LABEL_FROM => from.to_owned(),
                    names::LABEL_TO => to.to_owned())
            },
            use_handle,
        );
    }

    /// [`names::QUEUE_WAIT_SECONDS`] of a group.
    pub(crate) fn queue_wait(&self, group: &str, use_handle: impl FnOnce(&Histogram)) {
        self.with(
            Field {
                get: |c| &c.queue_wait,
                get_mut: |c| &mut c.queue_wait,
            },
            group,
            || group.to_owned(),
            || metrics::histogram!(names::QUEUE_WAIT_SECONDS, names::LABEL_GROUP => group.to_owned()),
            use_handle,
        );
    }

    /// [`names::CACHE_REQUESTS_TOTAL`] of a cache decision.
    pub(crate) fn cache(&self, decision: &'static str, use_handle: impl FnOnce(&Counter)) {
        self.with(
            Field {
                get: |c| &c.cache,
                get_mut: |c| &mut c.cache,
            },
            &decision,
            || decision,
            || metrics::counter!(names::CACHE_REQUESTS_TOTAL, names::LABEL_CACHE => decision),
            use_handle,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use metrics::{Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::*;
    use crate::metrics::prometheus;

    /// Counts registrations; its handles do nothing.
    #[derive(Default)]
    struct Registrations(AtomicUsize);

    impl Recorder for Registrations {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            self.0.fetch_add(1, Ordering::Relaxed);
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            self.0.fetch_add(1, Ordering::Relaxed);
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            self.0.fetch_add(1, Ordering::Relaxed);
            Histogram::noop()
        }
    }

    fn one_request(handles: &Handles, model: &str, status: &str) {
        handles.in_flight(|g| g.increment(1.0));
        handles.request(model, "g", status, names::OUTCOME_SUCCESS, |s| {
            s.requests.increment(1);
            s.duration.record(0.5);
        });
        handles.tokens(model, "g", |s| {
            s.input.increment(3);
            s.output.increment(2);
        });
        handles.queue_wait("g", |h| h.record(0.1));
        handles.cache("miss", |c| c.increment(1));
        handles.fallback(model, "other", |c| c.increment(1));
        handles.in_flight(|g| g.decrement(1.0));
    }

    #[test]
    fn each_label_set_is_registered_once() {
        let recorder = Registrations::default();
        let handles = Handles::default();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..100 {
                one_request(&handles, "m", "200");
            }
        });
        // in-flight, requests + duration, input + output, queue wait, cache, fallback.
        assert_eq!(recorder.0.load(Ordering::Relaxed), 8);
        metrics::with_local_recorder(&recorder, || one_request(&handles, "m", "429"));
        assert_eq!(
            recorder.0.load(Ordering::Relaxed),
            10,
            "a new status: one more series"
        );
    }

    /// `finished` counts what the three calls it stands for count, whether its handles are
    /// cached (one look) or not yet (each registered, as the three calls do), and with or
    /// without tokens.
    #[test]
    fn finished_counts_as_its_three_calls() {
        let recorder = prometheus::builder().build_recorder();
        let handle = recorder.handle();
        let handles = Handles::default();
        let tokens = |s: &TokenSeries| {
            s.input.increment(3);
            s.output.increment(2);
        };
        metrics::with_local_recorder(&recorder, || {
            for with_tokens in [true, true, false, true] {
                handles.in_flight(|g| g.increment(1.0));
                handles.finished(
                    "m",
                    "g",
                    "200",
                    names::OUTCOME_SUCCESS,
                    |s| s.requests.increment(1),
                    with_tokens.then_some(tokens),
                );
            }
        });
        let text = prometheus::render(&handle);
        for line in [
            r#"tower_claude_requests_total{model="m",group="g",status="200",outcome="success"} 4"#,
            r#"tower_claude_input_tokens_total{model="m",group="g"} 9"#,
            r#"tower_claude_output_tokens_total{model="m",group="g"} 6"#,
            "tower_claude_in_flight_requests 0",
        ] {
            assert!(text.contains(line), "{line} not in the rendering:\n{text}");
        }
        let recorder = Registrations::default();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..10 {
                handles.in_flight(|g| g.increment(1.0));
                handles.finished(
                    "m",
                    "g",
                    "200",
                    names::OUTCOME_SUCCESS,
                    |_| {},
                    Some(tokens),
                );
            }
        });
        // in-flight, requests + duration, input + output: registered once each.
        assert_eq!(recorder.0.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn the_cache_is_bounded_and_counts_past_its_bound() {
        let recorder = prometheus::builder().build_recorder();
        let handle = recorder.handle();
        let handles = Handles::default();
        let extra = 10;
        metrics::with_local_recorder(&recorder, || {
            for i in 0..CAP + extra {
                one_request(&handles, &format!("m{i}"), "200");
            }
            one_request(&handles, &format!("m{}", CAP + 1), "200");
        });
        {
            let cache = handles.cache.read().unwrap();
            assert_eq!(cache.requests.len(), CAP);
            assert_eq!(cache.tokens.len(), CAP);
        }
        let text = prometheus::render(&handle);
        let series = format!(
            r#"tower_claude_requests_total{{model="m{}",group="g",status="200",outcome="success"}} 2"#,
            CAP + 1
        );
        assert!(text.contains(&series), "{series} not in the rendering");
        assert!(text.contains("tower_claude_in_flight_requests 0"));
    }

    #[test]
    fn another_recorder_gets_its_own_handles() {
        let first = prometheus::builder().build_recorder();
        let second = prometheus::builder().build_recorder();
        let handles = Handles::default();
        metrics::with_local_recorder(&first, || one_request(&handles, "m", "200"));
        metrics::with_local_recorder(&second, || {
            one_request(&handles, "m", "200");
            one_request(&handles, "m", "200");
        });
        metrics::with_local_recorder(&first, || one_request(&handles, "m", "200"));
        let series =
            r#"tower_claude_requests_total{model="m",group="g",status="200",outcome="success"} "#;
        let value = |text: String| {
            text.lines()
                .find_map(|l| l.strip_prefix(series))
                .map(str::to_owned)
        };
        assert_eq!(
            value(prometheus::render(&first.handle())).as_deref(),
            Some("2")
        );
        assert_eq!(
            value(prometheus::render(&second.handle())).as_deref(),
            Some("2")
        );
    }
}
