//! The outbound tunnel connections, per (endpoint address, expected identity).
//!
//! Rules, applied when a stream is checked out (under one lock, so a connection is never
//! closed while a stream is being put on it):
//! - a connection takes new streams while it is of the current trust/certificate generation
//!   (`MeshTls::generation`), younger than `max_age` and open;
//! - the least busy such connection below [`MAX_STREAMS_PER_CONNECTION`] streams gets the
//!   stream; when all are full another is opened, up to `max_connections_per_peer` (counting
//!   those being opened); past that the least busy one is oversubscribed (HTTP/2 queues the
//!   stream until one ends); while only connections being opened exist, callers wait for them;
//! - a connection with no stream is closed once idle for `idle_timeout`, older than `max_age`,
//!   or of an older generation: after a trust or certificate change new streams go to a new
//!   connection (a new handshake under the new bundle and certificate) and the old one closes
//!   when its last stream ends;
//! - a connection that breaks fails its streams (like a dropped TCP connection) and leaves the
//!   pool; the next stream opens a new one.
//!
//! A peer whose handshake fails for lack of a common ALPN (it does not speak `weft-tunnel`)
//! is remembered for `fallback_for`: its connections are dialled directly (one mTLS handshake
//! each, never plaintext) and counted in `weft_tunnel_fallbacks_total`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;

use super::metrics::TunnelMetrics;
use super::{TunnelConfig, MAX_STREAMS_PER_CONNECTION};
use crate::tls::spiffe::SpiffeId;
use crate::tls::MeshTls;

/// A pool key: where the connection goes and who must answer.
pub type Key = (SocketAddr, SpiffeId);

/// The pool's limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most connections per key.
    pub max_connections: usize,
    /// Streams per connection before another is opened.
    pub max_streams: usize,
    /// Close a connection with no stream after this long.
    pub idle_timeout: Duration,
    /// No new streams on a connection older than this.
    pub max_age: Duration,
    /// Dial a peer without the tunnel ALPN directly for this long.
    pub fallback_for: Duration,
}

impl From<&TunnelConfig> for Settings {
    fn from(c: &TunnelConfig) -> Self {
        Self {
            max_connections: c.max_connections_per_peer,
            max_streams: MAX_STREAMS_PER_CONNECTION as usize,
            idle_timeout: c.idle_timeout,
            max_age: c.max_age,
            fallback_for: c.fallback_for,
        }
    }
}

/// One pooled connection.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    sender: SendRequest<Empty<Bytes>>,
    generation: u64,
    created: Instant,
    active: AtomicUsize,
    /// Milliseconds after `created` when the last stream ended (or it was opened).
    last_active_ms: AtomicU64,
    /// The peer refused a stream on it for stale credentials (421): no new streams.
    stale: std::sync::atomic::AtomicBool,
}

impl Conn {
    /// A sender for a new stream.
    pub fn sender(&self) -> SendRequest<Empty<Bytes>> {
        self.sender.clone()
    }

    fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// The peer no longer takes streams on this connection (it answered 421: its trust
    /// bundle changed since our handshake, or it holds our certificate expired): new streams
    /// go to another connection; it closes when its streams are done.
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    fn idle_for(&self, now: Instant) -> Duration {
        let last =
            self.created + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }
}

/// A stream's hold on its connection: counted in the connection's streams until dropped.
#[derive(Debug)]
pub struct Lease {
    conn: Arc<Conn>,
}

impl Lease {
    /// The connection.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The connection, shared.
    pub fn shared(&self) -> Arc<Conn> {
        Arc::clone(&self.conn)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let ms = self.conn.created.elapsed().as_millis() as u64;
        self.conn.last_active_ms.store(ms, Ordering::Relaxed);
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    /// Connections being opened.
    connecting: usize,
}

/// What [`Pool::checkout`] decided.
#[derive(Debug)]
pub enum Checkout {
    /// Put the stream on this connection.
    Use(Lease),
    /// Open a new connection (the slot is reserved: report with [`Pool::opened`] or
    /// [`Pool::open_failed`]).
    Open,
    /// Only connections being opened: wait for one.
    Wait,
}

/// The pool.
#[derive(Debug)]
pub struct Pool {
    tls: Arc<MeshTls>,
    settings: Settings,
    metrics: TunnelMetrics,
    entries: Mutex<HashMap<Key, Entry>>,
    fallback: Mutex<HashMap<Key, Instant>>,
    changed: tokio::sync::Notify,
    next_id: AtomicU64,
}

impl Pool {
    /// An empty pool dialling with `tls`.
    pub fn new(tls: Arc<MeshTls>, settings: Settings, metrics: TunnelMetrics) -> Arc<Self> {
        Arc::new(Self {
            tls,
            settings,
            metrics,
            entries: Mutex::new(HashMap::new()),
            fallback: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(1),
        })
    }

    /// The mTLS context connections are made with.
    pub fn tls(&self) -> &Arc<MeshTls> {
        &self.tls
    }

    /// The metrics.
    pub fn metrics(&self) -> &TunnelMetrics {
        &self.metrics
    }

    /// The limits.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Wakes callers waiting in [`Checkout::Wait`] (a connection was added or failed).
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    fn usable(&self, c: &Conn, generation: u64, now: Instant) -> bool {
        c.generation == generation
            && now.saturating_duration_since(c.created) < self.settings.max_age
            && c.is_open()
            && !c.stale.load(Ordering::Acquire)
    }

    /// Where a new stream to `key` goes, with the current `generation`.
    pub fn checkout(&self, key: &Key, generation: u64, now: Instant) -> Checkout {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(key.clone()).or_default();
        entry.conns.retain(|c| c.is_open());
        let mut usable: Vec<&Arc<Conn>> = entry
            .conns
            .iter()
            .filter(|c| self.usable(c, generation, now))
            .collect();
        usable.sort_by_key(|c| c.active.load(Ordering::Acquire));
        let lease = |c: &Arc<Conn>| {
            c.active.fetch_add(1, Ordering::AcqRel);
            Checkout::Use(Lease {
                conn: Arc::clone(c),
            })
        };
        if let Some(c) = usable.first() {
            if c.active.load(Ordering::Acquire) < self.settings.max_streams {
                return lease(c);
            }
        }
        if usable.len() + entry.connecting < self.settings.max_connections {
            entry.connecting += 1;
            return Checkout::Open;
        }
        match usable.first() {
            Some(c) => lease(c),
            None => Checkout::Wait,
        }
    }

    /// A connection opened for `key` (after [`Checkout::Open`]): it joins the pool and the
    /// caller gets the first stream on it.
    pub fn opened(
        &self,
        key: &Key,
        sender: SendRequest<Empty<Bytes>>,
        generation: u64,
    ) -> (Arc<Conn>, Lease) {
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            sender,
            generation,
            created: Instant::now(),
            active: AtomicUsize::new(1),
            last_active_ms: AtomicU64::new(0),
            stale: std::sync::atomic::AtomicBool::new(false),
        });
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = entries.entry(key.clone()).or_default();
            entry.connecting = entry.connecting.saturating_sub(1);
            entry.conns.push(Arc::clone(&conn));
        }
        self.metrics.outbound_connections.inc();
        self.changed.notify_waiters();
        let lease = Lease {
            conn: Arc::clone(&conn),
        };
        (conn, lease)
    }

    /// Opening a connection for `key` failed (after [`Checkout::Open`]).
    pub fn open_failed(&self, key: &Key) {
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = entries.get_mut(key) {
                entry.connecting = entry.connecting.saturating_sub(1);
            }
        }
        self.changed.notify_waiters();
    }

    /// Whether `conn` should close now (no stream, and idle too long, too old or of an older
    /// generation); if so it leaves the pool, under the lock checkouts take.
    pub fn retire_if_done(&self, key: &Key, conn: &Arc<Conn>, now: Instant) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.active.load(Ordering::Acquire) > 0 {
            return false;
        }
        let done = conn.idle_for(now) >= self.settings.idle_timeout
            || !self.usable(conn, self.tls.generation(), now);
        if done {
            Self::remove_locked(&mut entries, key, conn);
        }
        done
    }

    /// `conn` ended (closed or broken): it leaves the pool.
    pub fn closed(&self, key: &Key, conn: &Arc<Conn>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        Self::remove_locked(&mut entries, key, conn);
        drop(entries);
        self.metrics.outbound_connections.dec();
    }

    fn remove_locked(entries: &mut HashMap<Key, Entry>, key: &Key, conn: &Arc<Conn>) {
        if let Some(entry) = entries.get_mut(key) {
            entry.conns.retain(|c| c.id != conn.id);
            if entry.conns.is_empty() && entry.connecting == 0 {
                entries.remove(key);
            }
        }
    }

    /// Whether `key` is dialled directly for now (it refused the tunnel ALPN lately).
    pub fn falls_back(&self, key: &Key, now: Instant) -> bool {
        let mut fallback = self.fallback.lock().unwrap_or_else(PoisonError::into_inner);
        match fallback.get(key) {
            Some(until) if *until > now => true,
            Some(_) => {
                fallback.remove(key);
                false
            }
            None => false,
        }
    }

    /// Remembers that `key` does not speak the tunnel.
    pub fn mark_fallback(&self, key: &Key, now: Instant) {
        let mut fallback = self.fallback.lock().unwrap_or_else(PoisonError::into_inner);
        fallback.retain(|_, until| *until > now);
        fallback.insert(key.clone(), now + self.settings.fallback_for);
    }

    /// The pool as `/config_dump` shows it: per peer (address, identity) its connections
    /// (streams open, age, idle time, whether they still take new streams) and connections
    /// being opened; and the peers dialled directly for now (they refused the tunnel), with
    /// the seconds left. Sorted by address, so the output is stable.
    pub fn dump(&self, now: Instant) -> serde_json::Value {
        use serde_json::json;
        let generation = self.tls.generation();
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut peers: Vec<(&Key, &Entry)> = entries.iter().collect();
        peers.sort_by(|a, b| a.0.cmp(b.0));
        let peers: Vec<serde_json::Value> = peers
            .into_iter()
            .map(|((addr, identity), entry)| {
                let conns: Vec<serde_json::Value> = entry
                    .conns
                    .iter()
                    .map(|c| {
                        json!({
                            "id": c.id,
                            "streams": c.active.load(Ordering::Acquire),
                            "age_s": now.saturating_duration_since(c.created).as_secs(),
                            "idle_s": if c.active.load(Ordering::Acquire) > 0 {
                                0
                            } else {
                                c.idle_for(now).as_secs()
                            },
                            "takes_new_streams": self.usable(c, generation, now),
                        })
                    })
                    .collect();
                json!({
                    "address": addr.to_string(),
                    "identity": identity.as_str(),
                    "connections": conns,
                    "connecting": entry.connecting,
                })
            })
            .collect();
        drop(entries);
        let fallback = self.fallback.lock().unwrap_or_else(PoisonError::into_inner);
        let mut direct: Vec<(&Key, &Instant)> =
            fallback.iter().filter(|(_, until)| **until > now).collect();
        direct.sort_by(|a, b| a.0.cmp(b.0));
        let direct: Vec<serde_json::Value> = direct
            .into_iter()
            .map(|((addr, identity), until)| {
                json!({
                    "address": addr.to_string(),
                    "identity": identity.as_str(),
                    "for_s": until.saturating_duration_since(now).as_secs(),
                })
            })
            .collect();
        json!({ "peers": peers, "direct": direct })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;
    use crate::tls::metrics::SecurityMetrics;

    fn pool(max_connections: usize, max_streams: usize) -> Arc<Pool> {
        let tls = Arc::new(MeshTls::new(SecurityMetrics::unregistered()).unwrap());
        let settings = Settings {
            max_connections,
            max_streams,
            idle_timeout: Duration::from_secs(60),
            max_age: Duration::from_secs(600),
            fallback_for: Duration::from_secs(300),
        };
        Pool::new(tls, settings, TunnelMetrics::unregistered())
    }

    /// A real HTTP/2 client connection to an in-memory server (what the pool holds).
    async fn sender() -> SendRequest<Empty<Bytes>> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(http::Response::new(Empty::<Bytes>::new()))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), service)
                .await;
        });
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(TokioIo::new(c))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn key() -> Key {
        (
            "127.0.0.1:9000".parse().unwrap(),
            SpiffeId::parse("spiffe://cluster.local/ns/default/sa/store").unwrap(),
        )
    }

    fn lease(c: Checkout) -> Lease {
        match c {
            Checkout::Use(l) => l,
            other => panic!("expected a stream on a pooled connection, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn streams_share_a_connection_until_it_is_full_then_another_opens() {
        let (p, k, now) = (pool(2, 2), key(), Instant::now());
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        // The first connection is being opened and the cap is 2: a second may open too.
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        p.open_failed(&k);
        let (first, l1) = p.opened(&k, sender().await, 0);
        let l2 = lease(p.checkout(&k, 0, now));
        assert_eq!(l2.conn().id, first.id);
        // `first` is full (2 streams), one more connection is allowed: open it.
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        let (second, _l3) = p.opened(&k, sender().await, 0);
        assert_ne!(second.id, first.id);
        // A stream ended on `first`: the least busy connection with room takes the next.
        drop(l1);
        assert_eq!(lease(p.checkout(&k, 0, now)).conn().id, first.id);
        drop(l2);
    }

    #[tokio::test]
    async fn the_dump_shows_connections_streams_and_direct_peers() {
        let (p, k, now) = (pool(2, 2), key(), Instant::now());
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        let (_conn, _lease) = p.opened(&k, sender().await, 0);
        let other = ("127.0.0.2:9000".parse().unwrap(), k.1.clone());
        p.mark_fallback(&other, now);
        let d = p.dump(now);
        let peer = &d["peers"][0];
        assert_eq!(peer["address"], "127.0.0.1:9000");
        assert_eq!(
            peer["identity"],
            "spiffe://cluster.local/ns/default/sa/store"
        );
        assert_eq!(peer["connections"][0]["streams"], 1);
        assert_eq!(peer["connections"][0]["takes_new_streams"], true);
        assert_eq!(peer["connecting"], 0);
        assert_eq!(d["direct"][0]["address"], "127.0.0.2:9000");
        assert_eq!(d["direct"][0]["for_s"], 300);
    }

    #[tokio::test]
    async fn full_pool_oversubscribes_the_least_busy_connection() {
        let (p, k, now) = (pool(2, 1), key(), Instant::now());
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        let (a, _la) = p.opened(&k, sender().await, 0);
        // `a` is full: another connection.
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        let (b, lb) = p.opened(&k, sender().await, 0);
        assert_ne!(a.id, b.id);
        drop(lb);
        // `b` has room again: it takes the stream.
        let l = lease(p.checkout(&k, 0, now));
        assert_eq!(l.conn().id, b.id);
        // Both full, both connections open: the least busy one gets a second stream.
        let extra = lease(p.checkout(&k, 0, now));
        assert_eq!(extra.conn().active.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn callers_wait_while_only_connections_being_opened_exist() {
        let (p, k, now) = (pool(1, 10), key(), Instant::now());
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Wait));
        p.open_failed(&k);
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
    }

    #[tokio::test]
    async fn a_new_generation_gets_a_new_connection_and_the_old_closes_when_idle() {
        let (p, k, now) = (pool(4, 10), key(), Instant::now());
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        let (old, l) = p.opened(&k, sender().await, 0);
        // New streams of another generation (the trust bundle or our certificate changed)
        // do not go on a connection of the old one.
        assert!(matches!(p.checkout(&k, 1, now), Checkout::Open));
        let (new, _l2) = p.opened(&k, sender().await, 1);
        assert_ne!(old.id, new.id);
        assert_eq!(lease(p.checkout(&k, 1, now)).conn().id, new.id);
        // `old` is of the context's generation (0, nothing installed): it closes once it has
        // no stream and was idle for the idle timeout.
        assert!(!p.retire_if_done(&k, &old, now), "old still has a stream");
        drop(l);
        assert!(
            !p.retire_if_done(&k, &old, now),
            "current and not idle long"
        );
        assert!(p.retire_if_done(&k, &old, now + Duration::from_secs(61)));
    }

    #[tokio::test]
    async fn stale_connections_close_when_their_last_stream_ends() {
        let (p, k, now) = (pool(4, 10), key(), Instant::now());
        assert!(matches!(p.checkout(&k, 7, now), Checkout::Open));
        let (conn, l) = p.opened(&k, sender().await, 7);
        assert!(!p.retire_if_done(&k, &conn, now), "a stream is still on it");
        drop(l);
        // Generation 7 is not the context's (0): retired at once, and it left the pool.
        assert!(p.retire_if_done(&k, &conn, now));
        assert!(matches!(p.checkout(&k, 7, now), Checkout::Open));
    }

    #[tokio::test]
    async fn old_connections_take_no_new_streams() {
        let (p, k, now) = (pool(4, 10), key(), Instant::now());
        assert!(matches!(p.checkout(&k, 0, now), Checkout::Open));
        let (_conn, _l) = p.opened(&k, sender().await, 0);
        let later = now + Duration::from_secs(601);
        assert!(matches!(p.checkout(&k, 0, later), Checkout::Open));
    }

    #[test]
    fn fallback_is_remembered_for_a_while() {
        let (p, k, now) = (pool(1, 1), key(), Instant::now());
        assert!(!p.falls_back(&k, now));
        p.mark_fallback(&k, now);
        assert!(p.falls_back(&k, now + Duration::from_secs(299)));
        assert!(!p.falls_back(&k, now + Duration::from_secs(301)));
    }
}
