//! Codec buffers start small (telemetry_proto::codec, 256 bytes) and grow
//! for the message at hand: a stream that carried small batches must still
//! take one close to `--max-message-bytes`, and small ones after it.

use crate::common::*;
use ingest::Limits;
use ingest::domain::ReadingLimits;
use prost::Message;

backend_tests!(a_batch_near_the_size_limit_decodes_between_small_ones_on_one_stream,);

async fn a_batch_near_the_size_limit_decodes_between_small_ones_on_one_stream(backend: Backend) {
    let max_message_bytes = 256 * 1024;
    let limits = Limits {
        max_message_bytes,
        readings: ReadingLimits {
            max_batch_readings: 20_000,
            ..Default::default()
        },
        ..Default::default()
    };
    let Some(server) = TestServer::start_with(backend, limits).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    // 16 bytes a reading: 16,000 readings come within 2% of the limit.
    let large = simple_batch(2, 16_000);
    let size = large.encoded_len();
    assert!(
        size <= max_message_bytes && size > max_message_bytes * 97 / 100,
        "{size} bytes"
    );
    let summary = upload(
        &mut client,
        vec![simple_batch(1, 3), large, simple_batch(3, 3)],
    )
    .await
    .unwrap();
    assert_eq!(summary.batches_committed, 3);
    assert_eq!(summary.readings_accepted, 16_006);
    assert_eq!(summary.committed_sequence, 3);
    assert_eq!(server.storage.count_readings().await, 16_006);
}
