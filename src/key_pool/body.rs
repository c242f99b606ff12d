//! [`KeyPoolBody`]: the response body of [`KeyPool`](super::KeyPool).

/// Response body of [`KeyPool`](super::KeyPool): the inner body, unchanged.
///
/// For a 429 or a 400 the layer reads the start of the error body (at most 64 KiB) to tell a
/// spend cap from a rate limit, and publishes what it read as an
/// [`ErrorAnswer`](crate::body::ErrorAnswer); that part is replayed first, then the rest of
/// the inner body follows (see [`Replay`](crate::body::Replay)).
pub type KeyPoolBody<B> = crate::body::Replay<B>;
