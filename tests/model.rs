//! Model test: random appends, reads, acks, reclaims, evictions and reopens (clean and
//! crashed) against a plain in-memory model of what each stream must hold.

mod common;

use std::collections::BTreeMap;

use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::{Cache, Options, ReadError, StreamId};
use common::{kill, open};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Append {
        stream: u8,
        len: u16,
        fill: u8,
    },
    /// Append several records before waiting on any of them.
    Burst {
        stream: u8,
        count: u8,
        len: u16,
    },
    Read {
        stream: u8,
        back: u16,
    },
    Ack {
        stream: u8,
        frac: u8,
    },
    Reclaim,
    Evict {
        stream: u8,
    },
    Reopen {
        crash: bool,
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, 1u16..4096, any::<u8>()).prop_map(|(stream, len, fill)| Op::Append { stream, len, fill }),
        2 => (0u8..3, 1u8..12, 1u16..3000).prop_map(|(stream, count, len)| Op::Burst { stream, count, len }),
        3 => (0u8..3, any::<u16>()).prop_map(|(stream, back)| Op::Read { stream, back }),
        2 => (0u8..3, any::<u8>()).prop_map(|(stream, frac)| Op::Ack { stream, frac }),
        1 => Just(Op::Reclaim),
        1 => (0u8..3).prop_map(|stream| Op::Evict { stream }),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(crash, seed)| Op::Reopen { crash, seed }),
    ]
}

#[derive(Default)]
struct StreamModel {
    /// Records by sequence; everything here is acknowledged durable.
    records: BTreeMap<u64, Vec<u8>>,
    uploaded_upto: u64,
    next_seq: u64,
    resync: bool,
}

fn bytes(len: u16, fill: u8, seq: u64) -> Vec<u8> {
    (0..len as usize)
        .map(|i| if fill.is_multiple_of(2) { fill ^ (i as u8 & 7) } else { (i as u64 * 31 + seq * 7) as u8 ^ fill })
        .collect()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let st = FaultStorage::new();
    let opts = Options {
        compact_usage_min: 0.0,
        compact_live_ratio_max: 0.5,
        capacity_bytes: 16 << 20,
        ..common::tiny_options()
    };
    let mut cache: Option<Cache> = Some(open(&st, &opts).unwrap());
    let mut model: Vec<StreamModel> = (0..3).map(|_| StreamModel { next_seq: 1, ..Default::default() }).collect();
    let ids: Vec<StreamId> = (0..3).map(|i| cache.as_ref().unwrap().stream(&format!("m{i}"), "d").unwrap()).collect();
    for op in ops {
        let c = cache.as_ref().unwrap();
        match op {
            Op::Append { stream, len, fill } => {
                let m = &mut model[stream as usize];
                let data = bytes(len, fill, m.next_seq);
                let seq = c.append(ids[stream as usize], &data).unwrap().wait().unwrap();
                prop_assert_eq!(seq, m.next_seq);
                m.records.insert(seq, data);
                m.next_seq += 1;
            }
            Op::Burst { stream, count, len } => {
                let m = &mut model[stream as usize];
                let mut tickets = Vec::new();
                for k in 0..count {
                    let data = bytes(len, k, m.next_seq);
                    let t = c.append(ids[stream as usize], &data).unwrap();
                    prop_assert_eq!(t.seq, m.next_seq);
                    m.records.insert(m.next_seq, data);
                    m.next_seq += 1;
                    tickets.push(t);
                }
                for t in tickets {
                    t.wait().unwrap();
                }
            }
            Op::Read { stream, back } => {
                let m = &model[stream as usize];
                if let Some((&first, _)) = m.records.first_key_value() {
                    let last = *m.records.keys().last().unwrap();
                    let seq = last - u64::from(back) % (last - first + 1);
                    prop_assert_eq!(&c.read(ids[stream as usize], seq).unwrap(), &m.records[&seq]);
                }
                let gone = m.uploaded_upto.max(1);
                if m.uploaded_upto > 0 {
                    let is_not_available =
                        matches!(c.read(ids[stream as usize], gone), Err(ReadError::NotAvailable { .. }));
                    prop_assert!(is_not_available);
                }
            }
            Op::Ack { stream, frac } => {
                let m = &mut model[stream as usize];
                if let Some(&last) = m.records.keys().last() {
                    let upto = m.uploaded_upto + (last - m.uploaded_upto) * u64::from(frac) / 255;
                    c.ack(ids[stream as usize], upto).unwrap();
                    m.uploaded_upto = m.uploaded_upto.max(upto);
                    m.records.retain(|&s, _| s > upto);
                }
            }
            Op::Reclaim => {
                c.reclaim().unwrap();
            }
            Op::Evict { stream } => {
                let m = &mut model[stream as usize];
                c.evict_stream(ids[stream as usize], "model test").unwrap();
                m.uploaded_upto = m.next_seq - 1;
                m.records.clear();
                m.resync = true;
            }
            Op::Reopen { crash, seed } => {
                let c = cache.take().unwrap();
                if crash {
                    kill(&st, c, seed);
                } else {
                    c.close().unwrap();
                }
                cache = Some(open(&st, &opts).unwrap());
            }
        }
        // After every step the engine agrees with the model.
        let c = cache.as_ref().unwrap();
        for (i, m) in model.iter().enumerate() {
            let info = c.stream_info(ids[i]).unwrap();
            prop_assert_eq!(info.uploaded_upto, m.uploaded_upto);
            prop_assert_eq!(info.durable_upto, m.next_seq - 1);
            prop_assert_eq!(info.records, m.records.len() as u64);
            prop_assert_eq!(info.resync_required, m.resync);
        }
    }
    let c = cache.take().unwrap();
    for (i, m) in model.iter().enumerate() {
        for (seq, want) in &m.records {
            prop_assert_eq!(&c.read(ids[i], *seq).unwrap(), want);
        }
    }
    prop_assert!(c.verify().is_clean());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
