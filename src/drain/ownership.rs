//! Which machines' cached records this process server may upload. A standalone server
//! uploads every stream. A server linked to a configuration server uploads only the
//! machines the CS's latest heartbeat reply says it owns (active, moving away, or without
//! a credential after an operator's reassign), and nothing before its first reply.
//!
//! Records of a machine the CS does not give this server (after a purge: it declared
//! them lost, moved the machine, and its new server asked for a full copy) are dropped by
//! the drainer, loudly, as an eviction: the stream is marked resync-required in META, so
//! the records can never be uploaded later, not even after a restart or if the machine
//! is assigned here again (it then begins with a full copy). Uploading them would add
//! stale data to the history the machine's new server continues: after its hand-over
//! mark as if current (corrupt points), or after a gap (another full copy).

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::RwLock;

#[derive(Debug, Default)]
enum Scope {
    /// Standalone: every machine.
    #[default]
    Every,
    /// Linked to a CS that has not answered yet: no machine (and none is held either).
    Unknown,
    /// Linked to a CS: the machines of its latest reply.
    Only(HashSet<String>),
}

/// Shared by the heartbeat (which sets it) and the drainer (which asks it).
#[derive(Clone, Debug, Default)]
pub struct Ownership(Arc<RwLock<Scope>>);

impl Ownership {
    /// For a server linked to a CS: nothing may be uploaded until [`Ownership::assign`].
    pub fn linked() -> Ownership {
        Ownership(Arc::new(RwLock::new(Scope::Unknown)))
    }

    /// Whether the CS has said which machines are this server's (always, standalone).
    pub fn known(&self) -> bool {
        !matches!(&*self.0.read(), Scope::Unknown)
    }

    /// The machines the CS lists for this server now (none: it does not know the server).
    pub fn assign<'a>(&self, machines: impl IntoIterator<Item = &'a str>) {
        *self.0.write() = Scope::Only(machines.into_iter().map(str::to_string).collect());
    }

    /// Whether `machine`'s records may be uploaded.
    pub fn may_upload(&self, machine: &str) -> bool {
        match &*self.0.read() {
            Scope::Every => true,
            Scope::Unknown => false,
            Scope::Only(set) => set.contains(machine),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_uploads_all_linked_only_what_the_cs_assigned() {
        assert!(Ownership::default().may_upload("any"));
        let o = Ownership::linked();
        let shared = o.clone();
        assert!(!o.may_upload("m1") && !o.known(), "nothing before the first reply");
        shared.assign(["m1", "m2"]);
        assert!(o.known());
        assert!(o.may_upload("m1") && o.may_upload("m2") && !o.may_upload("m3"));
        shared.assign([]);
        assert!(!o.may_upload("m1"), "the CS no longer knows this server");
    }
}
