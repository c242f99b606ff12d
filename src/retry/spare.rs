//! [`Spare`]: the clone of an inner service that a layer's response futures take the service
//! of a later attempt from.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// A clone of a layer's inner service, made once (at the layer's first request) and shared by
/// the layer's clones and its response futures.
///
/// A response future that may send again (retry's next attempt, fallback's next model) needs
/// a service of its own. tower's `Retry` takes the service `poll_ready` readied and leaves a
/// clone in its place, on every request; for a boxed service each clone is an allocation (and
/// a free, and a reference count per layer inside), and most requests never send again. Here
/// the layer calls its readied service in place and the future holds this handle (a reference
/// count): a service is cloned from the spare only for an attempt after the first, and readied
/// before it is called, as a clone taken per request was.
///
/// The spare is a clone like any other (services are cloned to be shared; a clone holds no
/// readiness, as tower's own services' clones do not): it is taken from the layer's inner
/// service as it is at the first request, and kept while the layer or a future holds it.
/// Behind a `Mutex` (locked only to clone from it), so that a `Send` inner service is enough,
/// as it was: the spare is `Sync` without the service being `Sync`.
pub(crate) struct Spare<S>(Arc<OnceLock<Mutex<S>>>);

impl<S> Spare<S> {
    /// No spare yet: the first [`handle`](Self::handle) takes it.
    pub(crate) fn new() -> Self {
        Self(Arc::new(OnceLock::new()))
    }

    /// The handle a response future keeps; takes the spare from `inner` when there is none
    /// yet (the first request).
    pub(crate) fn handle(&self, inner: &S) -> Self
    where
        S: Clone,
    {
        self.0.get_or_init(|| Mutex::new(inner.clone()));
        Self(self.0.clone())
    }

    /// A service for a later attempt: a clone of the spare (`None` only from a handle made
    /// before any [`handle`](Self::handle) call, which the layers do not give out).
    pub(crate) fn service(&self) -> Option<S>
    where
        S: Clone,
    {
        self.0
            .get()
            .map(|spare| spare.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

impl<S> Clone for Spare<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S> std::fmt::Debug for Spare<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spare")
            .field("taken", &self.0.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts its clones.
    struct Counted(Arc<AtomicUsize>);

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.0.fetch_add(1, Ordering::Relaxed);
            Self(self.0.clone())
        }
    }

    #[test]
    fn the_spare_is_cloned_once_and_each_later_attempt_clones_it() {
        let clones = Arc::new(AtomicUsize::new(0));
        let inner = Counted(clones.clone());
        let spare = Spare::new();
        assert!(spare.service().is_none());
        let handles: Vec<_> = (0..5).map(|_| spare.handle(&inner)).collect();
        assert_eq!(
            clones.load(Ordering::Relaxed),
            1,
            "one spare for every request"
        );
        let layer_clone = spare.clone();
        assert!(handles[4].service().is_some());
        assert!(layer_clone.service().is_some());
        assert_eq!(
            clones.load(Ordering::Relaxed),
            3,
            "one more per later attempt"
        );
        assert!(format!("{spare:?}").contains("taken: true"));
    }
}
