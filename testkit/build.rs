//! Generates the tonic client and server for the demo gRPC service
//! (`proto/weft/demo/v1/echo.proto`) with protox, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["weft/demo/v1/echo.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
