//! Compiles `proto/` with a protoc from the vendored crate, so a fresh machine needs only cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    // Every proto compiled here also lands in one descriptor set, which the server hands to
    // gRPC reflection (`crate::proto::FILE_DESCRIPTOR_SET`).
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("push_manager_descriptor.bin");
    tonic_prost_build::configure()
        // A delivery hands the stored payload to every node's request without copying it,
        // and an empty header map costs nothing to build.
        .bytes(".broadcast.BroadCastReq.payload")
        .btree_map(".broadcast.BroadCastReq.headers")
        .file_descriptor_set_path(descriptors)
        .compile_protos(&["proto/broadcast.proto", "proto/admin.proto"], &["proto"])?;
    Ok(())
}
