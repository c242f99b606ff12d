//! `claude-proxy`: a local proxy that keeps any Claude SDK working through rate limits.
//!
//! Run `claude-proxy --help` for every option; see `docs/configuration.md`.

use clap::Parser;
use tower_claude::proxy::{Cli, Proxy, ProxyConfig, Upstream};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "claude_proxy=info,tower_claude=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    let config = match ProxyConfig::load(cli) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("claude-proxy: {err}");
            std::process::exit(2);
        }
    };
    let listen = config.listen;
    let upstream = match &config.upstream {
        Upstream::Url(uri) => uri.to_string(),
        Upstream::Mock(m) => format!(
            "built-in simulator (rpm {}, itpm {}, otpm {} per key and model group)",
            m.rpm, m.itpm, m.otpm
        ),
    };
    let proxy = match Proxy::connect(config).await {
        Ok(proxy) => proxy,
        Err(err) => {
            eprintln!("claude-proxy: {err}");
            std::process::exit(2);
        }
    };
    // SIGHUP re-reads the keys file and puts removed keys back into rotation.
    let _reload = proxy.reload_keys_on_sighup();
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(err) => {
            eprintln!("claude-proxy: cannot listen on {listen}: {err}");
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().unwrap_or(listen);
    eprintln!("claude-proxy listening on http://{addr}  ->  {upstream}");
    eprintln!("  point your SDK at it: ANTHROPIC_BASE_URL=http://{addr}");
    if let Err(err) = proxy.serve(listener, shutdown_signal()).await {
        eprintln!("claude-proxy: {err}");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
