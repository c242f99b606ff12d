//! The typed error of the fallback layer.

use std::fmt;

use crate::BoxError;

/// Why [`Fallback`](super::Fallback) failed with an error instead of returning a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackErrorKind {
    /// The inner service failed (no HTTP answer) on the last model the layer tried: an error
    /// that does not move a request on (connection errors, timeouts, ...), or a spend-cap error
    /// with no model left. The inner error is the [`source`](std::error::Error::source).
    Inner,
}

/// The error returned by [`Fallback`](super::Fallback), boxed in a [`BoxError`]
/// (`downcast_ref::<FallbackError>()`).
///
/// The layer returns an error only when the last thing that happened was an inner service
/// error; when upstream answered, its last answer is returned as a response (see the
/// [module docs](super)). The error says which model was being tried, how many upstream
/// requests were sent and how many failovers happened; the inner error (for instance the
/// retry layer's error) is its [`source`](std::error::Error::source).
///
/// ```
/// use tower_claude::fallback::{FallbackError, FallbackErrorKind};
/// use tower_claude::BoxError;
///
/// fn explain(err: &BoxError) -> String {
///     match err.downcast_ref::<FallbackError>() {
///         Some(e) if e.kind() == FallbackErrorKind::Inner => {
///             format!("{} failed after {} attempts", e.model(), e.attempts())
///         }
///         _ => err.to_string(),
///     }
/// }
/// # let _ = explain;
/// ```
pub struct FallbackError {
    kind: FallbackErrorKind,
    requested: String,
    model: String,
    attempts: u32,
    failovers: u32,
    source: BoxError,
}

impl FallbackError {
    pub(crate) fn inner(
        requested: String,
        model: String,
        attempts: u32,
        failovers: u32,
        source: BoxError,
    ) -> Self {
        Self {
            kind: FallbackErrorKind::Inner,
            requested,
            model,
            attempts,
            failovers,
            source,
        }
    }

    /// Why the layer failed.
    pub fn kind(&self) -> FallbackErrorKind {
        self.kind
    }

    /// The model the caller asked for.
    pub fn requested(&self) -> &str {
        &self.requested
    }

    /// The model of the attempt that failed.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Upstream requests sent by the layer for this request, the failed one included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// How many times the layer moved to a lower model before the failure.
    pub fn failovers(&self) -> u32 {
        self.failovers
    }

    /// The inner service's error.
    pub fn inner_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl fmt::Debug for FallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackError")
            .field("kind", &self.kind)
            .field("requested", &self.requested)
            .field("model", &self.model)
            .field("attempts", &self.attempts)
            .field("failovers", &self.failovers)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for FallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FallbackErrorKind::Inner => write!(
                f,
                "request for {} failed on {} after {} attempt(s), {} failover(s): {}",
                self.requested, self.model, self.attempts, self.failovers, self.source
            ),
        }
    }
}

impl std::error::Error for FallbackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn carries_context_and_source() {
        let e = FallbackError::inner(
            "claude-opus-4-7".into(),
            "claude-sonnet-4-6".into(),
            2,
            1,
            "connection reset".into(),
        );
        assert_eq!(e.kind(), FallbackErrorKind::Inner);
        assert_eq!(e.requested(), "claude-opus-4-7");
        assert_eq!(e.model(), "claude-sonnet-4-6");
        assert_eq!((e.attempts(), e.failovers()), (2, 1));
        assert_eq!(e.source().unwrap().to_string(), "connection reset");
        assert_eq!(e.inner_error().to_string(), "connection reset");
        let text = e.to_string();
        assert!(text.contains("claude-sonnet-4-6") && text.contains("connection reset"));
    }
}
