pub mod proto {
    tonic::include_proto!("broadcast");
}
