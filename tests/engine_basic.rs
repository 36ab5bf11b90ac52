//! Engine behaviour through the public API on a real directory.

use churnlog::cache::{AppendError, Cache, IoBackend, OpenError, Options, StreamError};

fn record(stream: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut x = (u64::from(stream) << 32) ^ seq ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 {
                0
            } else {
                x as u8
            }
        })
        .collect()
}

#[test]
fn append_read_ack_reopen_std_backend() {
    append_read_ack_reopen(IoBackend::Std, "std");
}

#[test]
fn append_read_ack_reopen_direct_backend() {
    append_read_ack_reopen(IoBackend::Direct, "direct");
}

#[test]
fn append_read_ack_reopen_uring_backend() {
    append_read_ack_reopen(IoBackend::Uring, "uring");
}

#[test]
fn auto_backend_picks_one_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), Options::small_for_tests()).unwrap();
    assert!(["std", "direct", "uring"].contains(&cache.backend_name()));
}

fn append_read_ack_reopen(backend: IoBackend, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options { io_backend: backend, ..Options::small_for_tests() };
    let unavailable = match backend {
        IoBackend::Direct => churnlog::cache::io::direct::DirectStorage::probe(dir.path()).err(),
        IoBackend::Uring => churnlog::cache::io::uring::UringStorage::probe(dir.path()).err(),
        _ => None,
    };
    if let Some(e) = unavailable {
        eprintln!("{name} backend unavailable here ({e}): skipping");
        return;
    }
    let (a, b);
    {
        let cache = Cache::open(dir.path(), opts.clone()).unwrap();
        assert_eq!(cache.backend_name(), name);
        a = cache.stream("m1", "disk0").unwrap();
        b = cache.stream("m2", "disk0").unwrap();
        assert_eq!(cache.stream("m1", "disk0").unwrap(), a);
        let mut tickets = Vec::new();
        for i in 0..200u64 {
            let s = if i % 2 == 0 { a } else { b };
            tickets.push(cache.append(s, &record(s.0, i / 2 + 1, 1000 + (i as usize * 37) % 5000)).unwrap());
        }
        for t in tickets {
            t.wait().unwrap();
        }
        assert_eq!(cache.stream_info(a).unwrap().durable_upto, 100);
        assert_eq!(cache.read(a, 7).unwrap(), record(a.0, 7, 1000 + 12 * 37));
        cache.ack(a, 50).unwrap();
        assert!(matches!(cache.ack(a, 101), Err(StreamError::BeyondDurable { .. })));
        assert!(cache.read(a, 50).is_err());
        cache.close().unwrap();
    }
    let cache = Cache::open(dir.path(), opts).unwrap();
    let report = cache.recovery_report();
    assert!(report.damage.is_empty() && report.torn_tail.is_none(), "{report:?}");
    assert!(report.segments_scanned.is_empty(), "a clean close leaves only sealed segments: {report:?}");
    let ia = cache.stream_info(a).unwrap();
    assert_eq!((ia.uploaded_upto, ia.durable_upto), (50, 100));
    for seq in 51..=100u64 {
        let i = (seq - 1) * 2;
        assert_eq!(cache.read(a, seq).unwrap(), record(a.0, seq, 1000 + (i as usize * 37) % 5000));
    }
    // New appends continue the sequence.
    assert_eq!(cache.append(a, b"next").unwrap().wait().unwrap(), 101);
    assert!(cache.verify().is_clean());
}

#[test]
fn second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _cache = Cache::open(dir.path(), Options::small_for_tests()).unwrap();
    match Cache::open(dir.path(), Options::small_for_tests()) {
        Err(OpenError::Locked { .. }) => {}
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn bad_appends_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::small_for_tests();
    let cache = Cache::open(dir.path(), opts.clone()).unwrap();
    let s = cache.stream("m", "d").unwrap();
    assert_eq!(cache.append(s, b"").unwrap_err(), AppendError::EmptyRecord);
    let big = vec![0u8; opts.record_size_max as usize + 1];
    assert!(matches!(cache.append(s, &big).unwrap_err(), AppendError::RecordTooLarge { .. }));
    assert!(matches!(cache.stream("", "d"), Err(StreamError::BadKey(_))));
    assert!(matches!(cache.stream(&"x".repeat(256), "d"), Err(StreamError::BadKey(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_futures() {
    let dir = tempfile::tempdir().unwrap();
    let cache = std::sync::Arc::new(Cache::open(dir.path(), Options::small_for_tests()).unwrap());
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let s = cache.stream(&format!("m{t}"), "d").unwrap();
            for seq in 1..=50u64 {
                let got = cache.append(s, &record(s.0, seq, 3000)).unwrap().await.unwrap();
                assert_eq!(got, seq);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(cache.stats().records, 400);
    assert!(cache.stats().batches <= 400);
}

/// Every META rewrite is counted, in whole blocks; an acknowledgement that moves nothing
/// writes nothing.
#[test]
fn meta_rewrites_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), Options::small_for_tests()).unwrap();
    let before = cache.stats();
    let s = cache.stream("m1", "d").unwrap();
    let registered = cache.stats();
    assert_eq!(registered.meta_writes, before.meta_writes + 1, "a new stream is written to META");
    for seq in 1..=3u64 {
        cache.append(s, &record(s.0, seq, 5000)).unwrap().wait().unwrap();
    }
    cache.ack(s, 1).unwrap();
    cache.ack(s, 2).unwrap();
    cache.ack(s, 2).unwrap();
    let after = cache.stats();
    assert_eq!(after.meta_writes, registered.meta_writes + 2, "two acks moved the cursor, the third did not");
    let grew = after.meta_bytes - registered.meta_bytes;
    assert!(grew >= 2 * 4096 && grew.is_multiple_of(4096), "META bytes in whole blocks: {grew}");
}

/// Several streams acknowledged at once: one META write, all or none, and the cursors
/// survive a reopen.
#[test]
fn ack_many_writes_meta_once_all_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<_>;
    {
        let cache = Cache::open(dir.path(), Options::small_for_tests()).unwrap();
        ids = (0..3).map(|i| cache.stream(&format!("m{i}"), "d").unwrap()).collect();
        for &s in &ids {
            for seq in 1..=4u64 {
                cache.append(s, &record(s.0, seq, 3000)).unwrap().wait().unwrap();
            }
        }
        let before = cache.stats().meta_writes;
        // One pair beyond what is durable: nothing moves, nothing is written.
        let err = cache.ack_many(&[(ids[0], 2), (ids[1], 5)]).unwrap_err();
        assert!(matches!(err, StreamError::BeyondDurable { upto: 5, durable: 4, .. }), "{err:?}");
        assert_eq!(cache.stats().meta_writes, before);
        assert_eq!(cache.stream_info(ids[0]).unwrap().uploaded_upto, 0);
        // Three streams (one named twice: the higher wins) in one write.
        cache.ack_many(&[(ids[0], 2), (ids[1], 3), (ids[0], 1), (ids[2], 4)]).unwrap();
        assert_eq!(cache.stats().meta_writes, before + 1);
        // Nothing moves: nothing is written.
        cache.ack_many(&[(ids[0], 2), (ids[2], 1)]).unwrap();
        cache.ack_many(&[]).unwrap();
        assert_eq!(cache.stats().meta_writes, before + 1);
    }
    let cache = Cache::open(dir.path(), Options::small_for_tests()).unwrap();
    let uploaded: Vec<u64> = ids.iter().map(|&s| cache.stream_info(s).unwrap().uploaded_upto).collect();
    assert_eq!(uploaded, vec![2, 3, 4]);
}

/// Threads blocked on tickets of the batch in flight and of the batch filling behind it
/// are woken by their own batch (waiters are split by batch parity): none is lost. Each
/// thread keeps three records in flight, so its tickets span consecutive batches.
#[test]
fn blocking_waiters_on_consecutive_batches_all_wake() {
    let dir = tempfile::tempdir().unwrap();
    let cache = std::sync::Arc::new(Cache::open(dir.path(), Options::small_for_tests()).unwrap());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for t in 0..16u32 {
        let (cache, done_tx) = (cache.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let s = cache.stream(&format!("m{t}"), "d").unwrap();
            let mut window = std::collections::VecDeque::new();
            for seq in 1..=300u64 {
                window.push_back(cache.append(s, &record(s.0, seq, 700)).unwrap());
                if window.len() == 3 {
                    let ticket = window.pop_front().unwrap();
                    let want = ticket.seq;
                    assert_eq!(ticket.wait().unwrap(), want);
                }
            }
            for ticket in window {
                ticket.wait().unwrap();
            }
            done_tx.send(t).unwrap();
        });
    }
    drop(done_tx);
    // A lost wake-up would hang a thread for ever; this bound only turns that into a
    // failure (it is minutes, not a performance limit).
    for _ in 0..16 {
        done_rx.recv_timeout(std::time::Duration::from_secs(300)).expect("a waiter was never woken");
    }
    let stats = cache.stats();
    assert_eq!(stats.records, 16 * 300);
    assert!(stats.batches > 2, "records must span many batches: {}", stats.batches);
}

/// A ticket tells when its record became durable, however late it is looked at, as long
/// as the batch is among the last 256 resolved; for an older one the time is unknown.
#[test]
fn tickets_tell_when_their_record_became_durable() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), Options::small_for_tests()).unwrap();
    let s = cache.stream("m", "d").unwrap();
    let appended = Instant::now();
    let oldest = cache.append(s, &record(s.0, 1, 900)).unwrap();
    // One record per batch: waiting on each before the next.
    let mut last = appended;
    for seq in 2..=300u64 {
        let (result, durable_at) = cache.append(s, &record(s.0, seq, 900)).unwrap().wait_at();
        assert_eq!(result.unwrap(), seq);
        let durable_at = durable_at.expect("just resolved");
        assert!(durable_at >= last, "resolution times go forward");
        last = durable_at;
    }
    assert!(cache.stats().batches >= 299);
    // Resolved more than 256 batches ago: the time is forgotten.
    let (result, at) = oldest.try_result_at().expect("resolved");
    assert_eq!(result.unwrap(), 1);
    assert_eq!(at, None);
    // A recent ticket looked at late still tells its own time, not the time it is read.
    let early = cache.append(s, &record(s.0, 301, 900)).unwrap();
    let (result, later_durable_at) = cache.append(s, &record(s.0, 302, 900)).unwrap().wait_at();
    result.unwrap();
    let later_durable_at = later_durable_at.expect("just resolved");
    std::thread::sleep(Duration::from_millis(20));
    let (result, early_durable_at) = early.try_result_at().expect("resolved");
    assert_eq!(result.unwrap(), 301);
    let early_durable_at = early_durable_at.expect("resolved two batches ago");
    assert!(early_durable_at <= later_durable_at, "the time is the batch's, not the look's");
    assert!(early_durable_at >= last);
}

/// Reads close behind the writer come from the tail cache; with it off, or after a
/// reopen, the same bytes come from the device. A small tail cache serves the newest
/// records from memory and the older ones from the device, in one run read.
#[test]
fn tail_cache_serves_recent_batches_and_agrees_with_the_device() {
    let expected: Vec<Vec<u8>> = (1..=300u64).map(|seq| record(0, seq, 4096 + (seq as usize * 131) % 20000)).collect();
    let read_all = |cache: &Cache, s| {
        let mut got = Vec::new();
        let mut scratch = Vec::new();
        let n = cache
            .read_stored_run(s, 1, 300, 64 << 20, &mut scratch, |seq, stored| {
                let mut out = Vec::new();
                churnlog::cache::compress::decode_into(
                    stored.codec,
                    stored.bytes,
                    stored.logical_len as usize,
                    &mut out,
                )
                .unwrap();
                assert_eq!(seq, got.len() as u64 + 1);
                got.push(out);
                true
            })
            .unwrap();
        assert_eq!(n, 300);
        got
    };
    for (tail_cache_bytes, expect_memory, expect_device) in
        [(64 << 20, true, false), (0, false, true), (256 << 10, true, true)]
    {
        let dir = tempfile::tempdir().unwrap();
        // A small commit size gives many batches, so a small tail cache covers only some.
        let opts = Options { tail_cache_bytes, commit_bytes_max: 64 << 10, ..Options::small_for_tests() };
        let cache = Cache::open(dir.path(), opts.clone()).unwrap();
        let s = cache.stream("m", "d").unwrap();
        for r in &expected {
            cache.append(s, r).unwrap().wait().unwrap();
        }
        assert_eq!(read_all(&cache, s), expected, "tail cache {tail_cache_bytes}");
        for seq in [1u64, 150, 300] {
            assert_eq!(cache.read(s, seq).unwrap(), expected[seq as usize - 1]);
        }
        let st = cache.stats();
        assert_eq!(st.read_bytes_memory > 0, expect_memory, "{tail_cache_bytes}: {st:?}");
        assert_eq!(st.read_bytes_device > 0, expect_device, "{tail_cache_bytes}: {st:?}");
        assert!(st.tail_cache_bytes <= tail_cache_bytes as u64);
        cache.close().unwrap();

        let cache = Cache::open(dir.path(), opts).unwrap();
        assert_eq!(read_all(&cache, s), expected);
        assert_eq!(cache.stats().read_bytes_memory, 0, "a reopened cache reads from the device");
        cache.close().unwrap();
    }
}
