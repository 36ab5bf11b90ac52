//! Untrusted bytes from an NBD client: client flags, an option header and its payload
//! (NBD_OPT_GO/INFO), and a transmission request checked against an export size. Parsing
//! must return a value or a typed error, never panic; whatever parses must encode back to
//! the same bytes, and a request that passes its check stays within the export and caps.
#![no_main]

use churnlog::agent::nbd::codec::{
    parse_client_flags, Command, ExportRequest, OptionHeader, Request, OPTION_HEADER_LEN, OPTION_LEN_MAX, OPT_GO,
    REQUEST_LEN, REQUEST_LEN_MAX,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 4 {
        0 => {
            if let Some(b) = rest.get(..4) {
                let _ = parse_client_flags(b.try_into().unwrap());
            }
        }
        1 => {
            let Some(h) = rest.get(..OPTION_HEADER_LEN) else { return };
            if let Ok(header) = OptionHeader::parse(h.try_into().unwrap()) {
                assert!(header.len <= OPTION_LEN_MAX);
                assert_eq!(&header.encode()[..], h);
            }
        }
        2 => {
            if let Ok(r) = ExportRequest::parse(OPT_GO, rest) {
                assert_eq!(r.encode(), rest);
            }
        }
        _ => {
            let Some(b) = rest.get(..REQUEST_LEN) else { return };
            let size = rest.get(REQUEST_LEN..REQUEST_LEN + 8).map_or(1 << 30, |s| u64::from_le_bytes(s.try_into().unwrap()));
            if let Ok(req) = Request::parse(b.try_into().unwrap()) {
                assert_eq!(&req.encode()[..], b);
                if let Ok(Ok(Command::Read { offset, len } | Command::Write { offset, len, .. })) = req.check(size) {
                    assert!(len <= REQUEST_LEN_MAX && offset.checked_add(len as u64).is_some_and(|e| e <= size));
                }
                if let Ok(Ok(Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. })) = req.check(size) {
                    assert!(offset.checked_add(len as u64).is_some_and(|e| e <= size));
                }
            }
        }
    }
});
