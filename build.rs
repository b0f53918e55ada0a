//! Compiles `proto/gpuswap/v1/*.proto` with protox (pure Rust, so a fresh
//! machine needs no protoc) and generates the tonic client and server; and the
//! clients of the part of etcd's API in `proto/vendor/etcd/` (vendored, trimmed).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/gpuswap/v1/supervisor.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Served through grpc.reflection so that grpcurl needs no .proto file.
    std::fs::write(out.join("gpuswap_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    // The part of etcd's API that box registration, discovery and the pickers' election use
    // (clients only). etcd-client's build needs protoc; this does not.
    let etcd = [
        "proto/vendor/etcd/mvccpb.proto",
        "proto/vendor/etcd/etcdserverpb.proto",
        "proto/vendor/etcd/v3electionpb.proto",
    ];
    for proto in etcd {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(protox::compile(etcd, ["proto/vendor"])?)?;
    Ok(())
}
