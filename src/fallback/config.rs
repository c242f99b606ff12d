//! The configuration a [`Fallback`](super::Fallback) service and its response futures share.

use std::time::Duration;

use http::HeaderMap;

use super::policy::{self, Action, Candidate, QuotaView, Rules, SharedPolicy};
use crate::anthropic::{KeyId, ModelCatalog, RequestMeta};
use crate::quota::{Cost, OutputReservation, QuotaBoard};

/// The options of a fallback layer, shared by its services and response futures.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) board: QuotaBoard,
    /// A key pool below: the quota view of a model is the best of its keys.
    pub(crate) keys: Option<crate::key_pool::KeyPoolHandle>,
    pub(crate) catalog: ModelCatalog,
    pub(crate) floor: Option<String>,
    pub(crate) policy: SharedPolicy,
    pub(crate) rules: Rules,
    pub(crate) overloaded_pause: Duration,
    pub(crate) max_depth: usize,
    pub(crate) output: OutputReservation,
}

impl Config {
    /// The board's view of `model` for a request of `cost` sent with `key`. A group whose
    /// limits the board does not know yet counts as full (even while a rate limiter below
    /// holds requests back until its first answer teaches it the limits).
    pub(crate) fn view(&self, model: &str, key: &KeyId, cost: &Cost) -> QuotaView {
        let group = self.catalog.group(model);
        let Some(keys) = &self.keys else {
            return self.key_view(key, &group, cost);
        };
        // A key pool below sends with its best key: the model is as good as that key. Keys a
        // 403 put last in the group do not count; none left means no headroom at all.
        let mut best: Option<QuotaView> = None;
        for key in keys.outlook(&group).into_iter().filter(|k| !k.forbidden) {
            let mut v = self.key_view(&key.id, &group, cost);
            if !key.cooldown.is_zero() {
                v.fits = false;
                v.wait = v.wait.map(|w| w.max(key.cooldown));
            }
            if best.as_ref().is_none_or(|b| policy::more_headroom(&v, b)) {
                best = Some(v);
            }
        }
        best.unwrap_or(QuotaView {
            fraction: 0.0,
            fits: false,
            wait: None,
        })
    }

    /// The board's view of one key in `group`.
    pub(crate) fn key_view(
        &self,
        key: &KeyId,
        group: &crate::anthropic::RateLimitGroup,
        cost: &Cost,
    ) -> QuotaView {
        let board = &self.board;
        match board.headroom(key, group) {
            None => QuotaView::unknown(),
            Some(headroom) => QuotaView {
                fraction: headroom.fraction,
                fits: board.fits_now(key, group, cost),
                wait: board.time_until_fits(key, group, cost),
            },
        }
    }

    /// The index of the best of `candidates[from..]` for the request `meta` (with `headers`)
    /// now, as the layer's [`Policy`](super::Policy) decides; `None` when none is left (or
    /// every one left is excluded). Before the first send (`from == 0`) a lone requested
    /// model is used without asking.
    pub(crate) fn select(
        &self,
        meta: &RequestMeta,
        headers: &HeaderMap,
        candidates: &[String],
        from: usize,
        key: &KeyId,
        cost: &Cost,
    ) -> Option<usize> {
        if from >= candidates.len() {
            return None;
        }
        if from == 0 && candidates.len() == 1 {
            return Some(0);
        }
        let policy = &self.policy.0;
        let decided: Vec<(QuotaView, Action)> = (from..candidates.len())
            .map(|i| {
                let view = self.view(&candidates[i], key, cost);
                let candidate = Candidate::new(meta, &candidates[i], i, view).with_headers(headers);
                (view, policy.decide(&candidate))
            })
            .collect();
        let chosen = policy::select(&decided).map(|i| from + i);
        tracing::debug!(
            requested = meta.model.as_deref().unwrap_or_default(),
            from = %candidates[from],
            chosen = chosen.map(|i| candidates[i].as_str()),
            decisions = ?decided.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
            "fallback policy decided"
        );
        chosen
    }

    /// The cost the walk books a request at: the cache-aware input estimate, as the rate
    /// limiter reserves it (a prompt-cache prefix `key` sent to the requested model within
    /// its TTL does not count).
    pub(crate) fn cost(&self, key: &KeyId, meta: &RequestMeta) -> Cost {
        let requested = meta.model.as_deref().unwrap_or_default();
        let input = self
            .board
            .prompt_cache()
            .estimate(key, meta, self.catalog.cache_reads_count(requested))
            .counted_input_tokens();
        Cost::new(1, input, self.output.reserve(meta.max_tokens))
    }
}
