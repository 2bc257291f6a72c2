//! Compiles proto/chainidx.proto with the vendored protoc, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build emits no rerun-if-changed for the proto files themselves.
    println!("cargo:rerun-if-changed=proto/chainidx.proto");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Raft log entries carry these (openraft's types are serde); everything else is protobuf only.
    for message in [
        ".chainidx.v1.ClusterCommand",
        ".chainidx.v1.WorkerRecord",
        ".chainidx.v1.PlanShards",
        ".chainidx.v1.ShardRecord",
        ".chainidx.v1.ShardStatus",
        ".chainidx.v1.ShardReplicas",
        ".chainidx.v1.ShardProgress",
        ".chainidx.v1.TipUpdate",
    ] {
        config.type_attribute(message, "#[derive(serde::Serialize, serde::Deserialize)]");
    }
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/chainidx.proto"],
        &["proto"],
    )?;
    Ok(())
}
