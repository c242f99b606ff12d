//! The Redis backend of the [`QuotaBoard`] (feature `redis`): one set of continuous-refill
//! buckets per `(key id, rate-limit group)` shared by every process, kept by an atomic Lua
//! script on the Redis server's clock.
//!
//! * **Acquire** is one round trip (`EVALSHA`): refill, check and take happen in one script,
//!   so no two processes can both take the last unit. A request that does not fit learns how
//!   long to wait and retries then (or earlier, when a reservation of this process is
//!   settled); waiting is not FIFO across processes.
//! * **Settle**, **refund** and **observe** (re-seeding from `anthropic-ratelimit-*` headers,
//!   seen by every node) are sent in the background.
//! * **Reads** ([`QuotaBoard::headroom`], [`fits_now`](super::QuotaBoard::fits_now), ...)
//!   come from a local mirror updated with the levels every script call returns: no round
//!   trip.
//! * **Unknown limits** are learned once for all processes. The hash of a `(key, group)`
//!   holds the capacities as well as the levels, so a process whose limits are unknown first
//!   asks Redis (one extra round trip, only while they are unknown) and adopts the limits
//!   another process learned. When nobody knows them yet, the first process to ask takes a
//!   *learning lock* in Redis and sends the one probe request, as the in-process board does;
//!   every other request, in every process, waits until the probe's headers have seeded Redis
//!   (which then counts the probe) and takes its quota there. So the processes together send
//!   the limit, not one probe each. The lock is released when the probe's answer has reached
//!   Redis, or at once when the probe teaches nothing (an error, no headers, dropped); it
//!   expires after [`RedisOptions::learn_lock_ttl`] if its holder died.
//! * **Redis down** never fails a request: the board logs it (`tracing` warning), counts it
//!   ([`RedisStatus::outages`]), and limits locally with a share of every limit
//!   ([`RedisOptions::expected_nodes`] / [`RedisOptions::local_share`]) until a background
//!   probe finds Redis again. [`RedisOptions::fail_closed`] refuses requests instead
//!   ([`AcquireErrorKind::BackendUnavailable`]). Requests admitted locally during the
//!   outage are not carried over: a restarted Redis (without persistence) starts with full
//!   buckets.
//!
//! ```no_run
//! use tower_claude::anthropic::RateLimitGroup;
//! use tower_claude::quota::{Limits, QuotaBoard, RedisOptions};
//! use tower_claude::rate_limit::RateLimitLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Two proxy nodes share the key's limits; each may use half of them while Redis is down.
//! let board = QuotaBoard::builder()
//!     .limits(RateLimitGroup::new("claude-sonnet-4"), Limits::new(50, 30_000, 8_000))
//!     .build_redis("redis://127.0.0.1:6379/", RedisOptions::new().expected_nodes(2))
//!     .await?;
//! let layer = RateLimitLayer::new().board(board.clone());
//! # drop(layer);
//! println!("{:?}", board.redis_status());
//! # Ok(())
//! # }
//! ```
//!
//! Limits must agree between processes (configure the same limits everywhere, or let each
//! learn them from the headers). With the Redis backend, [`QuotaBoard::try_acquire`] cannot
//! decide without a round trip: for a limited `(key, group)`, and for one whose limits are
//! not known yet (Redis may know them), it answers
//! [`QueueTimeout`](AcquireErrorKind::QueueTimeout) with a zero
//! [`available_in`](super::AcquireError::available_in) (so a rate limiter with a zero
//! `max_wait` refuses everything); use [`QuotaBoard::acquire`].
//!
//! [`QuotaBoard`]: super::QuotaBoard
//! [`QuotaBoard::headroom`]: super::QuotaBoard::headroom
//! [`QuotaBoard::try_acquire`]: super::QuotaBoard::try_acquire
//! [`QuotaBoard::acquire`]: super::QuotaBoard::acquire

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, select};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::error::{AcquireError, AcquireErrorKind};
use super::local::{Check, Grant, LocalBackend, Origin, Outcome, SEND_GRACE};
use super::types::{Cost, Limits};
use crate::anthropic::{KeyId, RateLimitGroup, RateLimitSnapshot};

/// The refill period of every bucket (Anthropic's limits are per minute), in microseconds.
const PERIOD_US: u64 = 60_000_000;
/// How long (ms) the hash and the line of a `(key, group)` outlive their last use: two periods.
const LINE_TTL_MS: u64 = PERIOD_US / 1000 * 2;
/// Token `remaining` headers are rounded down to thousands.
const TOKEN_ROUNDING: u64 = 999;

/// One script for every operation, so that the hot path is a single `EVALSHA`.
///
/// `KEYS[1]`: the `(key, group)` hash (`t`: last update in µs, `l1..l3`: levels, `c1..c3`:
/// the capacities of the last process that saw response headers (`observe` / `seed`) or that
/// created the hash, so that a process that has not learned the limits yet can adopt them
/// instead of probing).
/// `ARGV`: mode, period (µs), ttl (ms), cap1..3 (-1: unknown bucket), then per mode
/// (the capacities are read by [`PEEK_SCRIPT`]);
/// `acquire`: amount1..3; `settle`: delta1..3 (added, clamped to the capacity);
/// `observe`: remaining1..3 (-1: none), rounding1..3 (a level above `remaining + rounding`
/// is lowered to `remaining`); `seed` (the first headers this process learned limits from):
/// as `observe`, after taking probe1..3 from buckets that already existed (created by another
/// process, they do not count this process's probe; new buckets start from `remaining`,
/// which does).
/// `KEYS[2]` / `KEYS[3]`: the line of waiters and when each ticket was last seen;
/// `KEYS[4]`: the grants taken and not yet settled, by id (an acquire's `ARGV[12]`, a
/// settle's `ARGV[16]`): a settle counts once, so one held during an outage or sent again
/// after a timeout is harmless, and so is giving back a grant whose acquire timed out.
/// Returns `{status, wait_us, l1, l2, l3}` as strings (`''` for an unknown bucket).
const SCRIPT: &str = include_str!("lua/acquire.lua");

/// Looks for the capacities another process learned, else takes the learning lock.
///
/// `KEYS[1]`: the `(key, group)` hash; `KEYS[2]`: its learning lock; `KEYS[3]` / `KEYS[4]`: its
/// line and the line's last-seen times (as in [`SCRIPT`]). `ARGV[1]`: this process's token,
/// `ARGV[2]`: the lock's time to live (ms), `ARGV[3]`: the waiter's ticket (`0`: none),
/// `ARGV[4]`: the line's time to live (ms), `ARGV[5]`: `1` when this process's probe is out
/// (a waiter told `learn` then queues too: it waits for that probe), `ARGV[6]`: `1` when this
/// process learns another key of the group already and leaves a free lock to the others for
/// now (see [`LEARN_DEFER`]).
/// Returns `{status, wait_us, c1, c2, c3}`: `ok` with the stored capacities; `learn` when this
/// process holds the lock (it sends the one request that learns the limits); `wait` with the
/// lock's remaining time to live (µs, like every reply's wait) when another process holds it;
/// `defer` when the lock is free and `ARGV[6]` left it (the waiter queues, as with `wait`).
/// A waiter told to wait takes its place in the line now (issue 12: waiters of the nodes that
/// did not learn the limits arrived as early as the learner's, and must not find the line
/// empty when the limits appear).
const PEEK_SCRIPT: &str = include_str!("lua/peek.lua");

/// Takes ticket `ARGV[1]` out of the line `KEYS[1]` / `KEYS[2]` (a waiter served elsewhere
/// or gone).
const LEAVE_SCRIPT: &str = include_str!("lua/leave.lua");

/// A ticket not seen for this long leaves the line (its process died or moved on); waiters
/// holding one look again at least every [`TICKET_REFRESH`].
const TICKET_STALE: Duration = Duration::from_secs(2);
const TICKET_REFRESH: Duration = Duration::from_millis(500);

/// Releases the learning lock `KEYS[1]` if this process (`ARGV[1]`) still holds it.
const UNLOCK_SCRIPT: &str = include_str!("lua/unlock.lua");

/// How often a process waiting for another one to learn the limits asks Redis again.
const LEARN_POLL: Duration = Duration::from_millis(50);

/// How long a process that already learns one key of a group leaves the free learning lock
/// of another key of that group to the other processes (issue 12). The node whose requests
/// reach Redis first used to take every key's lock and send every probe (one per key): its
/// fleet led by one admission per key from the first second to the end (with 4 nodes and
/// 4 keys, 14 of the first 40 admissions against 8–9). With this, each node that asks
/// within the moment probes one key; past it, the process takes the lock itself, so a
/// lone node learns every key 150 ms later at most. Not applied with one expected node.
const LEARN_DEFER: Duration = Duration::from_millis(150);

/// Options of the Redis quota backend.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::quota::RedisOptions;
///
/// let options = RedisOptions::new()
///     .expected_nodes(3)                       // each node may use 1/3 while Redis is down
///     .key_prefix("myapp:quota:")
///     .connect_timeout(Duration::from_millis(300))
///     .response_timeout(Duration::from_millis(100))
///     .probe_interval(Duration::from_secs(1))
///     .learn_lock_ttl(Duration::from_secs(30));
/// assert!((options.share() - 1.0 / 3.0).abs() < 1e-9);
/// assert!((options.clone().local_share(0.5).share() - 0.5).abs() < 1e-9);
/// ```
#[derive(Debug, Clone)]
pub struct RedisOptions {
    key_prefix: String,
    expected_nodes: u32,
    local_share: Option<f64>,
    connect_timeout: Duration,
    response_timeout: Duration,
    probe_interval: Duration,
    fail_closed: bool,
    learn_lock_ttl: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisOptions {
    /// Defaults: key prefix `tower-claude:quota:`, 1 expected node, 500 ms connect timeout,
    /// 1 s response timeout, a probe every second while Redis is down, fail open.
    ///
    /// (The response timeout was 250 ms: on a loaded machine a loopback Redis sometimes
    /// answers later than that, and every node in a call marked Redis down at the same
    /// instant for a second of local shares — about one scale run in three at load 8–9,
    /// issue 12. A Redis that is gone fails the call at once with a connection error; only a
    /// Redis that hangs costs the calls in flight the whole timeout.)
    pub fn new() -> Self {
        Self {
            key_prefix: "tower-claude:quota:".to_owned(),
            expected_nodes: 1,
            local_share: None,
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(1),
            probe_interval: Duration::from_secs(1),
            fail_closed: false,
            learn_lock_ttl: Duration::from_secs(60),
        }
    }

    /// The prefix of every Redis key the board writes.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How many processes share the limits: while Redis is down, each limits locally to
    /// `1 / nodes` of every limit (at least 1). Set it to the number of proxy nodes, or
    /// several nodes together send several times the limit during an outage.
    pub fn expected_nodes(mut self, nodes: u32) -> Self {
        self.expected_nodes = nodes.max(1);
        self
    }

    /// The share of every limit this process uses while Redis is down, in `(0, 1]`
    /// (overrides [`expected_nodes`](Self::expected_nodes)).
    pub fn local_share(mut self, share: f64) -> Self {
        self.local_share = Some(share);
        self
    }

    /// How long to wait for a connection to Redis.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for a reply; a request whose script gets no reply in time is limited
    /// locally (and the backend switches to local limits until Redis answers again).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How often to probe Redis while it is down.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// How long one process may hold the right to learn unknown limits (60 s by default).
    ///
    /// When no process knows the limits of a `(key, group)` yet, the first to ask takes a lock
    /// in Redis and sends the one request whose response headers teach them; the others wait
    /// for the limits to appear in Redis, and adopt them. The lock is released when that
    /// answer (or failure) comes back; this bounds how long the others wait for a process that
    /// died meanwhile.
    pub fn learn_lock_ttl(mut self, ttl: Duration) -> Self {
        self.learn_lock_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// While Redis is down, refuse requests with
    /// [`AcquireErrorKind::BackendUnavailable`] instead of limiting locally.
    pub fn fail_closed(mut self, fail_closed: bool) -> Self {
        self.fail_closed = fail_closed;
        self
    }

    /// The share of every limit used locally while Redis is down.
    pub fn share(&self) -> f64 {
        match self.local_share {
            Some(s) if s.is_finite() && s > 0.0 => s.min(1.0),
            _ => 1.0 / f64::from(self.expected_nodes.max(1)),
        }
    }
}

/// The state of a board's Redis backend
/// ([`QuotaBoard::redis_status`](super::QuotaBoard::redis_status)).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RedisStatus {
    /// Redis is unreachable: the board limits locally (or refuses, when failing closed).
    pub degraded: bool,
    /// How many times Redis became unreachable.
    pub outages: u64,
    /// How many times it came back.
    pub recoveries: u64,
    /// Requests admitted by Redis.
    pub shared_grants: u64,
    /// Requests routed to the local fallback buckets while Redis was down.
    pub fallback_acquires: u64,
    /// Redis commands that failed (connection errors, timeouts, script errors).
    pub errors: u64,
    /// The share of every limit used locally while Redis is down.
    pub local_share: f64,
}

/// What went wrong setting up the Redis backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisSetupErrorKind {
    /// The URL is not a valid Redis URL.
    InvalidUrl,
}

/// The Redis backend could not be set up. An unreachable server is not an error: the board
/// starts with local limits and switches to Redis when a probe reaches it.
///
/// ```
/// use tower_claude::quota::{QuotaBoard, RedisOptions, RedisSetupErrorKind};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let err = QuotaBoard::redis("http://not-redis", RedisOptions::new()).await.unwrap_err();
/// assert_eq!(err.kind(), RedisSetupErrorKind::InvalidUrl);
/// # }
/// ```
#[derive(Debug)]
pub struct RedisSetupError {
    kind: RedisSetupErrorKind,
    source: redis::RedisError,
}

impl RedisSetupError {
    /// The kind of error.
    pub fn kind(&self) -> RedisSetupErrorKind {
        self.kind
    }
}

impl fmt::Display for RedisSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RedisSetupErrorKind::InvalidUrl => write!(f, "invalid Redis URL: {}", self.source),
        }
    }
}

impl std::error::Error for RedisSetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A failed Redis command.
#[derive(Debug)]
enum StoreError {
    Redis(redis::RedisError),
    Timeout,
    NotConnected,
    BadReply,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Redis(e) => write!(f, "{e}"),
            StoreError::Timeout => f.write_str("no reply in time"),
            StoreError::NotConnected => f.write_str("not connected"),
            StoreError::BadReply => f.write_str("unexpected script reply"),
        }
    }
}

/// What [`RedisShared::peek`] found.
#[derive(Debug)]
enum Peek {
    /// The capacities another process learned.
    Learned([Option<u64>; 3]),
    /// None yet, and this process holds the learning lock.
    Learn,
    /// None yet, and another process holds the lock for this long still (or this process
    /// left the free lock to the others: [`LEARN_DEFER`]).
    Wait(Duration),
}

/// The learning locks this process holds, and since when it leaves each free one to the
/// other processes (see [`LEARN_DEFER`]). Bounded by the `(key, group)` pairs in use.
#[derive(Debug, Default)]
struct Learning {
    held: HashSet<(KeyId, RateLimitGroup)>,
    deferred: HashMap<(KeyId, RateLimitGroup), Instant>,
}

/// A script reply: status, wait, levels of the known buckets.
#[derive(Debug)]
struct Reply {
    status: String,
    wait: Duration,
    levels: [Option<f64>; 3],
    /// The store's `settled` counters (upward reconciliation); zeros from the other scripts.
    settled: [u64; 3],
    /// The store's `returned` counters (what settled grants gave back); zeros from the other
    /// scripts.
    returned: [u64; 3],
    /// An acquire's place in the line (µs): the waiter's ticket's with `wait`, its
    /// successor's with `ok` (0: none).
    place: i64,
}

impl Reply {
    fn parse(raw: Vec<String>) -> Result<Self, StoreError> {
        if raw.len() != 5 && raw.len() != 11 && raw.len() != 12 {
            return Err(StoreError::BadReply);
        }
        let place = match raw.get(11) {
            Some(text) => text.parse().map_err(|_| StoreError::BadReply)?,
            None => 0,
        };
        let (mut settled, mut returned) = ([0u64; 3], [0u64; 3]);
        let counters = settled.iter_mut().chain(returned.iter_mut());
        for (slot, text) in counters.zip(raw.iter().skip(5)) {
            *slot = text.parse().map_err(|_| StoreError::BadReply)?;
        }
        let wait_us: u64 = raw[1].parse().map_err(|_| StoreError::BadReply)?;
        let mut levels = [None; 3];
        for (slot, text) in levels.iter_mut().zip(&raw[2..5]) {
            if !text.is_empty() {
                *slot = Some(text.parse::<f64>().map_err(|_| StoreError::BadReply)?);
            }
        }
        Ok(Self {
            status: raw[0].clone(),
            wait: Duration::from_micros(wait_us),
            levels,
            settled,
            returned,
            place,
        })
    }
}

#[derive(Debug, Default)]
struct Counters {
    outages: AtomicU64,
    recoveries: AtomicU64,
    shared_grants: AtomicU64,
    fallback_acquires: AtomicU64,
    errors: AtomicU64,
}

/// The Redis side of a board: connection, script, local mirror, health. The board used
/// during outages is the caller's (it lives in `board.rs`): this side says when to use it
/// ([`serves_fallback`](Self::serves_fallback), [`RemoteGrant::Fallback`]).
pub(crate) struct RedisShared {
    mirror: Arc<LocalBackend>,
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    script: redis::Script,
    peek_script: redis::Script,
    unlock_script: redis::Script,
    leave_script: redis::Script,
    /// This process's value in the learning locks it holds.
    token: String,
    options: RedisOptions,
    share: f64,
    degraded: AtomicBool,
    probing: AtomicBool,
    /// Wakes this process's Redis waiters when one of its reservations gives quota back.
    refunded: Notify,
    counters: Counters,
    /// Writes held while Redis is marked down (or whose call failed), sent when it is back.
    deferred: Mutex<VecDeque<Deferred>>,
    /// Settles of a `(key, group)` whose seed is on its way to Redis, sent once it ran: the
    /// seed holds the blind grants still out, so a blind grant's settle that reached Redis
    /// first found nothing held and the seed then held it for good (issue 12, eighth pass).
    /// The lock also covers the mirror's [`seeded`](LocalBackend::seeded), so no settle is
    /// left here behind a seed that already ran.
    after_seed: Mutex<Vec<Deferred>>,
    /// The learning locks this process holds (spreading the probes over the nodes).
    learning: Mutex<Learning>,
}

/// At most this many writes wait for Redis to come back; past it the oldest is dropped (a
/// warning): an outage never grows memory without bound.
const MAX_DEFERRED: usize = 10_000;

/// A write to Redis that must not be lost to an outage (issue 12). While Redis was marked
/// down, settles and leaves used to be skipped: a grant taken in Redis before the outage and
/// settled during it kept its reservation (its refund lost) and stayed in the hash's `held`
/// units for good, which blocked every later upward reconciliation of the key (a raise
/// subtracts `held`); a served waiter's ticket blocked the line until it went stale. Settles
/// carry the grant's id, so sending one again is harmless.
#[derive(Debug)]
enum Deferred {
    /// A `settle` script call (its arguments, ending with the grant's id).
    Settle {
        key: KeyId,
        group: RateLimitGroup,
        caps: [Option<u64>; 3],
        args: [i64; 10],
    },
    /// A ticket to take out of a line.
    Leave {
        key: KeyId,
        group: RateLimitGroup,
        ticket: i64,
    },
}

impl fmt::Debug for RedisShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisShared")
            .field("degraded", &self.degraded.load(Ordering::Relaxed))
            .field("share", &self.share)
            .finish()
    }
}

/// The Redis path of an [`Acquire`](super::Acquire): its future, `None` when the local path
/// applies after all (the store had no limits to adopt).
type RemoteAcquire =
    Pin<Box<dyn Future<Output = Option<Result<RemoteGrant, AcquireError>>> + Send>>;

/// How the Redis path of an [`Acquire`](super::Acquire) ends when it does not fail.
pub(crate) enum RemoteGrant {
    /// Taken (in Redis; or without limit, when the limits were forgotten meanwhile): the
    /// board wraps it into a reservation of its own.
    Granted(Grant),
    /// Redis is down and the board fails open: the acquire continues on the board's outage
    /// fallback (counted in [`RedisStatus::fallback_acquires`]). The acquire's ticket in the
    /// Redis line goes with it, to be left when the fallback's acquire ends.
    Fallback(Leave),
}

/// The Redis side of one [`Acquire`](super::Acquire).
#[derive(Default)]
pub(crate) struct RemoteState {
    fut: Option<RemoteAcquire>,
    /// The store was asked for limits learned by another process and had none: this acquire
    /// takes the local (probe) path while its limits are unknown.
    peeked: bool,
}

fn share_limit(limit: u64, share: f64) -> u64 {
    if share >= 1.0 {
        return limit;
    }
    ((limit as f64 * share).floor() as u64).max(limit.min(1))
}

/// `share` of every limit in `limits` (rounded down, but at least 1 of a non-zero limit).
pub(crate) fn share_of(limits: Limits, share: f64) -> Limits {
    Limits::new(
        share_limit(limits.rpm, share),
        share_limit(limits.itpm, share),
        share_limit(limits.otpm, share),
    )
}

/// Runs `fut` in the background; `false` outside a Tokio runtime (nothing runs).
fn spawn<F: Future<Output = ()> + Send + 'static>(fut: F) -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(fut);
            true
        }
        Err(_) => false,
    }
}

/// The arguments of an acquire: the amounts, the waiter's ticket (0: none), when a ticket
/// goes stale (µs), the id the grant gets if the script grants, and the ticket queued in
/// its place when it does (0: none; see [`RedisShared::try_once`]).
fn acquire_args(amounts: &[u64; 3], ticket: i64, id: i64, place: &Place) -> [i64; 8] {
    let a = amounts.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    let stale = i64::try_from(TICKET_STALE.as_micros()).unwrap_or(i64::MAX);
    [a[0], a[1], a[2], ticket, stale, id, place.next, place.at]
}

/// Where a waiter stands in the Redis lines of the keys it waits on (the key pool's head):
/// one place for all of them, the time its ticket first queued in one (issue 12).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Place {
    /// Its place (µs, Redis clock; 0: not queued yet).
    pub(crate) at: i64,
    /// The ticket to queue for its successor on this node when it is served (0: none).
    pub(crate) next: i64,
    /// Set when it was served: the successor's place.
    pub(crate) next_at: i64,
}

/// The arguments of a settle that gives all of `amounts` back, for grant `id`.
fn refund_args(amounts: &[u64; 3], id: i64) -> [i64; 10] {
    let a = amounts.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    [a[0], a[1], a[2], a[0], a[1], a[2], 0, 0, 0, id]
}

/// A new ticket for a line in Redis (random: unique across processes in practice).
pub(crate) fn new_ticket() -> i64 {
    fastrand::i64(1..i64::MAX)
}

fn cap_arg(cap: Option<u64>) -> i64 {
    cap.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX))
}

impl RedisShared {
    pub(crate) fn share_of(&self, limits: Limits) -> Limits {
        share_of(limits, self.share)
    }

    fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Whether the board's outage fallback serves now: Redis is down and the board fails
    /// open.
    pub(crate) fn serves_fallback(&self) -> bool {
        self.is_degraded() && !self.options.fail_closed
    }

    fn redis_key(&self, key: &KeyId, group: &RateLimitGroup) -> String {
        format!("{}{{{}:{}}}", self.options.key_prefix, key, group)
    }

    fn learn_lock_key(&self, key: &KeyId, group: &RateLimitGroup) -> String {
        format!("{}:learn", self.redis_key(key, group))
    }

    /// The capacities another process learned for `(key, group)`, else whether this process
    /// may learn them (it holds the learning lock) or must wait for another.
    /// A waiter told to wait holds `ticket` (`0`: none) in the line of `(key, group)`, and
    /// so does one told to learn when `probing` (this process's probe is out already: it
    /// waits for that probe).
    async fn peek(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        ticket: i64,
        probing: bool,
    ) -> Result<Peek, StoreError> {
        let Some(mut conn) = self.connection() else {
            return Err(StoreError::NotConnected);
        };
        let ttl = u64::try_from(self.options.learn_lock_ttl.as_millis()).unwrap_or(u64::MAX);
        let defer = self.defers_learning(key, group);
        let bucket = self.redis_key(key, group);
        let mut inv = self.peek_script.key(&bucket);
        inv.key(self.learn_lock_key(key, group))
            .key(format!("{bucket}:line"))
            .key(format!("{bucket}:seen"))
            .arg(&self.token)
            .arg(ttl)
            .arg(ticket)
            .arg(LINE_TTL_MS)
            .arg(u8::from(probing))
            .arg(u8::from(defer));
        let call = inv.invoke_async::<Vec<String>>(&mut conn);
        let reply = match tokio::time::timeout(self.options.response_timeout, call).await {
            Err(_) => return Err(StoreError::Timeout),
            Ok(Err(e)) => return Err(StoreError::Redis(e)),
            Ok(Ok(raw)) => Reply::parse(raw)?,
        };
        let peek = match reply.status.as_str() {
            "ok" => Peek::Learned(reply.levels.map(|c| c.map(|c| c.max(0.0) as u64))),
            "learn" => Peek::Learn,
            "wait" => Peek::Wait(reply.wait),
            "defer" => {
                tracing::debug!(
                    key = %key,
                    group = %group,
                    "quota board: learning another key of the group; this one left to the other nodes for now"
                );
                Peek::Wait(LEARN_POLL)
            }
            _ => return Err(StoreError::BadReply),
        };
        let mut learning = self.learning.lock().unwrap_or_else(|e| e.into_inner());
        let pair = (key.clone(), group.clone());
        match peek {
            Peek::Learn => {
                learning.deferred.remove(&pair);
                learning.held.insert(pair);
            }
            Peek::Learned(_) => {
                learning.deferred.remove(&pair);
                learning.held.remove(&pair);
            }
            Peek::Wait(_) => {}
        }
        Ok(peek)
    }

    /// Whether a peek at `(key, group)` leaves a free learning lock to the other processes:
    /// this one holds the lock of another key of the group, for at most [`LEARN_DEFER`] since
    /// it first did so for this key, and other processes are expected (a local share below 1).
    fn defers_learning(&self, key: &KeyId, group: &RateLimitGroup) -> bool {
        if self.share >= 1.0 {
            return false;
        }
        let mut learning = self.learning.lock().unwrap_or_else(|e| e.into_inner());
        let pair = (key.clone(), group.clone());
        if learning.held.contains(&pair) || !learning.held.iter().any(|(_, g)| g == group) {
            return false;
        }
        let since = *learning.deferred.entry(pair).or_insert_with(Instant::now);
        since.elapsed() < LEARN_DEFER
    }

    /// The request that was to learn the limits of `(key, group)` got its answer, or never
    /// will: release the learning lock (in the background), so that the others adopt the
    /// limits or one of them tries.
    pub(crate) fn release_learn_lock(self: &Arc<Self>, key: &KeyId, group: &RateLimitGroup) {
        self.learning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .remove(&(key.clone(), group.clone()));
        if self.is_degraded() {
            return;
        }
        let shared = self.clone();
        let lock = self.learn_lock_key(key, group);
        spawn(async move {
            let Some(mut conn) = shared.connection() else {
                return;
            };
            let mut inv = shared.unlock_script.key(lock);
            inv.arg(&shared.token);
            let call = inv.invoke_async::<i64>(&mut conn);
            if let Ok(Err(e)) = tokio::time::timeout(shared.options.response_timeout, call).await {
                tracing::debug!(error = %e, "quota board: cannot release a learning lock");
            }
        });
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn eval(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        mode: &str,
        caps: &[Option<u64>; 3],
        extra: &[i64],
    ) -> Result<Reply, StoreError> {
        let Some(mut conn) = self.connection() else {
            return Err(StoreError::NotConnected);
        };
        let bucket = self.redis_key(key, group);
        let mut inv = self.script.key(&bucket);
        inv.key(format!("{bucket}:line"))
            .key(format!("{bucket}:seen"))
            .key(format!("{bucket}:grants"));
        inv.arg(mode).arg(PERIOD_US).arg(LINE_TTL_MS);
        for cap in caps {
            inv.arg(cap_arg(*cap));
        }
        for x in extra {
            inv.arg(*x);
        }
        let call = inv.invoke_async::<Vec<String>>(&mut conn);
        match tokio::time::timeout(self.options.response_timeout, call).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Ok(Ok(raw)) => Reply::parse(raw),
        }
    }

    /// Takes `ticket` out of the line of `(key, group)`, in the background.
    /// While Redis is marked down it is sent when Redis is back (else the ticket would
    /// block the line until it goes stale).
    pub(crate) fn leave(self: &Arc<Self>, key: &KeyId, group: &RateLimitGroup, ticket: i64) {
        if ticket == 0 {
            return;
        }
        let op = Deferred::Leave {
            key: key.clone(),
            group: group.clone(),
            ticket,
        };
        if self.is_degraded() {
            self.defer(op);
            return;
        }
        let shared = self.clone();
        spawn(async move { shared.send(op).await });
    }

    /// Holds `op` until Redis is back (the oldest goes when [`MAX_DEFERRED`] wait already).
    fn defer(&self, op: Deferred) {
        let mut queue = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= MAX_DEFERRED {
            queue.pop_front();
            tracing::warn!(
                max = MAX_DEFERRED,
                "quota board: too many Redis writes wait for Redis; the oldest is dropped"
            );
        }
        queue.push_back(op);
        tracing::debug!(
            waiting = queue.len(),
            "quota board: Redis write held until Redis is back"
        );
    }

    /// Sends one write. A settle that fails is held again (it is idempotent) and marks Redis
    /// down; a leave that fails is not (the ticket goes stale).
    async fn send(self: &Arc<Self>, op: Deferred) {
        match op {
            Deferred::Settle {
                key,
                group,
                caps,
                args,
            } => match self.eval(&key, &group, "settle", &caps, &args).await {
                Ok(reply) => {
                    self.mirror.set_levels(&key, &group, reply.levels);
                    if args[..3].iter().any(|d| *d > 0) {
                        self.refunded.notify_waiters();
                    }
                }
                Err(e) => {
                    self.defer(Deferred::Settle {
                        key,
                        group,
                        caps,
                        args,
                    });
                    self.mark_down(&e);
                }
            },
            Deferred::Leave { key, group, ticket } => {
                let Some(mut conn) = self.connection() else {
                    return;
                };
                let bucket = self.redis_key(&key, &group);
                let mut inv = self.leave_script.key(format!("{bucket}:line"));
                inv.key(format!("{bucket}:seen")).arg(ticket);
                let call = inv.invoke_async::<i64>(&mut conn);
                let _ = tokio::time::timeout(self.options.response_timeout, call).await;
            }
        }
    }

    /// Redis is back: sends the writes held meanwhile, oldest first, until it fails again.
    async fn flush_deferred(self: &Arc<Self>) {
        let mut sent = 0usize;
        loop {
            if self.is_degraded() {
                break;
            }
            let op = self
                .deferred
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some(op) = op else {
                break;
            };
            self.send(op).await;
            sent += 1;
        }
        if sent > 0 {
            tracing::info!(
                sent,
                "quota board: Redis writes held during the outage sent"
            );
        }
    }

    /// An acquire call failed (timed out, say): the script may have run and granted all the
    /// same. Gives grant `id` back in Redis once it answers (a no-op if it was never taken).
    fn cancel_grant(
        self: &Arc<Self>,
        key: &KeyId,
        group: &RateLimitGroup,
        caps: [Option<u64>; 3],
        amounts: &[u64; 3],
        id: i64,
    ) {
        self.defer(Deferred::Settle {
            key: key.clone(),
            group: group.clone(),
            caps,
            args: refund_args(amounts, id),
        });
    }

    /// A command failed: switch to local limits (once) and start probing.
    fn mark_down(self: &Arc<Self>, error: &StoreError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if self.degraded.swap(true, Ordering::AcqRel) {
            return;
        }
        self.counters.outages.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(crate::metrics::names::QUOTA_REDIS_OUTAGES_TOTAL).increment(1);
        if self.options.fail_closed {
            tracing::error!(error = %error, "quota board: Redis unreachable; refusing requests until it is back (fail closed)");
        } else {
            tracing::warn!(error = %error, local_share = self.share, "quota board: Redis unreachable; limiting locally with a share of every limit until it is back");
        }
        // Waiters on Redis re-route to the fallback.
        self.refunded.notify_waiters();
        self.start_probe();
    }

    fn start_probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let interval = self.options.probe_interval;
        spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(shared) = Weak::upgrade(&weak) else {
                    return;
                };
                if shared.probe_once().await {
                    shared.probing.store(false, Ordering::Release);
                    shared.degraded.store(false, Ordering::Release);
                    shared.counters.recoveries.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("quota board: Redis reachable again; shared limits resume");
                    shared.flush_deferred().await;
                    return;
                }
            }
        });
    }

    /// Connects when needed and sends a `PING`.
    async fn probe_once(&self) -> bool {
        let conn = match self.connection() {
            Some(c) => c,
            None => match connect(&self.client, &self.options).await {
                Some(c) => {
                    *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                    c
                }
                None => return false,
            },
        };
        let mut conn = conn;
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(
            tokio::time::timeout(self.options.response_timeout, ping).await,
            Ok(Ok(_))
        )
    }

    /// The synchronous check of
    /// [`QuotaBoard::try_acquire_inner`](super::QuotaBoard::try_acquire_inner): `None` lets
    /// the local backend decide (limits unknown: the probe path).
    pub(crate) fn try_acquire_check(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: &Cost,
    ) -> Option<Check> {
        if self.is_degraded() {
            return Some(Check::Wait(Duration::ZERO));
        }
        let Some(caps) = self.mirror.capacities(key, group) else {
            // Unknown here, but another process may have learned them: only an asynchronous
            // acquire can ask the store (before probing).
            return self
                .mirror
                .lacks_limits(key, group)
                .then_some(Check::Wait(Duration::ZERO));
        };
        let a = self.mirror.amounts(key, group, cost);
        if caps.iter().zip(a).any(|(c, n)| c.is_some_and(|c| n > c)) {
            return Some(Check::TooLarge);
        }
        Some(Check::Wait(Duration::ZERO))
    }

    /// Settles a Redis grant in the background.
    pub(crate) fn settle(
        self: &Arc<Self>,
        key: &KeyId,
        group: &RateLimitGroup,
        grant: &Grant,
        outcome: Outcome,
    ) {
        let charged = grant.charged.map(|c| c.unwrap_or(0) as i64);
        let final_cost = outcome.final_cost(&grant.charged);
        let deltas: [i64; 3] = match outcome {
            Outcome::Keep | Outcome::Served => [0; 3],
            Outcome::Refund => charged,
            Outcome::Rejected | Outcome::Unknown => [0, charged[1], charged[2]],
            Outcome::Actual(actual) => {
                let a = actual.as_array();
                std::array::from_fn(|i| {
                    if grant.charged[i].is_some() {
                        charged[i] - i64::try_from(a[i]).unwrap_or(i64::MAX)
                    } else {
                        0
                    }
                })
            }
        };
        let mut args = [0i64; 10];
        args[..3].copy_from_slice(&deltas);
        args[3..6].copy_from_slice(&charged);
        for (a, c) in args[6..9].iter_mut().zip(final_cost) {
            *a = i64::try_from(c).unwrap_or(i64::MAX);
        }
        args[9] = grant.id;
        let Some(caps) = self.mirror.capacities(key, group) else {
            return;
        };
        let op = Deferred::Settle {
            key: key.clone(),
            group: group.clone(),
            caps,
            args,
        };
        {
            // A seed on its way (the headers of a probe, then at once the end of its body):
            // the settle goes after it.
            let mut waiting = self.after_seed.lock().unwrap_or_else(|e| e.into_inner());
            if self.mirror.is_seeding(key, group) {
                tracing::debug!(
                    key = %key,
                    group = %group,
                    "quota board: a settle waits for the seed on its way to Redis"
                );
                waiting.push(op);
                return;
            }
        }
        self.send_settle(op);
    }

    /// Sends a settle now, or holds it while Redis is marked down: skipped, the grant's
    /// refund was lost and its units stayed `held` in Redis for good (issue 12).
    fn send_settle(self: &Arc<Self>, op: Deferred) {
        if self.is_degraded() {
            self.defer(op);
            return;
        }
        let shared = self.clone();
        spawn(async move { shared.send(op).await });
    }

    /// The seed of `(key, group)` ran (or cannot run): the mirror releases its waiters, and
    /// the settles that waited for the seed go to Redis.
    fn seed_done(self: &Arc<Self>, key: &KeyId, group: &RateLimitGroup) {
        let ready: Vec<Deferred> = {
            let mut waiting = self.after_seed.lock().unwrap_or_else(|e| e.into_inner());
            self.mirror.seeded(key, group);
            let (ready, rest) = std::mem::take(&mut *waiting).into_iter().partition(|op| {
                matches!(op, Deferred::Settle { key: k, group: g, .. } if k == key && g == group)
            });
            *waiting = rest;
            ready
        };
        for op in ready {
            self.send_settle(op);
        }
    }

    /// Re-seeds the Redis buckets from response headers (the board re-seeds its outage
    /// fallback).
    pub(crate) fn observe(
        self: &Arc<Self>,
        key: &KeyId,
        group: &RateLimitGroup,
        snap: &RateLimitSnapshot,
    ) {
        self.observe_answer(key, group, snap, None);
    }

    /// [`observe`](Self::observe); with the Redis grant these headers answered, also raises
    /// levels the answer proves too low (upward reconciliation on the Redis side).
    pub(crate) fn observe_answer(
        self: &Arc<Self>,
        key: &KeyId,
        group: &RateLimitGroup,
        snap: &RateLimitSnapshot,
        grant: Option<&Grant>,
    ) {
        // When these headers taught the limits, the requests that queued behind the probe
        // wait until Redis holds the server's view (which counts the probe): released
        // earlier, they would take from a fresh, full bucket.
        let seeding = self.mirror.is_seeding(key, group);
        if self.is_degraded() {
            self.seed_done(key, group);
            return;
        }
        let Some(caps) = self.mirror.capacities(key, group) else {
            self.seed_done(key, group);
            return;
        };
        let views = [&snap.requests, &snap.input_tokens, &snap.output_tokens];
        if views.iter().all(|v| v.remaining.is_none()) {
            self.seed_done(key, group);
            return;
        }
        let mut extra = [0i64; 30];
        for (i, v) in views.iter().enumerate() {
            extra[i] = v
                .remaining
                .map_or(-1, |r| i64::try_from(r).unwrap_or(i64::MAX));
            extra[3 + i] = if i == 0 { 0 } else { TOKEN_ROUNDING as i64 };
        }
        // Upward reconciliation: the answer to one of this board's Redis grants, for the
        // buckets whose server limit is the one Redis holds.
        if let Some(grant) = grant.filter(|g| g.origin == Origin::Shared) {
            extra[9] = 1;
            for (i, v) in views.iter().enumerate() {
                extra[10 + i] = i64::try_from(grant.mark[i]).unwrap_or(i64::MAX);
                extra[13 + i] = i64::from(v.limit.is_some() && v.limit == caps[i]);
                extra[16 + i] = i64::try_from(grant.returned[i]).unwrap_or(i64::MAX);
                let own = grant.charged[i].unwrap_or(0);
                extra[20 + i] = i64::try_from(own).unwrap_or(i64::MAX);
            }
            let since = Instant::now().saturating_duration_since(grant.at);
            extra[19] = i64::try_from(since.as_micros()).unwrap_or(i64::MAX);
            // The part of it after the send grace: the server had counted the request by
            // then, so its refill since is certain (`local::certain_refill`).
            let certain = since.saturating_sub(SEND_GRACE);
            extra[23] = i64::try_from(certain.as_micros()).unwrap_or(i64::MAX);
        }
        // The probe's request unit (its tokens hide in the headers' rounding).
        extra[6] = i64::from(seeding);
        if seeding {
            // The grants let through blind behind the probe and still out (issue 12, seventh
            // pass): taken from the seeded levels (but the one these headers answer) and held
            // there, so that Redis raises subtract them and their settles give back to Redis.
            let answered = grant.filter(|g| g.origin == Origin::Local);
            let (take, held) = self.mirror.blind_to_store(key, group, answered);
            for i in 0..3 {
                extra[24 + i] = i64::try_from(take[i]).unwrap_or(i64::MAX);
                extra[27 + i] = i64::try_from(held[i]).unwrap_or(i64::MAX);
            }
        }
        let mode = if seeding { "seed" } else { "observe" };
        let shared = self.clone();
        let (k, g) = (key.clone(), group.clone());
        let task = async move {
            match shared.eval(&k, &g, mode, &caps, &extra).await {
                Ok(reply) => shared.mirror.set_levels(&k, &g, reply.levels),
                Err(e) => shared.mark_down(&e),
            }
            if seeding {
                shared.seed_done(&k, &g);
                // The limits are in Redis now: the processes waiting for them adopt them.
                shared.release_learn_lock(&k, &g);
            }
        };
        if !spawn(task) {
            self.seed_done(key, group);
        }
    }

    pub(crate) fn status(&self) -> RedisStatus {
        let c = &self.counters;
        RedisStatus {
            degraded: self.is_degraded(),
            outages: c.outages.load(Ordering::Relaxed),
            recoveries: c.recoveries.load(Ordering::Relaxed),
            shared_grants: c.shared_grants.load(Ordering::Relaxed),
            fallback_acquires: c.fallback_acquires.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            local_share: self.share,
        }
    }
}

/// One look at the Redis buckets of a `(key, group)` without waiting (see
/// [`QuotaBoard::try_shared`](super::QuotaBoard::try_shared)): `G` is what was taken, a
/// [`Grant`] here, a [`Reservation`](super::Reservation) once the board wraps it.
pub(crate) enum SharedTry<G> {
    /// Taken.
    Granted(G),
    /// Not now: the buckets hold the cost after this long (without refunds).
    Wait(Duration),
    /// Larger than the buckets.
    TooLarge(AcquireError),
    /// Not decidable in one round trip (limits unknown here, being seeded, or Redis down):
    /// use [`QuotaBoard::acquire`](super::QuotaBoard::acquire).
    Acquire,
}

impl<G> SharedTry<G> {
    /// The same answer with what was taken mapped by `f`.
    pub(crate) fn map<H>(self, f: impl FnOnce(G) -> H) -> SharedTry<H> {
        match self {
            SharedTry::Granted(g) => SharedTry::Granted(f(g)),
            SharedTry::Wait(d) => SharedTry::Wait(d),
            SharedTry::TooLarge(e) => SharedTry::TooLarge(e),
            SharedTry::Acquire => SharedTry::Acquire,
        }
    }
}

impl RedisShared {
    /// One acquire script call for `(key, group)`: takes `cost` if it fits now. A waiter
    /// queues at `place` (learning it on its first wait). When it is served and
    /// `place.next` is not 0, that ticket is queued in the line in the same call: the
    /// caller's next waiter holds its place from the instant this one is served.
    pub(crate) async fn try_once(
        self: &Arc<Self>,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: Cost,
        ticket: i64,
        place: &mut Place,
    ) -> SharedTry<Grant> {
        if self.is_degraded() {
            return SharedTry::Acquire;
        }
        if self.mirror.is_seeding(key, group) {
            // This process just learned the limits and is writing them to Redis: a waiter in
            // line keeps its place until they are there (the board wakes it then).
            return match ticket {
                0 => SharedTry::Acquire,
                _ => SharedTry::Wait(LEARN_POLL),
            };
        }
        let caps = match self.mirror.capacities(key, group) {
            Some(caps) => caps,
            // Limits unknown here: another process may have learned them, or be learning
            // them. While it does, this waiter holds its place in the line (issue 12).
            None if ticket != 0 && self.mirror.lacks_limits(key, group) => {
                // Read once: the answer below must match what the script did.
                let probing = self.mirror.is_probing(key, group);
                match self.peek(key, group, ticket, probing).await {
                    Ok(Peek::Learned(caps)) => {
                        self.mirror.adopt(key, group, caps);
                        match self.mirror.capacities(key, group) {
                            Some(caps) => caps,
                            None => return SharedTry::Acquire,
                        }
                    }
                    Ok(Peek::Wait(ttl)) => {
                        tracing::debug!(
                            key = %key,
                            group = %group,
                            "quota board: in line while another node learns the limits"
                        );
                        return SharedTry::Wait(ttl.clamp(Duration::from_millis(1), LEARN_POLL));
                    }
                    // This process's probe is out: wait for its answer in line.
                    Ok(Peek::Learn) if probing => {
                        return SharedTry::Wait(LEARN_POLL);
                    }
                    // This process learns them: the local probe path.
                    Ok(Peek::Learn) => return SharedTry::Acquire,
                    Err(e) => {
                        self.mark_down(&e);
                        return SharedTry::Acquire;
                    }
                }
            }
            None => return SharedTry::Acquire,
        };
        let a = self.mirror.amounts(key, group, &cost);
        let id = new_ticket();
        let args = acquire_args(&a, ticket, id, place);
        match self.eval(key, group, "acquire", &caps, &args).await {
            Ok(reply) => {
                self.mirror.set_levels(key, group, reply.levels);
                match reply.status.as_str() {
                    "ok" => place.next_at = reply.place,
                    _ if place.at == 0 => place.at = reply.place,
                    _ => {}
                }
                match reply.status.as_str() {
                    "ok" => {
                        self.counters.shared_grants.fetch_add(1, Ordering::Relaxed);
                        self.mirror.track_shared(key, group, true);
                        let grant = Grant {
                            charged: std::array::from_fn(|i| caps[i].map(|_| a[i])),
                            probe: false,
                            origin: Origin::Shared,
                            mark: reply.settled,
                            returned: reply.returned,
                            at: Instant::now(),
                            answered: false,
                            id,
                            blind: 0,
                            entry: None,
                        };
                        SharedTry::Granted(grant)
                    }
                    "large" => SharedTry::TooLarge(AcquireError::new(
                        AcquireErrorKind::RequestTooLarge,
                        key.clone(),
                        group.clone(),
                        None,
                    )),
                    _ => SharedTry::Wait(reply.wait),
                }
            }
            Err(e) => {
                self.cancel_grant(key, group, caps, &a, id);
                self.mark_down(&e);
                SharedTry::Acquire
            }
        }
    }
}

/// A ticket in the line of a `(key, group)` in Redis, left when dropped (served: the script
/// already took it out; then this is a no-op).
pub(crate) struct Leave {
    pub(crate) shared: Arc<RedisShared>,
    pub(crate) key: KeyId,
    pub(crate) group: RateLimitGroup,
    pub(crate) ticket: i64,
    /// The ticket may be in the line (a wait was answered since the last grant).
    pub(crate) queued: bool,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if self.queued {
            self.shared.leave(&self.key, &self.group, self.ticket);
        }
    }
}

/// One acquire on the Redis path.
struct SharedAcquire {
    shared: Arc<RedisShared>,
    key: KeyId,
    group: RateLimitGroup,
    cost: Cost,
    deadline: Option<Instant>,
}

impl SharedAcquire {
    /// Limits unknown here: adopt the ones another process learned (found in the store),
    /// then acquire in Redis. When nobody knows them, one process at a time learns them (the
    /// learning lock): `None` when it is this one (the local probe path), else wait for the
    /// limits to appear (or for the lock to be released or to expire, then try again).
    async fn adopt_then_run(self) -> Option<Result<RemoteGrant, AcquireError>> {
        let (shared, key, group) = (&self.shared, &self.key, &self.group);
        // Waiting for another process to learn the limits holds a place in the line.
        let mut ticket = self.ticket();
        loop {
            match shared.peek(key, group, ticket.ticket, false).await {
                Ok(Peek::Learned(caps)) => {
                    shared.mirror.adopt(key, group, caps);
                    break;
                }
                Ok(Peek::Learn) => return None,
                Ok(Peek::Wait(ttl)) => {
                    ticket.queued = true;
                    // This process may have learned them meanwhile (its own probe).
                    if shared.mirror.capacities(key, group).is_some() {
                        break;
                    }
                    let wake = Instant::now() + ttl.clamp(Duration::from_millis(1), LEARN_POLL);
                    if let Some(deadline) = self.deadline.filter(|d| *d < wake) {
                        tokio::time::sleep_until(deadline).await;
                        return Some(Err(AcquireError::new(
                            AcquireErrorKind::QueueTimeout,
                            key.clone(),
                            group.clone(),
                            None,
                        )));
                    }
                    tokio::time::sleep_until(wake).await;
                }
                Err(e) => {
                    // Redis is down: the acquire below ends on the board's local fallback
                    // (or fails closed).
                    shared.mark_down(&e);
                    break;
                }
            }
        }
        Some(self.run(ticket).await)
    }

    /// A new place in the line across processes, left when dropped.
    fn ticket(&self) -> Leave {
        Leave {
            shared: self.shared.clone(),
            key: self.key.clone(),
            group: self.group.clone(),
            ticket: new_ticket(),
            queued: false,
        }
    }

    /// Takes in Redis, or waits as long as Redis says (or until a local refund), or hands
    /// the acquire to the board's local fallback when Redis is down. `ticket`: this
    /// acquire's place in the line across processes; left when it ends either way.
    async fn run(self, mut ticket: Leave) -> Result<RemoteGrant, AcquireError> {
        let Self {
            shared,
            key,
            group,
            cost,
            deadline,
        } = self;
        loop {
            if shared.is_degraded() {
                if shared.options.fail_closed {
                    return Err(AcquireError::new(
                        AcquireErrorKind::BackendUnavailable,
                        key,
                        group,
                        None,
                    ));
                }
                shared
                    .counters
                    .fallback_acquires
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(RemoteGrant::Fallback(ticket));
            }
            let Some(caps) = shared.mirror.capacities(&key, &group) else {
                // Limits forgotten meanwhile (cannot happen for configured limits): no limit.
                let grant = Grant {
                    charged: [None; 3],
                    probe: false,
                    origin: Origin::Local,
                    mark: [0; 3],
                    returned: [0; 3],
                    at: Instant::now(),
                    answered: false,
                    id: 0,
                    blind: 0,
                    entry: None,
                };
                return Ok(RemoteGrant::Granted(grant));
            };
            // As in the in-process board: the output reservation and anything over a learned
            // (not configured) limit are clamped to the capacity.
            let a = shared.mirror.amounts(&key, &group, &cost);
            let id = new_ticket();
            let args = acquire_args(&a, ticket.ticket, id, &Place::default());
            // Registered before the call, so that a refund during the round trip is not missed.
            let refunded = shared.refunded.notified();
            match shared.eval(&key, &group, "acquire", &caps, &args).await {
                Ok(reply) => {
                    shared.mirror.set_levels(&key, &group, reply.levels);
                    match reply.status.as_str() {
                        "ok" => {
                            ticket.queued = false;
                            shared
                                .counters
                                .shared_grants
                                .fetch_add(1, Ordering::Relaxed);
                            shared.mirror.track_shared(&key, &group, true);
                            let grant = Grant {
                                charged: std::array::from_fn(|i| caps[i].map(|_| a[i])),
                                probe: false,
                                origin: Origin::Shared,
                                mark: reply.settled,
                                returned: reply.returned,
                                at: Instant::now(),
                                answered: false,
                                id,
                                blind: 0,
                                entry: None,
                            };
                            return Ok(RemoteGrant::Granted(grant));
                        }
                        "large" => {
                            return Err(AcquireError::new(
                                AcquireErrorKind::RequestTooLarge,
                                key,
                                group,
                                None,
                            ));
                        }
                        _ => {
                            ticket.queued = true;
                            // Sleep until the buckets hold the cost (or the deadline), unless a
                            // reservation of this process gives quota back first; look again
                            // often enough to keep the ticket.
                            let wake = Instant::now() + reply.wait.min(TICKET_REFRESH);
                            let (until, last) = match deadline {
                                Some(d) if wake > d => (d, true),
                                _ => (wake, false),
                            };
                            let sleep = std::pin::pin!(tokio::time::sleep_until(until));
                            let refunded = std::pin::pin!(refunded);
                            if let Either::Left(_) = select(sleep, refunded).await {
                                if last {
                                    return Err(AcquireError::new(
                                        AcquireErrorKind::QueueTimeout,
                                        key,
                                        group,
                                        Some(wake.saturating_duration_since(Instant::now())),
                                    ));
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    // The script may have run: queued the ticket, or granted.
                    ticket.queued = true;
                    shared.cancel_grant(&key, &group, caps, &a, id);
                    shared.mark_down(&e);
                }
            }
        }
    }
}

/// Drives the Redis path of an [`Acquire`](super::Acquire). `None`: the local path applies
/// (no Redis backend, or limits unknown here and in the store: the probe gate).
pub(crate) fn poll_remote(
    shared: &Arc<RedisShared>,
    remote: &mut RemoteState,
    at_start: bool,
    (key, group, cost, deadline): (&KeyId, &RateLimitGroup, Cost, Option<Instant>),
    cx: &mut Context<'_>,
) -> Option<Poll<Result<RemoteGrant, AcquireError>>> {
    if remote.fut.is_none() {
        if !at_start {
            return None;
        }
        let job = SharedAcquire {
            shared: shared.clone(),
            key: key.clone(),
            group: group.clone(),
            cost,
            deadline,
        };
        let fut: RemoteAcquire = if shared.is_degraded() {
            Box::pin(async move {
                let ticket = job.ticket();
                Some(job.run(ticket).await)
            })
        } else if shared.mirror.capacities(key, group).is_none() {
            // Limits unknown here: ask the store once whether another process learned them;
            // else (or after an answer without limits) the probe gate of the mirror.
            if remote.peeked || !shared.mirror.lacks_limits(key, group) {
                return None;
            }
            remote.peeked = true;
            Box::pin(job.adopt_then_run())
        } else if shared.mirror.is_seeding(key, group) {
            // Just learned, and Redis not yet seeded with the server's view: wait in the
            // mirror's queue, which releases to this path.
            return None;
        } else {
            Box::pin(async move {
                let ticket = job.ticket();
                Some(job.run(ticket).await)
            })
        };
        remote.fut = Some(fut);
    }
    let fut = remote.fut.as_mut()?;
    match fut.as_mut().poll(cx) {
        Poll::Pending => Some(Poll::Pending),
        Poll::Ready(r) => {
            remote.fut = None;
            r.map(Poll::Ready)
        }
    }
}

async fn connect(client: &redis::Client, options: &RedisOptions) -> Option<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(options.connect_timeout)
        .set_response_timeout(options.response_timeout)
        .set_number_of_retries(1)
        .set_max_delay(100);
    let limit = options.connect_timeout.saturating_mul(3);
    match tokio::time::timeout(
        limit,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "quota board: cannot connect to Redis");
            None
        }
        Err(_) => None,
    }
}

impl RedisShared {
    /// Connects to the Redis server at `url` (once, within the connect timeout) for a board
    /// whose in-process buckets are `mirror`.
    /// An unreachable server is not an error: the store starts degraded and a background
    /// probe switches to Redis when it answers.
    ///
    /// Errors: [`InvalidUrl`](RedisSetupErrorKind::InvalidUrl).
    pub(crate) async fn connect(
        url: &str,
        options: RedisOptions,
        mirror: Arc<LocalBackend>,
    ) -> Result<Arc<Self>, RedisSetupError> {
        let client = redis::Client::open(url).map_err(|source| RedisSetupError {
            kind: RedisSetupErrorKind::InvalidUrl,
            source,
        })?;
        let conn = connect(&client, &options).await;
        let connected = conn.is_some();
        let shared = Arc::new(RedisShared {
            mirror,
            client,
            conn: Mutex::new(conn),
            script: redis::Script::new(SCRIPT),
            peek_script: redis::Script::new(PEEK_SCRIPT),
            unlock_script: redis::Script::new(UNLOCK_SCRIPT),
            leave_script: redis::Script::new(LEAVE_SCRIPT),
            token: format!("{}-{:016x}", std::process::id(), fastrand::u64(..)),
            share: options.share(),
            options,
            degraded: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            refunded: Notify::new(),
            counters: Counters::default(),
            deferred: Mutex::new(VecDeque::new()),
            after_seed: Mutex::new(Vec::new()),
            learning: Mutex::new(Learning::default()),
        });
        if !connected {
            shared.mark_down(&StoreError::NotConnected);
        }
        Ok(shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_down_but_keep_one() {
        assert_eq!(share_limit(50, 0.5), 25);
        assert_eq!(share_limit(5, 0.1), 1);
        assert_eq!(share_limit(0, 0.5), 0);
        assert_eq!(share_limit(7, 1.0), 7);
        assert!((RedisOptions::new().expected_nodes(0).share() - 1.0).abs() < 1e-12);
        assert!((RedisOptions::new().local_share(f64::NAN).share() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn replies_parse_and_reject_garbage() {
        let r = Reply::parse(vec![
            "wait".into(),
            "1500".into(),
            "3.5".into(),
            "".into(),
            "-2.000000".into(),
        ])
        .unwrap();
        assert_eq!(r.status, "wait");
        assert_eq!(r.wait, Duration::from_micros(1500));
        assert_eq!(r.levels, [Some(3.5), None, Some(-2.0)]);
        // The main script's replies also carry the settled and returned counters.
        let raw = ["ok", "0", "1", "2", "3", "10", "20", "30", "4", "5", "6"];
        let r = Reply::parse(raw.iter().map(|s| s.to_string()).collect()).unwrap();
        assert_eq!((r.settled, r.returned), ([10, 20, 30], [4, 5, 6]));
        assert!(Reply::parse(raw[..8].iter().map(|s| s.to_string()).collect()).is_err());
        assert!(Reply::parse(vec!["ok".into()]).is_err());
        assert!(
            Reply::parse(vec![
                "ok".into(),
                "x".into(),
                "".into(),
                "".into(),
                "".into()
            ])
            .is_err()
        );
    }
}
