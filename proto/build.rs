//! Compiles proto/chainidx.proto with the vendored protoc, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build emits no rerun-if-changed for the proto files themselves.
    println!("cargo:rerun-if-changed=proto/chainidx.proto");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/chainidx.proto"],
        &["proto"],
    )?;
    Ok(())
}
