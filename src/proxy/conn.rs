//! Client connections at the proxy's edge: a header-read timeout, an idle timeout and a cap on
//! open connections, so that slow or idle clients cannot exhaust file descriptors.
//!
//! Written here because neither hyper nor tower-http does it: tower-http's layers see requests,
//! never connections (a client that sends no complete request head never reaches them), and
//! hyper has a header-read timeout for HTTP/1 only, which does not start before hyper-util's
//! auto builder has sniffed the protocol (a client that sends nothing is never timed out),
//! doubles as the keep-alive timeout, and has no counterpart for idle HTTP/2 connections. hyper
//! caps nothing. So every connection runs under a small watchdog:
//!
//! - a connection is *busy* from the moment hyper hands a request to the service until that
//!   response's body is finished or dropped (streams included);
//! - a connection that has not been busy yet must become busy within the header-read timeout;
//!   one that is not busy must become busy again within the idle timeout; otherwise it is shut
//!   down gracefully and, as nothing is in progress, closed;
//! - at the cap the accept loop stops, asks the oldest connection that is not busy to close,
//!   and accepts again when a slot is free: new clients (a `/healthz` probe) wait at most for
//!   one eviction instead of for the slowest client.
//!
//! One sweeper task per server checks every connection's deadline a few times per timeout and
//! raises a flag (and wakes the connection's task); the connection's own future only looks at
//! that flag when it is polled anyway. So a request costs one `Arc` clone and a few atomic
//! operations, with no timer or channel per connection (a `select!` over a timer, a `Notify`
//! and a `watch` per connection cost ~4 µs per request in `wrk`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project::pin_project;
use tokio::time::Instant;
use tower::ServiceExt;
use tower::util::Oneshot;

use crate::BoxError;

/// The limits a connection lives under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

/// What the watchdog of one connection knows about it, shared with the requests it serves.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Requests in progress (service called, response body not finished).
    busy: AtomicU32,
    /// Whether a request was ever served (the header-read timeout then no longer applies).
    served: AtomicBool,
    /// When the connection last became not busy, in ms since `epoch`.
    idle_since_ms: AtomicU64,
    /// Why it must close (`Close as u8`), 0 while it may stay open.
    close: AtomicU8,
    /// The waker the connection is polled with, and through it the task driving the
    /// connection, woken when `close` is set: one registration of the task's waker per poll
    /// serves both (a separate `AtomicWaker` here cost a second one). Its own allocation, not
    /// a part of this one: the wakers hyper and Tokio keep may outlive the connection, and
    /// the registry counts a connection open while its `Activity` lives.
    in_place: Arc<InPlace>,
    epoch: Instant,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        Self {
            busy: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(ms_since(epoch)),
            close: AtomicU8::new(0),
            in_place: Arc::new(InPlace::default()),
            epoch,
        }
    }

    /// Asks the connection to close; `false` when it was already asked.
    fn request_close(&self, reason: Close) -> bool {
        let asked = self
            .close
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if asked {
            self.in_place.task.wake();
        }
        asked
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }

    /// When the connection must have become busy (again), or `None` while it is busy.
    fn deadline(&self, limits: ConnLimits) -> Option<Instant> {
        if self.is_busy() {
            return None;
        }
        let since = self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(
            since
                + if self.served.load(Ordering::Acquire) {
                    limits.idle_timeout
                } else {
                    limits.header_read_timeout
                },
        )
    }
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Marks its connection busy while alive.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        // Written once per connection, not once per request: true stays true.
        if !activity.served.load(Ordering::Acquire) {
            activity.served.store(true, Ordering::Release);
        }
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Record the time before the count drops, so the watchdog never sees a stale time.
        self.0
            .idle_since_ms
            .store(ms_since(self.0.epoch), Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        if self.0.close.load(Ordering::Acquire) != 0 {
            // A closing connection waits for this: let it look again.
            self.0.in_place.task.wake();
        }
    }
}

/// The open connections, oldest first, for eviction at the cap.
#[derive(Debug)]
pub(crate) struct Registry {
    conns: Mutex<VecDeque<Weak<Activity>>>,
    cap: usize,
    epoch: Instant,
}

impl Registry {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            conns: Mutex::new(VecDeque::new()),
            cap,
            epoch: Instant::now(),
        }
    }

    /// Registers a new connection.
    pub(crate) fn open(&self) -> Arc<Activity> {
        let activity = Arc::new(Activity::new(self.epoch));
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.push_back(Arc::downgrade(&activity));
        // Closed connections leave dead entries: the sweeper removes them, and so does this
        // when they pile up between two sweeps.
        if conns.len() > 2 * self.cap + 64 {
            conns.retain(|w| w.strong_count() > 0);
        }
        activity
    }

    /// Asks every connection past its header-read or idle deadline to close, and forgets the
    /// closed ones.
    pub(crate) fn sweep(&self, limits: ConnLimits) {
        let now = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|weak| {
            let Some(activity) = weak.upgrade() else {
                return false;
            };
            if activity.deadline(limits).is_some_and(|d| d <= now) {
                activity.request_close(Close::Timeout);
            }
            true
        });
    }

    /// Asks every connection to close (server shutdown): busy ones finish what is in progress.
    pub(crate) fn close_all(&self) {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for activity in conns.iter().filter_map(Weak::upgrade) {
            activity.request_close(Close::Shutdown);
        }
    }

    /// How often [`sweep`](Self::sweep) should run: five times per shortest timeout, between
    /// 10 ms and 1 s.
    pub(crate) fn sweep_every(limits: ConnLimits) -> Duration {
        (limits.header_read_timeout.min(limits.idle_timeout) / 5)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Asks the oldest connection that is not busy to close. `false` when every open
    /// connection is busy.
    pub(crate) fn evict_one(&self) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        while conns.front().is_some_and(|w| w.strong_count() == 0) {
            conns.pop_front();
        }
        for weak in conns.iter() {
            let Some(activity) = weak.upgrade() else {
                continue;
            };
            if !activity.is_busy() && activity.request_close(Close::Evicted) {
                return true;
            }
        }
        false
    }
}

/// A connection the watchdog can ask to finish gracefully.
pub(crate) trait GracefulConnection: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulConnection
    for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: 'static,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown(self)
    }
}

/// Why a connection was closed by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Close {
    Timeout = 1,
    Evicted = 2,
    Shutdown = 3,
}

impl Close {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "timeout",
            2 => "evicted at the connection cap",
            _ => "shutdown",
        }
    }
}

/// A connection under the watch of its [`Activity`]: when asked to close it shuts down
/// gracefully (a busy connection first finishes what is in progress) and, once nothing is in
/// progress, ends (which closes the socket) even if hyper would still wait for a request head.
///
/// It also polls the connection again in place when the connection wakes itself while being
/// polled ([`InPlace`]).
#[pin_project]
pub(crate) struct Watched<C> {
    #[pin]
    conn: C,
    activity: Arc<Activity>,
    closing: bool,
    in_place: Arc<InPlace>,
    /// `in_place` as a waker, made once per connection.
    waker: Waker,
}

impl<C> Watched<C> {
    pub(crate) fn new(conn: C, activity: Arc<Activity>) -> Self {
        let in_place = activity.in_place.clone();
        Self {
            conn,
            activity,
            closing: false,
            waker: Waker::from(in_place.clone()),
            in_place,
        }
    }
}

/// How many times in a row [`Watched`] polls a connection again in place before it lets the
/// scheduler run other tasks first.
const IN_PLACE_POLLS: usize = 8;

/// The waker a connection is polled with, so that a wake-up it gives itself while being
/// polled becomes one more poll in place instead of a trip through the scheduler.
///
/// Why: hyper hands a request body to the service through a channel whose sender is the
/// connection's own task, and the proxy reads the body in that task; taking a chunk wakes the
/// sender, so each request wakes its own task while the task runs. Tokio's multi-threaded
/// scheduler treats such a wake-up as a yield: the task goes to the back of the run queue and
/// another worker thread is unparked to steal it (a `futex` wake, and a parked thread woken
/// and parked again, about once per request; `docs/benchmarks.md`, "A wake-up per request
/// (issue 14)"). Polling again at once is what the scheduler would do with no other task to run,
/// without the hand-off. Neither hyper nor Tokio offers this (hyper's own loop yields through
/// the waker too), so it is written here, on `std::task::Wake`, without `unsafe`.
#[derive(Debug, Default)]
struct InPlace {
    /// [`POLLING`] while the connection is being polled; [`WOKEN`] once it woke itself then.
    state: AtomicU8,
    /// The task's waker, for wake-ups from elsewhere (I/O, timers, other tasks) and the
    /// watchdog's ([`Activity`]: a close asked, a request ended while closing).
    task: AtomicWaker,
}

const POLLING: u8 = 1;
const WOKEN: u8 = 2;

impl Wake for InPlace {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            if state & POLLING == 0 {
                self.task.wake();
                return;
            }
            match self.state.compare_exchange_weak(
                state,
                state | WOKEN,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => state = now,
            }
        }
    }
}

impl<C, E> Future for Watched<C>
where
    C: GracefulConnection<Output = Result<(), E>>,
{
    type Output = Result<(), E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The one registration: the watchdog's wake-ups and those from elsewhere reach the
        // task through it.
        this.in_place.task.register(cx.waker());
        let reason = this.activity.close.load(Ordering::Acquire);
        if reason != 0 && !*this.closing {
            *this.closing = true;
            start_closing(reason, this.activity, this.conn.as_mut());
        }
        let mut inner = Context::from_waker(this.waker);
        let mut polls = 0;
        let polled = loop {
            this.in_place.state.store(POLLING, Ordering::Release);
            let polled = this.conn.as_mut().poll(&mut inner);
            // Whatever wakes it from now on goes to the task's waker.
            let woken = this.in_place.state.swap(0, Ordering::AcqRel) & WOKEN != 0;
            polls += 1;
            match polled {
                Poll::Pending if woken && polls < IN_PLACE_POLLS => continue,
                Poll::Pending if woken => {
                    // Still waking itself: other tasks go first, as with a yield.
                    cx.waker().wake_by_ref();
                    break Poll::Pending;
                }
                other => break other,
            }
        };
        match polled {
            Poll::Pending if *this.closing && !this.activity.is_busy() => {
                // An idle HTTP/1 connection is closed by hyper itself; one with a partial
                // request head, or still sniffing its protocol, is not.
                tracing::debug!("closing a connection with no request in progress");
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// Asks a connection to close (once per connection, at shut-down or eviction): out of line,
/// so that the poll of every request stays short.
#[cold]
#[inline(never)]
fn start_closing<C: GracefulConnection>(reason: u8, activity: &Activity, conn: Pin<&mut C>) {
    tracing::debug!(
        reason = Close::name(reason),
        busy = activity.is_busy(),
        "shutting a connection down"
    );
    conn.graceful_shutdown();
}

/// The per-connection hyper service: calls the proxy's tower stack and keeps the connection
/// busy until the response body is done.
///
/// hyper calls a service through `&self`, tower through `&mut self`: the stack sits in a
/// `RefCell` (hyper calls one connection's service from that connection's task, one call at a
/// time) and is called in place once its `poll_ready` says it is ready, which the proxy's edge
/// stack always is. Cloning it for every request instead (`Oneshot` on a clone) cost the clone
/// and drop of each layer's state, `Arc`s included, and carried the stack and the request in
/// the response future. A stack that is not ready at once is cloned and driven as before.
pub(crate) struct ConnService<S> {
    pub(crate) stack: RefCell<S>,
    pub(crate) activity: Arc<Activity>,
}

impl<S> ConnService<S> {
    /// The service of one connection, with its own `stack`.
    pub(crate) fn new(stack: S, activity: Arc<Activity>) -> Self {
        Self {
            stack: RefCell::new(stack),
            activity,
        }
    }
}

impl<S: Clone> Clone for ConnService<S> {
    fn clone(&self) -> Self {
        Self {
            stack: self.stack.clone(),
            activity: self.activity.clone(),
        }
    }
}

impl<S, B, R> hyper::service::Service<Request<R>> for ConnService<S>
where
    S: tower::Service<Request<R>, Response = Response<B>> + Clone,
{
    type Response = Response<BusyBody<B>>;
    type Error = S::Error;
    type Future = ConnFuture<S, B, R>;

    fn call(&self, req: Request<R>) -> Self::Future {
        let busy = Some(Busy::new(self.activity.clone()));
        let mut stack = self.stack.borrow_mut();
        // Asked with a waker that does nothing: a stack that is not ready at once gets no
        // wake-up from it, and is driven with the task's waker by its clone's `Oneshot` below.
        let ready = matches!(
            stack.poll_ready(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(Ok(()))
        );
        let inner = if ready {
            Inner::Called {
                fut: stack.call(req),
            }
        } else {
            Inner::Waiting {
                oneshot: Box::pin(stack.clone().oneshot(req)),
            }
        };
        ConnFuture { inner, busy }
    }
}

/// The future of [`call_copy`]: the copy's own, or a boxed one (its `Oneshot`, or its error).
pub(crate) type CopyCall<S, R> = Either<
    <S as tower::Service<R>>::Future,
    BoxFuture<'static, Result<<S as tower::Service<R>>::Response, <S as tower::Service<R>>::Error>>,
>;

/// Calls `copy`, a connection's own copy of a service, with `req`, as `Oneshot` would call a
/// clone of it: once it is ready.
///
/// A copy ready at once is called in place, under the lock (`poll_ready` then `call`, nothing
/// awaited in between), with no clone. A copy that is not ready is driven to readiness and
/// called by a boxed `Oneshot` (it keeps whatever its `poll_ready` reserved, and its place in
/// any queue), and the connection's slot gets a `fresh` clone; a copy whose `poll_ready`
/// failed is dropped for a `fresh` clone and the error is the answer, as `Oneshot` gives it.
/// A lock poisoned by a call that panicked (the edge answered the panic) gets a `fresh` copy
/// too: the old one may be half-updated. A copy another request is calling at that moment
/// (HTTP/2 streams of one connection, polled on other threads) is not waited for: a `fresh`
/// clone serves the request, driven by `Oneshot`, as every request was before.
pub(crate) fn call_copy<S, R>(copy: &Mutex<S>, fresh: impl Fn() -> S, req: R) -> CopyCall<S, R>
where
    S: tower::Service<R> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    let mut service = match copy.try_lock() {
        Ok(service) => service,
        Err(TryLockError::Poisoned(poisoned)) => {
            let mut service = poisoned.into_inner();
            *service = fresh();
            copy.clear_poison();
            service
        }
        // Another request of the connection is calling it (HTTP/2 streams polled on other
        // threads): never waited for, a clone serves this one.
        Err(TryLockError::WouldBlock) => return Either::Right(Box::pin(fresh().oneshot(req))),
    };
    // Asked with a waker that does nothing: a copy that is not ready at once gets no wake-up
    // from it, and is polled again with the task's waker by its `Oneshot` below.
    match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => Either::Left(service.call(req)),
        Poll::Ready(Err(err)) => {
            *service = fresh();
            Either::Right(Box::pin(std::future::ready(Err(err))))
        }
        Poll::Pending => {
            let waiting = std::mem::replace(&mut *service, fresh());
            Either::Right(Box::pin(waiting.oneshot(req)))
        }
    }
}

/// The response future of [`ConnService`].
#[pin_project]
pub(crate) struct ConnFuture<S, B, R>
where
    S: tower::Service<Request<R>, Response = Response<B>>,
{
    #[pin]
    inner: Inner<S, R>,
    busy: Option<Busy>,
}

/// The stack's future, called in place, or the clone of a stack that was not ready (boxed:
/// with the stack and the request in it, it would widen every request's future).
#[pin_project(project = InnerProj)]
enum Inner<S, R>
where
    S: tower::Service<Request<R>>,
{
    Called {
        #[pin]
        fut: S::Future,
    },
    Waiting {
        oneshot: Pin<Box<Oneshot<S, Request<R>>>>,
    },
}

impl<S, B, R> Future for ConnFuture<S, B, R>
where
    S: tower::Service<Request<R>, Response = Response<B>>,
{
    type Output = Result<Response<BusyBody<B>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = match this.inner.project() {
            InnerProj::Called { fut } => std::task::ready!(fut.poll(cx))?,
            InnerProj::Waiting { oneshot } => std::task::ready!(oneshot.as_mut().poll(cx))?,
        };
        let busy = this.busy.take();
        Poll::Ready(Ok(resp.map(|inner| BusyBody { inner, _busy: busy })))
    }
}

/// A response body that keeps its connection busy until it is finished or dropped.
#[pin_project]
pub(crate) struct BusyBody<B> {
    #[pin]
    inner: B,
    _busy: Option<Busy>,
}

impl<B> Body for BusyBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The cap on connections that the file descriptor limit allows: `wanted`, lowered to leave
/// room for upstream connections, Redis, the cache file and the listener when `ulimit -n` is
/// lower (read from `/proc/self/limits`; elsewhere `wanted` as is).
pub(crate) fn fitting_cap(wanted: usize) -> usize {
    let Ok(text) = std::fs::read_to_string("/proc/self/limits") else {
        return wanted;
    };
    let soft = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    match soft {
        // Half of what is left for the other files goes to client connections: each proxied
        // request may hold an upstream connection too.
        Some(soft) => wanted.min(soft.saturating_sub(64) / 2).max(1),
        None => wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack that is ready after `pending` more polls (shared by its clones), counts its
    /// clones, and refuses a call that no `Ready` of its own `poll_ready` preceded.
    struct Gate {
        pending: Arc<AtomicU32>,
        clones: Arc<AtomicU32>,
        readied: bool,
    }

    impl Gate {
        fn new(pending: u32) -> Self {
            Self {
                pending: Arc::new(AtomicU32::new(pending)),
                clones: Arc::new(AtomicU32::new(0)),
                readied: false,
            }
        }
    }

    impl Clone for Gate {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::SeqCst);
            Self {
                pending: self.pending.clone(),
                clones: self.clones.clone(),
                readied: false,
            }
        }
    }

    impl tower::Service<Request<()>> for Gate {
        type Response = Response<()>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Response<()>, std::convert::Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.pending.load(Ordering::SeqCst) > 0 {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.readied = true;
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<()>) -> Self::Future {
            assert!(self.readied, "called without a Ready from poll_ready");
            self.readied = false;
            std::future::ready(Ok(Response::new(())))
        }
    }

    #[tokio::test]
    async fn a_ready_stack_is_called_in_place_without_a_clone() {
        use hyper::service::Service as _;
        let activity = Arc::new(Activity::new(Instant::now()));
        let gate = Gate::new(0);
        let clones = gate.clones.clone();
        let svc = ConnService::new(gate, activity.clone());
        for _ in 0..3 {
            let fut = svc.call(Request::new(()));
            assert!(activity.is_busy(), "busy from the call");
            let resp = fut.await.unwrap();
            assert!(activity.is_busy(), "busy until the body is done");
            drop(resp);
            assert!(!activity.is_busy());
        }
        assert_eq!(clones.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_stack_not_ready_at_once_is_cloned_and_called_when_ready() {
        use hyper::service::Service as _;
        let activity = Arc::new(Activity::new(Instant::now()));
        let gate = Gate::new(2);
        let clones = gate.clones.clone();
        let svc = ConnService::new(gate, activity.clone());
        let resp = svc.call(Request::new(())).await.unwrap();
        assert_eq!(clones.load(Ordering::SeqCst), 1, "the clone waited");
        drop(resp);
        assert!(!activity.is_busy());
        // Ready now: in place again.
        drop(svc.call(Request::new(())).await.unwrap());
        assert_eq!(clones.load(Ordering::SeqCst), 1);
    }

    /// A connection's copy of a `Gate`, and the fresh copies `call_copy` made (clones of
    /// `template`, counted).
    fn slot(gate: Gate) -> (Mutex<Gate>, Gate, Arc<AtomicU32>) {
        let template = Gate {
            pending: gate.pending.clone(),
            clones: Arc::new(AtomicU32::new(0)),
            readied: false,
        };
        let fresh = template.clones.clone();
        (Mutex::new(gate), template, fresh)
    }

    #[tokio::test]
    async fn a_ready_copy_is_called_in_place_and_kept() {
        let (copy, template, fresh) = slot(Gate::new(0));
        let clones = copy.lock().unwrap().clones.clone();
        for _ in 0..3 {
            let fut = call_copy(&copy, || template.clone(), Request::new(()));
            assert!(matches!(fut, Either::Left(_)), "called in place");
            fut.await.unwrap();
        }
        assert_eq!(clones.load(Ordering::SeqCst), 0, "never cloned");
        assert_eq!(fresh.load(Ordering::SeqCst), 0, "never replaced");
    }

    #[tokio::test]
    async fn a_copy_not_ready_at_once_is_driven_until_ready_and_replaced() {
        let (copy, template, fresh) = slot(Gate::new(2));
        let clones = copy.lock().unwrap().clones.clone();
        // The copy itself waits (one more poll, with the task's waker) and is called: the
        // test's `Gate` panics on a call without a `Ready` before it.
        let fut = call_copy(&copy, || template.clone(), Request::new(()));
        assert!(matches!(fut, Either::Right(_)));
        fut.await.unwrap();
        assert_eq!(
            clones.load(Ordering::SeqCst),
            0,
            "the copy waited, not a clone"
        );
        assert_eq!(fresh.load(Ordering::SeqCst), 1, "the slot got a fresh copy");
        // The fresh copy is ready now: in place.
        let fut = call_copy(&copy, || template.clone(), Request::new(()));
        assert!(matches!(fut, Either::Left(_)));
        fut.await.unwrap();
        assert_eq!(fresh.load(Ordering::SeqCst), 1);
    }

    /// A service whose `poll_ready` fails once (shared by its clones), then is ready.
    #[derive(Clone)]
    struct FailsOnce(Arc<AtomicBool>);

    impl tower::Service<Request<()>> for FailsOnce {
        type Response = Response<()>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Response<()>, &'static str>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.0.swap(false, Ordering::SeqCst) {
                return Poll::Ready(Err("down"));
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<()>) -> Self::Future {
            std::future::ready(Ok(Response::new(())))
        }
    }

    #[tokio::test]
    async fn a_failed_copy_answers_its_error_and_is_replaced_and_a_poisoned_one_too() {
        let fails = FailsOnce(Arc::new(AtomicBool::new(true)));
        let made = AtomicU32::new(0);
        let fresh = || {
            made.fetch_add(1, Ordering::SeqCst);
            fails.clone()
        };
        let copy = Mutex::new(fails.clone());
        assert_eq!(
            call_copy(&copy, fresh, Request::new(())).await.unwrap_err(),
            "down"
        );
        assert_eq!(made.load(Ordering::SeqCst), 1, "a failed copy is replaced");
        call_copy(&copy, fresh, Request::new(())).await.unwrap();
        assert_eq!(made.load(Ordering::SeqCst), 1);
        // A call that panicked under the lock poisons it: the next call gets a fresh copy,
        // and the lock is clear again.
        std::thread::scope(|s| {
            let poisoner = s.spawn(|| {
                let _held = copy.lock().unwrap();
                panic!("a panicking call");
            });
            assert!(poisoner.join().is_err());
        });
        assert!(copy.is_poisoned());
        call_copy(&copy, fresh, Request::new(())).await.unwrap();
        assert_eq!(made.load(Ordering::SeqCst), 2);
        assert!(!copy.is_poisoned());
    }

    #[tokio::test]
    async fn a_copy_in_use_is_not_waited_for_a_clone_serves() {
        let (copy, template, fresh) = slot(Gate::new(0));
        let held = copy.lock().unwrap();
        let fut = call_copy(&copy, || template.clone(), Request::new(()));
        drop(held);
        assert!(matches!(fut, Either::Right(_)));
        fut.await.unwrap();
        assert_eq!(fresh.load(Ordering::SeqCst), 1, "a clone served it");
        let fut = call_copy(&copy, || template.clone(), Request::new(()));
        assert!(matches!(fut, Either::Left(_)), "the copy again once free");
        fut.await.unwrap();
        assert_eq!(fresh.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn eviction_takes_the_oldest_idle_connection() {
        let registry = Registry::new(4);
        let a = registry.open();
        let b = registry.open();
        let c = registry.open();
        let _busy = Busy::new(a.clone());
        assert!(registry.evict_one());
        assert_eq!(a.close.load(Ordering::Acquire), 0, "busy: kept");
        assert_eq!(
            b.close.load(Ordering::Acquire),
            Close::Evicted as u8,
            "the oldest idle one"
        );
        drop(b);
        assert!(registry.evict_one());
        assert_eq!(c.close.load(Ordering::Acquire), Close::Evicted as u8);
        assert!(!registry.evict_one(), "only a busy one is left");
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_closes_what_is_past_its_deadline_and_nothing_busy() {
        let limits = ConnLimits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
        };
        let registry = Registry::new(4);
        let fresh = registry.open();
        let served = registry.open();
        drop(Busy::new(served.clone()));
        tokio::time::advance(Duration::from_secs(2)).await;
        registry.sweep(limits);
        assert_eq!(
            fresh.close.load(Ordering::Acquire),
            Close::Timeout as u8,
            "no request head in 1 s"
        );
        assert_eq!(served.close.load(Ordering::Acquire), 0, "idle for 2 s of 5");
        let busy = Busy::new(served.clone());
        tokio::time::advance(Duration::from_secs(60)).await;
        registry.sweep(limits);
        assert_eq!(
            served.close.load(Ordering::Acquire),
            0,
            "a busy connection is never timed out"
        );
        drop(busy);
        tokio::time::advance(Duration::from_secs(6)).await;
        registry.sweep(limits);
        assert_eq!(served.close.load(Ordering::Acquire), Close::Timeout as u8);
        drop(fresh);
        registry.sweep(limits);
        assert_eq!(
            registry.conns.lock().unwrap().len(),
            1,
            "closed connections are forgotten"
        );
    }

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        assert!(fitting_cap(1_000_000) <= 1_000_000);
        assert_eq!(fitting_cap(1), 1);
    }

    /// A connection stand-in: wakes itself `self_wakes` times while polled (then stays
    /// pending, or ends when `ends`), and keeps the last waker it was given.
    struct Waking {
        self_wakes: usize,
        ends: bool,
        polls: usize,
        kept: Option<Waker>,
    }

    impl Future for Waking {
        type Output = Result<(), std::convert::Infallible>;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.polls += 1;
            self.kept = Some(cx.waker().clone());
            if self.self_wakes > 0 {
                self.self_wakes -= 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.ends {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
    }

    impl GracefulConnection for Waking {
        fn graceful_shutdown(self: Pin<&mut Self>) {}
    }

    /// Counts the wake-ups the task gets.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn watched(self_wakes: usize, ends: bool) -> Pin<Box<Watched<Waking>>> {
        let conn = Waking {
            self_wakes,
            ends,
            polls: 0,
            kept: None,
        };
        Box::pin(Watched::new(conn, Arc::new(Activity::new(Instant::now()))))
    }

    #[tokio::test]
    async fn a_connection_that_wakes_itself_is_polled_again_in_place() {
        let count = Arc::new(Count::default());
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let mut conn = watched(3, true);
        assert!(conn.as_mut().poll(&mut cx).is_ready());
        assert_eq!(conn.conn.polls, 4, "three wake-ups, three more polls");
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "the task was never woken"
        );
    }

    #[tokio::test]
    async fn in_place_polls_are_bounded_then_the_task_yields() {
        let count = Arc::new(Count::default());
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let mut conn = watched(usize::MAX, false);
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(conn.conn.polls, IN_PLACE_POLLS);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken once, as a yield");
    }

    #[tokio::test]
    async fn the_watchdog_wakes_the_task_that_polled_last() {
        let first = Arc::new(Count::default());
        let last = Arc::new(Count::default());
        let activity = Arc::new(Activity::new(Instant::now()));
        let conn = Waking {
            self_wakes: 0,
            ends: false,
            polls: 0,
            kept: None,
        };
        let mut conn = Box::pin(Watched::new(conn, activity.clone()));
        let busy = Busy::new(activity.clone());
        for count in [&first, &last] {
            let task = Waker::from(count.clone());
            assert!(
                conn.as_mut()
                    .poll(&mut Context::from_waker(&task))
                    .is_pending()
            );
        }
        // A close asked: the task registered last is woken, once, and not the earlier one.
        assert!(activity.request_close(Close::Evicted));
        assert!(!activity.request_close(Close::Evicted), "asked once");
        assert_eq!(last.0.load(Ordering::SeqCst), 1);
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        // Polled while busy: it shuts down gracefully and waits for the request.
        let task = Waker::from(last.clone());
        assert!(
            conn.as_mut()
                .poll(&mut Context::from_waker(&task))
                .is_pending()
        );
        assert!(conn.closing);
        // The request ends: the closing connection is woken to look again, and ends.
        drop(busy);
        assert_eq!(last.0.load(Ordering::SeqCst), 2);
        assert!(
            conn.as_mut()
                .poll(&mut Context::from_waker(&task))
                .is_ready()
        );
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_wake_up_from_elsewhere_reaches_the_task() {
        let count = Arc::new(Count::default());
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let mut conn = watched(0, false);
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(conn.conn.polls, 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // What the connection registered (with a socket, a timer, another task) fires later.
        let kept = conn.conn.kept.clone().unwrap();
        std::thread::spawn(move || kept.wake()).join().unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Polled again, and woken again from elsewhere: each wake-up reaches the task.
        assert!(conn.as_mut().poll(&mut cx).is_pending());
        conn.conn.kept.clone().unwrap().wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }
}
