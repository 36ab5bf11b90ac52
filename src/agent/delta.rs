//! Delta resync, the agent's side: a disk without usable block state (a lost or deleted
//! state directory, a state kept for another server or another disk size, or no state
//! directory at all) is not copied in full at once. The agent first asks the process
//! server for the hash of every block of what it holds for the disk
//! ([`crate::ingest::hashes`]), uses them as the previous pass's hashes, and so sends only
//! the blocks that differ. The answer covers every record the server holds, points or
//! not, so a block sent before a crash and changed back since is compared with what was
//! sent, not with the last point.
//!
//! A full copy remains for a disk the server has no history of, when it asks for one, or
//! when anything about the answer is wrong (out of order, a count that does not match
//! the disk, a lost connection three times): then the agent never guesses.

use super::{state, Agent, AgentError, Event};
use crate::protocol::Frame;

/// How the reader reports a server's protocol error (`Error{E_PROTOCOL}`): an older
/// server's answer to a frame it does not know.
const UNSUPPORTED: &str = "refused (code 3)";
/// Connections lost while asking before the agent copies in full instead.
const ATTEMPTS_MAX: usize = 3;

/// The answer being received.
pub(super) struct HashFetch {
    disk: u16,
    blocks: u64,
    hashes: Vec<u128>,
    /// Set once the answer is complete: the hashes, or why there are none.
    outcome: Option<Result<(), String>>,
}

impl Agent {
    /// The server's block hashes of disk `d` (of `size` bytes) for a delta resync, or
    /// None: copy in full. Everything sent before is acknowledged durable first, so the
    /// answer includes it.
    pub(super) async fn delta_resync(&mut self, d: usize, size: u64) -> Result<Option<Vec<u128>>, AgentError> {
        let id = self.cfg.disks[d].0.clone();
        let bs = self.cfg.block_size;
        let blocks = size.div_ceil(bs as u64);
        if blocks > state::STATE_BLOCKS_MAX || bs as u64 > crate::ingest::hashes::HASH_BLOCK_SIZE_MAX as u64 {
            return Ok(None);
        }
        // Whatever state file is there describes another history: gone before anything
        // is sent, so a restart during this pass asks again.
        if let Some(st) = &mut self.state {
            st.forget(d, &id)?;
        }
        for attempt in 1..=ATTEMPTS_MAX {
            while !self.unacked.is_empty() {
                self.next_event().await?;
            }
            self.hash_fetch = None;
            self.connected().await?;
            let reconnects = self.reconnects;
            self.hash_fetch = Some(HashFetch { disk: d as u16, blocks, hashes: Vec::new(), outcome: None });
            let conn = self.conn.as_mut().expect("connected");
            let request = Frame::HashesRequest { disk: d as u16, block_size: bs as u32 };
            if conn.tx.send(request).await.is_err() {
                self.conn = None;
                continue;
            }
            loop {
                if let Some(outcome) = self.hash_fetch.as_mut().and_then(|f| f.outcome.take()) {
                    let fetch = self.hash_fetch.take().expect("present");
                    return Ok(match outcome {
                        Ok(()) => {
                            tracing::info!(disk = %id, blocks, "delta resync: comparing with the server's block hashes");
                            Some(fetch.hashes)
                        }
                        Err(why) => {
                            tracing::info!(disk = %id, %why, "no delta resync: copying the disk in full");
                            None
                        }
                    });
                }
                if self.reconnects != reconnects {
                    break;
                }
                let Some(conn) = self.conn.as_mut() else { break };
                // The server says `HashesPending` every few seconds while it prepares the
                // answer: silence is a silent server, as for acknowledgements.
                let ack_timeout = self.cfg.ack_timeout;
                match tokio::time::timeout(ack_timeout, conn.events.recv()).await {
                    // A server older than the delta resync refuses the request as a protocol
                    // error: copy in full (on a new connection) instead of stopping.
                    Ok(Some(Event::Closed(why))) if why.starts_with(UNSUPPORTED) => {
                        tracing::warn!(disk = %id, %why, "the process server does not know the delta resync: copying the disk in full");
                        self.hash_fetch = None;
                        self.conn = None;
                        return Ok(None);
                    }
                    Ok(event) => {
                        self.silent_connections = 0;
                        self.handle_event(event)?;
                    }
                    Err(_) => {
                        self.silent_connections += 1;
                        if self.silent_connections >= self.cfg.silent_connections_max {
                            return Err(AgentError::Unresponsive(self.silent_connections, ack_timeout));
                        }
                        tracing::warn!(disk = %id, timeout = ?ack_timeout, "no delta-resync answer; reconnecting");
                        self.conn = None; // a late answer must not meet the next request
                        break;
                    }
                }
            }
            tracing::warn!(disk = %id, attempt, "connection lost during the delta resync; asking again");
        }
        self.hash_fetch = None;
        Ok(None)
    }

    /// One frame of a delta-resync answer.
    pub(super) fn hash_answer(&mut self, frame: Frame) {
        let Some(fetch) = self.hash_fetch.as_mut().filter(|f| f.outcome.is_none()) else {
            tracing::warn!(frame = frame.name(), "a delta-resync answer nobody asked for: ignored");
            return;
        };
        fetch.outcome = match frame {
            Frame::Hashes { disk, first_block, hashes } if disk == fetch.disk => {
                let fits = fetch.hashes.len() as u64 + hashes.len() as u64 <= fetch.blocks;
                if first_block == fetch.hashes.len() as u64 && fits {
                    fetch.hashes.extend_from_slice(&hashes);
                    None
                } else {
                    Some(Err(format!(
                        "hashes from block {first_block} ({} of them) after {} of {}",
                        hashes.len(),
                        fetch.hashes.len(),
                        fetch.blocks
                    )))
                }
            }
            Frame::HashesEnd { disk, blocks, head_seq } if disk == fetch.disk => {
                if blocks == fetch.blocks && fetch.hashes.len() as u64 == blocks {
                    tracing::debug!(disk, head_seq, "delta-resync answer complete");
                    Some(Ok(()))
                } else {
                    Some(Err(format!(
                        "answer ends at {blocks} blocks, {} received, {} expected",
                        fetch.hashes.len(),
                        fetch.blocks
                    )))
                }
            }
            Frame::HashesUnavailable { disk, reason } if disk == fetch.disk => Some(Err(reason)),
            Frame::HashesPending { disk } if disk == fetch.disk => None,
            other => Some(Err(format!("{} for another disk", other.name()))),
        };
    }
}
