//! Adaptive compression effort. LZ4's *acceleration* trades ratio for speed: at 1 it is
//! standard LZ4; higher values probe fewer positions for matches, so incompressible
//! stretches are skipped faster and a little ratio is lost. Which setting is right
//! depends on what limits ingest:
//!
//! - the **CPU** (no idle CPU left while the writer is kept busy): producers compress
//!   slower than the disk writes, and on a small machine the writer itself waits for a
//!   core, so compress faster (step up, to at most `lz4_acceleration_max`);
//! - the **disk**: producers wait for the writer and the CPU idles, so every byte saved
//!   is throughput: compress harder (step down to 1). Light load looks the same and gets
//!   the same answer, the best ratio.
//!
//! zstd's `--adapt` follows the same idea. Measured here (2 cores, 2:1 data): the writer
//! spent 85–95 % of its time in write + fdatasync whatever the acceleration, yet the
//! stored MiB/s rose by a third when compression took less CPU, so the writer's busy time
//! is no sign of a disk limit on a saturated machine; idle CPU is.
//!
//! The writer feeds the controller the device time of each batch, after the batch's
//! tickets are resolved, and the controller decides once per [`WINDOW`]. CPU idle time
//! comes from `/proc/stat` (all CPUs: another process using the CPU leaves less for
//! compression just the same, but only a busy writer counts as load of ours); where it
//! cannot be read, the effort stays at 1.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How often the controller decides.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);
/// Below this fraction of the writer's time spent in write + fdatasync, the cache is
/// lightly loaded whatever the CPU does.
const WRITER_BUSY_LIGHT: f64 = 0.25;
/// From this fraction on, the cache is under heavy load.
const WRITER_BUSY_HEAVY: f64 = 0.50;
/// Below this fraction of idle CPU time the CPU is the bottleneck.
const CPU_IDLE_SATURATED: f64 = 0.15;
/// Above this fraction of idle CPU time there is CPU to spare for a better ratio.
const CPU_IDLE_SPARE: f64 = 0.30;
/// Largest acceleration an option may ask for (liblz4's own cap is 65537).
pub const LZ4_ACCELERATION_CAP: u32 = 64;

/// Checks a value for `lz4_acceleration_max` (the options and the server's config).
pub fn check_acceleration_max(value: u32) -> Result<(), String> {
    if (1..=LZ4_ACCELERATION_CAP).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "lz4_acceleration_max must be in 1..={LZ4_ACCELERATION_CAP} (1 = standard LZ4 always), got {value}"
        ))
    }
}

/// The acceleration producers use now, shared between them and the writer.
#[derive(Debug)]
pub(crate) struct Effort {
    acceleration: AtomicU32,
}

impl Effort {
    pub fn new() -> Effort {
        Effort { acceleration: AtomicU32::new(1) }
    }

    pub fn acceleration(&self) -> u32 {
        self.acceleration.load(Ordering::Relaxed)
    }
}

/// What the last window showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pressure {
    /// Heavy load and no idle CPU: compression is in the way.
    CpuSaturated,
    /// Idle CPU or light load: there is time for the best ratio.
    CpuSpare,
    /// Between the thresholds: keep the current setting (hysteresis).
    Unclear,
}

/// Classifies one window: `writer_busy` is the fraction of it the writer spent in write +
/// fdatasync, `cpu_idle` the fraction of all CPUs' time that was idle (None: unknown).
pub(crate) fn classify(writer_busy: f64, cpu_idle: Option<f64>) -> Pressure {
    let Some(idle) = cpu_idle else { return Pressure::CpuSpare };
    if writer_busy < WRITER_BUSY_LIGHT || idle > CPU_IDLE_SPARE {
        Pressure::CpuSpare
    } else if writer_busy >= WRITER_BUSY_HEAVY && idle < CPU_IDLE_SATURATED {
        Pressure::CpuSaturated
    } else {
        Pressure::Unclear
    }
}

/// One step of the controller: up by one when the CPU is saturated, down by one when
/// it has time to spare, always within `1..=max`.
pub(crate) fn next_acceleration(current: u32, max: u32, pressure: Pressure) -> u32 {
    let max = max.max(1);
    let next = match pressure {
        Pressure::CpuSaturated => current.saturating_add(1),
        Pressure::CpuSpare => current.saturating_sub(1),
        Pressure::Unclear => current,
    };
    next.clamp(1, max)
}

/// Idle and total time of all CPUs, in clock ticks, from the first line of `/proc/stat`
/// (`cpu user nice system idle iowait irq softirq steal ...`). I/O wait counts as idle:
/// the CPU was free to compress.
pub(crate) fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?;
    let mut fields = line.split_ascii_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if ticks.len() < 5 {
        return None;
    }
    Some((ticks[3] + ticks[4], ticks.iter().sum()))
}

fn cpu_times() -> Option<(u64, u64)> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The writer's side: sums device time and decides once per window.
pub(crate) struct EffortController {
    max: u32,
    window_start: Instant,
    io_time: Duration,
    cpu_at_start: Option<(u64, u64)>,
}

impl EffortController {
    pub fn new(max: u32) -> EffortController {
        let cpu_at_start = if max > 1 { cpu_times() } else { None };
        EffortController { max, window_start: Instant::now(), io_time: Duration::ZERO, cpu_at_start }
    }

    /// Records one batch's device time (its write and fdatasync) and, once per window,
    /// sets `effort`.
    pub fn observe(&mut self, io_time: Duration, effort: &Effort) {
        if self.max <= 1 {
            return;
        }
        self.io_time += io_time;
        let elapsed = self.window_start.elapsed();
        if elapsed < WINDOW {
            return;
        }
        let now = cpu_times();
        let idle = match (self.cpu_at_start, now) {
            (Some((idle0, total0)), Some((idle1, total1))) if total1 > total0 => {
                Some(idle1.saturating_sub(idle0) as f64 / (total1 - total0) as f64)
            }
            _ => None,
        };
        let writer_busy = self.io_time.as_secs_f64() / elapsed.as_secs_f64();
        let pressure = classify(writer_busy, idle);
        let next = next_acceleration(effort.acceleration(), self.max, pressure);
        tracing::debug!(writer_busy, ?idle, ?pressure, next, "compression effort");
        effort.acceleration.store(next, Ordering::Relaxed);
        self.window_start = Instant::now();
        self.io_time = Duration::ZERO;
        self.cpu_at_start = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saturated_cpu_under_heavy_load_is_pressure() {
        assert_eq!(classify(0.90, Some(0.05)), Pressure::CpuSaturated);
        assert_eq!(classify(0.50, Some(0.0)), Pressure::CpuSaturated);
        // Another process keeping the CPU busy while this cache idles is not ours to fix.
        assert_eq!(classify(0.10, Some(0.0)), Pressure::CpuSpare);
        assert_eq!(classify(0.40, Some(0.0)), Pressure::Unclear);
    }

    #[test]
    fn idle_cpu_or_unknown_cpu_asks_for_the_best_ratio_and_the_middle_holds() {
        // Producers waiting on the disk leave the CPU idle.
        assert_eq!(classify(0.95, Some(0.50)), Pressure::CpuSpare);
        assert_eq!(classify(0.95, Some(0.20)), Pressure::Unclear);
        assert_eq!(classify(0.95, None), Pressure::CpuSpare);
    }

    #[test]
    fn acceleration_steps_by_one_within_bounds() {
        assert_eq!(next_acceleration(1, 4, Pressure::CpuSaturated), 2);
        assert_eq!(next_acceleration(4, 4, Pressure::CpuSaturated), 4);
        assert_eq!(next_acceleration(3, 4, Pressure::CpuSpare), 2);
        assert_eq!(next_acceleration(1, 4, Pressure::CpuSpare), 1);
        assert_eq!(next_acceleration(3, 4, Pressure::Unclear), 3);
        // A lowered maximum pulls the current value down at once.
        assert_eq!(next_acceleration(8, 4, Pressure::Unclear), 4);
        assert_eq!(next_acceleration(5, 0, Pressure::CpuSaturated), 1);
    }

    #[test]
    fn a_saturated_cpu_climbs_to_the_maximum_and_idle_time_brings_it_back() {
        let mut acc = 1;
        for _ in 0..10 {
            acc = next_acceleration(acc, 4, classify(0.9, Some(0.03)));
        }
        assert_eq!(acc, 4);
        acc = next_acceleration(acc, 4, classify(0.9, Some(0.40)));
        assert_eq!(acc, 3);
    }

    #[test]
    fn proc_stat_first_line_is_parsed_and_junk_is_refused() {
        let text = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\n";
        assert_eq!(parse_proc_stat(text), Some((840, 1000)));
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(parse_proc_stat("cpu 1 2 x 4 5\n"), None);
        assert_eq!(parse_proc_stat("cpu 1 2 3\n"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn this_machine_reports_cpu_times_when_it_has_proc() {
        if std::path::Path::new("/proc/stat").exists() {
            let (idle, total) = cpu_times().expect("/proc/stat parses");
            assert!(idle <= total && total > 0);
        }
    }
}
