//! The `claude-proxy` server, as a library so that tests and other binaries can embed it.
//!
//! Any Anthropic SDK, in any language, gets the protection of this crate by pointing its base
//! URL at the proxy. The proxy is [`ClaudeStack`](crate::stack::ClaudeStack) behind a hyper
//! server, plus authentication, a health check, a status page and Prometheus metrics.
//!
//! ```no_run
//! use tower_claude::proxy::{Cli, Proxy, ProxyConfig};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_claude::BoxError> {
//! let config = ProxyConfig::load(Cli::default())?; // simulator upstream when no key is set
//! let proxy = Proxy::new(config)?;
//! let listener = tokio::net::TcpListener::bind(proxy.config().listen).await?;
//! proxy.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

mod config;
mod conn;
mod edge;
mod error_response;
mod front;
mod logging;
mod server;
mod tenants;

pub use config::{
    Cli, ConfigError, GroupLimits, MockSettings, ProxyConfig, RetryStrategy, Secret, Upstream,
    parse_duration, parse_size,
};
pub use error_response::error_response;
pub use logging::{DEFAULT_LOG_FILTER, LogFormat, init_logging, log_colour};
pub use server::{KeysReload, Proxy, Reload};
pub use tenants::{TenantTable, TenantsError, TenantsErrorKind, TenantsReload};
