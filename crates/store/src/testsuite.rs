//! The shared store test suite: what every `Store` implementation must do, written once
//! against the trait so SQLite and PostgreSQL are held to the same contract.
//!
//! Each function takes a fresh, empty store and drives it with fixed timestamps (time is an
//! argument everywhere). Nothing here may depend on one database. The functions live in one
//! module per concern, as the trait's methods do; the helpers here build what they share. An
//! implementation runs the whole suite with [`store_test_suite!`](crate::store_test_suite),
//! which makes one `#[tokio::test]` per function:
//!
//! ```ignore
//! async fn fresh_store() -> (MyStore, TempDir) { /* … */ }
//! stevedore_store::store_test_suite!(fresh_store);
//! ```
//!
//! A new suite function must also be added to its module's list in that macro.

// This module is test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod clusters;
pub mod codes;
pub mod concurrency;
pub mod credentials;
pub mod gauges;
pub mod leases;
pub mod logs;
pub mod packages;
pub mod projects;
pub mod quotas;
pub mod retention;
pub mod retries;
pub mod schedules;
pub mod tasks;
pub mod usage;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration};
use stevedore_model::{
    CodeKind, CodeSpec, Limits, NewTask, RetriesBackoff, ScheduleSpec, ScheduleTiming, TaskOutcome,
    TaskStatus, Timestamp,
};

use crate::{
    CodeCancellation, LeaseRequest, LeasedTask, NewToken, PackageFile, Page, Project, RescuedTask,
    Result, RevisionPackage, Store, StoreError, TokenRole,
};

/// Makes one `#[tokio::test]` per suite function. `$factory` is an async function (or
/// closure) returning `(store, guard)`: a fresh empty store, and whatever must live as long as
/// the test (a temporary directory, a database handle).
///
/// With `optional`, `$factory` returns `Option<(store, guard)>` instead, and each test returns
/// early (passes) when it is `None`: for a database that may not be installed, whose factory
/// says why it is skipping (and fails instead in CI).
#[macro_export]
macro_rules! store_test_suite {
    (optional $factory:expr) => {
        $crate::store_test_suite!(@list optional $factory);
    };
    ($factory:expr) => {
        $crate::store_test_suite!(@list required $factory);
    };
    (@list $mode:ident $factory:expr) => {
        $crate::store_test_suite!(@tests $mode $factory;
            projects: [
                projects_and_tokens,
                project_isolation,
            ],
            codes: [
                codes_and_revisions,
                a_leased_tasks_package_goes_only_to_its_lease_holder,
                deleting_a_code_hides_it_and_cancels_its_queued_tasks,
                code_stats_count_by_status,
            ],
            packages: [
                a_package_is_stored_once_per_checksum_and_read_in_chunks,
                an_options_update_stores_and_reads_nothing,
                a_file_that_is_not_what_it_claims_stores_nothing,
                package_bytes_count_each_package_once_per_project,
                pruning_keeps_the_newest_revisions_and_those_tasks_pin,
                pruning_removes_the_packages_of_deleted_codes,
                pruning_keeps_a_package_another_revision_holds,
                pruning_is_bounded_per_call,
                a_retry_pinning_a_pruned_revision_is_refused,
                concurrent_pushes_of_one_package_store_it_once,
                a_push_racing_the_pruning_of_its_package_keeps_it,
            ],
            tasks: [
                enqueue_pins_the_latest_revision,
                enqueue_can_pin_an_earlier_revision,
                enqueue_is_all_or_nothing,
                enqueue_delay_sets_the_due_time,
                timestamps_round_trip,
                payloads_round_trip_exactly,
                cancel_queued_leased_and_finished_tasks,
                cancel_all_cancels_a_codes_tasks,
                progress_from_the_task_and_the_runner,
                list_tasks_filters_and_pages,
            ],
            leases: [
                lease_orders_by_priority_then_due_time,
                max_concurrency_holds_within_one_lease_call,
                max_concurrency_holds_across_lease_calls,
                paused_code_is_skipped_until_resumed,
                lease_matches_clusters,
                lease_tokens_are_random_and_distinct,
                concurrent_runners_finish_every_task_once,
                stale_token_is_refused_after_rescue,
                complete_records_the_result_once,
                complete_maps_outcomes_to_statuses,
                requeue_below_and_at_the_cap,
                rescue_touches_only_expired_leases,
                heartbeat_extends_the_lease,
                a_projects_backlog_does_not_starve_another_projects_task,
                successive_leases_alternate_between_projects,
                priorities_win_over_fair_share,
                a_restarted_runner_releases_what_it_held_at_once,
                every_attempt_is_recorded_with_how_it_ended,
            ],
            logs: [
                log_is_capped_with_one_marker,
                log_is_read_from_any_offset_with_the_task_state,
                log_slices_show_where_the_truncation_marker_begins,
            ],
            retries: [
                a_failed_task_with_retries_left_queues_one_retry,
                timeouts_and_setup_failures_retry_but_cancels_and_successes_do_not,
                infrastructure_give_ups_spend_no_user_retry,
                a_stale_completion_queues_no_retry,
                exponential_backoff_doubles_the_retry_delay,
            ],
            schedules: [
                schedules_are_created_all_or_nothing_and_cancelled,
                schedules_fire_once_per_due_time,
                a_schedule_at_its_max_concurrency_passes_a_fire_time,
                a_scheduled_schedule_can_be_changed,
            ],
            clusters: [
                clusters_are_owned_visible_and_unique,
                clusters_keep_their_name_while_tasks_use_it,
                cluster_load_counts_tasks_and_online_runners,
                gone_runners_are_known_unseen_and_hold_no_live_lease,
                cluster_names_are_scoped_and_leases_follow_their_owner,
                clusters_named_by_schedules_stay_and_fires_check_them,
            ],
            usage: [
                usage_sums_finished_tasks_per_bucket_and_revision,
                queue_waits_sample_the_latest_starts,
                project_counts_count_every_code_of_the_project,
            ],
            credentials: [
                registry_credentials_are_per_project_and_sealed,
                a_lease_carries_its_projects_credential_for_its_image_only,
            ],
            gauges: [
                gauges_count_live_tasks_and_due_queues_by_priority,
                bulk_cancels_count_every_task_and_keep_the_gauges,
            ],
            retention: [
                retention_removes_only_what_finished_before_the_cutoff,
                retention_walks_in_bounded_chunks,
                data_sizes_follow_logs_payloads_and_truncation,
            ],
            quotas: [
                quotas_default_and_are_overridden_per_project,
                each_quota_refuses_the_write_that_passes_it_and_writes_nothing,
                a_schedule_at_its_projects_queued_quota_passes_a_fire_time,
                concurrent_writers_never_pass_a_quota,
                concurrent_queueings_are_each_all_or_nothing,
                the_running_tasks_quota_holds_leases_back_and_lets_others_run,
            ],
            concurrency: [
                concurrent_leasers_share_no_task_and_respect_max_concurrency,
                concurrent_leasers_never_pass_a_projects_running_tasks_quota,
                concurrent_completions_record_one_result_and_one_retry,
                many_concurrent_runner_writes_each_get_their_own_answer,
                concurrent_writes_about_one_task_take_turns,
                concurrent_log_appends_stop_at_the_cap_with_one_marker,
                concurrent_fires_of_a_schedule_queue_one_task,
                a_lone_process_can_lead,
            ],
        );
    };
    (@tests required $factory:expr; $($module:ident: [$($name:ident),* $(,)?]),* $(,)?) => {
        $($(
            #[tokio::test]
            async fn $name() {
                let (store, guard) = ($factory)().await;
                if let Err(error) = $crate::testsuite::$module::$name(&store).await {
                    panic!("{} failed: {error:#?}", stringify!($name));
                }
                drop(store);
                drop(guard);
            }
        )*)*
    };
    (@tests optional $factory:expr; $($module:ident: [$($name:ident),* $(,)?]),* $(,)?) => {
        $($(
            #[tokio::test]
            async fn $name() {
                let Some((store, guard)) = ($factory)().await else {
                    return;
                };
                if let Err(error) = $crate::testsuite::$module::$name(&store).await {
                    panic!("{} failed: {error:#?}", stringify!($name));
                }
                drop(store);
                drop(guard);
            }
        )*)*
    };
}

// === helpers ===

/// A fixed point in time (2030-01-01T00:00:00Z) plus `secs`.
pub fn at(secs: i64) -> Timestamp {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp") + Duration::seconds(secs)
}

/// An image code spec with sensible defaults.
pub fn image_spec(name: &str) -> CodeSpec {
    CodeSpec {
        name: name.to_owned(),
        kind: CodeKind::Image {
            image: "stevedore/busybox:local".to_owned(),
            command: Some("echo hi".to_owned()),
        },
        env_vars: BTreeMap::new(),
        config: None,
        max_concurrency: None,
        retries: 0,
        retries_delay_secs: 60,
        retries_backoff: RetriesBackoff::Fixed,
        default_priority: 0,
        limits: Limits::default(),
        network: "bridge".to_owned(),
    }
}

/// A task of `code_name` with priority 0, no delay, in the default cluster.
pub fn new_task(code_name: &str) -> NewTask {
    NewTask {
        code_name: code_name.to_owned(),
        payload: "{}".to_owned(),
        priority: 0,
        timeout_secs: 3600,
        delay_secs: 0,
        label: None,
        cluster: "default".to_owned(),
        retry_count: 0,
        original_task_id: None,
        schedule_id: None,
        code_rev: None,
    }
}

/// A package's bytes in a temporary file, described for `push_code`; the file lives as long
/// as this value.
pub struct SpooledPackage {
    pub file: PackageFile,
    _path: tempfile::TempPath,
}

impl SpooledPackage {
    /// The package as a new revision's.
    pub fn revision(&self) -> Option<RevisionPackage<'_>> {
        Some(RevisionPackage::File(&self.file))
    }
}

/// Writes `bytes` to a temporary file and describes it (size, SHA-256) as `push_code` takes it.
pub async fn spool(bytes: &[u8]) -> Result<SpooledPackage> {
    let mut file = tempfile::NamedTempFile::new()
        .map_err(|error| StoreError::PackageFile(error.to_string()))?;
    std::io::Write::write_all(&mut file, bytes)
        .map_err(|error| StoreError::PackageFile(error.to_string()))?;
    let path = file.into_temp_path();
    Ok(SpooledPackage {
        file: PackageFile::describe(path.to_path_buf()).await?,
        _path: path,
    })
}

/// A token of `role`, of `project_id` when given, for every cluster it may serve.
pub fn new_token(project_id: Option<&str>, role: TokenRole) -> NewToken {
    NewToken {
        project_id: project_id.map(str::to_owned),
        role,
        clusters: None,
    }
}

/// A runner serving the default cluster, 60 s leases.
pub fn lease_request(runner_id: &str, max_tasks: u32) -> LeaseRequest {
    LeaseRequest {
        runner_id: runner_id.to_owned(),
        clusters: vec!["default".to_owned()],
        max_tasks,
        lease_secs: 60,
        owner: None,
    }
}

fn page(page: u32, per_page: u32) -> Page {
    Page { page, per_page }
}

const ALL: Page = Page {
    page: 1,
    per_page: 100,
};

async fn project(store: &dyn Store, name: &str) -> Result<Project> {
    store.create_project(name, at(0)).await
}

/// A project with one code named `code_name`.
async fn project_with_code(store: &dyn Store, code_name: &str) -> Result<Project> {
    let project = project(store, "acme").await?;
    store
        .push_code(&project.id, &image_spec(code_name), None, at(0))
        .await?;
    Ok(project)
}

async fn enqueue_one(
    store: &dyn Store,
    project_id: &str,
    task: NewTask,
    now: Timestamp,
) -> Result<String> {
    let mut tasks = store.enqueue(project_id, &[task], now).await?;
    assert_eq!(tasks.len(), 1);
    Ok(tasks.remove(0).id)
}

async fn lease_one(store: &dyn Store, now: Timestamp) -> Result<LeasedTask> {
    let mut leased = store.lease(&lease_request("runner-1", 1), now).await?;
    assert_eq!(leased.len(), 1, "expected one task to lease at {now}");
    Ok(leased.remove(0))
}

fn ids(leased: &[LeasedTask]) -> Vec<String> {
    leased.iter().map(|leased| leased.task.id.clone()).collect()
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T>, naming: &str) {
    match result {
        Err(StoreError::NotFound { what }) => {
            assert!(what.contains(naming), "{what:?} should name {naming:?}")
        }
        other => panic!("expected NotFound naming {naming:?}, got {other:?}"),
    }
}

fn assert_stale<T: std::fmt::Debug>(result: Result<T>, operation: &str) {
    assert!(
        matches!(result, Err(StoreError::StaleLease { .. })),
        "{operation} with a stale token: expected StaleLease, got {result:?}"
    );
}

fn rescued_one(task_id: &str, code_name: &str, status: TaskStatus) -> Vec<RescuedTask> {
    vec![RescuedTask {
        task_id: task_id.to_owned(),
        code_name: code_name.to_owned(),
        status,
    }]
}

fn code_cancellation(code_name: &str, cancelled: u64, cancel_requested: u64) -> CodeCancellation {
    CodeCancellation {
        code_name: code_name.to_owned(),
        cancelled,
        cancel_requested,
    }
}

fn exited(exit_code: i64) -> TaskOutcome {
    TaskOutcome::Exited { exit_code }
}

fn schedule_spec(code_name: &str, every_secs: u32) -> ScheduleSpec {
    ScheduleSpec {
        code_name: code_name.to_owned(),
        payload: r#"{"from":"schedule"}"#.to_owned(),
        timing: ScheduleTiming::Every {
            seconds: every_secs,
        },
        start_at: None,
        end_at: None,
        run_times: None,
        priority: 1,
        timeout_secs: 60,
        cluster: "default".to_owned(),
        label: Some("nightly".to_owned()),
        delay_secs: 0,
        max_concurrency: None,
    }
}
