//! A process server's health: thresholds (the seed's defaults, each settable in the
//! `[health]` table of `ps.toml`) and the pure function that turns a sample of the server
//! into alerts and a level. No I/O here: the monitor samples, this judges.

use serde::{Deserialize, Serialize};

use super::api::{Alert, HealthLevel};

/// Alert thresholds. Percentages are of the cache size (free space) or of the host (CPU,
/// memory); durations in minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Cache free space below this: warning.
    pub cache_free_warning_percent: f64,
    /// Below this: critical.
    pub cache_free_critical_percent: f64,
    /// Below this: new writes are slowed (ingest throttled).
    pub cache_free_throttle_percent: f64,
    /// Pending upload that cannot drain within this many minutes: warning.
    pub drain_warning_minutes: f64,
    /// ... critical.
    pub drain_critical_minutes: f64,
    pub cpu_warning_percent: f64,
    pub cpu_critical_percent: f64,
    pub memory_warning_percent: f64,
    pub memory_critical_percent: f64,
    /// A machine whose RPO is above this many minutes: warning (twice it: critical).
    pub rpo_minutes: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            cache_free_warning_percent: 30.0,
            cache_free_critical_percent: 25.0,
            cache_free_throttle_percent: 20.0,
            drain_warning_minutes: 30.0,
            drain_critical_minutes: 45.0,
            cpu_warning_percent: 80.0,
            cpu_critical_percent: 95.0,
            memory_warning_percent: 80.0,
            memory_critical_percent: 95.0,
            rpo_minutes: 30.0,
        }
    }
}

/// Why a set of thresholds is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ThresholdError {
    #[error("health.{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Thresholds {
    /// Each value in range, and each warning before its critical.
    pub fn validate(&self) -> Result<(), ThresholdError> {
        let bad = |key, message: String| Err(ThresholdError::Invalid { key, message });
        let percents = [
            ("cache_free_warning_percent", self.cache_free_warning_percent),
            ("cache_free_critical_percent", self.cache_free_critical_percent),
            ("cache_free_throttle_percent", self.cache_free_throttle_percent),
            ("cpu_warning_percent", self.cpu_warning_percent),
            ("cpu_critical_percent", self.cpu_critical_percent),
            ("memory_warning_percent", self.memory_warning_percent),
            ("memory_critical_percent", self.memory_critical_percent),
        ];
        for (key, v) in percents {
            if !(0.0..=100.0).contains(&v) {
                return bad(key, format!("a percentage in 0..=100, got {v}"));
            }
        }
        for (key, v) in [
            ("drain_warning_minutes", self.drain_warning_minutes),
            ("drain_critical_minutes", self.drain_critical_minutes),
            ("rpo_minutes", self.rpo_minutes),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(key, format!("a positive number of minutes, got {v}"));
            }
        }
        if self.cache_free_critical_percent > self.cache_free_warning_percent {
            return bad("cache_free_critical_percent", "must not exceed cache_free_warning_percent".into());
        }
        if self.drain_critical_minutes < self.drain_warning_minutes {
            return bad("drain_critical_minutes", "must not be below drain_warning_minutes".into());
        }
        if self.cpu_critical_percent < self.cpu_warning_percent {
            return bad("cpu_critical_percent", "must not be below cpu_warning_percent".into());
        }
        if self.memory_critical_percent < self.memory_warning_percent {
            return bad("memory_critical_percent", "must not be below memory_warning_percent".into());
        }
        Ok(())
    }
}

/// One machine as health sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineSample {
    pub name: String,
    pub rpo_seconds: Option<f64>,
    /// Disks of the machine marked resync-required.
    pub resync_disks: Vec<String>,
}

/// What the monitor measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    pub cache_free_percent: f64,
    pub backlog_bytes: u64,
    /// Recent upload rate (bytes/s).
    pub upload_bytes_per_second: f64,
    /// How long the backlog has been non-zero without any upload (0 when uploads move).
    pub stalled_seconds: f64,
    /// None when not measurable on this host.
    pub cpu_percent: Option<f64>,
    pub memory_percent: Option<f64>,
    pub machines: Vec<MachineSample>,
    /// A failed fsync poisoned the cache.
    pub poisoned: bool,
}

/// Seconds the backlog needs at the recent upload rate. With no upload moving, the time
/// it has been stalled (a lower bound: it did not drain in that time), or 0 if nothing is
/// pending.
pub fn drain_seconds(backlog_bytes: u64, upload_bytes_per_second: f64, stalled_seconds: f64) -> f64 {
    if backlog_bytes == 0 {
        0.0
    } else if upload_bytes_per_second > 0.0 {
        backlog_bytes as f64 / upload_bytes_per_second
    } else {
        stalled_seconds
    }
}

fn level_above(v: f64, warning: f64, critical: f64) -> Option<HealthLevel> {
    if v > critical {
        Some(HealthLevel::Critical)
    } else if v > warning {
        Some(HealthLevel::Warning)
    } else {
        None
    }
}

/// Whether new writes are to be slowed at this much free cache space.
pub fn throttled(t: &Thresholds, cache_free_percent: f64) -> bool {
    cache_free_percent < t.cache_free_throttle_percent
}

/// Every alert the sample raises, worst first within each kind.
pub fn evaluate(t: &Thresholds, s: &Sample) -> Vec<Alert> {
    let mut alerts = Vec::new();
    let mut alert = |kind: &str, level, message: String| alerts.push(Alert { kind: kind.to_string(), level, message });
    if s.poisoned {
        alert(
            "cache_poisoned",
            HealthLevel::Critical,
            "a failed fsync poisoned the cache: it accepts nothing until the process server is restarted".into(),
        );
    }
    let free = s.cache_free_percent;
    if free < t.cache_free_critical_percent {
        alert(
            "cache_free",
            HealthLevel::Critical,
            format!("cache free space {free:.1}% is below {}%", t.cache_free_critical_percent),
        );
    } else if free < t.cache_free_warning_percent {
        alert(
            "cache_free",
            HealthLevel::Warning,
            format!("cache free space {free:.1}% is below {}%", t.cache_free_warning_percent),
        );
    }
    if throttled(t, free) {
        alert(
            "ingest_throttled",
            HealthLevel::Critical,
            format!(
                "cache free space {free:.1}% is below {}%: new writes are slowed until the drain frees space",
                t.cache_free_throttle_percent
            ),
        );
    }
    let eta_min = drain_seconds(s.backlog_bytes, s.upload_bytes_per_second, s.stalled_seconds) / 60.0;
    // "Cannot drain within N minutes": needing N or more.
    let drain_level = if eta_min >= t.drain_critical_minutes {
        Some(HealthLevel::Critical)
    } else if eta_min >= t.drain_warning_minutes {
        Some(HealthLevel::Warning)
    } else {
        None
    };
    if let Some(level) = drain_level {
        let how = if s.upload_bytes_per_second > 0.0 {
            format!("at {:.1} MB/s", s.upload_bytes_per_second / 1e6)
        } else {
            "with no upload moving".to_string()
        };
        alert(
            "upload_backlog",
            level,
            format!(
                "{} bytes pending upload cannot drain within {} min ({eta_min:.0} min {how})",
                s.backlog_bytes,
                if level == HealthLevel::Critical { t.drain_critical_minutes } else { t.drain_warning_minutes }
            ),
        );
    }
    for (kind, v, w, c) in [
        ("cpu", s.cpu_percent, t.cpu_warning_percent, t.cpu_critical_percent),
        ("memory", s.memory_percent, t.memory_warning_percent, t.memory_critical_percent),
    ] {
        if let Some(level) = v.and_then(|v| level_above(v, w, c)) {
            let limit = if level == HealthLevel::Critical { c } else { w };
            alert(kind, level, format!("{kind} use {:.0}% is above {limit}%", v.unwrap_or_default()));
        }
    }
    for m in &s.machines {
        if !m.resync_disks.is_empty() {
            alert(
                "resync_required",
                HealthLevel::Warning,
                format!("machine {} needs a full resync of {}", m.name, m.resync_disks.join(", ")),
            );
        }
        if let Some(rpo) = m.rpo_seconds {
            let limit = t.rpo_minutes * 60.0;
            if let Some(level) = level_above(rpo, limit, 2.0 * limit) {
                alert(
                    "rpo",
                    level,
                    format!("machine {} RPO {:.0} min is above {} min", m.name, rpo / 60.0, t.rpo_minutes),
                );
            }
        }
    }
    alerts
}

/// The worst level among the alerts.
pub fn level(alerts: &[Alert]) -> HealthLevel {
    alerts.iter().map(|a| a.level).max().unwrap_or(HealthLevel::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(alerts: &[Alert]) -> Vec<(&str, HealthLevel)> {
        alerts.iter().map(|a| (a.kind.as_str(), a.level)).collect()
    }

    fn healthy() -> Sample {
        Sample { cache_free_percent: 90.0, cpu_percent: Some(10.0), memory_percent: Some(20.0), ..Sample::default() }
    }

    #[test]
    fn cache_free_space_crosses_warning_critical_and_throttle() {
        let t = Thresholds::default();
        let at = |free| evaluate(&t, &Sample { cache_free_percent: free, ..healthy() });
        assert!(at(30.0).is_empty());
        assert_eq!(kinds(&at(29.9)), vec![("cache_free", HealthLevel::Warning)]);
        assert_eq!(kinds(&at(25.0)), vec![("cache_free", HealthLevel::Warning)]);
        assert_eq!(kinds(&at(24.9)), vec![("cache_free", HealthLevel::Critical)]);
        assert_eq!(
            kinds(&at(19.9)),
            vec![("cache_free", HealthLevel::Critical), ("ingest_throttled", HealthLevel::Critical)]
        );
        assert!(!throttled(&t, 20.0) && throttled(&t, 19.99));
        assert_eq!(level(&at(29.0)), HealthLevel::Warning);
        assert_eq!(level(&at(50.0)), HealthLevel::Ok);
    }

    #[test]
    fn backlog_is_judged_by_the_time_it_needs_to_drain() {
        let t = Thresholds::default();
        let at = |backlog, rate, stalled| {
            evaluate(
                &t,
                &Sample {
                    backlog_bytes: backlog,
                    upload_bytes_per_second: rate,
                    stalled_seconds: stalled,
                    ..healthy()
                },
            )
        };
        // 1 GB at 1 MB/s: 16.7 min, fine; at 0.5 MB/s 33 min: warning; at 0.25 MB/s 67 min: critical.
        assert!(at(1_000_000_000, 1e6, 0.0).is_empty());
        assert_eq!(kinds(&at(1_000_000_000, 0.5e6, 0.0)), vec![("upload_backlog", HealthLevel::Warning)]);
        assert_eq!(kinds(&at(1_000_000_000, 0.25e6, 0.0)), vec![("upload_backlog", HealthLevel::Critical)]);
        // Nothing moving: judged by how long it has been stuck.
        assert!(at(1, 0.0, 60.0).is_empty());
        assert_eq!(kinds(&at(1, 0.0, 31.0 * 60.0)), vec![("upload_backlog", HealthLevel::Warning)]);
        assert_eq!(kinds(&at(1, 0.0, 45.0 * 60.0)), vec![("upload_backlog", HealthLevel::Critical)]);
        assert!(at(0, 0.0, 3600.0).is_empty(), "no backlog, no alert");
        assert_eq!(drain_seconds(100, 10.0, 0.0), 10.0);
    }

    #[test]
    fn cpu_memory_resync_and_rpo() {
        let t = Thresholds::default();
        let s = Sample { cpu_percent: Some(81.0), memory_percent: Some(96.0), ..healthy() };
        assert_eq!(kinds(&evaluate(&t, &s)), vec![("cpu", HealthLevel::Warning), ("memory", HealthLevel::Critical)]);
        assert!(evaluate(&t, &Sample { cpu_percent: None, memory_percent: Some(80.0), ..healthy() }).is_empty());
        let machines = vec![
            MachineSample { name: "a".into(), rpo_seconds: Some(31.0 * 60.0), resync_disks: vec![] },
            MachineSample { name: "b".into(), rpo_seconds: Some(61.0 * 60.0), resync_disks: vec!["disk0".into()] },
            MachineSample { name: "c".into(), rpo_seconds: None, resync_disks: vec![] },
            MachineSample { name: "d".into(), rpo_seconds: Some(60.0), resync_disks: vec![] },
        ];
        let alerts = evaluate(&t, &Sample { machines, ..healthy() });
        assert_eq!(
            kinds(&alerts),
            vec![
                ("rpo", HealthLevel::Warning),
                ("resync_required", HealthLevel::Warning),
                ("rpo", HealthLevel::Critical)
            ]
        );
        assert!(alerts[1].message.contains("disk0") && alerts[2].message.contains("machine b"));
        let poisoned = evaluate(&t, &Sample { poisoned: true, ..healthy() });
        assert_eq!(level(&poisoned), HealthLevel::Critical);
    }

    #[test]
    fn thresholds_are_configurable_and_checked() {
        let t: Thresholds = toml::from_str("cache_free_warning_percent = 40.0\nrpo_minutes = 5.0").unwrap();
        assert_eq!(t.cache_free_warning_percent, 40.0);
        assert_eq!(t.cache_free_critical_percent, 25.0, "others keep their defaults");
        assert_eq!(t.validate(), Ok(()));
        assert!(evaluate(&t, &Sample { cache_free_percent: 35.0, ..healthy() }).len() == 1);
        let bad = Thresholds { cache_free_critical_percent: 50.0, ..Thresholds::default() };
        assert!(matches!(bad.validate(), Err(ThresholdError::Invalid { key: "cache_free_critical_percent", .. })));
        let bad = Thresholds { cpu_warning_percent: 120.0, ..Thresholds::default() };
        assert!(matches!(bad.validate(), Err(ThresholdError::Invalid { key: "cpu_warning_percent", .. })));
        let bad = Thresholds { rpo_minutes: 0.0, ..Thresholds::default() };
        assert!(matches!(bad.validate(), Err(ThresholdError::Invalid { key: "rpo_minutes", .. })));
        assert!(toml::from_str::<Thresholds>("cache_free_warn = 1.0").is_err(), "typos are errors");
    }
}
