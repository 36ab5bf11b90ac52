//! Writes the committed seed corpora of the cargo-fuzz targets (`fuzz/seeds/<target>/`)
//! from bytes churnlog itself produces: cache directories (encoded as the `recovery`
//! target reads them), data objects, wire frames and stored records, configuration and
//! proxy files, and decision streams for `engine_ops`.
//! Run: `cargo run --example fuzz_seeds -- fuzz/seeds`.

use std::path::PathBuf;
use std::sync::Arc;

use churnlog::cache::flusher_test_support::segment_file_name;
use churnlog::cache::io::fault::FaultStorage;
use churnlog::cache::{Cache, Options};

fn options() -> Options {
    Options {
        segment_size: 64 << 10,
        capacity_bytes: 16 * (64 << 10),
        commit_bytes_max: 16 << 10,
        record_size_max: 8 << 10,
        background_reclaim: false,
        ..Options::default()
    }
}

/// `kind u8 | len u16 | bytes` per file, trailing zeros of segments dropped.
fn encode(st: &FaultStorage) -> Vec<u8> {
    let mut out = Vec::new();
    for name in st.names() {
        let kind = if name == "META" {
            0u8
        } else if let Some(id) = (1..8u64).find(|&i| segment_file_name(i) == name) {
            id as u8
        } else {
            continue;
        };
        let mut bytes = st.durable_bytes(&name).unwrap_or_default();
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        bytes.truncate(u16::MAX as usize);
        out.push(kind);
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

fn fill(st: &FaultStorage, records: u64, record_len: usize, ack_every: u64) -> Cache {
    let cache = Cache::open_with_storage(Arc::new(st.clone()), options()).expect("open");
    let streams = [cache.stream("m0", "d0").unwrap(), cache.stream("m1", "d0").unwrap()];
    for i in 0..records {
        let s = streams[(i % 2) as usize];
        let data: Vec<u8> = (0..record_len).map(|j| (i as usize * 31 + j) as u8).collect();
        cache.append(s, &data).unwrap().wait().unwrap();
        if ack_every > 0 && i % ack_every == ack_every - 1 {
            let upto = cache.stream_info(s).unwrap().durable_upto / 2;
            if upto > cache.stream_info(s).unwrap().uploaded_upto {
                cache.ack(s, upto).unwrap();
            }
        }
    }
    cache
}

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));
    let dir = root.join("recovery");
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, u64, usize, u64, bool); 4] = [
        ("closed-small", 12, 300, 0, true),
        ("crashed-small", 12, 300, 0, false),
        ("closed-two-segments", 40, 2000, 7, true),
        ("crashed-acked", 30, 1500, 5, false),
    ];
    for (name, records, len, ack_every, close) in cases {
        let st = FaultStorage::new();
        let cache = fill(&st, records, len, ack_every);
        if close {
            cache.close().unwrap();
        } else {
            st.power_cut_after(0);
            drop(cache);
            st.crash(7);
        }
        let bytes = encode(&st);
        std::fs::write(dir.join(name), &bytes).unwrap();
        println!("{name}: {} bytes from {:?}", bytes.len(), st.names());
    }

    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };

    // Data objects: raw and compressed records.
    let mut b = churnlog::store::object::ObjectBuilder::with_capacity(1 << 16);
    let raw = b"a raw record".to_vec();
    b.push_stored(5, churnlog::cache::Codec::Raw, raw.len() as u32, &raw, crc32fast::hash(&raw));
    let page = vec![3u8; 8192];
    let packed = lz4_flex::block::compress(&page);
    b.push_stored(6, churnlog::cache::Codec::Lz4, page.len() as u32, &packed, crc32fast::hash(&packed));
    put("objects", "two-records", &b.finish());

    // Wire frames (type byte, then body) and stored records.
    use churnlog::protocol::{Frame, PointKind, StreamRecord};
    let frames = [
        (
            "hello",
            Frame::Hello {
                version: churnlog::protocol::PROTOCOL_VERSION,
                machine: "vm-1".into(),
                client_nonce: [1; 32],
            },
        ),
        ("write", Frame::Write { disk: 0, tag: 1, offset: 65536, data: vec![9; 100].into() }),
        ("point", Frame::Durable { upto_tag: 7 }),
        ("hashes-request", Frame::HashesRequest { disk: 0, block_size: 65536 }),
        ("hashes", Frame::Hashes { disk: 0, first_block: 0, hashes: vec![1, u128::MAX, 3] }),
        ("hashes-end", Frame::HashesEnd { disk: 0, blocks: 3, head_seq: 9 }),
        ("hashes-unavailable", Frame::HashesUnavailable { disk: 1, reason: "no history".into() }),
    ];
    for (name, frame) in frames {
        let mut out = Vec::new();
        frame.encode(&mut out);
        put("wire_frames", name, &out[4..]);
    }
    for (name, record) in [
        ("record-write", StreamRecord::Write { offset: 4096, data: vec![1; 64] }),
        ("record-zero", StreamRecord::Zero { offset: 0, len: 1 << 20 }),
        (
            "record-point",
            StreamRecord::Point { point_id: 3, kind: PointKind::CrashConsistent, unix_ms: 1, disk_size: 1 << 30 },
        ),
    ] {
        put("wire_frames", name, &record.encode());
    }

    // Configuration and proxy files.
    put(
        "config_files",
        "ps.toml",
        b"cache_dir = \"cache\"\ncache_size = \"300GiB\"\nlisten = \"0.0.0.0:9443\"\ntarget = \"file:///srv/store\"\n\
passphrase_file = \"passphrase\"\ntls_dir = \"tls\"\nbandwidth_mbps = 50.0\nwork_hours = \"08:00-18:00\"\n\
work_days = \"mon-fri\"\nwork_mbps = 10.0\nutc_offset_min = 60\n",
    );
    put(
        "config_files",
        "proxy.ini",
        b"[ProxySettings]\nProxyAuthentication = \"Yes\"\nProxy IP = \"10.0.0.5\"\nProxyPort = \"3128\"\nProxyUserName=\"user\"\nProxyPassword=\"secret\"\n",
    );

    // Decision streams for the engine: appends, acknowledgements, reclaims, evictions.
    for (name, seed) in [("ops-a", 1u64), ("ops-b", 2), ("ops-c", 3)] {
        let mut bytes = vec![0u8; 600];
        churnlog::bench::fill_random(&mut bytes, seed);
        put("engine_ops", name, &bytes);
    }

    // The agent's state-directory files, as the agent writes them.
    use churnlog::agent::{dirty_file, state};
    let block_state = state::BlockState {
        machine: "vm1".into(),
        disk: "disk0".into(),
        server: state::server_identity("ps", "cert"),
        disk_size: 3 * 65536 - 1,
        block_size: 65536,
        point_id: 1234,
        hashes: vec![1, 8, 15],
    };
    put("agent_files", "state", &block_state.encode());
    let mut journal = state::journal_header(1234);
    journal.extend_from_slice(&state::journal_entry(1234, 0, 2));
    put("agent_files", "journal", &journal);
    let header = dirty_file::DirtyHeader {
        machine: "vm1".into(),
        disk: "disk0".into(),
        server: [0; 32],
        disk_size: 1 << 30,
        chunk_size: 65536,
    };
    put("agent_files", "dirty_header", &header.encode());
    put("agent_files", "dirty_page", &dirty_file::encode_page(0, &[0b1011]));
}
