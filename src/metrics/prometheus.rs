//! The Prometheus exporter: installs a `metrics-exporter-prometheus` recorder with histogram
//! buckets suited to these metrics, and renders the text format for `GET /metrics`.
//!
//! ```
//! use tower_claude::metrics::{names, prometheus};
//!
//! // A recorder that is not installed globally (tests, or several in one process).
//! let recorder = prometheus::builder().build_recorder();
//! let handle = recorder.handle();
//! metrics::with_local_recorder(&recorder, || {
//!     names::describe();
//!     metrics::counter!(names::REQUESTS_TOTAL, "model" => "claude-haiku-4-5",
//!         "status" => "200", "outcome" => "success").increment(1);
//! });
//! let text = prometheus::render(&handle);
//! assert!(text.contains(r#"tower_claude_requests_total{model="claude-haiku-4-5",status="200",outcome="success"} 1"#));
//! ```

pub use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

use metrics_exporter_prometheus::Matcher;

use super::names;

/// Histogram buckets (seconds) of end-to-end latency: 50 ms to 10 minutes (long streams).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Histogram buckets (seconds) of queue waits and pacing delays: 1 ms to 2 minutes.
pub const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A builder with this crate's histogram buckets (no HTTP listener: the proxy serves
/// `/metrics` itself). Add global labels or other settings before building.
pub fn builder() -> PrometheusBuilder {
    let builder = PrometheusBuilder::new();
    let with_buckets = builder
        .set_buckets_for_metric(
            Matcher::Full(names::REQUEST_DURATION_SECONDS.to_owned()),
            LATENCY_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::QUEUE_WAIT_SECONDS.to_owned()),
                WAIT_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::PACING_DELAY_SECONDS.to_owned()),
                WAIT_BUCKETS,
            )
        });
    // The bucket lists are non-empty constants, so this cannot fail.
    with_buckets.unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Installs the recorder globally (once per process) and describes every metric; keep the
/// handle to [`render`].
///
/// ```no_run
/// let handle = tower_claude::metrics::prometheus::install()?;
/// let body = tower_claude::metrics::prometheus::render(&handle);
/// # Ok::<(), tower_claude::metrics::prometheus::BuildError>(())
/// ```
///
/// # Errors
///
/// When a global recorder is already installed.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = builder().install_recorder()?;
    names::describe();
    Ok(handle)
}

/// The Prometheus text format of everything recorded so far (also runs the exporter's
/// upkeep).
pub fn render(handle: &PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}

/// The Prometheus text format of every tenant's counters (the `tower_claude_tenant_*` metrics
/// of [`names`]), read from their [`TenantStats`](crate::tenant::TenantStats) now: append it to
/// [`render`]'s output. A tenant that is gone from the list (a reloaded tenants file) is gone
/// from the next scrape. Tenant names are escaped as label values.
///
/// ```
/// use tower_claude::metrics::prometheus::render_tenants;
/// use tower_claude::tenant::{Budget, Tenant};
///
/// let web = Tenant::new("web").weight(3).budget(Budget::default().per_day(20.0));
/// web.stats().record_request();
/// web.stats().record_cost_micro_usd(12_500);
/// let text = render_tenants(&[web]);
/// assert!(text.contains("tower_claude_tenant_requests_total{tenant=\"web\"} 1\n"));
/// assert!(text.contains("tower_claude_tenant_cost_usd_total{tenant=\"web\"} 0.0125\n"));
/// assert!(text.contains("tower_claude_tenant_weight{tenant=\"web\",priority=\"interactive\"} 3\n"));
/// assert!(text.contains("tower_claude_tenant_budget_usd{tenant=\"web\",period=\"day\"} 20\n"));
/// ```
pub fn render_tenants(tenants: &[crate::tenant::Tenant]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if tenants.is_empty() {
        return out;
    }
    let escaped: Vec<String> = tenants.iter().map(|t| escape_label(t.name())).collect();
    for def in names::METRICS
        .iter()
        .filter(|d| d.name.starts_with("tower_claude_tenant_"))
    {
        let kind = match def.kind {
            names::MetricKind::Counter => "counter",
            names::MetricKind::Gauge => "gauge",
            names::MetricKind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}", def.name, def.help);
        let _ = writeln!(out, "# TYPE {} {kind}", def.name);
        for (tenant, name) in tenants.iter().zip(&escaped) {
            let s = tenant.stats();
            let value = match def.name {
                names::TENANT_REQUESTS_TOTAL => s.requests() as f64,
                names::TENANT_INPUT_TOKENS_TOTAL => s.input_tokens() as f64,
                names::TENANT_OUTPUT_TOKENS_TOTAL => s.output_tokens() as f64,
                names::TENANT_COST_USD_TOTAL => s.cost_usd(),
                names::TENANT_QUEUE_WAIT_SECONDS_TOTAL => s.queue_wait().as_secs_f64(),
                names::TENANT_REFUSALS_TOTAL => s.refusals() as f64,
                names::TENANT_WEIGHT => {
                    let _ = writeln!(
                        out,
                        "{}{{tenant=\"{name}\",priority=\"{}\"}} {}",
                        def.name,
                        tenant.priority_class().as_str(),
                        tenant.weight_value()
                    );
                    continue;
                }
                names::TENANT_BUDGET_USD => {
                    let budget = tenant.budget_value();
                    for (period, usd) in [("day", budget.daily()), ("month", budget.monthly())] {
                        if let Some(usd) = usd {
                            let _ = writeln!(
                                out,
                                "{}{{tenant=\"{name}\",period=\"{period}\"}} {usd}",
                                def.name
                            );
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            let _ = writeln!(out, "{}{{tenant=\"{name}\"}} {value}", def.name);
        }
    }
    out
}

/// A label value in the text format: `\`, `"` and line feeds escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_escaped_and_every_tenant_metric_renders() {
        let t = crate::tenant::Tenant::new("a\"b\\c\nd");
        let text = render_tenants(&[t]);
        assert!(
            text.contains(r#"tower_claude_tenant_requests_total{tenant="a\"b\\c\nd"} 0"#),
            "{text}"
        );
        for def in names::METRICS
            .iter()
            .filter(|d| d.name.starts_with("tower_claude_tenant_"))
        {
            assert!(
                text.contains(&format!("# TYPE {} ", def.name)),
                "{}",
                def.name
            );
        }
        assert!(render_tenants(&[]).is_empty());
    }

    #[test]
    fn histograms_have_buckets() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!(names::REQUEST_DURATION_SECONDS, "model" => "m", "outcome" => "success")
                .record(0.3);
            metrics::histogram!(names::QUEUE_WAIT_SECONDS, "group" => "g").record(0.02);
        });
        let text = render(&handle);
        assert!(
            text.contains(r#"tower_claude_request_duration_seconds_bucket{model="m",outcome="success",le="0.5"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"tower_claude_queue_wait_seconds_bucket{group="g",le="0.01"} 0"#));
        assert!(text.contains(r#"tower_claude_queue_wait_seconds_bucket{group="g",le="0.05"} 1"#));
    }
}
