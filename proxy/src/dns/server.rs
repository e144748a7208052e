//! The mesh DNS server's sockets: UDP and TCP on each listen address, every input bounded.
//!
//! - **Query size**: at most [`MAX_QUERY_BYTES`]; a larger UDP datagram is dropped, a larger
//!   TCP frame closes the connection (`refused`).
//! - **Forwards**: at most `max_concurrent_forwards` in flight; past it a query is answered
//!   REFUSED at once (`refused`), never queued. Each forward is bounded by the forward timeout
//!   (SERVFAIL past it, `error`).
//! - **TCP clients**: at most [`MAX_TCP_CONNECTIONS`] open (more are closed at accept), each
//!   closed after [`TCP_IDLE_TIMEOUT`] without a complete query; queries on one connection are
//!   answered in order.
//!
//! Mesh answers are computed in the receive loop (a table lookup); forwards run as their own
//! tasks, so a slow upstream never holds the UDP socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::answer::{self, Decision, Outcome, TCP_MAX_MESSAGE};
use super::forward::Forwarder;
use super::metrics::DnsQueryMetrics;
use super::names::NameCache;

/// Largest query accepted (a question with EDNS options is a few hundred bytes).
pub const MAX_QUERY_BYTES: usize = 4096;
/// Most TCP client connections open at once.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP client must send its next complete query within this.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a query came in: what an answer may weigh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Over UDP: at most the client's EDNS payload size (512 without EDNS).
    Udp,
    /// Over TCP: up to 64 KiB.
    Tcp,
}

/// What the server shares between its sockets.
#[derive(Debug)]
pub struct MeshDns {
    names: NameCache,
    forwarder: Forwarder,
    metrics: DnsQueryMetrics,
    forwards: Arc<Semaphore>,
}

/// A query's fate, decided without waiting.
pub enum Handled {
    /// Send this (or nothing).
    Now(Option<Vec<u8>>),
    /// Forward it (the permit holds its forward slot).
    Later(Message, OwnedSemaphorePermit),
}

impl MeshDns {
    /// The server's state: names from `names`, other names to `forwarder`, at most
    /// `max_forwards` forwards in flight.
    pub fn new(
        names: NameCache,
        forwarder: Forwarder,
        metrics: DnsQueryMetrics,
        max_forwards: usize,
    ) -> Self {
        Self {
            names,
            forwarder,
            metrics,
            forwards: Arc::new(Semaphore::new(max_forwards)),
        }
    }

    /// The name table cache.
    pub fn names(&self) -> &NameCache {
        &self.names
    }

    /// Decides what `query` gets; counts it unless it is forwarded (counted when the forward
    /// ends).
    pub fn handle(&self, query: &[u8], transport: Transport) -> Handled {
        if query.len() > MAX_QUERY_BYTES {
            self.metrics.record(Outcome::Refused);
            return Handled::Now(None);
        }
        let names = self.names.get();
        match answer::decide(query, names.as_deref()) {
            Decision::Drop => {
                self.metrics.record(Outcome::Refused);
                Handled::Now(None)
            }
            Decision::Reply(response, outcome) => {
                self.metrics.record(outcome);
                Handled::Now(answer::encode(&response, limit(&response, transport)))
            }
            Decision::Forward(request) => match Arc::clone(&self.forwards).try_acquire_owned() {
                Ok(permit) => Handled::Later(request, permit),
                Err(_) => {
                    tracing::debug!("mesh DNS: too many forwards in flight; REFUSED");
                    self.metrics.record(Outcome::Refused);
                    let response = answer::respond(&request, ResponseCode::Refused, false);
                    Handled::Now(answer::encode(&response, limit(&request, transport)))
                }
            },
        }
    }

    /// Forwards `request` and returns what to send back (the upstream's answer fitted to the
    /// client's transport, else SERVFAIL).
    pub async fn forward(
        &self,
        request: Message,
        permit: OwnedSemaphorePermit,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let result = self.forwarder.forward(&request).await;
        drop(permit);
        let response = match result {
            Ok(answer) => {
                self.metrics.record(Outcome::Forwarded);
                answer
            }
            Err(e) => {
                let name = request.queries.first().map(|q| q.name().to_ascii());
                tracing::debug!(name = ?name, error = %e, "mesh DNS: forward failed; SERVFAIL");
                self.metrics.record(Outcome::Error);
                answer::respond(&request, ResponseCode::ServFail, false)
            }
        };
        answer::encode(&response, limit(&request, transport))
    }

    /// [`MeshDns::handle`] then, for a forward, [`MeshDns::forward`].
    pub async fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.handle(query, transport) {
            Handled::Now(bytes) => bytes,
            Handled::Later(request, permit) => self.forward(request, permit, transport).await,
        }
    }
}

fn limit(message: &Message, transport: Transport) -> usize {
    match transport {
        Transport::Udp => answer::udp_limit(message),
        Transport::Tcp => TCP_MAX_MESSAGE,
    }
}

/// Serves UDP queries on `sock` until the process ends.
pub async fn serve_udp(sock: UdpSocket, dns: Arc<MeshDns>) {
    let sock = Arc::new(sock);
    // One byte more than accepted: a datagram that fills it was too large.
    let mut buf = vec![0u8; MAX_QUERY_BYTES + 1];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "mesh DNS: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match dns.handle(&buf[..n], Transport::Udp) {
            Handled::Now(Some(bytes)) => send(&sock, &bytes, peer).await,
            Handled::Now(None) => {}
            Handled::Later(request, permit) => {
                let (sock, dns) = (Arc::clone(&sock), Arc::clone(&dns));
                tokio::spawn(async move {
                    if let Some(bytes) = dns.forward(request, permit, Transport::Udp).await {
                        send(&sock, &bytes, peer).await;
                    }
                });
            }
        }
    }
}

async fn send(sock: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, peer).await {
        tracing::debug!(%peer, error = %e, "mesh DNS: UDP send failed");
    }
}

/// Serves TCP clients on `listener` until the process ends.
pub async fn serve_tcp(listener: TcpListener, dns: Arc<MeshDns>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "mesh DNS: TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "mesh DNS: too many TCP clients; closing");
            continue;
        };
        let dns = Arc::clone(&dns);
        tokio::spawn(async move {
            let _slot = slot;
            tcp_client(stream, &dns).await;
        });
    }
}

/// One TCP client: length-prefixed queries (RFC 1035 §4.2.2), answered in order.
async fn tcp_client(mut stream: TcpStream, dns: &MeshDns) {
    let _ = stream.set_nodelay(true);
    loop {
        let read = async {
            let len = usize::from(stream.read_u16().await?);
            if len == 0 || len > MAX_QUERY_BYTES {
                return Ok(None);
            }
            let mut buf = vec![0u8; len];
            stream.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(Some(buf))
        };
        let query = match tokio::time::timeout(TCP_IDLE_TIMEOUT, read).await {
            Ok(Ok(Some(q))) => q,
            Ok(Ok(None)) => {
                dns.metrics.record(Outcome::Refused);
                return;
            }
            // Closed, broken, or idle too long.
            Ok(Err(_)) | Err(_) => return,
        };
        let Some(bytes) = dns.answer(&query, Transport::Tcp).await else {
            continue;
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return;
        };
        let mut frame = Vec::with_capacity(bytes.len() + 2);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&bytes);
        if stream.write_all(&frame).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use hickory_proto::op::Edns;
    use hickory_proto::rr::RecordType;

    use super::*;
    use crate::dns::forward::tests::{query, FakeUpstream};
    use crate::dns::names::tests::snapshot;
    use crate::snapshot::SnapshotStore;

    struct Server {
        udp: SocketAddr,
        tcp: SocketAddr,
        dns: Arc<MeshDns>,
    }

    async fn server(upstream: SocketAddr, max_forwards: usize) -> Server {
        let store = Arc::new(SnapshotStore::empty());
        store.store(Some(snapshot()));
        let names = NameCache::new(store, "cluster.local".into(), "default".into());
        let forwarder = Forwarder::new(vec![upstream], Duration::from_millis(500));
        let dns = Arc::new(MeshDns::new(
            names,
            forwarder,
            DnsQueryMetrics::unregistered(),
            max_forwards,
        ));
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Server {
            udp: udp.local_addr().unwrap(),
            tcp: tcp.local_addr().unwrap(),
            dns: Arc::clone(&dns),
        };
        tokio::spawn(serve_udp(udp, Arc::clone(&dns)));
        tokio::spawn(serve_tcp(tcp, dns));
        s
    }

    async fn ask_udp(server: SocketAddr, q: &Message) -> Message {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
        let mut buf = vec![0u8; 65_535];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("an answer within 5s")
            .unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    async fn ask_tcp(stream: &mut TcpStream, q: &Message) -> Message {
        let bytes = q.to_vec().unwrap();
        let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
        stream
            .write_all(&[&len[..], &bytes].concat())
            .await
            .unwrap();
        let n = usize::from(stream.read_u16().await.unwrap());
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).unwrap()
    }

    fn count(s: &Server, o: Outcome) -> u64 {
        s.dns.metrics.get(o).get()
    }

    #[tokio::test]
    async fn mesh_names_are_answered_and_others_forwarded_over_udp_and_tcp() {
        let up = FakeUpstream::start().await;
        let s = server(up.addr, 16).await;
        let a = ask_udp(
            s.udp,
            &query("api.default.svc.cluster.local.", RecordType::A),
        )
        .await;
        assert_eq!(a.answers[0].data.to_string(), "10.96.0.10");
        let a = ask_udp(s.udp, &query("example.com.", RecordType::A)).await;
        assert_eq!(a.metadata.id, 0x4242);
        assert_eq!(a.answers[0].data.to_string(), "192.0.2.1");
        assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
        // Two queries on one TCP connection, in order.
        let mut c = TcpStream::connect(s.tcp).await.unwrap();
        let a = ask_tcp(&mut c, &query("web.shop.", RecordType::AAAA)).await;
        assert_eq!(a.answers[0].data.to_string(), "fd00:96::7");
        let a = ask_tcp(&mut c, &query("example.org.", RecordType::A)).await;
        assert_eq!(a.answers[0].data.to_string(), "192.0.2.1");
        let a = ask_tcp(&mut c, &query("db.default.", RecordType::A)).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(count(&s, Outcome::Mesh), 2);
        assert_eq!(count(&s, Outcome::Forwarded), 2);
        assert_eq!(count(&s, Outcome::Nxdomain), 1);
    }

    #[tokio::test]
    async fn a_large_forwarded_answer_is_truncated_for_a_small_udp_client_and_whole_over_tcp() {
        let up = FakeUpstream::start().await;
        let s = server(up.addr, 16).await;
        // 512 bytes without EDNS: TC, so the client retries over TCP.
        let a = ask_udp(s.udp, &query("big.", RecordType::TXT)).await;
        assert!(a.metadata.truncation && a.answers.is_empty());
        // The forwarder itself got the whole answer over TCP after the upstream's TC.
        assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
        // A client with a 4096-byte EDNS buffer gets all of it over UDP.
        let mut q = query("big.", RecordType::TXT);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.set_edns(edns);
        let a = ask_udp(s.udp, &q).await;
        assert!(!a.metadata.truncation);
        assert_eq!(a.answers.len(), 8);
        let mut c = TcpStream::connect(s.tcp).await.unwrap();
        let a = ask_tcp(&mut c, &query("big.", RecordType::TXT)).await;
        assert_eq!(a.answers.len(), 8);
    }

    #[tokio::test]
    async fn failures_limits_and_garbage_are_counted() {
        // An upstream that never answers: SERVFAIL after the forward timeout.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let s = server(silent.local_addr().unwrap(), 1).await;
        let a = ask_udp(s.udp, &query("example.com.", RecordType::A)).await;
        assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(count(&s, Outcome::Error), 1);
        // One forward slot: while it is held, the next forward is REFUSED at once.
        let Handled::Later(request, permit) = s.dns.handle(
            &query("a.example.", RecordType::A).to_vec().unwrap(),
            Transport::Udp,
        ) else {
            panic!("not forwarded")
        };
        let a = ask_udp(s.udp, &query("b.example.", RecordType::A)).await;
        assert_eq!(a.metadata.response_code, ResponseCode::Refused);
        assert_eq!(count(&s, Outcome::Refused), 1);
        drop((request, permit));
        // Oversized and garbage datagrams get nothing; the server keeps serving.
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&vec![0u8; MAX_QUERY_BYTES + 100], s.udp)
            .await
            .unwrap();
        sock.send_to(b"\x01", s.udp).await.unwrap();
        let a = ask_udp(s.udp, &query("api.", RecordType::A)).await;
        assert_eq!(a.answers.len(), 1);
        assert_eq!(count(&s, Outcome::Refused), 3);
        // A TCP frame over the limit closes the connection.
        let mut c = TcpStream::connect(s.tcp).await.unwrap();
        c.write_all(&u16::try_from(MAX_QUERY_BYTES + 1).unwrap().to_be_bytes())
            .await
            .unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("closed within 5s")
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(count(&s, Outcome::Refused), 4);
    }
}
