//! `claude-proxy`: a local proxy that keeps any Claude SDK working through rate limits.
//!
//! Run `claude-proxy --help` for every option; see `docs/configuration.md`.

use clap::Parser;
use tower_claude::proxy::{Cli, Proxy, ProxyConfig, Upstream, init_logging};

// mimalloc instead of the system allocator: a request allocates and frees a few hundred small
// blocks (header maps, bodies, futures); glibc's malloc spent ~34k instructions of ~200k per
// request on them (callgrind, docs/benchmarks.md). The library sets no allocator: that choice
// belongs to the binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    // Secrets given as flags are readable by every local user through `ps`.
    let secret_flags: Vec<&str> = [
        ("--api-key", cli.api_key.is_some()),
        ("--api-keys", cli.api_keys.is_some()),
        ("--client-tokens", cli.client_tokens.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect();
    let config = match ProxyConfig::load(cli) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("claude-proxy: {err}");
            std::process::exit(2);
        }
    };
    if let Err(err) = init_logging(config.log_format) {
        eprintln!("claude-proxy: cannot start the log: {err}");
    }
    for flag in secret_flags {
        tracing::warn!(
            flag,
            "a secret was given on the command line, where any local user can read it (`ps`): \
             use ANTHROPIC_API_KEY / ANTHROPIC_API_KEYS / CLAUDE_PROXY_TOKENS or --keys-file"
        );
    }
    // What `#[tokio::main]` built (a multi-threaded runtime, every driver on), with the worker
    // count of `--worker-threads` when it is given (else one per core, as Tokio counts them:
    // `TOKIO_WORKER_THREADS` is read into the option). One thread is Tokio's current-thread
    // scheduler, as an nginx worker is one event loop: the multi-threaded scheduler with one
    // worker also keeps `block_on`'s thread (the accept loop) apart from the worker, and pays
    // for cross-thread wake-ups that one thread never needs (at 32 connections 0.65× → 0.81×
    // nginx's throughput in the same rounds: docs/benchmarks.md, "One thread, one scheduler").
    // Blocking work (the disk cache's writes, spend files) still runs on Tokio's blocking pool.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let current_thread = config.worker_threads.unwrap_or(cores) == 1;
    let mut builder = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all();
    if let Some(n) = config.worker_threads.filter(|_| !current_thread) {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("claude-proxy: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    let worker_threads = runtime.metrics().num_workers();
    let scheduler = if current_thread {
        "current-thread"
    } else {
        "multi-thread"
    };
    match config.worker_threads {
        Some(_) => tracing::info!(
            worker_threads,
            scheduler,
            cores,
            "worker threads: as configured"
        ),
        None => tracing::info!(
            worker_threads,
            scheduler,
            cores,
            "worker threads: Tokio's default (one per core); --worker-threads sets them"
        ),
    }
    runtime.block_on(serve(config));
}

/// Connects the proxy's stack and serves until Ctrl-C or SIGTERM.
async fn serve(config: ProxyConfig) {
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
    // SIGHUP re-reads the keys file (putting removed keys back into rotation) and the
    // tenants file.
    let _reload = proxy.reload_on_sighup();
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
