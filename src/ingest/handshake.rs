//! Login: Hello, Challenge, Auth, AuthOk (`docs/protocol.md` §5.2). Before login a peer
//! may send only login frames, each at most `LOGIN_FRAME_LEN_MAX` bytes, so an
//! unauthenticated connection costs a few hundred bytes of buffer.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::SessionEnd;
use crate::control::book::MachineBook;
use crate::protocol::auth::{nonce, AuthKey};
use crate::protocol::codec::{E_AUTH, E_VERSION};
use crate::protocol::{read_frame_bytes_max, write_frame, Frame, FrameError, LOGIN_FRAME_LEN_MAX, PROTOCOL_VERSION};

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("protocol version {0}")]
    Version(u16),
    #[error("machine {0:?} failed authentication")]
    BadMac(String),
    /// With a configuration server: the machine may not log in here now.
    #[error("{0}")]
    Refused(#[from] crate::control::book::Refused),
}

async fn read_login_frame<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut Vec<u8>) -> Result<Frame, FrameError> {
    read_frame_bytes_max(rd, buf, LOGIN_FRAME_LEN_MAX).await?;
    Frame::decode(buf[0], &buf[1..])
}

/// Runs the login; returns the machine name it proved. With a machine book (a CS is
/// configured) the MAC is checked with the machine's own credential, and a machine not
/// assigned here (or moving away) is refused before the challenge, with the reason.
pub(super) async fn login<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut Vec<u8>,
    passphrase_key: &AuthKey,
    book: Option<&MachineBook>,
) -> Result<String, SessionEnd> {
    let (version, machine, client_nonce) = match read_login_frame(rd, buf).await? {
        Frame::Hello { version, machine, client_nonce } => (version, machine, client_nonce),
        other => return Err(LoginError::Unexpected { expected: "Hello", got: other.name() }.into()),
    };
    if version != PROTOCOL_VERSION {
        let message = format!("protocol {PROTOCOL_VERSION} only");
        let _ = write_frame(wr, &Frame::Error { code: E_VERSION, message }).await;
        let _ = wr.flush().await;
        return Err(LoginError::Version(version).into());
    }
    let machine_key;
    let key = match book {
        None => passphrase_key,
        Some(book) => match book.admit(&machine) {
            Ok(k) => {
                machine_key = k;
                &machine_key
            }
            Err(why) => {
                let _ = write_frame(wr, &Frame::Error { code: E_AUTH, message: why.to_string() }).await;
                let _ = wr.flush().await;
                return Err(LoginError::Refused(why).into());
            }
        },
    };
    let server_nonce = nonce();
    write_frame(wr, &Frame::Challenge { version: PROTOCOL_VERSION, server_nonce }).await.map_err(FrameError::Io)?;
    wr.flush().await.map_err(FrameError::Io)?;
    let mac = match read_login_frame(rd, buf).await? {
        Frame::Auth { mac } => mac,
        other => return Err(LoginError::Unexpected { expected: "Auth", got: other.name() }.into()),
    };
    if !key.verify_client(&client_nonce, &server_nonce, &machine, &mac) {
        let _ = write_frame(wr, &Frame::Error { code: E_AUTH, message: "authentication failed".into() }).await;
        let _ = wr.flush().await;
        return Err(LoginError::BadMac(machine).into());
    }
    let mac = key.server_mac(&client_nonce, &server_nonce, &machine);
    write_frame(wr, &Frame::AuthOk { mac }).await.map_err(FrameError::Io)?;
    wr.flush().await.map_err(FrameError::Io)?;
    Ok(machine)
}
