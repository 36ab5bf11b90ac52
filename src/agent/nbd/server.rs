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

async fn transmission<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    capture: &Arc<Capture>,
    disk: usize,
) -> Result<(), NbdError> {
    let size = capture.exports()[disk].size;
    let id = capture.exports()[disk].id.clone();
    loop {
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
                s.write_all(&simple_reply(err, handle)).await?;
                s.flush().await?;
                continue;
            }
        };
        let c = capture.clone();
        let result: std::io::Result<Option<Vec<u8>>> = match command {
            Command::Read { offset, len } => blocking(move || c.read(disk, offset, len as usize).map(Some)).await,
            Command::Write { offset, len, fua } => {
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).await?;
                blocking(move || c.write(disk, offset, data, fua).map(|_| None)).await
            }
            Command::Flush => blocking(move || c.flush(disk).map(|_| None)).await,
            Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua } => {
                blocking(move || c.zero(disk, offset, len as u64, fua).map(|_| None)).await
            }
            Command::Disconnect => return Ok(()),
        };
        match result {
            Ok(Some(data)) => {
                let mut out = Vec::with_capacity(16 + data.len());
                out.extend_from_slice(&simple_reply(0, handle));
                out.extend_from_slice(&data);
                s.write_all(&out).await?;
            }
            Ok(None) => s.write_all(&simple_reply(0, handle)).await?,
            Err(e) => {
                tracing::error!(export = %id, error = %e, ?command, "NBD request failed on the backing file");
                s.write_all(&simple_reply(errno(&e), handle)).await?;
            }
        }
        s.flush().await?;
    }
}
