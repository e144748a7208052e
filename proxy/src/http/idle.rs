//! Downstream idle timeout: a connection with no request in flight for the listener's
//! `idle_timeout` is shut down gracefully (HTTP/1.1: closed; HTTP/2: GOAWAY). "In flight" runs
//! from the request's arrival until its response body ends, so a long stream or a slow upstream
//! never counts as idle, whatever the protocol's own pings do on the wire.
//!
//! Cost per request: one `Arc` clone and three atomic operations ([`Activity::begin`] and the
//! guard's drop); the connection's timer is only polled when it fires.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::lb::load::now_nanos;

/// Request activity of one downstream connection.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// [`now_nanos`] of the last time a request ended (or of the accept).
    last: AtomicU64,
    /// The connection's watchdog asks its HTTP/1 server to hibernate ([`super::hibernate`]).
    hibernate: AtomicBool,
    /// Bytes were read since the last request ended: they may be the start of the next request
    /// head, sitting in the server's buffer, so the connection must not hibernate.
    dirty: AtomicBool,
    /// The connection is served by the proxy's own HTTP/1.1 loop (`super::serve_connection`'s
    /// `serve_h1`), which hands its socket to an agreed tunnel itself: hyper's upgrade API
    /// (`hyper::upgrade::on`) does not apply there.
    manual_upgrades: AtomicBool,
    /// An agreed tunnel (101, or 200 to CONNECT) waiting for that loop to finish writing the
    /// response and hand it the socket ([`super::upgrade`]).
    tunnel: Mutex<Option<Box<super::upgrade::Tunnel>>>,
    /// The request-timeout timer its requests reuse ([`super::request_timer`]).
    request_timer: super::request_timer::TimerSlot,
}

impl Activity {
    /// A connection accepted now, with nothing in flight.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(now_nanos()),
            hibernate: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            manual_upgrades: AtomicBool::new(false),
            tunnel: Mutex::new(None),
            request_timer: super::request_timer::TimerSlot::default(),
        })
    }

    /// The connection's reusable request-timeout timer.
    pub fn request_timer(&self) -> &super::request_timer::TimerSlot {
        &self.request_timer
    }

    /// Marks the connection as served by the HTTP/1.1 loop that hands agreed tunnels their
    /// socket (see `manual_upgrades`).
    pub fn set_manual_upgrades(&self) {
        self.manual_upgrades.store(true, Ordering::Relaxed);
    }

    /// Whether agreed tunnels of this connection go through [`Activity::deposit_tunnel`].
    pub fn manual_upgrades(&self) -> bool {
        self.manual_upgrades.load(Ordering::Relaxed)
    }

    /// Leaves an agreed tunnel for the connection's HTTP/1.1 loop, which runs it once the
    /// response that agreed to it is written.
    pub fn deposit_tunnel(&self, tunnel: Box<super::upgrade::Tunnel>) {
        *self.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(tunnel);
    }

    /// The agreed tunnel waiting for this connection's socket, if any.
    pub fn take_tunnel(&self) -> Option<Box<super::upgrade::Tunnel>> {
        self.tunnel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Asks the connection's HTTP/1 server to hibernate at its next read that would block
    /// (see [`super::hibernate`]); `false` cancels.
    pub fn request_hibernation(&self, on: bool) {
        self.hibernate.store(on, Ordering::Relaxed);
    }

    /// Whether the server may hibernate now: asked to, nothing in flight, and no byte read since
    /// the last request ended.
    pub fn may_hibernate(&self) -> bool {
        self.hibernate.load(Ordering::Relaxed)
            && !self.dirty.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Bytes were read from the connection (see `dirty`): cancels a hibernation request.
    pub fn note_read(&self) {
        // Load first: under load this is a read of a line the thread already owns.
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Relaxed);
        }
        if self.hibernate.load(Ordering::Relaxed) {
            self.hibernate.store(false, Ordering::Relaxed);
        }
    }

    /// A request arrived: in flight until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self), 0)
    }

    /// How long until the connection has been idle for `idle` (zero: it has), or `None` while a
    /// request is in flight.
    pub fn idle_in(&self, idle: Duration, now: u64) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last.load(Ordering::Acquire);
        let idle_since = crate::lb::load::between(last, now);
        Some(idle.saturating_sub(idle_since))
    }
}

/// A request in flight on a connection (see [`Activity::begin`]), and when it ended if the
/// caller knows ([`InFlight::end_at`]; 0: the drop reads the clock).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>, u64);

impl InFlight {
    /// The connection the request is in flight on.
    pub fn activity(&self) -> &Activity {
        &self.0
    }

    /// Ends the request at `now` ([`now_nanos`] of a clock read the caller made anyway).
    pub fn end_at(mut self, now: u64) {
        self.1 = now;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = match self.1 {
            0 => now_nanos(),
            at => at,
        };
        // The timestamp first: a watchdog that sees nothing in flight sees this end too.
        self.0.last.store(now, Ordering::Release);
        // What was read so far belonged to this request (its head and body).
        self.0.dirty.store(false, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When the watchdog of a connection with `activity` should next look: `Ok(())` when the
/// connection is idle now, else `Err(wait)`.
pub fn check(activity: &Activity, idle: Duration) -> Result<(), Duration> {
    match activity.idle_in(idle, now_nanos()) {
        // Busy: look again a whole timeout later (the earliest it can become idle enough).
        None => Err(idle),
        Some(left) if left.is_zero() => Ok(()),
        Some(left) => Err(left),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_without_requests_in_flight() {
        let a = Activity::new();
        let idle = Duration::from_millis(50);
        let now = now_nanos();
        assert!(a.idle_in(idle, now).unwrap() <= idle);
        assert_eq!(
            a.idle_in(idle, now + 60_000_000),
            Some(Duration::ZERO),
            "no request for longer than the timeout"
        );
        let r = a.begin();
        assert_eq!(
            a.idle_in(idle, now + 60_000_000),
            None,
            "a request in flight"
        );
        assert_eq!(check(&a, idle), Err(idle));
        drop(r);
        let left = a.idle_in(idle, now_nanos()).unwrap();
        assert!(
            left > Duration::from_millis(40),
            "the end of a request restarts the clock"
        );
    }

    #[test]
    fn a_request_ended_at_a_given_time_counts_from_then() {
        let a = Activity::new();
        let idle = Duration::from_secs(10);
        let at = crate::lb::load::nanos_at(std::time::Instant::now());
        let r = a.begin();
        // Ended "5 s later" by the caller's clock reading: idle counts from that reading.
        r.end_at(at + 5_000_000_000);
        assert_eq!(a.idle_in(idle, at + 5_000_000_000), Some(idle));
        assert_eq!(a.idle_in(idle, at + 15_000_000_000), Some(Duration::ZERO));
    }
}
