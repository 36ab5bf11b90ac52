//! Space management: watermarks, reclaim, compaction of sparse segments, blockers,
//! explicit and policy-driven eviction.

mod common;

use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::{AppendError, CacheEvent, EvictionPolicy, Options, ReadError, SpaceState, StreamError};
use common::{data, kill, open, tiny_options};

#[test]
fn soft_watermark_throttles_and_hard_watermark_refuses_until_drained() {
    let st = FaultStorage::new();
    let opts = Options {
        capacity_bytes: 16 * (64 << 10),
        soft_watermark: 0.5,
        hard_watermark: 0.75,
        throttle_delay_us_max: 200,
        ..tiny_options()
    };
    let cache = open(&st, &opts).unwrap();
    let s = cache.stream("m", "d").unwrap();
    let mut last = 0;
    let refused = loop {
        match cache.append(s, &data(s.0, last + 1, 3000)) {
            Ok(t) => last = t.wait().unwrap(),
            Err(e) => break e,
        }
        assert!(last < 10_000, "never refused");
    };
    assert!(matches!(refused, AppendError::Backpressure { .. }), "{refused:?}");
    assert_eq!(cache.space().state, SpaceState::Full);
    let stats = cache.stats();
    assert!(stats.throttled_appends > 0 && stats.backpressure_refusals > 0, "{stats:?}");
    cache.ack(s, last).unwrap();
    cache.reclaim().unwrap();
    assert_eq!(cache.space().state, SpaceState::Normal, "{:?}", cache.space());
    assert_eq!(cache.append(s, b"again").unwrap().wait().unwrap(), last + 1);
}

#[test]
fn a_slow_stream_does_not_pin_the_disk_compaction_moves_it_forward() {
    let st = FaultStorage::new();
    let opts = Options {
        capacity_bytes: 64 * (64 << 10),
        compact_usage_min: 0.0,
        compact_live_ratio_max: 0.3,
        ..tiny_options()
    };
    let cache = open(&st, &opts).unwrap();
    let slow = cache.stream("slow", "d").unwrap();
    let fast = cache.stream("fast", "d").unwrap();
    let mut slow_seq = 0;
    for seq in 1..=400u64 {
        cache.append(fast, &data(fast.0, seq, 2000)).unwrap().wait().unwrap();
        if seq.is_multiple_of(20) {
            slow_seq = cache.append(slow, &data(slow.0, slow_seq + 1, 2000)).unwrap().wait().unwrap();
        }
        if seq.is_multiple_of(10) {
            cache.ack(fast, seq).unwrap();
        }
    }
    let blockers = cache.reclaim_blockers(3);
    assert!(!blockers.is_empty());
    assert_eq!(blockers[0].streams[0].0, slow, "{blockers:?}");
    let before = cache.space().segments_in_use;
    let report = cache.reclaim().unwrap();
    let after = cache.space().segments_in_use;
    assert!(report.segments_compacted > 0 && report.records_rewritten > 0, "{report:?}");
    assert!(after < before / 2, "compaction freed too little: {before} -> {after}");
    for seq in 1..=slow_seq {
        assert_eq!(cache.read(slow, seq).unwrap(), data(slow.0, seq, 2000));
    }
    // Old copies may survive a crash next to the new ones: the newest wins on recovery.
    kill(&st, cache, 5);
    let cache = open(&st, &opts).unwrap();
    for seq in 1..=slow_seq {
        assert_eq!(cache.read(slow, seq).unwrap(), data(slow.0, seq, 2000));
    }
    assert!(cache.verify().is_clean());
}

#[test]
fn explicit_eviction_is_loud_and_durable() {
    let st = FaultStorage::new();
    let opts = tiny_options();
    let cache = open(&st, &opts).unwrap();
    let s = cache.stream("m", "d").unwrap();
    for seq in 1..=50 {
        cache.append(s, &data(s.0, seq, 2000)).unwrap().wait().unwrap();
    }
    let report = cache.evict_stream(s, "operator: cache disk replaced").unwrap();
    assert_eq!((report.first_seq, report.last_seq, report.records), (1, 50, 50));
    let info = cache.stream_info(s).unwrap();
    assert!(info.resync_required);
    assert_eq!(info.records, 0);
    assert!(matches!(cache.read(s, 10), Err(ReadError::NotAvailable { .. })));
    assert!(matches!(cache.events().last(), Some(CacheEvent::StreamEvicted { last_seq: 50, .. })));
    assert!(cache.reclaim().unwrap().segments_freed > 0);
    // New data continues the sequence; the flag survives a restart until cleared.
    assert_eq!(cache.append(s, b"resync block").unwrap().wait().unwrap(), 51);
    cache.close().unwrap();
    let cache = open(&st, &opts).unwrap();
    let info = cache.stream_info(s).unwrap();
    assert!(info.resync_required);
    assert_eq!(info.evicted_upto, 50);
    assert!(!info.history_whole_upto(51), "no resync yet: nothing after the drop is whole");
    // A base must follow the drop and be durable.
    assert!(matches!(cache.clear_resync(s, 50), Err(StreamError::ResyncBase { .. })));
    assert!(matches!(cache.clear_resync(s, 52), Err(StreamError::ResyncBase { .. })));
    cache.clear_resync(s, 51).unwrap();
    let info = cache.stream_info(s).unwrap();
    assert!(!info.resync_required);
    assert!(!info.history_whole_upto(51) && info.history_whole_upto(52));
    // The base survives a restart.
    cache.close().unwrap();
    let cache = open(&st, &opts).unwrap();
    assert_eq!(cache.stream_info(s).unwrap().resync_base, 51);
    assert_eq!(cache.read(s, 51).unwrap(), b"resync block");
}

#[test]
fn eviction_policy_evicts_the_largest_backlog_only_at_the_hard_watermark() {
    let st = FaultStorage::new();
    let opts = Options {
        capacity_bytes: 16 * (64 << 10),
        eviction: EvictionPolicy::LargestBacklog,
        compact_usage_min: 1.0,
        ..tiny_options()
    };
    let cache = open(&st, &opts).unwrap();
    let big = cache.stream("big", "d").unwrap();
    let small = cache.stream("small", "d").unwrap();
    assert!(cache.reclaim().unwrap().streams_evicted.is_empty());
    let mut seq = 0u64;
    loop {
        seq += 1;
        match cache.append(big, &data(big.0, seq, 3000)) {
            Ok(t) => {
                t.wait().unwrap();
            }
            Err(AppendError::Backpressure { .. }) => break,
            Err(e) => panic!("{e}"),
        }
        if seq.is_multiple_of(8) {
            cache.append(small, &data(small.0, seq / 8, 100)).unwrap().wait().unwrap();
        }
    }
    let report = cache.reclaim().unwrap();
    assert_eq!(report.streams_evicted, vec![big]);
    assert!(cache.stream_info(big).unwrap().resync_required);
    assert!(!cache.stream_info(small).unwrap().resync_required);
    assert_eq!(cache.read(small, 1).unwrap(), data(small.0, 1, 100));
    assert!(cache
        .events()
        .iter()
        .any(|e| matches!(e, CacheEvent::StreamEvicted { reason, .. } if reason.contains("LargestBacklog"))));
    assert_ne!(cache.space().state, SpaceState::Full);
}

/// Review finding: `close()` could hang when it met a compaction of two or more
/// segments (the flusher exited with the queue empty while the reclaimer still enqueued
/// copies it then waited for). Close races a running background compaction, many times;
/// each close must return (a hang is caught by the bound, not by timing).
#[test]
fn close_during_a_background_compaction_returns() {
    for round in 0..30u64 {
        let st = FaultStorage::new();
        let opts = Options {
            capacity_bytes: 64 * (64 << 10),
            compact_usage_min: 0.0,
            compact_live_ratio_max: 0.5,
            background_reclaim: true,
            ..tiny_options()
        };
        let cache = open(&st, &opts).unwrap();
        let slow = cache.stream("slow", "d").unwrap();
        let fast = cache.stream("fast", "d").unwrap();
        let mut slow_seq = 0;
        for seq in 1..=300u64 {
            cache.append(fast, &data(fast.0, seq, 2000)).unwrap().wait().unwrap();
            if seq.is_multiple_of(8) {
                slow_seq = cache.append(slow, &data(slow.0, slow_seq + 1, 2000)).unwrap().wait().unwrap();
            }
        }
        // Acknowledging most of `fast` leaves many sparse segments: the reclaimer wakes.
        cache.ack(fast, 280).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(round * 150));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(cache.close());
        });
        match done_rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("round {round}: close() did not return within 60 s"),
        }
        let cache = open(&st, &opts).unwrap();
        for seq in 1..=slow_seq {
            assert_eq!(cache.read(slow, seq).unwrap(), data(slow.0, seq, 2000));
        }
    }
}
