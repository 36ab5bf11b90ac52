//! Criterion benches of the engine's parts: batch encoding, CRC and LZ4 per MiB, the
//! append path end to end (in memory, so the CPU cost shows, not the disk), and the
//! recovery of one segment from its summary and by a scan.
//! Run: `cargo bench --bench engine`.

use std::sync::Arc;

use churnlog::cache::compress::encode_with;
use churnlog::cache::format::{
    batch_crc_start, seal_batch_crc, BatchHeader, BatchKind, Codec, RecordHeader, RecordKind, BATCH_HEADER_LEN,
    RECORD_HEADER_LEN,
};
use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::{Cache, IoBackend, Options};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn record(len: usize, compressible: f64) -> Vec<u8> {
    let mut out = Vec::new();
    churnlog::bench::record_bytes(1, 1, len, compressible, &mut out);
    out
}

fn batch_encode(c: &mut Criterion) {
    let payload = record(64 << 10, 0.0);
    let mut g = c.benchmark_group("batch_encode");
    g.throughput(Throughput::Bytes(64 * (64 << 10)));
    g.bench_function("64_records_of_64KiB", |b| {
        let mut buf = Vec::with_capacity(5 << 20);
        b.iter(|| {
            buf.clear();
            buf.resize(BATCH_HEADER_LEN, 0);
            let mut offsets = Vec::with_capacity(64);
            for seq in 1..=64u64 {
                let at = buf.len();
                offsets.push(at);
                buf.resize(at + RECORD_HEADER_LEN, 0);
                RecordHeader {
                    stream: seq as u32,
                    kind: RecordKind::Data,
                    codec: Codec::Raw,
                    seq,
                    stored_len: payload.len() as u32,
                    logical_len: payload.len() as u32,
                    payload_crc: 0,
                }
                .encode(&mut buf[at..]);
                buf.extend_from_slice(&payload);
            }
            let h = BatchHeader {
                kind: BatchKind::Records,
                batch_len: buf.len() as u32,
                segment_id: 1,
                batch_no: 1,
                offset: 0,
                durable_end: 0,
                count: 64,
            };
            h.encode(&mut buf);
            let mut crc = batch_crc_start(7, &buf);
            for at in &offsets {
                crc.update(&buf[*at..*at + RECORD_HEADER_LEN]);
            }
            seal_batch_crc(&mut buf, crc.finalize());
            std::hint::black_box(&buf);
        })
    });
    g.finish();
}

fn crc_and_lz4(c: &mut Criterion) {
    let mut g = c.benchmark_group("per_MiB");
    g.throughput(Throughput::Bytes(1 << 20));
    let random = record(1 << 20, 0.0);
    let half = record(1 << 20, 0.5);
    g.bench_function("crc32", |b| b.iter(|| crc32fast::hash(std::hint::black_box(&random))));
    // Acceleration 1 is standard LZ4; 4 is the default ceiling of the effort controller.
    for (name, data, acceleration) in
        [("incompressible", &random, 1), ("compressible_2to1", &half, 1), ("compressible_2to1_accel4", &half, 4)]
    {
        g.bench_function(format!("encode_64KiB_records_{name}"), |b| {
            b.iter(|| {
                for chunk in data.chunks(64 << 10) {
                    std::hint::black_box(encode_with(chunk, 0.9, acceleration, |codec, stored, crc| {
                        (codec, stored.len(), crc)
                    }));
                }
            })
        });
    }
    g.finish();
}

fn append_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("append_path");
    g.throughput(Throughput::Bytes(256 * (64 << 10)));
    g.sample_size(20);
    let data = record(64 << 10, 0.0);
    // On tmpfs when there is one: the page cache costs a memcpy, the disk nothing, so what
    // shows is the engine's own CPU per record.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    g.bench_function("256_records_64KiB_8_streams_tmpfs", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir_in(&base).unwrap();
                let opts = Options { capacity_bytes: 1 << 30, segment_size: 32 << 20, ..Options::small_for_tests() };
                let opts =
                    Options { record_size_max: 1 << 20, commit_bytes_max: 4 << 20, io_backend: IoBackend::Std, ..opts };
                let cache = Cache::open(dir.path(), opts).unwrap();
                let streams: Vec<_> = (0..8).map(|i| cache.stream(&format!("m{i}"), "d").unwrap()).collect();
                (cache, streams, dir)
            },
            |(cache, streams, dir)| {
                let tickets: Vec<_> = (0..256).map(|i| cache.append(streams[i % 8], &data).unwrap()).collect();
                for t in tickets {
                    t.wait().unwrap();
                }
                (cache, dir)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn recovery(c: &mut Criterion) {
    let opts =
        Options { capacity_bytes: 1 << 30, segment_size: 32 << 20, background_reclaim: false, ..Options::default() };
    let build = |seal: bool| {
        let st = FaultStorage::new();
        let cache = Cache::open_with_storage(Arc::new(st.clone()), opts.clone()).unwrap();
        let s = cache.stream("m", "d").unwrap();
        let data = record(16 << 10, 0.0);
        let tickets: Vec<_> = (0..1500).map(|_| cache.append(s, &data).unwrap()).collect();
        for t in tickets {
            t.wait().unwrap();
        }
        if seal {
            cache.close().unwrap();
        } else {
            st.power_cut_after(0);
            drop(cache);
            st.crash(1);
        }
        st
    };
    let mut g = c.benchmark_group("recover_one_segment_24MiB");
    g.sample_size(20);
    for (name, seal) in [("from_summary", true), ("by_scan", false)] {
        let st = build(seal);
        let ro = Options { read_only: true, ..opts.clone() };
        g.bench_function(name, |b| {
            b.iter(|| {
                let cache = Cache::open_with_storage(Arc::new(st.clone()), ro.clone()).unwrap();
                assert_eq!(cache.stats().index_records, 1500);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, batch_encode, crc_and_lz4, append_path, recovery);
criterion_main!(benches);
