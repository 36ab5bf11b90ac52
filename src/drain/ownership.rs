//! Which machines' cached records this process server may upload. A standalone server
//! uploads every stream. A server linked to a configuration server uploads only the
//! machines the CS's latest heartbeat reply lists for it (active or moving away), and
//! nothing before its first reply or once the CS no longer knows it: after a purge the
//! CS has declared what the server cached lost and moved its machines (which resync on
//! their new server), so a server that comes back must not add its stale records to the
//! histories another server now continues. Such records are held, not dropped: they stay
//! in the cache (reported, and uploaded should the machine be assigned here again) until
//! the cache's eviction needs their space or the server is decommissioned.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::RwLock;

#[derive(Debug, Default)]
enum Scope {
    /// Standalone: every machine.
    #[default]
    Every,
    /// Linked to a CS: the machines of its latest reply.
    Only(HashSet<String>),
}

/// Shared by the heartbeat (which sets it) and the drainer (which asks it).
#[derive(Clone, Debug, Default)]
pub struct Ownership(Arc<RwLock<Scope>>);

impl Ownership {
    /// For a server linked to a CS: nothing may be uploaded until [`Ownership::assign`].
    pub fn linked() -> Ownership {
        Ownership(Arc::new(RwLock::new(Scope::Only(HashSet::new()))))
    }

    /// The machines the CS lists for this server now (none: it does not know the server).
    pub fn assign<'a>(&self, machines: impl IntoIterator<Item = &'a str>) {
        *self.0.write() = Scope::Only(machines.into_iter().map(str::to_string).collect());
    }

    /// Whether `machine`'s records may be uploaded.
    pub fn may_upload(&self, machine: &str) -> bool {
        match &*self.0.read() {
            Scope::Every => true,
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
        assert!(!o.may_upload("m1"), "nothing before the first reply");
        shared.assign(["m1", "m2"]);
        assert!(o.may_upload("m1") && o.may_upload("m2") && !o.may_upload("m3"));
        shared.assign([]);
        assert!(!o.may_upload("m1"), "the CS no longer knows this server");
    }
}
