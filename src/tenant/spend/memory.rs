//! [`MemorySpend`]: spend kept in the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::{SpendFuture, SpendKey, SpendStore};

/// Spend kept in the process: shared by every clone, lost on restart. Keys are forgotten a
/// day after their period ends (swept on writes), so memory stays bounded by the tenants
/// active in the current month.
///
/// ```
/// use tower_claude::tenant::budget::BudgetLayer;
/// use tower_claude::tenant::spend::MemorySpend;
///
/// let layer = BudgetLayer::new(MemorySpend::new());
/// # drop(layer);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemorySpend {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    totals: HashMap<SpendKey, (u64, SystemTime)>,
    /// The map's size after the last sweep: the next sweep waits until it doubles.
    swept_at: usize,
}

impl MemorySpend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SpendStore for MemorySpend {
    fn get<'a>(&'a self, keys: &'a [SpendKey]) -> SpendFuture<'a, Vec<u64>> {
        let state = self.lock();
        let totals = keys
            .iter()
            .map(|k| state.totals.get(k).map_or(0, |(v, _)| *v))
            .collect();
        Box::pin(std::future::ready(Ok(totals)))
    }

    fn add<'a>(&'a self, keys: &'a [SpendKey], micro_usd: u64) -> SpendFuture<'a, Vec<u64>> {
        let mut state = self.lock();
        if state.totals.len() >= (2 * state.swept_at).max(64) {
            let now = SystemTime::now();
            state.totals.retain(|_, (_, expires)| *expires > now);
            state.swept_at = state.totals.len();
        }
        let totals = keys
            .iter()
            .map(|k| {
                let entry = state.totals.entry(k.clone()).or_insert((0, k.expires_at()));
                entry.0 = entry.0.saturating_add(micro_usd);
                entry.0
            })
            .collect();
        Box::pin(std::future::ready(Ok(totals)))
    }
}
