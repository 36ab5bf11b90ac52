//! The machine book of a process server run with a configuration server: which machines
//! are assigned here, each with its own credential and state, as the latest heartbeat
//! reply said. The ingest login checks a machine's MAC with its own key from here; the
//! sessions watch it to end when their machine moves away; the heartbeat reports from it
//! what was released and which resyncs were applied.
//!
//! Without a CS there is no book and the ingest keeps the passphrase-only login.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::api::{AssignedMachine, MachineState};
use crate::protocol::auth::AuthKey;

/// One assigned machine.
#[derive(Clone, Debug)]
pub struct MachineEntry {
    pub key: AuthKey,
    pub state: MachineState,
    /// The CS asked for a full resync of this machine's disks.
    pub resync_required: bool,
}

/// Why the book refuses a machine's login.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("machine {0:?} is not assigned to this process server (ask the configuration server for its assignment)")]
    NotAssigned(String),
    #[error("machine {0:?} is moving to another process server (ask the configuration server for its assignment)")]
    MovingAway(String),
    #[error("this process server is being decommissioned and accepts no new machine ({0:?})")]
    Decommissioning(String),
}

#[derive(Default)]
struct Live {
    /// Open sessions per machine.
    sessions: HashMap<String, usize>,
    /// Per machine whose resync the CS asked for: the disks marked resync-required since.
    resync_marked: HashMap<String, HashSet<String>>,
}

/// The shared book. Cheap to read on every login; written once per heartbeat.
pub struct MachineBook {
    entries: RwLock<HashMap<String, MachineEntry>>,
    /// Set once the CS says this server is being decommissioned; holds the machines known
    /// then (no other is admitted afterwards).
    decommissioning: RwLock<Option<HashSet<String>>>,
    live: Mutex<Live>,
    /// Bumped on every update: sessions look at their machine again.
    revision: watch::Sender<u64>,
}

impl Default for MachineBook {
    fn default() -> Self {
        MachineBook {
            entries: RwLock::default(),
            decommissioning: RwLock::default(),
            live: Mutex::default(),
            revision: watch::channel(0).0,
        }
    }
}

impl std::fmt::Debug for MachineBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MachineBook({} machines)", self.entries.read().len())
    }
}

/// An open session of a machine; the book counts it until dropped.
pub struct SessionGuard {
    book: Arc<MachineBook>,
    machine: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut live = self.book.live.lock();
        if let Some(n) = live.sessions.get_mut(&self.machine) {
            *n -= 1;
            if *n == 0 {
                live.sessions.remove(&self.machine);
            }
        }
    }
}

/// A credential from the CS is the hex of 32 bytes.
pub fn parse_credential(hex_text: &str) -> Option<AuthKey> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut bytes).ok()?;
    Some(AuthKey::from_bytes(bytes))
}

impl MachineBook {
    pub fn new() -> Arc<MachineBook> {
        Arc::new(MachineBook::default())
    }

    /// Replaces the book with a heartbeat reply's assignments. A machine with a malformed
    /// credential is left out (and logged): it cannot log in rather than log in unchecked.
    pub fn update(&self, machines: &[AssignedMachine], decommissioning: bool) {
        let mut next = HashMap::with_capacity(machines.len());
        for m in machines {
            match parse_credential(&m.credential) {
                Some(key) => {
                    next.insert(
                        m.name.clone(),
                        MachineEntry { key, state: m.state, resync_required: m.resync_required },
                    );
                }
                None => tracing::error!(machine = %m.name, "the configuration server sent a malformed credential"),
            }
        }
        {
            let mut live = self.live.lock();
            live.resync_marked.retain(|name, _| next.get(name).is_some_and(|e| e.resync_required));
            for (name, e) in &next {
                if e.resync_required {
                    live.resync_marked.entry(name.clone()).or_default();
                }
            }
        }
        {
            let mut d = self.decommissioning.write();
            match (decommissioning, d.is_some()) {
                (true, false) => *d = Some(self.entries.read().keys().cloned().collect()),
                (false, true) => *d = None,
                _ => {}
            }
        }
        *self.entries.write() = next;
        self.revision.send_modify(|r| *r += 1);
    }

    /// The key machine `name` must log in with, or why it may not.
    pub fn admit(&self, name: &str) -> Result<AuthKey, Refused> {
        let entries = self.entries.read();
        let entry = entries.get(name).ok_or_else(|| Refused::NotAssigned(name.to_string()))?;
        if entry.state == MachineState::MovingAway {
            return Err(Refused::MovingAway(name.to_string()));
        }
        if let Some(known) = &*self.decommissioning.read() {
            if !known.contains(name) {
                return Err(Refused::Decommissioning(name.to_string()));
            }
        }
        Ok(entry.key.clone())
    }

    /// Whether an open session of `name` may go on (its machine is still assigned here
    /// and not moving away).
    pub fn may_continue(&self, name: &str) -> Result<(), Refused> {
        let entries = self.entries.read();
        match entries.get(name) {
            None => Err(Refused::NotAssigned(name.to_string())),
            Some(e) if e.state == MachineState::MovingAway => Err(Refused::MovingAway(name.to_string())),
            Some(_) => Ok(()),
        }
    }

    /// Counts an open session of `name` until the guard drops.
    pub fn session(self: &Arc<Self>, name: &str) -> SessionGuard {
        *self.live.lock().sessions.entry(name.to_string()).or_insert(0) += 1;
        SessionGuard { book: self.clone(), machine: name.to_string() }
    }

    pub fn sessions_of(&self, name: &str) -> usize {
        self.live.lock().sessions.get(name).copied().unwrap_or(0)
    }

    /// Changes whenever the book is updated.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Whether the CS asked for a resync of `name`'s disks (still unanswered or not).
    pub fn resync_wanted(&self, name: &str) -> bool {
        self.entries.read().get(name).is_some_and(|e| e.resync_required)
    }

    /// Notes that disk `disk` of `name` was marked resync-required as the CS asked.
    pub fn note_resync_marked(&self, name: &str, disk: &str) {
        if let Some(disks) = self.live.lock().resync_marked.get_mut(name) {
            disks.insert(disk.to_string());
        }
    }

    /// Whether `disk` of `name` is already marked in this round.
    pub fn resync_marked(&self, name: &str, disk: &str) -> bool {
        self.live.lock().resync_marked.get(name).is_some_and(|d| d.contains(disk))
    }

    /// Machines with a resync asked for and at least one disk marked since.
    pub fn resync_applied(&self) -> Vec<String> {
        let live = self.live.lock();
        let mut v: Vec<String> =
            live.resync_marked.iter().filter(|(_, d)| !d.is_empty()).map(|(m, _)| m.clone()).collect();
        v.sort();
        v
    }

    /// Every assigned machine, with its state.
    pub fn machines(&self) -> Vec<(String, MachineState)> {
        let mut v: Vec<_> = self.entries.read().iter().map(|(n, e)| (n.clone(), e.state)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn is_decommissioning(&self) -> bool {
        self.decommissioning.read().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(name: &str, byte: u8, state: MachineState, resync: bool) -> AssignedMachine {
        AssignedMachine { name: name.into(), credential: hex::encode([byte; 32]), state, resync_required: resync }
    }

    #[test]
    fn admits_only_active_assigned_machines_with_their_own_key() {
        let book = MachineBook::new();
        book.update(
            &[assigned("a", 1, MachineState::Active, false), assigned("b", 2, MachineState::MovingAway, false)],
            false,
        );
        assert_eq!(book.admit("a").unwrap().as_bytes(), &[1u8; 32]);
        assert_eq!(book.admit("b").unwrap_err(), Refused::MovingAway("b".into()));
        assert_eq!(book.admit("c").unwrap_err(), Refused::NotAssigned("c".into()));
        // Decommissioning: known machines stay, new ones are refused.
        book.update(&[assigned("a", 1, MachineState::Active, false)], true);
        book.update(
            &[assigned("a", 1, MachineState::Active, false), assigned("d", 4, MachineState::Active, false)],
            true,
        );
        assert!(book.admit("a").is_ok());
        assert_eq!(book.admit("d").unwrap_err(), Refused::Decommissioning("d".into()));
        // A malformed credential is left out.
        book.update(
            &[AssignedMachine { credential: "zz".into(), ..assigned("e", 0, MachineState::Active, false) }],
            false,
        );
        assert!(book.admit("e").is_err());
    }

    #[test]
    fn sessions_are_counted_and_resyncs_reported_until_the_cs_clears_them() {
        let book = MachineBook::new();
        book.update(&[assigned("a", 1, MachineState::Active, true)], false);
        {
            let _s1 = book.session("a");
            let _s2 = book.session("a");
            assert_eq!(book.sessions_of("a"), 2);
        }
        assert_eq!(book.sessions_of("a"), 0);
        assert!(book.resync_wanted("a"));
        assert!(book.resync_applied().is_empty());
        book.note_resync_marked("a", "disk0");
        assert!(book.resync_marked("a", "disk0"));
        assert_eq!(book.resync_applied(), vec!["a".to_string()]);
        book.update(&[assigned("a", 1, MachineState::Active, true)], false);
        assert_eq!(book.resync_applied(), vec!["a".to_string()], "kept while the CS still asks");
        book.update(&[assigned("a", 1, MachineState::Active, false)], false);
        assert!(book.resync_applied().is_empty());
        assert!(!book.resync_marked("a", "disk0"));
    }
}
