//! The NBD wire format, the subset churnlog serves (`docs/protocol.md` §6.1): the fixed
//! newstyle handshake, option haggling (GO, INFO, LIST, ABORT, EXPORT_NAME; everything
//! else refused), and simple replies to READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC.
//! Pure functions over byte slices, so that the parsers can be fuzzed
//! (`fuzz/fuzz_targets/nbd_parsers.rs`). Every length is checked against a cap before it
//! is trusted. All integers on the NBD wire are big-endian.

/// "NBDMAGIC", the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the second 8 bytes the server sends, and the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Start of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// What churnlog's exports advertise.
pub const TRANSMISSION_FLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Errors in simple replies (the spec's values, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// Longest export name (the spec's limit).
pub const EXPORT_NAME_MAX: usize = 4096;
/// Longest option payload accepted: a GO with the longest name and up to 64 information
/// requests. A longer one is answered `NBD_REP_ERR_TOO_BIG` and the connection closed.
pub const OPTION_LEN_MAX: u32 = (4 + EXPORT_NAME_MAX + 2 + 2 * 64) as u32;
/// Most information requests in one GO/INFO.
pub const INFO_REQUESTS_MAX: usize = 64;
/// Largest READ or WRITE payload (also advertised as the maximum block size).
pub const REQUEST_LEN_MAX: u32 = 32 << 20;
/// Options haggled before GO/EXPORT_NAME, at most; a client that loops is closed.
pub const OPTIONS_MAX: usize = 64;

pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_LEN: usize = 28;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NbdError {
    #[error("the client does not speak the fixed newstyle handshake (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than {max}")]
    OptionTooLong { option: u32, len: u32, max: u32 },
    #[error("malformed option {option}: {what}")]
    BadOption { option: u32, what: &'static str },
    #[error("bad request magic {0:#x}")]
    RequestMagic(u32),
    #[error("write of {0} bytes, more than {REQUEST_LEN_MAX}")]
    WriteTooLong(u32),
    #[error("more than {OPTIONS_MAX} options before the transmission phase")]
    TooManyOptions,
    #[error("the client aborted the handshake")]
    Aborted,
    #[error("no export named {0:?}")]
    UnknownExport(String),
    #[error("I/O: {0}")]
    Io(String),
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> NbdError {
        NbdError::Io(e.to_string())
    }
}

/// The server's first 18 bytes (fixed newstyle; zeroes may be left out).
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// The client's flags: fixed newstyle is required (an old-style client would not
/// understand error replies); returns whether the client leaves out the 124 zeroes.
pub fn parse_client_flags(b: [u8; 4]) -> Result<bool, NbdError> {
    let flags = u32::from_be_bytes(b);
    if flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle(flags));
    }
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(flags));
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

/// An option's header; its `len` payload bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    /// Checks the magic; a payload longer than [`OPTION_LEN_MAX`] is `OptionTooLong`
    /// (the caller answers `NBD_REP_ERR_TOO_BIG` and closes: it will not read it).
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, NbdError> {
        let magic = u64::from_be_bytes(b[..8].try_into().expect("8"));
        if magic != IHAVEOPT {
            return Err(NbdError::OptionMagic(magic));
        }
        let option = u32::from_be_bytes(b[8..12].try_into().expect("4"));
        let len = u32::from_be_bytes(b[12..16].try_into().expect("4"));
        if len > OPTION_LEN_MAX {
            return Err(NbdError::OptionTooLong { option, len, max: OPTION_LEN_MAX });
        }
        Ok(OptionHeader { option, len })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// The payload of NBD_OPT_GO and NBD_OPT_INFO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    pub info: Vec<u16>,
}

impl ExportRequest {
    /// `u32 name length | name | u16 count | count × u16`, nothing after.
    pub fn parse(option: u32, b: &[u8]) -> Result<ExportRequest, NbdError> {
        let bad = |what| NbdError::BadOption { option, what };
        let n = u32::from_be_bytes(b.get(..4).ok_or(bad("truncated name length"))?.try_into().expect("4")) as usize;
        if n > EXPORT_NAME_MAX {
            return Err(bad("export name longer than 4096 bytes"));
        }
        let name = b.get(4..4 + n).ok_or(bad("truncated export name"))?;
        let name = std::str::from_utf8(name).map_err(|_| bad("export name is not UTF-8"))?.to_string();
        let rest = &b[4 + n..];
        let count = u16::from_be_bytes(rest.get(..2).ok_or(bad("truncated information count"))?.try_into().expect("2"))
            as usize;
        if count > INFO_REQUESTS_MAX {
            return Err(bad("too many information requests"));
        }
        if rest.len() != 2 + 2 * count {
            return Err(bad("information requests do not match their count"));
        }
        let info = rest[2..].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        Ok(ExportRequest { name, info })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.name.len() + 2 * self.info.len());
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.info.len() as u16).to_be_bytes());
        for i in &self.info {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }
}

/// An option reply: `magic | option | type | length | data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// NBD_INFO_EXPORT: the size and the transmission flags.
pub fn info_export(size: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..].copy_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    out
}

/// NBD_INFO_BLOCK_SIZE: any alignment works; 4 KiB preferred; [`REQUEST_LEN_MAX`] at most.
pub fn info_block_size() -> [u8; 14] {
    let mut out = [0u8; 14];
    out[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&1u32.to_be_bytes());
    out[6..10].copy_from_slice(&4096u32.to_be_bytes());
    out[10..].copy_from_slice(&REQUEST_LEN_MAX.to_be_bytes());
    out
}

/// The answer to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless left out.
pub fn export_name_reply(size: u64, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// NBD_REP_SERVER's payload for NBD_OPT_LIST.
pub fn list_entry(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// One transmission request as it arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// A request checked against the export: what the server does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// `len` payload bytes follow the request.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
}

impl Request {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, NbdError> {
        let magic = u32::from_be_bytes(b[..4].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return Err(NbdError::RequestMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes(b[8..16].try_into().expect("8")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4")),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Checks the request against an export of `size` bytes.
    ///
    /// `Err(NbdError::WriteTooLong)`: a WRITE whose payload is over the cap; the
    /// connection must close, because the payload is not read. `Ok(Err(errno))`: the
    /// request is answered with that error (its WRITE payload, within the cap, still has
    /// to be read and dropped): EINVAL for unknown commands or flags, a READ over the cap,
    /// and a READ or TRIM past the end; ENOSPC for a WRITE or WRITE_ZEROES past the end.
    pub fn check(&self, size: u64) -> Result<Result<Command, u32>, NbdError> {
        if self.command == CMD_WRITE && self.len > REQUEST_LEN_MAX {
            return Err(NbdError::WriteTooLong(self.len));
        }
        let fua = self.flags & CMD_FLAG_FUA != 0;
        let allowed = match self.command {
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => 0,
        };
        if self.flags & !allowed != 0 {
            return Ok(Err(EINVAL));
        }
        let within = self.offset.checked_add(self.len as u64).is_some_and(|end| end <= size);
        let (offset, len) = (self.offset, self.len);
        Ok(match self.command {
            CMD_READ if len > REQUEST_LEN_MAX || !within => Err(EINVAL),
            CMD_READ => Ok(Command::Read { offset, len }),
            CMD_WRITE if !within => Err(ENOSPC),
            CMD_WRITE => Ok(Command::Write { offset, len, fua }),
            CMD_FLUSH => Ok(Command::Flush),
            CMD_TRIM if !within => Err(EINVAL),
            CMD_TRIM => Ok(Command::Trim { offset, len, fua }),
            CMD_WRITE_ZEROES if !within => Err(ENOSPC),
            CMD_WRITE_ZEROES => Ok(Command::WriteZeroes { offset, len, fua }),
            CMD_DISC => Ok(Command::Disconnect),
            _ => Err(EINVAL),
        })
    }
}

/// A simple reply's header (READ data follows it when `error` is 0).
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn client_flags_need_fixed_newstyle() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(true));
        assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(false));
        assert_eq!(parse_client_flags([0, 0, 0, 0]), Err(NbdError::NotFixedNewstyle(0)));
        assert_eq!(parse_client_flags([0, 0, 0, 5]), Err(NbdError::UnknownClientFlags(5)));
    }

    #[test]
    fn option_headers_are_capped() {
        let h = OptionHeader { option: OPT_GO, len: OPTION_LEN_MAX };
        assert_eq!(OptionHeader::parse(&h.encode()), Ok(h));
        let long = OptionHeader { option: OPT_GO, len: OPTION_LEN_MAX + 1 };
        assert!(matches!(OptionHeader::parse(&long.encode()), Err(NbdError::OptionTooLong { .. })));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(matches!(OptionHeader::parse(&bad), Err(NbdError::OptionMagic(_))));
    }

    #[test]
    fn export_requests_are_checked() {
        let r = ExportRequest { name: "disk0".into(), info: vec![INFO_BLOCK_SIZE] };
        assert_eq!(ExportRequest::parse(OPT_GO, &r.encode()), Ok(r.clone()));
        let mut trailing = r.encode();
        trailing.push(0);
        assert!(ExportRequest::parse(OPT_GO, &trailing).is_err());
        let mut huge = r.encode();
        huge[..4].copy_from_slice(&(u32::MAX).to_be_bytes());
        assert!(matches!(ExportRequest::parse(OPT_GO, &huge), Err(NbdError::BadOption { .. })));
        assert!(ExportRequest::parse(OPT_GO, &[0, 0]).is_err());
    }

    #[test]
    fn requests_past_the_end_get_the_spec_errors() {
        let req = |command, offset, len, flags| Request { flags, command, handle: 7, offset, len };
        let size = 1 << 20;
        assert_eq!(req(CMD_READ, 0, 4096, 0).check(size), Ok(Ok(Command::Read { offset: 0, len: 4096 })));
        assert_eq!(req(CMD_READ, size - 1, 2, 0).check(size), Ok(Err(EINVAL)));
        assert_eq!(req(CMD_READ, u64::MAX, 2, 0).check(size), Ok(Err(EINVAL)));
        assert_eq!(req(CMD_WRITE, size, 1, 0).check(size), Ok(Err(ENOSPC)));
        assert_eq!(req(CMD_WRITE_ZEROES, size - 4, 8, 0).check(size), Ok(Err(ENOSPC)));
        assert_eq!(req(CMD_TRIM, size - 4, 8, 0).check(size), Ok(Err(EINVAL)));
        assert_eq!(
            req(CMD_WRITE, 0, REQUEST_LEN_MAX + 1, 0).check(u64::MAX),
            Err(NbdError::WriteTooLong(REQUEST_LEN_MAX + 1))
        );
        assert_eq!(req(CMD_READ, 0, REQUEST_LEN_MAX + 1, 0).check(u64::MAX), Ok(Err(EINVAL)));
        assert_eq!(
            req(CMD_WRITE, 0, 512, CMD_FLAG_FUA).check(size),
            Ok(Ok(Command::Write { offset: 0, len: 512, fua: true }))
        );
        assert_eq!(req(CMD_READ, 0, 512, CMD_FLAG_FUA).check(size), Ok(Err(EINVAL)));
        assert_eq!(req(5, 0, 512, 0).check(size), Ok(Err(EINVAL)));
        assert_eq!(req(CMD_FLUSH, 0, 0, 0).check(size), Ok(Ok(Command::Flush)));
        assert_eq!(req(CMD_DISC, 0, 0, 0).check(size), Ok(Ok(Command::Disconnect)));
    }

    proptest! {
        #[test]
        fn requests_round_trip_and_checks_never_panic(flags in any::<u16>(), command in 0u16..10, handle in any::<u64>(),
                                                      offset in any::<u64>(), len in any::<u32>(), size in any::<u64>()) {
            let r = Request { flags, command, handle, offset, len };
            prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
            if let Ok(Ok(Command::Read { offset, len } | Command::Write { offset, len, .. })) = r.check(size) {
                prop_assert!(len <= REQUEST_LEN_MAX && offset + len as u64 <= size);
            }
        }

        #[test]
        fn export_request_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(r) = ExportRequest::parse(OPT_GO, &bytes) {
                prop_assert_eq!(r.encode(), bytes);
            }
        }
    }
}
