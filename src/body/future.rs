use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Request;
use http::request::Parts;
use http_body_util::Limited;
use http_body_util::combinators::Collect;
use pin_project::pin_project;
use tower_service::Service;

use super::{BufferBodyError, RequestBody};
use crate::BoxError;

/// Response future of [`BufferBody`](super::BufferBody): collects the body, then calls the
/// inner service.
#[pin_project]
pub struct ResponseFuture<S, B>
where
    S: Service<Request<RequestBody>>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    #[pin]
    state: State<S, B>,
    limit: usize,
}

// The collecting state is the larger one; it is the state every request starts in, so
// boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = StateProj)]
enum State<S, B>
where
    S: Service<Request<RequestBody>>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    Collecting {
        inner: Option<S>,
        parts: Option<Parts>,
        #[pin]
        collect: Collect<Limited<B>>,
    },
    Calling {
        #[pin]
        fut: S::Future,
    },
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<RequestBody>>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(inner: S, parts: Parts, collect: Collect<Limited<B>>, limit: usize) -> Self {
        Self {
            state: State::Collecting {
                inner: Some(inner),
                parts: Some(parts),
                collect,
            },
            limit,
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody>>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Collecting {
                    inner,
                    parts,
                    collect,
                } => {
                    let collected = match ready!(collect.poll(cx)) {
                        Ok(collected) => collected,
                        Err(err) => {
                            return Poll::Ready(Err(BufferBodyError::from_body_error(
                                err,
                                *this.limit,
                            )
                            .into()));
                        }
                    };
                    let (Some(mut svc), Some(parts)) = (inner.take(), parts.take()) else {
                        // Only reachable if polled after completion.
                        return Poll::Ready(Err(BufferBodyError::polled_after_completion().into()));
                    };
                    let req = Request::from_parts(parts, RequestBody::from(collected.to_bytes()));
                    let fut = svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    return fut.poll(cx).map_err(Into::into);
                }
            }
        }
    }
}
