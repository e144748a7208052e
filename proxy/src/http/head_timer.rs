//! The timer behind hyper's HTTP/1.1 header read timeout on connections [`super::serve_h1`]
//! serves: it arms a tokio timer only for heads that are slow to arrive.
//!
//! hyper asks for a new sleep every time it starts waiting for a request head and drops it once
//! the head is read: with tokio's timer that is a timer-wheel insert and removal (under the
//! driver's lock) plus a boxed sleep per request, although on a busy keep-alive connection the
//! next head is there within microseconds. [`HeadTimer`]'s sleep is a plain deadline first: it
//! registers a tokio sleep for that deadline only when it is polled again at least
//! [`ARM_AFTER`] after its first poll (or if the timeout itself is short). Whoever waits longer
//! than that gets polled in time because the connection's own watchdog (`super::drive`) wakes
//! the task at the hibernation delay ([`super::hibernate::HIBERNATE_AFTER`], 1 s) whatever
//! happens; the timeout then fires exactly as tokio's would. `serve_h1` is the only user: its
//! watchdog always runs with that delay.
//!
//! No clock read when the sleep is made: hyper (1.x, HTTP/1.1 server) uses its timer only for
//! this timeout, as `timer.now() + timeout` handed to `sleep_until` / `reset` and then polled
//! at once if the head is incomplete. [`HeadTimer::now`] is therefore a fixed origin (the
//! process's first use of it), a deadline is read as a timeout relative to it, and the sleep's
//! deadline is fixed at its first poll (which reads the clock anyway): the same deadline up to
//! the microseconds between hyper's two calls, one `clock_gettime` per request fewer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A head still missing this long after the sleep was first polled gets a real timer.
pub const ARM_AFTER: Duration = Duration::from_millis(500);
/// Timeouts this short get a real timer at once (the watchdog might not poll in time).
const ALWAYS_ARM_BELOW: Duration = Duration::from_secs(2);

/// A [`hyper::rt::Timer`] whose sleeps register lazily (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadTimer;

/// [`HeadTimer`]'s fixed "now" (see the module docs).
fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            timeout: duration,
            deadline: None,
            first_poll: None,
            armed: None,
        })
    }

    /// `deadline` is [`HeadTimer::now`] + the timeout (the module docs).
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep(deadline.saturating_duration_since(origin()))
    }

    /// A fixed origin, not the time: deadlines are relative to it (the module docs).
    fn now(&self) -> Instant {
        origin()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(mut s) => {
                let s = &mut *s;
                s.timeout = new_deadline.saturating_duration_since(origin());
                s.first_poll = None;
                s.deadline = None;
                if let Some(armed) = &mut s.armed {
                    let deadline = Instant::now() + s.timeout;
                    s.deadline = Some(deadline);
                    armed.as_mut().reset(deadline.into());
                }
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// See [`HeadTimer`].
#[derive(Debug)]
struct HeadSleep {
    /// How long the head may take, from the first poll.
    timeout: Duration,
    /// First poll + `timeout`, fixed at the first poll.
    deadline: Option<Instant>,
    /// When it was first polled (hyper polls it when a head is not complete yet).
    first_poll: Option<Instant>,
    /// The tokio sleep, once armed.
    armed: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.armed.is_none() {
            let now = Instant::now();
            let first = *this.first_poll.get_or_insert(now);
            let deadline = *this.deadline.get_or_insert(first + this.timeout);
            if now >= deadline {
                return Poll::Ready(());
            }
            let short = this.timeout < ALWAYS_ARM_BELOW;
            if !short && now - first < ARM_AFTER {
                // A head on its way: no timer yet (the connection's watchdog polls again).
                return Poll::Pending;
            }
            this.armed = Some(Box::pin(tokio::time::sleep_until(deadline.into())));
        }
        match &mut this.armed {
            Some(armed) => armed.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test]
    async fn short_waits_arm_nothing_long_ones_fire_at_the_deadline() {
        let start = Instant::now();
        let mut s = HeadTimer.sleep_until(HeadTimer.now() + Duration::from_secs(3));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(s.as_mut().poll(&mut cx).is_pending());
        let inner = s.as_mut().downcast_mut_pin::<HeadSleep>().unwrap();
        assert!(
            inner.armed.is_none(),
            "nothing registered on the first poll"
        );

        // Polled again after ARM_AFTER (as the watchdog does): a real timer, firing on time.
        tokio::time::sleep(ARM_AFTER).await;
        assert!(s.as_mut().poll(&mut cx).is_pending());
        let inner = s.as_mut().downcast_mut_pin::<HeadSleep>().unwrap();
        assert!(inner.armed.is_some());
        s.await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test]
    async fn short_timeouts_and_resets() {
        let start = Instant::now();
        let mut s = HeadTimer.sleep_until(HeadTimer.now() + Duration::from_millis(300));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(s.as_mut().poll(&mut cx).is_pending());
        assert!(s
            .as_mut()
            .downcast_mut_pin::<HeadSleep>()
            .unwrap()
            .armed
            .is_some());
        HeadTimer.reset(&mut s, HeadTimer.now() + Duration::from_millis(600));
        s.await;
        assert!(start.elapsed() >= Duration::from_millis(600));
    }
}
