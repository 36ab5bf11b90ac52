//! The heartbeat task: every interval it sends the monitor's latest sample to the CS as
//! an [`api::Heartbeat`] and applies the reply: the machine book (assignments,
//! credentials, MovingAway, decommissioning) and resync requests for disks already in the
//! cache. A failed heartbeat is logged and retried at the next tick; the server keeps
//! serving the machines of the last reply meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::api::{self, HeartbeatReply};
use super::book::MachineBook;
use super::client::{ClientError, CsClient};
use super::monitor::Snapshot;
use crate::cache::Cache;

/// What one heartbeat needs.
#[derive(Clone)]
pub struct Beat {
    pub client: CsClient,
    pub snapshot: Snapshot,
    pub book: Arc<MachineBook>,
    pub cache: Arc<Cache>,
    /// The drain's hand-overs: a machine assigned here again is taken back before its
    /// sessions are admitted, so the drain uploads its records instead of dropping them.
    pub handoffs: crate::drain::Handoffs,
    /// Which machines' records the drain may upload: those of the latest reply.
    pub ownership: crate::drain::Ownership,
}

impl Beat {
    /// Sends one heartbeat and applies the reply.
    pub async fn once(&self) -> Result<HeartbeatReply, ClientError> {
        let report = self.snapshot.read().clone();
        let reply: HeartbeatReply = match self.client.post(api::PATH_PS_HEARTBEAT, &report).await {
            Ok(r) => r,
            // Unregistered or purged at the CS (a forced decommission): its machines are
            // elsewhere now, so admit none until `ps register` registers it again.
            Err(ClientError::Refused(e)) if e.code == "not_found" => {
                self.book.update(&[], true);
                // Nor upload or hand over for them: their new servers continue their
                // histories (the drain drops what is cached for them). After the book:
                // no session is admitted any more whose records would be dropped.
                self.ownership.assign([]);
                for m in self.handoffs.pending() {
                    self.handoffs.cancel(&m);
                }
                return Err(ClientError::Refused(e));
            }
            Err(e) => return Err(e),
        };
        for m in reply.machines.iter().filter(|m| m.state == super::api::MachineState::Active) {
            self.handoffs.cancel(&m.name);
        }
        // Ownership before the book: a machine is never admitted (and writing) while the
        // drain would still take its records for another server's.
        match &reply.owned {
            Some(owned) => self.ownership.assign(owned.iter().map(String::as_str)),
            None => self.ownership.assign(reply.machines.iter().map(|m| m.name.as_str())),
        }
        self.book.update(&reply.machines, reply.decommissioning);
        // Disks of such a machine that are already cached are marked now; the sessions
        // mark the ones they open later.
        let wanted: Vec<&str> = reply.machines.iter().filter(|m| m.resync_required).map(|m| m.name.as_str()).collect();
        if !wanted.is_empty() {
            let cache = &self.cache;
            let book = &self.book;
            tokio::task::block_in_place(|| {
                for s in cache.streams() {
                    if wanted.contains(&s.machine.as_str()) && !book.resync_marked(&s.machine, &s.disk) {
                        match cache.mark_resync_required(s.id) {
                            Ok(()) => {
                                tracing::warn!(machine = %s.machine, disk = %s.disk, "resync required by the configuration server");
                                book.note_resync_marked(&s.machine, &s.disk);
                            }
                            Err(e) => {
                                tracing::error!(machine = %s.machine, disk = %s.disk, error = %e, "cannot mark resync-required")
                            }
                        }
                    }
                }
            });
        }
        Ok(reply)
    }
}

/// The running heartbeat task.
pub struct HeartbeatTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HeartbeatTask {
    /// Beats every `interval`, the first one after `interval` (the caller sends the first
    /// itself, before it accepts sessions).
    pub fn start(beat: Beat, interval: Duration) -> HeartbeatTask {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let sent = tokio::select! {
                    r = beat.once() => r,
                    _ = stopped.changed() => break,
                };
                match sent {
                    Ok(_) if failing => {
                        tracing::info!("heartbeats reach the configuration server again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "heartbeat failed; retrying at the next interval");
                        failing = true;
                    }
                }
            }
        });
        HeartbeatTask { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
