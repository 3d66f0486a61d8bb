//! Conversions between the wire types of `stevedore-api-types` and the domain: requests are
//! parsed and validated into domain values here, domain values are rendered into responses.

use chrono::{SecondsFormat, TimeZone, Utc};
use serde_json::Value;
use stevedore_api_types::v2;
use stevedore_model::TaskAttempt;
use stevedore_model::code::{self, CodeKind};
use stevedore_model::limits::{self, DEFAULT_RETRIES_DELAY_SECS};
use stevedore_model::task::DEFAULT_CLUSTER;
use stevedore_model::{
    CodeRevision, CodeSpec, Limits, NewTask, RetriesBackoff, Schedule, ScheduleSpec,
    ScheduleTiming, Task, TaskStatus, Timestamp, ValidationError,
};

use crate::config::ServerConfig;
use crate::error::ApiError;

/// RFC 3339 in UTC with milliseconds, e.g. `2026-01-01T10:00:00.000Z`.
pub fn format_time(time: Timestamp) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Counts by status as `codes/{id}/stats` answers them (IronWorker's `killed` stays 0).
pub fn code_stats(counts: stevedore_store::CodeStats) -> v2::CodeStats {
    let mut stats = v2::CodeStats::default();
    for (status, count) in counts.by_status {
        let slot = match status {
            TaskStatus::Queued => &mut stats.queued,
            TaskStatus::Preparing => &mut stats.preparing,
            TaskStatus::Running => &mut stats.running,
            TaskStatus::Complete => &mut stats.complete,
            TaskStatus::Error => &mut stats.error,
            TaskStatus::Timeout => &mut stats.timeout,
            TaskStatus::Cancelled => &mut stats.cancelled,
        };
        *slot += count;
    }
    stats
}

/// A time given as an RFC 3339 string or as seconds since the epoch.
pub fn parse_time(field: &str, value: &Value) -> Result<Timestamp, ValidationError> {
    let bad = || {
        ValidationError::new(
            field,
            format!(
                "{value} is not a time: give RFC 3339 (\"2026-01-01T10:00:00Z\") or seconds since the epoch"
            ),
        )
    };
    match value {
        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text.trim())
            .map(|time| time.with_timezone(&Utc))
            .map_err(|_| bad()),
        Value::Number(number) => number
            .as_i64()
            .and_then(|seconds| Utc.timestamp_opt(seconds, 0).single())
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// The payload as the task will see it: strings verbatim, other JSON as its text.
pub fn payload_text(payload: Option<Value>) -> String {
    match payload {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text,
        Some(other) => other.to_string(),
    }
}

/// The payload text, refused with 413 past the configured limit.
fn checked_payload(payload: Option<Value>, config: &ServerConfig) -> Result<String, ApiError> {
    let payload = payload_text(payload);
    if payload.len() > config.max_payload_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "payload is {} bytes, more than the limit of {} bytes",
            payload.len(),
            config.max_payload_bytes
        )));
    }
    Ok(payload)
}

/// An optional integer in `min..=max`, `default` when absent.
pub fn bounded(
    field: &str,
    value: Option<i64>,
    default: u32,
    min: i64,
    max: u32,
) -> Result<u32, ValidationError> {
    let Some(value) = value else {
        return Ok(default);
    };
    stevedore_model::validation::check_range(field, value, min, i64::from(max))?;
    u32::try_from(value).map_err(|_| ValidationError::new(field, "out of range"))
}

/// A priority, `default` when absent or negative: IronWorker read a negative priority as "the
/// code's default", and its `iron` CLI sends -3 (a task's or schedule's `priority`) or -1000 (a
/// code's `default_priority`) when none was given. Above the highest priority is a 400.
fn priority(field: &str, value: Option<i64>, default: u8) -> Result<u8, ValidationError> {
    let value = value.filter(|value| *value >= 0);
    let priority = bounded(
        field,
        value,
        u32::from(default),
        0,
        u32::from(limits::MAX_PRIORITY),
    )?;
    u8::try_from(priority).map_err(|_| ValidationError::new(field, "out of range"))
}

/// A task's or schedule's timeout, `default` when absent or 0: IronWorker's `iron` CLI and Go
/// client send 0 for "no timeout given" ("0 = the maximum allowed", and the code's own
/// timeout is the most a task of it gets here).
fn task_timeout(value: Option<i64>, default: u32) -> Result<u32, ValidationError> {
    bounded(
        "timeout",
        value.filter(|value| *value != 0),
        default,
        1,
        limits::MAX_TIMEOUT_SECS,
    )
}

/// A `max_concurrency` as IronWorker's clients send it: absent, 0 or -1 mean no limit.
fn concurrency_limit(value: Option<i64>) -> Result<Option<u32>, ValidationError> {
    match value {
        None | Some(0) | Some(-1) => Ok(None),
        Some(value) if value > 0 => u32::try_from(value)
            .map(Some)
            .map_err(|_| ValidationError::new("max_concurrency", "too large")),
        Some(value) => Err(ValidationError::new(
            "max_concurrency",
            format!("must be a positive number, or -1 for no limit; got {value}"),
        )),
    }
}

/// What a task or schedule takes from its code when the request leaves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeDefaults {
    pub priority: u8,
    pub timeout_secs: u32,
}

impl Default for CodeDefaults {
    fn default() -> Self {
        Self {
            priority: 0,
            timeout_secs: limits::DEFAULT_TIMEOUT_SECS,
        }
    }
}

/// Turns a task request into a validated `NewTask`; what it leaves out comes from its code.
pub fn new_task(
    request: v2::TaskCreate,
    defaults: CodeDefaults,
    config: &ServerConfig,
) -> Result<NewTask, ApiError> {
    let code_name = request
        .code_name
        .ok_or_else(|| ValidationError::new("code_name", "is required"))?;
    let payload = checked_payload(request.payload, config)?;
    let task = NewTask {
        code_name,
        payload,
        priority: priority("priority", request.priority, defaults.priority)?,
        timeout_secs: task_timeout(request.timeout, defaults.timeout_secs)?,
        delay_secs: bounded("delay", request.delay, 0, 0, limits::MAX_DELAY_SECS)?,
        label: request.label.filter(|label| !label.is_empty()),
        cluster: request
            .cluster
            .filter(|cluster| !cluster.is_empty())
            .unwrap_or_else(|| DEFAULT_CLUSTER.to_owned()),
        retry_count: 0,
        original_task_id: None,
        schedule_id: None,
        code_rev: None,
    };
    task.validate(config.max_payload_bytes)?;
    Ok(task)
}

/// Turns a code upload into a validated `CodeSpec`. `has_package` says whether a zip came
/// with it.
pub fn code_spec(
    upload: v2::CodeUpload,
    has_package: bool,
    config: &ServerConfig,
) -> Result<CodeSpec, ApiError> {
    let name = upload
        .name
        .ok_or_else(|| ValidationError::new("name", "is required"))?;
    if let Some(host) = upload.host.as_deref().filter(|host| !host.is_empty()) {
        return Err(ApiError::BadRequest(format!(
            "host: stevedore runs tasks, it hosts no services; leave out {host:?}"
        )));
    }
    let given = |value: Option<String>| value.filter(|text| !text.trim().is_empty());
    let runtime = given(upload.runtime).filter(|runtime| runtime != "image");
    let stack = given(upload.stack);
    let kind = match (
        upload.image.filter(|image| !image.is_empty()),
        runtime,
        stack,
    ) {
        (Some(image), _, _) => CodeKind::Image {
            image,
            command: upload.command.filter(|command| !command.is_empty()),
        },
        (None, runtime, stack) if runtime.is_some() || stack.is_some() => {
            let resolved = config
                .stacks
                .resolve(runtime.as_deref(), stack.as_deref())
                .map_err(|error| ApiError::BadRequest(error.to_string()))?;
            let runtime = resolved.runtime.name().to_owned();
            if !has_package {
                return Err(ApiError::BadRequest(format!(
                    "file: a code with runtime {runtime:?} needs a zip package in the multipart part `file`"
                )));
            }
            let file_name = upload.file_name.ok_or_else(|| {
                ValidationError::new(
                    "file_name",
                    "is required with a runtime: name the file in the zip to run",
                )
            })?;
            CodeKind::Runtime {
                runtime,
                file_name,
                stack: Some(resolved.stack.name.clone()),
            }
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give either `image` (a Docker image) or `runtime` with `file_name` and a zip package".into(),
            ));
        }
    };
    let max_concurrency = concurrency_limit(upload.max_concurrency)?;
    let config_text = match upload.config {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text),
        Some(other) => Some(other.to_string()),
    };
    let spec = CodeSpec {
        name,
        kind,
        env_vars: upload.env_vars.unwrap_or_default(),
        config: config_text,
        max_concurrency,
        retries: bounded("retries", upload.retries, 0, 0, limits::MAX_RETRIES)?,
        retries_delay_secs: bounded(
            "retries_delay",
            upload.retries_delay,
            DEFAULT_RETRIES_DELAY_SECS,
            0,
            limits::MAX_RETRIES_DELAY_SECS,
        )?,
        retries_backoff: upload
            .retries_backoff
            .as_deref()
            .map_or(Ok(RetriesBackoff::Fixed), str::parse)?,
        default_priority: priority("default_priority", upload.default_priority, 0)?,
        limits: Limits {
            timeout_secs: bounded(
                "timeout",
                upload.timeout,
                limits::DEFAULT_TIMEOUT_SECS,
                1,
                limits::MAX_TIMEOUT_SECS,
            )?,
            memory_mib: bounded(
                "memory",
                upload.memory,
                limits::DEFAULT_MEMORY_MIB,
                i64::from(limits::MIN_MEMORY_MIB),
                limits::MAX_MEMORY_MIB,
            )?,
            cpus: upload.cpus,
        },
        network: upload
            .network
            .unwrap_or_else(|| code::DEFAULT_NETWORK.to_owned()),
    };
    spec.validate()?;
    code::check_network(&spec.network, &config.named_networks)?;
    Ok(spec)
}

/// Whether a code upload names neither an image, a runtime nor a package: IronWorker then
/// changes the options of the code of that name and keeps what it runs.
pub fn is_options_update(upload: &v2::CodeUpload, has_package: bool) -> bool {
    let given = |value: &Option<String>| value.as_deref().is_some_and(|text| !text.is_empty());
    !has_package && !given(&upload.image) && !given(&upload.runtime) && !given(&upload.stack)
}

/// An options update over `latest`: every field the upload gives wins, every other one keeps
/// the latest revision's value. What runs (the image, or the runtime and its entry point)
/// stays; a new `file_name` needs a new package.
pub fn options_over(upload: v2::CodeUpload, latest: &CodeSpec) -> Result<v2::CodeUpload, ApiError> {
    let (runtime, stack, file_name, image, command) = match &latest.kind {
        CodeKind::Image { image, command } => {
            (None, None, None, Some(image.clone()), command.clone())
        }
        CodeKind::Runtime {
            runtime,
            file_name,
            stack,
        } => (
            Some(runtime.clone()),
            stack.clone(),
            Some(file_name.clone()),
            None,
            None,
        ),
    };
    if let (Some(given), Some(current)) = (&upload.file_name, &file_name)
        && given != current
    {
        return Err(ApiError::BadRequest(format!(
            "file_name: changing the entry point from {current:?} to {given:?} needs a new zip package in the multipart part `file`"
        )));
    }
    Ok(v2::CodeUpload {
        name: upload.name,
        runtime,
        stack,
        file_name,
        image,
        command: upload.command.or(command),
        env_vars: upload.env_vars.or_else(|| Some(latest.env_vars.clone())),
        config: upload
            .config
            .or_else(|| latest.config.clone().map(Value::String)),
        max_concurrency: upload
            .max_concurrency
            .or(Some(latest.max_concurrency.map_or(-1, i64::from))),
        retries: upload.retries.or(Some(i64::from(latest.retries))),
        retries_delay: upload
            .retries_delay
            .or(Some(i64::from(latest.retries_delay_secs))),
        retries_backoff: upload
            .retries_backoff
            .or_else(|| Some(latest.retries_backoff.to_string())),
        // A negative default priority is "not given" (the `iron` CLI sends -1000): keep it.
        default_priority: upload
            .default_priority
            .filter(|priority| *priority >= 0)
            .or(Some(i64::from(latest.default_priority))),
        timeout: upload
            .timeout
            .or(Some(i64::from(latest.limits.timeout_secs))),
        memory: upload.memory.or(Some(i64::from(latest.limits.memory_mib))),
        cpus: upload.cpus.or(latest.limits.cpus),
        network: upload.network.or_else(|| Some(latest.network.clone())),
        content_type: None,
        host: upload.host,
    })
}

/// A schedule update over the schedule's `current` spec: every field the update gives wins,
/// every other one keeps the current value. Its code stays: naming another is a 400.
pub fn schedule_over(
    update: v2::ScheduleCreate,
    current: &ScheduleSpec,
) -> Result<v2::ScheduleCreate, ApiError> {
    if let Some(name) = update.code_name.as_deref()
        && name != current.code_name
    {
        return Err(ApiError::BadRequest(format!(
            "code_name: a schedule's code cannot change (it runs {:?}); cancel it and create another for {name:?}",
            current.code_name
        )));
    }
    let timing_given = update.run_every.is_some() || update.cron.is_some();
    let (run_every, cron, timezone) = if timing_given {
        (update.run_every, update.cron, update.timezone)
    } else {
        match &current.timing {
            ScheduleTiming::Once => (None, None, None),
            ScheduleTiming::Every { seconds } => (Some(i64::from(*seconds)), None, None),
            ScheduleTiming::Cron {
                expression,
                timezone,
            } => (
                None,
                Some(expression.clone()),
                update.timezone.or_else(|| Some(timezone.clone())),
            ),
        }
    };
    let time = |time: Option<Timestamp>| time.map(|time| Value::String(format_time(time)));
    Ok(v2::ScheduleCreate {
        code_name: Some(current.code_name.clone()),
        payload: update
            .payload
            .or_else(|| Some(Value::String(current.payload.clone()))),
        run_every,
        cron,
        timezone,
        start_at: update.start_at.or_else(|| time(current.start_at)),
        end_at: update.end_at.or_else(|| time(current.end_at)),
        run_times: update
            .run_times
            .or_else(|| current.run_times.map(i64::from)),
        priority: update.priority.or(Some(i64::from(current.priority))),
        timeout: update.timeout.or(Some(i64::from(current.timeout_secs))),
        cluster: update.cluster.or_else(|| Some(current.cluster.clone())),
        label: update.label.or_else(|| current.label.clone()),
        delay: update.delay.or(Some(i64::from(current.delay_secs))),
        max_concurrency: update
            .max_concurrency
            .or_else(|| current.max_concurrency.map(i64::from)),
        name: None,
        sync: None,
    })
}

/// Turns a schedule request into a validated `ScheduleSpec`.
pub fn schedule_spec(
    request: v2::ScheduleCreate,
    defaults: CodeDefaults,
    config: &ServerConfig,
) -> Result<ScheduleSpec, ApiError> {
    let code_name = request
        .code_name
        .ok_or_else(|| ValidationError::new("code_name", "is required"))?;
    let payload = checked_payload(request.payload, config)?;
    let timing = match (request.run_every, request.cron) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give either run_every or cron, not both".into(),
            ));
        }
        (Some(seconds), None) => ScheduleTiming::Every {
            seconds: bounded("run_every", Some(seconds), 0, 1, u32::MAX)?,
        },
        (None, Some(expression)) => ScheduleTiming::Cron {
            expression,
            timezone: request.timezone.unwrap_or_else(|| "UTC".to_owned()),
        },
        // IronWorker runs a schedule without run_every once, at start_at.
        (None, None) => ScheduleTiming::Once,
    };
    // The `iron` CLI sends `run_times: 0` when none was given.
    let run_times = match request.run_times {
        None | Some(0) => None,
        Some(times) => Some(bounded("run_times", Some(times), 1, 1, u32::MAX)?),
    };
    let once = timing == ScheduleTiming::Once;
    let spec = ScheduleSpec {
        code_name,
        payload,
        timing,
        start_at: request
            .start_at
            .map(|value| parse_time("start_at", &value))
            .transpose()?,
        end_at: request
            .end_at
            .map(|value| parse_time("end_at", &value))
            .transpose()?,
        run_times: if once { Some(1) } else { run_times },
        priority: priority("priority", request.priority, defaults.priority)?,
        timeout_secs: task_timeout(request.timeout, defaults.timeout_secs)?,
        cluster: request
            .cluster
            .filter(|cluster| !cluster.is_empty())
            .unwrap_or_else(|| DEFAULT_CLUSTER.to_owned()),
        label: request.label.filter(|label| !label.is_empty()),
        delay_secs: bounded("delay", request.delay, 0, 0, limits::MAX_DELAY_SECS)?,
        max_concurrency: concurrency_limit(request.max_concurrency)?,
    };
    spec.validate(config.min_run_every_secs)?;
    Ok(spec)
}

pub fn task_info(task: &Task) -> v2::TaskInfo {
    v2::TaskInfo {
        id: task.id.clone(),
        project_id: task.project_id.clone(),
        code_id: task.code_id.clone(),
        code_history_id: format!("{}/{}", task.code_id, task.code_rev),
        code_name: task.code_name.clone(),
        code_rev: task.code_rev.to_string(),
        status: task.status.as_str().to_owned(),
        priority: task.priority,
        payload: task.payload.clone(),
        label: task.label.clone(),
        cluster: task.cluster.clone(),
        timeout: task.timeout_secs,
        delay: task.delay_secs,
        created_at: format_time(task.created_at),
        updated_at: format_time(task.updated_at),
        start_time: task.start_time.map(format_time),
        end_time: task.end_time.map(format_time),
        // The engine stamps a container's start after its process is running, so one that
        // exits at once can end "before" it started: that ran for no time, not a negative one.
        duration: match (task.start_time, task.end_time) {
            (Some(start), Some(end)) => Some((end - start).num_milliseconds().max(0)),
            _ => None,
        },
        run_times: u32::from(task.start_time.is_some()),
        percent: task.percent,
        msg: task.msg.clone(),
        retry_count: task.retry_count,
        original_task_id: task.original_task_id.clone(),
        schedule_id: task.schedule_id.clone(),
        exit_code: task.exit_code,
        log_size: task.log_size,
        infra_attempts: task.infra_attempts,
        peak_memory_bytes: task.peak_memory_bytes,
        cpu_time_ms: task.cpu_time_ms,
        // A task that printed nothing lost nothing: its log still reads as empty.
        log_removed_at: task
            .log_removed_at
            .filter(|_| task.log_size > 0)
            .map(format_time),
        payload_removed_at: task.payload_removed_at.map(format_time),
        attempts: None,
    }
}

pub fn task_attempt_info(attempt: &TaskAttempt) -> v2::TaskAttemptInfo {
    v2::TaskAttemptInfo {
        attempt: attempt.attempt,
        runner_id: attempt.runner_id.clone(),
        leased_at: format_time(attempt.leased_at),
        started_at: attempt.started_at.map(format_time),
        ended_at: attempt.ended_at.map(format_time),
        ending: attempt.ending.clone(),
        exit_code: attempt.exit_code,
        reason: attempt.reason.clone(),
    }
}

pub fn code_info(code: &CodeRevision) -> v2::CodeInfo {
    let spec = &code.spec;
    let (runtime, stack, file_name, image, command) = match &spec.kind {
        CodeKind::Image { image, command } => (
            Some("image".to_owned()),
            None,
            None,
            Some(image.clone()),
            command.clone(),
        ),
        CodeKind::Runtime {
            runtime,
            file_name,
            stack,
        } => (
            Some(runtime.clone()),
            stack.clone(),
            Some(file_name.clone()),
            None,
            None,
        ),
    };
    v2::CodeInfo {
        id: code.id.clone(),
        code_id: code.id.clone(),
        project_id: code.project_id.clone(),
        name: spec.name.clone(),
        rev: code.rev,
        runtime,
        stack,
        file_name,
        image,
        command,
        latest_checksum: code.package_sha256.clone(),
        package_size: code.package_size,
        latest_history_id: format!("{}/{}", code.id, code.rev),
        latest_change: format_time(code.updated_at),
        env_vars: spec.env_vars.clone(),
        config: spec.config.clone(),
        max_concurrency: if code.paused {
            Some(-1)
        } else {
            spec.max_concurrency.map(i64::from)
        },
        concurrency_limit: spec.max_concurrency,
        retries: spec.retries,
        retries_delay: spec.retries_delay_secs,
        retries_backoff: spec.retries_backoff.to_string(),
        default_priority: spec.default_priority,
        timeout: spec.limits.timeout_secs,
        memory: spec.limits.memory_mib,
        cpus: spec.limits.cpus,
        network: spec.network.clone(),
        paused: code.paused,
        created_at: format_time(code.created_at),
        updated_at: format_time(code.updated_at),
    }
}

/// A revision as IronWorker lists them: its own id, and the code's as `code_id`.
pub fn revision_info(code: &CodeRevision) -> v2::CodeInfo {
    let mut info = code_info(code);
    info.id = info.latest_history_id.clone();
    info
}

pub fn schedule_info(schedule: &Schedule) -> v2::ScheduleInfo {
    let spec = &schedule.spec;
    let (run_every, cron, timezone) = match &spec.timing {
        ScheduleTiming::Once => (None, None, None),
        ScheduleTiming::Every { seconds } => (Some(*seconds), None, None),
        ScheduleTiming::Cron {
            expression,
            timezone,
        } => (None, Some(expression.clone()), Some(timezone.clone())),
    };
    v2::ScheduleInfo {
        id: schedule.id.clone(),
        project_id: schedule.project_id.clone(),
        code_id: schedule.code_id.clone(),
        code_name: spec.code_name.clone(),
        status: schedule.status.as_str().to_owned(),
        payload: spec.payload.clone(),
        run_every,
        cron,
        timezone,
        start_at: spec.start_at.map(format_time),
        end_at: spec.end_at.map(format_time),
        next_start: schedule.next_start.map(format_time),
        last_run_time: schedule.last_run_time.map(format_time),
        run_times: spec.run_times,
        run_count: schedule.run_count,
        priority: spec.priority,
        timeout: spec.timeout_secs,
        cluster: spec.cluster.clone(),
        label: spec.label.clone(),
        delay: spec.delay_secs,
        max_concurrency: spec.max_concurrency,
        msg: None,
        created_at: format_time(schedule.created_at),
        updated_at: format_time(schedule.updated_at),
    }
}
