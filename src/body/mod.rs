//! Buffered, cheaply cloneable request bodies, the layer that produces them, and the one
//! response body that replays what a layer read ahead ([`Replay`]).
//!
//! Retry and fallback replay requests, and the cache hashes them, so every layer of this crate
//! works on [`RequestBody`]: a complete request body held in [`Bytes`](bytes::Bytes). Cloning it
//! is a reference-count increment. [`BufferBodyLayer`] turns any streaming body (such as hyper's
//! `Incoming`) into it, refusing bodies over a size limit (Anthropic's is 32 MB).
//!
//! On the way back, a layer that must look into an answer before returning it reads it with
//! [`Replay::peek`] (bounded) and returns the [`Replay`] body: every layer that looks ahead
//! uses this one body. An error answer's envelope is read once, by the innermost layer that
//! needs it, and published as the [`ErrorAnswer`] response extension for the others.
//!
//! ```
//! use http::Request;
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_claude::body::{BufferBodyLayer, RequestBody};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_claude::BoxError> {
//! let svc = ServiceBuilder::new()
//!     .layer(BufferBodyLayer::new(32 * 1024 * 1024))
//!     .service(service_fn(|req: Request<RequestBody>| async move {
//!         Ok::<_, tower_claude::BoxError>(req.body().len())
//!     }));
//! let req = Request::new(Full::new(Bytes::from_static(b"{\"model\":\"x\"}")));
//! assert_eq!(svc.oneshot(req).await?, 13);
//! # Ok(())
//! # }
//! ```

mod ending;
mod error;
mod error_answer;
mod future;
mod layer;
mod replay;
mod request_body;
mod service;
mod template;
mod tracked;

pub(crate) use ending::{Ending, ending};
pub use error::{BufferBodyError, BufferBodyErrorKind};
pub use error_answer::ErrorAnswer;
pub(crate) use error_answer::{ReadErrorAnswer, read_error_answer};
pub use future::ResponseFuture;
pub use layer::BufferBodyLayer;
pub(crate) use replay::is_event_stream;
pub use replay::{Peek, Peeked, Replay};
pub use request_body::RequestBody;
pub use service::BufferBody;
pub(crate) use template::RequestTemplate;
pub(crate) use tracked::{MAX_JSON_COPY, Tracked, track, tracker_in};

/// The largest request body the Anthropic API accepts for the Messages API: 32 MB.
pub const ANTHROPIC_MAX_BODY: usize = 32 * 1024 * 1024;
