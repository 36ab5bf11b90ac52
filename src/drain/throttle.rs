//! Upload bandwidth: a limit in MB/s, optionally different inside and outside work
//! hours (as an upload throttle in a backup product has), enforced by a token bucket
//! that allows at most one second of burst, so an idle hour is not spent in one go.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// When the work-hours limit applies; outside it, the off-hours limit does.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkHours {
    /// Minutes after midnight, local to `utc_offset_min`: [start, end). A window that
    /// ends before it starts crosses midnight.
    pub start_min: u16,
    pub end_min: u16,
    /// Monday = 0 … Sunday = 6.
    pub days: [bool; 7],
    /// The site's offset from UTC, minutes (e.g. 60 for UTC+01:00).
    pub utc_offset_min: i32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BandwidthSchedule {
    /// MB/s (10^6 bytes) outside work hours, or always when `work_hours` is None; None: unlimited.
    pub off_mb_per_s: Option<f64>,
    /// MB/s during work hours; None: unlimited.
    pub work_mb_per_s: Option<f64>,
    pub work_hours: Option<WorkHours>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(String);

impl WorkHours {
    /// `HH:MM-HH:MM`, days like `mon-fri` or `mon,wed,sat`.
    pub fn parse(hours: &str, days: &str, utc_offset_min: i32) -> Result<WorkHours, ScheduleError> {
        let bad = |w: &str| ScheduleError(format!("work hours {hours:?} / days {days:?}: {w}"));
        let minute = |s: &str| -> Result<u16, ScheduleError> {
            let (h, m) = s.trim().split_once(':').ok_or_else(|| bad("times are HH:MM"))?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| bad("hour"))?, m.parse().map_err(|_| bad("minute"))?);
            if h > 24 || m > 59 || (h == 24 && m != 0) {
                return Err(bad("time out of range"));
            }
            Ok(h * 60 + m)
        };
        let (a, b) = hours.split_once('-').ok_or_else(|| bad("expected HH:MM-HH:MM"))?;
        let (start_min, end_min) = (minute(a)?, minute(b)?);
        if start_min == end_min {
            return Err(bad("empty window"));
        }
        const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
        let day = |s: &str| {
            NAMES.iter().position(|n| s.trim().eq_ignore_ascii_case(n)).ok_or_else(|| bad("days are mon..sun"))
        };
        let mut set = [false; 7];
        for part in days.split(',') {
            match part.split_once('-') {
                Some((x, y)) => {
                    let (x, y) = (day(x)?, day(y)?);
                    let mut d = x;
                    loop {
                        set[d] = true;
                        if d == y {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => set[day(part)?] = true,
            }
        }
        if !(-14 * 60..=14 * 60).contains(&utc_offset_min) {
            return Err(bad("UTC offset beyond ±14 h"));
        }
        Ok(WorkHours { start_min, end_min, days: set, utc_offset_min })
    }

    /// Whether `unix_s` (seconds since the epoch) falls in work hours.
    pub fn contains(&self, unix_s: i64) -> bool {
        let local = unix_s + i64::from(self.utc_offset_min) * 60;
        let day_index = local.div_euclid(86_400);
        let minute = (local.rem_euclid(86_400) / 60) as u16;
        // 1970-01-01 was a Thursday (index 3).
        let weekday = (day_index + 3).rem_euclid(7) as usize;
        if self.start_min < self.end_min {
            self.days[weekday] && (self.start_min..self.end_min).contains(&minute)
        } else if minute >= self.start_min {
            self.days[weekday]
        } else {
            // After midnight, inside a window that began the day before.
            minute < self.end_min && self.days[(weekday + 6) % 7]
        }
    }
}

impl BandwidthSchedule {
    pub fn unlimited() -> BandwidthSchedule {
        BandwidthSchedule::default()
    }

    pub fn limit_at(&self, unix_s: i64) -> Option<f64> {
        match &self.work_hours {
            Some(w) if w.contains(unix_s) => self.work_mb_per_s,
            _ => self.off_mb_per_s,
        }
    }
}

/// Token bucket over the schedule.
pub struct Throttle {
    schedule: BandwidthSchedule,
    /// When the bytes sent so far finish at the limit (None: nothing owed).
    due: Option<Instant>,
}

const BURST: Duration = Duration::from_secs(1);

impl Throttle {
    pub fn new(schedule: BandwidthSchedule) -> Throttle {
        Throttle { schedule, due: None }
    }

    /// Accounts `bytes` just sent; returns how long to pause before the next send.
    pub fn account(&mut self, bytes: usize, now: Instant, wall: SystemTime) -> Duration {
        let unix_s = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let Some(limit) = self.schedule.limit_at(unix_s).filter(|l| *l > 0.0) else {
            self.due = None;
            return Duration::ZERO;
        };
        // GCRA: `due` is the theoretical time the bytes so far finish at the limit; up to
        // BURST ahead of now is allowed without waiting.
        let start = self.due.map_or(now, |d| d.max(now));
        let due = start + Duration::from_secs_f64(bytes as f64 / (limit * 1e6));
        self.due = Some(due);
        due.saturating_duration_since(now + BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23 was a Monday.
    const MONDAY_00_00_UTC: i64 = 1_795_392_000;

    #[test]
    fn work_hours_by_day_and_minute() {
        let w = WorkHours::parse("08:00-18:00", "mon-fri", 0).unwrap();
        assert!(!w.contains(MONDAY_00_00_UTC + 7 * 3600 + 59 * 60));
        assert!(w.contains(MONDAY_00_00_UTC + 8 * 3600));
        assert!(!w.contains(MONDAY_00_00_UTC + 18 * 3600));
        assert!(!w.contains(MONDAY_00_00_UTC + 5 * 86_400 + 10 * 3600), "Saturday");
        // UTC+02:00: 06:00 UTC is 08:00 local.
        let w2 = WorkHours::parse("08:00-18:00", "mon-fri", 120).unwrap();
        assert!(w2.contains(MONDAY_00_00_UTC + 6 * 3600));
    }

    #[test]
    fn a_night_window_crosses_midnight_and_belongs_to_its_first_day() {
        let w = WorkHours::parse("22:00-06:00", "fri", 0).unwrap();
        let friday = MONDAY_00_00_UTC + 4 * 86_400;
        assert!(w.contains(friday + 23 * 3600));
        assert!(w.contains(friday + 86_400 + 5 * 3600), "Saturday 05:00 continues Friday's window");
        assert!(!w.contains(friday + 5 * 3600), "Friday 05:00 belongs to Thursday");
    }

    #[test]
    fn bad_schedules_are_refused() {
        for (h, d) in [("8-18", "mon"), ("08:00-08:00", "mon"), ("25:00-26:00", "mon"), ("08:00-18:00", "funday")] {
            assert!(WorkHours::parse(h, d, 0).is_err(), "{h} {d}");
        }
        assert_eq!(
            WorkHours::parse("08:00-18:00", "sat-mon", 0).unwrap().days,
            [true, false, false, false, false, true, true]
        );
    }

    #[test]
    fn the_bucket_holds_the_rate_and_allows_one_second_of_burst() {
        let schedule = BandwidthSchedule { off_mb_per_s: Some(10.0), ..BandwidthSchedule::default() };
        let mut t = Throttle::new(schedule);
        let (now, wall) = (Instant::now(), UNIX_EPOCH + Duration::from_secs(MONDAY_00_00_UTC as u64));
        // 10 MB in the first second is burst; the next 10 MB must wait a second.
        assert_eq!(t.account(10_000_000, now, wall), Duration::ZERO);
        let wait = t.account(10_000_000, now, wall);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        // After a long idle time, credit is capped at one second.
        let later = now + Duration::from_secs(3600);
        assert_eq!(t.account(10_000_000, later, wall), Duration::ZERO);
        assert!(t.account(5_000_000, later, wall) > Duration::from_millis(400));
    }

    #[test]
    fn work_and_off_hours_limits_apply_at_their_times() {
        let schedule = BandwidthSchedule {
            off_mb_per_s: None,
            work_mb_per_s: Some(1.0),
            work_hours: Some(WorkHours::parse("09:00-17:00", "mon-fri", 0).unwrap()),
        };
        assert_eq!(schedule.limit_at(MONDAY_00_00_UTC + 10 * 3600), Some(1.0));
        assert_eq!(schedule.limit_at(MONDAY_00_00_UTC + 20 * 3600), None);
        let mut t = Throttle::new(schedule);
        let night = UNIX_EPOCH + Duration::from_secs(MONDAY_00_00_UTC as u64 + 20 * 3600);
        assert_eq!(t.account(1 << 30, Instant::now(), night), Duration::ZERO, "unlimited at night");
    }
}
