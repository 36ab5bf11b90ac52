//! Which process server takes a machine: the least loaded eligible one. Eligible: connected
//! (a heartbeat younger than the timeout), not in critical health, not decommissioning.
//! Load: the server's share of the eligible servers' churn plus the used share of its
//! cache; ties by fewest machines, then by id (deterministic).

use crate::control::api::HealthLevel;

/// One process server as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub connected: bool,
    pub health: HealthLevel,
    pub decommissioning: bool,
    pub ingest_bytes_per_second: u64,
    /// Free share of the cache in parts per million.
    pub cache_free_ppm: u64,
    /// Machines on it or moving to it.
    pub machines: u64,
}

impl Candidate {
    pub fn eligible(&self) -> bool {
        self.connected && self.health != HealthLevel::Critical && !self.decommissioning
    }
}

/// Load in whole percent points (0..=200). Rounded because the inputs only change with
/// each heartbeat: between two, a burst of registrations would otherwise all land on
/// the server that is 0.001% less loaded; at equal rounded load they spread by count.
fn load_points(c: &Candidate, churn_total: u64) -> u64 {
    let churn_share = if churn_total == 0 { 0.0 } else { c.ingest_bytes_per_second as f64 / churn_total as f64 };
    let cache_used_share = 1.0 - (c.cache_free_ppm.min(1_000_000) as f64 / 1e6);
    ((churn_share + cache_used_share) * 100.0).round() as u64
}

/// The index of the least loaded eligible candidate other than `exclude`.
pub fn least_loaded(candidates: &[Candidate], exclude: Option<&str>) -> Option<usize> {
    let ok = |c: &Candidate| c.eligible() && Some(c.id.as_str()) != exclude;
    let churn_total: u64 = candidates.iter().filter(|c| ok(c)).map(|c| c.ingest_bytes_per_second).sum();
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| ok(c))
        .min_by(|(_, a), (_, b)| {
            (load_points(a, churn_total), a.machines, &a.id).cmp(&(load_points(b, churn_total), b.machines, &b.id))
        })
        .map(|(i, _)| i)
}

/// Places `n` machines one after another (each counted on its server before the next is
/// placed); `None` for each that no server can take.
pub fn place_many(candidates: &mut [Candidate], exclude: Option<&str>, n: usize) -> Vec<Option<String>> {
    (0..n)
        .map(|_| {
            least_loaded(candidates, exclude).map(|i| {
                candidates[i].machines += 1;
                candidates[i].id.clone()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, ingest: u64, free_percent: u64, machines: u64) -> Candidate {
        Candidate {
            id: id.into(),
            connected: true,
            health: HealthLevel::Ok,
            decommissioning: false,
            ingest_bytes_per_second: ingest,
            cache_free_ppm: free_percent * 10_000,
            machines,
        }
    }

    #[test]
    fn least_loaded_by_churn_and_cache_then_count() {
        let cs = vec![c("a", 300, 90, 1), c("b", 100, 90, 5), c("c", 100, 50, 0)];
        // a: 0.6 + 0.1; b: 0.2 + 0.1; c: 0.2 + 0.5.
        assert_eq!(least_loaded(&cs, None), Some(1));
        // Without b the churn shares change: a 0.75 + 0.1, c 0.25 + 0.5.
        assert_eq!(least_loaded(&cs, Some("b")), Some(2));
        let ties = vec![c("a", 0, 100, 3), c("b", 0, 100, 2)];
        assert_eq!(least_loaded(&ties, None), Some(1));
    }

    #[test]
    fn disconnected_critical_and_decommissioning_servers_take_nothing() {
        let mut cs = vec![c("a", 0, 100, 0), c("b", 0, 100, 0), c("c", 0, 100, 0), c("d", 900, 10, 50)];
        cs[0].connected = false;
        cs[1].health = HealthLevel::Critical;
        cs[2].decommissioning = true;
        assert_eq!(least_loaded(&cs, None), Some(3));
        assert_eq!(least_loaded(&cs, Some("d")), None);
        assert_eq!(place_many(&mut cs, Some("d"), 2), vec![None, None]);
    }

    #[test]
    fn many_machines_spread_at_equal_load() {
        let mut cs = vec![c("a", 0, 100, 0), c("b", 0, 100, 0)];
        let placed = place_many(&mut cs, None, 4);
        assert_eq!(placed.iter().filter(|p| p.as_deref() == Some("a")).count(), 2);
        assert_eq!(placed.iter().filter(|p| p.as_deref() == Some("b")).count(), 2);
    }
}
