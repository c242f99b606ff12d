//! ConcurrencyLayer: permits held until the body ends, shared caps, AIMD and ramp-up.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::body::RequestBody;
use tower_claude::concurrency::{Aimd, ConcurrencyLayer, RampUp};

/// A streaming body fed by a channel: ends when the sender is dropped.
struct ChanBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

type Senders = Arc<std::sync::Mutex<Vec<mpsc::UnboundedSender<Bytes>>>>;

fn messages() -> Request<RequestBody> {
    Request::post("/v1/messages")
        .body(RequestBody::from(
            r#"{"model":"claude-haiku-4-5","max_tokens":1}"#,
        ))
        .unwrap()
}

/// An upstream whose responses stream until the test drops the matching sender.
fn streaming_upstream(
    senders: Senders,
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<ChanBody>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<ChanBody>, BoxError>> + Send,
> + Clone
+ Send {
    tower::service_fn(move |_req: Request<RequestBody>| {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Bytes::from_static(b"event: message_start\n\n"))
            .unwrap();
        senders.lock().unwrap().push(tx);
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(Response::new(ChanBody(rx))) }
    })
}

#[tokio::test(start_paused = true)]
async fn permit_is_held_until_the_stream_ends() {
    let senders = Senders::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = ConcurrencyLayer::new(2);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(streaming_upstream(senders.clone(), calls.clone()));

    let r1 = svc.clone().oneshot(messages()).await.unwrap();
    let r2 = svc.clone().oneshot(messages()).await.unwrap();
    assert_eq!(handle.in_flight(), 2);
    // The headers of both arrived, but their streams are open: a third request waits.
    let third = tokio::spawn(svc.clone().oneshot(messages()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(!third.is_finished());

    // End stream 1 (sender dropped, body read to its end): the third request goes.
    senders.lock().unwrap().remove(0);
    let body = r1.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"event: message_start\n\n");
    let r3 = third.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Dropping a body early releases its permit too.
    assert!(r3.body().holds_permit());
    drop(r3);
    drop(r2);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn other_requests_pass_through_without_a_permit() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = ConcurrencyLayer::new(1);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(streaming_upstream(Senders::default(), calls));
    let _held = svc.clone().oneshot(messages()).await.unwrap();
    let count = Request::post("/v1/messages/count_tokens")
        .body(RequestBody::from("{}"))
        .unwrap();
    let resp = svc.clone().oneshot(count).await.unwrap();
    assert!(!resp.body().holds_permit());
    assert_eq!(handle.in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaks_no_permit() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = ConcurrencyLayer::new(1);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(streaming_upstream(Senders::default(), calls.clone()));
    let held = svc.clone().oneshot(messages()).await.unwrap();
    let waiting =
        tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(messages())).await;
    assert!(waiting.is_err());
    drop(held);
    assert_eq!(handle.in_flight(), 0);
    let again = svc.clone().oneshot(messages()).await.unwrap();
    assert_eq!(handle.in_flight(), 1);
    drop(again);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// An upstream answering with the status the test sets (JSON body, ends at once).
fn status_upstream(
    status: Arc<AtomicU16>,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<http_body_util::Full<Bytes>>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<http_body_util::Full<Bytes>>, BoxError>>
             + Send,
> + Clone
+ Send {
    tower::service_fn(move |_req: Request<RequestBody>| {
        let code = status.load(Ordering::SeqCst);
        async move {
            let mut resp = Response::new(http_body_util::Full::new(Bytes::from_static(b"{}")));
            *resp.status_mut() = StatusCode::from_u16(code).unwrap();
            Ok::<_, BoxError>(resp)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn aimd_shrinks_on_429_and_529_and_grows_back_slowly() {
    let status = Arc::new(AtomicU16::new(200));
    let layer = ConcurrencyLayer::adaptive(Aimd {
        initial: 16,
        min: 2,
        max: 20,
        decrease: 0.5,
        cooldown: Duration::from_secs(1),
    });
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(status_upstream(status.clone()));
    assert_eq!(handle.limit(), 16);

    status.store(429, Ordering::SeqCst);
    drop(svc.ready().await.unwrap().call(messages()).await.unwrap());
    assert_eq!(handle.limit(), 8);
    // Within the cooldown, a burst of refusals shrinks once.
    drop(svc.ready().await.unwrap().call(messages()).await.unwrap());
    assert_eq!(handle.limit(), 8);
    tokio::time::advance(Duration::from_secs(2)).await;
    status.store(529, Ordering::SeqCst);
    for _ in 0..3 {
        drop(svc.ready().await.unwrap().call(messages()).await.unwrap());
        tokio::time::advance(Duration::from_secs(2)).await;
    }
    assert_eq!(handle.limit(), 2, "floor");

    // Additive increase: +1 per `cap` successes.
    status.store(200, Ordering::SeqCst);
    for _ in 0..2 {
        drop(svc.ready().await.unwrap().call(messages()).await.unwrap());
    }
    assert_eq!(handle.limit(), 3);
    for _ in 0..3 {
        drop(svc.ready().await.unwrap().call(messages()).await.unwrap());
    }
    assert_eq!(handle.limit(), 4);
    for _ in 0..1_000 {
        drop(svc.ready().await.unwrap().call(messages()).await.unwrap());
    }
    assert_eq!(handle.limit(), 20, "ceiling");
    // Other errors do not move the cap.
    status.store(400, Ordering::SeqCst);
    drop(svc.ready().await.unwrap().call(messages()).await.unwrap());
    assert_eq!(handle.limit(), 20);
}

#[tokio::test(start_paused = true)]
async fn shrinking_retires_held_permits_as_they_return() {
    let senders = Senders::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = ConcurrencyLayer::adaptive(Aimd {
        initial: 4,
        min: 1,
        max: 4,
        decrease: 0.5,
        cooldown: Duration::ZERO,
    });
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(streaming_upstream(senders.clone(), calls.clone()));
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(svc.clone().oneshot(messages()).await.unwrap());
    }
    assert_eq!(handle.in_flight(), 4);
    // A 429 through another service of the same layer shrinks the shared cap to 2.
    let status = Arc::new(AtomicU16::new(429));
    let other = ServiceBuilder::new()
        .layer(layer)
        .service(status_upstream(status));
    let waiter = tokio::spawn(other.clone().oneshot(messages()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!waiter.is_finished());
    // Let one stream end so the 429 request can get a permit.
    held.pop();
    let refused = waiter.await.unwrap().unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(refused);
    assert_eq!(handle.limit(), 2);
    assert_eq!(handle.in_flight(), 3);
    // Requests wait until in-flight drops below the new cap.
    let next = tokio::spawn(svc.clone().oneshot(messages()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!next.is_finished());
    held.pop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !next.is_finished(),
        "admitted while 2 were in flight with a cap of 2"
    );
    held.pop();
    let r = next.await.unwrap().unwrap();
    assert_eq!(handle.in_flight(), 2);
    drop(r);
    drop(held);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn ramp_up_limits_how_fast_the_cap_grows() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = ConcurrencyLayer::new(10).ramp_up(RampUp {
        initial: 2,
        step: 2,
        interval: Duration::from_secs(10),
    });
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(streaming_upstream(Senders::default(), calls.clone()));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(svc.clone().oneshot(messages())));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(handle.limit(), 4);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    assert_eq!(handle.limit(), 10);
}

/// An adaptive cap around the simulator: a stream that fails mid-way with `event: error`
/// (`overloaded_error`, after HTTP 200) shrinks the cap as a 529 would; a complete stream
/// does not.
#[cfg(feature = "testing")]
#[tokio::test(start_paused = true)]
async fn aimd_shrinks_on_a_mid_stream_overloaded_error() {
    use tower_claude::testing::{Fault, MockClaude};
    let mock = MockClaude::builder().build();
    let layer = ConcurrencyLayer::adaptive(Aimd {
        initial: 16,
        min: 2,
        max: 20,
        decrease: 0.5,
        cooldown: Duration::from_secs(1),
    });
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service(mock.clone());
    let stream = || {
        Request::post("/v1/messages")
            .header("x-api-key", "sk-ant-aimd")
            .header("anthropic-version", "2023-06-01")
            .body(RequestBody::from(
                r#"{"model":"claude-haiku-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            ))
            .unwrap()
    };
    let res = svc.ready().await.unwrap().call(stream()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    assert_eq!(handle.limit(), 16, "a complete stream is a success");
    mock.push_fault(Fault::MidStreamError);
    let res = svc.ready().await.unwrap().call(stream()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "the head said 200");
    assert_eq!(
        handle.limit(),
        16,
        "nothing is known before the error event"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("overloaded_error"));
    assert_eq!(handle.limit(), 8);
}
