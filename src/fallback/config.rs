//! The configuration a [`Fallback`](super::Fallback) service and its response futures share.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderMap;

use super::policy::{self, Action, Candidate, QuotaView, Rules, SharedPolicy};
use crate::anthropic::{KeyId, ModelCatalog, ModelEntry, RequestMeta};
use crate::quota::{Cost, OutputReservation, QuotaBoard};
use crate::retry::LowerModels;

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
    /// A retry layer is directly below (set by [`ClaudeStack`](crate::stack::ClaudeStack),
    /// which composes them so): each request sent carries a [`Resend`](crate::retry::Resend)
    /// so that the retry layer keeps no copy of its own.
    pub(crate) resend_below: bool,
    /// A layer above read the request's key id, checked against its headers, with only the
    /// stack's own layers between (set by [`ClaudeStack`](crate::stack::ClaudeStack) under
    /// its metrics layer): the id is taken from the memo it left.
    pub(crate) key_checked_above: bool,
    /// The candidates of the last requested models (see [`candidates`](Self::candidates)).
    pub(crate) chains: Mutex<Vec<Arc<[ModelEntry]>>>,
}

/// Requested models whose candidates [`Config::candidates`] remembers (a deployment asks
/// for a handful; a client making ids up only rotates the list).
const CHAINS: usize = 16;

impl Config {
    /// The request's chain for `requested` (truncated at the floor, the requested model
    /// first), as catalogue entries (each model's group looked up once), shared: it depends
    /// on the catalogue and the floor only, so it is built once per model rather than for
    /// every request (a vector and an entry per model, each time).
    pub(crate) fn candidates(&self, requested: &ModelEntry) -> Arc<[ModelEntry]> {
        let mut chains = self.chains.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(chain) = chains
            .iter()
            .find(|c| c.first().is_some_and(|m| m.id() == requested.id()))
        {
            return chain.clone();
        }
        let chain: Arc<[ModelEntry]> =
            policy::candidates(&self.catalog, requested.id(), self.floor.as_deref())
                .iter()
                .enumerate()
                .map(|(i, model)| match i {
                    0 => requested.clone(),
                    _ => self.catalog.entry(model),
                })
                .collect();
        if chains.len() >= CHAINS {
            chains.remove(0);
        }
        chains.push(chain.clone());
        chain
    }

    /// The board's view of `model` for a request of `cost` sent with `key`. A group whose
    /// limits the board does not know yet counts as full (even while a rate limiter below
    /// holds requests back until its first answer teaches it the limits).
    pub(crate) fn view(&self, model: &ModelEntry, key: &KeyId, cost: &Cost) -> QuotaView {
        let group = model.group();
        let Some(keys) = &self.keys else {
            return self.key_view(key, group, cost);
        };
        // A key pool below sends with its best key: the model is as good as that key. Keys a
        // 403 put last in the group do not count; none left means no headroom at all.
        let mut best: Option<QuotaView> = None;
        for key in keys.outlook(group).into_iter().filter(|k| !k.forbidden) {
            let mut v = self.key_view(&key.id, group, cost);
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
        let look = self.board.look(key, group, cost);
        match look.room {
            None => QuotaView::unknown(),
            Some(room) => QuotaView {
                fraction: room.fraction,
                fits: look.fits,
                wait: look.wait,
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
        candidates: &[ModelEntry],
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
        // In chain order, and only as far as needed: the first candidate the policy uses is
        // the choice (`policy::select`), so the later ones are neither viewed nor asked. Only
        // when none is used are all of them weighed by headroom.
        let policy = &self.policy.0;
        let mut decided: Vec<(QuotaView, Action)> = Vec::new();
        let mut chosen = None;
        for (i, model) in candidates.iter().enumerate().skip(from) {
            let view = self.view(model, key, cost);
            let action =
                policy.decide(&Candidate::new(meta, model.id(), i, view).with_headers(headers));
            if action == Action::Use {
                chosen = Some(i);
                break;
            }
            decided.push((view, action));
        }
        let chosen = chosen.or_else(|| policy::select(&decided).map(|i| from + i));
        tracing::debug!(
            requested = meta.model.as_deref().unwrap_or_default(),
            from = %candidates[from].id(),
            chosen = chosen.map(|i| candidates[i].id()),
            // The decisions before the chosen one (none: the first asked is used).
            decisions = ?decided.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
            "fallback policy decided"
        );
        chosen
    }

    /// Whether [`select`](Self::select) would choose any of `candidates[from..]`: whether one
    /// is not excluded by the policy. Stops at the first such candidate (a used or skipped
    /// one is a choice, at worst as the last resort), so usually one view is taken.
    pub(crate) fn any_left(
        &self,
        meta: &RequestMeta,
        headers: &HeaderMap,
        candidates: &[ModelEntry],
        from: usize,
        key: &KeyId,
        cost: &Cost,
    ) -> bool {
        if from == 0 && candidates.len() == 1 {
            return true;
        }
        let policy = &self.policy.0;
        candidates.iter().enumerate().skip(from).any(|(i, model)| {
            let view = self.view(model, key, cost);
            policy.decide(&Candidate::new(meta, model.id(), i, view).with_headers(headers))
                != Action::Exclude
        })
    }

    /// The cost the walk books a request at: the cache-aware input estimate, as the rate
    /// limiter reserves it (a prompt-cache prefix `key` sent to the requested model within
    /// its TTL does not count).
    pub(crate) fn cost(&self, key: &KeyId, meta: &RequestMeta) -> Cost {
        // The request's catalogue entry, looked up once per request.
        let reads_count = match meta.model_entry(&self.catalog) {
            Some(entry) => entry.cache_reads_count(),
            None => self.catalog.cache_reads_count(""),
        };
        let input = self
            .board
            .prompt_cache()
            .estimate(key, meta, reads_count)
            .counted_input_tokens();
        Cost::new(1, input, self.output.reserve(meta.max_tokens))
    }
}

/// Retry, directly below, asks when an attempt is rate limited (see
/// [`ServerWait`](crate::retry::ServerWait)).
impl LowerModels for Config {
    fn lower_left(
        &self,
        meta: &RequestMeta,
        headers: &HeaderMap,
        candidates: &[ModelEntry],
        idx: usize,
        visited: usize,
        key: &KeyId,
        cost: &Cost,
    ) -> bool {
        // Whether a lower model than candidate `idx` is left (and the depth allows moving to
        // it; `visited` counts `idx` already): while one is, a retry layer below must not sit
        // out a long 429 wait on the current model (`MaxServerWait`). Fallback's own
        // `MaxServerWait` for a request sent alone asks the same.
        let next = idx + 1;
        next < candidates.len()
            && visited < self.max_depth
            && self.any_left(meta, headers, candidates, next, key, cost)
    }

    fn max_wait(&self) -> Duration {
        self.rules.max_wait_before_failover
    }
}
