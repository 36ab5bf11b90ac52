//! Capacity planning (`churnlog plan`): how many process servers, and how big, for a
//! number of protected machines and a daily churn.
//!
//! Two recommendations:
//! - [`table_plan`]: from the seed's sizing table ([`SIZES`]). Machines and churn are
//!   split evenly over as many servers as the scale-out rule needs (another server beyond
//!   [`MACHINES_PER_SERVER_MAX`] machines or [`CHURN_PER_SERVER_MAX`] a day), and each
//!   server gets the smallest size whose row covers its share.
//! - [`measured_plan`]: from a short measurement of this machine's cache disk and cores
//!   ([`measure`]): one server of this machine takes [`SAFE_UTILISATION`] of its measured
//!   durable ingest at the peak rate, and its cache holds `backlog_hours` of peak churn
//!   below the 30% free-space warning.
//!
//! Sizes are decimal (GB = 10^9 bytes, TB = 10^12), as in the seed's table.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

pub const GB: u64 = 1_000_000_000;
pub const TB: u64 = 1_000 * GB;
const SECONDS_PER_DAY: f64 = 86_400.0;

/// One row of the seed's sizing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ServerSize {
    pub name: &'static str,
    pub vcpus: u32,
    pub memory_gb: u32,
    pub cache_bytes: u64,
    /// Daily churn this size takes, at most.
    pub churn_per_day_max: u64,
    /// Protected machines this size takes, at most.
    pub machines_max: u64,
}

/// The seed's table, smallest first.
pub const SIZES: [ServerSize; 3] = [
    ServerSize {
        name: "small",
        vcpus: 4,
        memory_gb: 8,
        cache_bytes: 300 * GB,
        churn_per_day_max: 250 * GB,
        machines_max: 85,
    },
    ServerSize {
        name: "medium",
        vcpus: 8,
        memory_gb: 12,
        cache_bytes: 600 * GB,
        churn_per_day_max: TB,
        machines_max: 150,
    },
    ServerSize {
        name: "large",
        vcpus: 12,
        memory_gb: 24,
        cache_bytes: TB,
        churn_per_day_max: 2 * TB,
        machines_max: 225,
    },
];

/// The seed's scale-out rule: beyond 200 machines (though its largest row lists 225) or
/// 2 TB a day, another process server. The stricter figure wins.
pub const MACHINES_PER_SERVER_MAX: u64 = 200;
pub const CHURN_PER_SERVER_MAX: u64 = 2 * TB;

/// Inputs beyond these are refused as implausible (and keep the arithmetic exact).
pub const MACHINES_MAX: u64 = 10_000_000;
pub const CHURN_PER_DAY_MAX: u64 = 100_000 * TB;

/// Share of the measured durable ingest one server is planned to use at peak: the rest
/// covers reading the cache back for upload, TLS, and bursts.
pub const SAFE_UTILISATION: f64 = 0.5;

/// The cache is planned to be at most this full with the backlog in it (the health
/// warning starts at 30% free).
pub const CACHE_FILL_MAX: f64 = 0.7;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("--machines must be between 1 and {MACHINES_MAX}, not {0}")]
    Machines(u64),
    #[error("--churn-per-day must be at most {max} TB, not {0} bytes", max = CHURN_PER_DAY_MAX / TB)]
    Churn(u64),
    #[error("--{0} must be a positive number, not {1}")]
    Parameter(&'static str, f64),
    #[error("measurement in {0}: {1}")]
    Measure(String, String),
}

/// The table's recommendation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TablePlan {
    pub servers: u64,
    pub size: ServerSize,
    /// The largest share of one server (machines and churn split evenly; some servers
    /// get one machine or byte fewer).
    pub machines_per_server: u64,
    pub churn_per_server_per_day: u64,
    /// Why this many servers: `machines`, `churn` or `one`.
    pub limited_by: &'static str,
}

fn check_input(machines: u64, churn_per_day: u64) -> Result<(), PlanError> {
    if machines == 0 || machines > MACHINES_MAX {
        return Err(PlanError::Machines(machines));
    }
    if churn_per_day > CHURN_PER_DAY_MAX {
        return Err(PlanError::Churn(churn_per_day));
    }
    Ok(())
}

/// The seed table's recommendation for `machines` protected machines changing
/// `churn_per_day` bytes a day in total.
pub fn table_plan(machines: u64, churn_per_day: u64) -> Result<TablePlan, PlanError> {
    check_input(machines, churn_per_day)?;
    let by_machines = machines.div_ceil(MACHINES_PER_SERVER_MAX);
    let by_churn = churn_per_day.div_ceil(CHURN_PER_SERVER_MAX);
    let servers = by_machines.max(by_churn).max(1);
    let limited_by = match (by_machines.max(by_churn), by_machines >= by_churn) {
        (0 | 1, _) => "one",
        (_, true) => "machines",
        (_, false) => "churn",
    };
    let machines_per_server = machines.div_ceil(servers);
    let churn_per_server_per_day = churn_per_day.div_ceil(servers);
    let size = *SIZES
        .iter()
        .find(|s| machines_per_server <= s.machines_max && churn_per_server_per_day <= s.churn_per_day_max)
        .expect("the scale-out rule keeps each share within the largest row");
    Ok(TablePlan { servers, size, machines_per_server, churn_per_server_per_day, limited_by })
}

/// What [`measure`] found on this machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// Durable ingest through the cache engine, many streams, drained behind (MiB/s of
    /// logical, incompressible data).
    pub ingest_mib_per_s: f64,
    /// CPU time per logical MiB ingested (milliseconds), if /proc told.
    pub cpu_ms_per_mib: Option<f64>,
    pub cores: u64,
    pub memory_bytes: Option<u64>,
    /// Free space on the measured file system.
    pub free_bytes: u64,
    pub seconds: f64,
}

/// Knobs of the measured plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeasuredAssumptions {
    /// Peak churn rate ÷ the day's average rate.
    pub peak_factor: f64,
    /// Hours of peak churn the cache holds when uploads stall.
    pub backlog_hours: f64,
    pub safe_utilisation: f64,
}

/// The measured recommendation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeasuredPlan {
    pub servers: u64,
    /// Daily churn one server of this machine takes at a safe utilisation.
    pub churn_per_server_per_day_max: u64,
    pub machines_per_server: u64,
    pub churn_per_server_per_day: u64,
    /// Cache per server for `backlog_hours` of peak churn at most 70% full.
    pub cache_bytes_per_server: u64,
    /// Whether the measured file system has that much free.
    pub cache_fits_here: bool,
    /// Cores one server keeps busy at its peak churn (from the measured CPU cost).
    pub cores_busy_at_peak: Option<f64>,
    pub limited_by: &'static str,
    pub assumptions: MeasuredAssumptions,
    pub measurement: Measurement,
}

/// The measured recommendation for the same load.
pub fn measured_plan(
    machines: u64,
    churn_per_day: u64,
    m: &Measurement,
    a: MeasuredAssumptions,
) -> Result<MeasuredPlan, PlanError> {
    check_input(machines, churn_per_day)?;
    for (name, v) in [
        ("peak-factor", a.peak_factor),
        ("backlog-hours", a.backlog_hours),
        ("safe utilisation", a.safe_utilisation),
        ("measured ingest", m.ingest_mib_per_s),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(PlanError::Parameter(name, v));
        }
    }
    if a.peak_factor < 1.0 {
        return Err(PlanError::Parameter("peak-factor (at least 1)", a.peak_factor));
    }
    let measured_bytes_per_s = m.ingest_mib_per_s * (1u64 << 20) as f64;
    // At peak the server may use `safe_utilisation` of what it measured.
    let capacity = (measured_bytes_per_s * a.safe_utilisation / a.peak_factor * SECONDS_PER_DAY).floor();
    let capacity = (capacity as u64).max(1);
    let by_churn = churn_per_day.div_ceil(capacity);
    let by_machines = machines.div_ceil(MACHINES_PER_SERVER_MAX);
    let servers = by_churn.max(by_machines).max(1);
    let limited_by = match (by_machines.max(by_churn), by_machines >= by_churn) {
        (0 | 1, _) => "one",
        (_, true) => "machines",
        (_, false) => "churn",
    };
    let churn_per_server = churn_per_day.div_ceil(servers);
    let peak_bytes_per_s = churn_per_server as f64 / SECONDS_PER_DAY * a.peak_factor;
    let cache = (peak_bytes_per_s * a.backlog_hours * 3600.0 / CACHE_FILL_MAX).ceil() as u64;
    let cores_busy_at_peak = m.cpu_ms_per_mib.map(|ms| ms / 1000.0 * peak_bytes_per_s / (1u64 << 20) as f64);
    Ok(MeasuredPlan {
        servers,
        churn_per_server_per_day_max: capacity,
        machines_per_server: machines.div_ceil(servers),
        churn_per_server_per_day: churn_per_server,
        cache_bytes_per_server: cache,
        cache_fits_here: m.free_bytes >= cache,
        cores_busy_at_peak,
        limited_by,
        assumptions: a,
        measurement: m.clone(),
    })
}

/// Measures durable ingest into a scratch cache under `dir` (removed afterwards): runs
/// of 225 streams of incompressible 64 KiB records with a drain acknowledging behind, so
/// segments are reclaimed and disk use stays at a few segments.
pub fn measure(dir: &Path, target: Duration) -> Result<Measurement, PlanError> {
    let err = |e: &dyn std::fmt::Display| PlanError::Measure(dir.display().to_string(), e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    let scratch = tempfile::Builder::new().prefix(".churnlog-plan-").tempdir_in(dir).map_err(|e| err(&e))?;
    let free_bytes = rustix::fs::statvfs(dir).map(|s| s.f_bavail.saturating_mul(s.f_frsize)).map_err(|e| err(&e))?;
    // Smaller segments than a real cache's: the scratch cache stays at a few of them.
    let mut options = crate::cache::Options::default();
    options.segment_size = 32 << 20;
    options.record_size_max = options.record_size_max.max(64 << 10);
    let run = |sub: &str, bytes: u64| {
        let params = crate::bench::ingest::IngestParams {
            dir: scratch.path().join(sub),
            bytes,
            record_size: 64 << 10,
            streams: 225,
            compressible: 0.0,
            producers: 32,
            window_per_stream: 2,
            inflight_per_producer_max: None,
            drain: true,
            rate_mib_per_s: None,
            arrivals: crate::bench::ingest::Arrivals::Poisson,
            leave_open: false,
            options: options.clone(),
        };
        crate::bench::ingest::run(&params).map_err(|e| err(&e))
    };
    // A short run warms up and gives a rate; the next is sized to `target` at it. A
    // run that ends in under half the target (the first rate was low) is sized again
    // once more from its own rate. At most three runs, each at most 16 GiB.
    let mut seconds = 0.0;
    let mut main = run("run0", 32 << 20)?;
    seconds += main.seconds;
    for i in 1..3 {
        let bytes = (main.mib_per_s * target.as_secs_f64() * (1u64 << 20) as f64) as u64;
        main = run(&format!("run{i}"), bytes.clamp(32 << 20, 16 << 30))?;
        seconds += main.seconds;
        if main.seconds >= target.as_secs_f64() / 2.0 {
            break;
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    Ok(Measurement {
        ingest_mib_per_s: main.mib_per_s,
        cpu_ms_per_mib: main.cpu_ms_per_logical_mib,
        cores,
        memory_bytes: memory_total(),
        free_bytes,
        seconds,
    })
}

fn memory_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Both recommendations, for `--json` and the side-by-side table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanReport {
    pub machines: u64,
    pub churn_per_day_bytes: u64,
    pub table: TablePlan,
    pub measured: Option<MeasuredPlan>,
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= TB {
        format!("{:.2} TB", b / TB as f64)
    } else {
        format!("{:.1} GB", b / GB as f64)
    }
}

impl std::fmt::Display for PlanReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.table;
        writeln!(f, "{} machines, {} of churn a day", self.machines, human(self.churn_per_day_bytes))?;
        let mut rows: Vec<(&str, String, String)> = vec![
            ("process servers", t.servers.to_string(), String::new()),
            ("limited by", t.limited_by.to_string(), String::new()),
            ("machines per server", t.machines_per_server.to_string(), String::new()),
            ("churn per server a day", human(t.churn_per_server_per_day), String::new()),
            ("churn one server takes a day", human(t.size.churn_per_day_max), String::new()),
            ("size", t.size.name.to_string(), "this machine".into()),
            ("vCPUs", t.size.vcpus.to_string(), String::new()),
            ("memory", format!("{} GB", t.size.memory_gb), String::new()),
            ("cache disk", human(t.size.cache_bytes), String::new()),
        ];
        if let Some(m) = &self.measured {
            let mm = &m.measurement;
            let a = &m.assumptions;
            rows[0].2 = m.servers.to_string();
            rows[1].2 = m.limited_by.to_string();
            rows[2].2 = m.machines_per_server.to_string();
            rows[3].2 = human(m.churn_per_server_per_day);
            rows[4].2 = human(m.churn_per_server_per_day_max);
            rows[6].2 = match m.cores_busy_at_peak {
                Some(c) => format!("{} ({c:.2} busy at peak)", mm.cores),
                None => mm.cores.to_string(),
            };
            rows[7].2 = mm.memory_bytes.map_or("unknown".into(), |b| format!("{:.1} GB", b as f64 / GB as f64));
            rows[8].2 = format!(
                "{} needed ({} free here{})",
                human(m.cache_bytes_per_server),
                human(mm.free_bytes),
                if m.cache_fits_here { "" } else { ": too small" }
            );
            rows.push((
                "measured ingest",
                String::new(),
                format!("{:.0} MiB/s in {:.1} s", mm.ingest_mib_per_s, mm.seconds),
            ));
            rows.push((
                "assumptions",
                String::new(),
                format!(
                    "peak {}x average, {} h backlog, {:.0}% of ingest at peak",
                    a.peak_factor,
                    a.backlog_hours,
                    a.safe_utilisation * 100.0
                ),
            ));
        }
        let measured = self.measured.is_some();
        write!(f, "{:<30} {:<16}", "", "seed table")?;
        if measured {
            write!(f, " measured")?;
        }
        writeln!(f)?;
        for (name, table, m) in rows {
            write!(f, "{name:<30} {table:<16}")?;
            if measured {
                write!(f, " {m}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn size_of(machines: u64, churn: u64) -> (u64, &'static str) {
        let p = table_plan(machines, churn).unwrap();
        (p.servers, p.size.name)
    }

    #[test]
    fn table_boundaries() {
        assert_eq!(size_of(1, 0), (1, "small"));
        assert_eq!(size_of(85, 250 * GB), (1, "small"));
        assert_eq!(size_of(86, 250 * GB), (1, "medium"));
        assert_eq!(size_of(85, 250 * GB + 1), (1, "medium"));
        assert_eq!(size_of(150, TB), (1, "medium"));
        assert_eq!(size_of(151, TB), (1, "large"));
        assert_eq!(size_of(150, TB + 1), (1, "large"));
        assert_eq!(size_of(200, 2 * TB), (1, "large"));
        // Beyond 2 TB a day: two servers with half each (just over 1 TB: large).
        let p = table_plan(10, 2 * TB + 1).unwrap();
        assert_eq!((p.servers, p.size.name, p.limited_by), (2, "large", "churn"));
        assert_eq!(p.churn_per_server_per_day, TB + 1);
        assert_eq!(size_of(10, 4 * TB), (2, "large"));
        assert_eq!(size_of(10, 4 * TB + 1), (3, "large"));
        // Beyond 200 machines: another server, even though the large row lists 225.
        let p = table_plan(201, 0).unwrap();
        assert_eq!((p.servers, p.machines_per_server, p.size.name, p.limited_by), (2, 101, "medium", "machines"));
        assert_eq!(size_of(225, 0), (2, "medium"));
        assert_eq!(size_of(400, 4 * TB), (2, "large"));
        assert_eq!(size_of(401, 0), (3, "medium"));
        assert_eq!(size_of(1000, 0), (5, "large"));
    }

    #[test]
    fn invalid_input_is_an_error() {
        assert_eq!(table_plan(0, GB), Err(PlanError::Machines(0)));
        assert!(table_plan(MACHINES_MAX + 1, GB).is_err());
        assert!(table_plan(10, CHURN_PER_DAY_MAX + 1).is_err());
        let m = measurement(100.0);
        let a = MeasuredAssumptions { peak_factor: 2.0, backlog_hours: 2.0, safe_utilisation: SAFE_UTILISATION };
        assert!(measured_plan(0, GB, &m, a).is_err());
        assert!(measured_plan(1, GB, &m, MeasuredAssumptions { peak_factor: 0.5, ..a }).is_err());
        assert!(measured_plan(1, GB, &m, MeasuredAssumptions { backlog_hours: f64::NAN, ..a }).is_err());
        assert!(measured_plan(1, GB, &m, MeasuredAssumptions { backlog_hours: 0.0, ..a }).is_err());
        assert!(measured_plan(1, GB, &measurement(0.0), a).is_err());
    }

    fn measurement(mib_per_s: f64) -> Measurement {
        Measurement {
            ingest_mib_per_s: mib_per_s,
            cpu_ms_per_mib: Some(2.0),
            cores: 2,
            memory_bytes: Some(8 * GB),
            free_bytes: 100 * GB,
            seconds: 10.0,
        }
    }

    #[test]
    fn measured_plan_follows_the_measured_rate() {
        let a = MeasuredAssumptions { peak_factor: 2.0, backlog_hours: 2.0, safe_utilisation: 0.5 };
        // 100 MiB/s measured: at peak 2x, 25 MiB/s average = 2.26 TB a day per server.
        let m = measurement(100.0);
        let cap = (100.0 * 1048576.0 * 0.25 * 86400.0) as u64;
        let p = measured_plan(10, 5 * TB, &m, a).unwrap();
        assert_eq!(p.churn_per_server_per_day_max, cap);
        assert_eq!(p.servers, 3);
        assert_eq!(p.limited_by, "churn");
        assert_eq!(p.churn_per_server_per_day, (5 * TB).div_ceil(3));
        // 2 h at the peak rate, 70% full at most.
        let peak = (5 * TB).div_ceil(3) as f64 / 86400.0 * 2.0;
        assert_eq!(p.cache_bytes_per_server, (peak * 7200.0 / 0.7).ceil() as u64);
        assert!(!p.cache_fits_here);
        let busy = p.cores_busy_at_peak.unwrap();
        assert!((busy - 2.0 / 1000.0 * peak / 1048576.0).abs() < 1e-9);
        // Machines still follow the scale-out rule.
        let p = measured_plan(450, GB, &m, a).unwrap();
        assert_eq!((p.servers, p.limited_by), (3, "machines"));
        assert!(p.cache_fits_here);
        let text = PlanReport {
            machines: 450,
            churn_per_day_bytes: GB,
            table: table_plan(450, GB).unwrap(),
            measured: Some(p),
        }
        .to_string();
        assert!(text.contains("measured") && text.contains("seed table"), "{text}");
    }

    proptest! {
        #[test]
        fn every_server_gets_a_share_its_size_covers(machines in 1u64..5_000, churn in 0u64..50 * TB) {
            let p = table_plan(machines, churn).unwrap();
            prop_assert!(p.machines_per_server <= MACHINES_PER_SERVER_MAX);
            prop_assert!(p.churn_per_server_per_day <= CHURN_PER_SERVER_MAX);
            prop_assert!(p.machines_per_server <= p.size.machines_max);
            prop_assert!(p.churn_per_server_per_day <= p.size.churn_per_day_max);
            prop_assert!(p.servers * p.machines_per_server >= machines);
            prop_assert!(p.servers * p.churn_per_server_per_day >= churn);
            // Minimal: one server fewer would break the scale-out rule.
            if p.servers > 1 {
                let fewer = p.servers - 1;
                prop_assert!(machines.div_ceil(fewer) > MACHINES_PER_SERVER_MAX || churn.div_ceil(fewer) > CHURN_PER_SERVER_MAX);
            }
            // The smallest fitting size: the one below would not cover the share.
            let i = SIZES.iter().position(|s| *s == p.size).unwrap();
            if i > 0 {
                let below = SIZES[i - 1];
                prop_assert!(p.machines_per_server > below.machines_max || p.churn_per_server_per_day > below.churn_per_day_max);
            }
        }

        #[test]
        fn more_load_never_needs_fewer_servers(machines in 1u64..5_000, churn in 0u64..50 * TB, dm in 0u64..500, dc in 0u64..5 * TB) {
            let a = table_plan(machines, churn).unwrap();
            let b = table_plan(machines + dm, churn + dc).unwrap();
            prop_assert!(b.servers >= a.servers);
        }
    }
}
