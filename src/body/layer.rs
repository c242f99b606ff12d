use tower_layer::Layer;

use super::BufferBody;

/// Buffers request bodies into [`RequestBody`](super::RequestBody), up to a size limit.
///
/// ```
/// use tower_claude::body::{BufferBodyLayer, ANTHROPIC_MAX_BODY};
///
/// let layer = BufferBodyLayer::new(ANTHROPIC_MAX_BODY);
/// assert_eq!(layer.limit(), 32 * 1024 * 1024);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BufferBodyLayer {
    limit: usize,
}

impl BufferBodyLayer {
    /// Buffers bodies of at most `limit` bytes; larger ones fail with
    /// [`BufferBodyErrorKind::TooLarge`](super::BufferBodyErrorKind::TooLarge).
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }

    /// The size limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Default for BufferBodyLayer {
    /// Anthropic's limit, 32 MB.
    fn default() -> Self {
        Self::new(super::ANTHROPIC_MAX_BODY)
    }
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferBody::new(inner, self.limit)
    }
}
