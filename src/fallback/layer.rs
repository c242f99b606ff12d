//! [`FallbackLayer`]: builder and `tower::Layer` impl.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::config::Config;
use super::policy::{Policy, Rules, SharedPolicy, Thresholds};
use super::service::Fallback;
use crate::anthropic::ModelCatalog;
use crate::key_pool::KeyPoolHandle;
use crate::quota::{OutputReservation, QuotaBoard};

/// The default bound on a 429's server wait before the layer fails over at once.
pub const DEFAULT_MAX_WAIT_BEFORE_FAILOVER: Duration = Duration::from_secs(10);

/// The default number of 529 answers from one model before the layer moves on.
pub const DEFAULT_MAX_OVERLOADED: u32 = 2;

/// The default pause before sending a model that answered 529 again.
pub const DEFAULT_OVERLOADED_PAUSE: Duration = Duration::from_millis(500);

/// The default number of models one request may be sent to.
pub const DEFAULT_MAX_DEPTH: usize = 3;

/// Chooses the model of each Messages API request from the remaining quota, and moves down
/// the chain when a model is exhausted. Builds [`Fallback`].
///
/// Every option has a default; see the [module docs](super) for the rules.
///
/// | option | default |
/// |---|---|
/// | [`board`](Self::board) | its own board, fed by the response headers the layer sees |
/// | [`key_pool`](Self::key_pool) | none: the request's own key is weighed |
/// | [`catalog`](Self::catalog) | [`ModelCatalog::default`] |
/// | [`chain`](Self::chain) | the catalogue's chain (`claude-opus-4-7` -> `claude-sonnet-4-6` -> `claude-haiku-4-5`) |
/// | [`floor`](Self::floor) | none |
/// | [`policy`](Self::policy) ([`thresholds`](Self::thresholds)) | [`Thresholds`]: 0.70, 0.30 (then 0) |
/// | [`max_wait_before_failover`](Self::max_wait_before_failover) | 10 s |
/// | [`max_overloaded`](Self::max_overloaded) | 2 |
/// | [`overloaded_pause`](Self::overloaded_pause) | 500 ms |
/// | [`max_depth`](Self::max_depth) | 3 |
/// | [`output_reservation`](Self::output_reservation) | `max_tokens` |
///
/// ```
/// use std::time::Duration;
/// use tower_claude::fallback::FallbackLayer;
/// use tower_claude::quota::QuotaBoard;
///
/// let board = QuotaBoard::new(); // give the same board to a RateLimitLayer below
/// let layer = FallbackLayer::new()
///     .board(board.clone())
///     .chain(["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"])
///     .floor("claude-sonnet-4-6")
///     .thresholds(0.8, 0.4)
///     .max_wait_before_failover(Duration::from_secs(5))
///     .max_overloaded(1)
///     .max_depth(2);
/// assert!(layer.quota_board().same_board(&board));
/// ```
#[derive(Debug, Clone)]
pub struct FallbackLayer {
    board: QuotaBoard,
    /// Whether [`board`](Self::board) was called ([`ClaudeStack`](crate::stack::ClaudeStack)
    /// keeps a board given here).
    board_given: bool,
    keys: Option<KeyPoolHandle>,
    catalog: ModelCatalog,
    chain: Option<Vec<String>>,
    floor: Option<String>,
    policy: SharedPolicy,
    max_wait_before_failover: Duration,
    max_overloaded: u32,
    overloaded_pause: Duration,
    max_depth: usize,
    output: OutputReservation,
    /// See [`Config::resend_below`].
    resend_below: bool,
    /// See [`Config::key_checked_above`].
    key_checked_above: bool,
}

impl Default for FallbackLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl FallbackLayer {
    /// A layer with the defaults (see the table above).
    pub fn new() -> Self {
        Self {
            board: QuotaBoard::new(),
            board_given: false,
            keys: None,
            catalog: ModelCatalog::default(),
            chain: None,
            floor: None,
            policy: SharedPolicy(Arc::new(Thresholds::default())),
            max_wait_before_failover: DEFAULT_MAX_WAIT_BEFORE_FAILOVER,
            max_overloaded: DEFAULT_MAX_OVERLOADED,
            overloaded_pause: DEFAULT_OVERLOADED_PAUSE,
            max_depth: DEFAULT_MAX_DEPTH,
            output: OutputReservation::default(),
            resend_below: false,
            key_checked_above: false,
        }
    }

    /// Says that the layer directly below is a retry layer, nothing between them (crate-private:
    /// only [`ClaudeStack`](crate::stack::ClaudeStack), which composes them so, may say it).
    /// Each request then carries a [`Resend`](crate::retry::Resend) describing how it was
    /// built from the walk's template, and the retry layer sends again from that instead of a
    /// copy of its own.
    pub(crate) fn resend_below(mut self) -> Self {
        self.resend_below = true;
        self
    }

    /// Says that a layer above read the request's key id, checked against its headers, with
    /// only the stack's own layers between (crate-private: set by
    /// [`ClaudeStack`](crate::stack::ClaudeStack) under its metrics layer): the id is taken
    /// from the memo it left
    /// ([`KeyId::of_request_checked_above`](crate::anthropic::KeyId::of_request_checked_above)).
    pub(crate) fn key_checked_above(mut self) -> Self {
        self.key_checked_above = true;
        self
    }

    /// Reads quota from `board` (and feeds it from the response headers the layer sees). Give
    /// it the board of a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) below, so that
    /// the choice also sees the requests in flight and queued.
    pub fn board(mut self, board: QuotaBoard) -> Self {
        self.board = board;
        self.board_given = true;
        self
    }

    /// Whether a board was given with [`board`](Self::board).
    pub(crate) fn board_given(&self) -> bool {
        self.board_given
    }

    /// Weighs the keys of a [`KeyPoolLayer`](crate::key_pool::KeyPoolLayer) below instead of
    /// the request's own key: the pool sends each request with its best key, so a model's
    /// quota view is that of its best key in rotation (a key cooling down after a 429 does
    /// not fit until its cooldown ends; a key refused with a 403 in that group does not
    /// count). Give it the pool's board too. [`ClaudeStack`](crate::stack::ClaudeStack) does both.
    ///
    /// ```
    /// use tower_claude::fallback::FallbackLayer;
    /// use tower_claude::key_pool::KeyPoolLayer;
    /// use tower_claude::quota::QuotaBoard;
    ///
    /// let board = QuotaBoard::new();
    /// let pool = KeyPoolLayer::new(["sk-ant-one", "sk-ant-two"]).unwrap().board(board.clone());
    /// let fallback = FallbackLayer::new().board(board).key_pool(pool.handle());
    /// # drop((pool, fallback));
    /// ```
    pub fn key_pool(mut self, handle: KeyPoolHandle) -> Self {
        self.keys = Some(handle);
        self
    }

    /// The model catalogue: rate-limit groups, families, and the chain (unless
    /// [`chain`](Self::chain) overrides it).
    pub fn catalog(mut self, catalog: ModelCatalog) -> Self {
        self.catalog = catalog;
        self
    }

    /// The fallback chain, best model first (overrides the catalogue's chain, whatever the
    /// order of the builder calls). A request for a model in the chain may be served by that
    /// model and the ones after it; a model outside the chain is placed by family (see
    /// [`ModelCatalog::chain_from`]).
    pub fn chain<I, T>(mut self, chain: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.chain = Some(chain.into_iter().map(Into::into).collect());
        self
    }

    /// The lowest model allowed (the proxy's `FALLBACK_MODEL`): the chain is cut after it, or,
    /// when it is not in a request's chain, after the last model of a family at least as high
    /// as its family. A floor whose family is unknown allows no fallback at all. The requested
    /// model itself is always allowed.
    pub fn floor(mut self, model: impl Into<String>) -> Self {
        self.floor = Some(model.into());
        self
    }

    /// The two usual thresholds: the requested model is kept while its binding bucket has at
    /// least `stay_above` of its limit left (default 0.70), the next model needs `sonnet_above`
    /// (default 0.30), any later model only needs the request to fit.
    pub fn thresholds(self, stay_above: f64, sonnet_above: f64) -> Self {
        self.position_thresholds([stay_above, sonnet_above])
    }

    /// Thresholds by position in a request's chain (0 = the requested model). Positions past
    /// the end of the list need 0 (only that the request fits).
    ///
    /// ```
    /// use tower_claude::fallback::FallbackLayer;
    ///
    /// // Keep Opus down to 50 %, then Sonnet down to 20 %, then Haiku down to 5 %.
    /// let layer = FallbackLayer::new().position_thresholds([0.5, 0.2, 0.05]);
    /// # drop(layer);
    /// ```
    pub fn position_thresholds(self, thresholds: impl IntoIterator<Item = f64>) -> Self {
        self.policy(Thresholds::new(thresholds))
    }

    /// The [`Policy`] that chooses each request's model among its candidates (default:
    /// [`Thresholds::default`], 0.70 / 0.30). Replaces what
    /// [`thresholds`](Self::thresholds) or [`position_thresholds`](Self::position_thresholds)
    /// set, and the other way round: the last call wins. The failover rules for error answers
    /// (429 wait, 529 count, spend cap) stay the layer's.
    ///
    /// ```
    /// use tower_claude::fallback::{FallbackLayer, PolicyExt, Thresholds};
    ///
    /// let layer = FallbackLayer::new()
    ///     .policy(Thresholds::new([0.8, 0.4]).never_for(["claude-opus-4-7"]));
    /// # drop(layer);
    /// ```
    pub fn policy<P>(mut self, policy: P) -> Self
    where
        P: Policy + 'static,
    {
        self.policy = SharedPolicy(Arc::new(policy));
        self
    }

    /// A 429 whose server wait (`retry-after-ms` / `retry-after`) exceeds this (or has none)
    /// moves the request to the next model at once (default 10 s). A shorter 429 is returned
    /// to the caller (or was already waited for by a retry layer below).
    pub fn max_wait_before_failover(mut self, max_wait: Duration) -> Self {
        self.max_wait_before_failover = max_wait;
        self
    }

    /// How many 529 (`overloaded_error`) answers from one model move the request on
    /// (default 2; 1 moves on at the first). Below the count the same model is sent again
    /// after [`overloaded_pause`](Self::overloaded_pause). Values below 1 count as 1.
    pub fn max_overloaded(mut self, n: u32) -> Self {
        self.max_overloaded = n.max(1);
        self
    }

    /// The pause before sending a model that answered 529 again (default 500 ms, the first
    /// backoff of the official SDKs).
    pub fn overloaded_pause(mut self, pause: Duration) -> Self {
        self.overloaded_pause = pause;
        self
    }

    /// The most models one request is sent to (default 3). Values below 1 count as 1 (no
    /// failover, the choice before sending still applies).
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth.max(1);
        self
    }

    /// The output tokens counted in a request's cost when checking that it fits
    /// (`max_tokens` by default, as the API reserves).
    pub fn output_reservation(mut self, policy: OutputReservation) -> Self {
        self.output = policy;
        self
    }

    /// The board this layer reads.
    pub fn quota_board(&self) -> &QuotaBoard {
        &self.board
    }
}

impl FallbackLayer {
    /// A handle that tells which model this layer, as configured now (board, key pool,
    /// catalogue, floor, thresholds), would send a request to: give it to a
    /// [`CacheLayer`](crate::cache::CacheLayer) above, so that it serves another model's
    /// answer only while fallback would choose that model. Take it after the builder calls.
    ///
    /// ```
    /// use tower_claude::cache::CacheLayer;
    /// use tower_claude::fallback::FallbackLayer;
    /// use tower_claude::quota::QuotaBoard;
    ///
    /// let board = QuotaBoard::new();
    /// let fallback = FallbackLayer::new().board(board.clone());
    /// let cache = CacheLayer::memory(64 << 20).fallback(fallback.handle());
    /// let _stack = tower::ServiceBuilder::new().layer(cache).layer(fallback);
    /// ```
    pub fn handle(&self) -> super::FallbackHandle {
        super::FallbackHandle::new(self.config())
    }

    fn config(&self) -> Arc<Config> {
        let catalog = match &self.chain {
            Some(chain) => self.catalog.clone().with_chain(chain.iter().cloned()),
            None => self.catalog.clone(),
        };
        Arc::new(Config {
            board: self.board.clone(),
            keys: self.keys.clone(),
            catalog,
            floor: self.floor.clone(),
            policy: self.policy.clone(),
            rules: Rules {
                max_wait_before_failover: self.max_wait_before_failover,
                max_overloaded: self.max_overloaded,
            },
            overloaded_pause: self.overloaded_pause,
            max_depth: self.max_depth,
            output: self.output,
            resend_below: self.resend_below,
            key_checked_above: self.key_checked_above,
            chains: Default::default(),
        })
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback::from_config(inner, self.config())
    }
}
