//! Message compression, the same on every service: other gRPC clients
//! (grpcurl, Python, Go, Java) turn on gzip or zstd with one option, and a
//! server that refuses it answers UNIMPLEMENTED to every call they make.
//!
//! A compressed request is bounded after decompression, not before: tonic
//! stops inflating a message at the service's `max_decoding_message_size`
//! (`--max-message-bytes`) and answers RESOURCE_EXHAUSTED, so a small
//! "zip bomb" costs the server no more memory than a large plain message.

use tonic::codec::CompressionEncoding;

/// Encodings every service accepts in requests and may use for responses.
/// Responses are compressed only for a client that lists one of them in
/// `grpc-accept-encoding`, with the client's preference order; all others
/// get plain messages, so enabling this changes nothing for them.
pub const ACCEPTED_ENCODINGS: [CompressionEncoding; 2] =
    [CompressionEncoding::Gzip, CompressionEncoding::Zstd];

/// Applies [`ACCEPTED_ENCODINGS`] to a generated tonic server, both ways.
/// A macro, not a function: each generated server type has its own
/// `accept_compressed` and `send_compressed`, with no trait in common.
macro_rules! compressed {
    ($server:expr) => {{
        let mut server = $server;
        for encoding in $crate::grpc::compression::ACCEPTED_ENCODINGS {
            server = server.accept_compressed(encoding).send_compressed(encoding);
        }
        server
    }};
}
pub(crate) use compressed;
