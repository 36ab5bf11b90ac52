//! Handing a machine's disks over to another process server (a move ordered by the
//! configuration server). The process server stops taking the machine's sessions and
//! asks for a hand-over here; the drainer uploads what is cached for the machine, then
//! marks each of its disks' manifests [`crate::store::Manifest::handed_over_at`], and only
//! then reports the hand-over done. The next server's drain sees the mark and continues
//! the history right after it: no gap, so no full copy.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Requested,
    Done,
}

/// Machines being handed over, shared by whoever orders them and the drainer.
#[derive(Clone, Default, Debug)]
pub struct Handoffs(Arc<Mutex<HashMap<String, State>>>);

impl Handoffs {
    /// Starts handing `machine` over (no effect when already requested or done). The
    /// caller must already refuse the machine's sessions: records arriving after the
    /// hand-over would belong to nobody.
    pub fn request(&self, machine: &str) {
        self.0.lock().entry(machine.to_string()).or_insert(State::Requested);
    }

    /// Forgets a hand-over (the machine stays, or came back).
    pub fn cancel(&self, machine: &str) {
        self.0.lock().remove(machine);
    }

    /// Every disk of `machine` is uploaded and marked handed over.
    pub fn is_done(&self, machine: &str) -> bool {
        self.0.lock().get(machine) == Some(&State::Done)
    }

    /// Machines requested and not yet done.
    pub fn pending(&self) -> Vec<String> {
        self.0.lock().iter().filter(|(_, s)| **s == State::Requested).map(|(m, _)| m.clone()).collect()
    }

    pub(super) fn mark_done(&self, machine: &str) {
        if let Some(s) = self.0.lock().get_mut(machine) {
            *s = State::Done;
        }
    }
}
