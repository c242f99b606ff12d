//! [`KeyPoolLayer`]: builder and `tower::Layer` impl.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::config::Config;
use super::error::KeyPoolError;
use super::pool::{KeyPoolHandle, Pool};
use super::service::KeyPool;
use crate::anthropic::ModelCatalog;
use crate::quota::{OutputReservation, QuotaBoard};

/// Sends each request with one key of a pool of API keys; builds [`KeyPool`].
///
/// * **Choice** (Messages requests): among the keys in rotation, the one that can take the
///   request's cost soonest in its rate-limit group — not cooling down, and fitting the
///   [`QuotaBoard`]'s buckets now — then the one with the most headroom
///   ([`Headroom::fraction`](crate::quota::Headroom::fraction)), then the fewest requests in
///   flight, then the least recently used. When every key is cooling down or short of quota,
///   the one available soonest is used; the [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)
///   below holds the request until it fits, and a [`RetryLayer`](crate::retry::RetryLayer)
///   above retries a 429 (with the next best key).
/// * **New keys**: a key is trusted after its first answer (anything but a 401 or 402). Until that
///   answer arrives, further requests go to other keys when there are any; a burst at start-up,
///   before any answer, is spread over every key, so each request sent with a revoked key
///   before its 401 came back gets that 401 too.
/// * **Other requests** (`/v1/models`, token counting, ...) get the key with the fewest
///   requests in flight, so that they reach upstream authenticated.
/// * **Header**: `x-api-key` is set to the chosen key (marked sensitive) and `authorization`
///   removed: the pool owns the credentials, whatever the caller sent.
/// * **429 `rate_limit_error`**: the key cools down in that group until `retry-after`
///   (`retry-after-ms`), else the reset of an exhausted `anthropic-ratelimit-*` bucket, else
///   [`default_cooldown`](Self::default_cooldown); at most [`max_cooldown`](Self::max_cooldown).
/// * **403 `permission_error`** (the key may not use this model, say): in that rate-limit
///   group the key comes after every other key for
///   [`forbidden_cooldown`](Self::forbidden_cooldown); the 403 is returned as it is.
/// * **429 spend cap** (`enforced_spend_limit_reached`), **401** or **402 `billing_error`**:
///   the key leaves the rotation
///   (a `tracing` warning with its [`KeyId`](crate::anthropic::KeyId), and
///   [`KeyPoolHandle::statuses`]). The response is returned as it is: this layer never retries.
/// * **Another key can serve**: when a key fails a request (429, spend cap, 401, 402, 403)
///   and another key in rotation can take it, the response carries a
///   [`RetrySooner`](crate::retry::RetrySooner) with the time until that key can (zero: now).
///   A [`RetryLayer`](crate::retry::RetryLayer) above then retries at once with that key
///   instead of waiting out the first key's `retry-after`, or failing on its spend cap or
///   401. After a 429 rate limit with no other key, when the pool admits through the board
///   (a board shared with the rate limiter), it carries the time until the key's cooldown
///   ends: the retry waits in the group's line, which the board paces, and the retry layer
///   does not pace the group on its own.
/// * **Every key removed**: requests fail with
///   [`KeyPoolErrorKind::AllKeysRemoved`](super::KeyPoolErrorKind::AllKeysRemoved) without
///   being sent (the request that removed the last key got its upstream response).
///
/// Without [`board`](Self::board) the layer keeps its own board, fed from the responses'
/// `anthropic-ratelimit-*` headers. Give it the board of the rate limiter below instead, so
/// that the choice sees the reservations of requests in flight.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::key_pool::KeyPoolLayer;
/// use tower_claude::quota::QuotaBoard;
///
/// let board = QuotaBoard::new();
/// let layer = KeyPoolLayer::new(["sk-ant-api03-first", "sk-ant-api03-second"])
///     .unwrap()
///     .board(board.clone())
///     .default_cooldown(Duration::from_secs(2))
///     .max_cooldown(Duration::from_secs(60))
///     .forbidden_cooldown(Duration::from_secs(300));
/// assert_eq!(layer.handle().len(), 2);
/// assert!(!format!("{layer:?}").contains("sk-ant"));
/// ```
#[derive(Debug, Clone)]
pub struct KeyPoolLayer {
    pool: Arc<Pool>,
    config: Config,
}

impl KeyPoolLayer {
    /// A pool of `keys` (raw API keys; surrounding whitespace ignored, duplicates kept once).
    ///
    /// Errors: [`NoKeys`](super::KeyPoolErrorKind::NoKeys) for an empty list,
    /// [`InvalidKey`](super::KeyPoolErrorKind::InvalidKey) for an empty key or one that is not
    /// a valid header value (the error names its position, never the key).
    pub fn new<I, K>(keys: I) -> Result<Self, KeyPoolError>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        Ok(Self {
            pool: Arc::new(Pool::new(keys)?),
            config: Config {
                board: QuotaBoard::new(),
                own_board: true,
                catalog: ModelCatalog::default(),
                output: OutputReservation::default(),
                default_cooldown: Duration::from_secs(1),
                max_cooldown: Duration::from_secs(60),
                forbidden_cooldown: Duration::from_secs(600),
            },
        })
    }

    /// Reads headroom from `board` (shared with the rate limiter below). The layer then leaves
    /// the board's updates to the rate limiter.
    pub fn board(mut self, board: QuotaBoard) -> Self {
        self.config.board = board;
        self.config.own_board = false;
        self
    }

    /// Whether a board was given with [`board`](Self::board).
    pub(crate) fn board_given(&self) -> bool {
        !self.config.own_board
    }

    /// The model catalogue that maps models to rate-limit groups (the default catalogue
    /// otherwise; use the rate limiter's).
    pub fn catalog(mut self, catalog: ModelCatalog) -> Self {
        self.config.catalog = catalog;
        self
    }

    /// The output reservation used to ask whether a request fits a key (use the rate
    /// limiter's policy; `max_tokens` by default).
    pub fn output_reservation(mut self, policy: OutputReservation) -> Self {
        self.config.output = policy;
        self
    }

    /// The cooldown after a 429 that says neither `retry-after` nor which bucket is
    /// exhausted (1 s by default).
    pub fn default_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.default_cooldown = cooldown;
        self
    }

    /// The longest cooldown after a 429 (60 s by default).
    pub fn max_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.max_cooldown = cooldown;
        self
    }

    /// How long a key that upstream refused with a 403 `permission_error` in a rate-limit
    /// group comes after every other key there (10 minutes by default). It is still used when
    /// no other key is in rotation, so the caller then gets the 403.
    pub fn forbidden_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.forbidden_cooldown = cooldown;
        self
    }

    /// A handle on the pool's state (shared by every service this layer builds).
    pub fn handle(&self) -> KeyPoolHandle {
        KeyPoolHandle {
            pool: self.pool.clone(),
        }
    }

    /// The board the choice reads.
    pub fn quota_board(&self) -> &QuotaBoard {
        &self.config.board
    }
}

impl<S> Layer<S> for KeyPoolLayer {
    type Service = KeyPool<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyPool::new(inner, self.pool.clone(), Arc::new(self.config.clone()))
    }
}
