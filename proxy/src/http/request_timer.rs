//! The request-timeout timer of a downstream connection, reused from one request to the next.
//!
//! A fresh `tokio::time::timeout` per request inserts a timer into tokio's wheel on its first
//! poll and removes it on drop, under the time driver's lock. A connection's requests mostly
//! come one after another (HTTP/1.1 always), so the connection keeps one timer and re-arms it
//! for each request: re-arming a registered timer to a later deadline only updates its
//! expiration (the wheel moves it when the old one comes up). Concurrent requests of an HTTP/2
//! connection that find the timer taken get their own, as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// The connection's spare timer (see the module docs).
#[derive(Debug, Default)]
pub struct TimerSlot(Mutex<Option<Pin<Box<Sleep>>>>);

impl TimerSlot {
    /// A timer firing at `deadline`: the connection's own if it is free, else a new one.
    pub fn take(&self, deadline: Instant) -> Pin<Box<Sleep>> {
        let spare = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        match spare {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Gives a timer back for the connection's next request.
    pub fn put(&self, timer: Pin<Box<Sleep>>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(timer);
    }

    /// Drops the spare timer (the connection goes quiet: nothing to keep registered).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// Runs `fut` until `timer` fires: `None` if it fired first.
///
/// A hand-written future rather than an `async fn`: the request's future (large: it holds the
/// upstream exchange) is stored once, where it is constructed, instead of being moved into the
/// `async fn`'s state and again into a pinned local on the first poll (~400 instructions of
/// `memcpy` per request).
pub fn run_until<F: Future>(fut: F, timer: &mut Pin<Box<Sleep>>) -> RunUntil<'_, F> {
    RunUntil { fut, timer }
}

pin_project_lite::pin_project! {
    /// See [`run_until`].
    #[must_use = "futures do nothing unless polled"]
    pub struct RunUntil<'t, F> {
        #[pin]
        fut: F,
        timer: &'t mut Pin<Box<Sleep>>,
    }
}

impl<F: Future> Future for RunUntil<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The work first, as `tokio::time::timeout` does: a result ready at the deadline wins.
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Some(out));
        }
        this.timer.as_mut().poll(cx).map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_fires_at_its_new_deadline() {
        let slot = TimerSlot::default();
        let start = Instant::now();
        let mut t = slot.take(start + Duration::from_secs(1));
        assert_eq!(run_until(async { 7 }, &mut t).await, Some(7));
        slot.put(t);
        // Re-armed later: does not fire at the first deadline.
        let mut t = slot.take(start + Duration::from_secs(5));
        let slow = tokio::time::sleep(Duration::from_secs(3));
        assert_eq!(run_until(slow, &mut t).await, Some(()));
        assert!(Instant::now() >= start + Duration::from_secs(3));
        let never = std::future::pending::<()>();
        assert_eq!(run_until(never, &mut t).await, None);
        assert!(Instant::now() >= start + Duration::from_secs(5));
        slot.put(t);
        // Fired, then re-armed: fires again.
        let mut t = slot.take(Instant::now() + Duration::from_secs(2));
        assert_eq!(run_until(std::future::pending::<()>(), &mut t).await, None);
        assert!(Instant::now() >= start + Duration::from_secs(7));
        slot.clear();
        // Taken while the spare is lent: a new one.
        let a = slot.take(Instant::now() + Duration::from_secs(1));
        let b = slot.take(Instant::now() + Duration::from_secs(1));
        drop((a, b));
    }
}
