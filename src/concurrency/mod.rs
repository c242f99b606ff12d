//! Concurrency caps for Messages API requests: [`ConcurrencyLayer`].
//!
//! A request takes a permit before it is sent and keeps it until its response body ends or
//! is dropped: a permit released when the headers arrive would not limit streams. The cap is
//! shared by every clone, fixed or adaptive ([`Aimd`]: shrink on 429 / 529 and on a stream
//! that fails mid-way with `event: error`, grow back slowly on success), optionally with a [`RampUp`] limiting how fast it grows. The cap is a
//! [`tokio::sync::Semaphore`]; shrinking forgets free permits and retires held ones as they
//! come back.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_claude::body::RequestBody;
//! use tower_claude::concurrency::ConcurrencyLayer;
//! use tower_claude::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = ConcurrencyLayer::new(4);
//! let handle = layer.handle();
//! let client = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(tower::service_fn(|_req: http::Request<RequestBody>| async {
//!         Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
//!     }));
//!
//! let request = http::Request::post("/v1/messages").body(RequestBody::from("{}"))?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(handle.in_flight(), 1); // the body is not read yet
//! let _ = response.into_body().collect().await?;
//! assert_eq!(handle.in_flight(), 0);
//! # Ok(())
//! # }
//! ```

mod body;
mod future;
mod layer;
mod limiter;
mod service;

pub use body::ConcurrencyBody;
pub use future::ResponseFuture;
pub use layer::ConcurrencyLayer;
pub use limiter::{Aimd, ConcurrencyHandle, RampUp};
pub use service::Concurrency;
