//! The simulator as a hyper HTTP/1.1 server.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower_service::Service;

use super::MockClaude;

impl MockClaude {
    /// Serves this simulator (sharing its state: stats and faults stay visible through `self`)
    /// over HTTP/1.1 on `listener`, one task per connection. Response bodies are written as they
    /// are produced, so streams arrive event by event.
    ///
    /// The future runs until accepting fails with an error other than a connection aborted or
    /// reset before it was accepted.
    ///
    /// ```no_run
    /// use tower_claude::testing::MockClaude;
    ///
    /// # #[tokio::main]
    /// # async fn main() -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// println!("ANTHROPIC_BASE_URL=http://{}", listener.local_addr()?);
    /// MockClaude::builder().build().serve(listener).await
    /// # }
    /// ```
    pub fn serve(
        &self,
        listener: TcpListener,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static {
        let mock = self.clone();
        async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _peer)) => stream,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionAborted
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let _ = stream.set_nodelay(true);
                let mock = mock.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let mut mock = mock.clone();
                        mock.call(req)
                    });
                    if let Err(e) = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(error = %e, "mock connection ended with an error");
                    }
                });
            }
        }
    }

    /// Binds `127.0.0.1:0`, spawns [`serve`](Self::serve) on the current runtime, and returns
    /// the bound address and the server task (abort it to stop accepting).
    ///
    /// ```
    /// use tower_claude::testing::MockClaude;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let mock = MockClaude::builder().build();
    /// let (addr, server) = mock.serve_on_loopback().await?;
    /// assert!(addr.ip().is_loopback());
    /// server.abort();
    /// # Ok(())
    /// # }
    /// ```
    pub async fn serve_on_loopback(&self) -> io::Result<(SocketAddr, JoinHandle<io::Result<()>>)> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        Ok((addr, tokio::spawn(self.serve(listener))))
    }
}
