//! The gRPC API of provider-gateway (`provider_gateway.v1`), generated from
//! `proto/provider_gateway/v1/provider_gateway.proto`.
//!
//! Nothing else lives here: the server is `provider-gateway-server`, the typed
//! client is `provider-gateway-client`.

/// Package `provider_gateway.v1`: messages, the server trait and the client.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("provider_gateway.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/provider_gateway_descriptor.bin"));
