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
use std::sync::{Arc, Mutex, PoisonError, RwLock};

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
    /// that ends with both (see [`Handles::finish`]): one lookup, not two, from then on.
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
    /// The handles the last request that ended used, with its labels (the shared strings of
    /// its [`Finish`](super::body::Finish)) and its recorder: see
    /// [`finished_labelled`](Self::finished_labelled).
    last: Mutex<Option<LastFinished>>,
    /// The queue-wait histogram the last request used, with its group label and recorder:
    /// see [`queue_wait_labelled`](Self::queue_wait_labelled).
    last_queue_wait: Mutex<Option<(usize, Arc<str>, Histogram)>>,
}

/// See [`Handles::last`].
struct LastFinished {
    recorder: usize,
    model: Arc<str>,
    group: Arc<str>,
    status: Option<http::StatusCode>,
    outcome: &'static str,
    in_flight: Gauge,
    /// With its token series when that was found.
    series: RequestSeries,
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
        self.in_flight_registered(recorder, use_handle);
    }

    /// [`in_flight`](Self::in_flight) without its handle (the first request, or one under
    /// another recorder): registered and kept. Out of line: the registration (the macro, the
    /// write lock) sat between the lines of every request's call and end.
    #[cold]
    #[inline(never)]
    fn in_flight_registered(&self, recorder: usize, use_handle: impl FnOnce(&Gauge)) {
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

    /// [`finish`](Self::finish) for labels held as shared strings (a request's
    /// [`Finish`](super::body::Finish)): when the last request that ended had the same
    /// label strings (the same `Arc`s: the model and group labels are clones of the layer's
    /// own), status, outcome and recorder, its handles are used again without the cache's
    /// map (a hash of four strings and their comparison, ~275 instructions a request:
    /// issue 14, sixteenth pass); else as [`finish`](Self::finish), whose handles are then
    /// remembered. The same handles either way: those of the cache, which registered
    /// each label set once.
    pub(crate) fn finished_labelled(
        &self,
        model: &Arc<str>,
        group: &Arc<str>,
        status: Option<http::StatusCode>,
        outcome: &'static str,
        use_request: impl FnOnce(&RequestSeries),
        use_tokens: Option<impl FnOnce(&TokenSeries)>,
    ) {
        let recorder = current_recorder();
        let last = || self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let wants_tokens = use_tokens.is_some();
        {
            // The handles are used under the lock, not cloned out of it: with a recorder
            // installed each handle is an `Arc`, whose clone and drop are locked
            // instructions (four handles a request).
            let guard = last();
            if let Some(l) = guard.as_ref().filter(|l| {
                l.recorder == recorder
                    && Arc::ptr_eq(&l.model, model)
                    && Arc::ptr_eq(&l.group, group)
                    && l.status == status
                    // The same `&'static str` mostly: its address first.
                    && (std::ptr::eq(l.outcome, outcome) || l.outcome == outcome)
                    && (!wants_tokens || l.series.tokens.is_some())
            }) {
                l.in_flight.decrement(1.0);
                use_request(&l.series);
                if let (Some(use_tokens), Some(tokens)) = (use_tokens, &l.series.tokens) {
                    use_tokens(tokens);
                }
                return;
            }
        }
        let status_label = status
            .as_ref()
            .map_or(names::STATUS_NONE, http::StatusCode::as_str);
        let kept = self.finish(
            recorder,
            model,
            group,
            status_label,
            outcome,
            use_request,
            use_tokens,
        );
        if let Some((in_flight, series)) = kept {
            *last() = Some(LastFinished {
                recorder,
                model: model.clone(),
                group: group.clone(),
                status,
                outcome,
                in_flight,
                series,
            });
        }
    }

    /// The end of one request: the in-flight gauge down, its [`request`](Self::request)
    /// series and (with `use_tokens`) its [`tokens`](Self::tokens) series, from one look at
    /// the cache (one recorder check, one read lock, one map lookup once the request's entry
    /// remembers its token series) when every handle is there; else one by one, as those
    /// three.
    ///
    /// Gives back the handles it took from the cache (the in-flight gauge, and the request's
    /// series with its token series when known) when it found them all there.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        recorder: usize,
        model: &str,
        group: &str,
        status: &str,
        outcome: &'static str,
        use_request: impl FnOnce(&RequestSeries),
        use_tokens: Option<impl FnOnce(&TokenSeries)>,
    ) -> Option<(Gauge, RequestSeries)> {
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
                        let mut kept = series.clone();
                        if kept.tokens.is_none() {
                            kept.tokens = tokens.cloned();
                        }
                        if let (Some(use_tokens), Some(tokens)) = (use_tokens, tokens) {
                            use_tokens(tokens);
                        }
                        Ok((tokens.filter(|_| found).cloned(), (gauge.clone(), kept)))
                    } else {
                        Err((use_request, use_tokens))
                    }
                }
                _ => Err((use_request, use_tokens)),
            }
        };
        let (use_request, use_tokens) = match done {
            Ok((None, kept)) => return Some(kept),
            Ok((Some(tokens), kept)) => {
                let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
                if cache.recorder == recorder {
                    if let Some(series) = cache.requests.get_mut(&key) {
                        series.tokens = Some(tokens);
                    }
                }
                return Some(kept);
            }
            Err(closures) => closures,
        };
        self.in_flight(|g| g.decrement(1.0));
        self.request(model, group, status, outcome, use_request);
        if let Some(use_tokens) = use_tokens {
            self.tokens(model, group, use_tokens);
        }
        None
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

    /// [`queue_wait`](Self::queue_wait) for a group label held as a shared string (a
    /// request's): the last request's histogram again when its label is the same `Arc` and
    /// its recorder the same (no hash of the label and no map probe, ~90 instructions a
    /// request: issue 14, sixteenth pass); else as [`queue_wait`](Self::queue_wait), whose
    /// handle is then remembered.
    pub(crate) fn queue_wait_labelled(
        &self,
        group: &Arc<str>,
        use_handle: impl FnOnce(&Histogram),
    ) {
        let recorder = current_recorder();
        let last = || {
            self.last_queue_wait
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        let found = last()
            .as_ref()
            .filter(|(r, g, _)| *r == recorder && Arc::ptr_eq(g, group))
            .map(|(_, _, histogram)| histogram.clone());
        if let Some(histogram) = found {
            return use_handle(&histogram);
        }
        let mut kept = None;
        self.queue_wait(group, |histogram| {
            use_handle(histogram);
            kept = Some(histogram.clone());
        });
        if let Some(histogram) = kept {
            *last() = Some((recorder, group.clone(), histogram));
        }
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

    /// `finished_labelled` counts what `finish` counts, whether the last request's handles
    /// serve it (the same label `Arc`s, status and outcome) or not (another label string,
    /// status, outcome, the same labels in other `Arc`s, tokens wanted where the last one
    /// had none), and in the recorder current at each end (handles are not carried from one
    /// recorder to another).
    #[test]
    fn finished_labelled_counts_as_finished() {
        let (m, g, other) = (
            Arc::<str>::from("m"),
            Arc::<str>::from("g"),
            Arc::<str>::from("o"),
        );
        let ok = Some(http::StatusCode::OK);
        let limited = Some(http::StatusCode::TOO_MANY_REQUESTS);
        let tokens = |s: &TokenSeries| {
            s.input.increment(3);
            s.output.increment(2);
        };
        let no_tokens: Option<fn(&TokenSeries)> = None;
        let end = |handles: &Handles, model: &Arc<str>, status, outcome, with_tokens: bool| {
            handles.in_flight(|g| g.increment(1.0));
            let request = |s: &RequestSeries| s.requests.increment(1);
            if with_tokens {
                handles.finished_labelled(model, &g, status, outcome, request, Some(tokens));
            } else {
                handles.finished_labelled(model, &g, status, outcome, request, no_tokens);
            }
        };
        let handles = Handles::default();
        let run = |handles: &Handles| {
            let success = names::OUTCOME_SUCCESS;
            for with_tokens in [false, true, true, false, true] {
                end(handles, &m, ok, success, with_tokens);
            }
            end(handles, &other, ok, success, true);
            end(handles, &m, limited, names::OUTCOME_RATE_LIMITED, false);
            end(handles, &m, ok, names::OUTCOME_STREAM_ERROR, false);
            end(handles, &Arc::from("m"), ok, success, true);
            end(handles, &m, ok, success, true);
            // Another status alone; then its handles remembered without token series.
            let failed = Some(http::StatusCode::INTERNAL_SERVER_ERROR);
            for with_tokens in [false, false, true] {
                end(handles, &m, failed, success, with_tokens);
            }
            end(handles, &m, None, names::OUTCOME_CANCELLED, false);
            // Ends as it starts: the next recorder's first end finds this one's handles.
            end(handles, &m, ok, success, false);
        };
        let expected = [
            r#"tower_claude_requests_total{model="m",group="g",status="200",outcome="success"} 8"#,
            r#"tower_claude_requests_total{model="o",group="g",status="200",outcome="success"} 1"#,
            r#"tower_claude_requests_total{model="m",group="g",status="429",outcome="rate_limited"} 1"#,
            r#"tower_claude_requests_total{model="m",group="g",status="200",outcome="stream_error"} 1"#,
            r#"tower_claude_requests_total{model="m",group="g",status="none",outcome="cancelled"} 1"#,
            r#"tower_claude_requests_total{model="m",group="g",status="500",outcome="success"} 3"#,
            r#"tower_claude_input_tokens_total{model="m",group="g"} 18"#,
            r#"tower_claude_output_tokens_total{model="m",group="g"} 12"#,
            r#"tower_claude_input_tokens_total{model="o",group="g"} 3"#,
            "tower_claude_in_flight_requests 0",
        ];
        // Two recorders one after the other (both alive: a recorder is known by its
        // address), the same handles object: each counts its own.
        let recorders = [(); 2].map(|()| prometheus::builder().build_recorder());
        for recorder in &recorders {
            let rendered = recorder.handle();
            metrics::with_local_recorder(recorder, || run(&handles));
            let text = prometheus::render(&rendered);
            for line in expected {
                assert!(text.contains(line), "{line} not in the rendering:\n{text}");
            }
        }
    }

    /// `queue_wait_labelled` records where `queue_wait` does: the same label `Arc` again,
    /// another group, the same name in another `Arc`, each recorder its own.
    #[test]
    fn queue_wait_labelled_records_as_queue_wait() {
        let (g, h) = (Arc::<str>::from("g"), Arc::<str>::from("h"));
        let handles = Handles::default();
        let recorders = [(); 2].map(|()| prometheus::builder().build_recorder());
        for recorder in &recorders {
            let rendered = recorder.handle();
            metrics::with_local_recorder(recorder, || {
                // Ends as it starts: the next recorder's first look finds this one's.
                for group in [&g, &g, &h, &g, &Arc::from("h"), &h, &g] {
                    handles.queue_wait_labelled(group, |w| w.record(0.5));
                }
            });
            let text = prometheus::render(&rendered);
            for line in [
                r#"tower_claude_queue_wait_seconds_count{group="g"} 4"#,
                r#"tower_claude_queue_wait_seconds_count{group="h"} 3"#,
            ] {
                assert!(text.contains(line), "{line} not in the rendering:\n{text}");
            }
        }
    }

    /// `finish` counts what the three calls it stands for count, whether its handles are
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
                handles.finish(
                    current_recorder(),
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
                handles.finish(
                    current_recorder(),
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
