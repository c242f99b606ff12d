//! Quota alerts: a utilisation threshold with hysteresis per `(key, group)`, delivered to
//! callbacks and to a Slack-compatible webhook.
//!
//! [`Alerts`] is fed by [`MetricsLayer::alerts`](super::MetricsLayer::alerts) from the quota
//! board (or by hand with [`Alerts::observe`]). A `(key, group)` fires when its utilisation
//! (the highest of its buckets, `1 - remaining / limit`) reaches the threshold (80 % by
//! default) and re-arms only when it falls below the clear level (70 % by default), so a value
//! that hovers around the threshold does not flap. At most one alert per `(key, group)` is sent
//! per interval (10 minutes by default); suppressed alerts are counted in
//! [`ALERT_DELIVERIES_TOTAL`](super::names::ALERT_DELIVERIES_TOTAL).
//!
//! Webhook deliveries run on a spawned task behind a bounded queue: a slow or failing webhook
//! never delays the caller of [`observe`](Alerts::observe) (alerts that do not fit in the
//! queue are dropped and counted). Each delivery is a `POST` of `{"text": "..."}` with a
//! per-attempt timeout and a bounded number of attempts.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use tower_claude::anthropic::{KeyId, RateLimitGroup};
//! use tower_claude::metrics::alerts::{AlertState, Alerts};
//!
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = seen.clone();
//! let alerts = Alerts::builder()
//!     .threshold(0.8)
//!     .clear_below(0.6)
//!     .on_alert(move |alert| sink.lock().unwrap().push(alert.state()))
//!     .build();
//! let (key, group) = (KeyId::named("team-a"), RateLimitGroup::new("claude-opus-4"));
//! alerts.observe(&key, &group, "output_tokens", 0.5);
//! alerts.observe(&key, &group, "output_tokens", 0.85); // fires
//! alerts.observe(&key, &group, "output_tokens", 0.7);  // still above the clear level
//! alerts.observe(&key, &group, "output_tokens", 0.9);  // already firing: nothing new
//! assert_eq!(*seen.lock().unwrap(), [AlertState::Firing]);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::names;
use crate::BoxError;
use crate::anthropic::{KeyId, RateLimitGroup};

/// Whether an alert opens or closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AlertState {
    /// Utilisation reached the threshold.
    Firing,
    /// Utilisation fell below the clear level (sent only with
    /// [`AlertsBuilder::notify_resolved`]).
    Resolved,
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AlertKind {
    /// A `(key, group)`'s per-minute quota ([`Alerts::observe`]).
    Quota,
    /// A tenant's spend against its daily or monthly budget ([`Alerts::budget`], raised by the
    /// [`BudgetLayer`](crate::tenant::budget::BudgetLayer)).
    Budget,
}

/// The budget part of a [`AlertKind::Budget`] alert.
#[derive(Debug, Clone, PartialEq)]
struct BudgetInfo {
    tenant: String,
    period: String,
    spent_usd: f64,
    budget_usd: f64,
}

/// One alert about a `(key, group)` or, for [`AlertKind::Budget`], a tenant's budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    key: KeyId,
    group: RateLimitGroup,
    bucket: String,
    utilisation: f64,
    threshold: f64,
    state: AlertState,
    budget: Option<BudgetInfo>,
}

impl Alert {
    /// Quota or budget.
    pub fn kind(&self) -> AlertKind {
        if self.budget.is_some() {
            AlertKind::Budget
        } else {
            AlertKind::Quota
        }
    }

    /// For a budget alert, the tenant's name.
    pub fn tenant(&self) -> Option<&str> {
        self.budget.as_ref().map(|b| b.tenant.as_str())
    }

    /// The key id (never the key). For a budget alert, the tenant's name.
    pub fn key(&self) -> &KeyId {
        &self.key
    }

    /// The rate-limit group (`budget` for a budget alert).
    pub fn group(&self) -> &RateLimitGroup {
        &self.group
    }

    /// The most used bucket (`requests`, `input_tokens`, `output_tokens`); for a budget
    /// alert, `daily_usd` or `monthly_usd`.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Its utilisation, `0.0..=1.0`.
    pub fn utilisation(&self) -> f64 {
        self.utilisation
    }

    /// Firing or resolved.
    pub fn state(&self) -> AlertState {
        self.state
    }

    /// The message sent to the webhook.
    ///
    /// ```
    /// use tower_claude::anthropic::{KeyId, RateLimitGroup};
    /// use tower_claude::metrics::alerts::Alerts;
    ///
    /// let alerts = Alerts::builder().build();
    /// let alert = alerts.observe(&KeyId::named("k-1"), &RateLimitGroup::new("claude-opus-4"), "requests", 0.93).unwrap();
    /// assert_eq!(alert.text(), "tower-claude: key k-1, group claude-opus-4 is at 93% of its requests per-minute limit (threshold 80%)");
    /// ```
    pub fn text(&self) -> String {
        let pct = |v: f64| (v * 100.0).round() as i64;
        if let Some(b) = &self.budget {
            let adjective = self.bucket.strip_suffix("_usd").unwrap_or(&self.bucket);
            return format!(
                "tower-claude: tenant {} has spent ${:.2} of its {} budget of ${:.2} ({}%, threshold {}%) in {}",
                b.tenant,
                b.spent_usd,
                adjective,
                b.budget_usd,
                pct(self.utilisation),
                pct(self.threshold),
                b.period
            );
        }
        match self.state {
            AlertState::Firing => format!(
                "tower-claude: key {}, group {} is at {}% of its {} per-minute limit (threshold {}%)",
                self.key,
                self.group,
                pct(self.utilisation),
                self.bucket,
                pct(self.threshold)
            ),
            AlertState::Resolved => format!(
                "tower-claude: resolved: key {}, group {} is back to {}% of its {} per-minute limit",
                self.key,
                self.group,
                pct(self.utilisation),
                self.bucket
            ),
        }
    }

    /// The Slack-compatible JSON payload: `{"text": "..."}`.
    pub fn payload(&self) -> String {
        serde_json::json!({ "text": self.text() }).to_string()
    }
}

type Callback = Arc<dyn Fn(&Alert) + Send + Sync>;

/// Builds [`Alerts`].
pub struct AlertsBuilder {
    threshold: f64,
    clear: Option<f64>,
    interval: Duration,
    notify_resolved: bool,
    callbacks: Vec<Callback>,
    webhook: Option<Webhook>,
}

impl fmt::Debug for AlertsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertsBuilder")
            .field("threshold", &self.threshold)
            .field("clear", &self.clear)
            .field("interval", &self.interval)
            .field("callbacks", &self.callbacks.len())
            .field("webhook", &self.webhook)
            .finish()
    }
}

impl AlertsBuilder {
    /// Utilisation at which an alert fires (0.8 by default; clamped to `0.0..=1.0`).
    pub fn threshold(mut self, threshold: f64) -> Self {
        self.threshold = if threshold.is_finite() {
            threshold.clamp(0.0, 1.0)
        } else {
            0.8
        };
        self
    }

    /// Utilisation below which a firing `(key, group)` re-arms (threshold - 0.1 by default;
    /// never above the threshold).
    pub fn clear_below(mut self, clear: f64) -> Self {
        self.clear = clear.is_finite().then_some(clear);
        self
    }

    /// At most one alert per `(key, group)` per `interval` (10 minutes by default).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Also sends a [`AlertState::Resolved`] alert when a delivered alert clears (counted in
    /// the same per-interval limit). Off by default.
    pub fn notify_resolved(mut self, on: bool) -> Self {
        self.notify_resolved = on;
        self
    }

    /// Calls `callback` (synchronously, keep it short) for every alert sent.
    pub fn on_alert<F>(mut self, callback: F) -> Self
    where
        F: Fn(&Alert) + Send + Sync + 'static,
    {
        self.callbacks.push(Arc::new(callback));
        self
    }

    /// Also posts every alert sent to `webhook`.
    pub fn webhook(mut self, webhook: Webhook) -> Self {
        self.webhook = Some(webhook);
        self
    }

    /// The alerts.
    pub fn build(self) -> Alerts {
        let clear = self
            .clear
            .unwrap_or(self.threshold - 0.1)
            .min(self.threshold);
        let webhook = self.webhook.map(|webhook| {
            let (tx, rx) = mpsc::channel(webhook.queue.max(1));
            WebhookQueue {
                tx,
                rx: Mutex::new(Some(rx)),
                webhook: Arc::new(webhook),
            }
        });
        Alerts {
            inner: Arc::new(AlertsInner {
                threshold: self.threshold,
                clear,
                interval: self.interval,
                notify_resolved: self.notify_resolved,
                callbacks: self.callbacks,
                webhook,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// Threshold alerts on quota utilisation; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct Alerts {
    inner: Arc<AlertsInner>,
}

struct AlertsInner {
    threshold: f64,
    clear: f64,
    interval: Duration,
    notify_resolved: bool,
    callbacks: Vec<Callback>,
    webhook: Option<WebhookQueue>,
    entries: Mutex<HashMap<(KeyId, RateLimitGroup), Entry>>,
}

struct WebhookQueue {
    tx: mpsc::Sender<Alert>,
    rx: Mutex<Option<mpsc::Receiver<Alert>>>,
    webhook: Arc<Webhook>,
}

#[derive(Debug, Default)]
struct Entry {
    firing: bool,
    delivered: bool,
    last_sent: Option<Instant>,
}

impl fmt::Debug for Alerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alerts")
            .field("threshold", &self.inner.threshold)
            .field("clear", &self.inner.clear)
            .field("interval", &self.inner.interval)
            .finish()
    }
}

impl Alerts {
    /// A builder: threshold 80 %, clear below 70 %, one alert per 10 minutes, no sink.
    pub fn builder() -> AlertsBuilder {
        AlertsBuilder {
            threshold: 0.8,
            clear: None,
            interval: Duration::from_secs(600),
            notify_resolved: false,
            callbacks: Vec::new(),
            webhook: None,
        }
    }

    /// The threshold.
    pub fn threshold(&self) -> f64 {
        self.inner.threshold
    }

    /// Feeds the utilisation of `(key, group)` (its most used `bucket`); returns the alert
    /// sent, if any. Never blocks: webhook deliveries are queued.
    pub fn observe(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        bucket: &str,
        utilisation: f64,
    ) -> Option<Alert> {
        if !utilisation.is_finite() {
            return None;
        }
        let inner = &*self.inner;
        let now = Instant::now();
        let state = {
            let mut entries = inner.entries.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = entries.entry((key.clone(), group.clone())).or_default();
            let state = if !entry.firing && utilisation >= inner.threshold {
                entry.firing = true;
                entry.delivered = false;
                AlertState::Firing
            } else if entry.firing && utilisation < inner.clear {
                entry.firing = false;
                if !(inner.notify_resolved && entry.delivered) {
                    return None;
                }
                AlertState::Resolved
            } else {
                return None;
            };
            if entry
                .last_sent
                .is_some_and(|t| now.duration_since(t) < inner.interval)
            {
                metrics::counter!(names::ALERT_DELIVERIES_TOTAL,
                    names::LABEL_RESULT => names::RESULT_SUPPRESSED)
                .increment(1);
                return None;
            }
            entry.last_sent = Some(now);
            entry.delivered = state == AlertState::Firing;
            state
        };
        let alert = Alert {
            key: key.clone(),
            group: group.clone(),
            bucket: bucket.to_owned(),
            utilisation: utilisation.clamp(0.0, 1.0),
            threshold: inner.threshold,
            state,
            budget: None,
        };
        let state_label = match state {
            AlertState::Firing => names::STATE_FIRING,
            AlertState::Resolved => names::STATE_RESOLVED,
        };
        metrics::counter!(names::ALERTS_TOTAL, names::LABEL_STATE => state_label).increment(1);
        tracing::warn!(key = %alert.key, group = %alert.group, bucket = %alert.bucket,
            utilisation = alert.utilisation, state = state_label, "quota alert");
        self.deliver(alert.clone());
        Some(alert)
    }

    /// Sends a budget alert: `tenant` has spent `spent_usd` of its `kind` budget of
    /// `budget_usd` in `period` (e.g. `2026-12-05`). Delivered like a quota alert (callbacks,
    /// webhook, `tower_claude_alerts_total{state="firing"}`), without the hysteresis and the
    /// per-interval limit: the caller raises it once per period (the
    /// [`BudgetLayer`](crate::tenant::budget::BudgetLayer) does when a settled cost crosses
    /// the threshold).
    ///
    /// ```
    /// use tower_claude::metrics::alerts::{AlertKind, Alerts};
    /// use tower_claude::tenant::spend::PeriodKind;
    ///
    /// let alerts = Alerts::builder().build();
    /// let alert = alerts.budget("team-a", PeriodKind::Day, "2026-12-05", 8.5, 10.0);
    /// assert_eq!(alert.kind(), AlertKind::Budget);
    /// assert_eq!(alert.tenant(), Some("team-a"));
    /// assert_eq!(alert.text(), "tower-claude: tenant team-a has spent $8.50 of its daily budget of $10.00 (85%, threshold 80%) in 2026-12-05");
    /// ```
    pub fn budget(
        &self,
        tenant: &str,
        kind: crate::tenant::spend::PeriodKind,
        period: &str,
        spent_usd: f64,
        budget_usd: f64,
    ) -> Alert {
        let utilisation = if budget_usd > 0.0 {
            spent_usd / budget_usd
        } else {
            1.0
        };
        let bucket = match kind {
            crate::tenant::spend::PeriodKind::Day => "daily_usd",
            crate::tenant::spend::PeriodKind::Month => "monthly_usd",
        };
        let alert = Alert {
            key: KeyId::named(tenant),
            group: RateLimitGroup::new("budget"),
            bucket: bucket.to_owned(),
            utilisation: if utilisation.is_finite() {
                utilisation.max(0.0)
            } else {
                1.0
            },
            threshold: self.inner.threshold,
            state: AlertState::Firing,
            budget: Some(BudgetInfo {
                tenant: tenant.to_owned(),
                period: period.to_owned(),
                spent_usd,
                budget_usd,
            }),
        };
        metrics::counter!(names::ALERTS_TOTAL, names::LABEL_STATE => names::STATE_FIRING)
            .increment(1);
        tracing::warn!(
            tenant,
            period,
            spent_usd,
            budget_usd,
            bucket,
            "budget alert"
        );
        self.deliver(alert.clone());
        alert
    }

    /// Calls the callbacks and queues the webhook delivery.
    fn deliver(&self, alert: Alert) {
        let inner = &*self.inner;
        for callback in &inner.callbacks {
            callback(&alert);
        }
        if let Some(queue) = &inner.webhook {
            queue.send(alert);
        }
    }
}

impl WebhookQueue {
    fn send(&self, alert: Alert) {
        // The delivery task starts with the first alert, on the runtime that raised it.
        if let Some(rx) = self
            .rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(deliver_all(self.webhook.clone(), rx));
                }
                Err(_) => {
                    tracing::warn!("quota alert webhook needs a tokio runtime; alert dropped");
                    *self.rx.lock().unwrap_or_else(PoisonError::into_inner) = Some(rx);
                    count_delivery(names::RESULT_DROPPED);
                    return;
                }
            }
        }
        if self.tx.try_send(alert).is_err() {
            tracing::warn!("quota alert webhook queue full; alert dropped");
            count_delivery(names::RESULT_DROPPED);
        }
    }
}

fn count_delivery(result: &'static str) {
    metrics::counter!(names::ALERT_DELIVERIES_TOTAL, names::LABEL_RESULT => result).increment(1);
}

async fn deliver_all(webhook: Arc<Webhook>, mut rx: mpsc::Receiver<Alert>) {
    while let Some(alert) = rx.recv().await {
        let payload = Bytes::from(alert.payload());
        let mut backoff = webhook.backoff;
        let mut delivered = false;
        for attempt in 1..=webhook.attempts.max(1) {
            match tokio::time::timeout(webhook.timeout, webhook.post(payload.clone())).await {
                Ok(Ok(status)) if status.is_success() => {
                    delivered = true;
                    break;
                }
                Ok(Ok(status)) => {
                    tracing::warn!(attempt, %status, "quota alert webhook answered an error")
                }
                Ok(Err(error)) => tracing::warn!(attempt, %error, "quota alert webhook failed"),
                Err(_) => tracing::warn!(attempt, "quota alert webhook timed out"),
            }
            if attempt < webhook.attempts {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
        }
        count_delivery(if delivered {
            names::RESULT_DELIVERED
        } else {
            names::RESULT_FAILED
        });
    }
}

/// The kind of a [`WebhookError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WebhookErrorKind {
    /// Not an absolute `http://` (or, with the `client` feature, `https://`) URL.
    InvalidUrl,
}

/// An invalid webhook configuration.
#[derive(Debug, Clone)]
pub struct WebhookError {
    kind: WebhookErrorKind,
    message: String,
}

impl WebhookError {
    /// What went wrong.
    pub fn kind(&self) -> WebhookErrorKind {
        self.kind
    }
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid webhook: {}", self.message)
    }
}

impl std::error::Error for WebhookError {}

/// A Slack-compatible webhook (`POST {"text": "..."}`) that [`Alerts`] deliver to.
///
/// `http://` URLs use a plain HTTP/1.1 connection; `https://` URLs need the crate's `client`
/// feature (rustls). The URL is never logged (webhook URLs embed secrets).
///
/// ```
/// use std::time::Duration;
/// use tower_claude::metrics::alerts::Webhook;
///
/// let webhook = Webhook::new("http://127.0.0.1:9000/hooks/quota")?
///     .attempts(3)
///     .timeout(Duration::from_secs(5))
///     .backoff(Duration::from_millis(500))
///     .queue(64);
/// assert!(Webhook::new("not a url").is_err());
/// # Ok::<(), tower_claude::metrics::alerts::WebhookError>(())
/// ```
pub struct Webhook {
    uri: Uri,
    attempts: u32,
    timeout: Duration,
    backoff: Duration,
    queue: usize,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("host", &self.uri.host())
            .field("attempts", &self.attempts)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Webhook {
    /// A webhook at `url`: 3 attempts, 5 s timeout per attempt, 1 s backoff (doubling), a
    /// queue of 64 alerts.
    pub fn new(url: &str) -> Result<Self, WebhookError> {
        let invalid = |message: &str| WebhookError {
            kind: WebhookErrorKind::InvalidUrl,
            message: message.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            #[cfg(feature = "client")]
            Some("https") => {}
            #[cfg(not(feature = "client"))]
            Some("https") => return Err(invalid("https needs the `client` feature")),
            _ => return Err(invalid("the scheme must be http or https")),
        }
        if uri.host().is_none() {
            return Err(invalid("no host"));
        }
        Ok(Self {
            uri,
            attempts: 3,
            timeout: Duration::from_secs(5),
            backoff: Duration::from_secs(1),
            queue: 64,
        })
    }

    /// Attempts per alert (at least 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Timeout of one attempt (connect and response).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Wait before the second attempt, doubled for each further one.
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Alerts waiting for delivery beyond which new ones are dropped.
    pub fn queue(mut self, queue: usize) -> Self {
        self.queue = queue.max(1);
        self
    }

    /// Posts `payload`, returning the response status.
    async fn post(&self, payload: Bytes) -> Result<http::StatusCode, BoxError> {
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let host = self.uri.host().unwrap_or_default().to_owned();
        #[cfg(feature = "client")]
        if self.uri.scheme_str() == Some("https") {
            use tower::ServiceExt;
            let base: Uri = format!(
                "https://{}",
                self.uri.authority().map_or("", |a| a.as_str())
            )
            .parse()?;
            let request = http::Request::post(path)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(crate::body::RequestBody::from(payload))?;
            let response = crate::client::HttpClient::new(base)
                .oneshot(request)
                .await?;
            return Ok(response.status());
        }
        let port = self.uri.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driver = tokio::spawn(connection);
        let authority = self
            .uri
            .authority()
            .map_or(host.clone(), |a| a.as_str().to_owned());
        let request = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(payload))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        // Drain the answer so the connection closes cleanly.
        let _ = response.into_body().collect().await;
        drop(sender);
        let _ = driver.await;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (KeyId, RateLimitGroup) {
        (KeyId::named("k"), RateLimitGroup::new("g"))
    }

    #[tokio::test(start_paused = true)]
    async fn hysteresis_and_interval() {
        let alerts = Alerts::builder()
            .threshold(0.8)
            .clear_below(0.5)
            .interval(Duration::from_secs(60))
            .build();
        let (k, g) = ids();
        assert!(alerts.observe(&k, &g, "requests", 0.79).is_none());
        assert!(alerts.observe(&k, &g, "requests", 0.8).is_some());
        assert!(alerts.observe(&k, &g, "requests", 0.6).is_none());
        assert!(alerts.observe(&k, &g, "requests", 0.95).is_none()); // still firing
        assert!(alerts.observe(&k, &g, "requests", 0.4).is_none()); // clears (not notified)
        // Re-fires within the interval: suppressed.
        assert!(alerts.observe(&k, &g, "requests", 0.9).is_none());
        alerts.observe(&k, &g, "requests", 0.1);
        tokio::time::advance(Duration::from_secs(61)).await;
        let alert = alerts.observe(&k, &g, "requests", 0.9).unwrap();
        assert_eq!(alert.state(), AlertState::Firing);
        // Another (key, group) is independent.
        let other = RateLimitGroup::new("h");
        assert!(alerts.observe(&k, &other, "requests", 0.9).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn resolved_notifications() {
        let alerts = Alerts::builder()
            .notify_resolved(true)
            .interval(Duration::from_secs(10))
            .build();
        let (k, g) = ids();
        assert_eq!(
            alerts.observe(&k, &g, "requests", 0.85).unwrap().state(),
            AlertState::Firing
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        let resolved = alerts.observe(&k, &g, "requests", 0.2).unwrap();
        assert_eq!(resolved.state(), AlertState::Resolved);
        assert!(resolved.text().contains("resolved"));
        assert!(alerts.observe(&k, &g, "requests", f64::NAN).is_none());
    }

    #[test]
    fn payload_is_slack_json() {
        let alerts = Alerts::builder().threshold(0.5).build();
        let (k, g) = ids();
        let alert = alerts.observe(&k, &g, "input_tokens", 0.5).unwrap();
        let v: serde_json::Value = serde_json::from_str(&alert.payload()).unwrap();
        assert_eq!(v["text"], alert.text());
        assert!(alert.text().contains("input_tokens"));
    }

    #[test]
    fn webhook_urls() {
        assert_eq!(
            Webhook::new("ftp://x/").unwrap_err().kind(),
            WebhookErrorKind::InvalidUrl
        );
        assert!(Webhook::new("/relative").is_err());
        assert!(Webhook::new("http://127.0.0.1:1/x").is_ok());
        let dbg = format!("{:?}", Webhook::new("http://h/secret-token").unwrap());
        assert!(!dbg.contains("secret"));
    }

    proptest::proptest! {
        /// Whatever the utilisation sequence and timing: never two alerts for one
        /// `(key, group)` within the interval, and an alert only after crossing the threshold
        /// from below the clear level (or from the start).
        #[test]
        fn at_most_one_alert_per_interval(steps in proptest::collection::vec((0.0f64..1.0, 0u64..120), 1..200)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let alerts = Alerts::builder()
                    .threshold(0.8)
                    .clear_below(0.6)
                    .interval(Duration::from_secs(300))
                    .notify_resolved(true)
                    .build();
                let (k, g) = ids();
                let mut last: Option<Instant> = None;
                let mut armed = true;
                for (u, wait) in steps {
                    tokio::time::advance(Duration::from_secs(wait)).await;
                    let sent = alerts.observe(&k, &g, "requests", u);
                    if let Some(alert) = &sent {
                        let now = Instant::now();
                        assert!(last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(300)));
                        last = Some(now);
                        match alert.state() {
                            AlertState::Firing => assert!(armed && u >= 0.8),
                            AlertState::Resolved => assert!(u < 0.6),
                        }
                    }
                    if u >= 0.8 && armed {
                        armed = false;
                    } else if u < 0.6 {
                        armed = true;
                    }
                }
            });
        }
    }
}
