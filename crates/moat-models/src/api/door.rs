//! The model runner's listeners ("doors"): the host's and one inside every
//! sandbox. A sandbox is not trusted with the daemon's resources, so a door
//! bounds what a client can hold:
//!
//! - a request's head must arrive within `header_timeout` of the
//!   connection opening (or of its first byte, on a kept-alive connection),
//!   and its body within `header_timeout` of the head (see
//!   [`super::http::read_body`]): a client that sends a byte every few
//!   seconds cannot keep a connection for ever;
//! - a kept-alive connection with nothing in flight is closed after
//!   `idle_timeout` without a byte; a response in flight is never cut for
//!   taking long (a long prompt, a long answer), only when its client has
//!   stopped reading it for `idle_timeout`;
//! - a sandbox's door holds at most `max_connections` connections: over it
//!   new ones are closed at once (logged once a minute, not per
//!   connection), so one sandbox cannot use up the daemon's descriptors;
//! - when accepting fails for want of descriptors (EMFILE, ENFILE), the
//!   loop sleeps instead of retrying at once: the pending connection stays
//!   in the backlog and the listener stays readable, so a bare retry spins.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::http::{Body, BODY_TIMEOUT};
use super::Scope;

/// What a door allows a connection, and what the API allows a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Time to send a request's head (from the connection opening, or from
    /// its first byte on a kept-alive connection), and then its body.
    pub header_timeout: Duration,
    /// Time a connection with nothing in flight may stay silent; also how
    /// long a response may wait on a client that stopped reading.
    pub idle_timeout: Duration,
    /// Connections one sandbox's door holds at once (the host's is not
    /// capped); 0: no cap.
    pub max_connections: usize,
    /// Messages one chat request may carry.
    pub max_messages: usize,
    /// Steps (MiniJinja's fuel) the chat template may take for one request.
    pub template_steps: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
            max_messages: 4096,
            template_steps: crate::chat::DEFAULT_TEMPLATE_STEPS,
        }
    }
}

/// One listener's state: its connection cap and its refusal log.
pub(super) struct Door {
    key: String,
    scope: Scope,
    limits: Limits,
    slots: Option<Arc<Semaphore>>,
    refused: RateLimitedLog,
    accept_errors: RateLimitedLog,
}

impl Door {
    pub(super) fn new(key: &str, scope: Scope, limits: &Limits) -> Door {
        // The host's clients are the user's own; only sandboxes are capped.
        let slots = (scope == Scope::Sandbox && limits.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(limits.max_connections)));
        Door {
            key: key.to_string(),
            scope,
            limits: limits.clone(),
            slots,
            refused: RateLimitedLog::new(Duration::from_secs(60)),
            accept_errors: RateLimitedLog::new(Duration::from_secs(60)),
        }
    }

    /// A place for one more connection; `Err` when the door is full.
    fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, ()> {
        match &self.slots {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some).map_err(|_| ()),
        }
    }
}

/// A request handler's answer to come.
pub(super) type Answer = Pin<Box<dyn Future<Output = hyper::Response<Body>> + Send>>;

/// A request handler, as the door calls it.
pub(super) type Handler = Arc<dyn Fn(Scope, hyper::Request<Incoming>) -> Answer + Send + Sync>;

/// Accept connections until `stopped` changes, serving each with `handler`.
pub(super) async fn accept_loop(
    listener: TcpListener,
    door: Door,
    handler: Handler,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(e) => {
                let pause = backoff.after(&e);
                if let Some(n) = door.accept_errors.note() {
                    tracing::warn!(door = %door.key, "model runner: accepting a connection failed ({e}; {n} time(s) since the last report); pausing {pause:?} between tries");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = stopped.changed() => return,
                }
            }
        };
        let permit = match door.admit() {
            Ok(permit) => permit,
            Err(()) => {
                // Closed at once: the sandbox gets a reset, not a hang.
                drop(stream);
                if let Some(n) = door.refused.note() {
                    tracing::warn!(door = %door.key, "model runner: a sandbox holds {} connections to its door, the most allowed ([models] max_connections, MOAT_MODELS_MAX_CONNECTIONS); refused {n} connection(s) since the last report", door.limits.max_connections);
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let limits = door.limits.clone();
        let scope = door.scope;
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = serve_connection(stream, scope, limits, handler) => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

/// Serve one connection until it ends or breaks a limit.
pub(super) async fn serve_connection<S>(stream: S, scope: Scope, limits: Limits, handler: Handler)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let on_request = activity.clone();
    let svc = service_fn(move |req| {
        let guard = InFlight::begin(&on_request);
        let fut = handler(scope, req);
        async move {
            let resp = fut.await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| {
                Guarded {
                    body,
                    _guard: guard,
                }
                .boxed()
            }))
        }
    });
    // hyper's own head timer is a backstop for the watchdog below (which
    // also knows an idle connection from one whose head is slow); it starts
    // when hyper begins waiting for a head, so it gets the idle time too.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout + limits.idle_timeout)
        .serve_connection(io, svc);
    let body_timeout = limits.header_timeout;
    tokio::select! {
        _ = BODY_TIMEOUT.scope(body_timeout, conn) => {}
        _ = watchdog(&activity, &limits) => {
            tracing::debug!("model runner: closing a connection over its time limits");
        }
    }
}

/// Returns when the connection has broken a time limit.
async fn watchdog(activity: &Activity, limits: &Limits) {
    let tick = (limits.header_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        if activity.expired(limits) {
            return;
        }
    }
}

/// What the watchdog knows of a connection, as milliseconds since `epoch`
/// (`NONE` for not set).
struct Activity {
    epoch: Instant,
    last_io: AtomicU64,
    /// When the head of the next request began (the connection opening for
    /// the first); `NONE` while a request is in flight or none has begun.
    head_since: AtomicU64,
    /// Since when a write has been waiting on the client.
    write_blocked_since: AtomicU64,
    in_flight: AtomicUsize,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_io: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(NONE),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn read(&self) {
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let _ =
                self.head_since
                    .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
        self.write_blocked_since.store(NONE, Ordering::Relaxed);
    }

    fn write_blocked(&self) {
        let _ = self.write_blocked_since.compare_exchange(
            NONE,
            self.now(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    fn expired(&self, limits: &Limits) -> bool {
        let state = State {
            now: self.now(),
            last_io: self.last_io.load(Ordering::Relaxed),
            head_since: self.head_since.load(Ordering::Acquire),
            write_blocked_since: self.write_blocked_since.load(Ordering::Acquire),
            in_flight: self.in_flight.load(Ordering::Acquire),
        };
        state.expired(limits)
    }
}

/// A snapshot of [`Activity`], judged without a clock.
#[derive(Debug, Clone, Copy)]
struct State {
    now: u64,
    last_io: u64,
    head_since: u64,
    write_blocked_since: u64,
    in_flight: usize,
}

impl State {
    fn expired(&self, limits: &Limits) -> bool {
        let past = |since: u64, limit: Duration| {
            since != NONE && self.now.saturating_sub(since) >= limit.as_millis() as u64
        };
        if self.in_flight > 0 {
            // A long answer is fine; an answer nobody reads is not.
            return past(self.write_blocked_since, limits.idle_timeout);
        }
        past(self.head_since, limits.header_timeout) || past(self.last_io, limits.idle_timeout)
    }
}

/// Counts a request as in flight until its response body is dropped
/// (written out, or abandoned with the connection).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.head_since.store(NONE, Ordering::Release);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // The idle clock starts at the end of the answer.
        a.last_io.store(a.now(), Ordering::Relaxed);
        a.write_blocked_since.store(NONE, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight while it lasts.
struct Guarded {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection's stream, noting every byte that moves.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        r
    }
}

impl<S> Watched<S> {
    fn note_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.wrote(),
            Poll::Pending => self.activity.write_blocked(),
            _ => {}
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The pause after a failed accept: growing while descriptors are short,
/// since only a connection closing elsewhere ends that.
#[derive(Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MOST: Duration = Duration::from_secs(1);

    fn after(&mut self, e: &io::Error) -> Duration {
        if !out_of_descriptors(e) {
            // A connection that failed on its own (reset before accept):
            // the next one may be fine, but never retry in a tight loop.
            return Duration::from_millis(1);
        }
        let pause = self.next.unwrap_or(Self::FIRST);
        self.next = Some((pause * 2).min(Self::MOST));
        pause
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A warning that is written at most once per `every`, with how many
/// times it happened in between.
struct RateLimitedLog {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    fn new(every: Duration) -> Self {
        RateLimitedLog {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Count one; `Some(count)` when it is time to write the warning.
    fn note(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        if s.0.is_some_and(|t| t.elapsed() < self.every) {
            return None;
        }
        let n = s.1;
        *s = (Some(Instant::now()), 0);
        Some(n)
    }
}

#[cfg(test)]
mod tests;
