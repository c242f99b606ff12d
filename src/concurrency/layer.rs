//! [`ConcurrencyLayer`]: builder and `tower::Layer` impl.

use std::sync::Arc;

use tower_layer::Layer;

use super::limiter::{Aimd, ConcurrencyHandle, Limiter, RampUp};
use super::service::Concurrency;

/// Caps the number of Messages API requests in flight. A request holds its permit until its
/// response body ends or is dropped, so streams count for their whole length. Builds
/// [`Concurrency`].
///
/// The cap is shared by every service built from the layer (and their clones). Modes:
/// * fixed: [`ConcurrencyLayer::new`];
/// * adaptive ([`Aimd`]): shrinks on 429 / 529 responses and on streams that fail mid-way
///   with `event: error`, grows back slowly on success;
/// * ramp-up ([`RampUp`], with either): limits how fast the cap may grow.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::concurrency::{Aimd, ConcurrencyLayer, RampUp};
///
/// let fixed = ConcurrencyLayer::new(16);
/// assert_eq!(fixed.handle().limit(), 16);
///
/// let adaptive = ConcurrencyLayer::adaptive(Aimd { initial: 8, min: 2, max: 32, ..Aimd::default() })
///     .ramp_up(RampUp { initial: 2, step: 1, interval: Duration::from_secs(5) });
/// assert_eq!(adaptive.handle().limit(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct ConcurrencyLayer {
    limiter: Arc<Limiter>,
    max: usize,
    aimd: Option<Aimd>,
}

impl ConcurrencyLayer {
    /// A fixed cap of `max` requests in flight (at least 1).
    pub fn new(max: usize) -> Self {
        Self {
            limiter: Limiter::new(max, None, None),
            max,
            aimd: None,
        }
    }

    /// An adaptive (AIMD) cap.
    pub fn adaptive(aimd: Aimd) -> Self {
        Self {
            limiter: Limiter::new(aimd.max, Some(aimd), None),
            max: aimd.max,
            aimd: Some(aimd),
        }
    }

    /// Adds a ramp-up: the cap starts at `ramp.initial` and grows by at most `ramp.step` per
    /// `ramp.interval`. This creates a fresh shared cap: call it before taking a
    /// [`handle`](Self::handle) or building services.
    pub fn ramp_up(mut self, ramp: RampUp) -> Self {
        self.limiter = Limiter::new(self.max, self.aimd, Some(ramp));
        self
    }

    /// A handle reading the shared cap.
    pub fn handle(&self) -> ConcurrencyHandle {
        ConcurrencyHandle {
            limiter: self.limiter.clone(),
        }
    }
}

impl<S> Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Concurrency::from_limiter(inner, self.limiter.clone())
    }
}
