//! The gRPC services the manager serves: [`broadcast`] (the accept path), [`admin`] (the
//! operator API) and the mapping of internal errors to `tonic::Status` ([`status`]).

pub mod admin;
pub mod broadcast;
pub mod status;
