//! Issue 15, bug 5: a read racing compaction. A reader takes a record's location and file
//! handle, releases the lock and reads; meanwhile the segment is compacted, recycled and
//! overwritten. Wrong bytes must never be served, and the read must not report corruption
//! either (the drain would evict the whole stream and force a full resync): the record
//! is still durable, only elsewhere.
//!
//! The interleaving is forced, not hoped for: the fault backend's read hook holds the
//! reader thread between "location taken" and "bytes read" while the test compacts,
//! recycles and overwrites the segment.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::Options;
use common::{data, open, tiny_options};

const READER_THREAD: &str = "racing-reader";

#[test]
fn a_read_racing_compaction_and_recycling_returns_the_record_not_corruption() {
    let st = FaultStorage::new();
    let opts = Options {
        capacity_bytes: 64 * (64 << 10),
        compact_usage_min: 0.0,
        compact_live_ratio_max: 0.3,
        // Every freed segment is recycled (the last one freed is the next one reused), and
        // reads go to the file, not to the tail cache.
        segments_recycle_max: 64,
        tail_cache_bytes: 0,
        ..tiny_options()
    };
    let cache = Arc::new(open(&st, &opts).unwrap());
    let slow = cache.stream("slow", "d").unwrap();
    let fast = cache.stream("fast", "d").unwrap();

    // The slow stream's one record opens segment 1; the fast stream fills it and more.
    let record = data(slow.0, 1, 300);
    cache.append(slow, &record).unwrap().wait().unwrap();
    let mut fast_seq = 0;
    for _ in 0..100 {
        fast_seq = cache.append(fast, &data(fast.0, fast_seq + 1, 2000)).unwrap().wait().unwrap();
    }
    cache.ack(fast, fast_seq).unwrap();
    let (old_segment, _, _) = cache.record_location(slow, 1).unwrap();

    // The reader stops inside its first file read, after taking the location.
    let (paused_tx, paused_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let gate = Mutex::new(Some((paused_tx, go_rx)));
    st.set_read_hook(Some(Arc::new(move |_offset, _len| {
        if std::thread::current().name() != Some(READER_THREAD) {
            return;
        }
        if let Some((paused, go)) = gate.lock().unwrap().take() {
            paused.send(()).unwrap();
            go.recv().unwrap();
        }
    })));
    let reader = {
        let cache = cache.clone();
        std::thread::Builder::new().name(READER_THREAD.into()).spawn(move || cache.read(slow, 1)).unwrap()
    };
    paused_rx.recv().unwrap();

    // Compaction moves the record away and segment 1 is recycled...
    let report = cache.reclaim().unwrap();
    assert!(report.segments_compacted >= 1, "{report:?}");
    let (new_segment, _, _) = cache.record_location(slow, 1).unwrap();
    assert_ne!(new_segment, old_segment);
    // ...then reused and overwritten: segment files come from the recycled ones first,
    // the last freed (segment 1) first of all. Once none is left and the head has moved
    // two segments on, every recycled file has been written from its start.
    let head = |fast_seq: u64| cache.record_location(fast, fast_seq).unwrap().0;
    fast_seq = cache.append(fast, &data(fast.0, fast_seq + 1, 2000)).unwrap().wait().unwrap();
    let head_after_reclaim = head(fast_seq);
    while head(fast_seq) < head_after_reclaim + 2 || st.names().iter().any(|n| n.starts_with("recycle-")) {
        fast_seq = cache.append(fast, &data(fast.0, fast_seq + 1, 2000)).unwrap().wait().unwrap();
    }

    go_tx.send(()).unwrap();
    let read = reader.join().unwrap();
    st.set_read_hook(None);
    assert_eq!(read.expect("the record is durable: the racing read must return it"), record);
    assert!(cache.events().is_empty(), "{:?}", cache.events());
    assert_eq!(cache.read(slow, 1).unwrap(), record);
}
