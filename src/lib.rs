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

/// The generated services' and clients' codec: prost's, whose encoder
/// starts from a 256-byte buffer instead of tonic's 8 KiB. Every open stream
/// holds that buffer for its whole life (it grows as messages need).
#[derive(Debug, Clone)]
pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// [`Codec`]'s initial encode buffer.
pub const ENCODE_BUFFER_BYTES: usize = 256;

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        // tonic's default yield threshold (32 KiB).
        tonic_prost::ProstCodec::<T, U>::raw_encoder(tonic::codec::BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            32 * 1024,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic::codec::Codec::decoder(&mut tonic_prost::ProstCodec::<T, U>::default())
    }
}

/// The encoded `FileDescriptorSet` of the API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/provider_gateway_descriptor.bin"));
