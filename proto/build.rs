//! Generates Rust code for `weft/v1/*.proto` with protox (a pure-Rust protobuf
//! compiler), so a fresh machine needs nothing but cargo. Also generates the vendored subset of
//! the OpenTelemetry protos (`opentelemetry/proto/...`) the proxy's OTLP trace exporter uses; they
//! are compiled separately so the Weft descriptor set (server reflection) stays Weft's own.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["weft/v1/discovery.proto", "weft/v1/identity.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("weft_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;

    let otlp = [
        "opentelemetry/proto/common/v1/common.proto",
        "opentelemetry/proto/resource/v1/resource.proto",
        "opentelemetry/proto/trace/v1/trace.proto",
        "opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ];
    for p in &otlp {
        println!("cargo:rerun-if-changed={p}");
    }
    let otlp_fds = protox::compile(otlp, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(otlp_fds)?;
    Ok(())
}
