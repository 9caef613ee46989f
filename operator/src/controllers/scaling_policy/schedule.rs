//! Schedules: recurring windows (five-field cron, IANA time zone, duration) that set a floor, a
//! ceiling or an exact count while open.
//!
//! A window opens at each cron time in its zone (so 08:00 Europe/Paris stays 08:00 across DST
//! changes) and stays open for `duration`. Overlapping windows combine deterministically:
//! - if any open window sets `desiredReplicas`, the largest of those is the count;
//! - otherwise the floor is the largest open `minReplicas` and the ceiling the smallest open
//!   `maxReplicas`; when they cross, the floor wins (capacity over savings).
//!
//! The policy's own min/max and the partition cap still bound the result.

use std::str::FromStr;

use croner::Cron;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use vectorpipe_crds::v1alpha1::Schedule;

/// Why a schedule cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("schedules[{index}] ({name}): {message}")]
pub struct ScheduleError {
    /// Its position in the spec.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

/// A schedule window open now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenWindow {
    /// The schedule's name.
    pub name: String,
    /// When this window opened.
    pub opened: Timestamp,
    /// When it closes.
    pub closes: Timestamp,
    /// Its exact count, floor and ceiling.
    pub desired: Option<i32>,
    /// Its floor.
    pub min: Option<i32>,
    /// Its ceiling.
    pub max: Option<i32>,
}

fn parse(index: usize, schedule: &Schedule) -> Result<(Cron, TimeZone), ScheduleError> {
    let error = |message: String| ScheduleError {
        index,
        name: schedule.display_name(index),
        message,
    };
    let cron = Cron::from_str(&schedule.cron).map_err(|e| {
        error(format!(
            "cron {:?} is not a five-field cron expression ({e}); write e.g. \"0 8 * * MON-FRI\"",
            schedule.cron
        ))
    })?;
    let zone = TimeZone::get(&schedule.time_zone).map_err(|_| {
        error(format!(
            "timeZone {:?} is not an IANA time zone; write e.g. \"Europe/Paris\" or \"UTC\"",
            schedule.time_zone
        ))
    })?;
    Ok((cron, zone))
}

/// Checks every schedule's cron expression and time zone.
pub fn validate(schedules: &[Schedule]) -> Result<(), ScheduleError> {
    schedules
        .iter()
        .enumerate()
        .try_for_each(|(i, s)| parse(i, s).map(|_| ()))
}

/// The windows open at `now`.
pub fn open_windows(
    schedules: &[Schedule],
    now: Timestamp,
) -> Result<Vec<OpenWindow>, ScheduleError> {
    let mut open = Vec::new();
    for (index, schedule) in schedules.iter().enumerate() {
        let (cron, zone) = parse(index, schedule)?;
        let here = now.to_zoned(zone);
        let Ok(last) = cron.find_previous_occurrence(&here, true) else {
            continue;
        };
        let opened = last.timestamp();
        let length = jiff::SignedDuration::try_from(schedule.duration.get())
            .unwrap_or(jiff::SignedDuration::MAX);
        let closes = opened.checked_add(length).unwrap_or(Timestamp::MAX);
        if now < closes {
            open.push(OpenWindow {
                name: schedule.display_name(index),
                opened,
                closes,
                desired: schedule.desired_replicas,
                min: schedule.min_replicas,
                max: schedule.max_replicas,
            });
        }
    }
    Ok(open)
}

/// What open windows do to a count decided from metrics: the new count and the window that
/// changed it.
pub fn apply(open: &[OpenWindow], decided: i32) -> (i32, Option<String>) {
    if let Some(w) = open
        .iter()
        .filter(|w| w.desired.is_some())
        .max_by_key(|w| w.desired)
    {
        let desired = w.desired.unwrap_or(decided);
        return (desired, (desired != decided).then(|| w.name.clone()));
    }
    let floor = open
        .iter()
        .filter_map(|w| w.min.map(|m| (m, &w.name)))
        .max_by_key(|(m, _)| *m);
    let ceiling = open
        .iter()
        .filter_map(|w| w.max.map(|m| (m, &w.name)))
        .min_by_key(|(m, _)| *m);
    let mut count = decided;
    let mut by = None;
    if let Some((max, name)) = ceiling
        && count > max
    {
        count = max;
        by = Some(name.clone());
    }
    if let Some((min, name)) = floor
        && count < min
    {
        count = min;
        by = Some(name.clone());
    }
    (count, by)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schedule(
        name: &str,
        cron: &str,
        zone: &str,
        duration: &str,
        bounds: serde_json::Value,
    ) -> Schedule {
        let mut v = json!({"name": name, "cron": cron, "timeZone": zone, "duration": duration});
        if let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (&mut v, bounds) {
            a.extend(b);
        }
        serde_json::from_value(v).unwrap()
    }

    fn at(utc: &str) -> Timestamp {
        utc.parse().unwrap()
    }

    fn names(open: &[OpenWindow]) -> Vec<&str> {
        open.iter().map(|w| w.name.as_str()).collect()
    }

    #[test]
    fn business_hours_in_paris_follow_the_local_clock_across_dst() {
        let s = [schedule(
            "business",
            "0 8 * * MON-FRI",
            "Europe/Paris",
            "10h",
            json!({"minReplicas": 8}),
        )];
        // Friday 27 March 2026, winter time (UTC+1): 08:00 local is 07:00 UTC.
        assert_eq!(
            names(&open_windows(&s, at("2026-03-27T06:59:00Z")).unwrap()),
            Vec::<&str>::new()
        );
        assert_eq!(
            names(&open_windows(&s, at("2026-03-27T07:00:00Z")).unwrap()),
            ["business"]
        );
        assert_eq!(
            names(&open_windows(&s, at("2026-03-27T16:59:00Z")).unwrap()),
            ["business"]
        );
        assert_eq!(
            names(&open_windows(&s, at("2026-03-27T17:00:00Z")).unwrap()),
            Vec::<&str>::new()
        );
        // Monday 30 March 2026, summer time (UTC+2): 08:00 local is 06:00 UTC.
        assert_eq!(
            names(&open_windows(&s, at("2026-03-30T06:00:00Z")).unwrap()),
            ["business"]
        );
        assert_eq!(
            names(&open_windows(&s, at("2026-03-30T05:59:00Z")).unwrap()),
            Vec::<&str>::new()
        );
        // Saturday: closed.
        assert_eq!(
            names(&open_windows(&s, at("2026-03-28T09:00:00Z")).unwrap()),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn a_window_spanning_midnight_and_the_dst_change_stays_open() {
        // Night window 22:00-06:00 Paris on the night the clocks go forward (29 March 2026).
        let s = [schedule(
            "night",
            "0 22 * * *",
            "Europe/Paris",
            "8h",
            json!({"maxReplicas": 2}),
        )];
        // 28 March 22:00 CET = 21:00 UTC; 8 hours later is 05:00 UTC (07:00 CEST).
        assert_eq!(
            names(&open_windows(&s, at("2026-03-29T04:59:00Z")).unwrap()),
            ["night"]
        );
        assert_eq!(
            names(&open_windows(&s, at("2026-03-29T05:00:00Z")).unwrap()),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn overlapping_windows_resolve_deterministically() {
        let open =
            |desired: Option<i32>, min: Option<i32>, max: Option<i32>, name: &str| OpenWindow {
                name: name.into(),
                opened: at("2026-01-01T00:00:00Z"),
                closes: at("2026-01-02T00:00:00Z"),
                desired,
                min,
                max,
            };
        assert_eq!(apply(&[], 5), (5, None));
        assert_eq!(
            apply(&[open(None, Some(8), None, "peak")], 3),
            (8, Some("peak".into()))
        );
        assert_eq!(apply(&[open(None, Some(8), None, "peak")], 12), (12, None));
        assert_eq!(
            apply(&[open(None, None, Some(2), "night")], 5),
            (2, Some("night".into()))
        );
        // Two floors: the larger wins; a floor above a ceiling wins.
        assert_eq!(
            apply(
                &[
                    open(None, Some(4), None, "a"),
                    open(None, Some(6), None, "b")
                ],
                1
            ),
            (6, Some("b".into()))
        );
        assert_eq!(
            apply(
                &[
                    open(None, Some(6), None, "a"),
                    open(None, None, Some(3), "b")
                ],
                5
            ),
            (6, Some("a".into()))
        );
        // An exact count beats bounds; the largest exact count wins.
        assert_eq!(
            apply(
                &[
                    open(Some(3), None, None, "x"),
                    open(Some(7), None, None, "y"),
                    open(None, Some(9), None, "z")
                ],
                1
            ),
            (7, Some("y".into()))
        );
    }

    #[test]
    fn bad_cron_or_zone_is_reported_with_a_fix() {
        let err = validate(&[schedule(
            "x",
            "0 8 * *",
            "UTC",
            "1h",
            json!({"minReplicas": 1}),
        )])
        .unwrap_err();
        assert!(err.to_string().contains("five-field cron"), "{err}");
        let err = validate(&[schedule(
            "y",
            "0 8 * * *",
            "Mars/Olympus",
            "1h",
            json!({"minReplicas": 1}),
        )])
        .unwrap_err();
        assert!(err.to_string().contains("IANA time zone"), "{err}");
        assert!(
            validate(&[schedule(
                "z",
                "*/15 * * * *",
                "America/New_York",
                "5m",
                json!({"desiredReplicas": 2})
            )])
            .is_ok()
        );
    }
}
