//! Host CPU and memory use from `/proc` (Linux): CPU busy percent between two samples of
//! `/proc/stat`, memory used percent from `/proc/meminfo` (MemTotal − MemAvailable).
//! Unavailable figures are None, never a guess.

/// Total and idle jiffies of all CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub total: u64,
    pub idle: u64,
}

/// Parses the `cpu ` line of `/proc/stat` (idle includes iowait).
pub fn parse_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes { total, idle })
}

/// Busy percent between two samples; None if no time passed.
pub fn cpu_percent(before: CpuTimes, after: CpuTimes) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let idle = after.idle.checked_sub(before.idle)?;
    (total > 0).then(|| 100.0 * total.saturating_sub(idle) as f64 / total as f64)
}

/// Used memory percent from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<f64> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    (total > 0).then(|| 100.0 * total.saturating_sub(available) as f64 / total as f64)
}

/// Samples the host; keeps the previous CPU sample for the next percentage.
#[derive(Debug, Default)]
pub struct HostSampler {
    last: Option<CpuTimes>,
}

impl HostSampler {
    /// (CPU busy percent since the previous call, memory used percent).
    pub fn sample(&mut self) -> (Option<f64>, Option<f64>) {
        let now = std::fs::read_to_string("/proc/stat").ok().and_then(|t| parse_stat(&t));
        let cpu = match (self.last, now) {
            (Some(a), Some(b)) => cpu_percent(a, b),
            _ => None,
        };
        if now.is_some() {
            self.last = now;
        }
        let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| parse_meminfo(&t));
        (cpu, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let a = parse_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_stat("cpu  200 0 200 1300 300 0 0 0 0 0\n").unwrap();
        assert_eq!(a, CpuTimes { total: 1000, idle: 800 });
        // 1000 more jiffies, 800 of them idle: 20% busy.
        assert_eq!(cpu_percent(a, b), Some(20.0));
        assert_eq!(cpu_percent(a, a), None);
        assert_eq!(parse_stat("intr 1 2"), None);
        let mem = parse_meminfo("MemTotal:       1000 kB\nMemFree: 100 kB\nMemAvailable:    250 kB\n").unwrap();
        assert_eq!(mem, 75.0);
        assert_eq!(parse_meminfo("MemTotal: 1000 kB\n"), None);
    }

    #[test]
    fn this_host_reports_memory() {
        let mut s = HostSampler::default();
        let (_, mem) = s.sample();
        assert!(mem.is_some_and(|m| (0.0..=100.0).contains(&m)), "{mem:?}");
    }
}
