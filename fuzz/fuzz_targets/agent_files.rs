//! The agent's own files in its state directory, read back after a crash or from a disk
//! that may be damaged: the block state and its journal (`--disk`) and the persistent
//! dirty bitmap (`--export`). Each must decode or fail with a typed error, never panic;
//! what decodes re-encodes to the same bytes.
#![no_main]

use churnlog::agent::dirty_file::{decode_page, encode_page, DirtyHeader, PAGE_CHUNKS, PAGE_LEN};
use churnlog::agent::state::{decode_journal, BlockState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = BlockState::decode(data) {
        assert_eq!(state.encode(), data, "a decoded state re-encodes to its bytes");
        let _ = decode_journal(data, state.point_id, state.hashes.len() as u64);
    }
    let point_id = data.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8")));
    let _ = decode_journal(data, point_id, 1 << 20);
    if data.len() == PAGE_LEN {
        if let Ok(h) = DirtyHeader::decode(data) {
            assert_eq!(h.encode().as_slice(), data, "a decoded header re-encodes to its bytes");
        }
        let index = u32::from_le_bytes(data[PAGE_LEN - 8..PAGE_LEN - 4].try_into().expect("4"));
        let chunks = (data[0] as u64 * 131) % (PAGE_CHUNKS + 1);
        if let Some(words) = decode_page(data, index, chunks) {
            assert_eq!(encode_page(index, &words).as_slice(), data, "a decoded page re-encodes to its bytes");
        }
    }
});
