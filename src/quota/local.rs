//! The in-process backend of the quota board: a map of `(key, group)` entries behind one mutex.
//!
//! The mutex is never held across an `.await` or while calling user code; every operation is a
//! few arithmetic steps, so a plain `std::sync::Mutex` is faster than an async lock here.

use std::collections::{HashMap, VecDeque};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::bucket::TokenBucket;
use super::types::{BucketHeadroom, Cost, Headroom, Limits, QuotaStatus};
use crate::anthropic::{BucketSnapshot, KeyId, RateLimitGroup, RateLimitSnapshot};
use crate::tenant::Tenant;
use crate::tenant::fair::FairQueue;

/// `(key id, rate-limit group)`.
pub(crate) type EntryKey = (KeyId, RateLimitGroup);

/// An [`EntryKey`] borrowed: looks an entry up without cloning the two names (two reference
/// counts up and down per lookup, several lookups per request). Hashes as the tuple does
/// (each field in order), so it finds what the tuple finds.
#[derive(Hash)]
struct EntryRef<'a>(&'a KeyId, &'a RateLimitGroup);

impl hashbrown::Equivalent<EntryKey> for EntryRef<'_> {
    fn equivalent(&self, key: &EntryKey) -> bool {
        *self.0 == key.0 && *self.1 == key.1
    }
}

impl From<&EntryRef<'_>> for EntryKey {
    fn from(key: &EntryRef<'_>) -> Self {
        (key.0.clone(), key.1.clone())
    }
}

/// Index of the requests, input tokens and output tokens buckets.
const REQUESTS: usize = 0;
const INPUT: usize = 1;
const OUTPUT: usize = 2;

/// No raise from the headers for this long after the server refused a request.
const RAISE_PAUSE: Duration = Duration::from_secs(60);

/// How long requests wait behind the probe that learns unknown limits before they are sent
/// without limits (its answer may take long, or never come): one after this grace, then
/// twice as many each grace after (see [`Entry::check`]).
const PROBE_GRACE: Duration = Duration::from_secs(2);

/// How many probe graces have passed for a probe out `since`: behind it, `2^steps - 1`
/// requests in all may have been let through blind (see [`Entry::check`]).
fn blind_steps(since: Duration) -> u32 {
    (since.as_nanos() / PROBE_GRACE.as_nanos()).min(63) as u32
}

/// Token `remaining` headers are rounded down to thousands: the true level is in
/// `[R, R + TOKEN_ROUNDING]`.
const TOKEN_ROUNDING: u64 = 999;

/// What a granted reservation took from each bucket (`None`: the bucket was unknown then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) charged: [Option<u64>; 3],
    /// This request is the one probe sent to learn unknown limits.
    pub(crate) probe: bool,
    /// Which store holds the reservation (the Redis backend settles its grants in Redis).
    pub(crate) origin: Origin,
    /// The store's `settled` counters when this grant was taken (see
    /// [`Ledger`]): what was settled after it is subtracted from a raise its answer allows.
    pub(crate) mark: [u64; 3],
    /// The store's `returned` counters when this grant was taken (see [`Ledger`]): what
    /// was given back after it may be missing from its answer's `remaining`.
    pub(crate) returned: [u64; 3],
    /// When this grant was taken (this process's clock): the server's `remaining` in its
    /// answer is from no earlier, so the bucket refilled at most since then.
    pub(crate) at: Instant,
    /// The headers of its answer were observed already (the server has seen the request):
    /// it has left the ledger's `unanswered` units.
    pub(crate) answered: bool,
    /// The grant's id in the store (`0`: none, an in-process grant): a Redis grant settles
    /// once by it, even when its settle is sent again.
    pub(crate) id: i64,
    /// Taken blind, while the limits were unknown (the probe, or a request let through after
    /// the probe grace): its number among the entry's blind grants (`0`: not blind). Once the
    /// limits are learned the entry charges what it holds to the new buckets and keeps that
    /// here by this number ([`Blind`]): `charged` above stays `None`.
    pub(crate) blind: u64,
    /// The entry it was taken from, in its backend's [`Entries`] (`None`: a grant of a
    /// shared store): its answer and settle find it without hashing the key again.
    pub(crate) entry: Option<EntryId>,
}

/// Where an entry lives in a backend's [`Entries`], and which one it is there (a slot's
/// entries are numbered): a grant carries it from its take to its settle (issue 14, the
/// board's cost per request: a look-up hashed the key id and the group name, ~165
/// instructions, at every step of a request). An entry with a grant out is never evicted,
/// so the id of a grant is valid until the grant settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryId {
    index: u32,
    generation: u32,
}

/// The entries of a backend: a slab of entries (each with its key) and an index from
/// `(key, group)` to its slot. Looked up by key like a map, or by [`EntryId`] in one step.
#[derive(Debug, Default)]
struct Entries {
    index: hashbrown::HashMap<EntryKey, EntryId>,
    slots: Vec<EntrySlot>,
    /// Slots without an entry.
    free: Vec<u32>,
    /// The last `(key, group)` found through `index`, as the shared strings it was asked
    /// with, and its entry: a request's look, take and answer ask for the same two `Arc`s
    /// (its key id's memo, its catalogue entry's group), which two pointer tests find here
    /// instead of hashing both names and comparing them (issue 14, sixteenth pass: ~170
    /// instructions a look-up). Checked against its slot before use (an entry removed since
    /// has another generation), so it is only ever a shortcut to what `index` says.
    last: Option<(EntryKey, EntryId)>,
}

#[derive(Debug)]
struct EntrySlot {
    generation: u32,
    entry: Option<(EntryKey, Entry)>,
}

impl Entries {
    fn len(&self) -> usize {
        self.index.len()
    }

    /// The entry of `k`: the last one found when `k` holds the same two shared strings (and
    /// that entry is still in its slot), else looked up in `index` and remembered.
    fn id(&mut self, k: &EntryRef<'_>) -> Option<EntryId> {
        if let Some(((key, group), id)) = &self.last {
            if key.same(k.0) && group.same(k.1) && self.by_id(*id).is_some() {
                return Some(*id);
            }
        }
        let id = self.index.get(k).copied()?;
        self.last = Some(((k.0.clone(), k.1.clone()), id));
        Some(id)
    }

    fn contains_key<Q>(&self, k: &Q) -> bool
    where
        Q: std::hash::Hash + hashbrown::Equivalent<EntryKey> + ?Sized,
    {
        self.index.contains_key(k)
    }

    fn by_id(&self, id: EntryId) -> Option<&Entry> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.entry.as_ref().map(|(_, e)| e)
    }

    fn by_id_mut(&mut self, id: EntryId) -> Option<&mut Entry> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.entry.as_mut().map(|(_, e)| e)
    }

    #[cfg(feature = "redis")]
    fn get<Q>(&self, k: &Q) -> Option<&Entry>
    where
        Q: std::hash::Hash + hashbrown::Equivalent<EntryKey> + ?Sized,
    {
        self.by_id(self.index.get(k).copied()?)
    }

    fn get_mut(&mut self, k: &EntryRef<'_>) -> Option<&mut Entry> {
        let id = self.id(k)?;
        self.by_id_mut(id)
    }

    /// The entry of `id` when it is valid, else of `k`.
    fn by_id_or_key(&mut self, id: Option<EntryId>, k: &EntryRef<'_>) -> Option<&mut Entry> {
        let id = id
            .filter(|id| self.by_id(*id).is_some())
            .or_else(|| self.id(k))?;
        self.by_id_mut(id)
    }

    fn insert(&mut self, key: EntryKey, mut entry: Entry) -> EntryId {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(EntrySlot {
                    generation: 0,
                    entry: None,
                });
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let slot = &mut self.slots[index as usize];
        let id = EntryId {
            index,
            generation: slot.generation,
        };
        entry.id = Some(id);
        slot.entry = Some((key.clone(), entry));
        self.index.insert(key, id);
        id
    }

    fn free_slot(slots: &mut [EntrySlot], free: &mut Vec<u32>, id: EntryId) -> Option<Entry> {
        let slot = slots.get_mut(id.index as usize)?;
        let (_, entry) = slot.entry.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        free.push(id.index);
        Some(entry)
    }

    fn remove<Q>(&mut self, k: &Q) -> Option<Entry>
    where
        Q: std::hash::Hash + hashbrown::Equivalent<EntryKey> + ?Sized,
    {
        let id = self.index.remove(k)?;
        Self::free_slot(&mut self.slots, &mut self.free, id)
    }

    fn iter(&self) -> impl Iterator<Item = (&EntryKey, &Entry)> {
        self.slots
            .iter()
            .filter_map(|s| s.entry.as_ref().map(|(k, e)| (k, e)))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&EntryKey, &mut Entry)> {
        self.slots
            .iter_mut()
            .filter_map(|s| s.entry.as_mut().map(|(k, e)| (&*k, e)))
    }

    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        let Self {
            index, slots, free, ..
        } = self;
        index.retain(|_, id| {
            let kept = slots
                .get(id.index as usize)
                .and_then(|s| s.entry.as_ref())
                .is_some_and(|(_, e)| keep(e));
            if !kept {
                Self::free_slot(slots, free, *id);
            }
            kept
        });
    }
}

/// A grant taken blind (see [`Grant::blind`]), until it settles: its cost, and what it was
/// charged once the limits were learned (issue 12, seventh pass). Without this, the requests
/// let through behind a slow probe were in no bucket and no ledger: their refunds never
/// reached the board, and a raise could not subtract them.
#[derive(Debug, Clone, Copy)]
struct Blind {
    number: u64,
    cost: Cost,
    at: Instant,
    /// `None` until the limits are learned.
    charged: Option<[Option<u64>; 3]>,
    /// The shared store (Redis) holds it too: its settle goes there as well.
    in_store: bool,
    /// Its answer taught the limits: the server's count the bucket started from holds its
    /// real input, so its input settles at what it was charged (neither the estimate's
    /// excess given back nor a shortfall taken again); its output reservation is given back
    /// as any grant's.
    counted: bool,
}

/// How long a request may take to reach the server after it was admitted here: past it, a
/// request whose answer has not arrived counts as taken by the server (see
/// [`Ledger::unanswered`]). A non-streaming answer's headers come only with the whole
/// answer, minutes later for a long one; without this bound its reservation kept the
/// bucket's refill down all that time (issue 12). It must not be shorter than the real send
/// delay, or the board may count refill the server lost (`tests/quota_props.rs` sends within
/// 2 s).
pub(crate) const SEND_GRACE: Duration = Duration::from_secs(2);

/// One look at a `(key, group)` for a cost: what [`QuotaBoard::headroom`],
/// [`QuotaBoard::fits_now`] and [`QuotaBoard::time_until_fits`] return, taken from one entry
/// lookup (fallback weighs each candidate model with all three, the key pool each key).
///
/// [`QuotaBoard::headroom`]: super::QuotaBoard::headroom
/// [`QuotaBoard::fits_now`]: super::QuotaBoard::fits_now
/// [`QuotaBoard::time_until_fits`]: super::QuotaBoard::time_until_fits
#[derive(Debug, Clone)]
pub(crate) struct QuotaLook {
    /// The two figures of [`QuotaBoard::headroom`](super::QuotaBoard::headroom) a view
    /// weighs: `None` while no limit is known.
    pub(crate) room: Option<Room>,
    /// As [`QuotaBoard::fits_now`](super::QuotaBoard::fits_now).
    pub(crate) fits: bool,
    /// As [`QuotaBoard::time_until_fits`](super::QuotaBoard::time_until_fits).
    pub(crate) wait: Option<Duration>,
}

/// [`Headroom::fraction`] and [`Headroom::full_in`] without the per-bucket detail (the rest
/// of a [`Headroom`] costs a `Duration` conversion per bucket, and nobody weighing a view
/// reads it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Room {
    pub(crate) fraction: f64,
    pub(crate) full_in: Duration,
}

/// The refill (units, rounded down) a server bucket of `rate` units a second certainly had
/// between its count of a request admitted here `elapsed` ago and that request's answer,
/// arriving now: the server counted it at the latest [`SEND_GRACE`] after it was admitted,
/// so whatever it refilled after that moment is certain; what it refilled before may
/// already be in the answer's `remaining` (the count can be as late as the answer itself:
/// nothing bounds the time between the server's count and its answer from below, so the
/// refill of a quick answer is never certain). Issue 12, sixth pass: crediting the refill of
/// the whole answer time overshoots (`tests/quota_props.rs`,
/// `the_raise_credits_no_refill_the_server_may_not_have_had`).
pub(crate) fn certain_refill(elapsed: Duration, bucket: &TokenBucket) -> u64 {
    bucket.refill_in(elapsed.saturating_sub(SEND_GRACE))
}

/// What a `(key, group)` has handed out, for upward reconciliation (raising a local level to
/// the server's view without counting work in flight twice).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Ledger {
    /// Units held by grants not settled yet.
    pub(crate) held: [u64; 3],
    /// Units settled grants finally cost (monotonic).
    pub(crate) settled: [u64; 3],
    /// Units settled grants gave back: what they held minus what they finally cost
    /// (monotonic).
    pub(crate) returned: [u64; 3],
    /// Units held by grants whose answer has not arrived: the server may not have taken them
    /// yet. Its bucket cannot refill above its capacity, so ours does not refill above the
    /// capacity minus these (else a bucket full upstream while our take was on its way would
    /// lose refill there that we would count here: a drift above the server's level).
    /// A grant leaves them when its answer arrives or [`SEND_GRACE`] after it was taken,
    /// whichever comes first.
    pub(crate) unanswered: [u64; 3],
    /// The grants counted in `unanswered`, oldest first: when each leaves by the grace (its
    /// take plus [`SEND_GRACE`], computed once at the take rather than at every refill) and
    /// what it holds (a grant is known by both: two grants alike are interchangeable here).
    in_transit: VecDeque<(Instant, [u64; 3])>,
}

impl Ledger {
    fn take(&mut self, charged: &[Option<u64>; 3], now: Instant) {
        let amounts = charged.map(|c| c.unwrap_or(0));
        for (i, c) in amounts.into_iter().enumerate() {
            self.held[i] = self.held[i].saturating_add(c);
            self.unanswered[i] = self.unanswered[i].saturating_add(c);
        }
        self.in_transit.push_back((now + SEND_GRACE, amounts));
    }

    /// A grant taken blind at `at` (nothing held then) now holds `charged`: held, and in
    /// transit still if it had not left by its answer or the grace.
    fn charge_blind(&mut self, at: Instant, charged: &[Option<u64>; 3]) {
        let amounts = charged.map(|c| c.unwrap_or(0));
        let leaves = at + SEND_GRACE;
        for (h, c) in self.held.iter_mut().zip(amounts) {
            *h = h.saturating_add(c);
        }
        let in_transit = self
            .in_transit
            .iter_mut()
            .find(|(t, a)| *t == leaves && *a == [0; 3]);
        if let Some((_, a)) = in_transit {
            *a = amounts;
            for (u, c) in self.unanswered.iter_mut().zip(amounts) {
                *u = u.saturating_add(c);
            }
        }
    }

    /// The answer to `grant` arrived (nothing when it left `unanswered` by the grace).
    fn answer(&mut self, grant: &Grant) {
        let amounts = grant.charged.map(|c| c.unwrap_or(0));
        let leaves = grant.at + SEND_GRACE;
        // Answers mostly come in the order of the takes: the oldest first.
        if self.in_transit.front() == Some(&(leaves, amounts)) {
            self.in_transit.pop_front();
            return self.leave_transit(amounts);
        }
        let found = self
            .in_transit
            .iter()
            .position(|(t, a)| *t == leaves && *a == amounts);
        if let Some(at) = found {
            self.in_transit.remove(at);
            self.leave_transit(amounts);
        }
    }

    fn leave_transit(&mut self, amounts: [u64; 3]) {
        for (u, c) in self.unanswered.iter_mut().zip(amounts) {
            *u = u.saturating_sub(c);
        }
    }

    /// When the oldest grant in transit reaches the server by the grace.
    fn next_arrival(&self) -> Option<Instant> {
        self.in_transit.front().map(|(leaves, _)| *leaves)
    }

    /// The oldest grant in transit has had the grace to reach the server.
    fn arrive_first(&mut self) {
        if let Some((_, amounts)) = self.in_transit.pop_front() {
            self.leave_transit(amounts);
        }
    }

    /// A grant ends, finally costing `cost` (per bucket).
    fn settle(&mut self, grant: &Grant, cost: [u64; 3]) {
        if !grant.answered {
            self.answer(grant);
        }
        let charged = &grant.charged;
        for i in 0..3 {
            if let Some(c) = charged[i] {
                self.held[i] = self.held[i].saturating_sub(c);
                self.settled[i] = self.settled[i].saturating_add(cost[i]);
                self.returned[i] = self.returned[i].saturating_add(c.saturating_sub(cost[i]));
            }
        }
    }

    /// The lowest level bucket `i` can have when the answer to `grant` (not settled yet)
    /// showed `remaining`: the server's count, plus the refill it certainly had since
    /// (`certain_refill`, see [`certain_refill`]; at most up to the capacity `cap`), minus
    /// everything held now but that grant (which the server took before it answered: its
    /// count includes it) — anything admitted before or after it may not have reached the
    /// server yet — and everything settled since that grant was taken. `None` when that is
    /// below zero: the answer proves nothing, not even an empty bucket (a level in debt, as
    /// after the blind grants are charged, stays in debt; a floor clamped to 0 raised it).
    pub(crate) fn floor(
        &self,
        i: usize,
        remaining: u64,
        certain_refill: u64,
        cap: u64,
        grant: &Grant,
    ) -> Option<u64> {
        let since = self.settled[i].saturating_sub(grant.mark[i]);
        let own = grant.charged[i].unwrap_or(0);
        let others = self.held[i].saturating_sub(own);
        let counted = remaining
            .saturating_add(certain_refill)
            .min(cap.max(remaining));
        counted.checked_sub(others)?.checked_sub(since)
    }

    /// How far above an answer's `remaining` bucket `i` may be, with no other client of the
    /// key, when that answer is to the grant with mark `returned` taken `elapsed_secs` ago: what
    /// settled grants gave back since (the server's count may predate the refunds) and what the
    /// bucket (`rate` units a second, `cap` at most) refilled since. A level above
    /// `remaining + rounding + slack` proves that someone else used the quota; a level within
    /// it is only an older view of ours.
    pub(crate) fn slack(
        &self,
        i: usize,
        returned: &[u64; 3],
        elapsed_secs: f64,
        rate: f64,
        cap: u64,
    ) -> u64 {
        let given_back = self.returned[i].saturating_sub(returned[i]);
        let refill = (rate * elapsed_secs).ceil().min(cap as f64) as u64;
        given_back.saturating_add(refill)
    }
}

impl Outcome {
    /// What a grant that held `charged` finally costs, per bucket.
    pub(crate) fn final_cost(&self, charged: &[Option<u64>; 3]) -> [u64; 3] {
        let c = charged.map(|c| c.unwrap_or(0));
        match self {
            Outcome::Refund => [0; 3],
            Outcome::Actual(actual) => actual.as_array(),
            Outcome::Rejected | Outcome::Unknown => [c[0], 0, 0],
            Outcome::Keep | Outcome::Served => c,
        }
    }
}

/// Where a [`Grant`] was taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Origin {
    /// This process's buckets.
    #[default]
    Local,
    /// The shared (Redis) buckets.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Shared,
}

/// How a reservation ends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    /// The request never reached the server: give everything back.
    Refund,
    /// The real cost.
    Actual(Cost),
    /// Dropped unsettled: keep what was reserved (the request may or may not have reached
    /// the server; nothing is known about it).
    Keep,
    /// The server answered with a success but the real cost is unknown: keep what was
    /// reserved.
    Served,
    /// The server answered with an error status: the request unit counts, tokens do not, and
    /// nothing is learned about the limits.
    Rejected,
    /// As `Rejected`, and the status (401, 403, 404) says the server does not know the key or
    /// the model: an entry never served is dropped.
    Unknown,
}

pub(crate) enum Check {
    Ready,
    Wait(Duration),
    TooLarge,
}

pub(crate) enum Enqueued {
    Granted(Grant),
    Queued(u64),
    TooLarge,
}

pub(crate) enum WaitPoll {
    Granted(Grant),
    TooLarge,
    /// Still waiting; wake up at this instant at the latest (head of the queue only).
    Pending(Option<Instant>),
    TimedOut(Option<Duration>),
    /// The limits are known now and a shared store holds the buckets: take the quota there
    /// (the waiter has left the queue).
    Released,
}

#[derive(Debug)]
struct Slot {
    bucket: TokenBucket,
    configured: bool,
}

impl Slot {
    fn new(bucket: TokenBucket, configured: bool) -> Self {
        Self { bucket, configured }
    }

    /// Re-seeds from a server `remaining` of `r`, exact within `rounding` above.
    fn observe_remaining(&mut self, r: u64, rounding: u64, now: Instant) {
        // Only a level above the range proves that someone else used the quota; the bucket
        // is contended then, so take the low end.
        if self.bucket.above(r.saturating_add(rounding), now) {
            self.bucket.lower_to(r, now);
        }
    }
}

/// How a wait ended, kept until its waiter polls.
#[derive(Debug)]
enum Decided {
    Granted(Grant),
    TooLarge,
    /// Handed over to the shared store (see [`WaitPoll::Released`]).
    Released,
}

#[derive(Debug)]
struct Waiter {
    cost: Cost,
    waker: Option<Waker>,
}

impl Waiter {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

#[derive(Debug)]
struct Entry {
    slots: [Option<Slot>; 3],
    /// A probe completed and the server sent no limits: nothing to enforce.
    unlimited: bool,
    /// A probe is in flight (limits unknown: one request at a time until they are learned).
    probe_out: bool,
    /// When the probe out was sent.
    probe_since: Instant,
    /// Requests let through blind behind the probe out (after the probe grace), bounded by
    /// the ramp of [`Entry::check`].
    blind_sent: u64,
    snapshot: Option<(RateLimitSnapshot, Instant)>,
    /// Waiting requests, weighted-fair across tenants (FIFO with one tenant).
    queue: FairQueue<Waiter>,
    /// Waits that ended (granted, too large, released), until their waiter polls.
    decided: HashMap<u64, Decided>,
    outstanding: usize,
    last_used: Instant,
    /// The board mirrors a shared store (Redis) that holds the buckets of known limits: this
    /// entry grants locally only while its limits are unknown (the probe) or absent
    /// (unlimited); once they are known, waiters are released to the shared store.
    mirror: bool,
    /// Limits were just learned and the shared store is being seeded with the server's view:
    #[cfg_attr(
        feature = "redis",
        doc = "waiters stay queued until [`LocalBackend::seeded`]."
    )]
    #[cfg_attr(
        not(feature = "redis"),
        doc = "waiters stay queued until `LocalBackend::seeded` (feature `redis`)."
    )]
    seeding: bool,
    /// The entry is known to be real: the upstream answered one of its requests with a
    /// success, or its key has limits of its own. An entry of what a client made up (a model
    /// name, a pass-through key) is dropped when upstream says it does not know it
    /// ([`Outcome::Unknown`]) and it holds nothing, so that such names cannot grow the board.
    vouched: bool,
    /// Held and settled units, for raising levels from the server's view.
    ledger: Ledger,
    /// When the server last refused a request of this entry (an error status): its
    /// `remaining` is not the whole truth then (an acceleration limit, overload), so levels
    /// are not raised for a minute after. A refused blind grant does not count (see
    /// [`Entry::settle`]).
    refused_at: Option<Instant>,
    /// Every bucket was refilled to this instant (none is behind it): a second refill at the
    /// same instant adds nothing (see [`Entry::refill`]). `None` when a bucket may be behind
    /// (one was created at an earlier instant than the last refill's).
    refilled: Option<Instant>,
    /// Grants taken blind and not settled yet (see [`Blind`]), oldest first.
    blind: Vec<Blind>,
    /// The number of the last blind grant.
    blind_taken: u64,
    /// Where it is in its backend's [`Entries`] (`None`: a view's entry, not kept).
    id: Option<EntryId>,
}

impl Entry {
    fn new(limits: Option<Limits>, now: Instant, mirror: bool) -> Self {
        let slots = match limits {
            Some(l) => l
                .as_array()
                .map(|cap| Some(Slot::new(TokenBucket::per_minute(cap, now), true))),
            None => [None, None, None],
        };
        Self {
            slots,
            unlimited: false,
            probe_out: false,
            probe_since: now,
            blind_sent: 0,
            snapshot: None,
            queue: FairQueue::new(),
            decided: HashMap::new(),
            outstanding: 0,
            last_used: now,
            mirror,
            seeding: false,
            vouched: false,
            ledger: Ledger::default(),
            refused_at: None,
            refilled: Some(now),
            blind: Vec::new(),
            blind_taken: 0,
            id: None,
        }
    }

    /// Nothing waits on, is held by or is being learned for this entry.
    fn is_quiet(&self) -> bool {
        self.queue.is_empty()
            && self.decided.is_empty()
            && self.outstanding == 0
            && !self.probe_out
            && !self.seeding
    }

    /// The quota of this entry is taken in the shared store, not here.
    fn defers_to_store(&self) -> bool {
        self.mirror && self.known()
    }

    fn configure(&mut self, limits: Limits, now: Instant) {
        let was_known = self.known();
        for (slot, cap) in self.slots.iter_mut().zip(limits.as_array()) {
            match slot {
                Some(s) => {
                    s.bucket.set_capacity(cap, now);
                    s.configured = true;
                }
                None => *slot = Some(Slot::new(TokenBucket::per_minute(cap, now), true)),
            }
        }
        // `now` may be earlier than the last refill (read before the lock).
        self.refilled = None;
        if !was_known {
            self.charge_blind(0, now);
        }
    }

    fn known(&self) -> bool {
        self.slots.iter().any(Option::is_some)
    }

    fn configured(&self) -> bool {
        self.slots.iter().flatten().any(|s| s.configured)
    }

    /// What `cost` takes from each bucket: the output reservation is clamped to the output
    /// bucket's capacity (it is an estimate; `max_tokens` may exceed the per-minute limit),
    /// and so is anything taken from a bucket whose limit was learned from headers rather
    /// than configured: a learned limit is the server's word of one answer, so a request it
    /// makes impossible waits for a full bucket and asks the server again (whose answer
    /// re-teaches the limit) instead of being refused here for good.
    fn amounts(&self, cost: &Cost) -> [u64; 3] {
        let mut a = cost.as_array();
        for (i, (slot, n)) in self.slots.iter().zip(a.iter_mut()).enumerate() {
            if let Some(s) = slot {
                if i == OUTPUT || !s.configured {
                    *n = (*n).min(s.bucket.capacity());
                }
            }
        }
        a
    }

    fn check(&self, cost: &Cost, now: Instant) -> Check {
        if !self.known() {
            if self.unlimited || !self.probe_out {
                return Check::Ready;
            }
            // Behind the probe, but not for longer than the grace: a slow or hung probe does
            // not hold the others for its whole answer time. Past it, blind: one request, then
            // twice as many each grace after (1, 2, 4, ...: all of a queue of 15 by 8 s), so
            // that an answer a few seconds slow teaches the limits before a whole queue has
            // gone out blind into a bucket it overflows (issue 12, seventh pass: 7 upstream
            // 429s of 200 tasks over HTTP with 3 s answers, the queue let through at once; 0
            // with the ramp).
            let steps = blind_steps(now.saturating_duration_since(self.probe_since));
            return if self.blind_sent < (1u64 << steps) - 1 {
                Check::Ready
            } else {
                let next = self.probe_since + PROBE_GRACE * (steps + 1);
                Check::Wait(next.saturating_duration_since(now))
            };
        }
        let amounts = self.amounts(cost);
        let mut wait = Duration::ZERO;
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(s) = slot {
                match s.bucket.time_until(amounts[i], now) {
                    None => return Check::TooLarge,
                    Some(d) => wait = wait.max(d),
                }
            }
        }
        if wait.is_zero() {
            Check::Ready
        } else {
            Check::Wait(wait)
        }
    }

    fn take(&mut self, cost: &Cost, now: Instant) -> Grant {
        self.take_from(cost, now, true)
    }

    /// [`take`](Self::take) when the buckets as last refilled hold `cost` and nobody waits
    /// (`None` otherwise: refill, check and take as usual), without refilling them to `now`
    /// first (issue 14, the board's cost per request: the fallback's view refilled the entry
    /// a moment before, and a refill is ~270 instructions).
    ///
    /// Exact, not an approximation: the take lowers a level and the refill ceiling
    /// ([`Ledger::unanswered`]) by the same units, so the refill of the time since, taken at
    /// the next refill under the lowered ceiling, ends where a refill before the take would
    /// have: `min(L + a, max(L, C)) - c` either way (`L` the level, `a` the refill, `C` the
    /// ceiling, `c` the take; the capacity is at least `C`). The grace steps of that refill
    /// are lowered alike. A level that does not hold the cost before the refill is refilled
    /// first: a take never puts a bucket in debt here.
    fn take_unrefilled(&mut self, cost: &Cost, now: Instant) -> Option<Grant> {
        if !self.known() || self.has_waiting() {
            return None;
        }
        let amounts = self.amounts(cost);
        let holds = self
            .slots
            .iter()
            .zip(amounts)
            .all(|(slot, n)| slot.as_ref().is_none_or(|s| s.bucket.holds(n)));
        holds.then(|| self.take_from(cost, now, false))
    }

    /// `refill`: refill the buckets to `now` before taking (else the caller checked that
    /// they hold the cost as they are: see [`take_unrefilled`](Self::take_unrefilled)).
    fn take_from(&mut self, cost: &Cost, now: Instant, refill: bool) -> Grant {
        // One probe at a time; requests let through after the probe grace are not probes.
        let probe = !self.known() && !self.unlimited && !self.probe_out;
        if probe {
            self.probe_out = true;
            self.probe_since = now;
            self.blind_sent = 0;
        } else if !self.known() && !self.unlimited {
            self.blind_sent += 1;
            tracing::debug!(
                blind = self.blind_sent,
                probe_out_ms = now.saturating_duration_since(self.probe_since).as_millis() as u64,
                "quota board: let through blind behind a slow probe"
            );
        }
        if refill {
            self.refill(now);
        }
        let amounts = self.amounts(cost);
        let mut charged = [None; 3];
        // By index, as in `settle`: no `zip` state kept in memory.
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(s) = slot {
                let n = amounts[i];
                if refill {
                    s.bucket.force_take(n, now);
                } else {
                    s.bucket.take_as_is(n);
                }
                charged[i] = Some(n);
            }
        }
        self.outstanding += 1;
        self.last_used = now;
        let (mark, returned) = (self.ledger.settled, self.ledger.returned);
        self.ledger.take(&charged, now);
        let blind = if self.known() || self.unlimited {
            0
        } else {
            self.blind_taken += 1;
            self.blind.push(Blind {
                number: self.blind_taken,
                cost: *cost,
                at: now,
                charged: None,
                in_store: false,
                counted: false,
            });
            self.blind_taken
        };
        Grant {
            charged,
            probe,
            origin: Origin::Local,
            mark,
            returned,
            at: now,
            answered: false,
            id: 0,
            blind,
            entry: self.id,
        }
    }

    /// `grant` as the ledger knows it: a blind grant charged since the limits were learned
    /// holds what it was charged then (a copy, made in `copy`); any other grant is returned as
    /// it is, not copied (a grant is 144 bytes, and most are not blind).
    fn effective<'a>(&self, grant: &'a Grant, copy: &'a mut Option<Grant>) -> &'a Grant {
        if grant.blind == 0 {
            return grant;
        }
        let charged = self
            .blind
            .iter()
            .find(|b| b.number == grant.blind)
            .and_then(|b| b.charged);
        match charged {
            Some(charged) => copy.insert(Grant { charged, ..*grant }),
            None => grant,
        }
    }

    /// The limits were just learned: every blind grant not settled yet enters the ledger as
    /// held with its estimated cost (input estimate, `max_tokens` for the output, clamped as
    /// any grant's), and is in transit still if it was taken less than the send grace ago
    /// and not answered. Each is taken from the new buckets too, except `answered` (the
    /// number of the blind grant whose answer taught the limits, `0`: none): the server
    /// counted that one before answering, its `remaining` holds it already. The others may
    /// or may not be in the server's count (sent before or after it): taking them is the
    /// safe side (the next raises give back what was counted twice, since the ledger now
    /// knows them), and their answers settle and refund them like any grant's. The answered
    /// one's input settles at its estimate ([`Blind::counted`]).
    fn charge_blind(&mut self, answered: u64, now: Instant) {
        let mut blind = std::mem::take(&mut self.blind);
        for b in blind.iter_mut().filter(|b| b.charged.is_none()) {
            let amounts = self.amounts(&b.cost);
            let mut charged = [None; 3];
            for ((slot, n), c) in self.slots.iter_mut().zip(amounts).zip(charged.iter_mut()) {
                if let Some(s) = slot {
                    if b.number != answered {
                        s.bucket.force_take(n, now);
                    }
                    *c = Some(n);
                }
            }
            self.ledger.charge_blind(b.at, &charged);
            b.charged = Some(charged);
            b.counted = b.number == answered;
        }
        if !blind.is_empty() {
            tracing::debug!(
                blind = blind.len(),
                "quota board: limits learned, the grants let through blind are charged"
            );
        }
        self.blind = blind;
    }

    /// Refills every bucket, not above its capacity minus the units of grants whose answer
    /// has not arrived (see [`Ledger::unanswered`]). A grant that had the send grace holds
    /// the ceiling down until then, not after: the refill is taken in steps.
    ///
    /// A call refills and then takes, drains or settles at the same instant, which refills
    /// again: that second refill is skipped (a bucket refilled to `now` gains nothing more at
    /// `now`, whatever the ceiling), but not the grants that reached the server by then.
    fn refill(&mut self, now: Instant) {
        while let Some(at) = self.ledger.next_arrival().filter(|at| *at <= now) {
            self.refill_below_ceiling(at);
            self.ledger.arrive_first();
        }
        if self.refilled != Some(now) {
            self.refill_below_ceiling(now);
            self.refilled = Some(now);
        }
    }

    fn refill_below_ceiling(&mut self, now: Instant) {
        // The buckets are refilled together: the time since their last refill, computed once
        // (a bucket refilled at another instant computes its own).
        let Some(from) = self
            .slots
            .iter()
            .flatten()
            .next()
            .map(|s| s.bucket.updated())
        else {
            return;
        };
        // Time that did not move adds nothing (a step to an answer an operation since has
        // refilled past, say): no elapsed time to compute.
        let nanos = if now > from {
            u64::try_from(now.duration_since(from).as_nanos()).unwrap_or(u64::MAX)
        } else {
            0
        };
        for (slot, u) in self.slots.iter_mut().zip(self.ledger.unanswered) {
            if let Some(s) = slot {
                s.bucket.refill_after(from, nanos, u, now);
            }
        }
    }

    /// Settles `grant`; returns what it holds in the shared store and how it settles there
    /// when it is a blind grant the store was charged for (see
    /// `LocalBackend::blind_to_store`, with the `redis` feature): its settle goes there too.
    fn settle(
        &mut self,
        grant: &Grant,
        outcome: Outcome,
        now: Instant,
    ) -> Option<([Option<u64>; 3], Outcome)> {
        // Time passed under the old ledger; the refunds below under the new one.
        self.refill(now);
        let mut copy = None;
        let grant = self.effective(grant, &mut copy);
        let mut outcome = outcome;
        let mut in_store = None;
        if grant.blind != 0 {
            in_store = self.settle_blind(grant, &mut outcome);
        }
        let cost = outcome.final_cost(&grant.charged);
        self.ledger.settle(grant, cost);
        let given_back: [Option<u64>; 3] = match outcome {
            Outcome::Refund => grant.charged,
            Outcome::Actual(actual) => {
                // Loops over the three buckets by index: chains of `zip` over arrays were
                // kept as iterator state in memory (~300 instructions of this function's
                // ~680 per settle, callgrind).
                let real = actual.as_array();
                for (i, slot) in self.slots.iter_mut().enumerate() {
                    if let (Some(s), Some(c)) = (slot, grant.charged[i]) {
                        if real[i] > c {
                            s.bucket.force_take(real[i] - c, now);
                        }
                    }
                }
                std::array::from_fn(|i| grant.charged[i].map(|c| c.saturating_sub(real[i])))
            }
            Outcome::Rejected | Outcome::Unknown => [None, grant.charged[1], grant.charged[2]],
            Outcome::Keep | Outcome::Served => [None; 3],
        };
        let unanswered = self.ledger.unanswered;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let (Some(s), Some(n)) = (slot, given_back[i]) {
                // The server's bucket, full, may not have taken a refund whole either.
                s.bucket.refund_below_held(n, unanswered[i], now);
            }
        }
        if matches!(outcome, Outcome::Actual(_) | Outcome::Served) {
            self.vouched = true;
        }
        // A refused blind grant was sent without knowing the limits: its refusal says the
        // burst behind a slow probe did not fit, not that the server's `remaining` misleads
        // (the reason for the pause), and the ledger holds the other blind grants, so a raise
        // subtracts them (issue 12, seventh pass).
        if matches!(outcome, Outcome::Rejected | Outcome::Unknown) && grant.blind == 0 {
            self.refused_at = Some(now);
        }
        if grant.probe {
            // A probe dropped before its answer (`Keep`), refused or refunded teaches nothing:
            // the next request probes.
            self.probe_out = false;
            if matches!(outcome, Outcome::Actual(_) | Outcome::Served) && !self.known() {
                // The server answered without any limit header: nothing to learn, stop probing.
                self.unlimited = true;
            }
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        self.last_used = now;
        in_store
    }

    /// The blind part of [`settle`](Self::settle) (a grant taken before the limits were
    /// known: rare once they are): forgets the blind grant, whose outcome then counts the
    /// input it was charged, and gives what the shared store holds of it. Out of line: the
    /// settle of every answer stays short.
    #[cold]
    #[inline(never)]
    fn settle_blind(
        &mut self,
        grant: &Grant,
        outcome: &mut Outcome,
    ) -> Option<([Option<u64>; 3], Outcome)> {
        let at = self.blind.iter().position(|b| b.number == grant.blind)?;
        let b = self.blind.remove(at);
        if let (true, Outcome::Actual(actual), Some(input)) =
            (b.counted, *outcome, grant.charged[INPUT])
        {
            *outcome = Outcome::Actual(Cost {
                input_tokens: input,
                ..actual
            });
        }
        b.charged.filter(|_| b.in_store).map(|c| (c, *outcome))
    }

    /// `share`: the part of a learned limit this board may use (see
    /// `QuotaBoardBuilder::local_share`). `answered`: the grant of this store whose
    /// successful answer carried `snap`, if any: its view may predate the refunds of other
    /// answers and the refill since, which then lower nothing (see [`Ledger::slack`]).
    fn observe(
        &mut self,
        snap: &RateLimitSnapshot,
        share: f64,
        answered: Option<&Grant>,
        now: Instant,
    ) {
        self.refill(now);
        let mut copy = None;
        let answered = answered.map(|g| self.effective(g, &mut copy));
        if let Some(g) = answered.filter(|g| !g.answered) {
            self.ledger.answer(g);
        }
        let was_known = self.known();
        // The time since the answered grant was taken, read once for the three buckets (a
        // clock subtraction per bucket before: ~40 instructions each).
        let since_grant = answered.map(|g| now.saturating_duration_since(g.at).as_secs_f64());
        let views: [&BucketSnapshot; 3] = [&snap.requests, &snap.input_tokens, &snap.output_tokens];
        for (i, (slot, view)) in self.slots.iter_mut().zip(views).enumerate() {
            let rounding = if i == REQUESTS { 0 } else { TOKEN_ROUNDING };
            match slot {
                Some(s) => {
                    if !s.configured {
                        if let Some(limit) = view.limit {
                            let limit = shared(limit, share);
                            if limit != s.bucket.capacity() {
                                s.bucket.set_capacity(limit, now);
                            }
                        }
                    }
                    if let Some(r) = view.remaining {
                        // Never raise our level from the server's view here (it cannot see
                        // our reservations still in flight; see `raise`). A rounded token
                        // count `R` means a true level in `[R, R + 999]`, and the answer to
                        // one of our grants may predate refunds and refill since it was
                        // taken: only a level above all that proves that someone else used
                        // the quota. The request count too (issue 12, ninth pass): lowering a
                        // fractional level to the whole count of every answer kept the board
                        // 1.1-1.3 requests below the server's from mid-run on. (Its exact rule
                        // was a margin against float ties with the server's arithmetic; the
                        // buckets' arithmetic is exact now.)
                        let slack = answered.zip(since_grant).map_or(0, |(g, secs)| {
                            let (rate, cap) = (s.bucket.rate_per_sec(), s.bucket.capacity());
                            self.ledger.slack(i, &g.returned, secs, rate, cap)
                        });
                        s.observe_remaining(r, rounding.saturating_add(slack), now);
                    }
                }
                None => {
                    if let Some(limit) = view.limit {
                        let mut bucket = TokenBucket::per_minute(shared(limit, share), now);
                        if let Some(r) = view.remaining {
                            // A fresh bucket starts from the low end of the rounded value.
                            bucket.set_level(r, now);
                        }
                        *slot = Some(Slot::new(bucket, false));
                    }
                }
            }
        }
        self.snapshot = Some((*snap, now));
        self.last_used = self.last_used.max(now);
        if !was_known && self.known() {
            self.charge_blind(answered.map_or(0, |g| g.blind), now);
            if self.mirror {
                self.seeding = true;
            }
        }
    }

    /// Raises levels that are below what the answer to `grant` proves is there (see
    /// [`Ledger::floor`]): a limit raised upstream, or another client of the key that stopped.
    fn raise(&mut self, snap: &RateLimitSnapshot, grant: &Grant, now: Instant) {
        let mut copy = None;
        let grant = self.effective(grant, &mut copy);
        if self
            .refused_at
            .is_some_and(|at| now.saturating_duration_since(at) < RAISE_PAUSE)
        {
            return;
        }
        // Read once for the three buckets.
        let elapsed = now.saturating_duration_since(grant.at);
        let views: [&BucketSnapshot; 3] = [&snap.requests, &snap.input_tokens, &snap.output_tokens];
        for (i, (slot, view)) in self.slots.iter_mut().zip(views).enumerate() {
            let (Some(s), Some(r)) = (slot, view.remaining) else {
                continue;
            };
            // Only the same bucket: a configured limit below the server's (a declared part of
            // the key) is not raised to what the server's larger bucket holds.
            if view.limit != Some(s.bucket.capacity()) {
                continue;
            }
            let refill = certain_refill(elapsed, &s.bucket);
            let Some(floor) = self.ledger.floor(i, r, refill, s.bucket.capacity(), grant) else {
                continue;
            };
            if s.bucket.below(floor, now) {
                tracing::debug!(
                    bucket = i,
                    from = s.bucket.level(now),
                    to = floor,
                    "quota board: raising a level to the server's view"
                );
                s.bucket.set_level(floor, now);
            }
        }
    }

    fn has_waiting(&self) -> bool {
        !self.queue.is_empty()
    }

    fn waiting_len(&self) -> usize {
        self.queue.len()
    }

    /// Ends a wait: the waiter leaves the queue, and is woken unless it is the one polling
    /// (`except`).
    fn decide(&mut self, id: u64, decided: Decided, except: Option<u64>) {
        if let Some(mut w) = self.queue.remove(id) {
            if Some(id) != except {
                w.wake();
            }
        }
        self.decided.insert(id, decided);
    }

    /// Grants waiting requests in the queue's order (weighted-fair across tenants, FIFO
    /// within one) while they fit; wakes the ones granted and the new head (so that it
    /// re-arms its timer). `except` is the waiter currently polling, which is not woken.
    fn drain(&mut self, now: Instant, except: Option<u64>) {
        if self.queue.is_empty() {
            // Nothing to grant or release (the refill is lazy: the next operation does it).
            return;
        }
        self.refill(now);
        if self.defers_to_store() {
            // The shared store decides (the order does not span processes anyway); release
            // every waiter once the store holds the learned limits and the server's view.
            if self.seeding {
                return;
            }
            while let Some(id) = self.queue.peek_id() {
                self.decide(id, Decided::Released, except);
            }
            return;
        }
        while let Some((id, cost)) = self.queue.peek().map(|(id, w)| (id, w.cost)) {
            let decided = match self.check(&cost, now) {
                Check::Ready => {
                    let grant = self.take(&cost, now);
                    // Counted against its tenant's turn.
                    if let Some((_, mut w)) = self.queue.pop() {
                        if Some(id) != except {
                            w.wake();
                        }
                    }
                    self.decided.insert(id, Decided::Granted(grant));
                    continue;
                }
                Check::TooLarge => Decided::TooLarge,
                Check::Wait(_) => {
                    if Some(id) != except {
                        if let Some(w) = self.queue.get_mut(id) {
                            w.wake();
                        }
                    }
                    return;
                }
            };
            self.decide(id, decided, except);
        }
    }

    fn headroom(&self, now: Instant) -> Headroom {
        let mut views = [None; 3];
        let mut fraction: f64 = 1.0;
        let mut full_in = Duration::ZERO;
        for (slot, view) in self.slots.iter().zip(views.iter_mut()) {
            if let Some(s) = slot {
                let mut b = s.bucket.clone();
                let level = b.level(now);
                let cap = b.capacity();
                let (f, secs) = b.room(now);
                let until_full = Duration::from_secs_f64(secs);
                fraction = fraction.min(f);
                full_in = full_in.max(until_full);
                *view = Some(BucketHeadroom {
                    limit: cap,
                    remaining: level.max(0.0).floor() as u64,
                    fraction: f,
                    full_in: until_full,
                });
            }
        }
        Headroom {
            requests: views[0],
            input_tokens: views[1],
            output_tokens: views[2],
            fraction,
            full_in,
            queued: self.waiting_len(),
        }
    }

    /// [`headroom`](Self::headroom)'s fraction and time until full, alone.
    fn room(&self, now: Instant) -> Room {
        let mut fraction: f64 = 1.0;
        let mut full_in: f64 = 0.0;
        for s in self.slots.iter().flatten() {
            let (f, secs) = s.bucket.room(now);
            fraction = fraction.min(f);
            full_in = full_in.max(secs);
        }
        Room {
            fraction,
            // The conversion is monotonic: the longest wait converted once.
            full_in: Duration::from_secs_f64(full_in),
        }
    }

    fn is_idle(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.is_quiet()
            && now.saturating_duration_since(self.last_used) >= idle_timeout
            && self.slots.iter().flatten().all(|s| {
                let mut b = s.bucket.clone();
                b.is_full(now)
            })
    }
}

#[derive(Debug)]
struct State {
    /// Keyed by our own ids (a key's is a hash of it): hashbrown's foldhash, not SipHash,
    /// which cost ~350 instructions per lookup (several lookups per request).
    entries: Entries,
    /// Configured limits per group, and per key below. foldhash rather than SipHash here too
    /// (~350 instructions per lookup): a lookup may carry a name a client made up (a model's
    /// group), but only configuration inserts, so no client can fill these maps with keys
    /// that collide.
    group_limits: hashbrown::HashMap<RateLimitGroup, Limits>,
    /// Limits of one key (keys of different tiers), over the group's.
    key_limits: hashbrown::HashMap<EntryKey, Limits>,
    default_limits: Option<Limits>,
    idle_timeout: Duration,
    next_sweep: usize,
    /// Part of learned limits this board may use, in `(0, 1]`.
    share: f64,
    /// The board mirrors a shared store (see `Entry::mirror`).
    mirror: bool,
}

const MIN_SWEEP: usize = 1024;

/// `share` of a learned `limit` (at least 1 when the limit is not 0).
fn shared(limit: u64, share: f64) -> u64 {
    if share >= 1.0 {
        return limit;
    }
    ((limit as f64 * share).floor() as u64).max(limit.min(1))
}

impl State {
    fn group_limits_for(&self, group: &RateLimitGroup) -> Option<Limits> {
        self.group_limits
            .get(group)
            .copied()
            .or(self.default_limits)
    }

    fn limits_for(&self, key: &KeyId, group: &RateLimitGroup) -> Option<Limits> {
        if !self.key_limits.is_empty() {
            if let Some(l) = self.key_limits.get(&EntryRef(key, group)) {
                return Some(*l);
            }
        }
        self.group_limits_for(group)
    }

    fn entry(&mut self, key: &KeyId, group: &RateLimitGroup, now: Instant) -> &mut Entry {
        let k = EntryRef(key, group);
        if self.entries.len() >= self.next_sweep && !self.entries.contains_key(&k) {
            self.sweep(now);
        }
        // The configured limits are read only for a new entry (one lookup per call, not three).
        let Self {
            entries,
            group_limits,
            key_limits,
            default_limits,
            mirror,
            ..
        } = self;
        let id = match entries.id(&k) {
            Some(id) => id,
            None => {
                let own = key_limits.get(&k).copied();
                let limits = own.or_else(|| group_limits.get(group).copied().or(*default_limits));
                let mut entry = Entry::new(limits, now, *mirror);
                // Limits configured for this very key: an entry an operator asked for.
                entry.vouched = own.is_some();
                entries.insert(EntryKey::from(&k), entry)
            }
        };
        entries
            .by_id_mut(id)
            .expect("an entry just found or inserted is in its slot")
    }

    fn sweep(&mut self, now: Instant) {
        let ttl = self.idle_timeout;
        self.entries.retain(|e| !e.is_idle(now, ttl));
        self.next_sweep = (self.entries.len() * 2).max(MIN_SWEEP);
    }
}

/// Wakes the waiters of [`LocalBackend::changes`] when dropped: declared before the state lock
/// in a method, it fires after the lock is released (locals drop in reverse order).
struct Changed<'a>(&'a LocalBackend);

impl Drop for Changed<'_> {
    fn drop(&mut self) {
        self.0.notify();
    }
}

/// The signal of [`LocalBackend::changes`]: a [`Notify`] and how many wait on it. A change
/// with nobody listening skips `notify_waiters` (its lock and counter, ~90 instructions per
/// settle: issue 14, the board's cost per request).
///
/// Sound because a listener counts itself ([`Changes::listen`]) *before* it creates its
/// `Notified` and looks at the board (under the board's lock), and a change is made under that
/// lock before the count is read: either the listener's look comes after the change (it sees
/// it), or its count came before the change's unlock and the notifier reads it (and notifies a
/// `Notified` created before the call).
#[derive(Debug, Default)]
pub(crate) struct Changes {
    notify: Notify,
    listeners: AtomicUsize,
}

impl Changes {
    /// Counts a listener until the guard is dropped; create it before the first look.
    pub(crate) fn listen(self: &Arc<Self>) -> Listening {
        self.listeners.fetch_add(1, Ordering::SeqCst);
        Listening(self.clone())
    }

    fn notify(&self) {
        if self.listeners.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// A listener of [`Changes`] (see [`Changes::listen`]): wait with [`notified`](Self::notified).
#[derive(Debug)]
pub(crate) struct Listening(Arc<Changes>);

impl Listening {
    /// Completes at the next change after this call (register it with `enable` before looking).
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.notify.notified()
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The in-process board.
#[derive(Debug)]
pub(crate) struct LocalBackend {
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Woken whenever quota may have come back or limits changed (a settle, a refund, new
    /// headers, a cancelled waiter): for waiters outside the board's own queues (the key
    /// pool's admission).
    changed: Arc<Changes>,
}

impl LocalBackend {
    pub(crate) fn new(
        group_limits: HashMap<RateLimitGroup, Limits>,
        key_limits: HashMap<EntryKey, Limits>,
        default_limits: Option<Limits>,
        idle_timeout: Duration,
        share: f64,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                entries: Entries::default(),
                group_limits: group_limits.into_iter().collect(),
                key_limits: key_limits.into_iter().collect(),
                default_limits,
                idle_timeout,
                next_sweep: MIN_SWEEP,
                share: if share.is_finite() && share > 0.0 {
                    share.min(1.0)
                } else {
                    1.0
                },
                mirror: false,
            }),
            next_id: AtomicU64::new(1),
            changed: Arc::new(Changes::default()),
        }
    }

    /// The signal woken when quota may have come back (see [`LocalBackend::changed`]).
    pub(crate) fn changes(&self) -> Arc<Changes> {
        self.changed.clone()
    }

    /// Shares `signal` with another backend (the Redis mirror and its fallback).
    #[cfg(feature = "redis")]
    pub(crate) fn with_changes(mut self, signal: Arc<Changes>) -> Self {
        self.changed = signal;
        self
    }

    fn notify(&self) {
        self.changed.notify();
    }

    /// Makes this backend the mirror of a shared store: it grants only while limits are
    /// unknown (the probe) or absent; requests for known limits go to the store, including
    /// the ones that queued behind the probe.
    #[cfg(feature = "redis")]
    pub(crate) fn mirroring(self) -> Self {
        self.lock().mirror = true;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the arithmetic half-done in a way that
        // matters more than refusing service would; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_limits(&self, group: RateLimitGroup, limits: Limits) {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        st.group_limits.insert(group.clone(), limits);
        let State {
            entries,
            key_limits,
            ..
        } = &mut *st;
        for (k, e) in entries.iter_mut() {
            if k.1 == group && !key_limits.contains_key(k) {
                e.configure(limits, now);
                e.drain(now, None);
            }
        }
    }

    pub(crate) fn set_key_limits(&self, key: KeyId, group: RateLimitGroup, limits: Limits) {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        let k = (key, group);
        if let Some(e) = st.entries.get_mut(&EntryRef(&k.0, &k.1)) {
            e.configure(limits, now);
            e.vouched = true;
            e.drain(now, None);
        }
        st.key_limits.insert(k, limits);
    }

    pub(crate) fn set_default_limits(&self, limits: Limits) {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        st.default_limits = Some(limits);
        let State {
            entries,
            group_limits,
            key_limits,
            ..
        } = &mut *st;
        for (k, e) in entries.iter_mut() {
            if !group_limits.contains_key(&k.1) && !key_limits.contains_key(k) {
                e.configure(limits, now);
                e.drain(now, None);
            }
        }
    }

    pub(crate) fn limits(&self, key: Option<&KeyId>, group: &RateLimitGroup) -> Option<Limits> {
        let st = self.lock();
        match key {
            Some(key) => st.limits_for(key, group),
            None => st.group_limits_for(group),
        }
    }

    pub(crate) fn try_acquire(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: &Cost,
    ) -> Result<Grant, Check> {
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.entry(key, group, now);
        if e.defers_to_store() {
            return Err(Check::Wait(Duration::ZERO));
        }
        if let Some(grant) = e.take_unrefilled(cost, now) {
            return Ok(grant);
        }
        e.refill(now);
        match e.check(cost, now) {
            Check::Ready if !e.has_waiting() => Ok(e.take(cost, now)),
            Check::Ready => Err(Check::Wait(Duration::ZERO)),
            other => Err(other),
        }
    }

    /// Takes `cost` now if it fits and nobody waits, else queues it in `tenant`'s FIFO (`None`:
    /// the anonymous default tenant) of the `(key, group)`'s fair queue.
    pub(crate) fn enqueue(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: &Cost,
        tenant: Option<&Tenant>,
    ) -> Enqueued {
        let now = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let e = st.entry(key, group, now);
        e.refill(now);
        match e.check(cost, now) {
            // Known limits of a shared store: queue, to be released at the first poll (or
            // once the store is seeded).
            _ if e.defers_to_store() => {}
            Check::TooLarge => return Enqueued::TooLarge,
            Check::Ready if !e.has_waiting() => return Enqueued::Granted(e.take(cost, now)),
            _ => {}
        }
        e.queue.push(
            id,
            tenant,
            Waiter {
                cost: *cost,
                waker: None,
            },
        );
        Enqueued::Queued(id)
    }

    pub(crate) fn poll_waiter(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        id: u64,
        waker: &Waker,
        deadline: Option<Instant>,
    ) -> WaitPoll {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(e) = st.entries.get_mut(&EntryRef(key, group)) else {
            // Cannot happen: an entry with waiters is never evicted. Report a timeout rather
            // than panic.
            return WaitPoll::TimedOut(None);
        };
        e.refill(now);
        if e.queue.contains(id) {
            e.drain(now, Some(id));
        }
        match e.decided.remove(&id) {
            Some(Decided::Granted(g)) => return WaitPoll::Granted(g),
            Some(Decided::TooLarge) => {
                e.drain(now, None);
                return WaitPoll::TooLarge;
            }
            Some(Decided::Released) => return WaitPoll::Released,
            None => {}
        }
        let Some(cost) = e.queue.get(id).map(|w| w.cost) else {
            return WaitPoll::TimedOut(None);
        };
        let estimate = match e.check(&cost, now) {
            // Waiting for the shared store to be seeded: no timer helps.
            _ if e.defers_to_store() => None,
            Check::Wait(d) => Some(d),
            Check::Ready => Some(Duration::ZERO),
            Check::TooLarge => None,
        };
        if let Some(d) = deadline {
            if now >= d {
                e.queue.remove(id);
                e.drain(now, None);
                return WaitPoll::TimedOut(estimate);
            }
        }
        let timer = if e.queue.peek_id() == Some(id) {
            estimate.map(|d| now + d)
        } else {
            None
        };
        if let Some(w) = e.queue.get_mut(id) {
            match &w.waker {
                Some(old) if old.will_wake(waker) => {}
                _ => w.waker = Some(waker.clone()),
            }
        }
        WaitPoll::Pending(timer)
    }

    /// A waiting request went away: remove it; a grant it did not collect is given back
    /// (returned, with what it holds in the shared store, when the store was charged for it:
    /// see [`settle`](Self::settle)).
    pub(crate) fn cancel(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        id: u64,
    ) -> Option<(Grant, [Option<u64>; 3], Outcome)> {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.entries.get_mut(&EntryRef(key, group))?;
        let removed = e.queue.remove(id).is_some();
        let decided = e.decided.remove(&id);
        let mut in_store = None;
        if let Some(Decided::Granted(g)) = &decided {
            in_store = e
                .settle(g, Outcome::Refund, now)
                .map(|(c, outcome)| (*g, c, outcome));
        }
        if removed || decided.is_some() {
            e.drain(now, None);
        }
        in_store
    }

    /// The shared store is about to be seeded with the limits this process just learned for
    /// `(key, group)` (see [`seeded`](Self::seeded)): the blind grants still out (charged
    /// here when the limits were learned, [`Entry::charge_blind`]) are charged there too, and
    /// their settles will go there. Returns what to take from the store's levels (every one
    /// but `answered`'s, whose answer's `remaining` counts it already) and what to add to its
    /// held units (every one: their settles give it back).
    #[cfg(feature = "redis")]
    pub(crate) fn blind_to_store(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        answered: Option<&Grant>,
    ) -> ([u64; 3], [u64; 3]) {
        let own = answered.map_or(0, |g| g.blind);
        let (mut take, mut held) = ([0u64; 3], [0u64; 3]);
        let mut st = self.lock();
        let Some(e) = st.entries.get_mut(&EntryRef(key, group)) else {
            return (take, held);
        };
        for b in e.blind.iter_mut().filter(|b| !b.in_store) {
            let Some(charged) = b.charged else { continue };
            b.in_store = true;
            for i in 0..3 {
                let c = charged[i].unwrap_or(0);
                held[i] = held[i].saturating_add(c);
                if b.number != own {
                    take[i] = take[i].saturating_add(c);
                }
            }
        }
        (take, held)
    }

    /// Settles `grant`; returns what it holds in the shared store (a blind grant the store
    /// was charged for, see `blind_to_store`, with the `redis` feature), to be settled there
    /// too.
    ///
    /// An answer without rate-limit headers is not reported before the settle (it used to
    /// be, at the cost of a second look-up and refill per request: issue 14, the board's
    /// cost): until the settle, or the send grace, its grant keeps the ceiling of
    /// [`Ledger::unanswered`] down, which refills less, never more.
    pub(crate) fn settle(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        grant: &Grant,
        outcome: Outcome,
    ) -> Option<([Option<u64>; 3], Outcome)> {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        let k = EntryRef(key, group);
        let mut in_store = None;
        if let Some(e) = st.entries.by_id_or_key(grant.entry, &k) {
            in_store = e.settle(grant, outcome, now);
            e.drain(now, None);
            if matches!(outcome, Outcome::Unknown) && !e.vouched && e.is_quiet() {
                // Upstream does not know this model or key, and never served it: forget it.
                st.entries.remove(&k);
                tracing::trace!(key = %key, group = %group, "quota entry dropped: never served");
            }
        }
        in_store
    }

    pub(crate) fn observe(&self, key: &KeyId, group: &RateLimitGroup, snap: &RateLimitSnapshot) {
        self.observe_answer(key, group, snap, None);
    }

    /// [`observe`](Self::observe), and when `grant` is the successful request these headers
    /// answered, raise levels the answer proves too low (upward reconciliation). Only for
    /// grants of this store, and only with the whole limit (a local share cannot know what
    /// the other processes hold).
    pub(crate) fn observe_answer(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        snap: &RateLimitSnapshot,
        grant: Option<&Grant>,
    ) {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        let share = st.share;
        // The grant's entry without a look-up (see `EntryId`), else by key (created if need be).
        let id = grant.and_then(|g| g.entry);
        let e = match id.filter(|id| st.entries.by_id(*id).is_some()) {
            Some(id) => st.entries.by_id_mut(id).expect("an entry just found"),
            None => st.entry(key, group, now),
        };
        // Only this store's grants have a place in its ledger.
        let answered = grant.filter(|g| g.origin == Origin::Local && !e.defers_to_store());
        e.observe(snap, share, answered, now);
        if let Some(grant) = grant {
            if grant.origin == Origin::Local && share >= 1.0 && !e.defers_to_store() {
                e.raise(snap, grant, now);
            }
        }
        e.drain(now, None);
    }

    /// Whether `(key, group)` learned its limits in the last [`observe`](Self::observe) and
    /// waits for [`seeded`](Self::seeded).
    #[cfg(feature = "redis")]
    pub(crate) fn is_seeding(&self, key: &KeyId, group: &RateLimitGroup) -> bool {
        let st = self.lock();
        st.entries
            .get(&EntryRef(key, group))
            .is_some_and(|e| e.seeding)
    }

    /// Whether this process's probe to learn the limits of `(key, group)` is out.
    #[cfg(feature = "redis")]
    pub(crate) fn is_probing(&self, key: &KeyId, group: &RateLimitGroup) -> bool {
        let st = self.lock();
        st.entries
            .get(&EntryRef(key, group))
            .is_some_and(|e| e.probe_out)
    }

    /// The shared store now holds the limits learned for `(key, group)` and the server's view
    /// (or is unreachable): release the requests that queued behind the probe to it.
    #[cfg(feature = "redis")]
    pub(crate) fn seeded(&self, key: &KeyId, group: &RateLimitGroup) {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(e) = st.entries.get_mut(&EntryRef(key, group)) {
            if e.seeding {
                e.seeding = false;
                e.drain(now, None);
            }
        }
    }

    fn with_view<T>(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        f: impl FnOnce(&Entry, Instant) -> T,
    ) -> Option<T> {
        let mut st = self.lock();
        // The clock is read only when there is something to view (a group nobody configured
        // or used has nothing: the fallback asks about every candidate model).
        match st.entries.get_mut(&EntryRef(key, group)) {
            Some(e) => {
                let now = Instant::now();
                e.refill(now);
                Some(f(e, now))
            }
            None => {
                let limits = st.limits_for(key, group)?;
                let now = Instant::now();
                Some(f(&Entry::new(Some(limits), now, false), now))
            }
        }
    }

    pub(crate) fn headroom(&self, key: &KeyId, group: &RateLimitGroup) -> Option<Headroom> {
        self.with_view(key, group, |e, now| e.known().then(|| e.headroom(now)))
            .flatten()
    }

    pub(crate) fn fits_now(&self, key: &KeyId, group: &RateLimitGroup, cost: &Cost) -> bool {
        self.with_view(key, group, |e, now| {
            !e.has_waiting() && matches!(e.check(cost, now), Check::Ready)
        })
        .unwrap_or(true)
    }

    /// [`headroom`](Self::headroom), [`fits_now`](Self::fits_now) and
    /// [`time_until_fits`](Self::time_until_fits) from one entry lookup, one refill and one
    /// check.
    pub(crate) fn look(&self, key: &KeyId, group: &RateLimitGroup, cost: &Cost) -> QuotaLook {
        self.with_view(key, group, |e, now| {
            let check = e.check(cost, now);
            QuotaLook {
                room: e.known().then(|| e.room(now)),
                fits: !e.has_waiting() && matches!(check, Check::Ready),
                wait: match check {
                    Check::Ready => Some(Duration::ZERO),
                    Check::Wait(d) => Some(d),
                    Check::TooLarge => None,
                },
            }
        })
        // No entry and no configured limit: nothing to wait for (as the three calls say).
        .unwrap_or(QuotaLook {
            room: None,
            fits: true,
            wait: Some(Duration::ZERO),
        })
    }

    pub(crate) fn time_until_fits(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: &Cost,
    ) -> Option<Duration> {
        self.with_view(key, group, |e, now| match e.check(cost, now) {
            Check::Ready => Some(Duration::ZERO),
            Check::Wait(d) => Some(d),
            Check::TooLarge => None,
        })
        .unwrap_or(Some(Duration::ZERO))
    }

    pub(crate) fn statuses(&self) -> Vec<QuotaStatus> {
        let now = Instant::now();
        let st = self.lock();
        let mut out: Vec<QuotaStatus> = st
            .entries
            .iter()
            .map(|((k, g), e)| QuotaStatus {
                key: k.clone(),
                group: g.clone(),
                configured: e.configured(),
                headroom: e.headroom(now),
                queue_depth: e.waiting_len(),
                in_flight: e.outstanding,
                last_snapshot: e
                    .snapshot
                    .map(|(s, at)| (s, now.saturating_duration_since(at))),
                // Filled in by `QuotaBoard::statuses` (issue 17).
                prompt_cache: None,
            })
            .collect();
        out.sort_by(|a, b| (&a.key, &a.group).cmp(&(&b.key, &b.group)));
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// The capacities of the known buckets of `(key, group)` (creating the entry from the
    /// configured limits), or `None` when no limit is known yet or the server sent none.
    #[cfg(feature = "redis")]
    pub(crate) fn capacities(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
    ) -> Option<[Option<u64>; 3]> {
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.entry(key, group, now);
        if !e.known() {
            return None;
        }
        Some(std::array::from_fn(|i| {
            e.slots[i].as_ref().map(|s| s.bucket.capacity())
        }))
    }

    /// What `cost` takes from each known bucket of `(key, group)` (see `Entry::amounts`).
    #[cfg(feature = "redis")]
    pub(crate) fn amounts(&self, key: &KeyId, group: &RateLimitGroup, cost: &Cost) -> [u64; 3] {
        let now = Instant::now();
        let mut st = self.lock();
        st.entry(key, group, now).amounts(cost)
    }

    /// Whether `(key, group)` may find its limits in the shared store: none known here, and no
    /// answer said there are none.
    #[cfg(feature = "redis")]
    pub(crate) fn lacks_limits(&self, key: &KeyId, group: &RateLimitGroup) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.entry(key, group, now);
        !e.known() && !e.unlimited
    }

    /// Adopts the capacities another process learned from the server's headers (found in the
    /// shared store) as learned limits: no probe needed here. Requests queued behind a local
    /// probe are released to the store. No-op when limits are known already.
    #[cfg(feature = "redis")]
    pub(crate) fn adopt(&self, key: &KeyId, group: &RateLimitGroup, caps: [Option<u64>; 3]) {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.entry(key, group, now);
        if e.known() {
            return;
        }
        // A capacity of 0 (written by an older version that believed a `limit: 0` header) is
        // no limit anyone can learn from.
        for (slot, cap) in e.slots.iter_mut().zip(caps) {
            if let Some(cap) = cap.filter(|&c| c > 0) {
                *slot = Some(Slot::new(TokenBucket::per_minute(cap, now), false));
            }
        }
        // `now` may be earlier than the entry's last refill (read before the lock).
        e.refilled = None;
        e.drain(now, None);
    }

    /// A request of `(key, group)` was admitted by the shared store (`+1`) or its reservation
    /// ended (`-1`): counted in [`QuotaStatus::in_flight`], and keeps the entry from eviction.
    #[cfg(feature = "redis")]
    pub(crate) fn track_shared(&self, key: &KeyId, group: &RateLimitGroup, admitted: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.entry(key, group, now);
        if admitted {
            e.outstanding += 1;
        } else {
            e.outstanding = e.outstanding.saturating_sub(1);
        }
        e.last_used = now;
    }

    /// Sets the levels of the known buckets of `(key, group)` from a shared store's view
    /// (a negative level is a debt).
    #[cfg(feature = "redis")]
    pub(crate) fn set_levels(&self, key: &KeyId, group: &RateLimitGroup, levels: [Option<f64>; 3]) {
        let _changed = Changed(self);
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.entry(key, group, now);
        for (slot, level) in e.slots.iter_mut().zip(levels) {
            if let (Some(s), Some(level)) = (slot, level) {
                if level >= 0.0 {
                    s.bucket.set_level(level.floor() as u64, now);
                } else {
                    s.bucket.set_level(0, now);
                    s.bucket.force_take((-level).ceil() as u64, now);
                }
            }
        }
        e.last_used = now;
    }

    pub(crate) fn evict_idle(&self) {
        let now = Instant::now();
        self.lock().sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests_level(e: &mut Entry, now: Instant) -> f64 {
        e.slots[REQUESTS]
            .as_mut()
            .expect("a requests bucket")
            .bucket
            .level(now)
    }

    /// The buckets of an entry are refilled with one elapsed time (issue 14, the board's cost
    /// per request); a bucket refilled on its own at another instant (a level set from a
    /// shared store's view) is not refilled twice for the same time.
    /// The memo of the last look-up is only a shortcut to what the index says: the same key
    /// in another `Arc` finds the same entry, another key its own (or none), and an entry
    /// dropped after it was remembered is not found through the memo, neither while its
    /// slot is free nor once another entry, or the same key again, took that slot.
    #[test]
    fn the_last_lookup_is_found_as_the_index_finds_it() {
        let now = Instant::now();
        let (a, b, g) = (
            KeyId::named("a"),
            KeyId::named("b"),
            RateLimitGroup::new("g"),
        );
        let mut entries = Entries::default();
        let id_a = entries.insert((a.clone(), g.clone()), Entry::new(None, now, false));
        assert_eq!(entries.id(&EntryRef(&a, &g)), Some(id_a));
        assert_eq!(entries.id(&EntryRef(&a, &g)), Some(id_a), "from the memo");
        let a_again = KeyId::named("a");
        assert!(!a_again.same(&a));
        assert_eq!(entries.id(&EntryRef(&a_again, &g)), Some(id_a));
        assert_eq!(entries.id(&EntryRef(&b, &g)), None);
        assert_eq!(entries.id(&EntryRef(&a, &RateLimitGroup::new("h"))), None);
        // Remembered, then dropped.
        assert_eq!(entries.id(&EntryRef(&a, &g)), Some(id_a));
        assert!(entries.remove(&EntryRef(&a, &g)).is_some());
        assert_eq!(entries.id(&EntryRef(&a, &g)), None);
        // The memo points at `a`'s old slot, which `b` takes.
        let id_b = entries.insert((b.clone(), g.clone()), Entry::new(None, now, false));
        assert_eq!(id_b.index, id_a.index);
        assert_ne!(id_b, id_a);
        assert_eq!(entries.id(&EntryRef(&a, &g)), None);
        assert_eq!(entries.id(&EntryRef(&b, &g)), Some(id_b));
        // `a` back, in a new slot: found there, and `b` still in its own.
        let id_a2 = entries.insert((a.clone(), g.clone()), Entry::new(None, now, false));
        assert_eq!(entries.id(&EntryRef(&a, &g)), Some(id_a2));
        assert_eq!(entries.id(&EntryRef(&b, &g)), Some(id_b));
        assert_eq!(entries.id(&EntryRef(&a, &g)), Some(id_a2));
        assert_eq!(
            entries.by_id(id_a2).map(|e| e.id),
            Some(Some(id_a2)),
            "the entry knows its slot"
        );
    }

    #[test]
    fn buckets_refilled_apart_are_refilled_once_for_each_instant() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_secs(3), t0 + Duration::from_secs(7));
        let mut e = Entry::new(Some(Limits::new(60, 6_000, 600)), t0, false);
        for s in e.slots.iter_mut().flatten() {
            s.bucket.force_take(s.bucket.capacity(), t0);
        }
        // The output bucket alone is brought to t1 (as `set_levels` does).
        e.slots[OUTPUT]
            .as_mut()
            .expect("output")
            .bucket
            .force_take(0, t1);
        e.refill(t2);
        let levels: Vec<f64> = e
            .slots
            .iter_mut()
            .flatten()
            .map(|s| s.bucket.level(t2))
            .collect();
        assert_eq!(levels, [7.0, 700.0, 70.0]);
    }

    /// Issue 14, the board's cost: a take from the levels as last refilled
    /// (`Entry::take_unrefilled`, no refill to the take's instant) ends, once refilled, where
    /// a refill then the take would have, with the ceiling of a grant in transit binding and
    /// that grant reaching its send grace in between.
    #[test]
    fn a_take_before_the_refill_ends_where_the_refill_then_the_take_would() {
        let t0 = Instant::now();
        let (t1, t2) = (
            t0 + Duration::from_millis(1_500),
            t0 + Duration::from_millis(2_500),
        );
        let limits = Some(Limits::new(60, 6_000, 600));
        let (first, second) = (Cost::new(1, 5_000, 100), Cost::new(1, 100, 50));
        let mut eager = Entry::new(limits, t0, false);
        let mut lazy = Entry::new(limits, t0, false);
        eager.take(&first, t0);
        lazy.take(&first, t0);
        eager.refill(t1);
        eager.take(&second, t1);
        let grant = lazy
            .take_unrefilled(&second, t1)
            .expect("the levels hold it");
        assert_eq!(grant.at, t1);
        for e in [&mut eager, &mut lazy] {
            e.refill(t2);
        }
        let buckets = |e: &Entry| {
            e.slots
                .iter()
                .map(|s| s.as_ref().map(|s| s.bucket.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(buckets(&lazy), buckets(&eager));
        assert_eq!(lazy.ledger, eager.ledger);
        // The ceiling bound: 59 until the first grant's grace (58 after the second take), then
        // half a second's refill; 60 without it.
        assert_eq!(requests_level(&mut lazy, t2), 58.5);
        // A level that does not hold the cost as last refilled is refilled first.
        assert!(lazy.take_unrefilled(&Cost::new(1, 0, 600), t2).is_none());
    }

    #[test]
    fn a_bucket_created_behind_the_last_refill_is_refilled_under_its_ceiling() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        let mut e = Entry::new(None, t0, false);
        e.refill(t1);
        // Limits configured with an instant read before the last refill's (another thread).
        e.configure(Limits::new(60, 6_000, 6_000), t0);
        e.slots[REQUESTS]
            .as_mut()
            .expect("a requests bucket")
            .bucket
            .force_take(60, t0);
        e.ledger.unanswered = [55, 0, 0];
        e.refill(t1);
        // 10 s refill 10 requests, but not above the capacity minus the unanswered 55.
        assert_eq!(requests_level(&mut e, t1), 5.0);
    }
}
