//! Schedules make tasks: every `run_every` seconds, or at the times of a cron expression read
//! in a time zone, between `start_at` and `end_at`, at most `run_times` times.
//!
//! The math here is pure: callers pass `now`. A schedule never fires early, and after a missed
//! window (the server was down) it fires once at the next due time instead of catching up.

use std::str::FromStr;

use chrono::{Duration, TimeZone};
use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::limits::MAX_PRIORITY;
use crate::validation::{ValidationError, check_name, check_range};

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ScheduleTiming {
    /// Once, at `start_at` (or at creation): IronWorker's schedule without `run_every`.
    Once,
    /// Every so many seconds, the first time at `start_at` (or at creation).
    Every { seconds: u32 },
    /// At the times of a five-field cron expression, read in an IANA time zone.
    Cron {
        expression: String,
        timezone: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleStatus {
    /// Will fire again.
    Scheduled,
    /// Reached `run_times` or `end_at`.
    Complete,
    /// A user cancelled it.
    Cancelled,
}

/// A validated schedule definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub code_name: String,
    pub payload: String,
    pub timing: ScheduleTiming,
    pub start_at: Option<Timestamp>,
    pub end_at: Option<Timestamp>,
    pub run_times: Option<u32>,
    pub priority: u8,
    pub timeout_secs: u32,
    pub cluster: String,
    pub label: Option<String>,
    /// Seconds each task it makes waits after the schedule fires before it may run (a task's
    /// `delay`). Absent from specs stored before it existed, which read as 0.
    #[serde(default)]
    pub delay_secs: u32,
    /// The most of its tasks that may be queued or running at once. A fire that finds that
    /// many still unfinished queues nothing: the fire time passes, as a missed one does, and
    /// the schedule fires again at its next time. `None` is no limit.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
}

/// A stored schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub id: String,
    pub project_id: String,
    pub code_id: String,
    pub spec: ScheduleSpec,
    pub status: ScheduleStatus,
    /// When it fires next; `None` once it is complete or cancelled.
    pub next_start: Option<Timestamp>,
    pub last_run_time: Option<Timestamp>,
    pub run_count: u32,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl ScheduleStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleStatus::Scheduled => "scheduled",
            ScheduleStatus::Complete => "complete",
            ScheduleStatus::Cancelled => "cancelled",
        }
    }
}

impl FromStr for ScheduleStatus {
    type Err = ValidationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "scheduled" => Ok(ScheduleStatus::Scheduled),
            "complete" => Ok(ScheduleStatus::Complete),
            "cancelled" => Ok(ScheduleStatus::Cancelled),
            other => Err(ValidationError::new(
                "status",
                format!("unknown schedule status {other:?}"),
            )),
        }
    }
}

impl ScheduleTiming {
    /// The first fire time strictly after `after` (for `Every`, `after + seconds`).
    fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            ScheduleTiming::Once => None,
            ScheduleTiming::Every { seconds } => {
                Some(after + Duration::seconds(i64::from(*seconds)))
            }
            ScheduleTiming::Cron {
                expression,
                timezone,
            } => {
                let cron = croner::Cron::from_str(expression).ok()?;
                let zone: chrono_tz::Tz = timezone.parse().ok()?;
                let local = zone.from_utc_datetime(&after.naive_utc());
                let next = cron.find_next_occurrence(&local, false).ok()?;
                Some(next.with_timezone(&chrono::Utc))
            }
        }
    }
}

impl ScheduleSpec {
    /// Checks the definition. `min_run_every_secs` is IronWorker's 60 s unless configured.
    pub fn validate(&self, min_run_every_secs: u32) -> Result<(), ValidationError> {
        check_name("code_name", &self.code_name)?;
        check_range(
            "priority",
            i64::from(self.priority),
            0,
            i64::from(MAX_PRIORITY),
        )?;
        check_range(
            "timeout",
            i64::from(self.timeout_secs),
            1,
            i64::from(crate::limits::MAX_TIMEOUT_SECS),
        )?;
        check_name("cluster", &self.cluster)?;
        if let Some(label) = &self.label {
            check_name("label", label)?;
        }
        check_range(
            "delay",
            i64::from(self.delay_secs),
            0,
            i64::from(crate::limits::MAX_DELAY_SECS),
        )?;
        if let Some(max) = self.max_concurrency {
            check_range("max_concurrency", i64::from(max), 1, 100_000)?;
        }
        match &self.timing {
            ScheduleTiming::Once => {}
            ScheduleTiming::Every { seconds } => {
                if *seconds < min_run_every_secs {
                    return Err(ValidationError::new(
                        "run_every",
                        format!("must be at least {min_run_every_secs} seconds, got {seconds}"),
                    ));
                }
            }
            ScheduleTiming::Cron {
                expression,
                timezone,
            } => {
                if expression.len() > crate::limits::MAX_CRON_LEN {
                    return Err(ValidationError::new(
                        "cron",
                        format!(
                            "is {} bytes, more than the limit of {} bytes",
                            expression.len(),
                            crate::limits::MAX_CRON_LEN
                        ),
                    ));
                }
                if expression.split_whitespace().count() != 5 {
                    return Err(ValidationError::new(
                        "cron",
                        format!(
                            "{expression:?} must have five fields: minute hour day-of-month month day-of-week"
                        ),
                    ));
                }
                let cron = croner::Cron::from_str(expression).map_err(|error| {
                    ValidationError::new(
                        "cron",
                        format!("{expression:?} is not a valid cron expression: {error}"),
                    )
                })?;
                timezone.parse::<chrono_tz::Tz>().map_err(|_| {
                    ValidationError::new(
                        "timezone",
                        format!("{timezone:?} is not an IANA time zone such as \"Europe/Berlin\" or \"UTC\""),
                    )
                })?;
                // An expression of dates that do not exist (`0 0 30 2 *`) parses but never
                // fires. Every calendar date recurs within 400 years (the Gregorian cycle), so
                // a search from a fixed start that finds nothing means never; croner gives up
                // at the year 5000.
                let reference = chrono::Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0);
                if let Some(reference) = reference.single()
                    && cron.find_next_occurrence(&reference, true).is_err()
                {
                    return Err(ValidationError::new(
                        "cron",
                        format!("{expression:?} never fires: no date matches it"),
                    ));
                }
            }
        }
        if let (Some(start), Some(end)) = (self.start_at, self.end_at)
            && end <= start
        {
            return Err(ValidationError::new("end_at", "must be after start_at"));
        }
        if self.run_times == Some(0) {
            return Err(ValidationError::new(
                "run_times",
                "must be at least 1 when given",
            ));
        }
        Ok(())
    }

    /// The task one fire of schedule `schedule_id` queues: its code (latest revision),
    /// payload, priority, timeout, delay, label and cluster.
    pub fn task(&self, schedule_id: &str) -> crate::NewTask {
        crate::NewTask {
            code_name: self.code_name.clone(),
            payload: self.payload.clone(),
            priority: self.priority,
            timeout_secs: self.timeout_secs,
            delay_secs: self.delay_secs,
            label: self.label.clone(),
            cluster: self.cluster.clone(),
            retry_count: 0,
            original_task_id: None,
            schedule_id: Some(schedule_id.to_owned()),
            code_rev: None,
        }
    }

    /// When a new schedule fires first, seen at `now`.
    pub fn first_fire(&self, now: Timestamp) -> Option<Timestamp> {
        let earliest = self.start_at.map_or(now, |start| start.max(now));
        let first = match &self.timing {
            ScheduleTiming::Once | ScheduleTiming::Every { .. } => Some(earliest),
            // A cron time equal to `earliest` counts: step back one second and look after it.
            // Cron times are whole seconds, so with `earliest` inside a second that finds the
            // time just before it: then the one after is the first.
            ScheduleTiming::Cron { .. } => self
                .timing
                .next_after(earliest - Duration::seconds(1))
                .and_then(|time| {
                    if time < earliest {
                        self.timing.next_after(time)
                    } else {
                        Some(time)
                    }
                }),
        }?;
        self.within_end(first)
    }

    /// The fire time after one that fired at `fired_at`, seen at `now`. Fire times that were
    /// missed while nobody was looking are skipped, so a long outage yields no burst.
    pub fn next_fire(
        &self,
        fired_at: Timestamp,
        run_count: u32,
        now: Timestamp,
    ) -> Option<Timestamp> {
        if self.run_times.is_some_and(|limit| run_count >= limit) {
            return None;
        }
        let next = match &self.timing {
            ScheduleTiming::Once => return None,
            ScheduleTiming::Every { seconds } => {
                let step = i64::from((*seconds).max(1));
                let mut next = fired_at + Duration::seconds(step);
                if next < now {
                    // Whole steps to reach `now`, rounded up: counted in microseconds, since
                    // `now` has a fraction of a second that whole seconds would drop.
                    let behind = (now - next).num_microseconds().unwrap_or(i64::MAX);
                    let step_micros = step * 1_000_000;
                    let steps = behind.div_euclid(step_micros)
                        + i64::from(behind.rem_euclid(step_micros) != 0);
                    next += Duration::seconds(steps.saturating_mul(step));
                }
                next
            }
            ScheduleTiming::Cron { .. } => {
                // A cron time exactly at `now` still counts; one before it was missed and is
                // skipped. Cron works in whole seconds while `now` need not, so a time found
                // in the last second before `now` is stepped over too.
                let mut next = self
                    .timing
                    .next_after(fired_at.max(now - Duration::seconds(1)))?;
                while next < now {
                    next = self.timing.next_after(next)?;
                }
                next
            }
        };
        self.within_end(next)
    }

    fn within_end(&self, at: Timestamp) -> Option<Timestamp> {
        match self.end_at {
            Some(end) if at > end => None,
            _ => Some(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn spec(timing: ScheduleTiming) -> ScheduleSpec {
        ScheduleSpec {
            code_name: "hello".into(),
            payload: String::new(),
            timing,
            start_at: None,
            end_at: None,
            run_times: None,
            priority: 0,
            timeout_secs: 60,
            cluster: "default".into(),
            label: None,
            delay_secs: 0,
            max_concurrency: None,
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn run_every_skips_missed_windows() {
        let schedule = spec(ScheduleTiming::Every { seconds: 60 });
        let fired = at("2026-01-01T00:00:00Z");
        assert_eq!(
            schedule.next_fire(fired, 1, at("2026-01-01T00:00:30Z")),
            Some(at("2026-01-01T00:01:00Z"))
        );
        // Down for an hour: the next fire is the next slot after now, not sixty of them.
        assert_eq!(
            schedule.next_fire(fired, 1, at("2026-01-01T01:00:30Z")),
            Some(at("2026-01-01T01:01:00Z"))
        );
    }

    #[test]
    fn cron_in_a_time_zone() {
        let schedule = spec(ScheduleTiming::Cron {
            expression: "30 9 * * *".into(),
            timezone: "Europe/Berlin".into(),
        });
        assert!(schedule.validate(60).is_ok());
        // 09:30 in Berlin in winter is 08:30 UTC.
        assert_eq!(
            schedule.first_fire(at("2026-01-10T07:00:00Z")),
            Some(at("2026-01-10T08:30:00Z"))
        );
    }

    #[test]
    fn run_times_and_end_at_stop_a_schedule() {
        let mut schedule = spec(ScheduleTiming::Every { seconds: 60 });
        schedule.run_times = Some(2);
        let now = Utc::now();
        assert_eq!(schedule.next_fire(now, 2, now), None);
        schedule.run_times = None;
        schedule.end_at = Some(now + Duration::seconds(30));
        assert_eq!(schedule.next_fire(now, 1, now), None);
    }

    #[test]
    fn a_cron_that_never_fires_is_refused_as_such() {
        let never = spec(ScheduleTiming::Cron {
            expression: "0 0 30 2 *".into(),
            timezone: "UTC".into(),
        });
        let error = never.validate(60).unwrap_err();
        assert_eq!(error.field, "cron");
        assert!(error.message.contains("never fires"), "{error}");
        // Once in four years is not never.
        let leap_day = spec(ScheduleTiming::Cron {
            expression: "0 0 29 2 *".into(),
            timezone: "Europe/Berlin".into(),
        });
        assert!(leap_day.validate(60).is_ok());
    }

    #[test]
    fn an_overlong_cron_expression_is_refused_before_it_is_parsed() {
        let long = spec(ScheduleTiming::Cron {
            expression: format!("0 0 * * {}", "1,".repeat(400_000)),
            timezone: "UTC".into(),
        });
        let error = long.validate(60).unwrap_err();
        assert_eq!(error.field, "cron");
        assert!(error.message.contains("limit of 256 bytes"), "{error}");
    }

    #[test]
    fn validation_errors() {
        assert_eq!(
            spec(ScheduleTiming::Every { seconds: 10 })
                .validate(60)
                .unwrap_err()
                .field,
            "run_every"
        );
        let bad_cron = spec(ScheduleTiming::Cron {
            expression: "61 * * * *".into(),
            timezone: "UTC".into(),
        });
        assert_eq!(bad_cron.validate(60).unwrap_err().field, "cron");
        let bad_zone = spec(ScheduleTiming::Cron {
            expression: "* * * * *".into(),
            timezone: "Mars/Olympus".into(),
        });
        assert_eq!(bad_zone.validate(60).unwrap_err().field, "timezone");
    }

    /// Every fire of "30 2 * * *" in Berlin from `from` on, each one fired the moment it was
    /// due, until `until`.
    fn berlin_half_past_two_fires(from: &str, until: &str) -> Vec<Timestamp> {
        let schedule = spec(ScheduleTiming::Cron {
            expression: "30 2 * * *".into(),
            timezone: "Europe/Berlin".into(),
        });
        let until = at(until);
        let mut fires = Vec::new();
        let mut next = schedule.first_fire(at(from));
        let mut run_count = 0;
        while let Some(fired_at) = next.filter(|fire| *fire < until) {
            fires.push(fired_at);
            run_count += 1;
            next = schedule.next_fire(fired_at, run_count, fired_at);
        }
        fires
    }

    #[test]
    fn cron_on_the_spring_forward_day_fires_once_after_the_gap() {
        // 2026-03-29 02:00 CET becomes 03:00 CEST: 02:30 does not exist that day. The job
        // runs once, right after the gap (03:00 CEST = 01:00 UTC), as Vixie cron does.
        let fires = berlin_half_past_two_fires("2026-03-27T12:00:00Z", "2026-03-31T12:00:00Z");
        assert_eq!(
            fires,
            vec![
                at("2026-03-28T01:30:00Z"),
                at("2026-03-29T01:00:00Z"),
                at("2026-03-30T00:30:00Z"),
                at("2026-03-31T00:30:00Z"),
            ]
        );
    }

    #[test]
    fn cron_on_the_fall_back_day_fires_once_in_the_repeated_hour() {
        // 2026-10-25 03:00 CEST becomes 02:00 CET: 02:30 happens twice, the job runs once.
        let fires = berlin_half_past_two_fires("2026-10-23T12:00:00Z", "2026-10-27T12:00:00Z");
        assert_eq!(
            fires,
            vec![
                at("2026-10-24T00:30:00Z"),
                at("2026-10-25T00:30:00Z"),
                at("2026-10-26T01:30:00Z"),
                at("2026-10-27T01:30:00Z"),
            ]
        );
    }

    #[test]
    fn a_cron_time_missed_by_less_than_a_second_is_not_fired_late() {
        let schedule = spec(ScheduleTiming::Cron {
            expression: "* * * * *".into(),
            timezone: "UTC".into(),
        });
        let fired = at("2026-01-01T00:00:00Z");
        assert_eq!(
            schedule.next_fire(fired, 1, at("2026-01-01T00:01:00.400Z")),
            Some(at("2026-01-01T00:02:00Z"))
        );
        assert_eq!(
            schedule.next_fire(fired, 1, at("2026-01-01T00:01:00Z")),
            Some(at("2026-01-01T00:01:00Z"))
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        const ZONES: &[&str] = &[
            "UTC",
            "Europe/Berlin",
            "America/New_York",
            "Australia/Sydney",
            "Asia/Kolkata",
            "America/Santiago",
        ];

        /// The 2026 daylight-saving changes of the zones above, as UTC instants.
        const DST_CHANGES: &[&str] = &[
            "2026-03-29T01:00:00Z",
            "2026-10-25T01:00:00Z",
            "2026-03-08T07:00:00Z",
            "2026-11-01T06:00:00Z",
            "2026-04-04T16:00:00Z",
            "2026-10-03T16:00:00Z",
            "2026-04-05T03:00:00Z",
            "2026-09-06T04:00:00Z",
        ];

        fn cron_expression() -> impl Strategy<Value = String> {
            let minute = prop::sample::select(vec!["*", "0", "30", "*/5", "*/15", "0,30", "5-10"]);
            let hour = prop::sample::select(vec!["*", "0", "2", "3", "0-3", "*/6", "9", "1-2"]);
            let day = prop::sample::select(vec!["*", "1", "15", "28"]);
            let month = prop::sample::select(vec!["*", "1-6", "*/3", "3,10,11"]);
            let weekday = prop::sample::select(vec!["*", "1-5", "0", "6"]);
            (minute, hour, day, month, weekday).prop_map(|(minute, hour, day, month, weekday)| {
                format!("{minute} {hour} {day} {month} {weekday}")
            })
        }

        fn timing() -> impl Strategy<Value = ScheduleTiming> {
            prop_oneof![
                (1u32..200_000).prop_map(|seconds| ScheduleTiming::Every { seconds }),
                (cron_expression(), prop::sample::select(ZONES)).prop_map(
                    |(expression, timezone)| ScheduleTiming::Cron {
                        expression,
                        timezone: timezone.to_owned(),
                    }
                ),
            ]
        }

        /// Instants in 2025–2027, half of them within three days of a DST change, with
        /// milliseconds, since `now` is never a whole second in real life.
        fn instant() -> impl Strategy<Value = Timestamp> {
            let anywhere = (1_735_689_600_000i64..1_830_297_600_000).prop_map(|millis| {
                chrono::DateTime::from_timestamp_millis(millis).unwrap_or_default()
            });
            let near_a_change = (
                prop::sample::select(DST_CHANGES),
                -3 * 86_400_000i64..3 * 86_400_000,
            )
                .prop_map(|(change, offset)| at(change) + Duration::milliseconds(offset));
            prop_oneof![anywhere, near_a_change]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn next_fire_is_never_early_nor_at_or_before_the_last_fire(
                timing in timing(),
                fired_at in instant(),
                late_millis in 0i64..3 * 86_400_000,
            ) {
                let schedule = spec(timing);
                prop_assert!(schedule.validate(1).is_ok());
                let now = fired_at + Duration::milliseconds(late_millis);
                if let Some(next) = schedule.next_fire(fired_at, 1, now) {
                    prop_assert!(next >= now, "next {next} before now {now}");
                    prop_assert!(next > fired_at, "next {next} not after the fire {fired_at}");
                }
            }

            #[test]
            fn a_chain_of_fires_strictly_increases_and_is_never_early(
                timing in timing(),
                start in instant(),
                lags in prop::collection::vec(0i64..5_000, 1..40),
            ) {
                let schedule = spec(timing);
                let mut now = start;
                let mut previous: Option<Timestamp> = None;
                let mut next = schedule.first_fire(now);
                prop_assert!(next.is_some_and(|first| first >= start));
                for (run_count, lag) in (1u32..).zip(lags) {
                    let Some(fired_at) = next else { break };
                    if let Some(previous) = previous {
                        prop_assert!(fired_at > previous, "{fired_at} after {previous}");
                    }
                    // The scheduler fires a little after the time, never before it.
                    prop_assert!(fired_at >= now);
                    now = fired_at + Duration::milliseconds(lag);
                    next = schedule.next_fire(fired_at, run_count, now);
                    if let Some(next) = next {
                        prop_assert!(next >= now, "next {next} before now {now}");
                    }
                    previous = Some(fired_at);
                }
            }

            #[test]
            fn fixed_time_cron_fires_once_per_local_day_across_dst(
                minute in 0u32..60,
                hour in 0u32..24,
                timezone in prop::sample::select(ZONES),
                change in prop::sample::select(DST_CHANGES),
            ) {
                let schedule = spec(ScheduleTiming::Cron {
                    expression: format!("{minute} {hour} * * *"),
                    timezone: timezone.to_owned(),
                });
                let zone: chrono_tz::Tz = timezone.parse().unwrap();
                let start = at(change) - Duration::days(3);
                let mut fires = Vec::new();
                let mut next = schedule.first_fire(start);
                for run_count in 1..=6 {
                    let Some(fired_at) = next else { break };
                    fires.push(fired_at);
                    next = schedule.next_fire(fired_at, run_count, fired_at);
                }
                prop_assert_eq!(fires.len(), 6);
                let days: Vec<_> = fires
                    .iter()
                    .map(|fire| zone.from_utc_datetime(&fire.naive_utc()).date_naive())
                    .collect();
                for pair in days.windows(2) {
                    prop_assert_eq!(pair[1], pair[0].succ_opt().unwrap(), "{:?}", fires);
                }
            }
        }
    }
}
