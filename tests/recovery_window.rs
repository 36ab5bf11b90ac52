//! Issue 15: after a bad batch, recovery must find every valid later batch of the segment,
//! however far away it is and whatever `commit_bytes_max` the cache is opened with. A
//! damaged batch must never pass for a torn tail because the search for later batches
//! stopped short, and salvage must flag every stream with records after the damage.

mod common;

use churnlog::cache::flusher_test_support::segment_file_name;
use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::{OpenError, Options, RecoveryMode, StreamId};
use common::{kill, open};

/// Options of the run that wrote the cache: batches of one 60 KiB record (64 KiB on disk).
fn writer_options() -> Options {
    Options {
        capacity_bytes: 32 << 20,
        segment_size: 2 << 20,
        record_size_max: 64 << 10,
        commit_bytes_max: 72 << 10,
        background_reclaim: false,
        ..Options::default()
    }
}

/// The same cache reopened with much smaller batches: the bad batches of the old run are
/// far longer than anything these options would write.
fn small_batch_options() -> Options {
    Options { record_size_max: 4 << 10, commit_bytes_max: 16 << 10, ..writer_options() }
}

/// Incompressible bytes, so every record is stored raw and fills its batch.
fn noise(stream: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    churnlog::bench::fill_random(&mut out, u64::from(stream) << 32 | seq);
    out
}

struct Written {
    a: StreamId,
    b: StreamId,
    c: StreamId,
    /// (segment file, record header offset) of a's records 1..=10, index = seq - 1.
    a_at: Vec<(String, u64)>,
}

/// One segment: b's only record, then a's records 1..=10 (one batch each), then c's only
/// record, all acknowledged. Killed (the segment stays open) or closed (sealed).
fn write(st: &FaultStorage, clean: bool) -> Written {
    let opts = writer_options();
    let cache = open(st, &opts).unwrap();
    let (a, b, c) =
        (cache.stream("ma", "d").unwrap(), cache.stream("mb", "d").unwrap(), cache.stream("mc", "d").unwrap());
    cache.append(b, &noise(b.0, 1, 1000)).unwrap().wait().unwrap();
    for seq in 1..=10 {
        cache.append(a, &noise(a.0, seq, 60 << 10)).unwrap().wait().unwrap();
    }
    cache.append(c, &noise(c.0, 1, 1000)).unwrap().wait().unwrap();
    let a_at: Vec<_> = (1..=10)
        .map(|seq| {
            let (segment, offset, _) = cache.record_location(a, seq).unwrap();
            (segment_file_name(segment), offset)
        })
        .collect();
    let (c_segment, _, _) = cache.record_location(c, 1).unwrap();
    assert!(a_at.iter().all(|(name, _)| *name == segment_file_name(c_segment)), "one segment: {a_at:?}");
    if clean {
        cache.close().unwrap();
    } else {
        kill(st, cache, 1);
    }
    Written { a, b, c, a_at }
}

/// Flips a payload bit in each of a's records `seqs`: those batches no longer validate.
fn damage(st: &FaultStorage, w: &Written, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        let (name, offset) = &w.a_at[seq as usize - 1];
        st.flip_bit(name, offset + 32 + 10, 0);
    }
}

fn salvage(opts: &Options) -> Options {
    Options { recovery_mode: RecoveryMode::SalvageMarkResync, ..opts.clone() }
}

/// Strict open must fail with damage (not a torn tail) that names c, whose record lies
/// after the bad batches; salvage must flag every stream of the segment, c included.
fn assert_damage_found(st: &FaultStorage, w: &Written, opts: &Options) {
    let err = open(&st.snapshot(), opts).err().expect("acknowledged batches were damaged: the open must fail");
    let OpenError::Corruption(report) = err else { panic!("wrong error: {err}") };
    assert!(report.torn_tail.is_none(), "damage taken for a torn tail: {report:?}");
    assert!(!report.damage.is_empty(), "{report:?}");
    assert!(report.damaged_streams.iter().any(|d| d.stream == w.c), "c lies past the damage: {report:?}");

    let copy = st.snapshot();
    let cache = open(&copy, &salvage(opts)).expect("salvage opens");
    let report = cache.recovery_report();
    assert!(report.torn_tail.is_none(), "{report:?}");
    for s in [w.a, w.b, w.c] {
        assert!(report.damaged_streams.iter().any(|d| d.stream == s), "stream {s:?} not flagged: {report:?}");
        let info = cache.stream_info(s).unwrap();
        assert!(info.resync_required, "stream {s:?} lost records without being flagged");
        assert_eq!(info.records, 0);
    }
    // c's acknowledged record was seen: its sequence numbers are not handed out again.
    assert_eq!(cache.append(w.c, b"next").unwrap().wait().unwrap(), 2);
    drop(cache);
    // The decision is durable: a plain open (with the small options too) remembers it.
    let cache = open(&copy, &small_batch_options()).unwrap();
    assert!(cache.stream_info(w.c).unwrap().resync_required);
}

#[test]
fn damage_in_the_open_segment_is_found_when_reopened_with_smaller_batches() {
    let st = FaultStorage::new();
    let w = write(&st, false);
    // a2 and a3: 128 KiB of bad batches; the next valid batch is further away than four
    // batches of the small options, but close enough for the writer's own.
    damage(&st, &w, 2..=3);
    assert_damage_found(&st, &w, &writer_options());
    assert_damage_found(&st, &w, &small_batch_options());
}

#[test]
fn a_valid_batch_far_past_a_long_run_of_bad_batches_proves_damage() {
    let st = FaultStorage::new();
    let w = write(&st, false);
    // a2 ..= a8: seven bad batches (448 KiB), more than four of the writer's largest.
    damage(&st, &w, 2..=8);
    assert_damage_found(&st, &w, &writer_options());
    assert_damage_found(&st, &w, &small_batch_options());
}

#[test]
fn salvage_of_a_sealed_segment_flags_streams_whose_records_lie_far_past_the_damage() {
    let st = FaultStorage::new();
    let w = write(&st, true);
    let opts = writer_options();
    let name = w.a_at[0].0.clone();
    st.flip_bit(&name, opts.segment_size - 4096 + 13, 1); // trailer: the segment is scanned
    damage(&st, &w, 2..=8);
    assert_damage_found(&st, &w, &opts);
    assert_damage_found(&st, &w, &small_batch_options());
}

#[test]
fn a_crash_with_no_damage_is_still_a_torn_tail_or_a_clean_end() {
    // The unbounded search must not invent damage: a plain crash reopens cleanly with any
    // batch size, and every acknowledged record reads back.
    let st = FaultStorage::new();
    let w = write(&st, false);
    for opts in [writer_options(), small_batch_options()] {
        let cache = open(&st.snapshot(), &opts).unwrap();
        let report = cache.recovery_report();
        assert!(report.damage.is_empty() && report.damaged_streams.is_empty(), "{report:?}");
        for seq in 1..=10 {
            assert_eq!(cache.read(w.a, seq).unwrap(), noise(w.a.0, seq, 60 << 10));
        }
        assert_eq!(cache.read(w.c, 1).unwrap(), noise(w.c.0, 1, 1000));
    }
}
