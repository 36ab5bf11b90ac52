//! Untrusted bytes from the network: a frame body of any kind, and a cache record
//! payload. Decoding must return a value or a typed error, never panic; whatever decodes
//! must encode back to bytes that decode to the same value.
#![no_main]

use churnlog::protocol::{Frame, StreamRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    if let Ok(frame) = Frame::decode(kind, body) {
        let mut out = Vec::new();
        frame.encode(&mut out);
        assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()) as usize, out.len() - 4);
        assert_eq!(Frame::decode(out[4], &out[5..]).ok(), Some(frame));
    }
    if let Ok(record) = StreamRecord::decode(data) {
        assert_eq!(StreamRecord::decode(&record.encode()).ok(), Some(record));
    }
});
