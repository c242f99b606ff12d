//! Quota state: token-bucket maths and the shared [`QuotaBoard`](crate::quota) of limits,
//! buckets and server snapshots per `(key id, rate-limit group)`.

mod bucket;

pub use bucket::{TakeError, TokenBucket};
