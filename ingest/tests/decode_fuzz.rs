//! Arbitrary bytes through UploadReadings' decode and validation: no panic,
//! and what they make the server allocate stays within a small multiple of
//! their size (issue 11: a 4 MiB message once decoded to over 200 MiB).
//!
//! A counting allocator measures the peak bytes allocated while one input is
//! decoded and validated. This binary holds this one test, so nothing else
//! allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ingest::domain::ReadingLimits;
use ingest::domain::reading::validate_batch;
use ingest::grpc::batch_codec::decode_batch;
use ingest::grpc::convert::raw_series;
use proptest::prelude::*;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                + (new_size - layout.size());
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const NOW: i64 = 1_800_000_000_000_000_000;

/// Decodes and validates `bytes` as the server does; returns the peak bytes
/// allocated on the way, above what was live before.
fn peak_while_taking(bytes: &[u8]) -> usize {
    let limits = ReadingLimits::default();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    if let Ok(batch) = decode_batch(bytes, limits.max_batch_series) {
        let _ = validate_batch(batch.sequence, raw_series(batch.series), &limits, NOW);
    }
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

/// Byte sequences made of protobuf-shaped pieces: field keys of every wire
/// type, short lengths, empty and tiny series, packed and unpacked numbers,
/// so the search spends its time near the shapes that amplify.
fn wire_pieces() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(vec![0x12, 0x00]),
        Just(vec![0x08, 0x01]),
        Just(vec![0x12, 0x02, 0x0a, 0x00]),
        Just(vec![0x12, 0x0b, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x22, 0x00]),
        Just(vec![0x19, 0, 0, 0, 0, 0, 0, 0, 0]),
        Just(vec![0x1a, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]),
        any::<u8>().prop_map(|b| vec![b]),
        proptest::collection::vec(any::<u8>(), 0..16),
    ];
    proptest::collection::vec(piece, 0..4096).prop_map(|pieces| pieces.concat())
}

/// Twice the input for the decoded columns (a vector may double past what
/// it holds), plus the fixed cost of the series a batch may hold.
fn bound(len: usize) -> usize {
    let per_series = 4 * std::mem::size_of::<telemetry_proto::v1::SensorSeries>() + 64;
    4 * len + ReadingLimits::default().max_batch_series * per_series + 64 * 1024
}

/// One test, so that nothing else in this binary allocates while a
/// measurement runs.
#[test]
fn decode_and_validation_are_bounded() {
    // The message of issue 11, at the default 4 MiB limit: two million
    // empty series. Before the series cap it allocated over 200 MiB.
    let mut flood = vec![0x08, 0x01];
    while flood.len() + 2 <= 4 * 1024 * 1024 {
        flood.extend_from_slice(&[0x12, 0x00]);
    }
    let peak = peak_while_taking(&flood);
    assert!(peak < 1024 * 1024, "the flood allocated {peak} bytes");

    let config = ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    };
    proptest!(config, |(bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..65_536), wire_pieces()])| {
        let peak = peak_while_taking(&bytes);
        prop_assert!(peak <= bound(bytes.len()), "{} bytes of input allocated {} bytes", bytes.len(), peak);
    });
}
