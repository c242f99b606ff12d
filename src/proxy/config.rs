//! `claude-proxy` configuration: a TOML file, a `.env` file, the environment and command-line
//! flags, each overriding the one before.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::anthropic::KeyId;
use crate::cache::CacheMode;

/// Where requests go.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// An HTTP(S) base URL: `https://api.anthropic.com` (the default when a key is configured),
    /// a corporate gateway, or a test server.
    Url(http::Uri),
    /// The built-in simulator (`MockClaude`), the default when no API key is configured.
    Mock(MockSettings),
}

/// Limits and faults of the built-in simulator (`--upstream mock`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockSettings {
    /// Requests per minute per key and rate-limit group.
    pub rpm: u64,
    /// Input tokens per minute.
    pub itpm: u64,
    /// Output tokens per minute.
    pub otpm: u64,
    /// Probability of a 529 `overloaded_error`.
    pub overloaded_rate: f64,
    /// Seed of the fault injection.
    pub seed: u64,
    /// Base latency of an answer, milliseconds.
    pub latency_ms: u64,
    /// Latency per generated output token, milliseconds.
    pub per_token_ms: u64,
    /// Output tokens generated per answer (capped by `max_tokens`).
    pub output_tokens: u64,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            rpm: 50,
            itpm: 30_000,
            otpm: 8_000,
            overloaded_rate: 0.0,
            seed: 1,
            latency_ms: 20,
            per_token_ms: 0,
            output_tokens: 120,
        }
    }
}

/// How failed upstream calls are retried (`CLAUDE_RETRY_STRATEGY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryStrategy {
    /// Up to `MAX_RETRIES` retries, waiting for quota resets and spreading callers (default).
    #[default]
    Patient,
    /// What the official SDKs do: 2 retries, server delays honoured up to 60 s.
    Sdk,
    /// No retries: every upstream answer goes to the client as it is.
    None,
}

/// Per-group limits configured instead of learned from response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupLimits {
    /// Requests per minute.
    pub rpm: u64,
    /// Input tokens per minute.
    pub itpm: u64,
    /// Output tokens per minute.
    pub otpm: u64,
}

/// An API key or client token. `Debug` shows only its [`KeyId`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: only for the header that carries it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its non-reversible id.
    pub fn id(&self) -> KeyId {
        KeyId::from_api_key(&self.0)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.id())
    }
}

/// The resolved configuration of `claude-proxy`.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Address to listen on (default `127.0.0.1:8787`).
    pub listen: SocketAddr,
    /// Where requests go.
    pub upstream: Upstream,
    /// Upstream API keys held by the proxy. Empty: clients' own keys pass through.
    pub api_keys: Vec<Secret>,
    /// Tokens clients must present (as `x-api-key` or `Authorization: Bearer`). Empty: no
    /// client authentication (only allowed on a loopback address).
    pub client_tokens: Vec<Secret>,
    /// Retry strategy.
    pub retry_strategy: RetryStrategy,
    /// Retries after the first attempt (`MAX_RETRIES`).
    pub max_retries: u32,
    /// Longest time a request may spend in the proxy, waits and retries included.
    pub deadline: Duration,
    /// Whether model fallback is on.
    pub fallback: bool,
    /// The lowest model fallback may use (`FALLBACK_MODEL`).
    pub fallback_model: Option<String>,
    /// Whether the response cache is on (`cache_mode` is not `off`).
    pub cache: bool,
    /// Which requests are cached (`CLAUDE_PROXY_CACHE_MODE`; default `deterministic`).
    pub cache_mode: CacheMode,
    /// Time to live of cached responses (`CACHE_TTL`).
    pub cache_ttl: Duration,
    /// The redb file of the disk cache; `None` keeps the cache in memory.
    pub cache_path: Option<PathBuf>,
    /// Cache size bound in bytes.
    pub cache_max_bytes: u64,
    /// The cache's secret (`CLAUDE_PROXY_CACHE_SECRET`); `None`: the store's own (random for
    /// `memory`, kept in the redb file, shared through Redis). `Debug` shows nothing of it.
    pub cache_secret: Option<crate::cache::CacheSecret>,
    /// Cap on in-flight upstream requests (`None`: no cap).
    pub max_in_flight: Option<usize>,
    /// Configured per-group limits; groups not listed learn their limits from headers.
    pub limits: BTreeMap<String, GroupLimits>,
    /// Request body limit in bytes (Anthropic's: 32 MB).
    pub body_limit: usize,
    /// Redis URL for shared quota and cache (`REDIS_URL`).
    pub redis_url: Option<String>,
    /// How many proxy nodes share the quota: while Redis is down each limits locally to
    /// `1 / expected_nodes` of every limit.
    pub expected_nodes: u32,
    /// Whether `GET /metrics` (Prometheus) and the metrics layer are on.
    pub metrics: bool,
    /// Webhook (Slack-compatible) for quota utilisation alerts.
    pub alert_webhook: Option<String>,
    /// Utilisation (0..1) of a key and group's binding bucket that raises an alert.
    pub alert_threshold: f64,
    // -- issue 16: adaptive concurrency, ramp-up, retry budget, pacing, Redis fail-closed,
    // -- key restore (see docs/configuration.md).
    /// Adaptive (AIMD) concurrency cap: halves on 429 / 529, grows back on success, between
    /// `min_in_flight` and `max_in_flight` (64 when unset), starting at `initial_in_flight`.
    pub adaptive_concurrency: bool,
    /// The floor of the adaptive cap (default 1).
    pub min_in_flight: usize,
    /// The start of the adaptive cap (default 8, within the floor and the ceiling).
    pub initial_in_flight: usize,
    /// How fast the concurrency cap may grow (`None`: at once).
    pub ramp_up: Option<crate::concurrency::RampUp>,
    /// Share of requests that may be retried (a retry budget; `None`: no budget).
    pub retry_budget: Option<f32>,
    /// Retries per second always allowed by the budget (default 10).
    pub retry_budget_min_per_sec: u32,
    /// Predictive throttling (`None`: off).
    pub pacing: Option<crate::stack::PacingConfig>,
    /// Refuse requests while Redis is down instead of limiting locally with a share.
    pub redis_fail_closed: bool,
    /// How long a quota call to Redis may wait for its reply before this node limits locally
    /// ([`RedisOptions::response_timeout`](crate::quota::RedisOptions::response_timeout)).
    pub redis_quota_timeout: Duration,
    /// The keys file, re-read on SIGHUP ([`Proxy::reload_keys`](super::Proxy::reload_keys)).
    pub keys_file: Option<PathBuf>,
    // --- issue 15: tenants ---
    /// The tenants file (`CLAUDE_PROXY_TENANTS_FILE`), re-read on SIGHUP and by
    /// `POST /v1/proxy/reload` ([`Proxy::reload`](super::Proxy::reload)).
    pub tenants_file: Option<PathBuf>,
    /// The tenants read from it at start: with a tenants file, every client authenticates
    /// with one of its tenants' tokens (client tokens are then not allowed).
    pub tenants: Option<super::TenantTable>,
    /// Where tenants' spend is kept (`CLAUDE_PROXY_SPEND_PATH`): a redb file, by default
    /// `spend.redb` next to the disk cache; `None` keeps it in memory (`memory`, or the cache in
    /// memory). With a Redis URL the spend is in Redis. Used only with a tenants file.
    pub spend_path: Option<PathBuf>,
    /// The price table the budgets use: the built-in one, with the prices file
    /// (`CLAUDE_PROXY_PRICES_FILE`) merged over it.
    pub prices: crate::tenant::PriceTable,
    // --- issue 18 / 16: the proxy's edge (connections, upstream pool, logs) ---
    /// Longest time from accepting a connection to a complete first request head
    /// (`CLAUDE_PROXY_HEADER_READ_TIMEOUT`, default 10 s).
    pub header_read_timeout: Duration,
    /// Longest time a client connection may stay open with no request in progress
    /// (`CLAUDE_PROXY_IDLE_TIMEOUT`, default 60 s).
    pub idle_timeout: Duration,
    /// Cap on open client connections (`CLAUDE_PROXY_MAX_CONNECTIONS`, default 10 000, and
    /// never above what the process's file descriptor limit allows).
    pub max_connections: usize,
    /// How long an idle upstream connection stays in the pool
    /// (`CLAUDE_PROXY_UPSTREAM_IDLE_TIMEOUT`, default 30 s; at most 256 idle ones are kept).
    pub upstream_idle_timeout: Duration,
    /// How the log is written (`CLAUDE_PROXY_LOG_FORMAT`, default `text`).
    pub log_format: super::LogFormat,
    /// Threads of the runtime that serves connections and runs the layers
    /// (`CLAUDE_PROXY_WORKER_THREADS`, 1 to 1024, else `TOKIO_WORKER_THREADS`, checked the
    /// same way); `None`: Tokio's default, one per core. Read by the binary, which builds the runtime
    /// (a [`Proxy`](super::Proxy) runs on whatever runtime it is given).
    pub worker_threads: Option<usize>,
}

/// The most runtime worker threads `worker_threads` accepts: far above any core count the
/// proxy runs on, low enough that a typo (`80000`) is refused instead of starting that many
/// threads.
const MAX_WORKER_THREADS: usize = 1024;

/// Command-line flags of `claude-proxy`. Every flag can also be set in the TOML file (same name
/// with `_` for `-`) or the environment variable shown; flags win over the environment, which
/// wins over `.env`, which wins over the file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "claude-proxy",
    version,
    about = "A local proxy that keeps Claude API clients working through rate limits.",
    long_about = "A local proxy that keeps Claude API clients working through rate limits.\n\n\
Point any Anthropic SDK at it (ANTHROPIC_BASE_URL=http://127.0.0.1:8787) and every request \
goes through token buckets, 429-aware retries, model fallback and a response cache.\n\n\
Configuration sources, later overriding earlier: the TOML file (--config, or ./claude-proxy.toml \
when present), the .env file in the working directory, the process environment, these flags.\n\n\
Without an API key the proxy serves the built-in Claude simulator, so it runs offline."
)]
pub struct Cli {
    /// TOML configuration file [default: ./claude-proxy.toml when it exists]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [env: CLAUDE_PROXY_LISTEN] [default: 127.0.0.1:8787]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// `anthropic`, `mock`, or a base URL such as http://127.0.0.1:9000 [env: CLAUDE_PROXY_UPSTREAM]
    /// [default: anthropic when a key is configured, else mock]
    #[arg(long, value_name = "UPSTREAM")]
    pub upstream: Option<String>,
    /// Upstream API key held by the proxy [env: ANTHROPIC_API_KEY]. Prefer the environment
    /// variable or --keys-file: a flag is readable by every local user through `ps`
    #[arg(long, value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Several upstream keys, comma separated [env: ANTHROPIC_API_KEYS]. Prefer the environment
    /// variable or --keys-file: a flag is readable by every local user through `ps`
    #[arg(long, value_name = "KEYS")]
    pub api_keys: Option<String>,
    /// File with one upstream key per line (`#` comments) [env: CLAUDE_PROXY_KEYS_FILE]
    #[arg(long, value_name = "FILE")]
    pub keys_file: Option<PathBuf>,
    /// Tokens clients must present, comma separated [env: CLAUDE_PROXY_TOKENS]. Prefer the
    /// environment variable: a flag is readable by every local user through `ps`
    #[arg(long, value_name = "TOKENS")]
    pub client_tokens: Option<String>,
    /// Tenants file (TOML, one `[[tenant]]` per team: tokens, weight, priority, limits, budget), re-read on SIGHUP [env: CLAUDE_PROXY_TENANTS_FILE]
    #[arg(long, value_name = "FILE")]
    pub tenants_file: Option<PathBuf>,
    /// redb file of the tenants' spend, or `memory` [env: CLAUDE_PROXY_SPEND_PATH] [default: spend.redb next to the disk cache; memory with --cache-path memory]
    #[arg(long, value_name = "PATH")]
    pub spend_path: Option<String>,
    /// TOML file of model prices merged over the built-in table (same schema) [env: CLAUDE_PROXY_PRICES_FILE]
    #[arg(long, value_name = "FILE")]
    pub prices_file: Option<PathBuf>,
    /// Retry strategy [env: CLAUDE_RETRY_STRATEGY] [default: patient]
    #[arg(long, value_enum, value_name = "STRATEGY")]
    pub retry_strategy: Option<RetryStrategy>,
    /// Retries after the first attempt [env: MAX_RETRIES] [default: 7, i.e. 8 attempts]
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// Longest time a request may take, waits included, e.g. 600, 10m [env: CLAUDE_PROXY_DEADLINE] [default: 10m]
    #[arg(long, value_name = "DURATION")]
    pub deadline: Option<String>,
    /// Turn model fallback on or off [env: CLAUDE_PROXY_FALLBACK] [default: true]
    #[arg(long, value_name = "BOOL")]
    pub fallback: Option<bool>,
    /// The lowest model fallback may use, e.g. claude-sonnet-4-6 [env: FALLBACK_MODEL]
    #[arg(long, value_name = "MODEL")]
    pub fallback_model: Option<String>,
    /// Turn the response cache on or off; `false` is `--cache-mode off` [env: CLAUDE_PROXY_CACHE] [default: true]
    #[arg(long, value_name = "BOOL")]
    pub cache: Option<bool>,
    /// Which requests are cached: off, deterministic (temperature 0; others opt in with `x-tower-claude-cache: use`), all [env: CLAUDE_PROXY_CACHE_MODE] [default: deterministic]
    #[arg(long, value_name = "MODE")]
    pub cache_mode: Option<String>,
    /// Cache time to live, e.g. 14400, 4h [env: CACHE_TTL] [default: 4h]
    #[arg(long, value_name = "DURATION")]
    pub cache_ttl: Option<String>,
    /// redb file of the disk cache, or `memory` [env: CLAUDE_PROXY_CACHE_PATH] [default: .tower-claude/cache.redb]
    #[arg(long, value_name = "PATH")]
    pub cache_path: Option<String>,
    /// Cache size bound: bytes, or a number with KB, MB, GB, KiB, MiB or GiB [env: CLAUDE_PROXY_CACHE_MAX_BYTES] [default: 256MiB]
    #[arg(long, value_name = "SIZE")]
    pub cache_max_bytes: Option<String>,
    /// The cache's secret, 64 hex digits (e.g. `openssl rand -hex 32`); it keys every hash of a cache key [env: CLAUDE_PROXY_CACHE_SECRET] [default: the store's: random for `memory`, generated once and kept in the redb file, shared through Redis]
    #[arg(long, value_name = "HEX")]
    pub cache_secret: Option<String>,
    /// Cap on in-flight upstream requests [env: CLAUDE_PROXY_MAX_IN_FLIGHT] [default: none]
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// Redis URL for quota and cache shared by several proxies [env: REDIS_URL]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Proxy nodes sharing the quota through Redis (each keeps 1/N of the limits while Redis is down) [env: CLAUDE_PROXY_NODES] [default: 1]
    #[arg(long, value_name = "N")]
    pub expected_nodes: Option<u32>,
    /// Serve Prometheus metrics on GET /metrics [env: CLAUDE_PROXY_METRICS] [default: true]
    #[arg(long, value_name = "BOOL")]
    pub metrics: Option<bool>,
    /// Webhook URL (Slack-compatible JSON) for quota alerts [env: CLAUDE_PROXY_ALERT_WEBHOOK]
    #[arg(long, value_name = "URL")]
    pub alert_webhook: Option<String>,
    /// Utilisation that raises a quota alert, 0..1 [env: CLAUDE_PROXY_ALERT_THRESHOLD] [default: 0.8]
    #[arg(long, value_name = "FRACTION")]
    pub alert_threshold: Option<f64>,
    /// Adaptive (AIMD) concurrency cap: halves on 429/529, grows back on success, up to --max-in-flight (64 when unset) [env: CLAUDE_PROXY_ADAPTIVE_CONCURRENCY] [default: false]
    #[arg(long, value_name = "BOOL")]
    pub adaptive_concurrency: Option<bool>,
    /// Floor of the adaptive cap [env: CLAUDE_PROXY_MIN_IN_FLIGHT] [default: 1]
    #[arg(long, value_name = "N")]
    pub min_in_flight: Option<usize>,
    /// Start of the adaptive cap [env: CLAUDE_PROXY_INITIAL_IN_FLIGHT] [default: 8]
    #[arg(long, value_name = "N")]
    pub initial_in_flight: Option<usize>,
    /// Ramp the concurrency cap up from N requests in flight (needs --max-in-flight or --adaptive-concurrency) [env: CLAUDE_PROXY_RAMP_UP_FROM] [default: no ramp-up]
    #[arg(long, value_name = "N")]
    pub ramp_up_from: Option<usize>,
    /// Growth of the ramped-up cap per interval [env: CLAUDE_PROXY_RAMP_UP_STEP] [default: 1]
    #[arg(long, value_name = "N")]
    pub ramp_up_step: Option<usize>,
    /// Interval of the ramp-up, e.g. 10s [env: CLAUDE_PROXY_RAMP_UP_INTERVAL] [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub ramp_up_interval: Option<String>,
    /// Retry budget: share of requests that may be retried, e.g. 0.2 [env: CLAUDE_PROXY_RETRY_BUDGET] [default: no budget]
    #[arg(long, value_name = "RATIO")]
    pub retry_budget: Option<f32>,
    /// Retries per second the budget always allows [env: CLAUDE_PROXY_RETRY_BUDGET_MIN_PER_SEC] [default: 10]
    #[arg(long, value_name = "N")]
    pub retry_budget_min_per_sec: Option<u32>,
    /// Predictive throttling: space requests when a group's demand forecast nears its quota [env: CLAUDE_PROXY_PACING] [default: false]
    #[arg(long, value_name = "BOOL")]
    pub pacing: Option<bool>,
    /// Share of a limit the forecast must reach to start pacing, 0..1 [env: CLAUDE_PROXY_PACING_TRIGGER] [default: 0.8]
    #[arg(long, value_name = "FRACTION")]
    pub pacing_trigger: Option<f64>,
    /// Most extra requests per minute, minute over minute, while pacing (acceleration limits) [env: CLAUDE_PROXY_PACING_RAMP] [default: none]
    #[arg(long, value_name = "PER_MINUTE")]
    pub pacing_ramp: Option<f64>,
    /// Refuse requests while Redis is down instead of limiting locally with 1/N of the quota [env: CLAUDE_PROXY_REDIS_FAIL_CLOSED] [default: false]
    #[arg(long, value_name = "BOOL")]
    pub redis_fail_closed: Option<bool>,
    /// Longest wait for Redis's reply to a quota call before this node counts Redis as down and limits locally [env: CLAUDE_PROXY_REDIS_QUOTA_TIMEOUT] [default: 1s]
    #[arg(long, value_name = "DURATION")]
    pub redis_quota_timeout: Option<String>,
    // --- issue 18 / 16: the proxy's edge (connections, upstream pool, logs) ---
    /// Longest time from accepting a connection to a complete first request head [env: CLAUDE_PROXY_HEADER_READ_TIMEOUT] [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// Close a client connection with no request in progress after this long [env: CLAUDE_PROXY_IDLE_TIMEOUT] [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Cap on open client connections; at the cap the oldest idle one is closed [env: CLAUDE_PROXY_MAX_CONNECTIONS] [default: 10000, lowered to fit `ulimit -n`]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Close pooled upstream connections idle for this long [env: CLAUDE_PROXY_UPSTREAM_IDLE_TIMEOUT] [default: 30s; at most 256 idle connections are kept]
    #[arg(long, value_name = "DURATION")]
    pub upstream_idle_timeout: Option<String>,
    /// Log format: `text` (colour only on a terminal, never with NO_COLOR) or `json`; the level is RUST_LOG [env: CLAUDE_PROXY_LOG_FORMAT] [default: text]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<super::LogFormat>,
    /// Runtime worker threads serving connections, 1 to 1024: fewer than the cores for a sidecar sharing its cores or a container whose CPU quota is below the host's core count (like nginx's `worker_processes`, Envoy's `--concurrency`) [env: CLAUDE_PROXY_WORKER_THREADS] [default: Tokio's: TOKIO_WORKER_THREADS, else one per core]
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
}

/// The TOML file: the same names as the flags, plus `[limits.<group>]` and `[mock]` tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    upstream: Option<String>,
    api_key: Option<String>,
    api_keys: Option<Vec<String>>,
    keys_file: Option<PathBuf>,
    client_tokens: Option<Vec<String>>,
    tenants_file: Option<PathBuf>,
    spend_path: Option<String>,
    prices_file: Option<PathBuf>,
    retry_strategy: Option<RetryStrategy>,
    max_retries: Option<u32>,
    deadline: Option<toml::Value>,
    fallback: Option<bool>,
    fallback_model: Option<String>,
    cache: Option<bool>,
    cache_mode: Option<String>,
    cache_ttl: Option<toml::Value>,
    cache_path: Option<String>,
    cache_max_bytes: Option<toml::Value>,
    cache_secret: Option<String>,
    max_in_flight: Option<usize>,
    redis_url: Option<String>,
    expected_nodes: Option<u32>,
    metrics: Option<bool>,
    alert_webhook: Option<String>,
    alert_threshold: Option<f64>,
    // issue 16
    adaptive_concurrency: Option<bool>,
    min_in_flight: Option<usize>,
    initial_in_flight: Option<usize>,
    ramp_up_from: Option<usize>,
    ramp_up_step: Option<usize>,
    ramp_up_interval: Option<toml::Value>,
    retry_budget: Option<f32>,
    retry_budget_min_per_sec: Option<u32>,
    pacing: Option<bool>,
    pacing_trigger: Option<f64>,
    pacing_ramp: Option<f64>,
    redis_fail_closed: Option<bool>,
    redis_quota_timeout: Option<toml::Value>,
    // issue 18 / 16: the proxy's edge
    header_read_timeout: Option<toml::Value>,
    idle_timeout: Option<toml::Value>,
    max_connections: Option<usize>,
    upstream_idle_timeout: Option<toml::Value>,
    log_format: Option<super::LogFormat>,
    worker_threads: Option<usize>,
    #[serde(default)]
    limits: BTreeMap<String, GroupLimits>,
    #[serde(default)]
    mock: Option<MockSettings>,
}

/// A configuration error: names the field (flag, variable or TOML key) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field at fault.
    pub fn field(&self) -> &str {
        &self.field
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// One setting as read from the sources: its value and the name it was given under.
struct Setting {
    value: String,
    source: String,
}

impl ProxyConfig {
    /// Resolves the configuration from parsed flags, the process environment and the `.env`
    /// file of the working directory (read without modifying the process environment).
    pub fn load(cli: Cli) -> Result<Self, ConfigError> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        if let Ok(iter) = dotenvy::from_path_iter(".env") {
            for item in iter {
                let (k, v) = item.map_err(|e| ConfigError::new(".env", e.to_string()))?;
                env.insert(k, v);
            }
        }
        env.extend(std::env::vars());
        Self::resolve(cli, &env)
    }

    /// Resolves the configuration from flags and an explicit environment map (`.env` entries
    /// already merged under the process environment). The TOML file is `cli.config`, or
    /// `./claude-proxy.toml` when it exists.
    pub fn resolve(cli: Cli, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None if Path::new("claude-proxy.toml").exists() => {
                read_file(Path::new("claude-proxy.toml"))?
            }
            None => FileConfig::default(),
        };

        // Later sources override earlier ones: file < env (.env < process) < flags.
        let pick = |flag: &Option<String>,
                    flag_name: &str,
                    var: &str,
                    file_value: Option<String>,
                    key: &str| {
            if let Some(v) = flag {
                Some(Setting {
                    value: v.clone(),
                    source: format!("--{flag_name}"),
                })
            } else if let Some(v) = env.get(var).filter(|v| !v.is_empty()) {
                Some(Setting {
                    value: v.clone(),
                    source: var.to_string(),
                })
            } else {
                file_value.map(|v| Setting {
                    value: v,
                    source: format!("{key} (config file)"),
                })
            }
        };
        let to_string = |v: &toml::Value| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };

        let listen = match pick(
            &cli.listen,
            "listen",
            "CLAUDE_PROXY_LISTEN",
            file.listen.clone(),
            "listen",
        ) {
            Some(s) => s.value.parse::<SocketAddr>().map_err(|e| {
                ConfigError::new(
                    s.source,
                    format!("`{}` is not a socket address ({e})", s.value),
                )
            })?,
            None => SocketAddr::from(([127, 0, 0, 1], 8787)),
        };

        // Keys held by the proxy.
        let mut api_keys = Vec::new();
        if let Some(s) = pick(
            &cli.api_key,
            "api-key",
            "ANTHROPIC_API_KEY",
            file.api_key.clone(),
            "api_key",
        ) {
            api_keys.push(Secret::new(s.value.trim()));
        }
        if let Some(s) = pick(
            &cli.api_keys,
            "api-keys",
            "ANTHROPIC_API_KEYS",
            file.api_keys.clone().map(|v| v.join(",")),
            "api_keys",
        ) {
            api_keys.extend(split_list(&s.value).map(Secret::new));
        }
        // A file's path: the flag, else the variable, else the TOML key.
        let pick_path = |flag: &Option<PathBuf>, var: &str, file_value: &Option<PathBuf>| {
            flag.clone()
                .or_else(|| env.get(var).filter(|v| !v.is_empty()).map(PathBuf::from))
                .or_else(|| file_value.clone())
        };
        let keys_file = pick_path(&cli.keys_file, "CLAUDE_PROXY_KEYS_FILE", &file.keys_file);
        if let Some(path) = &keys_file {
            api_keys.extend(read_keys_file(path)?);
        }
        api_keys.dedup();

        let client_tokens: Vec<Secret> = pick(
            &cli.client_tokens,
            "client-tokens",
            "CLAUDE_PROXY_TOKENS",
            file.client_tokens.clone().map(|v| v.join(",")),
            "client_tokens",
        )
        .map(|s| split_list(&s.value).map(Secret::new).collect())
        .unwrap_or_default();

        // issue 15: tenants authenticate clients instead of the client tokens.
        let tenants_file = pick_path(
            &cli.tenants_file,
            "CLAUDE_PROXY_TENANTS_FILE",
            &file.tenants_file,
        );
        let tenants = match &tenants_file {
            Some(path) => Some(
                super::TenantTable::read(path)
                    .map_err(|e| ConfigError::new("tenants_file", e.to_string()))?,
            ),
            None => None,
        };
        if tenants.is_some() && !client_tokens.is_empty() {
            return Err(ConfigError::new(
                "client_tokens",
                "a tenants file is configured: clients authenticate with its tenants' tokens, \
                 so move the client tokens into it (one `[[tenant]]` each)",
            ));
        }

        let upstream = match pick(
            &cli.upstream,
            "upstream",
            "CLAUDE_PROXY_UPSTREAM",
            file.upstream.clone(),
            "upstream",
        ) {
            Some(s) => parse_upstream(&s, file.mock.clone())?,
            None if api_keys.is_empty() => Upstream::Mock(file.mock.clone().unwrap_or_default()),
            None => Upstream::Url(http::Uri::from_static("https://api.anthropic.com")),
        };

        let retry_strategy = match cli.retry_strategy {
            Some(s) => s,
            None => match env.get("CLAUDE_RETRY_STRATEGY").filter(|v| !v.is_empty()) {
                Some(v) => <RetryStrategy as clap::ValueEnum>::from_str(v, true).map_err(|_| {
                    ConfigError::new(
                        "CLAUDE_RETRY_STRATEGY",
                        format!("`{v}` is not one of patient, sdk, none"),
                    )
                })?,
                None => file.retry_strategy.unwrap_or_default(),
            },
        };
        let max_retries = match pick(
            &cli.max_retries.map(|v| v.to_string()),
            "max-retries",
            "MAX_RETRIES",
            file.max_retries.map(|v| v.to_string()),
            "max_retries",
        ) {
            Some(s) => parse_num::<u32>(&s)?,
            None => match retry_strategy {
                RetryStrategy::Patient => 7,
                RetryStrategy::Sdk => 2,
                RetryStrategy::None => 0,
            },
        };
        let deadline = match pick(
            &cli.deadline,
            "deadline",
            "CLAUDE_PROXY_DEADLINE",
            file.deadline.as_ref().map(to_string),
            "deadline",
        ) {
            Some(s) => parse_duration_setting(&s)?,
            None => Duration::from_secs(600),
        };
        let fallback = match pick(
            &cli.fallback.map(|v| v.to_string()),
            "fallback",
            "CLAUDE_PROXY_FALLBACK",
            file.fallback.map(|v| v.to_string()),
            "fallback",
        ) {
            Some(s) => parse_bool(&s)?,
            None => true,
        };
        let fallback_model = pick(
            &cli.fallback_model,
            "fallback-model",
            "FALLBACK_MODEL",
            file.fallback_model.clone(),
            "fallback_model",
        )
        .map(|s| s.value);
        let cache = match pick(
            &cli.cache.map(|v| v.to_string()),
            "cache",
            "CLAUDE_PROXY_CACHE",
            file.cache.map(|v| v.to_string()),
            "cache",
        ) {
            Some(s) => parse_bool(&s)?,
            None => true,
        };
        let cache_mode = match pick(
            &cli.cache_mode,
            "cache-mode",
            "CLAUDE_PROXY_CACHE_MODE",
            file.cache_mode.clone(),
            "cache_mode",
        ) {
            Some(s) => s
                .value
                .parse::<CacheMode>()
                .map_err(|e| ConfigError::new(&s.source, e))?,
            None => CacheMode::Deterministic,
        };
        // `--cache false` stays the way to turn the cache off, whatever the mode says.
        let cache_mode = if cache { cache_mode } else { CacheMode::Off };
        let cache = cache_mode != CacheMode::Off;
        let cache_ttl = match pick(
            &cli.cache_ttl,
            "cache-ttl",
            "CACHE_TTL",
            file.cache_ttl.as_ref().map(to_string),
            "cache_ttl",
        ) {
            Some(s) => parse_duration_setting(&s)?,
            None => Duration::from_secs(4 * 3600),
        };
        let cache_path = match pick(
            &cli.cache_path,
            "cache-path",
            "CLAUDE_PROXY_CACHE_PATH",
            file.cache_path.clone(),
            "cache_path",
        ) {
            Some(s) if s.value == "memory" => None,
            Some(s) => Some(PathBuf::from(s.value)),
            None => Some(PathBuf::from(".tower-claude/cache.redb")),
        };
        let cache_max_bytes = match pick(
            &cli.cache_max_bytes,
            "cache-max-bytes",
            "CLAUDE_PROXY_CACHE_MAX_BYTES",
            file.cache_max_bytes.as_ref().map(to_string),
            "cache_max_bytes",
        ) {
            Some(s) => parse_size_setting(&s)?,
            None => 256 * 1024 * 1024,
        };
        let cache_secret = match pick(
            &cli.cache_secret,
            "cache-secret",
            "CLAUDE_PROXY_CACHE_SECRET",
            file.cache_secret.clone(),
            "cache_secret",
        ) {
            Some(s) => Some(
                crate::cache::CacheSecret::from_hex(&s.value).ok_or_else(|| {
                    // The value itself is not repeated: it may be a secret with a typo.
                    ConfigError::new(&s.source, "the cache secret is not 64 hexadecimal digits")
                })?,
            ),
            None => None,
        };
        let spend_path = match pick(
            &cli.spend_path,
            "spend-path",
            "CLAUDE_PROXY_SPEND_PATH",
            file.spend_path.clone(),
            "spend_path",
        ) {
            Some(s) if s.value == "memory" => None,
            Some(s) => Some(PathBuf::from(s.value)),
            None => cache_path.as_ref().map(|cache| {
                cache
                    .parent()
                    .unwrap_or_else(|| Path::new(""))
                    .join("spend.redb")
            }),
        };
        let prices_file = pick_path(
            &cli.prices_file,
            "CLAUDE_PROXY_PRICES_FILE",
            &file.prices_file,
        );
        let prices = match &prices_file {
            Some(path) => crate::tenant::PriceTable::default()
                .merge_file(path)
                .map_err(|e| ConfigError::new("prices_file", e.to_string()))?,
            None => crate::tenant::PriceTable::default(),
        };
        let max_in_flight = match pick(
            &cli.max_in_flight.map(|v| v.to_string()),
            "max-in-flight",
            "CLAUDE_PROXY_MAX_IN_FLIGHT",
            file.max_in_flight.map(|v| v.to_string()),
            "max_in_flight",
        ) {
            Some(s) => {
                let n = parse_num::<usize>(&s)?;
                if n == 0 {
                    return Err(ConfigError::new(s.source, "must be at least 1"));
                }
                Some(n)
            }
            None => None,
        };
        let metrics = match pick(
            &cli.metrics.map(|v| v.to_string()),
            "metrics",
            "CLAUDE_PROXY_METRICS",
            file.metrics.map(|v| v.to_string()),
            "metrics",
        ) {
            Some(s) => parse_bool(&s)?,
            None => true,
        };
        let alert_webhook = match pick(
            &cli.alert_webhook,
            "alert-webhook",
            "CLAUDE_PROXY_ALERT_WEBHOOK",
            file.alert_webhook.clone(),
            "alert_webhook",
        ) {
            Some(s) => {
                let uri: http::Uri = s.value.parse().map_err(|e| {
                    ConfigError::new(&s.source, format!("`{}` is not a URL ({e})", s.value))
                })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none()
                {
                    return Err(ConfigError::new(&s.source, "must be an http(s):// URL"));
                }
                Some(s.value)
            }
            None => None,
        };
        let alert_threshold = match pick(
            &cli.alert_threshold.map(|v| v.to_string()),
            "alert-threshold",
            "CLAUDE_PROXY_ALERT_THRESHOLD",
            file.alert_threshold.map(|v| v.to_string()),
            "alert_threshold",
        ) {
            Some(s) => {
                let v = parse_num::<f64>(&s)?;
                if !(v > 0.0 && v <= 1.0) {
                    return Err(ConfigError::new(&s.source, "must be in (0, 1]"));
                }
                v
            }
            None => 0.8,
        };
        let expected_nodes = match pick(
            &cli.expected_nodes.map(|v| v.to_string()),
            "expected-nodes",
            "CLAUDE_PROXY_NODES",
            file.expected_nodes.map(|v| v.to_string()),
            "expected_nodes",
        ) {
            Some(s) => {
                let n = parse_num::<u32>(&s)?;
                if n == 0 {
                    return Err(ConfigError::new(s.source, "must be at least 1"));
                }
                n
            }
            None => 1,
        };
        let redis_url = pick(
            &cli.redis_url,
            "redis-url",
            "REDIS_URL",
            file.redis_url.clone(),
            "redis_url",
        )
        .map(|s| s.value);

        // -- issue 16: adaptive concurrency, ramp-up, retry budget, pacing, Redis fail-closed.
        let flag_bool = |v: Option<bool>| v.map(|v| v.to_string());
        let adaptive_concurrency = match pick(
            &flag_bool(cli.adaptive_concurrency),
            "adaptive-concurrency",
            "CLAUDE_PROXY_ADAPTIVE_CONCURRENCY",
            flag_bool(file.adaptive_concurrency),
            "adaptive_concurrency",
        ) {
            Some(s) => parse_bool(&s)?,
            None => false,
        };
        let at_least_one = |s: Setting| -> Result<usize, ConfigError> {
            let n = parse_num::<usize>(&s)?;
            if n == 0 {
                return Err(ConfigError::new(s.source, "must be at least 1"));
            }
            Ok(n)
        };
        let min_in_flight = match pick(
            &cli.min_in_flight.map(|v| v.to_string()),
            "min-in-flight",
            "CLAUDE_PROXY_MIN_IN_FLIGHT",
            file.min_in_flight.map(|v| v.to_string()),
            "min_in_flight",
        ) {
            Some(s) => at_least_one(s)?,
            None => 1,
        };
        let initial_in_flight = match pick(
            &cli.initial_in_flight.map(|v| v.to_string()),
            "initial-in-flight",
            "CLAUDE_PROXY_INITIAL_IN_FLIGHT",
            file.initial_in_flight.map(|v| v.to_string()),
            "initial_in_flight",
        ) {
            Some(s) => at_least_one(s)?,
            None => 8,
        };
        if adaptive_concurrency && min_in_flight > max_in_flight.unwrap_or(64) {
            return Err(ConfigError::new(
                "min_in_flight",
                "the floor of the adaptive cap is above max_in_flight",
            ));
        }
        let ramp_up = match pick(
            &cli.ramp_up_from.map(|v| v.to_string()),
            "ramp-up-from",
            "CLAUDE_PROXY_RAMP_UP_FROM",
            file.ramp_up_from.map(|v| v.to_string()),
            "ramp_up_from",
        ) {
            Some(s) => {
                if !adaptive_concurrency && max_in_flight.is_none() {
                    return Err(ConfigError::new(
                        s.source,
                        "a ramp-up needs a cap to ramp up to: set max_in_flight or \
                         adaptive_concurrency",
                    ));
                }
                let initial = at_least_one(s)?;
                let step = match pick(
                    &cli.ramp_up_step.map(|v| v.to_string()),
                    "ramp-up-step",
                    "CLAUDE_PROXY_RAMP_UP_STEP",
                    file.ramp_up_step.map(|v| v.to_string()),
                    "ramp_up_step",
                ) {
                    Some(s) => at_least_one(s)?,
                    None => 1,
                };
                let interval = match pick(
                    &cli.ramp_up_interval,
                    "ramp-up-interval",
                    "CLAUDE_PROXY_RAMP_UP_INTERVAL",
                    file.ramp_up_interval.as_ref().map(to_string),
                    "ramp_up_interval",
                ) {
                    Some(s) => parse_duration_setting(&s)?,
                    None => Duration::from_secs(10),
                };
                Some(crate::concurrency::RampUp {
                    initial,
                    step,
                    interval,
                })
            }
            None => None,
        };
        let retry_budget = match pick(
            &cli.retry_budget.map(|v| v.to_string()),
            "retry-budget",
            "CLAUDE_PROXY_RETRY_BUDGET",
            file.retry_budget.map(|v| v.to_string()),
            "retry_budget",
        ) {
            Some(s) => {
                let ratio = parse_num::<f32>(&s)?;
                if !(0.0..=1000.0).contains(&ratio) {
                    return Err(ConfigError::new(s.source, "must be between 0 and 1000"));
                }
                Some(ratio)
            }
            None => None,
        };
        let retry_budget_min_per_sec = match pick(
            &cli.retry_budget_min_per_sec.map(|v| v.to_string()),
            "retry-budget-min-per-sec",
            "CLAUDE_PROXY_RETRY_BUDGET_MIN_PER_SEC",
            file.retry_budget_min_per_sec.map(|v| v.to_string()),
            "retry_budget_min_per_sec",
        ) {
            Some(s) => parse_num::<u32>(&s)?,
            None => 10,
        };
        let pacing_on = match pick(
            &flag_bool(cli.pacing),
            "pacing",
            "CLAUDE_PROXY_PACING",
            flag_bool(file.pacing),
            "pacing",
        ) {
            Some(s) => parse_bool(&s)?,
            None => false,
        };
        let mut pacing = crate::stack::PacingConfig::default();
        if let Some(s) = pick(
            &cli.pacing_trigger.map(|v| v.to_string()),
            "pacing-trigger",
            "CLAUDE_PROXY_PACING_TRIGGER",
            file.pacing_trigger.map(|v| v.to_string()),
            "pacing_trigger",
        ) {
            let v = parse_num::<f64>(&s)?;
            if !(v > 0.0 && v <= 1.0) {
                return Err(ConfigError::new(s.source, "must be in (0, 1]"));
            }
            pacing.trigger = v;
        }
        if let Some(s) = pick(
            &cli.pacing_ramp.map(|v| v.to_string()),
            "pacing-ramp",
            "CLAUDE_PROXY_PACING_RAMP",
            file.pacing_ramp.map(|v| v.to_string()),
            "pacing_ramp",
        ) {
            let v = parse_num::<f64>(&s)?;
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::new(s.source, "must be a positive number"));
            }
            pacing.ramp = Some(v);
        }
        let pacing = pacing_on.then_some(pacing);
        let redis_fail_closed = match pick(
            &flag_bool(cli.redis_fail_closed),
            "redis-fail-closed",
            "CLAUDE_PROXY_REDIS_FAIL_CLOSED",
            flag_bool(file.redis_fail_closed),
            "redis_fail_closed",
        ) {
            Some(s) => parse_bool(&s)?,
            None => false,
        };
        // --- issue 18 / 16: the proxy's edge (connections, upstream pool, logs) ---
        let positive_duration = |s: Setting| -> Result<Duration, ConfigError> {
            let d = parse_duration_setting(&s)?;
            if d.is_zero() {
                return Err(ConfigError::new(s.source, "must be longer than zero"));
            }
            Ok(d)
        };
        let redis_quota_timeout = match pick(
            &cli.redis_quota_timeout,
            "redis-quota-timeout",
            "CLAUDE_PROXY_REDIS_QUOTA_TIMEOUT",
            file.redis_quota_timeout.as_ref().map(to_string),
            "redis_quota_timeout",
        ) {
            Some(s) => positive_duration(s)?,
            None => Duration::from_secs(1),
        };
        let header_read_timeout = match pick(
            &cli.header_read_timeout,
            "header-read-timeout",
            "CLAUDE_PROXY_HEADER_READ_TIMEOUT",
            file.header_read_timeout.as_ref().map(to_string),
            "header_read_timeout",
        ) {
            Some(s) => positive_duration(s)?,
            None => Duration::from_secs(10),
        };
        let idle_timeout = match pick(
            &cli.idle_timeout,
            "idle-timeout",
            "CLAUDE_PROXY_IDLE_TIMEOUT",
            file.idle_timeout.as_ref().map(to_string),
            "idle_timeout",
        ) {
            Some(s) => positive_duration(s)?,
            None => Duration::from_secs(60),
        };
        let max_connections = match pick(
            &cli.max_connections.map(|v| v.to_string()),
            "max-connections",
            "CLAUDE_PROXY_MAX_CONNECTIONS",
            file.max_connections.map(|v| v.to_string()),
            "max_connections",
        ) {
            Some(s) => {
                let n = parse_num::<usize>(&s)?;
                if n == 0 || n > 1_000_000 {
                    return Err(ConfigError::new(s.source, "must be between 1 and 1000000"));
                }
                n
            }
            None => 10_000,
        };
        let upstream_idle_timeout = match pick(
            &cli.upstream_idle_timeout,
            "upstream-idle-timeout",
            "CLAUDE_PROXY_UPSTREAM_IDLE_TIMEOUT",
            file.upstream_idle_timeout.as_ref().map(to_string),
            "upstream_idle_timeout",
        ) {
            Some(s) => positive_duration(s)?,
            None => crate::client::DEFAULT_POOL_IDLE,
        };
        let log_format = match cli.log_format {
            Some(f) => f,
            None => match env.get("CLAUDE_PROXY_LOG_FORMAT").filter(|v| !v.is_empty()) {
                Some(v) => {
                    <super::LogFormat as clap::ValueEnum>::from_str(v, true).map_err(|_| {
                        ConfigError::new(
                            "CLAUDE_PROXY_LOG_FORMAT",
                            format!("`{v}` is not one of text, json"),
                        )
                    })?
                }
                None => file.log_format.unwrap_or_default(),
            },
        };
        let thread_count = |s: Setting| {
            let n = parse_num::<usize>(&s)?;
            if n == 0 || n > MAX_WORKER_THREADS {
                return Err(ConfigError::new(
                    s.source,
                    format!("`{}`: must be between 1 and {MAX_WORKER_THREADS}", s.value),
                ));
            }
            Ok(n)
        };
        let worker_threads = match pick(
            &cli.worker_threads.map(|v| v.to_string()),
            "worker-threads",
            "CLAUDE_PROXY_WORKER_THREADS",
            file.worker_threads.map(|v| v.to_string()),
            "worker_threads",
        ) {
            Some(s) => Some(thread_count(s)?),
            // Tokio reads `TOKIO_WORKER_THREADS` itself and panics on a bad value (`0`, `two`,
            // an empty one): read and checked here, and given to the runtime explicitly, so a
            // bad value is a configuration error (and a `.env` entry counts as well).
            None => match env.get("TOKIO_WORKER_THREADS") {
                Some(v) => Some(thread_count(Setting {
                    value: v.clone(),
                    source: "TOKIO_WORKER_THREADS".to_string(),
                })?),
                None => None,
            },
        };

        for (group, l) in &file.limits {
            if l.rpm == 0 || l.itpm == 0 || l.otpm == 0 {
                return Err(ConfigError::new(
                    format!("limits.{group}"),
                    "rpm, itpm and otpm must be at least 1",
                ));
            }
        }
        if let Upstream::Mock(m) = &upstream {
            if m.rpm == 0 || m.itpm == 0 || m.otpm == 0 {
                return Err(ConfigError::new(
                    "mock",
                    "rpm, itpm and otpm must be at least 1",
                ));
            }
            if !(0.0..=1.0).contains(&m.overloaded_rate) {
                return Err(ConfigError::new(
                    "mock.overloaded_rate",
                    "must be between 0 and 1",
                ));
            }
        }
        if let Upstream::Url(uri) = &upstream {
            if points_at(uri, listen) {
                return Err(ConfigError::new(
                    "upstream",
                    format!(
                        "{uri} is the proxy's own address ({listen}): every request would come \
                         back to the proxy"
                    ),
                ));
            }
        }
        if !listen.ip().is_loopback() && client_tokens.is_empty() && tenants.is_none() {
            return Err(ConfigError::new(
                "listen",
                format!(
                    "{listen} is not a loopback address: set client tokens (--client-tokens / \
                     CLAUDE_PROXY_TOKENS) or a tenants file (--tenants-file) so that only your \
                     clients can use the proxy"
                ),
            ));
        }
        if (!client_tokens.is_empty() || tenants.is_some())
            && api_keys.is_empty()
            && !matches!(upstream, Upstream::Mock(_))
        {
            return Err(ConfigError::new(
                if tenants.is_some() {
                    "tenants_file"
                } else {
                    "client_tokens"
                },
                "clients authenticate with proxy tokens, so the proxy must hold the upstream \
                 key(s): set ANTHROPIC_API_KEY, ANTHROPIC_API_KEYS or --keys-file",
            ));
        }

        Ok(Self {
            listen,
            upstream,
            api_keys,
            client_tokens,
            retry_strategy,
            max_retries,
            deadline,
            fallback,
            fallback_model,
            cache,
            cache_mode,
            cache_ttl,
            cache_path,
            cache_max_bytes,
            cache_secret,
            max_in_flight,
            limits: file.limits,
            body_limit: crate::body::ANTHROPIC_MAX_BODY,
            redis_url,
            expected_nodes,
            metrics,
            alert_webhook,
            alert_threshold,
            adaptive_concurrency,
            min_in_flight,
            initial_in_flight,
            ramp_up,
            retry_budget,
            retry_budget_min_per_sec,
            pacing,
            redis_fail_closed,
            redis_quota_timeout,
            keys_file,
            tenants_file,
            tenants,
            spend_path,
            prices,
            header_read_timeout,
            idle_timeout,
            max_connections,
            upstream_idle_timeout,
            log_format,
            worker_threads,
        })
    }
}

/// The keys of a keys file: one per line, blank lines and `#` comments skipped.
pub(crate) fn read_keys_file(path: &Path) -> Result<Vec<Secret>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            "--keys-file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(Secret::new)
        .collect())
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        let span = e.span().map(|s| text[..s.start].lines().count().max(1));
        ConfigError::new(
            path.display().to_string(),
            match span {
                Some(line) => format!("line {line}: {msg}"),
                None => msg,
            },
        )
    })
}

fn split_list(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

fn parse_upstream(s: &Setting, mock: Option<MockSettings>) -> Result<Upstream, ConfigError> {
    match s.value.as_str() {
        "mock" => Ok(Upstream::Mock(mock.unwrap_or_default())),
        "anthropic" => Ok(Upstream::Url(http::Uri::from_static(
            "https://api.anthropic.com",
        ))),
        url => {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| ConfigError::new(&s.source, format!("`{url}` is not a URL ({e})")))?;
            match uri.scheme_str() {
                Some("http") | Some("https") if uri.authority().is_some() => Ok(Upstream::Url(uri)),
                _ => Err(ConfigError::new(
                    &s.source,
                    format!("`{url}` must be `anthropic`, `mock` or an http(s):// base URL"),
                )),
            }
        }
    }
}

fn parse_num<T: std::str::FromStr>(s: &Setting) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    s.value
        .trim()
        .parse::<T>()
        .map_err(|e| ConfigError::new(&s.source, format!("`{}`: {e}", s.value)))
}

fn parse_bool(s: &Setting) -> Result<bool, ConfigError> {
    match s.value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(ConfigError::new(
            &s.source,
            format!("`{other}` is not a boolean"),
        )),
    }
}

fn parse_duration_setting(s: &Setting) -> Result<Duration, ConfigError> {
    parse_duration(&s.value).ok_or_else(|| {
        ConfigError::new(
            &s.source,
            format!(
                "`{}` is not a duration (seconds, or a number with s, m, h or d)",
                s.value
            ),
        )
    })
}

fn parse_size_setting(s: &Setting) -> Result<u64, ConfigError> {
    parse_size(&s.value).ok_or_else(|| {
        ConfigError::new(
            &s.source,
            format!(
                "`{}` is not a size (bytes, or a number with KB, MB, GB, KiB, MiB or GiB)",
                s.value
            ),
        )
    })
}

/// Parses `268435456`, `256MiB`, `256 MiB`, `1.5GB`, `64kib`: bare numbers are bytes;
/// KB, MB, GB are powers of 1000, KiB, MiB, GiB of 1024 (any case). Like
/// [`parse_duration`], a grammar this small is written out rather than taken from a crate.
///
/// ```
/// use tower_claude::proxy::parse_size;
///
/// assert_eq!(parse_size("256MiB"), Some(256 * 1024 * 1024));
/// assert_eq!(parse_size("1.5 GB"), Some(1_500_000_000));
/// assert_eq!(parse_size("4096"), Some(4096));
/// assert_eq!(parse_size("lots"), None);
/// ```
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (s[..i].trim(), s[i..].trim()),
        None => return s.parse().ok(),
    };
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    let n: f64 = num.parse().ok()?;
    let bytes = n * mult as f64;
    // Below 2^53 an f64 holds every whole number of bytes exactly.
    (n.is_finite() && (0.0..9.0e15).contains(&bytes)).then(|| bytes.round() as u64)
}

/// Parses `90`, `90s`, `1.5m`, `4h`, `1d`. Bare numbers are seconds, as `CACHE_TTL` users
/// expect; the tiny grammar is written out here rather than pulling in a crate for it.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.trim().parse().ok()?;
    let mult = match unit.trim() {
        "ms" => 0.001,
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86400.0,
        _ => return None,
    };
    let secs = n * mult;
    (0.0..1e9)
        .contains(&secs)
        .then(|| Duration::from_secs_f64(secs))
}

/// Whether `uri` is the listening address itself (same port, and the same IP or a name for
/// this host), so that the proxy would send every request to itself.
fn points_at(uri: &http::Uri, listen: std::net::SocketAddr) -> bool {
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    if uri.port_u16().unwrap_or(default_port) != listen.port() {
        return false;
    }
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return listen.ip().is_loopback() || listen.ip().is_unspecified();
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == listen.ip() || (ip.is_loopback() && listen.ip().is_unspecified()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_run_the_simulator_on_loopback() {
        let cfg = ProxyConfig::resolve(Cli::default(), &env(&[])).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8787".parse().unwrap());
        assert!(matches!(cfg.upstream, Upstream::Mock(_)));
        assert_eq!(cfg.max_retries, 7);
        assert_eq!(cfg.cache_ttl, Duration::from_secs(4 * 3600));
    }

    #[test]
    fn a_key_selects_anthropic_and_never_shows_in_debug() {
        let cfg = ProxyConfig::resolve(
            Cli::default(),
            &env(&[
                ("ANTHROPIC_API_KEY", "sk-ant-secret-1"),
                ("MAX_RETRIES", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.upstream,
            Upstream::Url(http::Uri::from_static("https://api.anthropic.com"))
        );
        assert_eq!(cfg.max_retries, 3);
        assert!(!format!("{cfg:?}").contains("sk-ant-secret-1"));
    }

    #[test]
    fn flags_win_over_environment() {
        let cli = Cli {
            max_retries: Some(1),
            cache_ttl: Some("30m".into()),
            ..Cli::default()
        };
        let cfg =
            ProxyConfig::resolve(cli, &env(&[("MAX_RETRIES", "5"), ("CACHE_TTL", "60")])).unwrap();
        assert_eq!(cfg.max_retries, 1);
        assert_eq!(cfg.cache_ttl, Duration::from_secs(1800));
    }

    #[test]
    fn an_upstream_that_is_the_proxy_itself_is_refused() {
        for (listen, upstream, looped) in [
            ("127.0.0.1:8787", "http://127.0.0.1:8787", true),
            ("127.0.0.1:8787", "http://localhost:8787/", true),
            ("0.0.0.0:80", "http://127.0.0.1", true),
            ("[::1]:8787", "http://[::1]:8787", true),
            ("127.0.0.1:8787", "http://127.0.0.1:9000", false),
            ("127.0.0.1:443", "https://api.anthropic.com", false),
            ("127.0.0.1:8787", "http://127.0.0.2:8787", false),
        ] {
            let vars = env(&[
                ("CLAUDE_PROXY_LISTEN", listen),
                ("CLAUDE_PROXY_UPSTREAM", upstream),
                ("CLAUDE_PROXY_TOKENS", "t"),
                ("ANTHROPIC_API_KEY", "sk-ant-x"),
            ]);
            match ProxyConfig::resolve(Cli::default(), &vars) {
                Err(e) => {
                    assert!(looped, "{listen} -> {upstream}: {e}");
                    assert_eq!(e.field(), "upstream");
                }
                Ok(_) => assert!(!looped, "{listen} -> {upstream} was accepted"),
            }
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        let err =
            ProxyConfig::resolve(Cli::default(), &env(&[("MAX_RETRIES", "lots")])).unwrap_err();
        assert_eq!(err.field(), "MAX_RETRIES");
        let err = ProxyConfig::resolve(Cli::default(), &env(&[("CACHE_TTL", "soon")])).unwrap_err();
        assert_eq!(err.field(), "CACHE_TTL");
        let err = ProxyConfig::resolve(Cli::default(), &env(&[("CLAUDE_RETRY_STRATEGY", "yolo")]))
            .unwrap_err();
        assert_eq!(err.field(), "CLAUDE_RETRY_STRATEGY");
        let err = ProxyConfig::resolve(
            Cli::default(),
            &env(&[("CLAUDE_PROXY_UPSTREAM", "ftp://x")]),
        )
        .unwrap_err();
        assert_eq!(err.field(), "CLAUDE_PROXY_UPSTREAM");
    }

    #[test]
    fn public_address_needs_client_tokens() {
        let cli = Cli {
            listen: Some("0.0.0.0:8787".into()),
            ..Cli::default()
        };
        let err = ProxyConfig::resolve(cli.clone(), &env(&[])).unwrap_err();
        assert_eq!(err.field(), "listen");
        let ok = ProxyConfig::resolve(cli, &env(&[("CLAUDE_PROXY_TOKENS", "t1,t2")])).unwrap();
        assert_eq!(ok.client_tokens.len(), 2);
    }

    #[test]
    fn toml_file_is_read_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "max_retries = 4\ncache_ttl = 120\n[limits.claude-opus-4]\nrpm = 50\nitpm = 30000\notpm = 8000\n[mock]\nrpm = 5\n",
        )
        .unwrap();
        let cli = Cli {
            config: Some(path.clone()),
            ..Cli::default()
        };
        let cfg = ProxyConfig::resolve(cli.clone(), &env(&[])).unwrap();
        assert_eq!(cfg.max_retries, 4);
        assert_eq!(cfg.cache_ttl, Duration::from_secs(120));
        assert_eq!(cfg.limits["claude-opus-4"].rpm, 50);
        match cfg.upstream {
            Upstream::Mock(m) => assert_eq!(m.rpm, 5),
            other => panic!("unexpected upstream {other:?}"),
        }
        std::fs::write(&path, "max_retrys = 4\n").unwrap();
        let err = ProxyConfig::resolve(cli, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("max_retrys"), "{err}");
    }

    #[test]
    fn issue16_options_from_the_file_the_environment_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "max_in_flight = 20\nadaptive_concurrency = true\nmin_in_flight = 2\n\
             ramp_up_from = 4\nramp_up_interval = \"30s\"\nretry_budget = 0.25\n\
             pacing = true\npacing_ramp = 12\nredis_fail_closed = true\n",
        )
        .unwrap();
        let cli = Cli {
            config: Some(path),
            initial_in_flight: Some(6),
            ..Cli::default()
        };
        let cfg = ProxyConfig::resolve(
            cli,
            &env(&[
                ("CLAUDE_PROXY_PACING_TRIGGER", "0.6"),
                ("CLAUDE_PROXY_RAMP_UP_STEP", "3"),
            ]),
        )
        .unwrap();
        assert!(cfg.adaptive_concurrency && cfg.redis_fail_closed);
        assert_eq!((cfg.min_in_flight, cfg.initial_in_flight), (2, 6));
        assert_eq!(
            cfg.ramp_up,
            Some(crate::concurrency::RampUp {
                initial: 4,
                step: 3,
                interval: Duration::from_secs(30)
            })
        );
        assert_eq!(cfg.retry_budget, Some(0.25));
        let pacing = cfg.pacing.unwrap();
        assert_eq!((pacing.trigger, pacing.ramp), (0.6, Some(12.0)));

        let defaults = ProxyConfig::resolve(Cli::default(), &env(&[])).unwrap();
        assert!(!defaults.adaptive_concurrency && !defaults.redis_fail_closed);
        assert!(defaults.ramp_up.is_none() && defaults.retry_budget.is_none());
        assert!(defaults.pacing.is_none());
        for (var, value) in [
            ("CLAUDE_PROXY_PACING_TRIGGER", "1.5"),
            ("CLAUDE_PROXY_RETRY_BUDGET", "-1"),
            ("CLAUDE_PROXY_MIN_IN_FLIGHT", "0"),
        ] {
            let err = ProxyConfig::resolve(Cli::default(), &env(&[(var, value)])).unwrap_err();
            assert_eq!(err.field(), var);
        }
    }

    #[test]
    fn redis_quota_timeout_from_every_source() {
        let cfg = ProxyConfig::resolve(Cli::default(), &env(&[])).unwrap();
        assert_eq!(cfg.redis_quota_timeout, Duration::from_secs(1));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "redis_quota_timeout = \"400ms\"\n").unwrap();
        let file = Cli {
            config: Some(path),
            ..Cli::default()
        };
        let cfg = ProxyConfig::resolve(file.clone(), &env(&[])).unwrap();
        assert_eq!(cfg.redis_quota_timeout, Duration::from_millis(400));
        // The environment over the file, the flag over both.
        let vars = env(&[("CLAUDE_PROXY_REDIS_QUOTA_TIMEOUT", "2s")]);
        let cfg = ProxyConfig::resolve(file.clone(), &vars).unwrap();
        assert_eq!(cfg.redis_quota_timeout, Duration::from_secs(2));
        let flag = Cli {
            redis_quota_timeout: Some("3".into()),
            ..file
        };
        let cfg = ProxyConfig::resolve(flag, &vars).unwrap();
        assert_eq!(cfg.redis_quota_timeout, Duration::from_secs(3));
        for bad in ["0", "0s", "soon"] {
            let vars = env(&[("CLAUDE_PROXY_REDIS_QUOTA_TIMEOUT", bad)]);
            let err = ProxyConfig::resolve(Cli::default(), &vars).unwrap_err();
            assert_eq!(err.field(), "CLAUDE_PROXY_REDIS_QUOTA_TIMEOUT", "{bad}");
        }
    }

    #[test]
    fn cache_secret_comes_from_the_file_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, format!("cache_secret = \"{}\"\n", "a7".repeat(32))).unwrap();
        let cli = Cli {
            config: Some(path.clone()),
            ..Cli::default()
        };
        let cfg = ProxyConfig::resolve(cli, &BTreeMap::new()).unwrap();
        let secret = cfg.cache_secret.clone().unwrap();
        assert_eq!(secret.as_bytes(), &[0xa7; 32]);
        assert!(!format!("{cfg:?}").contains("a7a7"));
        let cfg = ProxyConfig::resolve(Cli::default(), &BTreeMap::new()).unwrap();
        assert!(cfg.cache_secret.is_none());
        std::fs::write(&path, "cache_secret = \"short\"\n").unwrap();
        let cli = Cli {
            config: Some(path),
            ..Cli::default()
        };
        let err = ProxyConfig::resolve(cli, &BTreeMap::new()).unwrap_err();
        assert_eq!(err.field(), "cache_secret (config file)");
    }

    #[test]
    fn cache_max_bytes_takes_sizes_from_every_source() {
        let cfg = ProxyConfig::resolve(Cli::default(), &env(&[])).unwrap();
        assert_eq!(cfg.cache_max_bytes, 256 * 1024 * 1024);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        // A number in the file is bytes, as before; a string may carry a unit.
        std::fs::write(&path, "cache_max_bytes = 1048576\n").unwrap();
        let file = Cli {
            config: Some(path.clone()),
            ..Cli::default()
        };
        let cfg = ProxyConfig::resolve(file.clone(), &env(&[])).unwrap();
        assert_eq!(cfg.cache_max_bytes, 1 << 20);
        std::fs::write(&path, "cache_max_bytes = \"64 MiB\"\n").unwrap();
        let cfg = ProxyConfig::resolve(file.clone(), &env(&[])).unwrap();
        assert_eq!(cfg.cache_max_bytes, 64 << 20);
        // The environment over the file, the flag over both.
        let vars = env(&[("CLAUDE_PROXY_CACHE_MAX_BYTES", "2GB")]);
        let cfg = ProxyConfig::resolve(file.clone(), &vars).unwrap();
        assert_eq!(cfg.cache_max_bytes, 2_000_000_000);
        let flag = Cli {
            cache_max_bytes: Some("512kib".into()),
            ..file
        };
        let cfg = ProxyConfig::resolve(flag, &vars).unwrap();
        assert_eq!(cfg.cache_max_bytes, 512 << 10);
        for bad in ["-1", "1.5", "12 parsecs", "MiB", "99999999999GiB"] {
            let vars = env(&[("CLAUDE_PROXY_CACHE_MAX_BYTES", bad)]);
            let err = ProxyConfig::resolve(Cli::default(), &vars).unwrap_err();
            assert_eq!(err.field(), "CLAUDE_PROXY_CACHE_MAX_BYTES", "{bad}");
        }
    }

    #[test]
    fn edge_options_from_every_source() {
        let cfg = ProxyConfig::resolve(Cli::default(), &env(&[])).unwrap();
        assert_eq!(cfg.header_read_timeout, Duration::from_secs(10));
        assert_eq!(cfg.idle_timeout, Duration::from_secs(60));
        assert_eq!(cfg.max_connections, 10_000);
        assert_eq!(cfg.upstream_idle_timeout, Duration::from_secs(30));
        assert_eq!(cfg.log_format, super::super::LogFormat::Text);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "header_read_timeout = \"5s\"\nidle_timeout = 30\nmax_connections = 100\nupstream_idle_timeout = \"2m\"\nlog_format = \"json\"\n",
        )
        .unwrap();
        let cli = Cli {
            config: Some(path),
            ..Cli::default()
        };
        let cfg = ProxyConfig::resolve(cli.clone(), &env(&[])).unwrap();
        assert_eq!(cfg.header_read_timeout, Duration::from_secs(5));
        assert_eq!(cfg.idle_timeout, Duration::from_secs(30));
        assert_eq!(cfg.max_connections, 100);
        assert_eq!(cfg.upstream_idle_timeout, Duration::from_secs(120));
        assert_eq!(cfg.log_format, super::super::LogFormat::Json);

        let vars = env(&[
            ("CLAUDE_PROXY_HEADER_READ_TIMEOUT", "2s"),
            ("CLAUDE_PROXY_MAX_CONNECTIONS", "7"),
            ("CLAUDE_PROXY_LOG_FORMAT", "text"),
        ]);
        let cfg = ProxyConfig::resolve(cli.clone(), &vars).unwrap();
        assert_eq!(cfg.header_read_timeout, Duration::from_secs(2));
        assert_eq!(cfg.max_connections, 7);
        assert_eq!(cfg.log_format, super::super::LogFormat::Text);
        let flags = Cli {
            idle_timeout: Some("1s".into()),
            log_format: Some(super::super::LogFormat::Json),
            ..cli
        };
        let cfg = ProxyConfig::resolve(flags, &vars).unwrap();
        assert_eq!(cfg.idle_timeout, Duration::from_secs(1));
        assert_eq!(cfg.log_format, super::super::LogFormat::Json);

        for (var, value) in [
            ("CLAUDE_PROXY_IDLE_TIMEOUT", "0"),
            ("CLAUDE_PROXY_MAX_CONNECTIONS", "0"),
            ("CLAUDE_PROXY_LOG_FORMAT", "xml"),
        ] {
            let err = ProxyConfig::resolve(Cli::default(), &env(&[(var, value)])).unwrap_err();
            assert_eq!(err.field(), var);
        }
    }

    #[test]
    fn worker_threads_from_every_source_and_bad_counts_refused() {
        let cfg = ProxyConfig::resolve(Cli::default(), &env(&[])).unwrap();
        assert_eq!(cfg.worker_threads, None, "Tokio's default unless asked");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "worker_threads = 2\n").unwrap();
        let file = Cli {
            config: Some(path.clone()),
            ..Cli::default()
        };
        let cfg = ProxyConfig::resolve(file.clone(), &env(&[])).unwrap();
        assert_eq!(cfg.worker_threads, Some(2));
        // The environment over the file, the flag over both.
        let vars = env(&[("CLAUDE_PROXY_WORKER_THREADS", "3")]);
        let cfg = ProxyConfig::resolve(file.clone(), &vars).unwrap();
        assert_eq!(cfg.worker_threads, Some(3));
        let flag = Cli {
            worker_threads: Some(1),
            ..file
        };
        let cfg = ProxyConfig::resolve(flag, &vars).unwrap();
        assert_eq!(cfg.worker_threads, Some(1));
        for bad in ["0", "1025", "80000", "-1", "two", "1.5"] {
            let vars = env(&[("CLAUDE_PROXY_WORKER_THREADS", bad)]);
            let err = ProxyConfig::resolve(Cli::default(), &vars).unwrap_err();
            assert_eq!(err.field(), "CLAUDE_PROXY_WORKER_THREADS", "{bad}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        let err = ProxyConfig::resolve(
            Cli {
                worker_threads: Some(0),
                ..Cli::default()
            },
            &env(&[]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: --worker-threads: `0`: must be between 1 and 1024"
        );
        std::fs::write(&path, "worker_threads = 0\n").unwrap();
        let file = Cli {
            config: Some(path),
            ..Cli::default()
        };
        let err = ProxyConfig::resolve(file, &env(&[])).unwrap_err();
        assert_eq!(err.field(), "worker_threads (config file)");
        // Tokio's own variable: read here (Tokio would panic on a bad one), below ours.
        let cfg = ProxyConfig::resolve(Cli::default(), &env(&[("TOKIO_WORKER_THREADS", "2")]));
        assert_eq!(cfg.unwrap().worker_threads, Some(2));
        let vars = env(&[
            ("TOKIO_WORKER_THREADS", "2"),
            ("CLAUDE_PROXY_WORKER_THREADS", "3"),
        ]);
        assert_eq!(
            ProxyConfig::resolve(Cli::default(), &vars)
                .unwrap()
                .worker_threads,
            Some(3)
        );
        for bad in ["0", "two", ""] {
            let vars = env(&[("TOKIO_WORKER_THREADS", bad)]);
            let err = ProxyConfig::resolve(Cli::default(), &vars).unwrap_err();
            assert_eq!(err.field(), "TOKIO_WORKER_THREADS", "{bad:?}");
        }
    }

    #[test]
    fn cache_mode_from_flag_env_and_file_and_cache_false_is_off() {
        use crate::cache::CacheMode;
        let resolve = |cli: Cli, vars: &[(&str, &str)]| ProxyConfig::resolve(cli, &env(vars));
        let cfg = resolve(Cli::default(), &[]).unwrap();
        assert_eq!(
            (cfg.cache, cfg.cache_mode),
            (true, CacheMode::Deterministic)
        );
        let cfg = resolve(Cli::default(), &[("CLAUDE_PROXY_CACHE_MODE", "all")]).unwrap();
        assert_eq!(cfg.cache_mode, CacheMode::All);
        let flag = Cli {
            cache_mode: Some("Off".into()),
            ..Cli::default()
        };
        assert!(!resolve(flag, &[]).unwrap().cache);
        let off = Cli {
            cache: Some(false),
            cache_mode: Some("all".into()),
            ..Cli::default()
        };
        let cfg = resolve(off, &[]).unwrap();
        assert_eq!((cfg.cache, cfg.cache_mode), (false, CacheMode::Off));
        let bad = Cli {
            cache_mode: Some("sometimes".into()),
            ..Cli::default()
        };
        let err = resolve(bad, &[]).unwrap_err();
        assert!(err.to_string().contains("cache-mode"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "cache_mode = \"all\"\n").unwrap();
        let file = Cli {
            config: Some(path),
            ..Cli::default()
        };
        assert_eq!(resolve(file, &[]).unwrap().cache_mode, CacheMode::All);
    }

    #[test]
    fn tenants_file_from_every_source_replaces_client_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = dir.path().join("tenants.toml");
        std::fs::write(
            &tenants,
            "[[tenant]]\nname = \"web\"\ntokens = [\"tok-web\"]\n",
        )
        .unwrap();
        let path = tenants.to_str().unwrap();
        let by_env = ProxyConfig::resolve(
            Cli {
                listen: Some("0.0.0.0:8787".into()),
                ..Cli::default()
            },
            &env(&[("CLAUDE_PROXY_TENANTS_FILE", path)]),
        )
        .expect("a tenants file authenticates clients on a public address");
        assert_eq!(by_env.tenants.unwrap().tenants()[0].name(), "web");
        let toml = dir.path().join("p.toml");
        std::fs::write(&toml, format!("tenants_file = {path:?}\n")).unwrap();
        let by_file = Cli {
            config: Some(toml),
            ..Cli::default()
        };
        let cfg = ProxyConfig::resolve(by_file, &env(&[])).unwrap();
        assert_eq!(cfg.tenants_file.as_deref(), Some(tenants.as_path()));
        assert!(!format!("{cfg:?}").contains("tok-web"));

        let with_flag = Cli {
            tenants_file: Some(tenants.clone()),
            ..Cli::default()
        };
        let err = ProxyConfig::resolve(with_flag.clone(), &env(&[("CLAUDE_PROXY_TOKENS", "t")]))
            .unwrap_err();
        assert_eq!(err.field(), "client_tokens");
        let err = ProxyConfig::resolve(
            Cli {
                upstream: Some("http://127.0.0.1:9".into()),
                ..with_flag
            },
            &env(&[]),
        )
        .unwrap_err();
        assert_eq!(err.field(), "tenants_file", "{err}");

        std::fs::write(
            &tenants,
            "[[tenant]]\nname = \"web\"\ntokens = [\"t\"]\nweight = 0\n",
        )
        .unwrap();
        let err = ProxyConfig::resolve(
            Cli {
                tenants_file: Some(tenants),
                ..Cli::default()
            },
            &env(&[]),
        )
        .unwrap_err();
        assert_eq!(err.field(), "tenants_file");
        assert!(
            err.to_string()
                .contains(r#"tenant[0] "web": weight: must be at least 1"#),
            "{err}"
        );
    }

    #[test]
    fn spend_path_follows_the_cache_and_prices_file_is_merged() {
        let resolve = |cli: Cli, vars: &[(&str, &str)]| ProxyConfig::resolve(cli, &env(vars));
        let cfg = resolve(Cli::default(), &[]).unwrap();
        assert_eq!(
            cfg.spend_path.as_deref(),
            Some(Path::new(".tower-claude/spend.redb"))
        );
        let memory = Cli {
            cache_path: Some("memory".into()),
            ..Cli::default()
        };
        assert_eq!(resolve(memory.clone(), &[]).unwrap().spend_path, None);
        let cfg = resolve(
            memory,
            &[("CLAUDE_PROXY_SPEND_PATH", "/var/lib/p/spend.redb")],
        )
        .unwrap();
        assert_eq!(
            cfg.spend_path.as_deref(),
            Some(Path::new("/var/lib/p/spend.redb"))
        );
        let flag = Cli {
            spend_path: Some("memory".into()),
            ..Cli::default()
        };
        assert_eq!(resolve(flag, &[]).unwrap().spend_path, None);

        let dir = tempfile::tempdir().unwrap();
        let prices = dir.path().join("prices.toml");
        std::fs::write(&prices, "[models.claude-haiku-4-5]\ninput = 0.5\n").unwrap();
        let path = prices.to_str().unwrap();
        let cfg = resolve(Cli::default(), &[("CLAUDE_PROXY_PRICES_FILE", path)]).unwrap();
        assert_eq!(
            cfg.prices.price("claude-haiku-4-5").input(),
            crate::tenant::ModelPrice::usd(0.5, 1.0, 1.0, 1.0, 1.0).input()
        );
        std::fs::write(&prices, "[models.claude-haiku-4-5]\ninput = -1\n").unwrap();
        let err = resolve(Cli::default(), &[("CLAUDE_PROXY_PRICES_FILE", path)]).unwrap_err();
        assert_eq!(err.field(), "prices_file");
        assert!(
            err.to_string().contains("models.claude-haiku-4-5.input"),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("4h"), Some(Duration::from_secs(14400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("4 parsecs"), None);
    }
}
