//! Code generated from `proto/keyward/v1/*.proto` by `build.rs`.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod keyward {
    pub mod v1 {
        tonic::include_proto!("keyward.v1");
    }
}

pub use keyward::v1::*;

/// Descriptors of keyward's services and messages, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keyward_descriptor.bin"));

/// Descriptors of Envoy's `envoy.service.auth.v3.Authorization` and what it
/// uses (proto/vendor), so that reflection describes it too.
pub const ENVOY_AUTHZ_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_authz_descriptor.bin"));

// Messages that carry a plaintext key print everything but the key.

impl std::fmt::Debug for MintResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintResponse")
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for CheckRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckRequest")
            .field("key", &"<redacted>")
            .field("resource", &self.resource)
            .field("required_scopes", &self.required_scopes)
            .field("client_ip", &self.client_ip)
            .finish()
    }
}

impl std::fmt::Debug for RotateResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateResponse")
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .field("previous", &self.previous)
            .finish()
    }
}

impl std::fmt::Debug for ReportRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportRequest")
            .field("secret", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}
