//! The gRPC face of the broker: the `session_broker.v1.SessionBroker` service. Generated proto
//! types live here and nowhere else; `convert` turns them into domain types and back, and
//! `status` is the one place that maps broker errors to gRPC statuses. `auth` admits callers
//! (who, which RPCs) and `limits` holds their rate limits.

pub mod auth;
pub mod convert;
pub mod limits;
pub mod service;
pub mod status;

/// Generated from `proto/session_broker/v1/session_broker.proto`.
pub mod pb {
    tonic::include_proto!("session_broker.v1");

    /// For gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("session_broker_descriptor");
}

pub use service::BrokerService;
pub use status::ERROR_DOMAIN;
