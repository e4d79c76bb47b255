//! What keeps one sandbox from holding the gateway's resources: a timeout
//! on every wait a client controls (a request's head, the time between
//! requests, a TLS handshake, a silent tunnel) and a cap on the connections
//! a sandbox holds at once. A client over the cap is closed at once, so
//! that one sandbox flooding its door costs the others nothing but accepts.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The gateway's limits, the same for every sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a client may take to send a request's head, also the first
    /// one of a fresh connection or inside an intercepted tunnel.
    pub header_timeout: Duration,
    /// How long a connection may wait between requests (keep-alive).
    pub idle_timeout: Duration,
    /// How long a tunnel that is not intercepted may carry nothing, either way.
    pub tunnel_idle_timeout: Duration,
    /// How long the TLS handshake of an intercepted tunnel may take (and
    /// the gateway's own with the upstream).
    pub tls_handshake_timeout: Duration,
    /// Connections one sandbox may hold open at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(600),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 256,
        }
    }
}

/// The connections a sandbox holds open.
#[derive(Default)]
pub(crate) struct Slots {
    open: AtomicUsize,
    /// Set while over the cap: the refusal is logged once, not per connection.
    refusing: AtomicBool,
}

/// One open connection; its slot is free again when the last clone goes.
pub(crate) struct Slot {
    slots: Arc<Slots>,
    max: usize,
}

impl Slots {
    /// A slot for one more connection, or `None` when `max` are open.
    pub(crate) fn take(self: &Arc<Self>, max: usize, sandbox: &str) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            if !self.refusing.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    "gateway: sandbox {sandbox} holds {max} connections open at once; \
                     closing new ones until some end (raise gateway.max_connections to allow more)"
                );
            }
            return None;
        }
        Some(Slot {
            slots: Arc::clone(self),
            max,
        })
    }

    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let left = self.slots.open.fetch_sub(1, Ordering::AcqRel) - 1;
        // Well below the cap again: a next flood is worth a line in the log.
        if left <= self.max / 2 {
            self.slots.refusing.store(false, Ordering::Release);
        }
    }
}

/// Requests in flight on one client connection, and since when it has had none.
pub(crate) struct Activity {
    state: Mutex<(usize, Instant, bool)>,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new((0, Instant::now(), false)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (usize, Instant, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request is in flight until the guard (held by its response body) goes.
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        let mut s = self.state();
        s.0 += 1;
        s.2 = true;
        Busy(Arc::clone(self))
    }

    /// When the connection must close if nothing starts; `None` while busy.
    /// Before its first request a connection has `first`, after it `between`.
    fn deadline(&self, first: Duration, between: Duration) -> Option<Instant> {
        let s = self.state();
        (s.0 == 0).then(|| s.1 + if s.2 { between } else { first })
    }
}

pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.0 -= 1;
        if s.0 == 0 {
            s.1 = Instant::now();
        }
    }
}

/// Resolves once the connection has had no request in flight for too long:
/// `first` before its first request, `between` after.
pub(crate) async fn idle(activity: Arc<Activity>, first: Duration, between: Duration) {
    loop {
        let now = Instant::now();
        match activity.deadline(first, between) {
            Some(at) if at <= now => return,
            Some(at) => tokio::time::sleep_until(at.into()).await,
            // Busy: look again later (a response may stream for long).
            None => tokio::time::sleep(between.min(Duration::from_secs(5))).await,
        }
    }
}

/// A response body that keeps its request in flight until it ends.
pub(crate) struct Held<B> {
    pub(crate) inner: B,
    /// Held for its Drop: the request is in flight until the body goes.
    #[allow(dead_code)]
    pub(crate) busy: Busy,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Held<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether an accept failed for want of descriptors or memory: then the
/// loop waits a little instead of spinning on the same failure.
pub(crate) fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_and_free_again() {
        let slots = Arc::new(Slots::default());
        let held: Vec<Slot> = (0..3).map(|_| slots.take(3, "s").unwrap()).collect();
        assert!(slots.take(3, "s").is_none());
        assert_eq!(slots.open(), 3);
        drop(held);
        assert_eq!(slots.open(), 0);
        assert!(slots.take(3, "s").is_some());
    }

    #[test]
    fn a_busy_connection_is_not_idle() {
        let a = Activity::new();
        let (first, between) = (Duration::from_secs(1), Duration::from_secs(9));
        assert!(a.deadline(first, between).unwrap() <= Instant::now() + first);
        let busy = a.busy();
        assert_eq!(a.deadline(first, between), None);
        drop(busy);
        assert!(a.deadline(first, between).unwrap() > Instant::now() + first);
    }
}
