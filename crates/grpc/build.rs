//! Compiles proto/*.proto with protox (pure Rust, so no `protoc` is needed) and generates the
//! tonic server and client code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/inference.proto", "proto/health.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // Tensor bytes stay slices of the received message: no copy per input.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(fds)?;
    Ok(())
}
