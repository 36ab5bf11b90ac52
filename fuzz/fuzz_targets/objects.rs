//! Untrusted bytes from object storage: a data object. The CRC is recomputed over the
//! input first so the fuzzer reaches the record table and decompression, which must
//! fail with a typed error, never panic or over-allocate.
#![no_main]

use churnlog::store::object::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data);
    let mut fixed = data.to_vec();
    if fixed.len() >= 4 {
        let n = fixed.len() - 4;
        let crc = crc32fast::hash(&fixed[..n]);
        fixed[n..].copy_from_slice(&crc.to_le_bytes());
        let _ = decode(&fixed);
    }
});
