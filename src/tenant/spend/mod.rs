//! Spend stores: what each tenant has spent in the current UTC day and month, in micro-USD,
//! kept where the [`BudgetLayer`](super::budget::BudgetLayer) can read it before a request and
//! add to it after the answer.
//!
//! - [`MemorySpend`]: in the process (lost on restart).
#![cfg_attr(
    feature = "disk-cache",
    doc = "- [`DiskSpend`] (feature `disk-cache`): an embedded redb file; each add is one write"
)]
#![cfg_attr(
    not(feature = "disk-cache"),
    doc = "- `DiskSpend` (feature `disk-cache`): an embedded redb file; each add is one write"
)]
//!   transaction (read, add, write, commit), so a restart keeps every settled cost.
#![cfg_attr(
    feature = "redis",
    doc = "- [`RedisSpend`] (feature `redis`): `INCRBY` on one key per tenant and period, with an"
)]
#![cfg_attr(
    not(feature = "redis"),
    doc = "- `RedisSpend` (feature `redis`): `INCRBY` on one key per tenant and period, with an"
)]
//!   expiry a day past the period's end; several proxies sharing a Redis share the spend.
//!
//! Keys are [`SpendKey`]s: a tenant name and a [`Period`]. Their store name is
//! `<prefix><tenant>:d:<YYYY-MM-DD>` or `<prefix><tenant>:m:<YYYY-MM>`: the tenant's name, never
//! a token.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use tower_claude::tenant::spend::{MemorySpend, Period, SpendKey, SpendStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_claude::tenant::spend::SpendError> {
//! let store = MemorySpend::new();
//! let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_892_800); // 2025-12-05 00:00 UTC
//! let keys = [SpendKey::new("alice", Period::day_of(now)), SpendKey::new("alice", Period::month_of(now))];
//! assert_eq!(keys[0].store_name("spend:"), "spend:alice:d:2025-12-05");
//! assert_eq!(store.add(&keys, 1_500).await?, vec![1_500, 1_500]);
//! assert_eq!(store.add(&keys, 500).await?, vec![2_000, 2_000]);
//! assert_eq!(store.get(&keys).await?, vec![2_000, 2_000]);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use time::{Date, Month, OffsetDateTime};

mod memory;
pub use memory::MemorySpend;

#[cfg(feature = "disk-cache")]
mod disk;
#[cfg(feature = "disk-cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "disk-cache")))]
pub use disk::DiskSpend;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisSpend;

/// The wall clock the budget periods follow: UTC days and months. Injectable, so that tests move
/// to the next day or month at will; any `Fn() -> SystemTime` is a clock.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tower_claude::tenant::spend::{Clock, SystemClock};
///
/// let fixed = || SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
/// assert_eq!(fixed.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(86_400));
/// assert!(SystemClock.now() > SystemTime::UNIX_EPOCH);
/// ```
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

impl<F> Clock for F
where
    F: Fn() -> SystemTime + Send + Sync + 'static,
{
    fn now(&self) -> SystemTime {
        self()
    }
}

/// The system's clock (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Daily or monthly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeriodKind {
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
}

impl PeriodKind {
    /// `"daily"` or `"monthly"`.
    pub fn adjective(self) -> &'static str {
        match self {
            PeriodKind::Day => "daily",
            PeriodKind::Month => "monthly",
        }
    }
}

/// One UTC calendar day or month.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tower_claude::tenant::spend::{Period, PeriodKind};
///
/// let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_599); // 2025-12-31 23:59:59 UTC
/// let month = Period::month_of(t);
/// assert_eq!(month.kind(), PeriodKind::Month);
/// assert_eq!(month.to_string(), "2025-12");
/// assert_eq!(month.end(), t + Duration::from_secs(1)); // 2026-01-01 00:00 UTC
/// assert_eq!(Period::day_of(t).to_string(), "2025-12-31");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Period {
    kind: PeriodKind,
    /// The first day of the period.
    first: Date,
}

fn utc(t: SystemTime) -> OffsetDateTime {
    // Times outside the `time` crate's range (years beyond ±9999) are clamped to the epoch.
    OffsetDateTime::from(t)
}

fn to_system(d: Date) -> SystemTime {
    let secs = d.midnight().assume_utc().unix_timestamp();
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

impl Period {
    /// The UTC day that contains `t`.
    pub fn day_of(t: SystemTime) -> Self {
        Self {
            kind: PeriodKind::Day,
            first: utc(t).date(),
        }
    }

    /// The UTC calendar month that contains `t`.
    pub fn month_of(t: SystemTime) -> Self {
        let d = utc(t).date();
        Self {
            kind: PeriodKind::Month,
            first: d.replace_day(1).unwrap_or(d),
        }
    }

    /// The period of `kind` that contains `t`.
    pub fn of(kind: PeriodKind, t: SystemTime) -> Self {
        match kind {
            PeriodKind::Day => Self::day_of(t),
            PeriodKind::Month => Self::month_of(t),
        }
    }

    /// Daily or monthly.
    pub fn kind(&self) -> PeriodKind {
        self.kind
    }

    /// Its first instant (00:00 UTC).
    pub fn start(&self) -> SystemTime {
        to_system(self.first)
    }

    /// The first instant of the next period (when a budget of this period rolls over).
    pub fn end(&self) -> SystemTime {
        let next = match self.kind {
            PeriodKind::Day => self.first.next_day(),
            PeriodKind::Month => {
                let (y, m) = match self.first.month() {
                    Month::December => (self.first.year() + 1, Month::January),
                    m => (self.first.year(), m.next()),
                };
                Date::from_calendar_date(y, m, 1).ok()
            }
        };
        next.map_or(
            SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800),
            to_system,
        )
    }

    /// How long from `now` until the period rolls over (zero once it has).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.end().duration_since(now).unwrap_or(Duration::ZERO)
    }
}

impl fmt::Display for Period {
    /// `YYYY-MM-DD` for a day, `YYYY-MM` for a month.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.first;
        match self.kind {
            PeriodKind::Day => write!(
                f,
                "{:04}-{:02}-{:02}",
                d.year(),
                u8::from(d.month()),
                d.day()
            ),
            PeriodKind::Month => write!(f, "{:04}-{:02}", d.year(), u8::from(d.month())),
        }
    }
}

/// A tenant's spend in one period: the unit the stores count in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpendKey {
    tenant: Arc<str>,
    period: Period,
}

impl SpendKey {
    /// The spend of `tenant` in `period`.
    pub fn new(tenant: impl Into<Arc<str>>, period: Period) -> Self {
        Self {
            tenant: tenant.into(),
            period,
        }
    }

    /// The tenant's name.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The period.
    pub fn period(&self) -> Period {
        self.period
    }

    /// The name a store keeps it under: `<prefix><tenant>:d:<YYYY-MM-DD>` or
    /// `<prefix><tenant>:m:<YYYY-MM>` (read from the right, the suffix is fixed, so two keys
    /// never share a name whatever the tenant names contain).
    pub fn store_name(&self, prefix: &str) -> String {
        let kind = match self.period.kind {
            PeriodKind::Day => "d",
            PeriodKind::Month => "m",
        };
        format!("{prefix}{}:{kind}:{}", self.tenant, self.period)
    }

    /// When a store may forget it: a day after its period ends (late settlements of requests
    /// admitted just before the roll-over still land in it).
    pub fn expires_at(&self) -> SystemTime {
        self.period.end() + Duration::from_secs(86_400)
    }
}

/// The future returned by [`SpendStore`] methods.
pub type SpendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SpendError>> + Send + 'a>>;

/// Where spend is kept. Implementations must make [`add`](SpendStore::add) atomic per key (two
/// concurrent adds never lose one) and return the totals after it.
pub trait SpendStore: Send + Sync + fmt::Debug + 'static {
    /// The spend recorded under each key, in micro-USD (0 for a key never added to).
    fn get<'a>(&'a self, keys: &'a [SpendKey]) -> SpendFuture<'a, Vec<u64>>;

    /// Adds `micro_usd` to every key; returns each key's total after the add.
    fn add<'a>(&'a self, keys: &'a [SpendKey], micro_usd: u64) -> SpendFuture<'a, Vec<u64>>;
}

/// What went wrong in a spend store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SpendErrorKind {
    /// The store could not be opened.
    Open,
    /// The backend failed (I/O, connection, protocol).
    Backend,
    /// The backend did not answer in time.
    Timeout,
}

/// A spend store error. Never contains a secret (a Redis URL's password is not kept).
#[derive(Debug, Clone)]
pub struct SpendError {
    kind: SpendErrorKind,
    message: String,
}

impl SpendError {
    /// An error of `kind` (for stores written outside the crate). The message must not hold a
    /// secret.
    ///
    /// ```
    /// use tower_claude::tenant::spend::{SpendError, SpendErrorKind};
    ///
    /// let e = SpendError::new(SpendErrorKind::Backend, "disk full");
    /// assert_eq!(e.to_string(), "spend store: disk full");
    /// ```
    pub fn new(kind: SpendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> SpendErrorKind {
        self.kind
    }
}

impl fmt::Display for SpendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spend store: {}", self.message)
    }
}

impl std::error::Error for SpendError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn periods_roll_over_at_utc_midnight_and_month_ends() {
        // 2024-02-29 12:00 UTC (a leap day).
        let t = at(1_709_208_000);
        let day = Period::day_of(t);
        assert_eq!(day.to_string(), "2024-02-29");
        assert_eq!(day.start(), at(1_709_164_800));
        assert_eq!(day.end(), at(1_709_251_200));
        assert_eq!(day.remaining(t), Duration::from_secs(43_200));
        let month = Period::month_of(t);
        assert_eq!(month.to_string(), "2024-02");
        assert_eq!(month.start(), at(1_706_745_600)); // 2024-02-01
        assert_eq!(month.end(), at(1_709_251_200)); // 2024-03-01
        assert_eq!(Period::month_of(month.end()).to_string(), "2024-03");
        assert_eq!(month.remaining(month.end()), Duration::ZERO);
    }

    #[test]
    fn store_names_hold_the_tenant_and_period() {
        let t = at(1_709_208_000);
        let key = SpendKey::new("team:a", Period::month_of(t));
        assert_eq!(key.store_name("p:"), "p:team:a:m:2024-02");
        assert_eq!(key.expires_at(), at(1_709_251_200 + 86_400));
    }
}
