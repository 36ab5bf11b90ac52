//! The status report (`GET /api/v1/status`, the status page, `churnlog status --cs`) built
//! from the stored rows: a server's state by heartbeat age, its alerts from its last
//! report plus `heartbeat_missing` when silent, each machine's RPO and resync from the
//! report of the server it is on.

use std::collections::HashMap;

use super::db::Snapshot;
use crate::control::api::{
    Alert, HealthLevel, Heartbeat, MachineReport, MachineStatus, PsState, PsStatus, StatusReport,
};

/// Builds the report at `now` (Unix ms) with heartbeats older than `timeout_ms` counting
/// as missing.
pub fn build(snapshot: &Snapshot, now: i64, timeout_ms: i64) -> StatusReport {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for m in snapshot.machines.iter() {
        if let Some(p) = &m.ps_id {
            *counts.entry(p.as_str()).or_default() += 1;
        }
    }
    let mut reports: HashMap<&str, HashMap<&str, &MachineReport>> = HashMap::new();
    let mut process_servers = Vec::with_capacity(snapshot.process_servers.len());
    for ps in &snapshot.process_servers {
        let report: Option<&Heartbeat> = snapshot.reports.get(&ps.id).map(|r| r.as_ref());
        let age_ms = ps.last_heartbeat_at.map(|t| now.saturating_sub(t).max(0));
        let connected = age_ms.is_some_and(|a| a < timeout_ms);
        let mut alerts = report.as_ref().map(|r| r.alerts.clone()).unwrap_or_default();
        if !connected {
            let registered_for = now.saturating_sub(ps.registered_at).max(0) / 1000;
            let (level, message) = match age_ms {
                Some(a) => (
                    HealthLevel::Critical,
                    format!("no heartbeat for {} s (timeout {} s)", a / 1000, timeout_ms / 1000),
                ),
                None if registered_for * 1000 >= timeout_ms => {
                    (HealthLevel::Critical, format!("no heartbeat since it registered {registered_for} s ago"))
                }
                None => (HealthLevel::Warning, "registered, no heartbeat yet".to_string()),
            };
            alerts.push(Alert { kind: "heartbeat_missing".into(), level, message });
        }
        let health = alerts.iter().map(|a| a.level).max().unwrap_or(HealthLevel::Ok);
        process_servers.push(PsStatus {
            id: ps.id.clone(),
            address: ps.address.clone(),
            version: ps.version.clone(),
            state: if connected { PsState::Connected } else { PsState::Disconnected },
            health,
            alerts,
            cache_free_percent: report.as_ref().map(|r| r.cache_free_percent).unwrap_or(100.0),
            backlog_bytes: report.as_ref().map(|r| r.backlog_bytes).unwrap_or(0),
            machines: counts.get(ps.id.as_str()).copied().unwrap_or(0),
            decommissioning: ps.decommissioning,
            heartbeat_age_seconds: age_ms.map(|a| a as f64 / 1000.0),
        });
        if let Some(r) = report {
            reports.insert(ps.id.as_str(), r.machines.iter().map(|m| (m.name.as_str(), m)).collect());
        }
    }
    let machines = snapshot
        .machines
        .iter()
        .map(|m| {
            let seen = m.ps_id.as_deref().and_then(|p| reports.get(p)).and_then(|r| r.get(m.name.as_str()));
            MachineStatus {
                name: m.name.clone(),
                ps: m.ps_id.clone(),
                moving_to: m.moving_to.clone(),
                rpo_seconds: seen.and_then(|r| r.rpo_seconds),
                resync_required: m.resync_pending || seen.is_some_and(|r| r.resync_required),
            }
        })
        .collect();
    StatusReport { cs_version: crate::control::VERSION.to_string(), process_servers, machines }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::cs::db::{MachineRow, PsRow};

    fn ps(id: &str, last: Option<i64>) -> PsRow {
        PsRow {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            cert_pem: String::new(),
            version: "0.1.0".into(),
            cache_size_bytes: 1,
            registered_at: 0,
            last_heartbeat_at: last,
            heartbeats: last.map_or(0, |_| 1),
            decommissioning: false,
        }
    }

    #[test]
    fn silent_servers_are_disconnected_and_critical_and_machines_carry_their_report() {
        let hb = Heartbeat {
            id: "a".into(),
            cache_free_percent: 42.0,
            machines: vec![MachineReport { name: "m1".into(), rpo_seconds: Some(7.0), ..Default::default() }],
            ..Default::default()
        };
        let snap = Snapshot {
            process_servers: vec![ps("a", Some(100_000)), ps("b", Some(10_000))],
            reports: [("a".to_string(), std::sync::Arc::new(hb))].into_iter().collect(),
            machines: std::sync::Arc::new(vec![
                MachineRow { name: "m1".into(), ps_id: Some("a".into()), moving_to: None, resync_pending: false },
                MachineRow { name: "m2".into(), ps_id: Some("b".into()), moving_to: None, resync_pending: true },
            ]),
        };
        let r = build(&snap, 101_000, 60_000);
        assert_eq!(r.process_servers[0].state, PsState::Connected);
        assert_eq!(r.process_servers[0].health, HealthLevel::Ok);
        assert_eq!(r.process_servers[0].cache_free_percent, 42.0);
        assert_eq!(r.process_servers[1].state, PsState::Disconnected);
        assert_eq!(r.process_servers[1].health, HealthLevel::Critical);
        assert_eq!(r.process_servers[1].alerts[0].kind, "heartbeat_missing");
        assert_eq!(r.machines[0].rpo_seconds, Some(7.0));
        assert!(!r.machines[0].resync_required);
        assert!(r.machines[1].resync_required);
    }
}
