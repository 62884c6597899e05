//! When health sweeps happen: the typed `HEALTH_SWEEP_INTERVAL`, and the slots every worker
//! process computes alike from it (the worker's scheduler claims one sweep per slot).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// When sweeps happen: a fixed interval (aligned to the Unix epoch, so every process computes the
/// same slots) or a cron expression.
#[derive(Debug, Clone)]
pub enum SweepSchedule {
    Every(Duration),
    Cron(Box<cron::Schedule>),
}

/// A `HEALTH_SWEEP_INTERVAL` value that is neither an interval nor a cron expression.
#[derive(Debug, thiserror::Error)]
#[error("expected an interval like `5m`, `300s` or `1h`, or a cron expression like `*/5 * * * *`; got {0:?}")]
pub struct ScheduleParseError(String);

impl FromStr for SweepSchedule {
    type Err = ScheduleParseError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let value = raw.trim();
        let units = [("", 1_000), ("s", 1_000), ("ms", 1), ("m", 60_000), ("min", 60_000), ("h", 3_600_000)];
        if let Some(interval) = parse_duration(value, &units) {
            if interval < Duration::from_secs(1) {
                return Err(ScheduleParseError(raw.to_string()));
            }
            return Ok(SweepSchedule::Every(interval));
        }
        // The cron crate wants seconds first; accept the usual five-field form too.
        let fields = value.split_whitespace().count();
        let expression = if fields == 5 { format!("0 {value}") } else { value.to_string() };
        cron::Schedule::from_str(&expression)
            .map(|s| SweepSchedule::Cron(Box::new(s)))
            .map_err(|_| ScheduleParseError(raw.to_string()))
    }
}

/// A whole number followed by one of `units` (name, milliseconds): `300`, `5m`, `2 min`.
pub(crate) fn parse_duration(value: &str, units: &[(&str, u64)]) -> Option<Duration> {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number.parse().ok()?;
    let (_, millis) = units.iter().find(|(name, _)| *name == unit.trim())?;
    number.checked_mul(*millis).map(Duration::from_millis)
}

impl SweepSchedule {
    /// The slot `now` falls in: the latest firing time at or before `now`.
    pub fn current_slot(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            SweepSchedule::Every(interval) => {
                let step = interval.as_millis().max(1) as i64;
                let ms = now.timestamp_millis();
                DateTime::from_timestamp_millis(ms - ms.rem_euclid(step)).unwrap_or(now)
            }
            SweepSchedule::Cron(schedule) => {
                // `after(now)` iterates both ways; stepping back gives the previous firing.
                let probe = now + chrono::Duration::milliseconds(1);
                schedule.after(&probe).next_back().unwrap_or(now)
            }
        }
    }

    /// The next slot after `now`.
    pub fn next_slot(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            SweepSchedule::Every(interval) => {
                self.current_slot(now) + chrono::Duration::from_std(*interval).unwrap_or(chrono::Duration::minutes(5))
            }
            SweepSchedule::Cron(schedule) => schedule.after(&now).next().unwrap_or(now + chrono::Duration::minutes(5)),
        }
    }

    /// The length of the slot starting at `slot`.
    pub fn interval_at(&self, slot: DateTime<Utc>) -> Duration {
        (self.next_slot(slot) - slot).to_std().unwrap_or(Duration::from_secs(300))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn intervals_and_cron_expressions_parse() {
        for (raw, secs) in [("5m", 300), ("300s", 300), ("300", 300), ("1h", 3600), ("2 min", 120)] {
            match raw.parse::<SweepSchedule>().unwrap() {
                SweepSchedule::Every(d) => assert_eq!(d, Duration::from_secs(secs), "{raw}"),
                other => panic!("{raw} parsed as {other:?}"),
            }
        }
        assert!(matches!("*/5 * * * *".parse::<SweepSchedule>().unwrap(), SweepSchedule::Cron(_)));
        assert!(matches!("0 */5 * * * *".parse::<SweepSchedule>().unwrap(), SweepSchedule::Cron(_)));
        for bad in ["", "soon", "5 parsecs", "0s", "* * *", "99 * * * *"] {
            let err = bad.parse::<SweepSchedule>().unwrap_err();
            assert!(err.to_string().contains("expected an interval"), "{bad}: {err}");
        }
    }

    #[test]
    fn interval_slots_are_aligned_so_every_process_agrees() {
        let s: SweepSchedule = "5m".parse().unwrap();
        assert_eq!(s.current_slot(at("2026-11-28T10:07:31Z")), at("2026-11-28T10:05:00Z"));
        assert_eq!(s.current_slot(at("2026-11-28T10:05:00Z")), at("2026-11-28T10:05:00Z"));
        assert_eq!(s.next_slot(at("2026-11-28T10:07:31Z")), at("2026-11-28T10:10:00Z"));
        assert_eq!(s.interval_at(at("2026-11-28T10:05:00Z")), Duration::from_secs(300));
    }

    #[test]
    fn cron_slots_step_back_to_the_previous_firing() {
        let s: SweepSchedule = "*/15 * * * *".parse().unwrap();
        assert_eq!(s.current_slot(at("2026-11-28T10:07:31Z")), at("2026-11-28T10:00:00Z"));
        assert_eq!(s.current_slot(at("2026-11-28T10:15:00Z")), at("2026-11-28T10:15:00Z"));
        assert_eq!(s.next_slot(at("2026-11-28T10:07:31Z")), at("2026-11-28T10:15:00Z"));
        assert_eq!(s.interval_at(at("2026-11-28T10:00:00Z")), Duration::from_secs(900));
    }
}
