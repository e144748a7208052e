//! Generated code for Weft's gRPC schema. Nothing but generated code lives here.

#![allow(clippy::all, clippy::pedantic)]

/// `weft.v1`: the discovery protocol between the control plane and proxies.
pub mod v1 {
    tonic::include_proto!("weft.v1");
}

/// Encoded `FileDescriptorSet` of every Weft proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weft_descriptor.bin"));
