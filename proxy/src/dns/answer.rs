//! What to do with one DNS query, and the answers the mesh DNS server writes itself: pure
//! functions over hickory-proto messages (no I/O), so every rule is tested without sockets.
//!
//! - Not a well-formed standard query (unparsable, a response, not exactly one question):
//!   FORMERR when a header can be read, else dropped; another opcode: NOTIMP. `refused`.
//! - A mesh name ([`super::names`]) with a VIP: the VIP as an `A` (IPv4) or `AAAA` (IPv6)
//!   record for that type (and `ANY`); for any other type, or the other family, NODATA
//!   (NOERROR, no answer: the name exists). `mesh`.
//! - A mesh name without a VIP: NXDOMAIN (the mesh holds no record of any type for it, and
//!   none below it). `nxdomain`.
//! - Anything else: forwarded upstream ([`super::forward`]).
//!
//! The server's own answers are authoritative (AA) and say recursion is available (RA: other
//! names are forwarded); they echo the question, the RD and CD bits, and an EDNS OPT when the
//! query had one (RFC 6891 §7). Mesh records carry [`MESH_TTL`].

use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable as _, BinDecoder};

use super::names::{Lookup, MeshNames};

/// TTL of mesh answers, in seconds: short, so a VIP change reaches apps quickly.
pub const MESH_TTL: u32 = 5;
/// The UDP payload size this server advertises in its OPT records (RFC 9715's safe size).
pub const ADVERTISED_PAYLOAD: u16 = 1232;
/// Largest response over TCP (its length prefix is 16 bits).
pub const TCP_MAX_MESSAGE: usize = 65_535;

/// The `result` label of `weft_dns_queries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered from the mesh's names (records or NODATA).
    Mesh,
    /// Relayed from an upstream resolver.
    Forwarded,
    /// A mesh name without a VIP: NXDOMAIN.
    Nxdomain,
    /// SERVFAIL: the upstreams failed, or no configuration yet.
    Error,
    /// Not answered as asked: malformed, unsupported, oversized, or over the forward limit.
    Refused,
}

impl Outcome {
    /// Every value, in label order.
    pub const ALL: [Outcome; 5] = [
        Self::Mesh,
        Self::Forwarded,
        Self::Nxdomain,
        Self::Error,
        Self::Refused,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mesh => "mesh",
            Self::Forwarded => "forwarded",
            Self::Nxdomain => "nxdomain",
            Self::Error => "error",
            Self::Refused => "refused",
        }
    }
}

/// What to do with a query.
#[derive(Debug)]
pub enum Decision {
    /// Send this answer.
    Reply(Message, Outcome),
    /// Ask the upstream resolvers (the query, parsed).
    Forward(Message),
    /// Send nothing (not even an error can be addressed).
    Drop,
}

/// Decides what a query's bytes get. `names` is `None` before the first configuration: every
/// query then gets SERVFAIL (a mesh name cannot be told from another yet, and answering
/// NXDOMAIN or forwarding it would give the app a wrong, possibly cached, answer).
pub fn decide(query: &[u8], names: Option<&MeshNames>) -> Decision {
    let Ok(header) = Header::read(&mut BinDecoder::new(query)) else {
        return Decision::Drop;
    };
    if header.metadata.message_type != MessageType::Query {
        // Never answer a response: that is how reflection loops start.
        return Decision::Drop;
    }
    if header.metadata.op_code != OpCode::Query {
        return Decision::Reply(bare(&header, ResponseCode::NotImp), Outcome::Refused);
    }
    // Checked before decoding the rest: a query has exactly one question (RFC 9619), and the
    // decoder would reserve room for as many as the header claims.
    if header.counts.queries != 1 {
        return Decision::Reply(bare(&header, ResponseCode::FormErr), Outcome::Refused);
    }
    let Ok(request) = Message::from_vec(query) else {
        return Decision::Reply(bare(&header, ResponseCode::FormErr), Outcome::Refused);
    };
    let Some(names) = names else {
        return Decision::Reply(
            respond(&request, ResponseCode::ServFail, false),
            Outcome::Error,
        );
    };
    let Some(question) = request.queries.first() else {
        return Decision::Reply(bare(&header, ResponseCode::FormErr), Outcome::Refused);
    };
    if question.query_class() != DNSClass::IN {
        return Decision::Forward(request);
    }
    let name = question.name().to_ascii();
    match names.lookup(&name) {
        Lookup::NotMesh => Decision::Forward(request),
        Lookup::NoVip => Decision::Reply(
            respond(&request, ResponseCode::NXDomain, true),
            Outcome::Nxdomain,
        ),
        Lookup::Vip(ip) => {
            let qtype = question.query_type();
            let mut response = respond(&request, ResponseCode::NoError, true);
            let wanted = matches!(
                (qtype, ip),
                (RecordType::A | RecordType::ANY, IpAddr::V4(_))
                    | (RecordType::AAAA | RecordType::ANY, IpAddr::V6(_))
            );
            if wanted {
                let data = match ip {
                    IpAddr::V4(v4) => RData::A(A::from(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA::from(v6)),
                };
                // The owner is the name as asked (its case included, RFC 4343).
                response.add_answer(Record::from_rdata(question.name().clone(), MESH_TTL, data));
            }
            Decision::Reply(response, Outcome::Mesh)
        }
    }
}

/// A response to `request` with `rcode` and no records: the question echoed, RD and CD copied,
/// RA set, AA when the server `authoritative`ly answers for the name, and an OPT record when
/// the query had one.
pub fn respond(request: &Message, rcode: ResponseCode, authoritative: bool) -> Message {
    let mut m = Message::response(request.metadata.id, request.metadata.op_code);
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.checking_disabled = request.metadata.checking_disabled;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = authoritative;
    m.metadata.response_code = rcode;
    m.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(ADVERTISED_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// An error answer when only the header could be read: no question.
fn bare(header: &Header, rcode: ResponseCode) -> Message {
    let mut m = Message::error_msg(header.metadata.id, header.metadata.op_code, rcode);
    m.metadata.recursion_desired = header.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m
}

/// The most bytes an answer to `request` may have over UDP: its EDNS payload size (at least
/// 512, RFC 6891 §6.2.5), at most [`TCP_MAX_MESSAGE`].
pub fn udp_limit(request: &Message) -> usize {
    usize::from(request.max_payload()).min(TCP_MAX_MESSAGE)
}

/// `response` encoded within `limit` bytes: as is when it fits, else truncated (header,
/// question and OPT, TC set: the client retries over TCP). `None` if it cannot be encoded.
pub fn encode(response: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let bytes = response.truncate().to_vec().ok()?;
    (bytes.len() <= limit).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;
    use crate::dns::names::tests::snapshot;

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        // As on the wire: fully qualified.
        let mut name = Name::from_ascii(name).unwrap();
        name.set_fqdn(true);
        m.add_query(Query::query(name, qtype));
        m
    }

    fn names() -> MeshNames {
        MeshNames::build(&snapshot(), "cluster.local", "default")
    }

    fn reply(q: &Message) -> (Message, Outcome) {
        match decide(&q.to_vec().unwrap(), Some(&names())) {
            Decision::Reply(m, o) => (m, o),
            other => panic!("not a reply: {other:?}"),
        }
    }

    fn addresses(m: &Message) -> Vec<String> {
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn a_mesh_name_gets_its_vip_authoritatively() {
        for name in ["api", "api.default.", "Api.Default.Svc.Cluster.Local."] {
            let (m, o) = reply(&query(name, RecordType::A));
            assert_eq!(o, Outcome::Mesh);
            assert_eq!(m.metadata.id, 0x1234);
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert!(m.metadata.authoritative && m.metadata.recursion_available);
            assert!(m.metadata.recursion_desired, "RD is copied");
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert_eq!(addresses(&m), ["10.96.0.10"], "{name}");
            assert_eq!(m.answers[0].ttl, MESH_TTL);
            assert_eq!(
                m.answers[0].name,
                query(name, RecordType::A).queries[0].name().clone()
            );
            assert_eq!(
                m.answers[0].name.to_ascii().trim_end_matches('.'),
                name.trim_end_matches('.'),
                "the owner keeps the case asked"
            );
            assert_eq!(m.queries, query(name, RecordType::A).queries);
        }
        let (m, _) = reply(&query("web.shop", RecordType::AAAA));
        assert_eq!(addresses(&m), ["fd00:96::7"]);
        let (m, _) = reply(&query("web.shop", RecordType::ANY));
        assert_eq!(addresses(&m), ["fd00:96::7"]);
    }

    #[test]
    fn other_types_of_a_mesh_name_are_nodata_and_a_name_without_vip_is_nxdomain() {
        // The other family, and types the mesh has no records of: NOERROR, empty (the name
        // exists: NXDOMAIN here would make a resolver drop the A answer too).
        for (name, t) in [
            ("api", RecordType::AAAA),
            ("api", RecordType::MX),
            ("api", RecordType::TXT),
            ("web.shop", RecordType::A),
        ] {
            let (m, o) = reply(&query(name, t));
            assert_eq!(
                (o, m.metadata.response_code),
                (Outcome::Mesh, ResponseCode::NoError)
            );
            assert!(
                m.answers.is_empty() && m.metadata.authoritative,
                "{name} {t}"
            );
        }
        for t in [RecordType::A, RecordType::AAAA] {
            let (m, o) = reply(&query("db.default.svc.cluster.local", t));
            assert_eq!(o, Outcome::Nxdomain);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
            assert!(m.answers.is_empty() && m.metadata.authoritative);
        }
    }

    #[test]
    fn other_names_and_classes_are_forwarded() {
        for q in [
            query("example.com", RecordType::A),
            query("api.default.svc.elsewhere", RecordType::A),
            query("x.api.default", RecordType::A),
        ] {
            assert!(
                matches!(decide(&q.to_vec().unwrap(), Some(&names())), Decision::Forward(f) if f == q)
            );
        }
        let mut chaos = query("api", RecordType::TXT);
        chaos.queries[0].set_query_class(DNSClass::CH);
        assert!(matches!(
            decide(&chaos.to_vec().unwrap(), Some(&names())),
            Decision::Forward(_)
        ));
    }

    #[test]
    fn malformed_and_unsupported_queries_are_refused() {
        let names = names();
        let outcome = |bytes: &[u8]| match decide(bytes, Some(&names)) {
            Decision::Reply(m, o) => Some((m.metadata.response_code, o)),
            Decision::Forward(_) => panic!("forwarded"),
            Decision::Drop => None,
        };
        // Too short for a header: nothing can be addressed.
        assert_eq!(outcome(&[0x12, 0x34, 0x01]), None);
        // A response is never answered (no reflection loops).
        let mut resp = query("api", RecordType::A);
        resp.metadata.message_type = MessageType::Response;
        assert_eq!(outcome(&resp.to_vec().unwrap()), None);
        // Two questions, none, a truncated question: FORMERR.
        let mut two = query("api", RecordType::A);
        two.add_query(Query::query(Name::from_ascii("db").unwrap(), RecordType::A));
        assert_eq!(
            outcome(&two.to_vec().unwrap()),
            Some((ResponseCode::FormErr, Outcome::Refused))
        );
        let mut none = query("api", RecordType::A);
        none.queries.clear();
        assert_eq!(
            outcome(&none.to_vec().unwrap()),
            Some((ResponseCode::FormErr, Outcome::Refused))
        );
        let bytes = query("api.default", RecordType::A).to_vec().unwrap();
        assert_eq!(
            outcome(&bytes[..bytes.len() - 3]),
            Some((ResponseCode::FormErr, Outcome::Refused))
        );
        // A header claiming 65535 questions is refused before anything is decoded.
        let mut huge = bytes;
        huge[4..6].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(
            outcome(&huge),
            Some((ResponseCode::FormErr, Outcome::Refused))
        );
        // Another opcode.
        let mut notify = query("api", RecordType::SOA);
        notify.metadata.op_code = OpCode::Notify;
        assert_eq!(
            outcome(&notify.to_vec().unwrap()),
            Some((ResponseCode::NotImp, Outcome::Refused))
        );
    }

    #[test]
    fn before_any_configuration_every_query_is_servfail() {
        let q = query("api", RecordType::A);
        match decide(&q.to_vec().unwrap(), None) {
            Decision::Reply(m, Outcome::Error) => {
                assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
                assert!(!m.metadata.authoritative);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn edns_is_echoed_and_answers_fit_the_clients_size() {
        let mut q = query("api", RecordType::A);
        assert_eq!(udp_limit(&q), 512);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.set_edns(edns);
        assert_eq!(udp_limit(&q), 4096);
        let (m, _) = reply(&q);
        assert_eq!(
            m.edns.as_ref().map(Edns::max_payload),
            Some(ADVERTISED_PAYLOAD)
        );
        let (m, _) = reply(&query("api", RecordType::A));
        assert!(m.edns.is_none());
        // An answer too large for the client is truncated to header + question (TC set).
        let mut big = respond(&query("api", RecordType::A), ResponseCode::NoError, false);
        for i in 0..64u8 {
            big.add_answer(Record::from_rdata(
                Name::from_ascii("api.").unwrap(),
                5,
                RData::A(A::new(10, 0, 0, i)),
            ));
        }
        let full = encode(&big, TCP_MAX_MESSAGE).unwrap();
        assert!(full.len() > 512);
        let cut = encode(&big, 512).unwrap();
        let parsed = Message::from_vec(&cut).unwrap();
        assert!(parsed.metadata.truncation && parsed.answers.is_empty());
        assert_eq!(parsed.queries, big.queries);
        assert!(!Message::from_vec(&full).unwrap().metadata.truncation);
    }
}
