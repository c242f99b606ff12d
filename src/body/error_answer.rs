//! [`ErrorAnswer`]: an error answer's envelope, read once and published as a response
//! extension.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use http_body::Body;
use pin_project::pin_project;

use super::replay::{Peek, Replay};
use crate::BoxError;
use crate::anthropic::{ApiError, is_typed_object};

/// The parsed error of an error answer (a 429, a 529, any 4xx or 5xx), as a response
/// extension.
///
/// The innermost layer that must read an error answer's body (the key pool for a 429 or a 400,
/// retry for any error status, fallback for a 429 or a 529) reads its start once (at most
/// 64 KiB by default; envelopes are a few hundred bytes), parses it with
/// [`ApiError::from_response`], returns the body replayed unchanged, and publishes this
/// extension; the layers above read the extension instead of the body. A layer that replaces
/// the body (retry's envelope for an HTML error page) replaces the extension with it.
///
/// ```
/// use http::StatusCode;
/// use tower_claude::anthropic::{ApiError, ApiErrorKind};
/// use tower_claude::exchange::ErrorAnswer;
///
/// # fn answer() -> http::Response<()> {
/// #     let mut res = http::Response::new(());
/// #     *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
/// #     res.extensions_mut().insert(ErrorAnswer::from(ApiError::new(ApiErrorKind::RateLimit, "slow down")));
/// #     res
/// # }
/// let res = answer(); // from a stack with a key pool, retry or fallback layer
/// if let Some(answer) = res.extensions().get::<ErrorAnswer>() {
///     assert_eq!(answer.error().kind(), ApiErrorKind::RateLimit);
///     assert!(!answer.is_foreign());
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    error: ApiError,
    foreign: bool,
}

impl ErrorAnswer {
    /// The parsed error (a body that is no envelope gives the status's kind and the start of
    /// the body as its message: see [`ApiError::from_response`]).
    pub fn error(&self) -> &ApiError {
        &self.error
    }

    /// Whether the body was read whole and is not a Messages API answer at all (not a JSON
    /// object with a `type`: an HTML page from a gateway, garbage).
    pub fn is_foreign(&self) -> bool {
        self.foreign
    }
}

impl From<ApiError> for ErrorAnswer {
    /// An error a layer wrote itself, as an envelope.
    fn from(error: ApiError) -> Self {
        Self {
            error,
            foreign: false,
        }
    }
}

/// Reads an error answer's envelope once: the [`ErrorAnswer`] a layer below published, else
/// the start of the body (at most `cap` bytes), parsed and published. The future of
/// [`read_error_answer`].
#[pin_project]
pub(crate) struct ReadErrorAnswer<B> {
    head: Option<http::response::Parts>,
    /// Known already: the body as it is.
    known: Option<B>,
    #[pin]
    peek: Option<Peek<B>>,
}

/// The response with its [`ErrorAnswer`] extension, reading the body only when no layer below
/// did.
pub(crate) fn read_error_answer<B>(response: Response<B>, cap: usize) -> ReadErrorAnswer<B> {
    let (head, body) = response.into_parts();
    let known = head.extensions.get::<ErrorAnswer>().is_some();
    if known {
        tracing::trace!(
            status = head.status.as_u16(),
            "error answer read below; reused"
        );
    }
    let (known, peek) = if known {
        (Some(body), None)
    } else {
        (None, Some(Replay::peek(body, cap)))
    };
    ReadErrorAnswer {
        head: Some(head),
        known,
        peek,
    }
}

impl<B> Future for ReadErrorAnswer<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Response<Replay<B>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let body = match this.peek.as_pin_mut() {
            Some(peek) => {
                let peeked = ready!(peek.poll(cx));
                let status = this.head.as_ref().map(|h| h.status).unwrap_or_default();
                let data = peeked.data();
                let answer = ErrorAnswer {
                    error: ApiError::from_response(status, &data),
                    foreign: peeked.is_whole() && !is_typed_object(&data),
                };
                tracing::debug!(
                    status = status.as_u16(),
                    kind = ?answer.error.kind(),
                    foreign = answer.foreign,
                    "error answer read"
                );
                if let Some(head) = this.head.as_mut() {
                    head.extensions.insert(answer);
                }
                peeked.into_body()
            }
            None => match this.known.take() {
                Some(body) => Replay::new(body),
                None => Replay::from_bytes(Bytes::new()),
            },
        };
        let head = this
            .head
            .take()
            .unwrap_or_else(|| Response::new(()).into_parts().0);
        Poll::Ready(Response::from_parts(head, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};

    use crate::anthropic::ApiErrorKind;

    fn answer(status: u16, body: &'static str) -> Response<Full<Bytes>> {
        let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        res
    }

    #[tokio::test]
    async fn reads_parses_publishes_and_replays() {
        let env = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let res = read_error_answer(answer(529, env), 64 * 1024).await;
        let read = res.extensions().get::<ErrorAnswer>().unwrap().clone();
        assert_eq!(read.error().kind(), ApiErrorKind::Overloaded);
        assert!(!read.is_foreign());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], env.as_bytes());
    }

    #[tokio::test]
    async fn html_read_whole_is_foreign() {
        let res = read_error_answer(answer(502, "<html>bad gateway</html>"), 64 * 1024).await;
        let read = res.extensions().get::<ErrorAnswer>().unwrap();
        assert!(read.is_foreign());
        assert_eq!(read.error().kind(), ApiErrorKind::Api);
        // Cut at the cap: not known to be foreign.
        let res = read_error_answer(answer(502, "<html>bad gateway</html>"), 4).await;
        assert!(!res.extensions().get::<ErrorAnswer>().unwrap().is_foreign());
    }

    #[tokio::test]
    async fn an_answer_read_below_is_not_read_again() {
        let mut res = answer(429, "not read");
        res.extensions_mut().insert(ErrorAnswer::from(ApiError::new(
            ApiErrorKind::RateLimit,
            "from below",
        )));
        let res = read_error_answer(res, 64 * 1024).await;
        let read = res.extensions().get::<ErrorAnswer>().unwrap();
        assert_eq!(read.error().message(), "from below");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"not read");
    }
}
