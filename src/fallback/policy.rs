//! The two decisions of the fallback layer, as plain functions: which model to send a request
//! to (from the quota views of the candidates), and whether an answer moves the request on.

use std::time::Duration;

use http::StatusCode;

use crate::anthropic::{ApiErrorKind, ModelCatalog};

/// The default per-position thresholds: the requested model needs 70 % of its binding bucket
/// left, the next model 30 %, any later model anything.
pub(crate) const DEFAULT_THRESHOLDS: [f64; 2] = [0.70, 0.30];

/// How one candidate looks on the quota board right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct View {
    /// Binding remaining fraction (1.0 when unknown).
    pub(crate) fraction: f64,
    /// This request's cost fits the candidate's buckets now.
    pub(crate) fits: bool,
    /// Time until the cost fits by refill (`None`: never, or unknown).
    pub(crate) wait: Option<Duration>,
}

/// The threshold of the candidate at `position` (0 = the requested model): the configured
/// value, or 0 past the end of the list. Non-finite values count as 0.
pub(crate) fn threshold(thresholds: &[f64], position: usize) -> f64 {
    thresholds
        .get(position)
        .copied()
        .filter(|t| t.is_finite())
        .unwrap_or(0.0)
}

/// Chooses among `candidates` (`(position in the request's chain, view)`, best model first):
/// the first whose cost fits now and whose fraction is at least its position's threshold;
/// else the one with the most headroom: cost fits now, then shortest wait until it fits, then
/// highest fraction, then earliest in the chain. `None` only when `candidates` is empty.
pub(crate) fn select(candidates: &[(usize, View)], thresholds: &[f64]) -> Option<usize> {
    if let Some(i) = candidates
        .iter()
        .position(|(pos, v)| v.fits && v.fraction >= threshold(thresholds, *pos))
    {
        return Some(i);
    }
    let mut best: Option<usize> = None;
    for (i, (_, v)) in candidates.iter().enumerate() {
        let better = match best {
            None => true,
            Some(b) => more_headroom(v, &candidates[b].1),
        };
        if better {
            best = Some(i);
        }
    }
    best
}

/// Whether `a` has strictly more headroom than `b` (ties keep the earlier candidate).
pub(crate) fn more_headroom(a: &View, b: &View) -> bool {
    if a.fits != b.fits {
        return a.fits;
    }
    match (a.wait, b.wait) {
        (Some(x), Some(y)) if x != y => return x < y,
        (Some(_), None) => return true,
        (None, Some(_)) => return false,
        _ => {}
    }
    a.fraction > b.fraction
}

/// The models a request for `requested` may be served by: `catalog.chain_from(requested)`,
/// truncated at `floor`, each model once (a chain that names a model twice keeps its first
/// place).
///
/// The floor is found by exact id among the candidates; otherwise candidates of a family lower
/// than the floor's family are dropped. A floor that can be placed neither way (unknown id of
/// unknown family) leaves only the requested model. The requested model itself is never
/// dropped.
pub(crate) fn candidates(
    catalog: &ModelCatalog,
    requested: &str,
    floor: Option<&str>,
) -> Vec<String> {
    let mut chain = catalog.chain_from(requested);
    let mut seen = std::collections::HashSet::new();
    chain.retain(|m| seen.insert(m.clone()));
    let Some(floor) = floor else {
        return chain;
    };
    if let Some(at) = chain.iter().position(|m| m == floor) {
        chain.truncate(at + 1);
        return chain;
    }
    match catalog.family(floor) {
        Some(lowest) => {
            let mut out = Vec::with_capacity(chain.len());
            for (i, model) in chain.into_iter().enumerate() {
                let allowed = i == 0 || catalog.family(&model).is_some_and(|f| f <= lowest);
                if !allowed {
                    break;
                }
                out.push(model);
            }
            out
        }
        None => {
            chain.truncate(1);
            chain
        }
    }
}

/// What an error answer means for the walk down the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Return the answer to the caller.
    Return,
    /// Send the same model again (a 529 under the per-model count).
    Resend,
    /// Move on to a lower model.
    FailOver,
}

/// The rules the walk applies to an error answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) max_wait_before_failover: Duration,
    pub(crate) max_overloaded: u32,
}

/// Classifies an answer with `status` and error `kind` (from its envelope).
///
/// * spend cap (429 `enforced_spend_limit_reached`): fail over;
/// * 429: fail over when the server's wait is unknown or longer than the bound, or when a
///   retry layer below already gave up on it (`retried`); else return it;
/// * 529: fail over when `overloaded` (529s from this model so far, this one included) reached
///   the bound or a retry layer below gave up on it; else send the same model again;
/// * anything else: return it.
pub(crate) fn classify(
    rules: &Rules,
    status: StatusCode,
    kind: Option<ApiErrorKind>,
    server_wait: Option<Duration>,
    overloaded: u32,
    retried: bool,
) -> Verdict {
    if kind == Some(ApiErrorKind::SpendLimit) {
        return Verdict::FailOver;
    }
    match status.as_u16() {
        429 => {
            let long = match server_wait {
                None => true,
                Some(w) => w > rules.max_wait_before_failover,
            };
            if long || retried {
                Verdict::FailOver
            } else {
                Verdict::Return
            }
        }
        529 => {
            if retried || overloaded >= rules.max_overloaded {
                Verdict::FailOver
            } else {
                Verdict::Resend
            }
        }
        _ => Verdict::Return,
    }
}

/// Whether an inner service error (no HTTP answer) moves the request on: the retry layer's
/// [`SpendLimit`](crate::retry::RetryErrorKind::SpendLimit) error, or a spend-cap
/// [`ApiError`](crate::anthropic::ApiError), anywhere in its source chain. Any other error is
/// returned.
pub(crate) fn error_fails_over(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(retry) = e.downcast_ref::<crate::retry::RetryError>() {
            if retry.kind() == crate::retry::RetryErrorKind::SpendLimit {
                return true;
            }
        }
        if let Some(api) = e.downcast_ref::<crate::anthropic::ApiError>() {
            if api.kind() == ApiErrorKind::SpendLimit {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// Whether a response with `status` may lead to a failover or a re-send (and so its error
/// envelope is worth reading).
pub(crate) fn may_move_on(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 529)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(fraction: f64, fits: bool, wait: Option<u64>) -> View {
        View {
            fraction,
            fits,
            wait: wait.map(Duration::from_secs),
        }
    }

    const T: &[f64] = &DEFAULT_THRESHOLDS;

    #[test]
    fn thresholds_per_position() {
        assert_eq!(threshold(T, 0), 0.70);
        assert_eq!(threshold(T, 1), 0.30);
        assert_eq!(threshold(T, 2), 0.0);
        assert_eq!(threshold(&[f64::NAN], 0), 0.0);
    }

    #[test]
    fn first_qualifying_candidate_wins() {
        let full = v(1.0, true, Some(0));
        assert_eq!(select(&[(0, full), (1, full), (2, full)], T), Some(0));
        let opus = v(0.69, true, Some(0));
        assert_eq!(select(&[(0, opus), (1, full), (2, full)], T), Some(1));
        assert_eq!(
            select(&[(0, v(0.70, true, Some(0))), (1, full)], T),
            Some(0)
        );
        let sonnet = v(0.29, true, Some(0));
        assert_eq!(select(&[(0, opus), (1, sonnet), (2, full)], T), Some(2));
        // A candidate whose cost does not fit is skipped even with a high fraction.
        let big = v(0.95, false, Some(3));
        assert_eq!(select(&[(0, big), (1, full)], T), Some(1));
    }

    #[test]
    fn positions_not_indices_decide_thresholds() {
        // After a failover the remaining candidates keep their positions in the chain.
        assert_eq!(
            select(
                &[(1, v(0.31, true, Some(0))), (2, v(1.0, true, Some(0)))],
                T
            ),
            Some(0)
        );
        assert_eq!(
            select(
                &[(1, v(0.29, true, Some(0))), (2, v(0.05, true, Some(0)))],
                T
            ),
            Some(1)
        );
    }

    #[test]
    fn none_qualifies_most_headroom_wins() {
        // Everything below its threshold and fitting: highest fraction.
        let c = [
            (0, v(0.5, true, Some(0))),
            (1, v(0.2, true, Some(0))),
            (2, v(0.1, false, Some(2))),
        ];
        assert_eq!(select(&c, T), Some(0));
        // Nothing fits: the shortest wait, then the fraction.
        let c = [
            (0, v(0.9, false, Some(10))),
            (1, v(0.1, false, Some(2))),
            (2, v(0.5, false, None)),
        ];
        assert_eq!(select(&c, T), Some(1));
        let c = [(0, v(0.2, false, Some(2))), (1, v(0.3, false, Some(2)))];
        assert_eq!(select(&c, T), Some(1));
        let c = [(0, v(0.2, false, None)), (1, v(0.2, false, None))];
        assert_eq!(select(&c, T), Some(0));
        assert_eq!(select(&[], T), None);
    }

    #[test]
    fn floor_truncates_the_chain() {
        let c = ModelCatalog::default();
        let all = ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"];
        assert_eq!(candidates(&c, "claude-opus-4-7", None), all);
        assert_eq!(
            candidates(&c, "claude-opus-4-7", Some("claude-sonnet-4-6")),
            all[..2]
        );
        // By family when the floor is not in the chain.
        assert_eq!(
            candidates(&c, "claude-opus-4-7", Some("claude-sonnet-4-5")),
            all[..2]
        );
        assert_eq!(
            candidates(&c, "claude-opus-4-7", Some("claude-opus-4-1")),
            all[..1]
        );
        // The requested model is never dropped, never upgraded.
        assert_eq!(
            candidates(&c, "claude-haiku-4-5", Some("claude-opus-4-7")),
            ["claude-haiku-4-5"]
        );
        assert_eq!(
            candidates(&c, "claude-sonnet-4-6", Some("claude-haiku-4-5")),
            all[1..]
        );
        // Each model once.
        let twice = c.clone().with_chain([
            "claude-opus-4-7",
            "claude-sonnet-4-6",
            "claude-opus-4-7",
            "claude-haiku-4-5",
        ]);
        assert_eq!(candidates(&twice, "claude-opus-4-7", None), all);
        // An unplaceable floor allows no fallback.
        assert_eq!(
            candidates(&c, "claude-opus-4-7", Some("gpt-5")),
            ["claude-opus-4-7"]
        );
    }

    #[test]
    fn classification() {
        let r = Rules {
            max_wait_before_failover: Duration::from_secs(10),
            max_overloaded: 2,
        };
        let s429 = StatusCode::TOO_MANY_REQUESTS;
        let s529 = StatusCode::from_u16(529).unwrap();
        let rl = Some(ApiErrorKind::RateLimit);
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(classify(&r, s429, rl, secs(10), 0, false), Verdict::Return);
        assert_eq!(
            classify(&r, s429, rl, secs(11), 0, false),
            Verdict::FailOver
        );
        assert_eq!(classify(&r, s429, rl, None, 0, false), Verdict::FailOver);
        assert_eq!(classify(&r, s429, rl, secs(1), 0, true), Verdict::FailOver);
        let cap = Some(ApiErrorKind::SpendLimit);
        assert_eq!(
            classify(&r, s429, cap, secs(1), 0, false),
            Verdict::FailOver
        );
        let ov = Some(ApiErrorKind::Overloaded);
        assert_eq!(classify(&r, s529, ov, None, 1, false), Verdict::Resend);
        assert_eq!(classify(&r, s529, ov, None, 2, false), Verdict::FailOver);
        assert_eq!(classify(&r, s529, ov, None, 1, true), Verdict::FailOver);
        let api = Some(ApiErrorKind::Api);
        assert_eq!(
            classify(&r, StatusCode::INTERNAL_SERVER_ERROR, api, None, 0, false),
            Verdict::Return
        );
        assert!(may_move_on(s429) && may_move_on(s529));

        #[derive(Debug)]
        struct Wrapper(crate::anthropic::ApiError);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let cap = crate::anthropic::ApiError::new(ApiErrorKind::SpendLimit, "cap");
        assert!(error_fails_over(&Wrapper(cap)));
        let overloaded = crate::anthropic::ApiError::new(ApiErrorKind::Overloaded, "busy");
        assert!(!error_fails_over(&Wrapper(overloaded)));
        let io = std::io::Error::other("reset");
        assert!(!error_fails_over(&io));
        assert!(!may_move_on(StatusCode::OK) && !may_move_on(StatusCode::BAD_REQUEST));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn view() -> impl Strategy<Value = View> {
            (0.0f64..=1.0, any::<bool>(), proptest::option::of(0u64..120)).prop_map(
                |(fraction, fits, wait)| View {
                    fraction,
                    fits,
                    wait: if fits {
                        Some(Duration::ZERO)
                    } else {
                        wait.map(|w| Duration::from_secs(w + 1))
                    },
                },
            )
        }

        proptest! {
            #[test]
            fn select_picks_the_first_qualifier_or_the_most_headroom(
                views in proptest::collection::vec(view(), 0..6),
                thresholds in proptest::collection::vec(0.0f64..=1.0, 0..4),
            ) {
                let candidates: Vec<(usize, View)> = views.iter().copied().enumerate().collect();
                let chosen = select(&candidates, &thresholds);
                prop_assert_eq!(chosen.is_some(), !views.is_empty());
                let Some(i) = chosen else { return Ok(()) };
                let qualifies = |j: usize| {
                    views[j].fits && views[j].fraction >= threshold(&thresholds, j)
                };
                match (0..views.len()).find(|&j| qualifies(j)) {
                    Some(first) => prop_assert_eq!(i, first),
                    None => {
                        // Nothing has strictly more headroom than the choice.
                        for (j, v) in views.iter().enumerate() {
                            prop_assert!(!more_headroom(v, &views[i]), "{} beats {}", j, i);
                        }
                        // A candidate that fits now is preferred to one that does not.
                        if views.iter().any(|v| v.fits) {
                            prop_assert!(views[i].fits);
                        }
                    }
                }
            }

            #[test]
            fn candidates_start_with_the_request_and_never_upgrade(
                requested in prop::sample::select(vec![
                    "claude-opus-4-7", "claude-opus-4-1", "claude-sonnet-4-6",
                    "claude-3-5-sonnet-latest", "claude-haiku-4-5", "gpt-5",
                ]),
                floor in proptest::option::of(prop::sample::select(vec![
                    "claude-opus-4-7", "claude-sonnet-4-5", "claude-sonnet-4-6",
                    "claude-haiku-4-5", "unknown-model",
                ])),
            ) {
                let catalog = ModelCatalog::default();
                let out = candidates(&catalog, requested, floor);
                prop_assert_eq!(out[0].as_str(), requested);
                let full = catalog.chain_from(requested);
                prop_assert!(out.iter().all(|m| full.contains(m)));
                let mut seen = std::collections::HashSet::new();
                prop_assert!(out.iter().all(|m| seen.insert(m)));
                let families: Vec<_> = out.iter().filter_map(|m| catalog.family(m)).collect();
                prop_assert!(families.windows(2).all(|w| w[0] <= w[1]));
                if let (Some(floor), Some(last)) = (floor.and_then(|f| catalog.family(f)), out.last()) {
                    if out.len() > 1 {
                        prop_assert!(catalog.family(last).is_some_and(|f| f <= floor));
                    }
                }
            }
        }
    }
}
