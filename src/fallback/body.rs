//! [`FallbackBody`]: the response body of [`Fallback`](super::Fallback).

/// Response body of [`Fallback`](super::Fallback).
///
/// Successful responses (streams included) flow through untouched. An error response the
/// layer read to decide whether to fail over (a 429 or 529 envelope, at most 64 KiB, unless a
/// layer below published it as an [`ErrorAnswer`](crate::body::ErrorAnswer)) and then
/// returned is replayed byte for byte: the bytes already read, then whatever the inner body
/// still had, then its error if reading it failed (see [`Replay`](crate::body::Replay)).
pub type FallbackBody<B> = crate::body::Replay<B>;
