//! The options of a [`Cache`](super::Cache), shared by its clones, its bodies and its
//! write-behind queue.

use std::sync::Arc;
use std::time::Duration;

use super::CacheMode;
use super::flights::Flights;
use super::key::{CacheKey, Tenant};
use super::secret::Keys;
use super::store::{CacheStore, CachedResponse};
use super::writer::Writer;
use crate::fallback::FallbackHandle;

/// The options of a [`Cache`](super::Cache), shared by its clones.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn CacheStore>,
    pub(crate) ttl: Duration,
    pub(crate) mode: CacheMode,
    pub(crate) max_entry_bytes: usize,
    /// The keys derived from the cache's secret.
    pub(crate) keys: Arc<Keys>,
    pub(crate) tenant: Option<Tenant>,
    pub(crate) fallback: Option<FallbackHandle>,
    pub(crate) writer: Arc<Writer>,
    /// The requests in flight. Each [`Cache`](super::Cache) a layer builds has its own
    /// (the layer's is a placeholder, replaced in `CacheLayer::layer`).
    pub(crate) flights: Arc<Flights>,
}

/// Hands a complete answer to the write-behind queue, under the key of the model that
/// produced it; `false` (and nothing queued) when it is not a complete, valid Messages API
/// answer.
pub(crate) fn keep(config: &Config, key: CacheKey, entry: &CachedResponse) -> bool {
    if !storable(key, entry, None) {
        return false;
    }
    config.writer.enqueue(key, entry.clone(), config.ttl);
    true
}

/// Whether `entry` is a complete, valid Messages API answer, the only kind stored.
/// `message_json` is what the answer's [`UsageTracker`] read of a JSON answer
/// ([`UsageTracker::message_json`]): when it knows, the body is not parsed again.
///
/// [`UsageTracker`]: crate::anthropic::UsageTracker
/// [`UsageTracker::message_json`]: crate::anthropic::UsageTracker::message_json
pub(crate) fn storable(key: CacheKey, entry: &CachedResponse, message_json: Option<bool>) -> bool {
    let complete = match message_json {
        Some(message) if !entry.is_stream() => entry.status().is_success() && message,
        _ => entry.is_complete_message(),
    };
    if !complete {
        tracing::debug!(key = %key, "not a complete Messages API answer: not stored");
        return false;
    }
    true
}
