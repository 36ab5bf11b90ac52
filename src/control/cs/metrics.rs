//! The CS's Prometheus metrics (`GET /metrics`, unauthenticated like every exporter; it
//! shows ids, names and figures, no secrets). Request counters and latencies are updated
//! as requests finish; the fleet gauges are refreshed from the status report at each
//! scrape, so they are never staler than the database.

use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry,
    TextEncoder,
};

use crate::control::api::{HealthLevel, PsState, StatusReport};

pub struct Metrics {
    registry: Registry,
    process_servers: GaugeVec,
    machines: Gauge,
    cache_free_percent: GaugeVec,
    backlog_bytes: GaugeVec,
    rpo_seconds: GaugeVec,
    alerts: GaugeVec,
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let process_servers =
            GaugeVec::new(Opts::new("churnlog_cs_process_servers", "Registered process servers by state"), &["state"])?;
        let machines = Gauge::new("churnlog_cs_machines", "Registered machines")?;
        let cache_free_percent = GaugeVec::new(
            Opts::new("churnlog_cs_ps_cache_free_percent", "Free cache space of each process server (last report)"),
            &["ps"],
        )?;
        let backlog_bytes = GaugeVec::new(
            Opts::new("churnlog_cs_ps_backlog_bytes", "Bytes cached and not yet uploaded on each process server"),
            &["ps"],
        )?;
        let rpo_seconds = GaugeVec::new(
            Opts::new("churnlog_cs_machine_rpo_seconds", "Recovery point objective of each machine (last report)"),
            &["machine"],
        )?;
        let alerts = GaugeVec::new(Opts::new("churnlog_cs_alerts", "Open alerts by level"), &["level"])?;
        let requests = IntCounterVec::new(
            Opts::new("churnlog_cs_api_requests_total", "API requests by endpoint and HTTP status code"),
            &["endpoint", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("churnlog_cs_api_request_seconds", "API request latency by endpoint")
                .buckets(exponential_buckets(0.0005, 2.0, 14)?),
            &["endpoint"],
        )?;
        registry.register(Box::new(process_servers.clone()))?;
        registry.register(Box::new(machines.clone()))?;
        registry.register(Box::new(cache_free_percent.clone()))?;
        registry.register(Box::new(backlog_bytes.clone()))?;
        registry.register(Box::new(rpo_seconds.clone()))?;
        registry.register(Box::new(alerts.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Metrics {
            registry,
            process_servers,
            machines,
            cache_free_percent,
            backlog_bytes,
            rpo_seconds,
            alerts,
            requests,
            latency,
        })
    }

    /// Counts a finished request.
    pub fn observe_request(&self, endpoint: &str, code: u16, seconds: f64) {
        self.requests.with_label_values(&[endpoint, &code.to_string()]).inc();
        self.latency.with_label_values(&[endpoint]).observe(seconds);
    }

    /// Sets the fleet gauges from a status report (servers and machines that are gone
    /// drop out).
    pub fn update(&self, status: &StatusReport) {
        self.cache_free_percent.reset();
        self.backlog_bytes.reset();
        self.rpo_seconds.reset();
        let (mut connected, mut disconnected) = (0.0, 0.0);
        let (mut warning, mut critical) = (0.0, 0.0);
        for ps in &status.process_servers {
            match ps.state {
                PsState::Connected => connected += 1.0,
                PsState::Disconnected => disconnected += 1.0,
            }
            for a in &ps.alerts {
                match a.level {
                    HealthLevel::Warning => warning += 1.0,
                    HealthLevel::Critical => critical += 1.0,
                    HealthLevel::Ok => {}
                }
            }
            self.cache_free_percent.with_label_values(&[&ps.id]).set(ps.cache_free_percent);
            self.backlog_bytes.with_label_values(&[&ps.id]).set(ps.backlog_bytes as f64);
        }
        self.process_servers.with_label_values(&["connected"]).set(connected);
        self.process_servers.with_label_values(&["disconnected"]).set(disconnected);
        self.alerts.with_label_values(&["warning"]).set(warning);
        self.alerts.with_label_values(&["critical"]).set(critical);
        self.machines.set(status.machines.len() as f64);
        for m in &status.machines {
            if let Some(rpo) = m.rpo_seconds {
                self.rpo_seconds.with_label_values(&[&m.name]).set(rpo);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
