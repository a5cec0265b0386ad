//! The gRPC services the manager serves: [`broadcast`] (the accept path) and the mapping of
//! internal errors to `tonic::Status` ([`status`]).

pub mod broadcast;
pub mod status;
