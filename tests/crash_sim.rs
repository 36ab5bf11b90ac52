//! Power-loss simulation: thousands of seeded crash points through the fault-injecting
//! page-cache model. After each crash and recovery: no acknowledged record is missing,
//! nothing comes back corrupt, every stream is a gap-free prefix, uploads never go back.
//! `CHURNLOG_CRASH_SEEDS=N` sets how many seeds run (default 2000); a failure prints its
//! seed, and `CHURNLOG_CRASH_SEED=S` replays one exactly: the same storage calls in the
//! same order (`a_seed_replays_exactly`; `CHURNLOG_CRASH_REPLAYS=K` checks every seed).
//!
//! Two more runs do the same in a cache small enough to fill, with eviction of the
//! largest backlog at the hard watermark, compaction, and salvage as the recovery mode.
//! An evicted stream may lose its unuploaded records (it is marked resync required, the
//! engine's contract); everything else is checked as above.
//! `power_loss_with_eviction_compaction_and_salvage_stepped_by_the_seed` runs the
//! reclaimer from the simulator (when an append is refused for space, and at random
//! moments), so it replays exactly. `power_loss_with_the_background_reclaimer_eviction_and_salvage`
//! runs it as the engine's thread every millisecond, with the preparer thread, racing the
//! simulator: the threads' timing is not seeded, so a failing seed there replays the same
//! workload and crash points but not always the same interleaving
//! (`CHURNLOG_CRASH_BG_SEEDS=N` sets both runs' seeds, default 300).

mod common;

use std::collections::HashMap;

use churnlog::cache::io::fault::{FaultStorage, Rng};
use churnlog::cache::{AppendError, AppendTicket, EvictionPolicy, Options, RecoveryMode};
use common::{data, open, tiny_options};

const STREAMS: u32 = 3;

use std::cell::Cell;
// Per test thread: the two tests run side by side and count apart.
thread_local! {
    static ACKED: Cell<u64> = const { Cell::new(0) };
    static TORN_TAILS: Cell<u64> = const { Cell::new(0) };
    static RECORDS_CHECKED: Cell<u64> = const { Cell::new(0) };
    static SEALS_SCANNED: Cell<u64> = const { Cell::new(0) };
    static SPARES_RECYCLED: Cell<u64> = const { Cell::new(0) };
    /// Crashes simulated (power cuts and kills), each followed by a recovery.
    static CRASHES: Cell<u64> = const { Cell::new(0) };
    /// Appends refused with backpressure (and retried) while eviction is on.
    static BACKPRESSURED: Cell<u64> = const { Cell::new(0) };
    /// Recoveries that found a stream evicted (resync required) under `LargestBacklog`.
    static EVICTED: Cell<u64> = const { Cell::new(0) };
}

fn bump(counter: &'static std::thread::LocalKey<Cell<u64>>, n: u64) {
    counter.with(|c| c.set(c.get() + n));
}

struct Model {
    /// Contents of every record ever given a sequence number (the last given wins).
    written: HashMap<(u32, u64), Vec<u8>>,
    acked: HashMap<u32, u64>,
    uploaded_ok: HashMap<u32, u64>,
    uploaded_tried: HashMap<u32, u64>,
}

/// One seed's run; returns the storage trace (`FaultStorage::trace`): the same trace
/// means the run did the same storage calls in the same order.
fn run_seed(seed: u64, opts: &Options) -> Result<u64, String> {
    let evicting = opts.eviction != EvictionPolicy::Never;
    let st = FaultStorage::new();
    let mut rng = Rng::new(seed);
    let mut model = Model {
        written: HashMap::new(),
        acked: HashMap::new(),
        uploaded_ok: HashMap::new(),
        uploaded_tried: HashMap::new(),
    };
    // Up to three crash/recover cycles per seed, each cutting power at a random call.
    for cycle in 0..3 {
        // Most cuts land early (open, recovery, the first batches); one in three may
        // land anywhere in the cycle's work.
        let cut = if rng.below(3) == 0 { rng.below(600) } else { rng.below(120) };
        st.power_cut_after(cut);
        let cache = match open(&st, opts) {
            Ok(c) => c,
            Err(e) if st.powered_off() => {
                let _ = e;
                bump(&CRASHES, 1);
                st.crash(rng.next_u64());
                continue;
            }
            Err(e) => return Err(format!("cycle {cycle}: open failed without a power cut: {e}")),
        };
        check(&cache, &model, cycle, evicting)?;
        // Forget what the crash dropped: those sequence numbers will be given again.
        for s in 0..STREAMS {
            if let Some(id) = cache.find_stream(&format!("m{s}"), "d") {
                let durable = cache.stream_info(id).unwrap().durable_upto;
                model.written.retain(|&(ws, seq), _| ws != id.0 || seq <= durable);
            }
        }
        let mut ids = Vec::new();
        for s in 0..STREAMS {
            match cache.stream(&format!("m{s}"), "d") {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        let mut next_seq: HashMap<u32, u64> =
            ids.iter().map(|id| (id.0, cache.stream_info(*id).unwrap().durable_upto + 1)).collect();
        'work: for _ in 0..40 {
            if ids.is_empty() {
                break;
            }
            let mut tickets: Vec<AppendTicket> = Vec::new();
            // The group is committed together, in batches set by the records alone. Not
            // while the reclaimer thread races the simulator: a hold would also hold its
            // compaction copies back, and so the room it makes.
            let hold = (!opts.background_reclaim).then(|| cache.hold_commits());
            let mut reclaim_now = false;
            for _ in 0..1 + rng.below(6) {
                let s = ids[rng.below(ids.len() as u64) as usize];
                let next = next_seq[&s.0];
                let len = 1 + rng.below(3000) as usize;
                let bytes = data(s.0, next ^ (cycle as u64) << 32, len);
                let mut appended = cache.append(s, &bytes);
                // Full: with eviction on, give the background reclaimer a few chances to
                // make room (by reclaim or by evicting the largest backlog).
                for _ in 0..20 {
                    if !(evicting && matches!(appended, Err(AppendError::Backpressure { .. }))) {
                        break;
                    }
                    bump(&BACKPRESSURED, 1);
                    if !opts.background_reclaim {
                        // No thread to make room: end the group here; the simulator
                        // reclaims once its records are durable, in a fixed order.
                        reclaim_now = true;
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    appended = cache.append(s, &bytes);
                }
                if reclaim_now {
                    break;
                }
                match appended {
                    Ok(t) => {
                        // A failed batch rolls sequences back; only then may they differ.
                        if t.seq != next && !st.powered_off() {
                            return Err(format!("seq {} assigned, {} expected", t.seq, next));
                        }
                        model.written.insert((s.0, t.seq), bytes);
                        next_seq.insert(s.0, t.seq + 1);
                        tickets.push(t);
                    }
                    Err(_) => break 'work,
                }
            }
            drop(hold);
            for t in tickets {
                let (s, seq) = (t.stream.0, t.seq);
                match t.wait() {
                    Ok(_) => {
                        bump(&ACKED, 1);
                        let a = model.acked.entry(s).or_default();
                        *a = (*a).max(seq);
                    }
                    Err(_) => break 'work,
                }
            }
            if rng.below(4) == 0 {
                let s = ids[rng.below(ids.len() as u64) as usize];
                let info = cache.stream_info(s).unwrap();
                if info.durable_upto > info.uploaded_upto {
                    let upto = info.uploaded_upto + 1 + rng.below(info.durable_upto - info.uploaded_upto);
                    model.uploaded_tried.insert(s.0, upto);
                    if cache.ack(s, upto).is_err() {
                        break 'work;
                    }
                    model.uploaded_ok.insert(s.0, upto);
                }
            }
            if (reclaim_now || rng.below(6) == 0) && cache.reclaim().is_err() {
                break 'work;
            }
        }
        if rng.below(4) == 0 {
            st.power_cut_after(u64::MAX / 2);
            if cache.close().is_err() || st.powered_off() {
                bump(&CRASHES, 1);
                st.crash(rng.next_u64());
            }
        } else {
            bump(&CRASHES, 1);
            common::kill(&st, cache, rng.next_u64());
        }
    }
    st.power_cut_after(u64::MAX / 2);
    let cache = open(&st, opts).map_err(|e| format!("final open: {e}"))?;
    check(&cache, &model, 99, evicting)?;
    Ok(st.trace())
}

/// Replays `CHURNLOG_CRASH_SEED` alone when set (`None`), or runs the number of seeds
/// `count_var` says (`default`) from `CHURNLOG_CRASH_BASE`, failing with the first five
/// failing seeds; returns the number run.
fn run_seeds(opts: &Options, count_var: &str, default: u64) -> Option<u64> {
    if let Ok(seed) = std::env::var("CHURNLOG_CRASH_SEED") {
        let seed: u64 = seed.parse().expect("CHURNLOG_CRASH_SEED is a number");
        let trace = run_seed(seed, opts).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        eprintln!("seed {seed}: storage trace {trace:016x}");
        return None;
    }
    let seeds: u64 = std::env::var(count_var).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let base: u64 = std::env::var("CHURNLOG_CRASH_BASE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    // CHURNLOG_CRASH_REPLAYS=K runs every seed K times and counts the seeds whose runs
    // did not all make the same storage calls in the same order.
    let replays: u64 = std::env::var("CHURNLOG_CRASH_REPLAYS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut diverged = 0;
    let mut failures = Vec::new();
    for seed in base..base + seeds {
        let mut traces = Vec::new();
        for _ in 0..replays.max(1) {
            match run_caught(seed, opts) {
                Ok(trace) => traces.push(trace),
                Err(e) => failures.push(format!("seed {seed}: {e}")),
            }
        }
        traces.dedup();
        diverged += u64::from(traces.len() > 1);
        if failures.len() >= 5 {
            break;
        }
    }
    if replays > 1 {
        eprintln!("{diverged} of {seeds} seeds made different storage calls across {replays} runs");
    }
    assert!(
        failures.is_empty(),
        "{} failing seed(s) (replay with CHURNLOG_CRASH_SEED=S):\n{}",
        failures.len(),
        failures.join("\n")
    );
    Some(seeds)
}

/// [`run_seed`], with a panic (an engine assertion) reported as that seed's failure.
fn run_caught(seed: u64, opts: &Options) -> Result<u64, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(seed, opts))).unwrap_or_else(|p| {
        let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(format!("panicked: {}", what.unwrap_or_default()))
    })
}

/// `evicting`: eviction is on, so a stream marked resync required may have had its
/// unuploaded records dropped (its upload cursor jumps to its durable end).
fn check(cache: &churnlog::cache::Cache, model: &Model, cycle: usize, evicting: bool) -> Result<(), String> {
    let report = cache.recovery_report();
    bump(&TORN_TAILS, u64::from(report.torn_tail.is_some()));
    bump(&SEALS_SCANNED, report.segments_scanned.len() as u64);
    bump(&SPARES_RECYCLED, u64::from(report.spare_segment.is_some()));
    if !report.damage.is_empty() || !report.damaged_streams.is_empty() {
        return Err(format!("cycle {cycle}: recovery reports damage after a plain crash: {report}"));
    }
    for s in 0..STREAMS {
        let Some(id) = cache.find_stream(&format!("m{s}"), "d") else {
            if model.acked.contains_key(&s) {
                return Err(format!("stream {s} vanished"));
            }
            continue;
        };
        let info = cache.stream_info(id).unwrap();
        let acked = model.acked.get(&id.0).copied().unwrap_or(0);
        let up_ok = model.uploaded_ok.get(&id.0).copied().unwrap_or(0);
        let up_tried = model.uploaded_tried.get(&id.0).copied().unwrap_or(0).max(up_ok);
        if info.durable_upto < acked {
            return Err(format!(
                "cycle {cycle}: stream {s} durable to {} but {} was acknowledged",
                info.durable_upto, acked
            ));
        }
        let evicted = evicting && info.resync_required;
        if evicted {
            bump(&EVICTED, 1);
        }
        if info.uploaded_upto < up_ok || (info.uploaded_upto > up_tried && !evicted) {
            return Err(format!(
                "cycle {cycle}: stream {s} uploaded cursor {} outside [{up_ok}, {up_tried}]",
                info.uploaded_upto
            ));
        }
        for seq in info.uploaded_upto + 1..=info.durable_upto {
            let got = cache.read(id, seq).map_err(|e| format!("cycle {cycle}: stream {s} seq {seq}: {e}"))?;
            bump(&RECORDS_CHECKED, 1);
            match model.written.get(&(id.0, seq)) {
                Some(want) if *want == got => {}
                Some(_) => return Err(format!("cycle {cycle}: stream {s} seq {seq} reads back different bytes")),
                None => return Err(format!("cycle {cycle}: stream {s} seq {seq} was never written")),
            }
        }
    }
    Ok(())
}

/// The first run's options: every storage call in an order set by the seed alone (the
/// spare segment made by the flusher, not a thread of its own; one LZ4 effort), so a
/// seed replays exactly.
fn deterministic_options() -> Options {
    deterministic(tiny_options())
}

/// `opts` without the preparer thread and with one LZ4 effort.
fn deterministic(opts: Options) -> Options {
    Options { segment_preparer_thread: false, lz4_acceleration_max: 1, ..opts }
}

#[test]
fn power_loss_at_thousands_of_points() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("warn").try_init();
    let Some(seeds) = run_seeds(&deterministic_options(), "CHURNLOG_CRASH_SEEDS", 2000) else { return };
    let crashes = CRASHES.with(Cell::get);
    let (acked, torn, checked, scanned, spares) = (
        ACKED.with(Cell::get),
        TORN_TAILS.with(Cell::get),
        RECORDS_CHECKED.with(Cell::get),
        SEALS_SCANNED.with(Cell::get),
        SPARES_RECYCLED.with(Cell::get),
    );
    eprintln!("{seeds} seeds: {crashes} crashes recovered from, {acked} records acknowledged, {checked} read back after recovery, {torn} torn tails truncated, {scanned} open segments scanned, {spares} spare segment files recycled");
    // The simulation must actually exercise crashes mid-write, not only clean stops.
    assert!(acked > seeds * 10 && checked > seeds * 10, "too little work: {acked} acked, {checked} checked");
    assert!(torn > seeds / 20, "too few torn tails ({torn}) for {seeds} seeds");
    // Crashes must also find the preparer's spare file next to the open segment.
    assert!(spares > seeds / 20, "too few spare segments found ({spares}) for {seeds} seeds");
}

/// A seed replays exactly: the same storage calls in the same order (the trace of the
/// fault-injecting storage), so a failure found once is found again under a debugger;
/// with eviction, compaction and salvage too, when the simulator runs the reclaimer.
#[test]
fn a_seed_replays_exactly() {
    for opts in [deterministic_options(), stepped_reclaimer_options()] {
        for seed in 0..40 {
            let first = run_caught(seed, &opts).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let again = run_caught(seed, &opts).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(first, again, "seed {seed} made other storage calls the second time ({opts:?})");
        }
    }
}

/// The preparer makes the next segment's file ahead of rotation. A crash leaves it on
/// disk, empty, next to the open segment: recovery must recycle it and still scan the
/// open segment. A clean close retires it itself.
#[test]
fn the_spare_segment_is_recycled_after_a_crash_and_retired_on_close() {
    let opts = tiny_options();
    let st = FaultStorage::new();
    let cache = open(&st, &opts).unwrap();
    let s = cache.stream("m", "d").unwrap();
    let mut written = Vec::new();
    for seq in 1..=60u64 {
        let bytes = data(s.0, seq, 3000);
        cache.append(s, &bytes).unwrap().wait().unwrap();
        written.push(bytes);
    }
    // Segments of 64 KiB: several rotations. The spare is made in the background; wait
    // (bounded) until it is on disk: one seg- file more than the log holds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::segments(&st).len() as u64 != cache.space().segments_in_use + 1 {
        assert!(std::time::Instant::now() < deadline, "no spare segment file appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let spare = common::newest_segment(&st);
    common::kill(&st, cache, 7);

    let cache = open(&st, &opts).unwrap();
    let report = cache.recovery_report().clone();
    assert!(report.damage.is_empty() && report.torn_tail.is_none(), "{report:?}");
    let spare_id = u64::from_str_radix(&spare[4..20], 16).unwrap();
    assert_eq!(report.spare_segment, Some(spare_id));
    assert_eq!(report.segments_scanned.len(), 1, "the open segment, below the spare, was scanned");
    assert!(report.segments_scanned[0] < spare_id);
    assert!(!st.names().contains(&spare), "the spare was renamed");
    assert!(st.names().iter().any(|n| n == &format!("recycle-{spare_id:016x}.log")));
    for (i, want) in written.iter().enumerate() {
        assert_eq!(&cache.read(s, i as u64 + 1).unwrap(), want, "seq {}", i + 1);
    }
    // Write into new segments, then close cleanly: the unused spare is retired then.
    for seq in 61..=120u64 {
        let bytes = data(s.0, seq, 3000);
        cache.append(s, &bytes).unwrap().wait().unwrap();
        written.push(bytes);
    }
    cache.close().unwrap();
    let cache = open(&st, &opts).unwrap();
    let report = cache.recovery_report();
    assert_eq!(report.spare_segment, None, "close retired the spare");
    assert!(report.segments_scanned.is_empty(), "everything was sealed: {report:?}");
    for (i, want) in written.iter().enumerate() {
        assert_eq!(&cache.read(s, i as u64 + 1).unwrap(), want, "seq {}", i + 1);
    }
}

/// A cache of 4 segments of 64 KiB that a cycle's work fills, so reclaim, compaction and
/// eviction of the largest backlog all run; salvage as the recovery mode.
fn filling_options() -> Options {
    Options {
        capacity_bytes: 256 << 10,
        eviction: EvictionPolicy::LargestBacklog,
        recovery_mode: RecoveryMode::SalvageMarkResync,
        compact_usage_min: 0.0,
        compact_live_ratio_max: 0.5,
        throttle_delay_us_max: 100,
        ..tiny_options()
    }
}

/// [`filling_options`] with the reclaimer run by the simulator (when an append is refused
/// for space, and at random moments) instead of a thread, so that a seed replays exactly.
fn stepped_reclaimer_options() -> Options {
    deterministic(Options { background_reclaim: false, ..filling_options() })
}

/// Eviction, compaction and salvage, with the reclaimer stepped by the seed: replays
/// exactly (`a_seed_replays_exactly`).
#[test]
fn power_loss_with_eviction_compaction_and_salvage_stepped_by_the_seed() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("off").try_init();
    let Some(seeds) = run_seeds(&stepped_reclaimer_options(), "CHURNLOG_CRASH_BG_SEEDS", 300) else { return };
    let (crashes, acked, checked, evicted) =
        (CRASHES.with(Cell::get), ACKED.with(Cell::get), RECORDS_CHECKED.with(Cell::get), EVICTED.with(Cell::get));
    eprintln!("{seeds} seeds, reclaimer stepped by the seed: {crashes} crashes recovered from, {acked} records acknowledged, {checked} read back after recovery, {evicted} recoveries found an evicted stream, {} appends refused for space", BACKPRESSURED.with(Cell::get));
    assert!(acked > seeds * 10 && checked > seeds * 5, "too little work: {acked} acked, {checked} checked");
    assert!(evicted > 0, "no seed filled the cache far enough to evict");
}

/// The background roles on, racing the simulator: see the module's comment.
#[test]
fn power_loss_with_the_background_reclaimer_eviction_and_salvage() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("off").try_init();
    let opts = Options {
        background_reclaim: true,
        reclaim_interval: std::time::Duration::from_millis(1),
        ..filling_options()
    };
    let Some(seeds) = run_seeds(&opts, "CHURNLOG_CRASH_BG_SEEDS", 300) else { return };
    let (crashes, acked, checked, evicted) =
        (CRASHES.with(Cell::get), ACKED.with(Cell::get), RECORDS_CHECKED.with(Cell::get), EVICTED.with(Cell::get));
    eprintln!("{seeds} seeds, background roles on: {crashes} crashes recovered from, {acked} records acknowledged, {checked} read back after recovery, {evicted} recoveries found an evicted stream, {} appends refused for space and retried", BACKPRESSURED.with(Cell::get));
    assert!(acked > seeds * 10 && checked > seeds * 5, "too little work: {acked} acked, {checked} checked");
    assert!(evicted > 0, "no seed filled the cache far enough to evict");
}
