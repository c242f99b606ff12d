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
}

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
    /// Upstream API key held by the proxy [env: ANTHROPIC_API_KEY]
    #[arg(long, value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Several upstream keys, comma separated [env: ANTHROPIC_API_KEYS]
    #[arg(long, value_name = "KEYS")]
    pub api_keys: Option<String>,
    /// File with one upstream key per line (`#` comments) [env: CLAUDE_PROXY_KEYS_FILE]
    #[arg(long, value_name = "FILE")]
    pub keys_file: Option<PathBuf>,
    /// Tokens clients must present, comma separated [env: CLAUDE_PROXY_TOKENS]
    #[arg(long, value_name = "TOKENS")]
    pub client_tokens: Option<String>,
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
    /// Cache size bound in bytes [env: CLAUDE_PROXY_CACHE_MAX_BYTES] [default: 268435456]
    #[arg(long, value_name = "BYTES")]
    pub cache_max_bytes: Option<u64>,
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
    retry_strategy: Option<RetryStrategy>,
    max_retries: Option<u32>,
    deadline: Option<toml::Value>,
    fallback: Option<bool>,
    fallback_model: Option<String>,
    cache: Option<bool>,
    cache_mode: Option<String>,
    cache_ttl: Option<toml::Value>,
    cache_path: Option<String>,
    cache_max_bytes: Option<u64>,
    max_in_flight: Option<usize>,
    redis_url: Option<String>,
    expected_nodes: Option<u32>,
    metrics: Option<bool>,
    alert_webhook: Option<String>,
    alert_threshold: Option<f64>,
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
        let keys_file = cli
            .keys_file
            .clone()
            .or_else(|| {
                env.get("CLAUDE_PROXY_KEYS_FILE")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .or(file.keys_file.clone());
        if let Some(path) = keys_file {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new(
                    "--keys-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(Secret::new),
            );
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
            &cli.cache_max_bytes.map(|v| v.to_string()),
            "cache-max-bytes",
            "CLAUDE_PROXY_CACHE_MAX_BYTES",
            file.cache_max_bytes.map(|v| v.to_string()),
            "cache_max_bytes",
        ) {
            Some(s) => parse_num::<u64>(&s)?,
            None => 256 * 1024 * 1024,
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
        if !listen.ip().is_loopback() && client_tokens.is_empty() {
            return Err(ConfigError::new(
                "listen",
                format!(
                    "{listen} is not a loopback address: set client tokens (--client-tokens / \
                     CLAUDE_PROXY_TOKENS) so that only your clients can use the proxy"
                ),
            ));
        }
        if !client_tokens.is_empty()
            && api_keys.is_empty()
            && !matches!(upstream, Upstream::Mock(_))
        {
            return Err(ConfigError::new(
                "client_tokens",
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
            max_in_flight,
            limits: file.limits,
            body_limit: crate::body::ANTHROPIC_MAX_BODY,
            redis_url,
            expected_nodes,
            metrics,
            alert_webhook,
            alert_threshold,
        })
    }
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
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("4h"), Some(Duration::from_secs(14400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("4 parsecs"), None);
    }
}
