//! [`RequestBody`]: a complete request body backed by `Bytes`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// A complete request body, backed by [`Bytes`] and cheap to clone.
///
/// It implements [`http_body::Body`], so it can be sent by any hyper client, and it gives
/// synchronous access to its bytes, which is what replaying and hashing layers need.
///
/// ```
/// use tower_claude::body::RequestBody;
///
/// let body = RequestBody::from(r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[]}"#);
/// let copy = body.clone();
/// assert_eq!(copy.bytes(), body.bytes());
/// assert_eq!(body.len(), 58);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RequestBody {
    data: Bytes,
    sent: bool,
}

impl RequestBody {
    /// An empty body.
    pub const fn empty() -> Self {
        Self {
            data: Bytes::new(),
            sent: false,
        }
    }

    /// The whole body.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    /// Consumes the body and returns its bytes.
    pub fn into_bytes(self) -> Bytes {
        self.data
    }

    /// The body length in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the body has no bytes.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body is a prompt: do not print it, only its size.
        f.debug_struct("RequestBody")
            .field("len", &self.data.len())
            .finish()
    }
}

impl From<Bytes> for RequestBody {
    fn from(data: Bytes) -> Self {
        Self { data, sent: false }
    }
}

impl From<Vec<u8>> for RequestBody {
    fn from(data: Vec<u8>) -> Self {
        Bytes::from(data).into()
    }
}

impl From<String> for RequestBody {
    fn from(data: String) -> Self {
        Bytes::from(data).into()
    }
}

impl From<&'static str> for RequestBody {
    fn from(data: &'static str) -> Self {
        Bytes::from_static(data.as_bytes()).into()
    }
}

impl From<&'static [u8]> for RequestBody {
    fn from(data: &'static [u8]) -> Self {
        Bytes::from_static(data).into()
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.sent || this.data.is_empty() {
            this.sent = true;
            return Poll::Ready(None);
        }
        this.sent = true;
        Poll::Ready(Some(Ok(Frame::data(this.data.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent || self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.sent {
            SizeHint::with_exact(0)
        } else {
            SizeHint::with_exact(self.data.len() as u64)
        }
    }
}

impl AsRef<[u8]> for RequestBody {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}
