//! Shared 429 state per (API key, rate-limit group): the penalty streak and the pacing
//! schedule.
//!
//! A `retry-after` tells each rate-limited request when the quota can admit *one* request.
//! When many requests of the layer are waiting on the same quota, sending them all at that
//! instant (even spread over a second) makes all but a few collide again; under a tight quota
//! some collide on every attempt until `max_attempts` is spent, and the task is lost.
//!
//! So the layer paces what it sends on a (key, group) that answered 429 with a delay: each
//! waiting request reserves its own *admission slot*, no earlier than the server's delay and
//! one *step* after the previous slot. The step is the time the quota needs to admit one
//! request like it (the largest share of a per-minute `anthropic-ratelimit-*-limit` it uses,
//! e.g. `60 s / requests-limit`, at most the server's delay) plus a margin of 10 %, doubled
//! for each consecutive 429 beyond the first ([`MAX_PENALTY_LEVEL`] doublings at most): if
//! the estimate is too fast, the 429s it causes slow the pace down, and successes relax it.
//! A new request on a (key, group) with a backlog of slots takes the next slot too instead of
//! being sent into a quota known to be exhausted. Once the last slot has passed, requests go
//! straight through again.
//!
//! The same streak lengthens the exponential backoff base of every request on the (key,
//! group) (see [`backoff`](super::backoff)).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::backoff::MAX_PENALTY_LEVEL;
use crate::anthropic::{KeyId, RateLimitGroup};

/// A (key, rate-limit group): the unit of quota.
pub(crate) type QuotaKey = (KeyId, RateLimitGroup);

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    /// Consecutive 429s (minus successes), capped.
    streak: u32,
    /// The first free admission slot, when requests are being paced.
    next_slot: Option<Instant>,
    /// The step of the latest reservation (for new requests joining the schedule).
    step: Duration,
}

/// A reserved admission slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// When the request may be sent.
    pub(crate) at: Instant,
    /// The first free slot after this one.
    next: Instant,
}

/// Penalty streaks and pacing schedules, shared by a layer and every service it builds.
#[derive(Debug, Default)]
pub(crate) struct Pacer {
    entries: Mutex<HashMap<QuotaKey, Entry>>,
    /// Whether `entries` holds anything, written under its lock after every change. Every
    /// request asks the pacer twice (its admission, its success) and almost always finds it
    /// empty (no 429 seen): read without taking the lock, those two questions cost two loads
    /// instead of two lock round trips (four locked instructions per request).
    held: AtomicBool,
}

impl Pacer {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<QuotaKey, Entry>) -> R) -> R {
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let result = f(&mut map);
        self.held.store(!map.is_empty(), Ordering::Release);
        result
    }

    /// Whether nothing is held (no 429 seen, or all forgotten). A change made under the lock
    /// by another thread and not seen yet is one that could as well have come after this
    /// question: the lock gives no stronger order.
    pub(crate) fn idle(&self) -> bool {
        !self.held.load(Ordering::Acquire)
    }

    /// Forgets `key` when it holds nothing worth keeping.
    fn tidy(map: &mut HashMap<QuotaKey, Entry>, key: &QuotaKey, now: Instant) {
        if map
            .get(key)
            .is_some_and(|e| e.streak == 0 && e.next_slot.is_none_or(|s| s <= now))
        {
            map.remove(key);
        }
    }

    fn level_of(entry: &Entry) -> u32 {
        entry.streak.saturating_sub(1).min(MAX_PENALTY_LEVEL)
    }

    /// The penalty level of `key`: consecutive 429s beyond the first.
    pub(crate) fn level(&self, key: &QuotaKey) -> u32 {
        self.with(|m| m.get(key).map_or(0, Self::level_of))
    }

    /// A 429 (rate limit, not the spend cap) on `key`.
    pub(crate) fn rate_limited(&self, key: &QuotaKey) {
        self.with(|m| {
            let entry = m.entry(key.clone()).or_default();
            entry.streak = (entry.streak + 1).min(MAX_PENALTY_LEVEL + 1);
        });
    }

    /// A success on `key`.
    pub(crate) fn succeeded(&self, key: &QuotaKey) {
        if self.idle() {
            return;
        }
        self.with(|m| {
            // Nothing held for `key` (no 429 seen): no clock read, nothing to tidy.
            if let Some(entry) = m.get_mut(key) {
                entry.streak = entry.streak.saturating_sub(1);
                Self::tidy(m, key, Instant::now());
            }
        });
    }

    /// Reserves the first free slot at or after `earliest` for a rate-limited request whose
    /// quota admits one request per `admission`. `None`, reserving nothing, when that slot is
    /// after `deadline`.
    pub(crate) fn reserve(
        &self,
        key: &QuotaKey,
        earliest: Instant,
        admission: Duration,
        deadline: Option<Instant>,
    ) -> Option<Slot> {
        self.with(|m| {
            let entry = m.entry(key.clone()).or_default();
            let at = match entry.next_slot {
                Some(next) if next > earliest => next,
                _ => earliest,
            };
            if deadline.is_some_and(|d| at > d) {
                return None;
            }
            // 10 % margin, doubled per penalty level: 1.1, 1.2, 1.4, 1.8, 2.6 x admission.
            let margin = 0.1 * f64::from(1u32 << Self::level_of(entry));
            let step = admission.mul_f64(1.0 + margin);
            let next = at + step;
            entry.next_slot = Some(next);
            entry.step = step;
            Some(Slot { at, next })
        })
    }

    /// For a new request: the slot to wait for when requests on `key` are being paced, `None`
    /// (send at once) otherwise, or when the slot is after `deadline` (then nothing is
    /// reserved, and the request is sent at once: the layer never holds a first attempt past
    /// the deadline).
    pub(crate) fn admit(&self, key: &QuotaKey, deadline: Option<Instant>) -> Option<Slot> {
        if self.idle() {
            return None;
        }
        self.with(|m| {
            // Nothing paced (no 429 seen): no clock read.
            if m.is_empty() {
                return None;
            }
            let now = Instant::now();
            Self::tidy(m, key, now);
            let entry = m.get_mut(key)?;
            let at = entry.next_slot.filter(|s| *s > now)?;
            if deadline.is_some_and(|d| at > d) {
                return None;
            }
            let next = at + entry.step;
            entry.next_slot = Some(next);
            Some(Slot { at, next })
        })
    }

    /// Gives back a reserved slot that will not be used, if no later slot was reserved since.
    pub(crate) fn release(&self, key: &QuotaKey, slot: Slot) {
        self.with(|m| {
            if let Some(entry) = m.get_mut(key) {
                if entry.next_slot == Some(slot.next) {
                    entry.next_slot = Some(slot.at);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> QuotaKey {
        (KeyId::named("k"), RateLimitGroup::new(name))
    }

    #[tokio::test(start_paused = true)]
    async fn penalties_rise_with_429s_and_relax_with_successes() {
        let p = Pacer::default();
        let opus = key("claude-opus-4");
        let haiku = key("claude-haiku-4");
        for _ in 0..10 {
            p.rate_limited(&opus);
        }
        assert_eq!(p.level(&opus), MAX_PENALTY_LEVEL);
        assert_eq!(p.level(&haiku), 0);
        p.succeeded(&opus);
        assert_eq!(p.level(&opus), MAX_PENALTY_LEVEL - 1);
        let fresh = key("claude-sonnet-4");
        p.rate_limited(&fresh);
        assert_eq!(p.level(&fresh), 0, "a single 429 costs nothing");
        p.rate_limited(&fresh);
        assert_eq!(p.level(&fresh), 1);
        for _ in 0..10 {
            p.succeeded(&opus);
        }
        assert_eq!(p.level(&opus), 0);
        assert!(!p.entries.lock().unwrap().contains_key(&opus), "forgotten");
    }

    /// The unlocked emptiness test follows the map: filled by a 429, emptied when the
    /// streak is forgotten, filled again by the next one (a schedule is then seen again).
    #[tokio::test(start_paused = true)]
    async fn the_idle_test_follows_the_map() {
        let p = Pacer::default();
        let k = key("claude-opus-4");
        assert!(p.idle());
        p.rate_limited(&k);
        assert!(!p.idle());
        p.succeeded(&k);
        assert!(p.idle(), "forgotten");
        assert_eq!(p.level(&k), 0);
        let now = Instant::now();
        let second = Duration::from_secs(1);
        let slot = p.reserve(&k, now + second, second, None).unwrap();
        assert!(!p.idle());
        assert_eq!(p.admit(&k, None).unwrap().at, slot.next);
        p.rate_limited(&k);
        p.rate_limited(&k);
        p.succeeded(&k);
        assert_eq!(p.level(&k), 0, "a success seen while the map was held");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_distinct_slots_one_step_apart() {
        let p = Pacer::default();
        let k = key("claude-opus-4");
        let now = Instant::now();
        let second = Duration::from_secs(1);
        let slots: Vec<Slot> = (0..5)
            .map(|_| p.reserve(&k, now + second, second, None).unwrap())
            .collect();
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(slot.at, now + second + second.mul_f64(1.1) * i as u32);
        }
        // A later server delay is honoured even when the schedule is earlier.
        let late = p
            .reserve(&k, now + Duration::from_secs(30), second, None)
            .unwrap();
        assert_eq!(late.at, now + Duration::from_secs(30));
        // Another group is not affected.
        assert!(p.admit(&key("claude-haiku-4"), None).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn new_requests_join_the_schedule_until_it_drains() {
        let p = Pacer::default();
        let k = key("claude-opus-4");
        let now = Instant::now();
        let step = Duration::from_millis(500);
        let first = p.reserve(&k, now + step, step, None).unwrap();
        let joined = p.admit(&k, None).unwrap();
        assert_eq!(joined.at, first.next);
        // Not past a deadline: nothing reserved, sent at once.
        assert!(p.admit(&k, Some(now)).is_none());
        assert!(p.reserve(&k, now, step, Some(now)).is_none());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(p.admit(&k, None).is_none(), "the schedule has drained");
    }

    #[tokio::test(start_paused = true)]
    async fn the_streak_widens_the_step() {
        let p = Pacer::default();
        let k = key("claude-opus-4");
        let now = Instant::now();
        let admission = Duration::from_secs(1);
        for _ in 0..3 {
            p.rate_limited(&k);
        }
        // Level 2: margin 40 %.
        let a = p.reserve(&k, now, admission, None).unwrap();
        assert_eq!(a.next - a.at, Duration::from_millis(1400));
    }

    #[tokio::test(start_paused = true)]
    async fn released_slots_are_reused() {
        let p = Pacer::default();
        let k = key("claude-opus-4");
        let now = Instant::now();
        let second = Duration::from_secs(1);
        let a = p.reserve(&k, now + second, second, None).unwrap();
        p.release(&k, a);
        let b = p.reserve(&k, now + second, second, None).unwrap();
        assert_eq!(a, b);
    }
}
