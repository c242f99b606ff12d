//! A `claude-proxy` served on a free loopback port for the integration tests, stopped
//! gracefully by [`Running::stop`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_claude::proxy::{Cli, Proxy, ProxyConfig};

/// A proxy serving on `addr` until [`stop`](Self::stop).
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Shuts the proxy down and waits (at most 30 s) until in-flight requests ended.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("proxy stops")
            .expect("proxy task")
            .expect("proxy serve");
    }
}

/// The configuration from flags and an explicit environment (no `.env`, no process env).
pub fn config(cli: Cli, env: &[(&str, &str)]) -> ProxyConfig {
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ProxyConfig::resolve(cli, &env).expect("config")
}

/// Serves `proxy` on a free loopback port.
pub async fn serve(proxy: Proxy) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(listener, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

/// A proxy from flags and environment, served on a free loopback port.
pub async fn start(cli: Cli, env: &[(&str, &str)]) -> Running {
    serve(Proxy::new(config(cli, env)).expect("proxy")).await
}

/// Sends SIGHUP to this test process (the proxy's reload handler, if installed, runs a moment
/// later, on its own task).
pub fn sighup() {
    let pid = std::process::id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
}
