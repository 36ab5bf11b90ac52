//! NBD exports: `churnlog agent --export ID=PATH` serves each backing file over the NBD
//! protocol (TCP and/or a Unix socket) and replicates every write as it happens
//! ([`crate::agent::capture`]). [`start`] runs the listeners and the replication task;
//! [`Running::stop`] ends both and gives the [`Agent`] back.

pub mod codec;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::capture::{replicate, Capture, CaptureConfig, CaptureStatus, Export};
use super::{Agent, AgentError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("export {0}: {1}")]
    Export(String, std::io::Error),
    #[error("export {0}: its size ({1} bytes) is not a multiple of 512")]
    Unaligned(String, u64),
    #[error("listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("give --nbd-listen and/or --nbd-socket")]
    NoListener,
}

/// Opens every backing file for reading and writing; the size is fixed from now on.
pub fn open_exports(exports: &[(String, PathBuf)]) -> Result<Vec<Export>, StartError> {
    exports
        .iter()
        .map(|(id, path)| {
            let err = |e| StartError::Export(id.clone(), e);
            let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
            // Seeking to the end gives the size of block devices too.
            let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(err)?;
            if size % 512 != 0 {
                return Err(StartError::Unaligned(id.clone(), size));
            }
            Ok(Export { id: id.clone(), file, size })
        })
        .collect()
}

/// The listeners and the replication task of a running agent.
pub struct Running {
    pub tcp_addr: Option<SocketAddr>,
    pub unix_path: Option<PathBuf>,
    pub capture: Arc<Capture>,
    listeners: Vec<JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    replication: JoinHandle<(Agent, Result<(), AgentError>)>,
}

/// Serves `exports` (the agent's disks, in the same order) and replicates them through
/// `agent`.
pub async fn start(
    mut agent: Agent,
    exports: Vec<Export>,
    mut cfg: CaptureConfig,
    tcp: Option<SocketAddr>,
    unix: Option<PathBuf>,
) -> Result<Running, StartError> {
    if tcp.is_none() && unix.is_none() {
        return Err(StartError::NoListener);
    }
    if cfg.persist.is_none() {
        // With a state directory, the exports' dirty bitmaps persist there.
        cfg.persist = agent.capture_persist();
    }
    let capture = Arc::new(Capture::new(exports, cfg));
    // The first copy of an export is a catch-up over the whole disk (the replication
    // task sends its resync base before any of it); with a persistent bitmap, only the
    // chunks it names.
    for d in 0..capture.exports().len() {
        if capture.needs_full_copy(d) {
            capture.mark_all_dirty(d);
        }
    }
    let mut listeners = Vec::new();
    let mut tcp_addr = None;
    if let Some(addr) = tcp {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| StartError::Listen(addr.to_string(), e))?;
        tcp_addr = Some(l.local_addr().map_err(|e| StartError::Listen(addr.to_string(), e))?);
        listeners.push(tokio::spawn(accept_loop(l, capture.clone())));
    }
    if let Some(path) = &unix {
        let l = tokio::net::UnixListener::bind(path).map_err(|e| StartError::Listen(path.display().to_string(), e))?;
        listeners.push(tokio::spawn(accept_loop(l, capture.clone())));
    }
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let c = capture.clone();
    let replication = tokio::spawn(async move {
        let r = replicate(c, &mut agent, stop_rx).await;
        (agent, r)
    });
    Ok(Running { tcp_addr, unix_path: unix, capture, listeners, stop, replication })
}

/// A listening socket NBD clients connect to (TCP or Unix).
trait Listener: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// The next connection and who it is from (for the log).
    fn accept_one(&self) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, peer) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok((s, peer.to_string()))
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, _) = self.accept().await?;
        Ok((s, "unix socket".into()))
    }
}

/// Serves every connection `l` accepts in a task of its own, until aborted (which
/// drops the connections with it); an accept error (out of file descriptors, say)
/// backs off instead of spinning.
async fn accept_loop(l: impl Listener, capture: Arc<Capture>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        match l.accept_one().await {
            Ok((s, peer)) => {
                let c = capture.clone();
                conns.spawn(async move {
                    if let Err(e) = server::handle(s, c).await {
                        tracing::warn!(%peer, error = %e, "NBD connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
}

impl Running {
    pub fn status(&self) -> CaptureStatus {
        self.capture.status()
    }

    /// Closes the listeners and every NBD connection, stops replication, and returns
    /// the agent (with whatever it had not yet sent).
    pub async fn stop(self) -> (Agent, Result<(), AgentError>) {
        for l in &self.listeners {
            l.abort();
        }
        for l in self.listeners {
            let _ = l.await;
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        let _ = self.stop.send(true);
        self.replication.await.expect("the replication task does not panic")
    }
}
