//! Tenants: who a request is for, so that one upstream quota is shared fairly between teams,
//! each with its own weight, priority class, optional limits and optional budgets.
//!
//! A [`Tenant`] is a request extension. `claude-proxy` sets it from the client's token (its
//! tenants file); an application that authenticates its users itself sets it per user:
//!
//! ```
//! use tower_claude::body::RequestBody;
//! use tower_claude::tenant::{Priority, Tenant};
//!
//! let alice = Tenant::new("alice").weight(3).priority(Priority::Interactive);
//! let mut req = http::Request::new(RequestBody::empty());
//! req.extensions_mut().insert(alice.clone());
//! assert_eq!(req.extensions().get::<Tenant>().unwrap().name(), "alice");
//! assert_eq!(alice.stats().requests(), 0);
//! ```
//!
//! The layers read it: the quota queues admit waiting requests weighted-fair across tenants
//! (`interactive` before `batch`, FIFO within a tenant); a request without a tenant belongs to
//! the anonymous default tenant (weight 1, interactive).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::quota::Limits;

pub mod budget;
pub mod fair;
pub mod limit;
pub mod price;
pub mod spend;

pub use price::{DEFAULT_PRICES_JSON, ModelPrice, PriceError, PriceErrorKind, PriceTable};

/// A tenant's priority class: every waiting `Interactive` request is admitted before any
/// waiting `Batch` request of the same key and group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Served first (the default).
    #[default]
    Interactive,
    /// Served when no interactive request waits.
    Batch,
}

impl Priority {
    /// `"interactive"` or `"batch"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }
}

/// A tenant's spending limits in US dollars, per UTC calendar day and per UTC calendar month.
///
/// ```
/// use tower_claude::tenant::Budget;
///
/// let b = Budget::default().per_day(5.0).per_month(100.0);
/// assert_eq!(b.daily(), Some(5.0));
/// assert_eq!(b.monthly(), Some(100.0));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Budget {
    per_day: Option<f64>,
    per_month: Option<f64>,
}

impl Budget {
    /// At most `usd` per UTC day.
    pub fn per_day(mut self, usd: f64) -> Self {
        self.per_day = Some(usd);
        self
    }

    /// At most `usd` per UTC calendar month.
    pub fn per_month(mut self, usd: f64) -> Self {
        self.per_month = Some(usd);
        self
    }

    /// The daily budget, if any.
    pub fn daily(&self) -> Option<f64> {
        self.per_day
    }

    /// The monthly budget, if any.
    pub fn monthly(&self) -> Option<f64> {
        self.per_month
    }
}

/// Running counters of one tenant, shared by every clone of its [`Tenant`] (and kept across a
/// reload of the tenants file by the proxy). Every layer that learns something adds to them.
///
/// ```
/// use tower_claude::tenant::Tenant;
///
/// let t = Tenant::new("team-a");
/// t.stats().record_request();
/// assert_eq!(t.stats().requests(), 1);
/// ```
#[derive(Debug, Default)]
pub struct TenantStats {
    requests: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cost_micro_usd: AtomicU64,
    queue_wait_micros: AtomicU64,
    refusals: AtomicU64,
}

impl TenantStats {
    /// Counts one request.
    pub fn record_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds served tokens.
    pub fn record_tokens(&self, input: u64, output: u64) {
        self.input_tokens.fetch_add(input, Ordering::Relaxed);
        self.output_tokens.fetch_add(output, Ordering::Relaxed);
    }

    /// Adds a settled cost, in millionths of a US dollar.
    pub fn record_cost_micro_usd(&self, micro_usd: u64) {
        self.cost_micro_usd.fetch_add(micro_usd, Ordering::Relaxed);
    }

    /// Adds time spent waiting in a quota queue.
    pub fn record_queue_wait(&self, wait: std::time::Duration) {
        let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.queue_wait_micros.fetch_add(us, Ordering::Relaxed);
    }

    /// Counts one request refused by the tenant's own limits or budget.
    pub fn record_refusal(&self) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests counted.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Input tokens served (all kinds: uncached, cache writes and cache reads).
    pub fn input_tokens(&self) -> u64 {
        self.input_tokens.load(Ordering::Relaxed)
    }

    /// Output tokens served.
    pub fn output_tokens(&self) -> u64 {
        self.output_tokens.load(Ordering::Relaxed)
    }

    /// Cost settled since start, in US dollars.
    pub fn cost_usd(&self) -> f64 {
        self.cost_micro_usd.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Total time spent in quota queues.
    pub fn queue_wait(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.queue_wait_micros.load(Ordering::Relaxed))
    }

    /// Requests refused by the tenant's limits or budget.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

struct Inner {
    name: Arc<str>,
    weight: u32,
    priority: Priority,
    limits: Vec<(String, Limits)>,
    budget: Budget,
    admin: bool,
    stats: Arc<TenantStats>,
}

/// Who a request is for: a request extension (cheap to clone) read by the fair queues, the
/// tenant limits, the cost meter and the metrics. Built with builder methods; two tenants are
/// the same tenant when their names are equal.
///
/// ```
/// use tower_claude::quota::Limits;
/// use tower_claude::tenant::{Budget, Priority, Tenant};
///
/// let t = Tenant::new("batch-jobs")
///     .weight(1)
///     .priority(Priority::Batch)
///     .limit("claude-opus-4", Limits::new(30, 20_000, 4_000))
///     .budget(Budget::default().per_day(20.0));
/// assert_eq!(t.priority_class(), Priority::Batch);
/// assert_eq!(t.limit_for("claude-opus-4"), Some(Limits::new(30, 20_000, 4_000)));
/// assert_eq!(t.limit_for("claude-haiku-4"), None);
/// ```
#[derive(Clone)]
pub struct Tenant {
    inner: Arc<Inner>,
}

impl Tenant {
    /// A tenant named `name`: weight 1, interactive, no limits or budget of its own.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                weight: 1,
                priority: Priority::Interactive,
                limits: Vec::new(),
                budget: Budget::default(),
                admin: false,
                stats: Arc::default(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                let i = &*self.inner;
                let mut copy = Inner {
                    name: i.name.clone(),
                    weight: i.weight,
                    priority: i.priority,
                    limits: i.limits.clone(),
                    budget: i.budget,
                    admin: i.admin,
                    stats: i.stats.clone(),
                };
                f(&mut copy);
                self.inner = Arc::new(copy);
            }
        }
        self
    }

    /// Its share of contended quota relative to other tenants (at least 1).
    pub fn weight(self, weight: u32) -> Self {
        self.edit(|i| i.weight = weight.max(1))
    }

    /// Its priority class.
    pub fn priority(self, priority: Priority) -> Self {
        self.edit(|i| i.priority = priority)
    }

    /// Limits of its own for a model group (a [`RateLimitGroup`](crate::anthropic::RateLimitGroup)
    /// name such as `"claude-opus-4"`), on top of the upstream's.
    pub fn limit(self, group: impl Into<String>, limits: Limits) -> Self {
        let group = group.into();
        self.edit(|i| {
            i.limits.retain(|(g, _)| *g != group);
            i.limits.push((group, limits));
        })
    }

    /// Its budgets.
    pub fn budget(self, budget: Budget) -> Self {
        self.edit(|i| i.budget = budget)
    }

    /// Marks it as an administrator (the proxy's admin routes).
    pub fn admin(self, admin: bool) -> Self {
        self.edit(|i| i.admin = admin)
    }

    /// Shares `stats` with another tenant value (the proxy keeps a tenant's counters across a
    /// reload of its tenants file).
    pub fn with_stats(self, stats: Arc<TenantStats>) -> Self {
        self.edit(|i| i.stats = stats)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its name, shared.
    pub fn name_arc(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// Its weight.
    pub fn weight_value(&self) -> u32 {
        self.inner.weight
    }

    /// Its priority class.
    pub fn priority_class(&self) -> Priority {
        self.inner.priority
    }

    /// Its own limits for `group`, if any.
    pub fn limit_for(&self, group: &str) -> Option<Limits> {
        self.inner
            .limits
            .iter()
            .find(|(g, _)| g == group)
            .map(|(_, l)| *l)
    }

    /// All its own limits, by group name.
    pub fn limits(&self) -> &[(String, Limits)] {
        &self.inner.limits
    }

    /// Its budgets.
    pub fn budget_value(&self) -> Budget {
        self.inner.budget
    }

    /// Whether it may use the proxy's admin routes.
    pub fn is_admin(&self) -> bool {
        self.inner.admin
    }

    /// Its running counters.
    pub fn stats(&self) -> &Arc<TenantStats> {
        &self.inner.stats
    }
}

impl PartialEq for Tenant {
    fn eq(&self, other: &Self) -> bool {
        self.inner.name == other.inner.name
    }
}

impl Eq for Tenant {}

impl std::hash::Hash for Tenant {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.name.hash(state)
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenant")
            .field("name", &self.inner.name)
            .field("weight", &self.inner.weight)
            .field("priority", &self.inner.priority)
            .field("limits", &self.inner.limits)
            .field("budget", &self.inner.budget)
            .field("admin", &self.inner.admin)
            .finish()
    }
}
