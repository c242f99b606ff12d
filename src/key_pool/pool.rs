//! The shared state of a key pool: the keys, their cooldowns and removals, and the
//! [`KeyPoolHandle`] status API.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::error::KeyPoolError;
use crate::BoxError;
use crate::anthropic::{KeyId, RateLimitGroup};
use crate::quota::{AcquireError, AcquireErrorKind, Cost, QuotaBoard, Reservation};
use crate::tenant::Tenant;
use crate::tenant::fair::FairQueue;

/// The longest a waiter at the head of a group's line sleeps without looking at the keys again
/// when nothing tells it when quota comes back (a probe out, requests queued on a key by
/// another path, a shared store).
const RECHECK: Duration = Duration::from_millis(250);

/// The same with a shared store (Redis): other nodes' refunds wake nobody here, so the head
/// looks again sooner (one round trip per key; the Redis line keeps arrival order).
const REMOTE_RECHECK: Duration = Duration::from_millis(50);

/// Two headroom fractions closer than this are a tie (broken by in-flight count, then by
/// least recent use).
const FRACTION_EPSILON: f64 = 1e-6;

/// One API key: its id and the header value (marked sensitive). The key itself is only in the
/// header value, which `Debug` never prints.
struct PoolKey {
    id: KeyId,
    header: HeaderValue,
}

impl fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolKey").field("id", &self.id).finish()
    }
}

/// Why a key was taken out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemovalReason {
    /// A 429 whose error code is `enforced_spend_limit_reached`: the key's monthly spend cap.
    SpendCap,
    /// A 401 `authentication_error`: the key is invalid or revoked.
    Unauthorized,
    /// A 402 `billing_error`: the key's organisation has a billing problem.
    Billing,
    /// [`KeyPoolHandle::remove`].
    Manual,
}

impl RemovalReason {
    /// A short label: `spend_cap`, `unauthorized`, `billing`, `manual` (the `reason` of the
    /// `tower_claude_keys_removed_total` metric).
    ///
    /// ```
    /// use tower_claude::key_pool::RemovalReason;
    ///
    /// assert_eq!(RemovalReason::SpendCap.as_str(), "spend_cap");
    /// ```
    pub fn as_str(&self) -> &'static str {
        match self {
            RemovalReason::SpendCap => "spend_cap",
            RemovalReason::Unauthorized => "unauthorized",
            RemovalReason::Billing => "billing",
            RemovalReason::Manual => "manual",
        }
    }
}

impl fmt::Display for RemovalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemovalReason::SpendCap => "spend cap reached",
            RemovalReason::Unauthorized => "rejected (401)",
            RemovalReason::Billing => "billing problem (402)",
            RemovalReason::Manual => "removed by hand",
        })
    }
}

/// Whether a key is in rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// In rotation (possibly cooling down in some groups: see [`KeyStatus::cooldowns`]).
    Active,
    /// Out of rotation, for this reason, since this long ago.
    Removed {
        /// Why.
        reason: RemovalReason,
        /// How long ago.
        since: Duration,
    },
}

/// The state of one key of the pool, as [`KeyPoolHandle::statuses`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
    /// The key's id (never the key).
    pub key: KeyId,
    /// In rotation or not.
    pub state: KeyState,
    /// Groups in which the key is cooling down after a 429, and for how long still.
    pub cooldowns: Vec<(RateLimitGroup, Duration)>,
    /// Groups in which upstream refused the key with a 403 `permission_error` (e.g. a model
    /// its workspace may not use), and for how long still it is picked there only when no
    /// other key can be.
    pub forbidden: Vec<(RateLimitGroup, Duration)>,
    /// Requests sent with this key whose response has not arrived yet.
    pub in_flight: usize,
    /// Requests sent with this key.
    pub requests: u64,
    /// 429 `rate_limit_error` responses to this key.
    pub rate_limited: u64,
}

/// The key chosen for a request: a response extension (and a request extension for the
/// layers below) set by [`KeyPool`](super::KeyPool).
///
/// ```
/// use tower_claude::anthropic::KeyId;
/// use tower_claude::key_pool::ChosenKey;
///
/// # let response = http::Response::new(());
/// if let Some(chosen) = response.extensions().get::<ChosenKey>() {
///     println!("served with key {}", chosen.key());
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenKey {
    key: KeyId,
}

impl ChosenKey {
    pub(crate) fn new(key: KeyId) -> Self {
        Self { key }
    }

    /// The id of the key the request was sent with.
    pub fn key(&self) -> &KeyId {
        &self.key
    }
}

#[derive(Debug, Default)]
struct KeyRuntime {
    removed: Option<(RemovalReason, Instant)>,
    cooldowns: HashMap<RateLimitGroup, Instant>,
    /// Groups where a 403 said the key may not be used, until when.
    forbidden: HashMap<RateLimitGroup, Instant>,
    in_flight: usize,
    requests: u64,
    rate_limited: u64,
    /// Pick sequence number of the last use (0: never): the least recently used wins ties.
    last_pick: u64,
    /// An answer other than 401 was seen with this key: it is known to work.
    validated: bool,
}

impl KeyRuntime {
    /// Not known to work yet and a request is already out with it: send others elsewhere
    /// until that first answer shows whether the key is valid.
    fn on_probation(&self) -> bool {
        !self.validated && self.in_flight > 0
    }

    fn is_forbidden(&self, group: &RateLimitGroup, now: Instant) -> bool {
        self.forbidden.get(group).is_some_and(|until| *until > now)
    }

    fn cooldown_left(&self, group: &RateLimitGroup, now: Instant) -> Duration {
        self.cooldowns
            .get(group)
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }
}

#[derive(Debug)]
struct State {
    keys: Vec<KeyRuntime>,
    picks: u64,
}

/// The keys and their runtime state, shared by every service of one layer.
#[derive(Debug)]
pub(crate) struct Pool {
    keys: Vec<PoolKey>,
    state: Mutex<State>,
    /// One line per rate-limit group of the requests waiting for quota, across every key.
    lines: Mutex<Lines>,
    /// Woken when the head of a line leaves it.
    turn: Notify,
}

/// The waiting lines of a pool: ticket numbers per group, weighted-fair across tenants
/// (FIFO within a tenant, and with a single tenant; see [`FairQueue`]).
#[derive(Debug, Default)]
struct Lines {
    next: u64,
    by_group: HashMap<RateLimitGroup, FairQueue<()>>,
    /// Per group, the Redis ticket a served head queued for the next head of this node
    /// (see [`RemoteLine`]), until that head takes it.
    handoff: HashMap<RateLimitGroup, Handoff>,
}

/// A place in a key's Redis line that a served head took for its successor on this node
/// (issue 12): queued by the same script call that served it, so the node holds its place
/// between two heads. Left when nobody takes it (the node's line emptied).
#[derive(Debug)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
struct Handoff {
    board: QuotaBoard,
    ticket: i64,
    key: KeyId,
    /// Its place in the lines (Redis clock, µs).
    at: i64,
}

impl Handoff {
    fn leave(self, group: &RateLimitGroup) {
        #[cfg(feature = "redis")]
        self.board.leave_line(&self.key, group, self.ticket);
        #[cfg(not(feature = "redis"))]
        let _ = (self, group);
    }
}

/// A place in a group's line; leaving it (drop) lets the next request take its turn.
struct Ticket {
    pool: Arc<Pool>,
    group: RateLimitGroup,
    id: u64,
    /// Left by admission (counted against its tenant's turn), not by giving up.
    admitted: bool,
}

impl Ticket {
    fn is_head(&self) -> bool {
        let lines = self.pool.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .by_group
            .get(&self.group)
            .and_then(FairQueue::peek_id)
            .is_none_or(|head| head == self.id)
    }

    /// Leaves the line admitted.
    fn admit(mut self) {
        self.admitted = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let (was_head, unclaimed) = {
            let mut lines = self.pool.lines.lock().unwrap_or_else(|e| e.into_inner());
            let mut was_head = false;
            let mut unclaimed = None;
            if let Some(line) = lines.by_group.get_mut(&self.group) {
                was_head = line.peek_id() == Some(self.id);
                if was_head && self.admitted {
                    line.pop();
                } else {
                    line.remove(self.id);
                }
                if line.is_empty() {
                    lines.by_group.remove(&self.group);
                    // Nobody left on this node to take the successor's place.
                    unclaimed = lines.handoff.remove(&self.group);
                }
            }
            (was_head, unclaimed)
        };
        if let Some(h) = unclaimed {
            h.leave(&self.group);
        }
        if was_head {
            self.pool.turn.notify_waiters();
        }
    }
}

/// One look at the keys by the head of a line.
enum Attempt {
    /// A key took the request.
    /// (Boxed: a reservation is large, and waiting is the common case.)
    Admitted(Pick, Box<Reservation>),
    /// Nothing fits now; look again after this long at the latest (`None`: when the board
    /// changes).
    Wait(Option<Duration>),
    /// The board is shared (Redis): try these keys there (index, id), in this order.
    Remote(Vec<(usize, KeyId)>),
    /// Nothing can ever take it (every key out of rotation, or larger than every bucket).
    Failed(BoxError),
}

/// One key in rotation as [`Pool::outlook`] sees it for a group.
#[derive(Debug, Clone)]
pub(crate) struct KeyOutlook {
    pub(crate) id: KeyId,
    pub(crate) cooldown: Duration,
    pub(crate) forbidden: bool,
}

/// A picked key: its index, id and header value.
#[derive(Debug, Clone)]
pub(crate) struct Pick {
    pub(crate) index: usize,
    pub(crate) id: KeyId,
    pub(crate) header: HeaderValue,
}

/// What one request costs on each key of the pool. The same on every key, except the input
/// of a request with prompt-cache breakpoints: each key leaves out the prefix it sent to the
/// model within its TTL (the cache-aware estimate the rate limiter reserves, issue 17), so
/// that the pool's admission takes what the rate limiter would have taken.
#[derive(Debug, Clone)]
pub(crate) struct KeyCosts {
    cost: Cost,
    /// Counted input tokens per key index, when they differ from `cost`'s.
    input: Option<Box<[u64]>>,
}

impl KeyCosts {
    /// `cost` on every key.
    pub(crate) fn uniform(cost: Cost) -> Self {
        Self { cost, input: None }
    }

    /// The cost on the key at `index`.
    pub(crate) fn of(&self, index: usize) -> Cost {
        match self.input.as_ref().and_then(|input| input.get(index)) {
            Some(&input_tokens) => Cost {
                input_tokens,
                ..self.cost
            },
            None => self.cost,
        }
    }
}

/// How good a candidate is; lower sorts first.
#[derive(Debug, Clone, Copy)]
struct Rank {
    /// Upstream answered 403 for this key in this group recently.
    forbidden: bool,
    /// The key's first request is still out (see `KeyRuntime::on_probation`).
    probation: bool,
    /// Time until the key can take the request (0: now).
    wait: Duration,
    /// Headroom fraction (higher is better).
    fraction: f64,
    in_flight: usize,
    last_pick: u64,
}

impl Rank {
    fn better_than(&self, other: &Rank) -> bool {
        if self.forbidden != other.forbidden {
            return !self.forbidden;
        }
        if self.probation != other.probation {
            return !self.probation;
        }
        if self.wait != other.wait {
            return self.wait < other.wait;
        }
        if (self.fraction - other.fraction).abs() > FRACTION_EPSILON {
            return self.fraction > other.fraction;
        }
        if self.in_flight != other.in_flight {
            return self.in_flight < other.in_flight;
        }
        self.last_pick < other.last_pick
    }
}

/// The head of a line tries the candidate keys in the shared store (Redis), one round trip
/// each: the first that takes the request wins (`Ok(Ok)`); else `Ok(Err(wait))`, the
/// soonest any of them holds it by refill. A key whose limits this node does not know yet
/// takes the board's full acquire path for a short while (learning or adopting them).
#[cfg(feature = "redis")]
async fn remote_attempt(
    board: &QuotaBoard,
    group: &RateLimitGroup,
    costs: &KeyCosts,
    candidates: &[(usize, KeyId)],
    deadline: Option<Instant>,
    line: &mut RemoteLine,
    successor: bool,
) -> Result<Result<(usize, Reservation), Duration>, BoxError> {
    use crate::quota::redis::SharedTry;
    let mut soonest: Option<Duration> = None;
    let mut too_large = None;
    let mut place = crate::quota::redis::Place {
        at: line.at,
        next: if successor { line.next } else { 0 },
        next_at: 0,
    };
    for (index, id) in candidates {
        let cost = costs.of(*index);
        let tried = board
            .try_shared(id, group, cost, line.ticket, &mut place)
            .await;
        line.at = place.at;
        let wait = match tried {
            SharedTry::Granted(reservation) => {
                line.served(id);
                if place.next != 0 {
                    line.handed = Some((id.clone(), place.next_at));
                }
                return Ok(Ok((*index, reservation)));
            }
            SharedTry::Wait(d) => {
                line.queued(id);
                d
            }
            SharedTry::TooLarge(e) => {
                too_large.get_or_insert_with(|| board.with_sizes(e, &cost));
                continue;
            }
            SharedTry::Acquire => {
                // The call may have queued the ticket before Redis was marked down (a
                // timeout): leave that line too when done.
                line.queued(id);
                let now = Instant::now();
                let until = deadline.map_or(now + RECHECK, |d| d.min(now + RECHECK));
                let acquire = board.acquire(id.clone(), group.clone(), cost);
                match acquire.deadline(Some(until)).await {
                    Ok(reservation) => return Ok(Ok((*index, reservation))),
                    Err(e) if e.kind() == AcquireErrorKind::QueueTimeout => Duration::ZERO,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
    }
    match (soonest, too_large) {
        (None, Some(e)) => Err(e.into()),
        (s, _) => Ok(Err(s.unwrap_or(RECHECK))),
    }
}

/// The head's ticket in the Redis lines of the keys it waits on (arrival order across
/// nodes): one ticket for all of them, left on every key but the one that served it.
///
/// When other requests wait behind the head on this node, the script call that serves it
/// also queues `next` in that key's line (a [`Handoff`] the next head takes): with only the
/// head holding a ticket, a node was absent from the lines between two heads, and another
/// node's head, finding the line empty, took the quota freed then — a turn lost, again and
/// again in the bursts of refunds (the fleets of different nodes finished up to 10 % apart).
#[derive(Debug)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
struct RemoteLine {
    board: QuotaBoard,
    group: RateLimitGroup,
    ticket: i64,
    keys: Vec<KeyId>,
    /// Its place in every key's line (Redis clock, µs; 0: not queued yet).
    at: i64,
    /// The ticket queued for the successor when this head is served.
    next: i64,
    /// The key in whose line `next` was queued, and its place.
    handed: Option<(KeyId, i64)>,
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl RemoteLine {
    fn new(board: &QuotaBoard, group: &RateLimitGroup) -> Self {
        #[cfg(feature = "redis")]
        let ticket = crate::quota::redis::new_ticket();
        #[cfg(not(feature = "redis"))]
        let ticket = 0;
        #[cfg(feature = "redis")]
        let next = crate::quota::redis::new_ticket();
        #[cfg(not(feature = "redis"))]
        let next = 0;
        Self {
            board: board.clone(),
            group: group.clone(),
            ticket,
            keys: Vec::new(),
            at: 0,
            next,
            handed: None,
        }
    }

    /// Becomes the head with the place a served head queued for it.
    fn adopt(&mut self, handoff: Handoff) {
        self.ticket = handoff.ticket;
        self.keys = vec![handoff.key];
        self.at = handoff.at;
    }

    fn queued(&mut self, key: &KeyId) {
        if !self.keys.contains(key) {
            self.keys.push(key.clone());
        }
    }

    /// Served on `key`: the script took the ticket out of that line.
    fn served(&mut self, key: &KeyId) {
        self.keys.retain(|k| k != key);
    }

    /// Leaves the line of every key this head does not try now (`tried`): one that left its
    /// candidates (cooling down after a 429 on this node, forbidden, on probation) or all of
    /// them while it waits for a cooldown. A ticket is refreshed only by the calls on its
    /// key, so one left there blocked that key's line for every other node until it went
    /// stale (2 s) — a served head's handoff on a key that then cooled down, say (issue 12).
    /// Its place is kept: queueing there again later takes the same place.
    fn keep_only(&mut self, tried: &[(usize, KeyId)]) {
        if self.keys.iter().all(|k| tried.iter().any(|(_, t)| t == k)) {
            return;
        }
        let (keep, leave): (Vec<KeyId>, Vec<KeyId>) = std::mem::take(&mut self.keys)
            .into_iter()
            .partition(|k| tried.iter().any(|(_, t)| t == k));
        self.keys = keep;
        #[cfg(feature = "redis")]
        for key in &leave {
            tracing::debug!(key = %key, group = %self.group, "key pool: left the line of a key it no longer tries");
            self.board.leave_line(key, &self.group, self.ticket);
        }
        #[cfg(not(feature = "redis"))]
        let _ = leave;
    }
}

impl Drop for RemoteLine {
    fn drop(&mut self) {
        #[cfg(feature = "redis")]
        for key in &self.keys {
            self.board.leave_line(key, &self.group, self.ticket);
        }
    }
}

#[cfg(not(feature = "redis"))]
async fn remote_attempt(
    _board: &QuotaBoard,
    _group: &RateLimitGroup,
    _costs: &KeyCosts,
    _candidates: &[(usize, KeyId)],
    _deadline: Option<Instant>,
    _line: &mut RemoteLine,
    _successor: bool,
) -> Result<Result<(usize, Reservation), Duration>, BoxError> {
    // Without the `redis` feature no board is shared.
    Ok(Err(RECHECK))
}

impl Pool {
    /// Builds a pool; duplicate keys are kept once.
    pub(crate) fn new<I, K>(keys: I) -> Result<Self, KeyPoolError>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        let mut out: Vec<PoolKey> = Vec::new();
        for (i, key) in keys.into_iter().enumerate() {
            let key = key.as_ref().trim();
            if key.is_empty() {
                return Err(KeyPoolError::invalid_key(i));
            }
            let mut header =
                HeaderValue::from_str(key).map_err(|_| KeyPoolError::invalid_key(i))?;
            header.set_sensitive(true);
            let id = KeyId::from_api_key(key);
            if out.iter().all(|k| k.id != id) {
                out.push(PoolKey { id, header });
            }
        }
        if out.is_empty() {
            return Err(KeyPoolError::new(super::KeyPoolErrorKind::NoKeys));
        }
        let runtime = out.iter().map(|_| KeyRuntime::default()).collect();
        Ok(Self {
            keys: out,
            state: Mutex::new(State {
                keys: runtime,
                picks: 0,
            }),
            lines: Mutex::new(Lines::default()),
            turn: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements: a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// `cost` on each key, its input tokens counted by `input` (the cache-aware estimate).
    pub(crate) fn costs(&self, cost: Cost, input: impl Fn(&KeyId) -> u64) -> KeyCosts {
        let counted: Box<[u64]> = self.keys.iter().map(|k| input(&k.id)).collect();
        let input = counted
            .iter()
            .any(|&n| n != cost.input_tokens)
            .then_some(counted);
        KeyCosts { cost, input }
    }

    /// Picks the key for one request and counts it in flight.
    ///
    /// With a group (a Messages request): among keys in rotation, the one that can take `cost`
    /// soonest (cooldown after a 429, then the board's time until it fits), then the most
    /// headroom, then the fewest in flight, then the least recently used. Without a group
    /// (other endpoints): the fewest in flight, then the least recently used. A key whose
    /// first request is still out comes after every other key in rotation, and a key
    /// forbidden in the group (403) after every key that is not.
    pub(crate) fn pick(
        &self,
        group: Option<(&RateLimitGroup, &Cost)>,
        board: &QuotaBoard,
        now: Instant,
    ) -> Result<Pick, KeyPoolError> {
        let mut state = self.lock();
        let costs = group.map(|(g, cost)| (g, KeyCosts::uniform(*cost)));
        let costs = costs.as_ref().map(|(g, c)| (*g, c));
        let Some((index, _)) = self.ranked(&state, costs, board, now).into_iter().next() else {
            return Err(KeyPoolError::all_removed(self.keys.len()));
        };
        Ok(self.picked(&mut state, index))
    }

    /// The keys in rotation, best first (see [`pick`](Self::pick)).
    fn ranked(
        &self,
        state: &State,
        group: Option<(&RateLimitGroup, &KeyCosts)>,
        board: &QuotaBoard,
        now: Instant,
    ) -> Vec<(usize, Rank)> {
        let mut ranked: Vec<(usize, Rank)> = Vec::with_capacity(self.keys.len());
        for (index, (key, rt)) in self.keys.iter().zip(state.keys.iter()).enumerate() {
            if rt.removed.is_some() {
                continue;
            }
            let rank = match group {
                Some((group, costs)) => {
                    let cost = &costs.of(index);
                    let cooldown = rt.cooldown_left(group, now);
                    // Headroom, fits-now and time-until-fits from one board lookup.
                    let look = board.look(&key.id, group, cost);
                    let fraction = look.room.map_or(1.0, |r| r.fraction);
                    let quota_wait = if look.fits {
                        Duration::ZERO
                    } else {
                        // Never fits (larger than a bucket) or waiting for a probe: rank it
                        // by the time until its buckets are full.
                        look.wait
                            .or(look.room.map(|r| r.full_in))
                            .unwrap_or(Duration::MAX)
                    };
                    Rank {
                        forbidden: rt.is_forbidden(group, now),
                        probation: rt.on_probation(),
                        wait: cooldown.max(quota_wait),
                        fraction,
                        in_flight: rt.in_flight,
                        last_pick: rt.last_pick,
                    }
                }
                None => Rank {
                    forbidden: false,
                    probation: rt.on_probation(),
                    wait: Duration::ZERO,
                    fraction: 1.0,
                    in_flight: rt.in_flight,
                    last_pick: rt.last_pick,
                },
            };
            let at = ranked
                .iter()
                .position(|(_, b)| rank.better_than(b))
                .unwrap_or(ranked.len());
            ranked.insert(at, (index, rank));
        }
        ranked
    }

    /// Counts key `index` as picked (in flight, used now).
    fn picked(&self, state: &mut State, index: usize) -> Pick {
        state.picks += 1;
        let seq = state.picks;
        let rt = &mut state.keys[index];
        rt.last_pick = seq;
        rt.in_flight += 1;
        rt.requests += 1;
        let key = &self.keys[index];
        Pick {
            index,
            id: key.id.clone(),
            header: key.header.clone(),
        }
    }

    /// The head of `group`'s line looks at the keys: the first key, in rank order among the
    /// best-placed ones (not forbidden, not on probation when others are not), that is not
    /// cooling down and whose buckets hold `cost` now takes it.
    fn attempt(
        &self,
        group: &RateLimitGroup,
        costs: &KeyCosts,
        board: &QuotaBoard,
        now: Instant,
    ) -> Attempt {
        let mut state = self.lock();
        let ranked = self.ranked(&state, Some((group, costs)), board, now);
        let Some(tier) = ranked.first().map(|(_, r)| (r.forbidden, r.probation)) else {
            return Attempt::Failed(KeyPoolError::all_removed(self.keys.len()).into());
        };
        let mut soonest: Option<Duration> = None;
        let mut unknown = false;
        let mut too_large: Option<AcquireError> = None;
        let mut candidates = 0;
        let mut remote = Vec::new();
        for (index, _) in ranked
            .iter()
            .filter(|(_, r)| (r.forbidden, r.probation) == tier)
        {
            candidates += 1;
            let index = *index;
            let id = &self.keys[index].id;
            let cooldown = state.keys[index].cooldown_left(group, now);
            if !cooldown.is_zero() {
                soonest = Some(soonest.map_or(cooldown, |s| s.min(cooldown)));
                continue;
            }
            if board.is_remote() {
                remote.push((index, id.clone()));
                continue;
            }
            let cost = costs.of(index);
            match board.try_acquire(id, group, cost) {
                Ok(reservation) => {
                    let pick = self.picked(&mut state, index);
                    return Attempt::Admitted(pick, Box::new(reservation));
                }
                Err(e) if e.kind() == AcquireErrorKind::RequestTooLarge => {
                    too_large.get_or_insert_with(|| board.with_sizes(e, &cost));
                }
                Err(e) => match e.available_in().filter(|d| !d.is_zero()) {
                    Some(d) => soonest = Some(soonest.map_or(d, |s| s.min(d))),
                    // A probe out, or requests queued on that key by another path.
                    None => unknown = true,
                },
            }
        }
        if !remote.is_empty() {
            return Attempt::Remote(remote);
        }
        if let Some(e) = too_large {
            let all = ranked.len() == candidates;
            if all && soonest.is_none() && !unknown {
                return Attempt::Failed(e.into());
            }
        }
        if unknown {
            soonest = Some(soonest.map_or(RECHECK, |s| s.min(RECHECK)));
        }
        Attempt::Wait(soonest)
    }

    /// Other requests wait behind the head of `group`'s line.
    fn others_waiting(&self, group: &RateLimitGroup) -> bool {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.by_group.get(group).is_some_and(|q| q.len() > 1)
    }

    /// A served head queued `ticket` in `key`'s Redis line for the next head (see
    /// [`RemoteLine`]).
    fn hand_off(
        &self,
        board: &QuotaBoard,
        group: &RateLimitGroup,
        ticket: i64,
        key: KeyId,
        at: i64,
    ) {
        let h = Handoff {
            board: board.clone(),
            ticket,
            key,
            at,
        };
        let old = {
            let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
            lines.handoff.insert(group.clone(), h)
        };
        if let Some(old) = old {
            old.leave(group);
        }
    }

    /// The place a served head queued for the next one, if any.
    fn take_handoff(&self, group: &RateLimitGroup) -> Option<Handoff> {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.handoff.remove(group)
    }

    fn line_up(self: &Arc<Self>, group: &RateLimitGroup, tenant: Option<&Tenant>) -> Ticket {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.next += 1;
        let id = lines.next;
        lines
            .by_group
            .entry(group.clone())
            .or_default()
            .push(id, tenant, ());
        Ticket {
            pool: self.clone(),
            group: group.clone(),
            id,
            admitted: false,
        }
    }

    /// Admits a Messages request of `group`: waits in the group's line (one line across every
    /// key, weighted-fair across tenants and first come first served within one; `tenant`
    /// `None`: the anonymous default tenant), then, at its head, takes `cost` from the first key that
    /// can admit it, waiting for whichever key frees up first (a refund or settle on any key,
    /// new headers, the refill of the soonest key, a cooldown ending). Returns the key, the
    /// reservation and the time waited. Dropping the future takes nothing.
    ///
    /// Errors: [`KeyPoolError`] when every key is out of rotation; [`AcquireError`] when the
    /// request is larger than every key's buckets, or when `deadline` passes first
    /// ([`QueueTimeout`](AcquireErrorKind::QueueTimeout)).
    pub(crate) async fn admit(
        self: Arc<Self>,
        board: QuotaBoard,
        group: RateLimitGroup,
        costs: KeyCosts,
        deadline: Option<Instant>,
        tenant: Option<Tenant>,
    ) -> Result<(Pick, Reservation, Duration), BoxError> {
        let started = Instant::now();
        let ticket = self.line_up(&group, tenant.as_ref());
        let tenant_name = tenant.as_ref().map_or("", Tenant::name);
        let admitted = |ticket: Ticket, waited: Duration| {
            ticket.admit();
            if let Some(t) = &tenant {
                t.stats().record_queue_wait(waited);
            }
        };
        let timed_out = |pool: &Pool, wait: Option<Duration>| -> BoxError {
            let key = pool.keys[0].id.clone();
            tracing::debug!(group = %group, "key pool: gave up waiting for quota (deadline)");
            AcquireError::new(AcquireErrorKind::QueueTimeout, key, group.clone(), wait).into()
        };
        if !ticket.is_head() {
            tracing::debug!(group = %group, tenant = tenant_name, "key pool: queued");
        }
        // Counted as a listener before the first look (a change with nobody listening
        // notifies nobody).
        let changes = board.changes().listen();
        let mut line = RemoteLine::new(&board, &group);
        'turn: loop {
            // Wait for this request's turn.
            loop {
                let turn = self.turn.notified();
                let mut turn = std::pin::pin!(turn);
                turn.as_mut().enable();
                if ticket.is_head() {
                    break;
                }
                match deadline {
                    Some(d) => {
                        if tokio::time::timeout_at(d, turn).await.is_err() {
                            return Err(timed_out(&self, None));
                        }
                    }
                    None => turn.await,
                }
            }
            // At the head: take the first key that admits the request.
            loop {
                // A request of a higher class, or of a tenant whose turn it is, may have
                // become the head meanwhile: wait for the turn again (unless this one holds
                // places in the shared store's lines, which keep arrival order across nodes).
                if line.keys.is_empty() && !ticket.is_head() {
                    continue 'turn;
                }
                if line.keys.is_empty() {
                    if let Some(h) = self.take_handoff(&group) {
                        line.adopt(h);
                    }
                }
                let changed = changes.notified();
                let mut changed = std::pin::pin!(changed);
                changed.as_mut().enable();
                let now = Instant::now();
                let last = deadline.is_some_and(|d| now >= d);
                let wait = match self.attempt(&group, &costs, &board, now) {
                    Attempt::Admitted(pick, reservation) => {
                        let waited = now.saturating_duration_since(started);
                        if !waited.is_zero() {
                            tracing::debug!(
                                key = %pick.id,
                                group = %group,
                                tenant = tenant_name,
                                waited_ms = waited.as_millis() as u64,
                                "key pool: admitted after waiting for quota"
                            );
                        }
                        admitted(ticket, waited);
                        return Ok((pick, *reservation, waited));
                    }
                    Attempt::Failed(e) => return Err(e),
                    Attempt::Remote(candidates) => {
                        line.keep_only(&candidates);
                        let attempt = remote_attempt(
                            &board,
                            &group,
                            &costs,
                            &candidates,
                            deadline,
                            &mut line,
                            self.others_waiting(&group),
                        );
                        match attempt.await {
                            Ok(Ok((index, reservation))) => {
                                if let Some((key, at)) = line.handed.take() {
                                    self.hand_off(&board, &group, line.next, key, at);
                                }
                                let pick = self.picked(&mut self.lock(), index);
                                let waited = started.elapsed();
                                admitted(ticket, waited);
                                return Ok((pick, reservation, waited));
                            }
                            Ok(Err(_)) if last => return Err(timed_out(&self, None)),
                            Ok(Err(wait)) => Some(wait.min(REMOTE_RECHECK)),
                            Err(e) => return Err(e),
                        }
                    }
                    Attempt::Wait(wait) if last => return Err(timed_out(&self, wait)),
                    Attempt::Wait(wait) => {
                        line.keep_only(&[]);
                        wait
                    }
                };
                let wake = wait.map(|d| now + d);
                let until = match (wake, deadline) {
                    (Some(w), Some(d)) => Some(w.min(d)),
                    (w, d) => w.or(d),
                };
                match until {
                    Some(at) => {
                        let _ = tokio::time::timeout_at(at, changed).await;
                    }
                    None => changed.await,
                }
            }
        }
    }

    /// The response to a request with key `index` arrived (or the request was dropped).
    pub(crate) fn done(&self, index: usize) {
        let mut state = self.lock();
        if let Some(rt) = state.keys.get_mut(index) {
            rt.in_flight = rt.in_flight.saturating_sub(1);
        }
    }

    /// An answer other than 401 arrived for key `index`: the key works.
    pub(crate) fn validated(&self, index: usize) {
        let mut state = self.lock();
        if let Some(rt) = state.keys.get_mut(index) {
            rt.validated = true;
        }
    }

    /// Key `index` got a 429 in `group`: skip it there until `until` (an earlier cooldown
    /// that ends later is kept).
    /// How long key `index` still cools down in `group` (zero: it does not).
    pub(crate) fn cooldown_left(
        &self,
        index: usize,
        group: &RateLimitGroup,
        now: Instant,
    ) -> Duration {
        self.lock()
            .keys
            .get(index)
            .map_or(Duration::ZERO, |rt| rt.cooldown_left(group, now))
    }

    pub(crate) fn cool_down(&self, index: usize, group: &RateLimitGroup, until: Instant) {
        let mut state = self.lock();
        if let Some(rt) = state.keys.get_mut(index) {
            rt.rate_limited += 1;
            let entry = rt.cooldowns.entry(group.clone()).or_insert(until);
            if *entry < until {
                *entry = until;
            }
            let now = Instant::now();
            rt.cooldowns.retain(|_, t| *t > now);
        }
    }

    /// Key `index` got a 403 in `group`: pick it there only when no other key can be, until
    /// `until`. Returns `true` when it was not forbidden there already.
    pub(crate) fn forbid(&self, index: usize, group: &RateLimitGroup, until: Instant) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        match state.keys.get_mut(index) {
            Some(rt) => {
                let was = rt.is_forbidden(group, now);
                rt.forbidden.insert(group.clone(), until);
                rt.forbidden.retain(|_, t| *t > now);
                !was
            }
            None => false,
        }
    }

    /// Takes key `index` out of rotation (counted in `tower_claude_keys_removed_total` with
    /// the `metrics` feature). Returns `true` when it was in rotation.
    pub(crate) fn remove(&self, index: usize, reason: RemovalReason) -> bool {
        let mut state = self.lock();
        match state.keys.get_mut(index) {
            Some(rt) if rt.removed.is_none() => {
                rt.removed = Some((reason, Instant::now()));
                #[cfg(feature = "metrics")]
                metrics::counter!(
                    crate::metrics::names::KEYS_REMOVED_TOTAL,
                    crate::metrics::names::LABEL_REASON => reason.as_str()
                )
                .increment(1);
                true
            }
            _ => false,
        }
    }

    /// The keys in rotation as the pool would weigh them for `group`: id, cooldown left
    /// there, and whether a 403 put the key last there.
    pub(crate) fn outlook(&self, group: &RateLimitGroup, now: Instant) -> Vec<KeyOutlook> {
        let state = self.lock();
        self.keys
            .iter()
            .zip(state.keys.iter())
            .filter(|(_, rt)| rt.removed.is_none())
            .map(|(key, rt)| KeyOutlook {
                id: key.id.clone(),
                cooldown: rt.cooldown_left(group, now),
                forbidden: rt.is_forbidden(group, now),
            })
            .collect()
    }

    /// How soon a key other than `except` can take a request: in rotation, not forbidden in
    /// the group, then the later of its cooldown and the time until the cost fits its
    /// buckets; the soonest wins. Without a group (other endpoints), any other key in
    /// rotation, now. `None` when no other key can.
    pub(crate) fn sooner_elsewhere(
        &self,
        except: usize,
        target: Option<(&RateLimitGroup, &Cost)>,
        board: &QuotaBoard,
        now: Instant,
    ) -> Option<Duration> {
        let state = self.lock();
        self.keys
            .iter()
            .zip(state.keys.iter())
            .enumerate()
            .filter(|(i, (_, rt))| *i != except && rt.removed.is_none())
            .filter_map(|(_, (key, rt))| match target {
                None => Some(Duration::ZERO),
                Some((group, cost)) => {
                    if rt.is_forbidden(group, now) {
                        return None;
                    }
                    let look = board.look(&key.id, group, cost);
                    let quota = if look.fits {
                        Duration::ZERO
                    } else {
                        look.wait?
                    };
                    Some(quota.max(rt.cooldown_left(group, now)))
                }
            })
            .min()
    }

    fn index_of(&self, key: &KeyId) -> Option<usize> {
        self.keys.iter().position(|k| &k.id == key)
    }

    pub(crate) fn active(&self) -> usize {
        self.lock()
            .keys
            .iter()
            .filter(|rt| rt.removed.is_none())
            .count()
    }

    fn status(&self, index: usize, rt: &KeyRuntime, now: Instant) -> KeyStatus {
        // The groups whose deadline is still ahead, with the time left, sorted by group.
        let left = |until: &HashMap<RateLimitGroup, Instant>| {
            let mut v: Vec<_> = until
                .iter()
                .filter(|(_, until)| **until > now)
                .map(|(g, until)| (g.clone(), until.saturating_duration_since(now)))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let (cooldowns, forbidden) = (left(&rt.cooldowns), left(&rt.forbidden));
        KeyStatus {
            key: self.keys[index].id.clone(),
            state: match rt.removed {
                None => KeyState::Active,
                Some((reason, at)) => KeyState::Removed {
                    reason,
                    since: now.saturating_duration_since(at),
                },
            },
            cooldowns,
            forbidden,
            in_flight: rt.in_flight,
            requests: rt.requests,
            rate_limited: rt.rate_limited,
        }
    }
}

/// A handle on a key pool's state, shared with every service of its
/// [`KeyPoolLayer`](super::KeyPoolLayer): which keys are in rotation, cooling down, removed
/// and why, and how much each was used. Cheap to clone.
///
/// ```
/// use tower_claude::key_pool::{KeyPoolLayer, KeyState, RemovalReason};
///
/// let layer = KeyPoolLayer::new(["sk-ant-a", "sk-ant-b"]).unwrap();
/// let handle = layer.handle();
/// assert_eq!(handle.len(), 2);
/// let first = handle.statuses()[0].key.clone();
/// assert!(handle.remove(&first));
/// assert_eq!(handle.active(), 1);
/// assert!(matches!(
///     handle.status(&first).unwrap().state,
///     KeyState::Removed { reason: RemovalReason::Manual, .. }
/// ));
/// assert!(handle.restore(&first)); // e.g. after raising the spend cap
/// assert_eq!(handle.active(), 2);
/// ```
#[derive(Clone)]
pub struct KeyPoolHandle {
    pub(crate) pool: Arc<Pool>,
}

impl fmt::Debug for KeyPoolHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPoolHandle")
            .field("keys", &self.len())
            .field("active", &self.active())
            .finish()
    }
}

impl KeyPoolHandle {
    /// The keys in rotation for `group` (for a layer above that weighs the whole pool).
    pub(crate) fn outlook(&self, group: &RateLimitGroup) -> Vec<KeyOutlook> {
        self.pool.outlook(group, Instant::now())
    }

    /// The number of keys in the pool (in rotation or not).
    pub fn len(&self) -> usize {
        self.pool.len()
    }

    /// Whether the pool has no key (never true: a pool needs at least one).
    pub fn is_empty(&self) -> bool {
        self.pool.len() == 0
    }

    /// The number of keys in rotation.
    pub fn active(&self) -> usize {
        self.pool.active()
    }

    /// The ids of the keys, in the order given.
    pub fn keys(&self) -> Vec<KeyId> {
        self.pool.keys.iter().map(|k| k.id.clone()).collect()
    }

    /// The status of every key, in the order given.
    pub fn statuses(&self) -> Vec<KeyStatus> {
        let now = Instant::now();
        let state = self.pool.lock();
        state
            .keys
            .iter()
            .enumerate()
            .map(|(i, rt)| self.pool.status(i, rt, now))
            .collect()
    }

    /// The status of one key (`None`: not in this pool).
    pub fn status(&self, key: &KeyId) -> Option<KeyStatus> {
        let index = self.pool.index_of(key)?;
        let now = Instant::now();
        let state = self.pool.lock();
        Some(self.pool.status(index, &state.keys[index], now))
    }

    /// Takes a key out of rotation by hand ([`RemovalReason::Manual`]). Returns `false` when
    /// the key is not in the pool or already out.
    pub fn remove(&self, key: &KeyId) -> bool {
        match self.pool.index_of(key) {
            Some(i) => {
                let removed = self.pool.remove(i, RemovalReason::Manual);
                if removed {
                    tracing::warn!(key = %key, "key pool: key removed by hand");
                }
                removed
            }
            None => false,
        }
    }

    /// Puts a removed key back into rotation (after raising its spend cap, say), with its
    /// cooldowns cleared. Returns `false` when the key is not in the pool or not removed.
    pub fn restore(&self, key: &KeyId) -> bool {
        let Some(index) = self.pool.index_of(key) else {
            return false;
        };
        let mut state = self.pool.lock();
        let rt = &mut state.keys[index];
        if rt.removed.take().is_some() {
            rt.cooldowns.clear();
            tracing::info!(key = %key, "key pool: key back in rotation");
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::quota::Limits;

    #[derive(Debug, Clone)]
    enum Op {
        Pick,
        Done(usize),
        CoolDown(usize, u64),
        Remove(usize),
        Restore(usize),
        Validate(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Pick),
            2 => (0..4usize).prop_map(Op::Done),
            1 => (0..4usize, 1..120u64).prop_map(|(k, s)| Op::CoolDown(k, s)),
            1 => (0..4usize).prop_map(Op::Remove),
            1 => (0..4usize).prop_map(Op::Restore),
            1 => (0..4usize).prop_map(Op::Validate),
            1 => (1..90u64).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// A pick never returns a key out of rotation, fails only when every key is out,
        /// prefers keys not on probation (first request still out), and among those never
        /// returns a key that must wait while another could take the request now.
        #[test]
        fn picks_respect_removals_and_cooldowns(ops in proptest::collection::vec(op(), 1..60)) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let pool = Pool::new(["k0", "k1", "k2", "k3"]).unwrap();
                let handle = KeyPoolHandle { pool: Arc::new(pool) };
                let pool = &handle.pool;
                let group = RateLimitGroup::new("g");
                let board = QuotaBoard::builder().default_limits(Limits::new(5, 1_000, 1_000)).build();
                let cost = Cost::new(1, 10, 10);
                let ids = handle.keys();
                let mut validated = [false; 4];
                for op in ops {
                    match op {
                        Op::Pick => {
                            let now = Instant::now();
                            let statuses = handle.statuses();
                            let active: Vec<_> = statuses
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.state == KeyState::Active)
                                .collect();
                            let trusted: Vec<_> = active
                                .iter()
                                .filter(|(i, s)| validated[*i] || s.in_flight == 0)
                                .collect();
                            let candidates = if trusted.is_empty() { active.iter().collect() } else { trusted };
                            let free_now: Vec<_> = candidates.iter().filter(|(_, s)| {
                                s.cooldowns.is_empty() && board.fits_now(&s.key, &group, &cost)
                            }).map(|(_, s)| s.key.clone()).collect();
                            let allowed: Vec<_> = candidates.iter().map(|(_, s)| s.key.clone()).collect();
                            match pool.pick(Some((&group, &cost)), &board, now) {
                                Ok(pick) => {
                                    let st = handle.status(&pick.id).unwrap();
                                    prop_assert!(matches!(st.state, KeyState::Active));
                                    prop_assert!(allowed.contains(&pick.id));
                                    if !free_now.is_empty() {
                                        prop_assert!(free_now.contains(&pick.id));
                                    }
                                    if let Ok(r) = board.try_acquire(&pick.id, &group, cost) {
                                        r.settle(cost);
                                    }
                                }
                                Err(e) => {
                                    prop_assert_eq!(e.kind(), super::super::KeyPoolErrorKind::AllKeysRemoved);
                                    prop_assert_eq!(handle.active(), 0);
                                }
                            }
                        }
                        Op::Done(k) => pool.done(k),
                        Op::CoolDown(k, s) => {
                            pool.cool_down(k, &group, Instant::now() + Duration::from_secs(s))
                        }
                        Op::Remove(k) => {
                            handle.remove(&ids[k]);
                        }
                        Op::Restore(k) => {
                            handle.restore(&ids[k]);
                        }
                        Op::Validate(k) => {
                            pool.validated(k);
                            validated[k] = true;
                        }
                        Op::Advance(s) => tokio::time::advance(Duration::from_secs(s)).await,
                    }
                }
                Ok(())
            })?;
        }
    }

    #[test]
    fn equal_keys_rotate() {
        let pool = Pool::new(["a", "b", "c", " a "]).unwrap();
        assert_eq!(pool.len(), 3, "duplicates are kept once");
        let board = QuotaBoard::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut seen = Vec::new();
            for _ in 0..6 {
                let p = pool.pick(None, &board, Instant::now()).unwrap();
                pool.done(p.index);
                seen.push(p.index);
            }
            assert_eq!(seen, [0, 1, 2, 0, 1, 2]);
        });
    }
}
