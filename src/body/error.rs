use crate::BoxError;

/// What went wrong buffering a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BufferBodyErrorKind {
    /// The body is larger than the limit (Anthropic answers this with 413 `request_too_large`).
    TooLarge,
    /// Reading the body failed (the client went away, a malformed chunked encoding, ...).
    Body,
    /// The response future was polled after it completed.
    PolledAfterCompletion,
}

/// A request body could not be buffered.
///
/// ```
/// use http::Request;
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower::{ServiceExt, service_fn};
/// use tower_claude::body::{BufferBody, BufferBodyError, BufferBodyErrorKind, RequestBody};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = BufferBody::new(service_fn(|_: Request<RequestBody>| async {
///     Ok::<_, tower_claude::BoxError>(())
/// }), 4);
/// let err = svc.oneshot(Request::new(Full::new(Bytes::from_static(b"too long")))).await.unwrap_err();
/// let err = err.downcast_ref::<BufferBodyError>().unwrap();
/// assert_eq!(err.kind(), BufferBodyErrorKind::TooLarge);
/// # }
/// ```
#[derive(Debug)]
pub struct BufferBodyError {
    kind: BufferBodyErrorKind,
    limit: usize,
    source: Option<BoxError>,
}

impl BufferBodyError {
    pub(crate) fn from_body_error(err: BoxError, limit: usize) -> Self {
        if err.is::<http_body_util::LengthLimitError>() {
            Self {
                kind: BufferBodyErrorKind::TooLarge,
                limit,
                source: None,
            }
        } else {
            Self {
                kind: BufferBodyErrorKind::Body,
                limit,
                source: Some(err),
            }
        }
    }

    pub(super) fn polled_after_completion() -> Self {
        Self {
            kind: BufferBodyErrorKind::PolledAfterCompletion,
            limit: 0,
            source: None,
        }
    }

    /// The kind of error.
    pub fn kind(&self) -> BufferBodyErrorKind {
        self.kind
    }

    /// The configured size limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl std::fmt::Display for BufferBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            BufferBodyErrorKind::TooLarge => {
                write!(
                    f,
                    "request body is larger than the limit of {} bytes",
                    self.limit
                )
            }
            BufferBodyErrorKind::Body => f.write_str("failed to read the request body"),
            BufferBodyErrorKind::PolledAfterCompletion => {
                f.write_str("response future polled after completion")
            }
        }
    }
}

impl std::error::Error for BufferBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
