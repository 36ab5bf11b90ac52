//! The process server's Prometheus metrics: one registry (the `prometheus` crate's, and
//! its text encoder), set from each monitor sample. The acknowledgement-latency histogram
//! is the ingest server's own ([`crate::ingest::IngestStats::ack_latency`]), registered
//! here so it is observed where it happens and exported from here.

use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, IntGauge, Opts, Registry, TextEncoder};

use super::api::{HealthLevel, Heartbeat};

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every metric a process server exports.
pub struct PsMetrics {
    registry: Registry,
    ingest_bytes: IntCounter,
    upload_bytes: IntCounter,
    throttled_records: IntCounter,
    backlog_bytes: IntGauge,
    cache_size_bytes: IntGauge,
    cache_free_percent: Gauge,
    ingest_throttled: IntGauge,
    health: IntGauge,
    cpu_percent: Gauge,
    memory_percent: Gauge,
    rpo_seconds: GaugeVec,
    pending_bytes: GaugeVec,
    alerts: GaugeVec,
}

impl std::fmt::Debug for PsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PsMetrics")
    }
}

/// Counters as the monitor read them, for the increments since the last sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub ingest_bytes: u64,
    pub upload_bytes: u64,
    pub throttled_records: u64,
}

fn level_value(l: HealthLevel) -> i64 {
    match l {
        HealthLevel::Ok => 0,
        HealthLevel::Warning => 1,
        HealthLevel::Critical => 2,
    }
}

impl PsMetrics {
    /// A registry with every metric, the ingest server's latency histogram among them.
    pub fn new(ack_latency: &prometheus::Histogram) -> Result<PsMetrics, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let int_gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge = |name: &str, help: &str| -> Result<Gauge, MetricsError> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, MetricsError> {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let m = PsMetrics {
            ingest_bytes: counter("churnlog_ingest_bytes_total", "Write payload bytes received from agents")?,
            upload_bytes: counter("churnlog_upload_bytes_total", "Object bytes uploaded to the object store")?,
            throttled_records: counter(
                "churnlog_ingest_throttled_records_total",
                "Records held back because the cache was short of free space",
            )?,
            backlog_bytes: int_gauge("churnlog_backlog_bytes", "Bytes cached and not yet uploaded")?,
            cache_size_bytes: int_gauge("churnlog_cache_size_bytes", "Cache capacity")?,
            cache_free_percent: gauge("churnlog_cache_free_percent", "Free cache space, percent of capacity")?,
            ingest_throttled: int_gauge("churnlog_ingest_throttled", "1 while new writes are slowed for free space")?,
            health: int_gauge("churnlog_health_level", "Worst alert level: 0 ok, 1 warning, 2 critical")?,
            cpu_percent: gauge("churnlog_cpu_percent", "Host CPU busy percent")?,
            memory_percent: gauge("churnlog_memory_percent", "Host memory used percent")?,
            rpo_seconds: gauge_vec(
                "churnlog_machine_rpo_seconds",
                "Age of the newest uploaded recovery point per machine",
                &["machine"],
            )?,
            pending_bytes: gauge_vec(
                "churnlog_machine_pending_bytes",
                "Bytes cached and not yet uploaded per machine",
                &["machine"],
            )?,
            alerts: gauge_vec("churnlog_alerts", "Alerts raised now, by kind and level", &["kind", "level"])?,
            registry,
        };
        m.registry.register(Box::new(ack_latency.clone()))?;
        Ok(m)
    }

    /// Sets every metric from a sample (`before`/`after`: counter totals of the last and
    /// this sample).
    pub fn update(&self, hb: &Heartbeat, before: Totals, after: Totals, throttled: bool) {
        self.ingest_bytes.inc_by(after.ingest_bytes.saturating_sub(before.ingest_bytes));
        self.upload_bytes.inc_by(after.upload_bytes.saturating_sub(before.upload_bytes));
        self.throttled_records.inc_by(after.throttled_records.saturating_sub(before.throttled_records));
        self.backlog_bytes.set(hb.backlog_bytes as i64);
        self.cache_size_bytes.set(hb.cache_size_bytes as i64);
        self.cache_free_percent.set(hb.cache_free_percent);
        self.ingest_throttled.set(throttled as i64);
        self.health.set(level_value(hb.health));
        self.cpu_percent.set(hb.cpu_percent);
        self.memory_percent.set(hb.memory_percent);
        self.rpo_seconds.reset();
        self.pending_bytes.reset();
        for m in &hb.machines {
            if let Some(rpo) = m.rpo_seconds {
                self.rpo_seconds.with_label_values(&[m.name.as_str()]).set(rpo);
            }
            self.pending_bytes.with_label_values(&[m.name.as_str()]).set(m.pending_bytes as f64);
        }
        self.alerts.reset();
        for a in &hb.alerts {
            let level = match a.level {
                HealthLevel::Ok => "ok",
                HealthLevel::Warning => "warning",
                HealthLevel::Critical => "critical",
            };
            self.alerts.with_label_values(&[a.kind.as_str(), level]).inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::api::{Alert, MachineReport};

    #[test]
    fn a_sample_shows_in_the_exposition() {
        let stats = crate::ingest::IngestStats::default();
        stats.ack_latency.observe(0.002);
        let m = PsMetrics::new(&stats.ack_latency).unwrap();
        let hb = Heartbeat {
            health: HealthLevel::Critical,
            cache_free_percent: 18.5,
            backlog_bytes: 1234,
            alerts: vec![Alert {
                kind: "ingest_throttled".into(),
                level: HealthLevel::Critical,
                message: String::new(),
            }],
            machines: vec![MachineReport { name: "m1".into(), rpo_seconds: Some(42.0), ..MachineReport::default() }],
            ..Heartbeat::default()
        };
        let after = Totals { ingest_bytes: 100, upload_bytes: 40, throttled_records: 3 };
        m.update(&hb, Totals::default(), after, true);
        let text = m.render().unwrap();
        for line in [
            "churnlog_ingest_bytes_total 100",
            "churnlog_upload_bytes_total 40",
            "churnlog_ingest_throttled 1",
            "churnlog_ingest_throttled_records_total 3",
            "churnlog_cache_free_percent 18.5",
            "churnlog_backlog_bytes 1234",
            "churnlog_health_level 2",
            "churnlog_machine_rpo_seconds{machine=\"m1\"} 42",
            "churnlog_alerts{kind=\"ingest_throttled\",level=\"critical\"} 1",
            "churnlog_ack_latency_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
