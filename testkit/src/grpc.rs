//! The demo gRPC service (`weft.demo.v1.Echo`) and a channel that reaches it through a proxy.

use std::net::SocketAddr;

use tonic::transport::{Channel, Endpoint};

use crate::http::FixedConnector;

/// Generated client and server for `proto/weft/demo/v1/echo.proto`.
pub mod echo {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("weft.demo.v1");
}

/// A lazy gRPC channel whose requests carry `:authority` = `authority` (a mesh service name) but
/// whose connections all go to `addr` (e.g. a proxy's outbound listener).
pub fn grpc_channel(addr: SocketAddr, authority: &str) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .unwrap_or_else(|e| panic!("bad gRPC authority {authority:?}: {e}"))
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint.connect_with_connector_lazy(FixedConnector::new(addr))
}
