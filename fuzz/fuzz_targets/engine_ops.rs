//! The engine driven by arbitrary operations and power cuts, through the fault-injecting
//! storage, against a model. Every byte of input is a decision: which stream appends how
//! much, when uploads are acknowledged, when space is reclaimed or a stream evicted, and
//! after how many storage calls the power goes. After every crash and recovery nothing
//! acknowledged is missing, nothing reads back different from what was written, and the
//! upload cursor never moves back.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::{Cache, Options};
use libfuzzer_sys::fuzz_target;

const STREAMS: u32 = 3;

/// The input as a stream of decisions (zeros once it runs out).
struct Decisions<'a>(&'a [u8]);

impl Decisions<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn below(&mut self, n: u16) -> u16 {
        (u16::from_le_bytes([self.byte(), self.byte()])) % n.max(1)
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Default)]
struct Model {
    written: HashMap<(u32, u64), Vec<u8>>,
    acked: HashMap<u32, u64>,
    uploaded_ok: HashMap<u32, u64>,
    uploaded_tried: HashMap<u32, u64>,
    /// Streams evicted at least once: records up to their eviction are gone by design.
    evicted_upto: HashMap<u32, u64>,
}

fn options() -> Options {
    Options {
        capacity_bytes: 2 << 20,
        segment_size: 64 << 10,
        record_size_max: 4 << 10,
        commit_bytes_max: 16 << 10,
        background_reclaim: false,
        // No preparer thread and one LZ4 effort: the same input does the same storage
        // work every run (what libFuzzer assumes), and one thread fewer per open.
        segment_preparer_thread: false,
        lz4_acceleration_max: 1,
        ..Options::default()
    }
}

fn bytes(stream: u32, seq: u64, salt: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    churnlog::bench::fill_random(&mut out, (u64::from(stream) << 48) ^ seq ^ (salt << 32));
    out
}

fn open(st: &FaultStorage) -> Result<Cache, churnlog::cache::OpenError> {
    Cache::open_with_storage(Arc::new(st.clone()), options())
}

fn check(cache: &Cache, model: &Model) {
    let report = cache.recovery_report();
    assert!(report.damage.is_empty() && report.damaged_streams.is_empty(), "damage after a plain crash: {report}");
    for s in 0..STREAMS {
        let Some(id) = cache.find_stream(&format!("m{s}"), "d") else {
            assert!(!model.acked.contains_key(&s), "stream {s} vanished");
            continue;
        };
        let info = cache.stream_info(id).unwrap();
        let acked = model.acked.get(&id.0).copied().unwrap_or(0);
        let up_ok = model.uploaded_ok.get(&id.0).copied().unwrap_or(0);
        let up_tried = model.uploaded_tried.get(&id.0).copied().unwrap_or(0).max(up_ok);
        assert!(info.durable_upto >= acked, "stream {s} durable to {} but {acked} acknowledged", info.durable_upto);
        assert!(
            info.uploaded_upto >= up_ok && info.uploaded_upto <= up_tried.max(info.evicted_upto),
            "stream {s} upload cursor {} outside [{up_ok}, {up_tried}]",
            info.uploaded_upto
        );
        for seq in info.uploaded_upto + 1..=info.durable_upto {
            let got = cache.read(id, seq).unwrap_or_else(|e| panic!("stream {s} seq {seq}: {e}"));
            match model.written.get(&(id.0, seq)) {
                Some(want) => assert!(*want == got, "stream {s} seq {seq} reads back different bytes"),
                None => panic!("stream {s} seq {seq} was never written"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut d = Decisions(data);
    let st = FaultStorage::new();
    let mut model = Model::default();
    let mut cycle = 0u64;
    while !d.done() && cycle < 6 {
        cycle += 1;
        st.power_cut_after(u64::from(d.below(400)));
        let cache = match open(&st) {
            Ok(c) => c,
            Err(_) if st.powered_off() => {
                st.crash(u64::from(d.byte()));
                continue;
            }
            Err(e) => panic!("open failed without a power cut: {e}"),
        };
        check(&cache, &model);
        for s in 0..STREAMS {
            if let Some(id) = cache.find_stream(&format!("m{s}"), "d") {
                let durable = cache.stream_info(id).unwrap().durable_upto;
                model.written.retain(|&(ws, seq), _| ws != id.0 || seq <= durable);
            }
        }
        let ids: Vec<_> = (0..STREAMS).map_while(|s| cache.stream(&format!("m{s}"), "d").ok()).collect();
        'work: for _ in 0..1 + d.below(60) {
            if ids.is_empty() || d.done() {
                break;
            }
            let stream = ids[d.below(ids.len() as u16) as usize];
            match d.byte() % 8 {
                0..=4 => {
                    let mut tickets = Vec::new();
                    for _ in 0..1 + d.below(4) {
                        let s = ids[d.below(ids.len() as u16) as usize];
                        let seq = cache.stream_info(s).unwrap().durable_upto + 1 + tickets.len() as u64;
                        let data = bytes(s.0, seq, cycle, 1 + d.below(4000) as usize);
                        match cache.append(s, &data) {
                            Ok(t) => {
                                model.written.insert((s.0, t.seq), data);
                                tickets.push(t);
                            }
                            Err(_) => break 'work,
                        }
                    }
                    for t in tickets {
                        let (s, seq) = (t.stream.0, t.seq);
                        match t.wait() {
                            Ok(_) => {
                                let a = model.acked.entry(s).or_default();
                                *a = (*a).max(seq);
                            }
                            Err(_) => break 'work,
                        }
                    }
                }
                5 => {
                    let info = cache.stream_info(stream).unwrap();
                    if info.durable_upto > info.uploaded_upto {
                        let span = (info.durable_upto - info.uploaded_upto).min(u64::from(u16::MAX));
                        let upto = info.uploaded_upto + 1 + u64::from(d.below(span as u16));
                        model.uploaded_tried.insert(stream.0, upto);
                        if cache.ack(stream, upto).is_err() {
                            break 'work;
                        }
                        model.uploaded_ok.insert(stream.0, upto);
                    }
                }
                6 => {
                    if cache.reclaim().is_err() {
                        break 'work;
                    }
                }
                _ => {
                    // Eviction drops unuploaded records on purpose: the model forgets them.
                    let before = cache.stream_info(stream).unwrap().durable_upto;
                    model.uploaded_tried.insert(stream.0, before);
                    match cache.evict_stream(stream, "fuzz") {
                        Ok(_) => {
                            model.uploaded_ok.insert(stream.0, before);
                            model.evicted_upto.insert(stream.0, before);
                        }
                        Err(_) => break 'work,
                    }
                }
            }
        }
        // Power goes; what was not synced may or may not survive.
        st.power_cut_after(0);
        drop(cache);
        st.crash(u64::from(d.byte()) | cycle << 8);
    }
    st.power_cut_after(u64::MAX / 2);
    let cache = open(&st).expect("final open");
    check(&cache, &model);
});
