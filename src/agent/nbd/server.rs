//! One NBD connection: the fixed newstyle handshake, then requests served one at a time
//! in arrival order (simple replies, so replies leave in the same order). Writes go
//! through [`Capture`], which orders them for replication. See `docs/protocol.md` §6.1.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::*;
use crate::agent::capture::Capture;

/// Serves one client until it disconnects, breaks the protocol or aborts.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, capture: Arc<Capture>) -> Result<(), NbdError> {
    s.write_all(&server_greeting()).await?;
    s.flush().await?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).await?;
    let no_zeroes = parse_client_flags(flags)?;
    let disk = match haggle(&mut s, &capture, no_zeroes).await? {
        Some(d) => d,
        None => return Ok(()),
    };
    transmission(&mut s, &capture, disk).await
}

fn find(capture: &Capture, name: &str) -> Option<usize> {
    let exports = capture.exports();
    // The empty name is the default export: the first one.
    if name.is_empty() {
        return (!exports.is_empty()).then_some(0);
    }
    exports.iter().position(|e| e.id == name)
}

/// Option haggling; returns the export chosen (None: the client aborted).
async fn haggle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    capture: &Capture,
    no_zeroes: bool,
) -> Result<Option<usize>, NbdError> {
    for _ in 0..OPTIONS_MAX {
        let mut h = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut h).await?;
        let header = match OptionHeader::parse(&h) {
            Ok(h) => h,
            Err(e @ NbdError::OptionTooLong { option, .. }) => {
                // Its payload is not read: answer, then close.
                s.write_all(&option_reply(option, REP_ERR_TOO_BIG, e.to_string().as_bytes())).await?;
                s.flush().await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let mut data = vec![0u8; header.len as usize];
        s.read_exact(&mut data).await?;
        let option = header.option;
        let reply = |t: u32, d: &[u8]| option_reply(option, t, d);
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No error reply exists for this option: an unknown name closes.
                let disk = find(capture, &name).ok_or(NbdError::UnknownExport(name))?;
                s.write_all(&export_name_reply(capture.exports()[disk].size, no_zeroes)).await?;
                s.flush().await?;
                return Ok(Some(disk));
            }
            OPT_ABORT => {
                s.write_all(&reply(REP_ACK, &[])).await?;
                s.flush().await?;
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => {
                s.write_all(&reply(REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")).await?;
            }
            OPT_LIST => {
                for e in capture.exports() {
                    s.write_all(&reply(REP_SERVER, &list_entry(&e.id))).await?;
                }
                s.write_all(&reply(REP_ACK, &[])).await?;
            }
            OPT_INFO | OPT_GO => {
                let request = match ExportRequest::parse(option, &data) {
                    Ok(r) => r,
                    Err(e) => {
                        s.write_all(&reply(REP_ERR_INVALID, e.to_string().as_bytes())).await?;
                        s.flush().await?;
                        continue;
                    }
                };
                let Some(disk) = find(capture, &request.name) else {
                    let msg = format!("no export named {:?}", request.name);
                    s.write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes())).await?;
                    s.flush().await?;
                    continue;
                };
                s.write_all(&reply(REP_INFO, &info_export(capture.exports()[disk].size))).await?;
                if request.info.contains(&INFO_BLOCK_SIZE) {
                    s.write_all(&reply(REP_INFO, &info_block_size())).await?;
                }
                s.write_all(&reply(REP_ACK, &[])).await?;
                s.flush().await?;
                if option == OPT_GO {
                    return Ok(Some(disk));
                }
            }
            // STARTTLS, STRUCTURED_REPLY, META_CONTEXT and anything newer.
            _ => {
                s.write_all(&reply(REP_ERR_UNSUP, b"not supported by churnlog")).await?;
            }
        }
        s.flush().await?;
    }
    Err(NbdError::TooManyOptions)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// The spec's error for a failed I/O.
fn errno(e: &std::io::Error) -> u32 {
    if e.raw_os_error() == Some(28) {
        ENOSPC
    } else {
        EIO
    }
}

/// A write's `len` bytes of data (checked against the cap before), read into a buffer
/// that is not zeroed first.
async fn read_payload<R: AsyncRead + Unpin>(s: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let n = (&mut *s).take((len - data.len()) as u64).read_buf(&mut data).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data)
}

async fn transmission<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    capture: &Arc<Capture>,
    disk: usize,
) -> Result<(), NbdError> {
    // Buffered both ways: a client with requests in flight gets its replies in one
    // write once no further request has arrived, not one write per reply.
    let mut s = tokio::io::BufReader::with_capacity(32 << 10, tokio::io::BufWriter::with_capacity(256 << 10, s));
    let s = &mut s;
    let size = capture.exports()[disk].size;
    let id = capture.exports()[disk].id.clone();
    loop {
        if s.buffer().len() < REQUEST_LEN {
            s.get_mut().flush().await?;
        }
        let mut r = [0u8; REQUEST_LEN];
        match s.read_exact(&mut r).await {
            Ok(_) => {}
            // A client that goes without NBD_CMD_DISC.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let request = Request::parse(&r)?;
        let handle = request.handle;
        let command = match request.check(size)? {
            Ok(c) => c,
            Err(err) => {
                if request.command == CMD_WRITE {
                    // Within the cap (checked): read and drop the payload.
                    let mut sink = tokio::io::sink();
                    let n = tokio::io::copy(&mut (&mut *s).take(request.len as u64), &mut sink).await?;
                    if n != request.len as u64 {
                        return Ok(());
                    }
                }
                s.get_mut().write_all(&simple_reply(err, handle)).await?;
                continue;
            }
        };
        let c = capture.clone();
        let result: std::io::Result<Option<Vec<u8>>> = match command {
            // Reads and writes without FUA touch the page cache only: done in place (a
            // hand-off to a blocking thread per request would cost more than the copy).
            Command::Read { offset, len } => c.read(disk, offset, len as usize).map(Some),
            Command::Write { offset, len, fua: false } => {
                let data = read_payload(s, len as usize).await?;
                c.write(disk, offset, data, false).map(|_| None)
            }
            Command::Write { offset, len, fua: true } => {
                let data = read_payload(s, len as usize).await?;
                blocking(move || c.write(disk, offset, data, true).map(|_| None)).await
            }
            Command::Flush => blocking(move || c.flush(disk).map(|_| None)).await,
            Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua } => {
                blocking(move || c.zero(disk, offset, len as u64, fua).map(|_| None)).await
            }
            Command::Disconnect => {
                s.get_mut().flush().await?;
                return Ok(());
            }
        };
        let w = s.get_mut();
        match result {
            Ok(Some(data)) => {
                w.write_all(&simple_reply(0, handle)).await?;
                w.write_all(&data).await?;
            }
            Ok(None) => w.write_all(&simple_reply(0, handle)).await?,
            Err(e) => {
                tracing::error!(export = %id, error = %e, ?command, "NBD request failed on the backing file");
                w.write_all(&simple_reply(errno(&e), handle)).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::capture::{CaptureConfig, Export};

    fn capture(size: u64) -> (tempfile::TempDir, Arc<Capture>) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d.img"))
            .unwrap();
        file.set_len(size).unwrap();
        let exports = vec![Export { id: "disk0".into(), file, size }];
        (dir, Arc::new(Capture::new(exports, CaptureConfig::default())))
    }

    async fn option<S: AsyncRead + AsyncWrite + Unpin>(c: &mut S, option: u32, data: &[u8]) {
        c.write_all(&OptionHeader { option, len: data.len() as u32 }.encode()).await.unwrap();
        c.write_all(data).await.unwrap();
    }

    /// Reads one option reply: (option, type, data).
    async fn reply<S: AsyncRead + Unpin>(c: &mut S) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.unwrap();
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        c.read_exact(&mut data).await.unwrap();
        (u32::from_be_bytes(h[8..12].try_into().unwrap()), u32::from_be_bytes(h[12..16].try_into().unwrap()), data)
    }

    async fn request<S: AsyncRead + AsyncWrite + Unpin>(
        c: &mut S,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> u32 {
        let handle = 0x1234_5678;
        c.write_all(&Request { flags, command, handle, offset, len }.encode()).await.unwrap();
        c.write_all(payload).await.unwrap();
        let mut r = [0u8; 16];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        assert_eq!(u64::from_be_bytes(r[8..].try_into().unwrap()), handle);
        u32::from_be_bytes(r[4..8].try_into().unwrap())
    }

    #[tokio::test]
    async fn haggling_and_errors_follow_the_spec() {
        let size = 1 << 20;
        let (_dir, cap) = capture(size);
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(handle(s, cap.clone()));
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        assert_eq!(greeting, server_greeting());
        c.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()).await.unwrap();

        option(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(reply(&mut c).await.1, REP_ERR_UNSUP);
        option(&mut c, OPT_LIST, &[]).await;
        assert_eq!(reply(&mut c).await, (OPT_LIST, REP_SERVER, list_entry("disk0")));
        assert_eq!(reply(&mut c).await.1, REP_ACK);
        option(&mut c, OPT_INFO, &ExportRequest { name: "nope".into(), info: vec![] }.encode()).await;
        assert_eq!(reply(&mut c).await.1, REP_ERR_UNKNOWN);
        option(&mut c, OPT_GO, &[0, 0, 0, 9, b'x']).await;
        assert_eq!(reply(&mut c).await.1, REP_ERR_INVALID);
        option(&mut c, OPT_GO, &ExportRequest { name: "disk0".into(), info: vec![INFO_BLOCK_SIZE] }.encode()).await;
        assert_eq!(reply(&mut c).await, (OPT_GO, REP_INFO, info_export(size).to_vec()));
        assert_eq!(reply(&mut c).await, (OPT_GO, REP_INFO, info_block_size().to_vec()));
        assert_eq!(reply(&mut c).await.1, REP_ACK);

        // Transmission: errors from the spec, and the data round trip.
        assert_eq!(request(&mut c, CMD_WRITE, 0, size - 512, 1024, &[7; 1024]).await, ENOSPC);
        assert_eq!(request(&mut c, CMD_WRITE_ZEROES, 0, size, 1, &[]).await, ENOSPC);
        assert_eq!(request(&mut c, CMD_READ, 0, size - 1, 2, &[]).await, EINVAL);
        assert_eq!(request(&mut c, CMD_TRIM, 0, u64::MAX, 2, &[]).await, EINVAL);
        assert_eq!(request(&mut c, CMD_READ, 0, 0, REQUEST_LEN_MAX + 1, &[]).await, EINVAL);
        assert_eq!(request(&mut c, 7, 0, 0, 0, &[]).await, EINVAL); // BLOCK_STATUS: not offered
        assert_eq!(request(&mut c, CMD_WRITE, CMD_FLAG_FUA, 4096, 512, &[9; 512]).await, 0);
        assert_eq!(request(&mut c, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4096, 100, &[]).await, 0);
        assert_eq!(request(&mut c, CMD_FLUSH, 0, 0, 0, &[]).await, 0);
        assert_eq!(request(&mut c, CMD_READ, 0, 4096, 512, &[]).await, 0);
        let mut data = [1u8; 512];
        c.read_exact(&mut data).await.unwrap();
        assert!(data[..100].iter().all(|&b| b == 0) && data[100..].iter().all(|&b| b == 9));
        let st = cap.status();
        assert_eq!((st.writes, st.zeroes, st.flushes), (1, 1, 1), "refused requests capture nothing");

        // A write over the cap closes the connection (its payload is never read).
        c.write_all(&Request { flags: 0, command: CMD_WRITE, handle: 1, offset: 0, len: REQUEST_LEN_MAX + 1 }.encode())
            .await
            .unwrap();
        assert_eq!(server.await.unwrap(), Err(NbdError::WriteTooLong(REQUEST_LEN_MAX + 1)));
    }

    #[tokio::test]
    async fn oversized_options_and_old_clients_are_refused() {
        let (_dir, cap) = capture(1 << 20);
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(handle(s, cap.clone()));
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        c.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).await.unwrap();
        c.write_all(&OptionHeader { option: OPT_GO, len: u32::MAX }.encode()).await.unwrap();
        assert_eq!(reply(&mut c).await.1, REP_ERR_TOO_BIG);
        assert!(matches!(server.await.unwrap(), Err(NbdError::OptionTooLong { .. })));

        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(handle(s, cap.clone()));
        c.read_exact(&mut greeting).await.unwrap();
        c.write_all(&0u32.to_be_bytes()).await.unwrap();
        assert_eq!(server.await.unwrap(), Err(NbdError::NotFixedNewstyle(0)));

        // NBD_OPT_EXPORT_NAME: size, flags and the 124 zeroes (not left out here).
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(handle(s, cap.clone()));
        c.read_exact(&mut greeting).await.unwrap();
        c.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).await.unwrap();
        option(&mut c, OPT_EXPORT_NAME, b"disk0").await;
        let mut answer = vec![0u8; 134];
        c.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, export_name_reply(1 << 20, false));
        c.write_all(&Request { flags: 0, command: CMD_DISC, handle: 2, offset: 0, len: 0 }.encode()).await.unwrap();
        assert_eq!(server.await.unwrap(), Ok(()));
    }
}
