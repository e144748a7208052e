//! Forwarding names the mesh does not own to the upstream resolvers: the query as the app sent
//! it (EDNS and flags included) under a fresh random id, from a fresh UDP socket (a random
//! source port: an off-path spoofer must guess both); a truncated UDP answer is asked again
//! over TCP (RFC 7766). Answers are checked before they are relayed: same id, a response, the
//! same question (hickory-proto's name comparison ignores case, so upstreams using 0x20
//! randomisation pass). Upstreams are tried in order, each within its share of the forward
//! timeout; one that fails, times out or answers SERVFAIL / REFUSED hands over to the next.
//!
//! The sidecar's own sockets are never captured (`weft-proxy init` exempts its uid / gid), so
//! these queries leave the namespace instead of coming back to the mesh DNS server.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Header, Message, MessageType, ResponseCode};
use hickory_proto::serialize::binary::{BinDecodable as _, BinDecoder};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

/// Most upstreams asked for one query (glibc's MAXNS).
const MAX_TRIED: usize = 3;
/// Datagrams that are not the answer (stale, spoofed) ignored per attempt before giving up.
const MAX_STRAY_DATAGRAMS: usize = 16;
/// Largest DNS message (UDP datagram or TCP frame).
const MAX_MESSAGE: usize = 65_535;

/// Why a query could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The query could not be encoded.
    #[error("encoding the query: {0}")]
    Encode(String),
    /// Every upstream failed; the last failure.
    #[error("{upstream}: {reason}")]
    Upstream {
        /// The last upstream tried.
        upstream: SocketAddr,
        /// What went wrong there.
        reason: String,
    },
}

/// The upstream resolvers and the time budget of one query.
#[derive(Debug, Clone)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    /// Asks `upstreams` in order, within `timeout` per query.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self { upstreams, timeout }
    }

    /// The upstreams, in order.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The upstreams' answer to `request`, with `request`'s id.
    pub async fn forward(&self, request: &Message) -> Result<Message, ForwardError> {
        let tried: Vec<SocketAddr> = self.upstreams.iter().take(MAX_TRIED).copied().collect();
        let Some(&first) = tried.first() else {
            return Err(ForwardError::Upstream {
                upstream: SocketAddr::from((Ipv4Addr::LOCALHOST, 53)),
                reason: "no upstream resolver".into(),
            });
        };
        let deadline = Instant::now() + self.timeout;
        let share = self.timeout / u32::try_from(tried.len()).unwrap_or(1);
        let mut last = ForwardError::Upstream {
            upstream: first,
            reason: "not asked".into(),
        };
        for (i, upstream) in tried.iter().enumerate() {
            let mut outgoing = request.clone();
            outgoing.metadata.id = rand::random();
            let bytes = outgoing
                .to_vec()
                .map_err(|e| ForwardError::Encode(e.to_string()))?;
            // The last upstream gets whatever is left; the others their share.
            let attempt_deadline = if i + 1 == tried.len() {
                deadline
            } else {
                (Instant::now() + share).min(deadline)
            };
            match ask(*upstream, &outgoing, &bytes, attempt_deadline).await {
                Ok(mut answer) => {
                    let rcode = answer.metadata.response_code;
                    let retry_elsewhere =
                        matches!(rcode, ResponseCode::ServFail | ResponseCode::Refused);
                    answer.metadata.id = request.metadata.id;
                    if !retry_elsewhere || i + 1 == tried.len() {
                        return Ok(answer);
                    }
                    last = ForwardError::Upstream {
                        upstream: *upstream,
                        reason: format!("answered {rcode}"),
                    };
                }
                Err(reason) => {
                    tracing::debug!(%upstream, %reason, "mesh DNS: upstream failed");
                    last = ForwardError::Upstream {
                        upstream: *upstream,
                        reason,
                    };
                }
            }
        }
        Err(last)
    }
}

/// One upstream: UDP, then TCP if the UDP answer is truncated.
async fn ask(
    upstream: SocketAddr,
    outgoing: &Message,
    bytes: &[u8],
    deadline: Instant,
) -> Result<Message, String> {
    let answer = timeout_at(deadline, udp(upstream, outgoing, bytes))
        .await
        .map_err(|_| "no answer over UDP in time".to_owned())??;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    timeout_at(deadline, tcp(upstream, outgoing, bytes))
        .await
        .map_err(|_| "truncated over UDP, and no answer over TCP in time".to_owned())?
}

async fn udp(upstream: SocketAddr, outgoing: &Message, bytes: &[u8]) -> Result<Message, String> {
    let local = if upstream.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    let sock = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    // Connected: the kernel drops datagrams from anyone else, and ICMP errors surface.
    sock.connect(upstream)
        .await
        .map_err(|e| format!("UDP connect: {e}"))?;
    sock.send(bytes)
        .await
        .map_err(|e| format!("UDP send: {e}"))?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    for _ in 0..MAX_STRAY_DATAGRAMS {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| format!("UDP receive: {e}"))?;
        if let Some(answer) = answer_to(outgoing, &buf[..n]) {
            return Ok(answer);
        }
    }
    Err(format!(
        "{MAX_STRAY_DATAGRAMS} datagrams that were not the answer"
    ))
}

async fn tcp(upstream: SocketAddr, outgoing: &Message, bytes: &[u8]) -> Result<Message, String> {
    let len = u16::try_from(bytes.len()).map_err(|_| "query too large for TCP".to_owned())?;
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("TCP connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut frame = Vec::with_capacity(bytes.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(bytes);
    stream
        .write_all(&frame)
        .await
        .map_err(|e| format!("TCP send: {e}"))?;
    let n = usize::from(
        stream
            .read_u16()
            .await
            .map_err(|e| format!("TCP receive: {e}"))?,
    );
    let mut buf = vec![0u8; n];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| format!("TCP receive: {e}"))?;
    answer_to(outgoing, &buf).ok_or_else(|| "TCP answer does not match the query".to_owned())
}

/// `bytes` parsed if it is the answer to `outgoing`: a response with its id and question.
fn answer_to(outgoing: &Message, bytes: &[u8]) -> Option<Message> {
    let header = Header::read(&mut BinDecoder::new(bytes)).ok()?;
    if header.metadata.id != outgoing.metadata.id
        || header.metadata.message_type != MessageType::Response
        || header.counts.queries != 1
    {
        return None;
    }
    let answer = Message::from_vec(bytes).ok()?;
    (answer.queries == outgoing.queries).then_some(answer)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, TXT};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use tokio::net::TcpListener;

    use super::*;

    pub(crate) fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 0x4242;
        m.metadata.recursion_desired = true;
        // As on the wire: fully qualified.
        let mut name = Name::from_ascii(name).unwrap();
        name.set_fqdn(true);
        m.add_query(Query::query(name, qtype));
        m
    }

    /// A fake upstream on loopback (UDP and TCP on one port): answers `name` A 192.0.2.1, and
    /// `big.` TXT with ~2 KB of text, truncated (TC, no records) over UDP. Counts what it got.
    pub(crate) struct FakeUpstream {
        pub addr: SocketAddr,
        pub udp_queries: Arc<AtomicUsize>,
        pub tcp_queries: Arc<AtomicUsize>,
    }

    fn answer(request: &Message, over_udp: bool) -> Message {
        let mut m = Message::response(request.metadata.id, request.metadata.op_code);
        m.metadata.recursion_available = true;
        m.add_queries(request.queries.iter().cloned());
        let q = &request.queries[0];
        if q.name().to_ascii() == "big." {
            if over_udp {
                m.metadata.truncation = true;
            } else {
                for i in 0..8 {
                    m.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::TXT(TXT::new(vec![format!("{i}:{}", "x".repeat(250))])),
                    ));
                }
            }
        } else if q.name().to_ascii() == "refused." {
            m.metadata.response_code = ResponseCode::Refused;
        } else {
            m.add_answer(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        }
        m
    }

    impl FakeUpstream {
        pub(crate) async fn start() -> FakeUpstream {
            // UDP on a free port, then TCP on the same number, which some other socket of this
            // busy machine may hold (a connection's ephemeral local port): try another port.
            let mut tries = 0;
            let (udp, tcp, addr) = loop {
                let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let addr = udp.local_addr().unwrap();
                match TcpListener::bind(addr).await {
                    Ok(tcp) => break (udp, tcp, addr),
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 100 => {
                        tries += 1;
                    }
                    Err(e) => panic!("TCP on {addr}: {e}"),
                }
            };
            let (udp_queries, tcp_queries) =
                (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let counted = Arc::clone(&udp_queries);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let request = Message::from_vec(&buf[..n]).unwrap();
                    let out = answer(&request, true).to_vec().unwrap();
                    let _ = udp.send_to(&out, peer).await;
                }
            });
            let counted = Arc::clone(&tcp_queries);
            tokio::spawn(async move {
                while let Ok((mut s, _)) = tcp.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let n = usize::from(s.read_u16().await.unwrap());
                    let mut buf = vec![0u8; n];
                    s.read_exact(&mut buf).await.unwrap();
                    let request = Message::from_vec(&buf).unwrap();
                    let out = answer(&request, false).to_vec().unwrap();
                    let len = u16::try_from(out.len()).unwrap().to_be_bytes();
                    s.write_all(&[&len[..], &out].concat()).await.unwrap();
                }
            });
            FakeUpstream {
                addr,
                udp_queries,
                tcp_queries,
            }
        }
    }

    #[tokio::test]
    async fn answers_come_back_with_the_clients_id() {
        let up = FakeUpstream::start().await;
        let f = Forwarder::new(vec![up.addr], Duration::from_secs(2));
        let a = f
            .forward(&query("example.com.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(a.metadata.id, 0x4242);
        assert_eq!(a.answers[0].data.to_string(), "192.0.2.1");
        assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
        assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_truncated_udp_answer_is_asked_again_over_tcp() {
        let up = FakeUpstream::start().await;
        let f = Forwarder::new(vec![up.addr], Duration::from_secs(2));
        let a = f.forward(&query("big.", RecordType::TXT)).await.unwrap();
        assert!(!a.metadata.truncation);
        assert_eq!(a.answers.len(), 8);
        assert!(a.to_vec().unwrap().len() > 2000);
        assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
        assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_silent_upstream_hands_over_to_the_next_within_the_timeout() {
        // Bound and never read: queries to it are lost.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up = FakeUpstream::start().await;
        let f = Forwarder::new(
            vec![silent.local_addr().unwrap(), up.addr],
            Duration::from_secs(2),
        );
        let a = f
            .forward(&query("example.com.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(a.answers.len(), 1);
        // Alone, the silent upstream is an error after the timeout, naming it.
        let f = Forwarder::new(
            vec![silent.local_addr().unwrap()],
            Duration::from_millis(100),
        );
        let e = f
            .forward(&query("example.com.", RecordType::A))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(&silent.local_addr().unwrap().to_string()),
            "{e}"
        );
    }

    #[tokio::test]
    async fn refused_moves_on_and_the_last_answer_is_relayed() {
        let (a, b) = (FakeUpstream::start().await, FakeUpstream::start().await);
        let f = Forwarder::new(vec![a.addr, b.addr], Duration::from_secs(2));
        let r = f.forward(&query("refused.", RecordType::A)).await.unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert_eq!(a.udp_queries.load(Ordering::SeqCst), 1);
        assert_eq!(b.udp_queries.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn only_the_answer_to_the_query_is_accepted() {
        let q = query("example.com.", RecordType::A);
        let good = answer(&q, true);
        assert!(answer_to(&q, &good.to_vec().unwrap()).is_some());
        let mut wrong_id = good;
        wrong_id.metadata.id ^= 1;
        assert!(answer_to(&q, &wrong_id.to_vec().unwrap()).is_none());
        let other = answer(&query("other.com.", RecordType::A), true);
        assert!(answer_to(&q, &other.to_vec().unwrap()).is_none());
        assert!(
            answer_to(&q, &q.to_vec().unwrap()).is_none(),
            "a query is no answer"
        );
        // Case differences (0x20) are fine.
        let upper = answer(&query("EXAMPLE.com.", RecordType::A), true);
        assert!(answer_to(&q, &upper.to_vec().unwrap()).is_some());
    }
}
