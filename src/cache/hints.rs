//! When the scans of `RequestMeta` should record the canonical hints a cache key is written
//! from (`anthropic::scan::CanonicalHints`, a process-wide switch once turned on).
//!
//! Hints cost every scanned request ~1.5k instructions (2 KB body); without them a keyed
//! request writes its canonical body from the bytes (`KeyBase::key_of` 4.0k → 10.5k), ~4.8k
//! instructions more once the hints' cost is taken off (measured side by side,
//! `docs/benchmarks.md`, dh13). So:
//!
//! - a cache in [`CacheMode::All`] keys every request: it turns the hints on when it is built;
//! - a cache in [`CacheMode::Deterministic`] (the proxy's default) keys only `temperature` 0
//!   requests (and `x-tower-claude-cache: use`): it counts, in windows of [`WINDOW`] requests
//!   it decides on, how many it keyed, and turns the hints on once a window has at least a
//!   quarter keyed (about the break-even: 1.5k × ¾ ≈ 4.8k × ¼). A process of sampled requests never
//!   pays for hints; one sending mostly `temperature` 0 pays the bytes' way for at most one
//!   window of requests after they start.
//!
//! The key is the same either way (the hints are checked against the body they are used
//! for): only the cost changes, so a count that races (two windows closing at once) is fine.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

use super::CacheMode;

/// Requests per window of a deterministic cache's count.
pub(crate) const WINDOW: u32 = 256;

/// Keyed requests in a window from which the hints are turned on (a quarter).
const KEYED_ENOUGH: u32 = WINDOW / 4;

/// Whether a cache in `mode` turns the hints on when it is built: only in [`CacheMode::All`].
pub(crate) fn wanted_from_the_start(mode: CacheMode) -> bool {
    matches!(mode, CacheMode::All)
}

/// The keyed share of the requests deterministic caches decide on, by windows.
#[derive(Debug, Default)]
pub(crate) struct Demand {
    /// The hints are on (turned on by this count, or by a cache in `all` mode).
    on: AtomicBool,
    /// Requests decided on in this window.
    seen: AtomicU32,
    /// Of them, keyed.
    keyed: AtomicU32,
}

impl Demand {
    /// A new count, hints off.
    pub(crate) const fn new() -> Self {
        Self {
            on: AtomicBool::new(false),
            seen: AtomicU32::new(0),
            keyed: AtomicU32::new(0),
        }
    }

    /// Notes that the hints are on (nothing left to count).
    pub(crate) fn turned_on(&self) {
        self.on.store(true, Relaxed);
    }

    /// Counts one request a deterministic cache decided on; `true` when the hints should be
    /// turned on now (once: the window that reached a quarter keyed).
    pub(crate) fn count(&self, keyed: bool) -> bool {
        if self.on.load(Relaxed) {
            return false;
        }
        if keyed {
            self.keyed.fetch_add(1, Relaxed);
        }
        if self.seen.fetch_add(1, Relaxed) + 1 < WINDOW {
            return false;
        }
        self.seen.store(0, Relaxed);
        let keyed = self.keyed.swap(0, Relaxed);
        if keyed >= KEYED_ENOUGH && !self.on.swap(true, Relaxed) {
            return true;
        }
        false
    }
}

/// The process's count (the switch it drives is the process's).
pub(crate) static DEMAND: Demand = Demand::new();

/// Turns the hints on for the process.
fn turn_on() {
    DEMAND.turned_on();
    crate::anthropic::want_canonical_hints();
}

/// Called when a cache in `mode` is built.
pub(crate) fn on_build(mode: CacheMode) {
    if wanted_from_the_start(mode) {
        turn_on();
    }
}

/// Called by a deterministic cache for each request it decides on: `keyed` when it computes
/// the request's key.
pub(crate) fn on_decision(keyed: bool) {
    if DEMAND.count(keyed) {
        tracing::debug!(
            "cache: a quarter of a window's requests were keyed: the request scans record the key's hints from now on"
        );
        crate::anthropic::want_canonical_hints();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a cache that keys every request turns the hints on when built: in the default
    /// mode a sampled request is never keyed and must not pay for them.
    #[test]
    fn only_a_cache_keying_every_request_wants_the_hints_from_the_start() {
        assert!(wanted_from_the_start(CacheMode::All));
        assert!(!wanted_from_the_start(CacheMode::Deterministic));
        assert!(!wanted_from_the_start(CacheMode::Off));
    }

    #[test]
    fn sampled_requests_never_turn_the_hints_on() {
        let d = Demand::new();
        for _ in 0..10 * WINDOW {
            assert!(!d.count(false));
        }
    }

    #[test]
    fn fewer_than_a_quarter_keyed_per_window_keep_them_off() {
        let d = Demand::new();
        // One keyed in five (a fifth of each window), windows after windows.
        for i in 0..20 * WINDOW {
            assert!(!d.count(i % 5 == 0), "request {i}");
        }
    }

    #[test]
    fn a_window_a_quarter_keyed_turns_them_on_once() {
        let d = Demand::new();
        // A window of sampled requests, then one keyed in four: on when that window closes.
        for _ in 0..WINDOW {
            assert!(!d.count(false));
        }
        let turned: Vec<u32> = (0..3 * WINDOW).filter(|i| d.count(i % 4 == 0)).collect();
        assert_eq!(
            turned,
            vec![WINDOW - 1],
            "turned on once, as the window closed"
        );
        // Counting stops once on.
        assert_eq!(d.seen.load(Relaxed), 0);
    }

    #[test]
    fn turned_on_elsewhere_counting_stops() {
        let d = Demand::new();
        d.turned_on();
        for _ in 0..2 * WINDOW {
            assert!(!d.count(true));
        }
        assert_eq!(d.seen.load(Relaxed), 0);
    }
}
