//! [`BudgetLayer`]: builder and `tower::Layer` impl.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::service::Budgeted;
use super::{Ledger, Shared};
use crate::tenant::price::PriceTable;
use crate::tenant::spend::{Clock, Period, SpendKey, SpendStore, SystemClock};

/// A tenant's spend in the current periods, in micro-USD ([`BudgetLayer::spend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TenantSpend {
    /// In the current UTC day.
    pub day: u64,
    /// In the current UTC calendar month.
    pub month: u64,
}

/// Stops each [`Tenant`](crate::tenant::Tenant) at its daily and monthly budgets and settles
/// what each answer really cost into a [`SpendStore`]; see the [module docs](super). Builds
/// [`Budgeted`].
///
/// Every service built from one layer (and its clones) shares one ledger of reservations.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tower_claude::tenant::budget::BudgetLayer;
/// use tower_claude::tenant::spend::MemorySpend;
/// use tower_claude::tenant::PriceTable;
///
/// let prices = PriceTable::default()
///     .merge_json(r#"{"models": {"claude-opus-4-5": {"output": 20.0}}}"#)?;
/// let layer = BudgetLayer::new(MemorySpend::new())
///     .prices(prices)
///     .clock(SystemTime::now)
///     .default_max_tokens(8_192)
///     .max_wait(Duration::from_secs(30));
/// # drop(layer);
/// # Ok::<(), tower_claude::tenant::PriceError>(())
/// ```
#[derive(Clone)]
pub struct BudgetLayer {
    store: Arc<dyn SpendStore>,
    prices: PriceTable,
    clock: Arc<dyn Clock>,
    default_max_tokens: u64,
    max_wait: Duration,
    #[cfg(feature = "metrics")]
    alerts: Option<crate::metrics::alerts::Alerts>,
    ledger: Arc<Ledger>,
}

impl std::fmt::Debug for BudgetLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetLayer")
            .field("store", &self.store)
            .field("prices", &self.prices)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl BudgetLayer {
    /// A layer keeping spend in `store`, with the built-in [`PriceTable`], the system clock,
    /// 4,096 output tokens reserved for a request without `max_tokens`, and waits of at most
    /// 60 s for requests in flight to settle.
    pub fn new(store: impl SpendStore) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// [`new`](Self::new) with a store already shared.
    pub fn from_arc(store: Arc<dyn SpendStore>) -> Self {
        Self {
            store,
            prices: PriceTable::default(),
            clock: Arc::new(SystemClock),
            default_max_tokens: 4_096,
            max_wait: Duration::from_secs(60),
            #[cfg(feature = "metrics")]
            alerts: None,
            ledger: Arc::default(),
        }
    }

    /// The prices (default: [`PriceTable::default`], the built-in table).
    pub fn prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// The clock the UTC days and months follow (default: the system clock). Tests pass a
    /// closure to move to the next period.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Output tokens reserved for a request without `max_tokens` (4,096 by default; the API
    /// refuses such requests, so this only matters for other endpoints' bodies).
    pub fn default_max_tokens(mut self, tokens: u64) -> Self {
        self.default_max_tokens = tokens;
        self
    }

    /// The longest a request waits for the tenant's requests in flight to settle when their
    /// reservations fill its budget (60 s by default; never past the request's
    /// [`Deadline`](crate::retry::Deadline)). `Duration::ZERO` refuses at once.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Raises a budget alert through `alerts` when a tenant's spend crosses the alerts'
    /// threshold (80 % by default) of a budget (feature `metrics`).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn alerts(mut self, alerts: crate::metrics::alerts::Alerts) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// The price table in use.
    pub fn price_table(&self) -> &PriceTable {
        &self.prices
    }

    /// The store in use (e.g. for a status page: [`SpendStore::get`]).
    pub fn store(&self) -> &Arc<dyn SpendStore> {
        &self.store
    }

    /// Waits until every settled cost this layer handed to its store has been written (or
    /// failed): call it at shutdown, after the requests in flight ended, so that a restart
    /// finds the last costs in the store. Bound it with a timeout: a store that hangs keeps
    /// it waiting.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_claude::tenant::budget::BudgetLayer;
    /// use tower_claude::tenant::spend::MemorySpend;
    ///
    /// let layer = BudgetLayer::new(MemorySpend::new());
    /// layer.flush().await; // nothing pending
    /// # }
    /// ```
    pub async fn flush(&self) {
        self.ledger.flush().await
    }

    /// What `tenant` has spent in the current UTC day and month (by the layer's clock), in
    /// micro-USD: the store's totals plus what this process settled and has not stored yet
    /// (e.g. for a status page). Reservations of requests in flight are not included.
    ///
    /// ```
    /// use tower_claude::tenant::budget::BudgetLayer;
    /// use tower_claude::tenant::spend::MemorySpend;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_claude::tenant::spend::SpendError> {
    /// let layer = BudgetLayer::new(MemorySpend::new());
    /// let spend = layer.spend("team-a").await?;
    /// assert_eq!((spend.day, spend.month), (0, 0));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn spend(
        &self,
        tenant: &str,
    ) -> Result<TenantSpend, crate::tenant::spend::SpendError> {
        let now = self.clock.now();
        let keys = [
            SpendKey::new(tenant, Period::day_of(now)),
            SpendKey::new(tenant, Period::month_of(now)),
        ];
        let totals = self.store.get(&keys).await?;
        let unstored = self.ledger.unstored(&keys);
        let at = |i: usize| {
            totals
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_add(unstored[i])
        };
        Ok(TenantSpend {
            day: at(0),
            month: at(1),
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            store: self.store.clone(),
            prices: self.prices.clone(),
            clock: self.clock.clone(),
            default_max_tokens: self.default_max_tokens,
            max_wait: self.max_wait,
            #[cfg(feature = "metrics")]
            alerts: self.alerts.clone(),
            ledger: self.ledger.clone(),
        })
    }
}

impl<S> Layer<S> for BudgetLayer {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Budgeted::new(inner, self.shared())
    }
}
