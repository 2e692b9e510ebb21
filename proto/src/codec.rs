//! The Protobuf codec of every generated client and server: prost's, with
//! small codec buffers.
//!
//! tonic allocates an encode buffer and a decode buffer of
//! `BufferSettings::buffer_size` for every call up front (8 KiB by default)
//! and grows them only when a message needs more. A device holds two
//! long-lived streams, mostly idle, whose messages are tens to hundreds of
//! bytes: at 8 KiB a buffer, a server with 100,000 devices held 2.3 GiB of
//! empty buffers (three per device: two decode, one encode), and the
//! simulator as much again. Starting small costs a few reallocations on a
//! stream's first large message, nothing after: a buffer keeps what it grew
//! to. See docs/memory.md.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// What a codec buffer starts with. Control messages and small batches fit;
/// anything larger grows the buffer to its size.
pub const INITIAL_BUFFER_BYTES: usize = 256;
/// tonic's own default: encoded server-streaming messages ready together
/// are sent in one write up to this size.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The buffer settings of [`SmallBufferCodec`], for codecs written by hand.
pub fn buffer_settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD)
}

/// [`ProstCodec`] with [`buffer_settings`].
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffer_settings())
    }
}
