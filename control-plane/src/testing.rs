//! Helpers shared by the crate's unit tests.

use weft_proto::v1::Node;

/// A proxy's node as the unit tests register it: `id`, `service` (namespace left empty, which
/// means `default`) and the inbound address it registers as its service's endpoint.
pub fn node(id: &str, service: &str, inbound: &str) -> Node {
    Node {
        id: id.into(),
        service: service.into(),
        inbound_address: inbound.into(),
        ..Node::default()
    }
}

/// [`node`] with the outbound listener address a sidecar reports.
pub fn sidecar_node(id: &str, service: &str, inbound: &str) -> Node {
    Node {
        outbound_address: "127.0.0.1:15001".into(),
        ..node(id, service, inbound)
    }
}
