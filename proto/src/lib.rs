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

/// The prost codec with 1 KiB initial codec buffers instead of tonic's 8 KiB (per stream, each
/// way): a control plane holds one discovery stream per proxy. Its encoder reserves a message's
/// encoded length before writing it, so a message larger than the buffer grows it once to its
/// size instead of doubling it field by field (tonic keeps a stream's encode buffer at its
/// largest capacity for the stream's life).
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
    use tonic::Status;
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    fn settings() -> BufferSettings {
        BufferSettings::new(1024, 32 * 1024)
    }

    /// See the module.
    #[derive(Debug, Clone)]
    pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for LeanCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for LeanCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = LeanEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            LeanEncoder(ProstCodec::<T, U>::raw_encoder(settings()))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(settings())
        }
    }

    /// The prost encoder, reserving each message's length first (see the module).
    #[derive(Debug, Clone)]
    pub struct LeanEncoder<T>(ProstEncoder<T>);

    impl<T: prost::Message> Encoder for LeanEncoder<T> {
        type Item = T;
        type Error = Status;

        fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.reserve(item.encoded_len());
            self.0.encode(item, buf)
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}
