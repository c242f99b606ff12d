//! Every metric name, label key and fixed label value the crate emits, in one place.
//!
//! `docs/metrics.md` documents the same table and the Grafana dashboard in `docs/grafana/`
//! may only use names listed in [`METRICS`] (a test checks both).

/// The kind of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MetricKind {
    /// A monotonically increasing counter (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution (rendered as a Prometheus histogram by [`prometheus`](super::prometheus)).
    Histogram,
}

/// The description of one metric: name, kind, labels and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The metric name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The label keys it carries.
    pub labels: &'static [&'static str],
    /// One-line help text (also sent as the Prometheus `# HELP`).
    pub help: &'static str,
}

/// Requests seen by [`MetricsLayer`](super::MetricsLayer), counted when the response ends.
pub const REQUESTS_TOTAL: &str = "tower_claude_requests_total";
/// Input tokens that count toward ITPM (`input_tokens + cache_creation_input_tokens`).
pub const INPUT_TOKENS_TOTAL: &str = "tower_claude_input_tokens_total";
/// Output tokens.
pub const OUTPUT_TOKENS_TOTAL: &str = "tower_claude_output_tokens_total";
/// Input tokens read from the prompt cache (`cache_read_input_tokens`), per key and group.
pub const PROMPT_CACHE_READ_TOKENS_TOTAL: &str = "tower_claude_prompt_cache_read_tokens_total";
/// Input tokens written to the prompt cache (`cache_creation_input_tokens`), per key and group.
pub const PROMPT_CACHE_WRITE_TOKENS_TOTAL: &str = "tower_claude_prompt_cache_write_tokens_total";
/// Share of input tokens served from the prompt cache since the board started, per key and
/// group: `read / (read + write + uncached)`.
pub const PROMPT_CACHE_HIT_RATIO: &str = "tower_claude_prompt_cache_hit_ratio";
/// Retries made by the retry layer (attempts beyond the first), by reason.
pub const RETRIES_TOTAL: &str = "tower_claude_retries_total";
/// Requests served by another model than the one asked for.
pub const FALLBACKS_TOTAL: &str = "tower_claude_fallbacks_total";
/// Cache decisions (hit / miss / bypass).
pub const CACHE_REQUESTS_TOTAL: &str = "tower_claude_cache_requests_total";
/// Time a request waited for quota (rate limiter queue plus pacing), in seconds.
pub const QUEUE_WAIT_SECONDS: &str = "tower_claude_queue_wait_seconds";
/// End-to-end latency, from the call to the end of the response body, in seconds.
pub const REQUEST_DURATION_SECONDS: &str = "tower_claude_request_duration_seconds";
/// Requests in flight (called, body not finished).
pub const IN_FLIGHT_REQUESTS: &str = "tower_claude_in_flight_requests";
/// Per-minute limit of a `(key, group, bucket)`.
pub const QUOTA_LIMIT: &str = "tower_claude_quota_limit";
/// Units available now in a `(key, group, bucket)`.
pub const QUOTA_REMAINING: &str = "tower_claude_quota_remaining";
/// `1 - remaining / limit` of a `(key, group, bucket)`, in `0..=1`.
pub const QUOTA_UTILISATION: &str = "tower_claude_quota_utilisation";
/// Holt forecast of demand per minute, per group and bucket.
pub const FORECAST_PER_MINUTE: &str = "tower_claude_forecast_per_minute";
/// Demand per minute measured over the last forecast interval, per group and bucket.
pub const DEMAND_PER_MINUTE: &str = "tower_claude_demand_per_minute";
/// 1 while the pacing layer spaces admissions of a group, else 0.
pub const PACING_ACTIVE: &str = "tower_claude_pacing_active";
/// Delay added by the pacing layer, in seconds.
pub const PACING_DELAY_SECONDS: &str = "tower_claude_pacing_delay_seconds";
/// Quota alerts raised or resolved.
pub const ALERTS_TOTAL: &str = "tower_claude_alerts_total";
/// Webhook deliveries of alerts, by result.
pub const ALERT_DELIVERIES_TOTAL: &str = "tower_claude_alert_deliveries_total";
/// Keys a key pool took out of rotation, by reason (`KEY_REMOVED_*`).
pub const KEYS_REMOVED_TOTAL: &str = "tower_claude_keys_removed_total";
/// Times the Redis quota backend became unreachable (the board then limits locally).
pub const QUOTA_REDIS_OUTAGES_TOTAL: &str = "tower_claude_quota_redis_outages_total";
/// Cache writes by result: `stored`, `dropped` (write queue full), `failed` (store error).
pub const CACHE_WRITES_TOTAL: &str = "tower_claude_cache_writes_total";
// --- issue 15: per tenant, rendered at scrape time from `TenantStats` by
// `prometheus::render_tenants` (not through the `metrics` facade). ---
/// Requests a tenant sent (cache hits included).
pub const TENANT_REQUESTS_TOTAL: &str = "tower_claude_tenant_requests_total";
/// Input tokens served to a tenant (uncached, cache writes and cache reads).
pub const TENANT_INPUT_TOKENS_TOTAL: &str = "tower_claude_tenant_input_tokens_total";
/// Output tokens served to a tenant.
pub const TENANT_OUTPUT_TOKENS_TOTAL: &str = "tower_claude_tenant_output_tokens_total";
/// US dollars a tenant spent (settled from real usage).
pub const TENANT_COST_USD_TOTAL: &str = "tower_claude_tenant_cost_usd_total";
/// Seconds a tenant's requests waited in quota queues, summed.
pub const TENANT_QUEUE_WAIT_SECONDS_TOTAL: &str = "tower_claude_tenant_queue_wait_seconds_total";
/// Requests refused by a tenant's own limits or budget.
pub const TENANT_REFUSALS_TOTAL: &str = "tower_claude_tenant_refusals_total";
/// A tenant's weight (its share of contended quota), labelled with its priority class.
pub const TENANT_WEIGHT: &str = "tower_claude_tenant_weight";
/// A tenant's budget in US dollars per period (`day`, `month`).
pub const TENANT_BUDGET_USD: &str = "tower_claude_tenant_budget_usd";
/// Spend store operations that failed (the budget layer then counts the spend locally).
pub const SPEND_STORE_ERRORS_TOTAL: &str = "tower_claude_spend_store_errors_total";

/// Label: the model id, normalised to a known catalogue id or [`OTHER`].
pub const LABEL_MODEL: &str = "model";
/// Label: the rate-limit group (a catalogue group, or [`OTHER`]).
pub const LABEL_GROUP: &str = "group";
/// Label: the HTTP status code, or [`STATUS_NONE`] when the inner service failed.
pub const LABEL_STATUS: &str = "status";
/// Label: the outcome of a request (`OUTCOME_*`).
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: a [`KeyId`](crate::anthropic::KeyId), never a key.
pub const LABEL_KEY: &str = "key";
/// Label: the bucket (`BUCKET_*`).
pub const LABEL_BUCKET: &str = "bucket";
/// Label: the reason of a retry (`REASON_*`).
pub const LABEL_REASON: &str = "reason";
/// Label: the model asked for (fallbacks).
pub const LABEL_FROM: &str = "from";
/// Label: the model that served (fallbacks).
pub const LABEL_TO: &str = "to";
/// Label: the cache decision (`hit`, `miss`, `bypass`).
pub const LABEL_CACHE: &str = "cache";
/// Label: alert state (`firing`, `resolved`).
pub const LABEL_STATE: &str = "state";
/// Label: delivery result (`delivered`, `failed`, `dropped`, `suppressed`).
pub const LABEL_RESULT: &str = "result";
/// Label: tenant name (from the proxy's tenants file; names only, never tokens).
pub const LABEL_TENANT: &str = "tenant";
/// Label: priority class (`interactive`, `batch`).
pub const LABEL_PRIORITY: &str = "priority";
/// Label: budget period (`day`, `month`).
pub const LABEL_PERIOD: &str = "period";

/// Model ids reported under their own name by default (the default
/// [`ModelCatalog`](crate::anthropic::ModelCatalog)'s ids); any other id is reported as
/// [`OTHER`], so that a caller cannot create unbounded label values.
pub const KNOWN_MODELS: &[&str] = &[
    "claude-opus-4-7",
    "claude-opus-4-6",
    "claude-opus-4-5",
    "claude-opus-4-5-20251101",
    "claude-opus-4-1",
    "claude-opus-4-1-20250805",
    "claude-opus-4-0",
    "claude-opus-4-20250514",
    "claude-4-opus-20250514",
    "claude-sonnet-4-6",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-0",
    "claude-sonnet-4-20250514",
    "claude-4-sonnet-20250514",
    "claude-haiku-4-5",
    "claude-haiku-4-5-20251001",
    "claude-mythos-preview",
    "claude-3-7-sonnet-latest",
    "claude-3-7-sonnet-20250219",
    "claude-3-5-sonnet-latest",
    "claude-3-5-sonnet-20241022",
    "claude-3-5-sonnet-20240620",
    "claude-3-5-haiku-latest",
    "claude-3-5-haiku-20241022",
    "claude-3-opus-latest",
    "claude-3-opus-20240229",
    "claude-3-sonnet-20240229",
    "claude-3-haiku-20240307",
];

/// Value of `model` / `group` / `from` / `to` for ids outside the catalogue.
pub const OTHER: &str = "other";
/// Value of `status` when there is no HTTP response (the inner service failed).
pub const STATUS_NONE: &str = "none";

/// Outcome: 2xx, body complete.
pub const OUTCOME_SUCCESS: &str = "success";
/// Outcome: 429.
pub const OUTCOME_RATE_LIMITED: &str = "rate_limited";
/// Outcome: 529.
pub const OUTCOME_OVERLOADED: &str = "overloaded";
/// Outcome: another 4xx.
pub const OUTCOME_CLIENT_ERROR: &str = "client_error";
/// Outcome: another 5xx.
pub const OUTCOME_SERVER_ERROR: &str = "server_error";
/// Outcome: 2xx whose body failed (an SSE `event: error`, a stream cut before
/// `message_stop`, or a body error).
pub const OUTCOME_STREAM_ERROR: &str = "stream_error";
/// Outcome: the inner service returned an error (no response).
pub const OUTCOME_ERROR: &str = "error";
/// Outcome: the caller dropped the response (or its future) before the end.
pub const OUTCOME_CANCELLED: &str = "cancelled";
/// Every outcome value.
pub const OUTCOMES: &[&str] = &[
    OUTCOME_SUCCESS,
    OUTCOME_RATE_LIMITED,
    OUTCOME_OVERLOADED,
    OUTCOME_CLIENT_ERROR,
    OUTCOME_SERVER_ERROR,
    OUTCOME_STREAM_ERROR,
    OUTCOME_ERROR,
    OUTCOME_CANCELLED,
];

/// Bucket: requests per minute.
pub const BUCKET_REQUESTS: &str = "requests";
/// Bucket: input tokens per minute.
pub const BUCKET_INPUT_TOKENS: &str = "input_tokens";
/// Bucket: output tokens per minute.
pub const BUCKET_OUTPUT_TOKENS: &str = "output_tokens";
/// Every bucket value.
pub const BUCKETS: &[&str] = &[BUCKET_REQUESTS, BUCKET_INPUT_TOKENS, BUCKET_OUTPUT_TOKENS];

/// Retry reason: 429.
pub const REASON_RATE_LIMITED: &str = "rate_limited";
/// Retry reason: 529.
pub const REASON_OVERLOADED: &str = "overloaded";
/// Retry reason: other 5xx.
pub const REASON_SERVER_ERROR: &str = "server_error";
/// Retry reason: 408 / 504.
pub const REASON_TIMEOUT: &str = "timeout";
/// Retry reason: 409.
pub const REASON_CONFLICT: &str = "conflict";
/// Retry reason: a connection error or a mid-stream error (no failed status).
pub const REASON_OTHER: &str = "other";

/// Alert state: utilisation crossed the threshold.
pub const STATE_FIRING: &str = "firing";
/// Alert state: utilisation fell below the clear threshold.
pub const STATE_RESOLVED: &str = "resolved";
/// Delivery result: the webhook answered 2xx.
pub const RESULT_DELIVERED: &str = "delivered";
/// Delivery result: every attempt failed.
pub const RESULT_FAILED: &str = "failed";
/// Delivery result: the queue was full; the alert was not sent.
pub const RESULT_DROPPED: &str = "dropped";
/// Delivery result: within the interval of a previous alert; not sent.
pub const RESULT_SUPPRESSED: &str = "suppressed";

/// Every metric the crate emits.
pub const METRICS: &[MetricDef] = &[
    MetricDef {
        name: REQUESTS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_MODEL, LABEL_GROUP, LABEL_STATUS, LABEL_OUTCOME],
        help: "Messages API requests, counted when the response ends.",
    },
    MetricDef {
        name: INPUT_TOKENS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_MODEL, LABEL_GROUP],
        help: "Input tokens that count toward ITPM (input + cache creation).",
    },
    MetricDef {
        name: OUTPUT_TOKENS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_MODEL, LABEL_GROUP],
        help: "Output tokens.",
    },
    MetricDef {
        name: PROMPT_CACHE_READ_TOKENS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_KEY, LABEL_GROUP],
        help: "Input tokens read from the prompt cache (cache_read_input_tokens).",
    },
    MetricDef {
        name: PROMPT_CACHE_WRITE_TOKENS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_KEY, LABEL_GROUP],
        help: "Input tokens written to the prompt cache (cache_creation_input_tokens).",
    },
    MetricDef {
        name: PROMPT_CACHE_HIT_RATIO,
        kind: MetricKind::Gauge,
        labels: &[LABEL_KEY, LABEL_GROUP],
        help: "Share of input tokens read from the prompt cache: read / (read + write + uncached).",
    },
    MetricDef {
        name: RETRIES_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_REASON],
        help: "Retries (attempts beyond the first) by the reason of the last failure.",
    },
    MetricDef {
        name: FALLBACKS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_FROM, LABEL_TO],
        help: "Requests served by another model than the one asked for.",
    },
    MetricDef {
        name: CACHE_REQUESTS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_CACHE],
        help: "Cache decisions.",
    },
    MetricDef {
        name: QUEUE_WAIT_SECONDS,
        kind: MetricKind::Histogram,
        labels: &[LABEL_GROUP],
        help: "Time waited for quota (rate-limit queue plus pacing).",
    },
    MetricDef {
        name: REQUEST_DURATION_SECONDS,
        kind: MetricKind::Histogram,
        labels: &[LABEL_MODEL, LABEL_OUTCOME],
        help: "End-to-end latency until the end of the response body.",
    },
    MetricDef {
        name: IN_FLIGHT_REQUESTS,
        kind: MetricKind::Gauge,
        labels: &[],
        help: "Requests called whose response body has not ended.",
    },
    MetricDef {
        name: QUOTA_LIMIT,
        kind: MetricKind::Gauge,
        labels: &[LABEL_KEY, LABEL_GROUP, LABEL_BUCKET],
        help: "Per-minute limit.",
    },
    MetricDef {
        name: QUOTA_REMAINING,
        kind: MetricKind::Gauge,
        labels: &[LABEL_KEY, LABEL_GROUP, LABEL_BUCKET],
        help: "Units available now.",
    },
    MetricDef {
        name: QUOTA_UTILISATION,
        kind: MetricKind::Gauge,
        labels: &[LABEL_KEY, LABEL_GROUP, LABEL_BUCKET],
        help: "1 - remaining / limit.",
    },
    MetricDef {
        name: FORECAST_PER_MINUTE,
        kind: MetricKind::Gauge,
        labels: &[LABEL_GROUP, LABEL_BUCKET],
        help: "Holt forecast of demand per minute at the forecast horizon.",
    },
    MetricDef {
        name: DEMAND_PER_MINUTE,
        kind: MetricKind::Gauge,
        labels: &[LABEL_GROUP, LABEL_BUCKET],
        help: "Demand per minute over the last forecast interval.",
    },
    MetricDef {
        name: PACING_ACTIVE,
        kind: MetricKind::Gauge,
        labels: &[LABEL_GROUP],
        help: "1 while admissions of the group are paced.",
    },
    MetricDef {
        name: PACING_DELAY_SECONDS,
        kind: MetricKind::Histogram,
        labels: &[LABEL_GROUP],
        help: "Delay added by pacing.",
    },
    MetricDef {
        name: ALERTS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_STATE],
        help: "Quota alerts raised and resolved.",
    },
    MetricDef {
        name: ALERT_DELIVERIES_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_RESULT],
        help: "Alert deliveries to the webhook.",
    },
    MetricDef {
        name: KEYS_REMOVED_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_REASON],
        help: "Keys a key pool took out of rotation, by reason.",
    },
    MetricDef {
        name: QUOTA_REDIS_OUTAGES_TOTAL,
        kind: MetricKind::Counter,
        labels: &[],
        help: "Times the Redis quota backend became unreachable (requests then limited locally).",
    },
    MetricDef {
        name: CACHE_WRITES_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_RESULT],
        help: "Answers handed to the cache store by result: stored, dropped (queue full), failed.",
    },
    MetricDef {
        name: TENANT_REQUESTS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_TENANT],
        help: "Requests a tenant sent (cache hits included).",
    },
    MetricDef {
        name: TENANT_INPUT_TOKENS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_TENANT],
        help: "Input tokens served to a tenant (uncached, cache writes and cache reads).",
    },
    MetricDef {
        name: TENANT_OUTPUT_TOKENS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_TENANT],
        help: "Output tokens served to a tenant.",
    },
    MetricDef {
        name: TENANT_COST_USD_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_TENANT],
        help: "US dollars a tenant spent, settled from real usage.",
    },
    MetricDef {
        name: TENANT_QUEUE_WAIT_SECONDS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_TENANT],
        help: "Seconds a tenant's requests waited in quota queues, summed.",
    },
    MetricDef {
        name: TENANT_REFUSALS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[LABEL_TENANT],
        help: "Requests refused by a tenant's own limits or budget.",
    },
    MetricDef {
        name: TENANT_WEIGHT,
        kind: MetricKind::Gauge,
        labels: &[LABEL_TENANT, LABEL_PRIORITY],
        help: "A tenant's weight (its share of contended quota), with its priority class.",
    },
    MetricDef {
        name: TENANT_BUDGET_USD,
        kind: MetricKind::Gauge,
        labels: &[LABEL_TENANT, LABEL_PERIOD],
        help: "A tenant's budget in US dollars per period (day, month).",
    },
    MetricDef {
        name: SPEND_STORE_ERRORS_TOTAL,
        kind: MetricKind::Counter,
        labels: &[],
        help: "Spend store reads and writes that failed (the spend is kept locally and added later).",
    },
];

/// Registers the help text and unit of every metric with the installed recorder.
///
/// ```
/// tower_claude::metrics::names::describe();
/// ```
pub fn describe() {
    for def in METRICS {
        let help = def.help;
        match def.kind {
            MetricKind::Counter => metrics::describe_counter!(def.name, help),
            MetricKind::Gauge => metrics::describe_gauge!(def.name, help),
            MetricKind::Histogram => {
                metrics::describe_histogram!(def.name, metrics::Unit::Seconds, help)
            }
        }
    }
}

/// The Prometheus series names a metric renders as: histograms add `_bucket`, `_sum` and
/// `_count`.
pub fn rendered_names(def: &MetricDef) -> Vec<String> {
    match def.kind {
        MetricKind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{}{s}", def.name))
            .collect(),
        _ => vec![def.name.to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_valid() {
        let mut seen = std::collections::HashSet::new();
        for def in METRICS {
            assert!(seen.insert(def.name), "duplicate {}", def.name);
            assert!(def.name.starts_with("tower_claude_"));
            assert!(
                def.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
            );
            assert_eq!(
                def.kind == MetricKind::Counter,
                def.name.ends_with("_total"),
                "{}",
                def.name
            );
        }
    }

    #[test]
    fn histograms_render_three_series() {
        let def = METRICS
            .iter()
            .find(|d| d.name == QUEUE_WAIT_SECONDS)
            .unwrap();
        assert_eq!(
            rendered_names(def),
            [
                "tower_claude_queue_wait_seconds_bucket",
                "tower_claude_queue_wait_seconds_sum",
                "tower_claude_queue_wait_seconds_count"
            ]
        );
    }
}
