//! [`ending`]: whether a frame just polled from a body ended it, the one rule every body
//! wrapper that acts at the end (settle a reservation, release a permit, count a request,
//! end a usage tracker) follows.

use http_body::{Body, Frame};

/// How a polled frame leaves the body it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// More may follow.
    Open,
    /// The body reached its end.
    Ended,
    /// The body's read failed.
    Failed,
}

/// How `frame`, just polled from `body`, leaves it. hyper stops polling a body once its
/// `is_end_stream()` is true (a body of known length that has yielded it all), so the last data
/// frame of such a body is its end, not only a `None` that may never be polled.
#[inline]
pub(crate) fn ending<B: Body + ?Sized>(
    frame: &Option<Result<Frame<B::Data>, B::Error>>,
    body: &B,
) -> Ending {
    match frame {
        Some(Ok(_)) if !body.is_end_stream() => Ending::Open,
        Some(Ok(_)) | None => Ending::Ended,
        Some(Err(_)) => Ending::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn a_body_of_known_length_ends_with_its_last_frame() {
        let mut full = Full::new(Bytes::from_static(b"abc"));
        let frame = full.frame().await;
        assert_eq!(ending(&frame, &full), Ending::Ended);
        let frame = full.frame().await;
        assert_eq!(ending(&frame, &full), Ending::Ended);

        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err(std::io::Error::other("cut")),
        ];
        let mut stream = StreamBody::new(futures_util::stream::iter(chunks));
        let frame = stream.frame().await;
        assert_eq!(ending(&frame, &stream), Ending::Open);
        let frame = stream.frame().await;
        assert_eq!(ending(&frame, &stream), Ending::Failed);
    }
}
