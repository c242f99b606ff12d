//! The typed error of the retry layer.

use std::fmt;
use std::time::Duration;

use http::StatusCode;

use crate::BoxError;
use crate::anthropic::ApiError;

/// Why [`Retry`](super::Retry) failed with an error instead of returning a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryErrorKind {
    /// The upstream answered 429 with `error.details.error_code` `enforced_spend_limit_reached`:
    /// the organisation's monthly spend cap. Waiting does not help, so it is never retried.
    SpendLimit,
    /// Every allowed attempt failed with an inner service error (no HTTP response to return).
    Exhausted,
    /// The request's [`Deadline`](super::Deadline) passed while an attempt was still waiting
    /// for the upstream (its answer, or the rest of a body the layer reads ahead: no
    /// [`source`](std::error::Error::source) then), or the next wait would have crossed it
    /// after an attempt that failed with an inner service error (that error is the source).
    DeadlineExceeded,
    /// The shared [`RetryBudget`](super::RetryBudget) refused a retry; the last attempt failed
    /// with an inner service error.
    BudgetExhausted,
    /// The inner service failed with an error the layer was configured not to retry.
    Inner,
}

impl RetryErrorKind {
    fn describe(self) -> &'static str {
        match self {
            RetryErrorKind::SpendLimit => "monthly spend limit reached (not retried)",
            RetryErrorKind::Exhausted => "attempts exhausted",
            RetryErrorKind::DeadlineExceeded => "deadline would be exceeded by the next wait",
            RetryErrorKind::BudgetExhausted => "retry budget exhausted",
            RetryErrorKind::Inner => "inner service error (not retried)",
        }
    }
}

/// The error returned by [`Retry`](super::Retry), boxed in a [`BoxError`]
/// (use `downcast_ref::<RetryError>()`).
///
/// It carries what a caller needs to report the failure: the last HTTP status and server error
/// (when the upstream answered at all), the number of attempts and the time spent. The inner
/// service error, when there was one, is the [`source`](std::error::Error::source).
///
/// When the last attempt produced an HTTP response, the layer returns that response instead of
/// this error (see the [module docs](super)); this error is reserved for the spend cap and for
/// failures that have no response to forward.
///
/// ```
/// use tower_claude::retry::{RetryError, RetryErrorKind};
/// use tower_claude::BoxError;
///
/// fn explain(err: &BoxError) -> String {
///     match err.downcast_ref::<RetryError>() {
///         Some(e) if e.kind() == RetryErrorKind::SpendLimit => "raise the spend cap".to_string(),
///         Some(e) => format!("gave up after {} attempts", e.attempts()),
///         None => err.to_string(),
///     }
/// }
/// # let _ = explain;
/// ```
pub struct RetryError {
    kind: RetryErrorKind,
    attempts: u32,
    elapsed: Duration,
    total_wait: Duration,
    last_status: Option<StatusCode>,
    api_error: Option<ApiError>,
    request_id: Option<String>,
    source: Option<BoxError>,
}

impl RetryError {
    pub(crate) fn new(kind: RetryErrorKind, attempts: u32) -> Self {
        Self {
            kind,
            attempts,
            elapsed: Duration::ZERO,
            total_wait: Duration::ZERO,
            last_status: None,
            api_error: None,
            request_id: None,
            source: None,
        }
    }

    pub(crate) fn with_timing(mut self, elapsed: Duration, total_wait: Duration) -> Self {
        self.elapsed = elapsed;
        self.total_wait = total_wait;
        self
    }

    pub(crate) fn with_last_status(mut self, status: Option<StatusCode>) -> Self {
        self.last_status = status;
        self
    }

    pub(crate) fn with_api_error(mut self, err: Option<ApiError>) -> Self {
        self.api_error = err;
        self
    }

    pub(crate) fn with_request_id(mut self, id: Option<String>) -> Self {
        self.request_id = id;
        self
    }

    pub(crate) fn with_source(mut self, source: BoxError) -> Self {
        self.source = Some(source);
        self
    }

    /// Why the layer gave up.
    pub fn kind(&self) -> RetryErrorKind {
        self.kind
    }

    /// The number of attempts made (1 when the first attempt was final).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Time from the first attempt to this error.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Total time spent waiting between attempts.
    pub fn total_wait(&self) -> Duration {
        self.total_wait
    }

    /// The HTTP status of the last upstream response seen, if any attempt got one.
    pub fn last_status(&self) -> Option<StatusCode> {
        self.last_status
    }

    /// The last error the server sent (parsed envelope), if any.
    pub fn api_error(&self) -> Option<&ApiError> {
        self.api_error.as_ref()
    }

    /// The last server error message, if any.
    pub fn message(&self) -> Option<&str> {
        self.api_error.as_ref().map(ApiError::message)
    }

    /// The `request-id` of the last upstream response, if any.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

impl fmt::Debug for RetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryError")
            .field("kind", &self.kind)
            .field("attempts", &self.attempts)
            .field("elapsed", &self.elapsed)
            .field("total_wait", &self.total_wait)
            .field("last_status", &self.last_status)
            .field("api_error", &self.api_error)
            .field("request_id", &self.request_id)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for RetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} after {} attempt{} in {:.1?}",
            self.kind.describe(),
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            self.elapsed
        )?;
        if let Some(err) = &self.api_error {
            write!(f, "; last error: {err}")?;
        } else if let Some(status) = self.last_status {
            write!(f, "; last status: {}", status.as_u16())?;
        }
        if let Some(source) = &self.source {
            write!(f, "; last failure: {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RetryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| &**e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_kind_attempts_and_source() {
        let err = RetryError::new(RetryErrorKind::Exhausted, 3)
            .with_timing(Duration::from_secs(2), Duration::from_secs(1))
            .with_source("connection refused".into());
        let text = err.to_string();
        assert!(text.contains("attempts exhausted"), "{text}");
        assert!(text.contains("3 attempts"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(err.kind(), RetryErrorKind::Exhausted);
        assert_eq!(err.total_wait(), Duration::from_secs(1));
    }
}
