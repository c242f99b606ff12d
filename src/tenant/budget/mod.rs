//! Budgets in dollars per tenant: [`BudgetLayer`] stops a [`Tenant`] at its
//! daily or monthly [`Budget`](super::Budget) and settles what each answer really cost.
//!
//! # What it does
//!
//! For each `POST /v1/messages` with a [`Tenant`] request extension (requests
//! without one pass through unmetered):
//!
//! 1. **Before the call.** Its spend in the current UTC day and month (from the
//!    [`SpendStore`], plus what this process has settled but not yet
//!    stored, plus what its requests in flight have reserved) is compared with its budgets. At
//!    or over a budget: an Anthropic-style **429 `rate_limit_error`** answer, not an upstream
//!    call, whose message names the tenant, the budget and the spend, with `retry-after` = the
//!    seconds until the period rolls over and `x-should-retry: false`. Otherwise the request
//!    **reserves its maximum cost** ([`PriceTable::max_cost_micro_usd`]: its input estimate at
//!    the dearest input price it can be billed, plus `max_tokens` of output) and goes on.
//! 2. **After the answer.** When the body ends, the reservation is replaced by the real cost:
//!    the usage of the JSON body or of the SSE stream (read as it passes by the shared usage
//!    reader that the rate limiter uses too), priced by the [`PriceTable`] for the model that
//!    answered (`ServedModel`, after a fallback). The cost is added to the store (both periods)
//!    and to [`TenantStats`](super::TenantStats) (`record_cost_micro_usd`, `record_tokens`). An
//!    error answer costs nothing; a JSON answer whose usage cannot be read costs its
//!    reservation; a stream cut short costs the usage seen so far.
#![cfg_attr(
    feature = "metrics",
    doc = "3. **80 %.** With [`BudgetLayer::alerts`] (feature `metrics`), the settlement that takes a
   tenant's spend across 80 % (the [`Alerts`](crate::metrics::alerts::Alerts) threshold) of
   a budget raises one [`AlertKind::Budget`](crate::metrics::alerts::AlertKind::Budget)"
)]
#![cfg_attr(
    not(feature = "metrics"),
    doc = "3. **80 %.** With `BudgetLayer::alerts` (feature `metrics`), the settlement that takes a
   tenant's spend across 80 % (the `Alerts` threshold) of
   a budget raises one `AlertKind::Budget`"
)]
//!    alert, delivered like quota alerts (callbacks, webhook). The crossing is read from the
//!    store's total after the add, so it fires once per period, also across restarts and
//!    across proxies sharing Redis.
//!
//! # The bound: one request's cost
//!
//! A request is admitted only while `settled + reserved < budget`, where `reserved` counts
//! every request of this process in flight at its maximum cost; settling replaces a
//! reservation by the real cost, which is never larger. So `settled + reserved` only grows by
//! admissions, each made below the budget: **a tenant's settled spend never exceeds its
//! budget by more than the largest single reservation** (one request's maximum cost), however
//! many requests are in flight. A request that would fit once the requests in flight settle
//! (`settled < budget <= settled + reserved`) waits for them (at most
//! [`BudgetLayer::max_wait`], and never past the request's [`Deadline`](crate::retry::Deadline))
//! instead of being refused; if the wait ends first it gets a 429 with `retry-after: 1`.
//!
#![cfg_attr(
    feature = "redis",
    doc = "With several processes sharing a [`RedisSpend`](super::spend::RedisSpend), each process"
)]
#![cfg_attr(
    not(feature = "redis"),
    doc = "With several processes sharing a `RedisSpend` (feature `redis`), each process"
)]
//! knows only its own reservations: the bound is one request's maximum cost **per process**.
//! The estimate is an upper bound for the tokens the Messages API bills; server-side tool fees
//! (web search) are not priced.
//!
//! # When the store fails
//!
//! A store error never fails a request. Reads fall back to the highest total this process has
//! seen; a failed add stays in the process (it still counts toward the budget here) and is
//! added with the tenant's next settlement. What is lost at most: the costs not yet stored when
//! the process stops while the store is down. Failures are logged at most every 10 seconds
//! and counted in `tower_claude_spend_store_errors_total` (feature `metrics`).
//!
//! # Example: budgets per user in an application
//!
//! ```
//! use std::time::Duration;
//! use http::Request;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_claude::body::RequestBody;
//! use tower_claude::tenant::budget::BudgetLayer;
//! use tower_claude::tenant::spend::MemorySpend;
//! use tower_claude::tenant::{Budget, PriceTable, Tenant};
//!
//! # #[cfg(feature = "testing")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_claude::BoxError> {
//! use tower_claude::testing::MockClaude; // feature `testing`
//!
//! let budgets = BudgetLayer::new(MemorySpend::new()).prices(PriceTable::default());
//! let claude = ServiceBuilder::new()
//!     .layer(budgets)
//!     .service(MockClaude::builder().output_tokens(100).build());
//!
//! // The application authenticates its user and names the tenant after it.
//! let user = Tenant::new("user-42").budget(Budget::default().per_day(0.001));
//! let ask = || {
//!     let mut req = Request::post("/v1/messages")
//!         .header("x-api-key", "sk-ant-example")
//!         .header("anthropic-version", "2023-06-01")
//!         .body(RequestBody::from(
//!             r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
//!         ))
//!         .unwrap();
//!     req.extensions_mut().insert(user.clone());
//!     req
//! };
//! // 100 output tokens of Haiku 4.5 ($5 / MTok) and a few input tokens: about $0.0005.
//! let ok = claude.clone().oneshot(ask()).await?;
//! assert_eq!(ok.status(), 200);
//! http_body_util::BodyExt::collect(ok.into_body()).await?; // the cost settles at the end
//! assert_eq!(claude.clone().oneshot(ask()).await?.status(), 200);
//! # let _ = Duration::ZERO;
//! // Now at $0.001 or more: refused until the next UTC day.
//! let refused = claude.clone().oneshot(ask()).await?;
//! assert_eq!(refused.status(), 429);
//! assert_eq!(refused.headers()["x-should-retry"], "false");
//! assert!(user.stats().cost_usd() >= 0.001);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```
//!
//! # Example: an axum application with budgets per user, through `ClaudeStack`
//!
//! The application authenticates its users itself and inserts each user's [`Tenant`] (one
//! value per user, kept in a map, so that its counters accumulate) before calling the stack,
//! whose `budget` option stacks the layer between the cache and fallback:
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//! use axum::extract::State;
//! use axum::http::{HeaderMap, StatusCode};
//! use axum::routing::post;
//! use axum::Router;
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_claude::body::RequestBody;
//! use tower_claude::stack::{ClaudeService, ClaudeStack, StackConfig};
//! use tower_claude::tenant::budget::BudgetLayer;
//! use tower_claude::tenant::spend::MemorySpend;
//! use tower_claude::tenant::{Budget, Tenant};
//!
//! #[derive(Clone)]
//! struct App {
//!     claude: ClaudeService,
//!     users: Arc<Mutex<HashMap<String, Tenant>>>,
//! }
//!
//! async fn ask(State(app): State<App>, headers: HeaderMap, body: axum::body::Bytes) -> (StatusCode, String) {
//!     // Your authentication goes here; this example trusts a header.
//!     let Some(user) = headers.get("x-user").and_then(|v| v.to_str().ok()) else {
//!         return (StatusCode::UNAUTHORIZED, "who are you?".into());
//!     };
//!     let tenant = app.users.lock().unwrap()
//!         .entry(user.to_owned())
//!         .or_insert_with(|| Tenant::new(user).budget(Budget::default().per_day(0.001).per_month(0.02)))
//!         .clone();
//!     let mut req = http::Request::post("/v1/messages")
//!         .header("x-api-key", "sk-ant-example")
//!         .header("anthropic-version", "2023-06-01")
//!         .body(RequestBody::from(body))
//!         .unwrap();
//!     req.extensions_mut().insert(tenant);
//!     match app.claude.clone().oneshot(req).await {
//!         Ok(res) => {
//!             let status = StatusCode::from_u16(res.status().as_u16()).unwrap();
//!             let bytes = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
//!             (status, String::from_utf8_lossy(&bytes).into_owned())
//!         }
//!         Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
//!     }
//! }
//!
//! # #[cfg(feature = "testing")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_claude::BoxError> {
//! let stack = ClaudeStack::from_config(&StackConfig {
//!     budget: Some(BudgetLayer::new(MemorySpend::new())),
//!     ..StackConfig::default()
//! })?;
//! let upstream = tower_claude::testing::MockClaude::builder().output_tokens(100).build();
//! let app = App { claude: stack.service(upstream), users: Arc::default() };
//! let router = Router::new().route("/ask", post(ask)).with_state(app.clone());
//!
//! let call = |user: &str| {
//!     axum::http::Request::post("/ask")
//!         .header("x-user", user)
//!         .body(axum::body::Body::from(
//!             r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
//!         ))
//!         .unwrap()
//! };
//! // About $0.0005 an answer: alice's third question is over her $0.001 a day.
//! for _ in 0..2 {
//!     assert_eq!(router.clone().oneshot(call("alice")).await?.status(), 200);
//! }
//! let refused = router.clone().oneshot(call("alice")).await?;
//! assert_eq!(refused.status(), 429);
//! let text = refused.into_body().collect().await?.to_bytes();
//! assert!(String::from_utf8_lossy(&text).contains(r#"tenant \"alice\" has reached its daily budget"#));
//! // Bob has a budget of his own.
//! assert_eq!(router.clone().oneshot(call("bob")).await?.status(), 200);
//! assert!(app.users.lock().unwrap()["alice"].stats().cost_usd() >= 0.001);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```
//!
//! # What the official SDKs do with the 429
//!
//! Checked against the Python SDK (`anthropic` 2.17, `_base_client.py`: `_should_retry`,
//! `_calculate_retry_timeout`) and the TypeScript SDK (`@anthropic-ai/sdk` 1.14,
//! `client.js`: `shouldRetry`, `retryRequest`): both read `x-should-retry` first, and
//! `false` means **no retry**: the caller gets `RateLimitError` at once with the message.
//! Without that header, both would retry a 429 (2 retries by default) and honour a
//! `retry-after` of any length (Python up to 4,294,967 s, about 50 days; TypeScript up to
//! 2^31 − 1 ms, about 25 days; beyond that they fall back to their own backoff, 0.5 s doubling
//! to at most 8 s): a client would sleep until the budget rolls over. This layer always sends
//! `x-should-retry: false` with a budget refusal, so SDK callers fail fast, and `retry-after`
//! tells an application that reads it when to try again. (The wait-expired 429 above has
//! `retry-after: 1` and no `x-should-retry`: SDKs retry it.)

mod body;
mod future;
mod layer;
mod service;

pub use body::BudgetBody;
pub use future::ResponseFuture;
pub use layer::{BudgetLayer, TenantSpend};
pub use service::Budgeted;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::Tenant;
use super::price::PriceTable;
use super::spend::{Clock, Period, PeriodKind, SpendKey, SpendStore};

/// What the layer's services share: configuration and the process's ledger.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn SpendStore>,
    pub(crate) prices: PriceTable,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) default_max_tokens: u64,
    pub(crate) max_wait: Duration,
    #[cfg(feature = "metrics")]
    pub(crate) alerts: Option<crate::metrics::alerts::Alerts>,
    pub(crate) ledger: Arc<Ledger>,
}

/// What this process knows of a `(tenant, period)` beyond the store.
#[derive(Debug, Default)]
struct Local {
    /// Reserved by requests in flight, micro-USD.
    held: u64,
    /// Settled here, not yet confirmed by the store (adds in flight and failed ones).
    pending: u64,
    /// Of `pending`, what a failed add left: taken by the next add.
    unsynced: u64,
    /// The highest total the store reported (spend only grows within a period).
    seen: u64,
}

/// The process's reservations and unsynced spend, shared by every service of a layer.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    entries: Mutex<HashMap<SpendKey, Local>>,
    /// Woken on every settlement (waiters re-check their budget).
    settled: tokio::sync::Notify,
    settlements: AtomicU64,
    /// Last store error log, Unix seconds (rate-limits the log).
    last_log: AtomicU64,
    /// Store adds spawned and not finished (see [`Ledger::flush`]).
    adds: std::sync::atomic::AtomicUsize,
    /// Woken when `adds` drops to zero.
    idle: tokio::sync::Notify,
}

impl Ledger {
    /// Waits until every spawned store add has finished (succeeded or failed).
    pub(crate) async fn flush(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.adds.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Counts one spawned store add while it lives (also when its task is cancelled).
struct AddInFlight(Arc<Shared>);

impl AddInFlight {
    fn new(shared: Arc<Shared>) -> Self {
        shared.ledger.adds.fetch_add(1, Ordering::AcqRel);
        Self(shared)
    }
}

impl Drop for AddInFlight {
    fn drop(&mut self) {
        if self.0.ledger.adds.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ledger.idle.notify_waiters();
        }
    }
}

impl Ledger {
    /// Per key: settled here, not confirmed by the store yet.
    pub(crate) fn unstored(&self, keys: &[SpendKey]) -> Vec<u64> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        keys.iter()
            .map(|k| entries.get(k).map_or(0, |l| l.pending))
            .collect()
    }
}

/// A refusal's facts.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub(crate) message: String,
    /// `retry-after`, whole seconds.
    pub(crate) retry_after: u64,
    /// `x-should-retry: false` (a budget refusal) or no header (a wait that timed out).
    pub(crate) final_: bool,
}

/// What admission decided.
pub(crate) enum Decision {
    /// Go on; `reserved` micro-USD are held for each key.
    Admit { reserved: u64 },
    /// Answer 429.
    Refuse(Refusal),
    /// Wait for a settlement, then decide again.
    Wait,
}

/// The keys a request at `now` is counted under: its UTC day and its UTC month.
pub(crate) fn keys_for(tenant: &Tenant, now: SystemTime) -> Vec<SpendKey> {
    vec![
        SpendKey::new(tenant.name_arc().clone(), Period::day_of(now)),
        SpendKey::new(tenant.name_arc().clone(), Period::month_of(now)),
    ]
}

/// The tenant's budget for a period kind, in micro-USD.
fn budget_micro(tenant: &Tenant, kind: PeriodKind) -> Option<u64> {
    let b = tenant.budget_value();
    let usd = match kind {
        PeriodKind::Day => b.daily(),
        PeriodKind::Month => b.monthly(),
    }?;
    // A budget that is not a positive finite amount stops every request (0) rather than none.
    Some(if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round().min(u64::MAX as f64) as u64
    } else {
        0
    })
}

/// Micro-USD as dollars with four decimals.
fn usd(micro: u64) -> String {
    format!("${}.{:04}", micro / 1_000_000, (micro % 1_000_000) / 100)
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Shared {
    pub(crate) fn has_budget(tenant: &Tenant) -> bool {
        let b = tenant.budget_value();
        b.daily().is_some() || b.monthly().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpendKey, Local>> {
        self.ledger
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides once for a tenant with a budget, holding `reserve` on admission.
    pub(crate) async fn decide(
        &self,
        tenant: &Tenant,
        keys: &[SpendKey],
        reserve: u64,
    ) -> Decision {
        let fetched = match self.store.get(keys).await {
            Ok(totals) => Some(totals),
            Err(error) => {
                self.store_failed("get", &error);
                None
            }
        };
        let now = self.clock.now();
        let mut entries = self.lock();
        let mut waiting = false;
        let mut refusal: Option<Refusal> = None;
        for (i, key) in keys.iter().enumerate() {
            let local = entries.entry(key.clone()).or_default();
            if let Some(total) = fetched.as_ref().and_then(|f| f.get(i)) {
                local.seen = local.seen.max(*total);
            }
            let Some(budget) = budget_micro(tenant, key.period().kind()) else {
                continue;
            };
            let settled = local.seen.saturating_add(local.pending);
            if settled >= budget {
                let period = key.period();
                let retry_after = period.remaining(now).as_secs_f64().ceil().max(1.0) as u64;
                let message = format!(
                    "tenant \"{}\" has reached its {} budget of {}: {} spent in {} (UTC); requests resume at {}",
                    tenant.name(),
                    period.kind().adjective(),
                    usd(budget),
                    usd(settled),
                    period,
                    rfc3339(period.end()),
                );
                // The later roll-over wins (a month over budget outlasts its day).
                if refusal.as_ref().is_none_or(|r| r.retry_after < retry_after) {
                    refusal = Some(Refusal {
                        message,
                        retry_after,
                        final_: true,
                    });
                }
            } else if settled.saturating_add(local.held) >= budget {
                waiting = true;
            }
        }
        if let Some(refusal) = refusal {
            return Decision::Refuse(refusal);
        }
        if waiting {
            return Decision::Wait;
        }
        for key in keys {
            let local = entries.entry(key.clone()).or_default();
            local.held = local.held.saturating_add(reserve);
        }
        tracing::debug!(
            tenant = tenant.name(),
            reserved_micro_usd = reserve,
            store_read = fetched.is_some(),
            "budget: admitted"
        );
        Decision::Admit { reserved: reserve }
    }

    /// A refusal after waiting `max_wait` for requests in flight to settle.
    pub(crate) fn wait_expired(tenant: &Tenant) -> Refusal {
        Refusal {
            message: format!(
                "tenant \"{}\": requests in flight have reserved the rest of its budget; try again when they finish",
                tenant.name()
            ),
            retry_after: 1,
            final_: false,
        }
    }

    /// The future that resolves on the next settlement (created before deciding, so none is
    /// missed).
    pub(crate) fn settled(&self) -> tokio::sync::futures::Notified<'_> {
        self.ledger.settled.notified()
    }

    /// Replaces a reservation by the real cost: in the ledger at once, in the store by a
    /// spawned add.
    pub(crate) fn settle(
        self: &Arc<Self>,
        tenant: &Tenant,
        keys: Vec<SpendKey>,
        reserved: u64,
        cost: u64,
    ) {
        let amounts: Vec<u64> = {
            let mut entries = self.lock();
            keys.iter()
                .map(|key| {
                    let local = entries.entry(key.clone()).or_default();
                    local.held = local.held.saturating_sub(reserved);
                    local.pending = local.pending.saturating_add(cost);
                    cost.saturating_add(std::mem::take(&mut local.unsynced))
                })
                .collect()
        };
        self.ledger.settled.notify_waiters();
        self.maybe_prune();
        if amounts.iter().all(|a| *a == 0) {
            return;
        }
        tracing::debug!(
            tenant = tenant.name(),
            cost_micro_usd = cost,
            reserved_micro_usd = reserved,
            "budget: settled"
        );
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.add_failed(&keys, &amounts);
            return;
        };
        let in_flight = AddInFlight::new(self.clone());
        let tenant = tenant.clone();
        handle.spawn(async move {
            let shared = &in_flight.0;
            // Keys whose amounts differ (a failed add left one behind) are added one by one.
            let groups: Vec<(Vec<SpendKey>, u64)> = if amounts.windows(2).all(|w| w[0] == w[1]) {
                vec![(keys, amounts[0])]
            } else {
                keys.into_iter()
                    .zip(amounts)
                    .map(|(k, a)| (vec![k], a))
                    .collect()
            };
            for (keys, amount) in groups {
                if amount == 0 {
                    continue;
                }
                match shared.store.add(&keys, amount).await {
                    Ok(totals) => shared.added(&tenant, &keys, amount, &totals),
                    Err(error) => {
                        shared.store_failed("add", &error);
                        shared.add_failed(&keys, &vec![amount; keys.len()]);
                    }
                }
            }
        });
    }

    fn added(&self, tenant: &Tenant, keys: &[SpendKey], amount: u64, totals: &[u64]) {
        {
            let mut entries = self.lock();
            for (key, total) in keys.iter().zip(totals) {
                let local = entries.entry(key.clone()).or_default();
                local.pending = local.pending.saturating_sub(amount);
                local.seen = local.seen.max(*total);
            }
        }
        self.ledger.settled.notify_waiters();
        #[cfg(feature = "metrics")]
        if let Some(alerts) = &self.alerts {
            for (key, total) in keys.iter().zip(totals) {
                let Some(budget) = budget_micro(tenant, key.period().kind()) else {
                    continue;
                };
                let threshold = (budget as f64 * alerts.threshold()).ceil() as u64;
                let before = total.saturating_sub(amount);
                if before < threshold && *total >= threshold {
                    alerts.budget(
                        tenant.name(),
                        key.period().kind(),
                        &key.period().to_string(),
                        *total as f64 / 1e6,
                        budget as f64 / 1e6,
                    );
                }
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = tenant;
    }

    fn add_failed(&self, keys: &[SpendKey], amounts: &[u64]) {
        let mut entries = self.lock();
        for (key, amount) in keys.iter().zip(amounts) {
            let local = entries.entry(key.clone()).or_default();
            local.unsynced = local.unsynced.saturating_add(*amount);
        }
    }

    /// Counts a store failure and logs it at most every 10 seconds.
    fn store_failed(&self, op: &'static str, error: &super::spend::SpendError) {
        #[cfg(feature = "metrics")]
        metrics::counter!(crate::metrics::names::SPEND_STORE_ERRORS_TOTAL).increment(1);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.ledger.last_log.load(Ordering::Relaxed);
        if now >= last.saturating_add(10)
            && self
                .ledger
                .last_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(op, %error, "budget: spend store failed; the spend is kept locally and added later");
        }
    }

    /// Forgets, every 256 settlements, what is idle and a day past its period.
    fn maybe_prune(&self) {
        if self.ledger.settlements.fetch_add(1, Ordering::Relaxed) % 256 != 255 {
            return;
        }
        let now = self.clock.now();
        self.lock()
            .retain(|key, l| l.held > 0 || l.pending > 0 || key.expires_at() > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_print_with_four_decimals() {
        assert_eq!(usd(10_000_000), "$10.0000");
        assert_eq!(usd(1_234_567), "$1.2345");
        assert_eq!(usd(99), "$0.0000");
    }

    proptest::proptest! {
        /// Whatever the order of admissions and settlements (each real cost at most its
        /// reservation), the settled spend never reaches `budget + the largest reservation`,
        /// and a final refusal comes only once the settled spend is at the budget.
        #[test]
        fn settled_spend_stays_within_one_reservation_of_the_budget(
            ops in proptest::collection::vec((proptest::bool::ANY, 1u64..20_000, 0u64..=100, 0usize..64), 1..200),
            budget in 1u64..100_000,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async move {
                // 2099-12-05 12:00 UTC: the memory store forgets keys by the real clock.
                let now = SystemTime::UNIX_EPOCH + Duration::from_secs(4_100_155_200);
                let shared = layer::BudgetLayer::new(super::super::spend::MemorySpend::new())
                    .clock(move || now)
                    .shared();
                let tenant = Tenant::new("t")
                    .budget(super::super::Budget::default().per_day(budget as f64 / 1e6));
                let keys = keys_for(&tenant, now);
                let (mut in_flight, mut settled, mut max_reserve) = (Vec::new(), 0u64, 0u64);
                for (admit, amount, percent, pick) in ops {
                    if admit || in_flight.is_empty() {
                        match shared.decide(&tenant, &keys, amount).await {
                            Decision::Admit { reserved } => {
                                max_reserve = max_reserve.max(reserved);
                                in_flight.push(reserved);
                            }
                            Decision::Refuse(r) => {
                                proptest::prop_assert!(r.final_);
                                proptest::prop_assert!(settled >= budget, "{settled} < {budget}");
                            }
                            Decision::Wait => proptest::prop_assert!(!in_flight.is_empty()),
                        }
                    } else {
                        let reserved = in_flight.swap_remove(pick % in_flight.len());
                        let cost = reserved * percent / 100;
                        settled += cost;
                        shared.settle(&tenant, keys.clone(), reserved, cost);
                        if pick % 2 == 0 {
                            tokio::task::yield_now().await; // let some store adds land
                        }
                    }
                    proptest::prop_assert!(
                        settled < budget + max_reserve.max(1),
                        "{settled} >= {budget} + {max_reserve}"
                    );
                }
                Ok(())
            })?;
        }
    }

    #[test]
    fn budgets_in_micro_dollars() {
        let t =
            Tenant::new("a").budget(super::super::Budget::default().per_day(2.5).per_month(-1.0));
        assert_eq!(budget_micro(&t, PeriodKind::Day), Some(2_500_000));
        assert_eq!(budget_micro(&t, PeriodKind::Month), Some(0));
        assert_eq!(budget_micro(&Tenant::new("b"), PeriodKind::Day), None);
    }
}
