//! Generated code for Weft's gRPC schema. Nothing but generated code lives here.

#![allow(clippy::all, clippy::pedantic)]

/// `weft.v1`: the discovery protocol between the control plane and proxies.
pub mod v1 {
    tonic::include_proto!("weft.v1");
}

/// `opentelemetry.proto.*`: the vendored subset of the OpenTelemetry protos (OTLP/gRPC trace
/// export) the proxy sends spans with. The module tree mirrors the proto packages, which the
/// generated cross-package paths (`super::super::common::v1`) rely on.
pub mod otlp {
    /// `opentelemetry.proto.common.v1`: attributes and instrumentation scope.
    pub mod common {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.common.v1");
        }
    }
    /// `opentelemetry.proto.resource.v1`: the entity producing spans.
    pub mod resource {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.resource.v1");
        }
    }
    /// `opentelemetry.proto.trace.v1`: spans.
    pub mod trace {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.trace.v1");
        }
    }
    /// `opentelemetry.proto.collector.trace.v1`: the `TraceService` collectors implement.
    pub mod collector {
        /// Traces.
        pub mod trace {
            /// Version 1.
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
            }
        }
    }
}

/// Encoded `FileDescriptorSet` of every Weft proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weft_descriptor.bin"));
