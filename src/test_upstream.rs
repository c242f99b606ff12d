//! A test upstream shared by the unit tests of several layers (compiled for tests only).

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower_service::Service;

use crate::BoxError;
use crate::body::RequestBody;

/// A service that answers every request at once with a small JSON message (3 input tokens,
/// 1 output token) and no header.
pub(crate) fn message_upstream()
-> impl Service<Request<RequestBody>, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send>
+ Copy
+ Send
+ Sync
+ 'static {
    tower::service_fn(|_req: Request<RequestBody>| async {
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
            br#"{"type":"message","usage":{"input_tokens":3,"output_tokens":1}}"#,
        ))))
    })
}
