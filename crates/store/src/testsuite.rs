//! The shared store test suite: what every `Store` implementation must do, written once
//! against the trait so SQLite and PostgreSQL are held to the same contract.
//!
//! Each function takes a fresh, empty store and drives it with fixed timestamps (time is an
//! argument everywhere). Nothing here may depend on one database. An implementation runs the
//! whole suite with [`store_test_suite!`](crate::store_test_suite), which makes one
//! `#[tokio::test]` per function:
//!
//! ```ignore
//! async fn fresh_store() -> (MyStore, TempDir) { /* … */ }
//! stevedore_store::store_test_suite!(fresh_store);
//! ```
//!
//! A new suite function must also be added to the list in that macro.

// This module is test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, SubsecRound};
use stevedore_model::{
    CodeKind, CodeSpec, Limits, NewTask, RetriesBackoff, ScheduleSpec, ScheduleStatus,
    ScheduleTiming, Task, TaskOutcome, TaskStatus, Timestamp,
};

use crate::{
    ClusterSpec, CodeCancellation, CodeStats, LeaseRequest, LeasedTask, LogSlice, Package, Page,
    Project, QueueWait, Requeue, RescuedTask, Result, RunReport, RunnerSeen, StatsWindow, Store,
    StoreError, StoreGauges, TaskFilter, TokenRole, UsageQuery, UsageRow,
};
use crate::{CredentialKey, CredentialVault, attach_registry_credentials};

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
            projects_and_tokens,
            a_lone_process_can_lead,
            codes_and_revisions,
            deleting_a_code_hides_it_and_cancels_its_queued_tasks,
            enqueue_pins_the_latest_revision,
            enqueue_can_pin_an_earlier_revision,
            enqueue_is_all_or_nothing,
            enqueue_delay_sets_the_due_time,
            timestamps_round_trip,
            payloads_round_trip_exactly,
            lease_orders_by_priority_then_due_time,
            max_concurrency_holds_within_one_lease_call,
            max_concurrency_holds_across_lease_calls,
            paused_code_is_skipped_until_resumed,
            lease_matches_clusters,
            lease_tokens_strictly_increase,
            concurrent_runners_finish_every_task_once,
            stale_token_is_refused_after_rescue,
            complete_records_the_result_once,
            complete_maps_outcomes_to_statuses,
            requeue_below_and_at_the_cap,
            rescue_touches_only_expired_leases,
            heartbeat_extends_the_lease,
            log_is_capped_with_one_marker,
            log_is_read_from_any_offset_with_the_task_state,
            log_slices_show_where_the_truncation_marker_begins,
            cancel_queued_leased_and_finished_tasks,
            cancel_all_cancels_a_codes_tasks,
            progress_from_the_task_and_the_runner,
            project_isolation,
            list_tasks_filters_and_pages,
            code_stats_count_by_status,
            schedules_are_created_all_or_nothing_and_cancelled,
            schedules_fire_once_per_due_time,
            a_schedule_at_its_max_concurrency_passes_a_fire_time,
            a_scheduled_schedule_can_be_changed,
            a_failed_task_with_retries_left_queues_one_retry,
            timeouts_and_setup_failures_retry_but_cancels_and_successes_do_not,
            infrastructure_give_ups_spend_no_user_retry,
            a_stale_completion_queues_no_retry,
            exponential_backoff_doubles_the_retry_delay,
            clusters_are_owned_visible_and_unique,
            clusters_keep_their_name_while_tasks_use_it,
            cluster_load_counts_tasks_and_online_runners,
            gauges_count_live_tasks_and_due_queues_by_priority,
            concurrent_leasers_share_no_task_and_respect_max_concurrency,
            concurrent_completions_record_one_result_and_one_retry,
            concurrent_log_appends_stop_at_the_cap_with_one_marker,
            concurrent_fires_of_a_schedule_queue_one_task,
            usage_sums_finished_tasks_per_bucket_and_revision,
            queue_waits_sample_the_latest_starts,
            project_counts_count_every_code_of_the_project,
            registry_credentials_are_per_project_and_sealed,
            a_lease_carries_its_projects_credential_for_its_image_only,
        );
    };
    (@tests required $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (store, guard) = ($factory)().await;
                if let Err(error) = $crate::testsuite::$name(&store).await {
                    panic!("{} failed: {error:#?}", stringify!($name));
                }
                drop(store);
                drop(guard);
            }
        )*
    };
    (@tests optional $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some((store, guard)) = ($factory)().await else {
                    return;
                };
                if let Err(error) = $crate::testsuite::$name(&store).await {
                    panic!("{} failed: {error:#?}", stringify!($name));
                }
                drop(store);
                drop(guard);
            }
        )*
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

/// A runner serving the default cluster, 60 s leases.
pub fn lease_request(runner_id: &str, max_tasks: u32) -> LeaseRequest {
    LeaseRequest {
        runner_id: runner_id.to_owned(),
        clusters: vec!["default".to_owned()],
        max_tasks,
        lease_secs: 60,
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

// === projects and tokens ===

pub async fn projects_and_tokens(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    assert_eq!(store.get_project(&acme.id).await?, acme);
    assert_eq!(
        store.find_project_by_name("acme").await?,
        Some(acme.clone())
    );
    assert_eq!(store.find_project_by_name("nobody").await?, None);
    assert_not_found(store.get_project("nope").await, "nope");
    assert!(matches!(
        store.create_project("acme", at(1)).await,
        Err(StoreError::Conflict(_))
    ));

    let token = store
        .create_token(Some(&acme.id), TokenRole::Project, "sha-project", at(2))
        .await?;
    assert_eq!(token.project_id.as_deref(), Some(acme.id.as_str()));
    assert_eq!(store.find_token("sha-project").await?, Some(token));
    let admin = store
        .create_token(None, TokenRole::Admin, "sha-admin", at(3))
        .await?;
    assert_eq!(store.find_token("sha-admin").await?, Some(admin));
    let runner = store
        .create_token(None, TokenRole::Runner, "sha-runner", at(3))
        .await?;
    assert_eq!(
        store.find_token("sha-runner").await?.map(|t| t.role),
        Some(runner.role)
    );
    assert_eq!(store.find_token("sha-unknown").await?, None);
    assert_not_found(
        store
            .create_token(Some("ghost"), TokenRole::Project, "sha-ghost", at(4))
            .await,
        "ghost",
    );
    Ok(())
}

// === codes ===

pub async fn codes_and_revisions(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let package = Package {
        bytes: b"PK\x03\x04 zip bytes".to_vec(),
        sha256: "abc123".to_owned(),
    };
    let first = store
        .push_code(&acme.id, &image_spec("hello"), Some(&package), at(10))
        .await?;
    assert_eq!(first.rev, 1);
    assert_eq!(first.project_id, acme.id);
    assert_eq!(first.package_sha256.as_deref(), Some("abc123"));
    assert_eq!(first.package_size, Some(package.bytes.len() as u64));
    assert_eq!((first.created_at, first.updated_at), (at(10), at(10)));
    assert!(!first.paused);

    let mut changed = image_spec("hello");
    changed.max_concurrency = Some(3);
    changed
        .env_vars
        .insert("GREETING".to_owned(), "hi".to_owned());
    let second = store.push_code(&acme.id, &changed, None, at(20)).await?;
    assert_eq!((second.id.as_str(), second.rev), (first.id.as_str(), 2));
    assert_eq!((second.created_at, second.updated_at), (at(10), at(20)));
    assert_eq!(second.spec, changed);
    assert_eq!(second.package_sha256, None);

    assert_eq!(store.get_code(&acme.id, &first.id).await?, second);
    assert_eq!(store.get_code_by_name(&acme.id, "hello").await?, second);
    assert_eq!(store.get_revision(&acme.id, &first.id, 1).await?, first);
    assert_not_found(
        store.get_revision(&acme.id, &first.id, 3).await,
        "revision 3",
    );
    let revisions = store.list_revisions(&acme.id, &first.id, ALL).await?;
    assert_eq!(
        revisions.iter().map(|r| r.rev).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(
        store
            .list_revisions(&acme.id, &first.id, page(2, 1))
            .await?,
        vec![first.clone()]
    );

    assert_eq!(
        store.get_package(&acme.id, &first.id, Some(1)).await?,
        package.bytes
    );
    assert_not_found(
        store.get_package(&acme.id, &first.id, None).await,
        "package",
    );
    assert_not_found(store.get_code_by_name(&acme.id, "nope").await, "nope");
    assert_not_found(store.get_code(&acme.id, "nope").await, "nope");

    // Newest-updated first: pushing to `hello` again moves it ahead of `other`.
    let other = store
        .push_code(&acme.id, &image_spec("other"), None, at(30))
        .await?;
    let names = |codes: Vec<stevedore_model::CodeRevision>| {
        codes.into_iter().map(|c| c.spec.name).collect::<Vec<_>>()
    };
    assert_eq!(
        names(store.list_codes(&acme.id, ALL).await?),
        vec!["other", "hello"]
    );
    let third = store
        .push_code(&acme.id, &image_spec("hello"), Some(&package), at(40))
        .await?;
    assert_eq!(third.rev, 3);
    assert_eq!(
        names(store.list_codes(&acme.id, ALL).await?),
        vec!["hello", "other"]
    );
    assert_eq!(
        names(store.list_codes(&acme.id, page(2, 1)).await?),
        vec!["other"]
    );
    assert_eq!(
        store.get_package(&acme.id, &first.id, None).await?,
        package.bytes
    );

    let paused = store
        .set_code_paused(&acme.id, &other.id, true, at(50))
        .await?;
    assert!(paused.paused);
    assert!(store.get_code(&acme.id, &other.id).await?.paused);
    assert!(
        !store
            .set_code_paused(&acme.id, &other.id, false, at(51))
            .await?
            .paused
    );
    assert_not_found(
        store
            .push_code("ghost", &image_spec("x"), None, at(60))
            .await,
        "ghost",
    );
    Ok(())
}

pub async fn deleting_a_code_hides_it_and_cancels_its_queued_tasks(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let running = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let queued = enqueue_one(store, &acme.id, new_task("hello"), at(2)).await?;
    let leased = lease_one(store, at(3)).await?;
    assert_eq!(leased.task.id, running);
    let schedule_spec = schedule_spec("hello", 60);
    let schedules = store
        .create_schedules(&acme.id, &[(schedule_spec, Some(at(60)))], at(3))
        .await?;

    assert_eq!(
        store.delete_code(&acme.id, &code.id, at(4)).await?,
        code_cancellation("hello", 1, 1)
    );
    assert_not_found(store.get_code(&acme.id, &code.id).await, &code.id);
    assert_not_found(store.get_code_by_name(&acme.id, "hello").await, "hello");
    assert!(store.list_codes(&acme.id, ALL).await?.is_empty());
    assert_not_found(
        store.enqueue(&acme.id, &[new_task("hello")], at(5)).await,
        "hello",
    );
    assert_not_found(store.delete_code(&acme.id, &code.id, at(5)).await, &code.id);

    let queued = store.get_task(&acme.id, &queued).await?;
    assert_eq!(
        (queued.status, queued.end_time),
        (TaskStatus::Cancelled, Some(at(4)))
    );
    let running = store.get_task(&acme.id, &running).await?;
    assert_eq!(running.status, TaskStatus::Preparing);
    assert!(running.cancel_requested);
    let schedule = store.get_schedule(&acme.id, &schedules[0].id).await?;
    assert_eq!(
        (schedule.status, schedule.next_start),
        (ScheduleStatus::Cancelled, None)
    );
    // The leased task can still finish, and a new code may take the name.
    store
        .complete(
            &running.id,
            leased.lease.token,
            &TaskOutcome::Cancelled,
            &RunReport::default(),
            at(6),
        )
        .await?;
    let reborn = store
        .push_code(&acme.id, &image_spec("hello"), None, at(7))
        .await?;
    assert_ne!(reborn.id, code.id);
    assert_eq!(reborn.rev, 1);
    Ok(())
}

// === enqueue ===

pub async fn enqueue_pins_the_latest_revision(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let first = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let mut v2 = image_spec("hello");
    v2.kind = CodeKind::Image {
        image: "stevedore/busybox:v2".to_owned(),
        command: None,
    };
    store.push_code(&acme.id, &v2, None, at(2)).await?;
    let second = enqueue_one(store, &acme.id, new_task("hello"), at(3)).await?;
    assert_eq!(store.get_task(&acme.id, &first).await?.code_rev, 1);
    assert_eq!(store.get_task(&acme.id, &second).await?.code_rev, 2);

    let leased = store.lease(&lease_request("runner-1", 10), at(4)).await?;
    assert_eq!(ids(&leased), vec![first, second]);
    assert_eq!(leased[0].code.rev, 1);
    assert_eq!(leased[0].code.spec, image_spec("hello"));
    assert_eq!(leased[1].code.rev, 2);
    assert_eq!(leased[1].code.spec, v2);
    Ok(())
}

pub async fn enqueue_can_pin_an_earlier_revision(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let mut v2 = image_spec("hello");
    v2.config = Some("second".to_owned());
    store.push_code(&acme.id, &v2, None, at(1)).await?;
    // A retry runs the revision that failed, not whatever was pushed since.
    let retry = NewTask {
        code_rev: Some(1),
        retry_count: 1,
        original_task_id: Some("first-try".to_owned()),
        ..new_task("hello")
    };
    let task = store.enqueue(&acme.id, &[retry], at(2)).await?.remove(0);
    assert_eq!((task.code_rev, task.retry_count), (1, 1));
    assert_eq!(task.original_task_id.as_deref(), Some("first-try"));
    let leased = lease_one(store, at(3)).await?;
    assert_eq!(
        (leased.code.rev, &leased.code.spec),
        (1, &image_spec("hello"))
    );

    for missing in [0, 3] {
        let pinned = NewTask {
            code_rev: Some(missing),
            ..new_task("hello")
        };
        assert_not_found(
            store
                .enqueue(&acme.id, &[new_task("hello"), pinned], at(4))
                .await,
            "revision",
        );
    }
    assert_eq!(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?
            .len(),
        1
    );
    Ok(())
}

pub async fn enqueue_is_all_or_nothing(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let batch = [new_task("hello"), new_task("missing"), new_task("hello")];
    assert_not_found(store.enqueue(&acme.id, &batch, at(1)).await, "missing");
    assert!(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?
            .is_empty()
    );
    assert!(
        store
            .lease(&lease_request("runner-1", 10), at(2))
            .await?
            .is_empty()
    );

    let queued = store
        .enqueue(&acme.id, &[new_task("hello"), new_task("hello")], at(3))
        .await?;
    assert_eq!(queued.len(), 2);
    for task in &queued {
        assert_eq!(task.status, TaskStatus::Queued);
        assert_eq!(&store.get_task(&acme.id, &task.id).await?, task);
    }
    assert!(store.enqueue(&acme.id, &[], at(4)).await?.is_empty());
    Ok(())
}

pub async fn enqueue_delay_sets_the_due_time(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let mut delayed = new_task("hello");
    delayed.delay_secs = 30;
    delayed.label = Some("later".to_owned());
    let task = store
        .enqueue(&acme.id, &[delayed], at(100))
        .await?
        .remove(0);
    assert_eq!((task.created_at, task.due_at), (at(100), at(130)));
    assert_eq!(
        (task.delay_secs, task.label.as_deref()),
        (30, Some("later"))
    );
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(129))
            .await?
            .is_empty()
    );
    assert_eq!(lease_one(store, at(130)).await?.task.id, task.id);
    Ok(())
}

pub async fn timestamps_round_trip(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    // Nanoseconds are more than any database keeps; what comes back must equal what is read.
    let now = at(5) + Duration::nanoseconds(123_456_789);
    let task = store
        .enqueue(&acme.id, &[new_task("hello")], now)
        .await?
        .remove(0);
    assert_eq!(store.get_task(&acme.id, &task.id).await?, task);
    assert_eq!(task.created_at, now.trunc_subsecs(6));
    let leased = lease_one(store, now).await?;
    let started = store
        .mark_running(&task.id, leased.lease.token, now, now)
        .await?;
    assert_eq!(store.get_task(&acme.id, &task.id).await?, started);
    let report = RunReport {
        start_time: Some(now),
        end_time: Some(now + Duration::nanoseconds(5)),
        peak_memory_bytes: Some(1 << 40),
        cpu_time_ms: Some(12),
    };
    let done = store
        .complete(&task.id, leased.lease.token, &exited(0), &report, now)
        .await?;
    assert_eq!(store.get_task(&acme.id, &task.id).await?, done);
    Ok(())
}

pub async fn payloads_round_trip_exactly(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let payloads = [
        String::new(),
        "not json at all".to_owned(),
        "{\"quote\":\"\\\"\",\"ship\":\"🚢\",\"umlaut\":\"ü\"}".to_owned(),
        "line one\nline two\r\n\ttabbed \u{0} nul \u{1f} unit separator".to_owned(),
        "x".repeat(64 * 1024),
    ];
    let batch: Vec<NewTask> = payloads
        .iter()
        .map(|payload| NewTask {
            payload: payload.clone(),
            label: Some("label with 'quotes'".to_owned()),
            ..new_task("hello")
        })
        .collect();
    let queued = store.enqueue(&acme.id, &batch, at(1)).await?;
    for (task, payload) in queued.iter().zip(&payloads) {
        assert_eq!(&task.payload, payload);
        assert_eq!(&store.get_task(&acme.id, &task.id).await?, task);
    }
    let leased = store.lease(&lease_request("runner-1", 10), at(2)).await?;
    let leased_payloads: Vec<&String> = leased.iter().map(|leased| &leased.task.payload).collect();
    assert_eq!(leased_payloads, payloads.iter().collect::<Vec<_>>());
    Ok(())
}

// === leases ===

pub async fn lease_orders_by_priority_then_due_time(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let task = |priority: u8, delay_secs: u32| NewTask {
        priority,
        delay_secs,
        ..new_task("hello")
    };
    let queued = store
        .enqueue(
            &acme.id,
            &[
                task(0, 0),
                task(1, 10),
                task(2, 20),
                task(1, 5),
                task(0, 15),
                task(2, 50),
            ],
            at(0),
        )
        .await?;
    let id = |index: usize| queued[index].id.clone();
    // At 30 s the second priority-2 task is not due yet.
    let leased = store.lease(&lease_request("runner-1", 10), at(30)).await?;
    assert_eq!(ids(&leased), vec![id(2), id(3), id(1), id(0), id(4)]);
    assert_eq!(
        ids(&store.lease(&lease_request("runner-1", 10), at(50)).await?),
        vec![id(5)]
    );

    // One at a time gives the same order.
    let again = store
        .enqueue(
            &acme.id,
            &[task(0, 0), task(2, 3), task(1, 1), task(2, 2)],
            at(100),
        )
        .await?;
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(lease_one(store, at(200)).await?.task.id);
    }
    assert_eq!(
        order,
        vec![
            again[3].id.clone(),
            again[1].id.clone(),
            again[2].id.clone(),
            again[0].id.clone()
        ]
    );
    Ok(())
}

pub async fn max_concurrency_holds_within_one_lease_call(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let mut limited = image_spec("limited");
    limited.max_concurrency = Some(2);
    store.push_code(&acme.id, &limited, None, at(0)).await?;
    store
        .push_code(&acme.id, &image_spec("free"), None, at(0))
        .await?;
    // The limited code's tasks come first in the queue; they must not block the free code's.
    let limited_tasks = store
        .enqueue(&acme.id, &vec![new_task("limited"); 40], at(1))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("free"); 3], at(2))
        .await?;
    let leased = store.lease(&lease_request("runner-1", 10), at(3)).await?;
    let count = |name: &str| leased.iter().filter(|l| l.task.code_name == name).count();
    assert_eq!((count("limited"), count("free")), (2, 3));
    assert_eq!(
        ids(&leased)[..2],
        [limited_tasks[0].id.clone(), limited_tasks[1].id.clone()]
    );
    Ok(())
}

pub async fn max_concurrency_holds_across_lease_calls(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let mut limited = image_spec("limited");
    limited.max_concurrency = Some(2);
    store.push_code(&acme.id, &limited, None, at(0)).await?;
    store
        .enqueue(&acme.id, &vec![new_task("limited"); 5], at(1))
        .await?;
    let first = lease_one(store, at(2)).await?;
    let second = lease_one(store, at(2)).await?;
    assert!(
        store
            .lease(&lease_request("runner-2", 5), at(3))
            .await?
            .is_empty()
    );
    // A running task still counts; a finished one frees its slot.
    store
        .mark_running(&first.task.id, first.lease.token, at(3), at(3))
        .await?;
    assert!(
        store
            .lease(&lease_request("runner-2", 5), at(4))
            .await?
            .is_empty()
    );
    store
        .mark_running(&second.task.id, second.lease.token, at(5), at(5))
        .await?;
    store
        .complete(
            &second.task.id,
            second.lease.token,
            &exited(0),
            &RunReport::default(),
            at(5),
        )
        .await?;
    assert_eq!(
        store
            .lease(&lease_request("runner-2", 5), at(6))
            .await?
            .len(),
        1
    );
    assert!(
        store
            .lease(&lease_request("runner-2", 5), at(7))
            .await?
            .is_empty()
    );
    // A requeued task frees its slot too.
    store
        .requeue(
            &first.task.id,
            first.lease.token,
            &Requeue {
                reason: "engine down".to_owned(),
                due_at: at(8),
                max_infra_attempts: 5,
            },
            at(8),
        )
        .await?;
    assert_eq!(
        store
            .lease(&lease_request("runner-2", 5), at(9))
            .await?
            .len(),
        1
    );
    Ok(())
}

pub async fn paused_code_is_skipped_until_resumed(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let paused = store
        .push_code(&acme.id, &image_spec("paused"), None, at(0))
        .await?;
    store
        .push_code(&acme.id, &image_spec("busy"), None, at(0))
        .await?;
    let waiting = enqueue_one(store, &acme.id, new_task("paused"), at(1)).await?;
    let busy = enqueue_one(store, &acme.id, new_task("busy"), at(2)).await?;
    store
        .set_code_paused(&acme.id, &paused.id, true, at(3))
        .await?;
    assert_eq!(
        ids(&store.lease(&lease_request("runner-1", 10), at(4)).await?),
        vec![busy]
    );
    assert!(
        store
            .lease(&lease_request("runner-1", 10), at(5))
            .await?
            .is_empty()
    );
    assert_eq!(
        store.get_task(&acme.id, &waiting).await?.status,
        TaskStatus::Queued
    );
    store
        .set_code_paused(&acme.id, &paused.id, false, at(6))
        .await?;
    assert_eq!(
        ids(&store.lease(&lease_request("runner-1", 10), at(7)).await?),
        vec![waiting]
    );
    Ok(())
}

pub async fn lease_matches_clusters(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let in_cluster = |cluster: &str| NewTask {
        cluster: cluster.to_owned(),
        ..new_task("hello")
    };
    let default = enqueue_one(store, &acme.id, in_cluster("default"), at(1)).await?;
    let gpu = enqueue_one(store, &acme.id, in_cluster("gpu"), at(2)).await?;
    let request = |clusters: &[&str]| LeaseRequest {
        clusters: clusters.iter().map(|c| (*c).to_owned()).collect(),
        ..lease_request("runner-1", 10)
    };
    assert!(store.lease(&request(&[]), at(3)).await?.is_empty());
    assert!(store.lease(&request(&["arm"]), at(3)).await?.is_empty());
    assert_eq!(
        ids(&store.lease(&request(&["arm", "gpu"]), at(3)).await?),
        vec![gpu]
    );
    assert_eq!(
        ids(&store.lease(&request(&["default"]), at(3)).await?),
        vec![default]
    );
    Ok(())
}

pub async fn lease_tokens_strictly_increase(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 7], at(0))
        .await?;
    let mut tokens = Vec::new();
    for round in 0..4 {
        let now = at(10 + round);
        let leased = store.lease(&lease_request("runner-1", 2), now).await?;
        for leased in &leased {
            assert_eq!(leased.lease.expires_at, now + Duration::seconds(60));
            assert_eq!(leased.task.status, TaskStatus::Preparing);
            assert_eq!(leased.task.runner_id.as_deref(), Some("runner-1"));
            assert_eq!(
                store.get_task(&acme.id, &leased.task.id).await?,
                leased.task
            );
            tokens.push(leased.lease.token);
        }
    }
    assert_eq!(tokens.len(), 7);
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "{tokens:?}"
    );
    // An empty lease call hands out nothing, and tokens keep growing after it.
    assert!(
        store
            .lease(&lease_request("runner-1", 2), at(20))
            .await?
            .is_empty()
    );
    enqueue_one(store, &acme.id, new_task("hello"), at(21)).await?;
    assert!(lease_one(store, at(22)).await?.lease.token > tokens[6]);
    Ok(())
}

pub async fn concurrent_runners_finish_every_task_once(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let total = 120;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); total], at(0))
        .await?;

    // Four runners at once, each doing a runner's whole traffic per task, interleaved at every
    // await; a fifth caller reads and reports progress in between.
    let runner = |name: &'static str| async move {
        let mut finished = Vec::new();
        loop {
            let leased = store.lease(&lease_request(name, 4), at(1)).await?;
            if leased.is_empty() {
                return Ok::<_, StoreError>(finished);
            }
            for leased in leased {
                let (id, token) = (leased.task.id.as_str(), leased.lease.token);
                store.heartbeat(id, token, 60, at(2)).await?;
                store.mark_running(id, token, at(2), at(2)).await?;
                store
                    .runner_progress(id, token, Some(50), Some("halfway"), at(3))
                    .await?;
                store
                    .append_log(id, token, b"output\n", 1024, at(3))
                    .await?;
                let done = store
                    .complete(id, token, &exited(0), &RunReport::default(), at(4))
                    .await?;
                assert_eq!(done.status, TaskStatus::Complete);
                finished.push((done.id, token));
            }
        }
    };
    let reader = async {
        for _ in 0..20 {
            store
                .list_tasks(&acme.id, &TaskFilter::default(), page(1, 10))
                .await?;
            store
                .code_stats(&acme.id, &code.id, StatsWindow::default())
                .await?;
        }
        Ok::<_, StoreError>(())
    };
    let (a, b, c, d, read) = tokio::join!(
        runner("r1"),
        runner("r2"),
        runner("r3"),
        runner("r4"),
        reader
    );
    read?;
    let mut finished: Vec<(String, i64)> = [a?, b?, c?, d?].concat();
    assert_eq!(finished.len(), total);
    finished.sort();
    finished.dedup_by(|x, y| x.0 == y.0);
    assert_eq!(finished.len(), total, "a task was finished twice");
    let mut tokens: Vec<i64> = finished.iter().map(|(_, token)| *token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), total, "a lease token was handed out twice");

    let stats = store
        .code_stats(&acme.id, &code.id, StatsWindow::default())
        .await?;
    assert!(
        stats
            .by_status
            .contains(&(TaskStatus::Complete, total as u64)),
        "{stats:?}"
    );
    for (id, token) in finished.iter().take(5) {
        let task = store.get_task(&acme.id, id).await?;
        assert_eq!(
            (task.percent, task.log_size, task.runner_id.as_deref()),
            (Some(50), 7, None)
        );
        assert_stale(
            store.heartbeat(id, *token, 60, at(5)).await,
            "heartbeat after completion",
        );
    }
    Ok(())
}

pub async fn stale_token_is_refused_after_rescue(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let old = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, old.lease.token, at(2), at(2))
        .await?;
    // The runner goes silent; its lease expires at 61 s and the rescuer requeues the task.
    assert_eq!(
        store.rescue_expired(at(62), 5).await?,
        rescued_one(&id, "hello", TaskStatus::Queued)
    );
    let new = lease_one(store, at(63)).await?;
    assert_eq!(new.task.id, id);
    assert!(new.lease.token > old.lease.token);

    let stale = old.lease.token;
    assert_stale(store.heartbeat(&id, stale, 60, at(64)).await, "heartbeat");
    assert_stale(
        store.mark_running(&id, stale, at(64), at(64)).await,
        "mark_running",
    );
    assert_stale(
        store.append_log(&id, stale, b"late", 1024, at(64)).await,
        "append_log",
    );
    assert_stale(
        store
            .runner_progress(&id, stale, Some(50), None, at(64))
            .await,
        "runner_progress",
    );
    assert_stale(
        store
            .complete(&id, stale, &exited(0), &RunReport::default(), at(64))
            .await,
        "complete",
    );
    let requeue = Requeue {
        reason: "engine down".to_owned(),
        due_at: at(64),
        max_infra_attempts: 5,
    };
    assert_stale(store.requeue(&id, stale, &requeue, at(64)).await, "requeue");
    assert_not_found(store.get_log(&acme.id, &id).await, "log");

    // The new lease works and the stale writes changed nothing.
    let task = store.get_task(&acme.id, &id).await?;
    assert_eq!(
        (task.status, task.infra_attempts, task.percent),
        (TaskStatus::Preparing, 1, None)
    );
    store
        .mark_running(&id, new.lease.token, at(65), at(65))
        .await?;
    let done = store
        .complete(
            &id,
            new.lease.token,
            &exited(0),
            &RunReport::default(),
            at(66),
        )
        .await?;
    assert_eq!(done.status, TaskStatus::Complete);
    Ok(())
}

pub async fn complete_records_the_result_once(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let token = leased.lease.token;
    // A container cannot exit before it started.
    assert!(matches!(
        store
            .complete(&id, token, &exited(0), &RunReport::default(), at(2))
            .await,
        Err(StoreError::Transition(_))
    ));
    let running = store.mark_running(&id, token, at(3), at(3)).await?;
    assert_eq!(
        (running.status, running.start_time),
        (TaskStatus::Running, Some(at(3)))
    );
    let report = RunReport {
        start_time: Some(at(4)),
        end_time: Some(at(9)),
        peak_memory_bytes: Some(42 << 20),
        cpu_time_ms: Some(1234),
    };
    let done = store
        .complete(&id, token, &exited(0), &report, at(10))
        .await?;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!((done.start_time, done.end_time), (Some(at(4)), Some(at(9))));
    assert_eq!(
        (done.peak_memory_bytes, done.cpu_time_ms),
        (Some(42 << 20), Some(1234))
    );
    assert_eq!(
        (done.runner_id.as_deref(), done.msg.as_deref()),
        (None, None)
    );
    assert_eq!(done.updated_at, at(10));
    assert_eq!(store.get_task(&acme.id, &id).await?, done.clone());

    // Exactly once: the same token, any outcome, is refused and changes nothing.
    assert_stale(
        store
            .complete(&id, token, &exited(1), &report, at(11))
            .await,
        "complete",
    );
    assert_stale(store.heartbeat(&id, token, 60, at(11)).await, "heartbeat");
    assert_stale(
        store
            .requeue(
                &id,
                token,
                &Requeue {
                    reason: "x".to_owned(),
                    due_at: at(11),
                    max_infra_attempts: 5,
                },
                at(11),
            )
            .await,
        "requeue",
    );
    assert_eq!(store.get_task(&acme.id, &id).await?, done);
    // Nothing is left to rescue or lease.
    assert!(store.rescue_expired(at(1000), 5).await?.is_empty());
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(1000))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn complete_maps_outcomes_to_statuses(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let cases = [
        (
            exited(3),
            TaskStatus::Error,
            Some(3),
            Some("exited with code 3"),
        ),
        (
            TaskOutcome::OutOfMemory { limit_mib: 256 },
            TaskStatus::Error,
            Some(137),
            Some("out of memory (limit 256 MiB)"),
        ),
        (
            TaskOutcome::TimedOut { timeout_secs: 5 },
            TaskStatus::Timeout,
            None,
            Some("timed out after 5 s"),
        ),
        (
            TaskOutcome::Cancelled,
            TaskStatus::Cancelled,
            None,
            Some("cancelled"),
        ),
    ];
    for (outcome, status, exit_code, msg) in cases {
        let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
        let leased = lease_one(store, at(1)).await?;
        store
            .mark_running(&id, leased.lease.token, at(2), at(2))
            .await?;
        let done = store
            .complete(
                &id,
                leased.lease.token,
                &outcome,
                &RunReport::default(),
                at(3),
            )
            .await?;
        assert_eq!(
            (done.status, done.exit_code, done.msg.as_deref()),
            (status, exit_code, msg),
            "{outcome:?}"
        );
        assert_eq!(done.end_time, Some(at(3)), "end time defaults to now");
    }
    // Setup failures end a task that never started.
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let outcome = TaskOutcome::SetupFailed {
        message: "image not found: nope:latest".to_owned(),
    };
    let done = store
        .complete(
            &id,
            leased.lease.token,
            &outcome,
            &RunReport::default(),
            at(2),
        )
        .await?;
    assert_eq!(
        (done.status, done.msg.as_deref()),
        (TaskStatus::Error, Some("image not found: nope:latest"))
    );
    Ok(())
}

pub async fn requeue_below_and_at_the_cap(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let requeue = |due: i64| Requeue {
        reason: "engine down".to_owned(),
        due_at: at(due),
        max_infra_attempts: 3,
    };
    let leased = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, leased.lease.token, at(2), at(2))
        .await?;
    let again = store
        .requeue(&id, leased.lease.token, &requeue(20), at(3))
        .await?;
    assert_eq!(
        (again.status, again.infra_attempts, again.due_at),
        (TaskStatus::Queued, 1, at(20))
    );
    assert_eq!(
        (
            again.runner_id.as_deref(),
            again.msg.as_deref(),
            again.start_time
        ),
        (None, Some("engine down"), None)
    );
    assert_eq!(
        again.retry_count, 0,
        "an infrastructure failure spends no user retry"
    );
    assert_eq!(store.get_task(&acme.id, &id).await?, again);
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(19))
            .await?
            .is_empty()
    );

    let leased = lease_one(store, at(20)).await?;
    let again = store
        .requeue(&id, leased.lease.token, &requeue(30), at(21))
        .await?;
    assert_eq!(
        (again.status, again.infra_attempts),
        (TaskStatus::Queued, 2)
    );
    assert_stale(
        store
            .requeue(&id, leased.lease.token, &requeue(30), at(21))
            .await,
        "requeue",
    );

    let leased = lease_one(store, at(30)).await?;
    let failed = store
        .requeue(&id, leased.lease.token, &requeue(40), at(31))
        .await?;
    assert_eq!(
        (failed.status, failed.infra_attempts),
        (TaskStatus::Error, 3)
    );
    assert_eq!(
        failed.msg.as_deref(),
        Some("infrastructure failure after 3 attempts: engine down")
    );
    assert_eq!((failed.end_time, failed.runner_id), (Some(at(31)), None));
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(100))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn rescue_touches_only_expired_leases(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 4], at(0))
        .await?;
    let silent = lease_one(store, at(1)).await?; // expires at 61
    let alive = lease_one(store, at(1)).await?;
    let late = lease_one(store, at(30)).await?; // expires at 90
    let finished = lease_one(store, at(1)).await?;
    store
        .heartbeat(&alive.task.id, alive.lease.token, 60, at(50))
        .await?; // now 110
    store
        .mark_running(&finished.task.id, finished.lease.token, at(2), at(2))
        .await?;
    store
        .complete(
            &finished.task.id,
            finished.lease.token,
            &exited(0),
            &RunReport::default(),
            at(3),
        )
        .await?;

    assert!(
        store.rescue_expired(at(61), 5).await?.is_empty(),
        "a lease is good until its expiry"
    );
    assert_eq!(
        store.rescue_expired(at(62), 5).await?,
        rescued_one(&silent.task.id, "hello", TaskStatus::Queued)
    );
    let rescued = store.get_task(&acme.id, &silent.task.id).await?;
    assert_eq!(
        (rescued.status, rescued.infra_attempts, rescued.due_at),
        (TaskStatus::Queued, 1, at(62))
    );
    assert_eq!(rescued.runner_id, None);
    assert!(
        rescued
            .msg
            .as_deref()
            .is_some_and(|msg| msg.contains("runner-1")),
        "{:?}",
        rescued.msg
    );
    assert_eq!(
        store.get_task(&acme.id, &alive.task.id).await?.status,
        TaskStatus::Preparing
    );
    assert_eq!(
        store.get_task(&acme.id, &late.task.id).await?.status,
        TaskStatus::Preparing
    );
    assert_eq!(
        store.get_task(&acme.id, &finished.task.id).await?.status,
        TaskStatus::Complete
    );

    // At the cap the rescuer gives up on the task.
    assert_eq!(
        store.rescue_expired(at(91), 1).await?,
        rescued_one(&late.task.id, "hello", TaskStatus::Error)
    );
    let failed = store.get_task(&acme.id, &late.task.id).await?;
    assert_eq!(failed.status, TaskStatus::Error);
    assert!(
        failed
            .msg
            .as_deref()
            .is_some_and(|msg| msg.starts_with("infrastructure failure after 1 attempts"))
    );
    assert!(store.rescue_expired(at(91), 5).await?.is_empty());
    Ok(())
}

pub async fn heartbeat_extends_the_lease(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(0)).await?;
    assert_eq!(leased.lease.expires_at, at(60));
    let reply = store
        .heartbeat(&id, leased.lease.token, 120, at(50))
        .await?;
    assert_eq!((reply.expires_at, reply.cancel_requested), (at(170), false));
    assert!(store.rescue_expired(at(100), 5).await?.is_empty());
    assert_eq!(
        store.rescue_expired(at(171), 5).await?,
        rescued_one(&id, "hello", TaskStatus::Queued)
    );
    assert_not_found(
        store.heartbeat("no-such-task", 1, 60, at(0)).await,
        "no-such-task",
    );
    Ok(())
}

pub async fn log_is_capped_with_one_marker(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let token = leased.lease.token;
    assert_not_found(store.get_log(&acme.id, &id).await, "log");
    assert_eq!(store.append_log(&id, token, b"", 100, at(2)).await?, 0);
    assert_not_found(store.get_log(&acme.id, &id).await, "log");

    let cap = 100;
    assert_eq!(
        store.append_log(&id, token, b"hello ", cap, at(2)).await?,
        6
    );
    store.mark_running(&id, token, at(3), at(3)).await?;
    assert_eq!(
        store.append_log(&id, token, b"world\n", cap, at(3)).await?,
        12
    );
    assert_eq!(store.get_log(&acme.id, &id).await?, b"hello world\n");
    assert_eq!(store.get_task(&acme.id, &id).await?.log_size, 12);

    let size = store
        .append_log(&id, token, &[b'x'; 200], cap, at(4))
        .await?;
    assert_eq!(size, cap);
    let log = store.get_log(&acme.id, &id).await?;
    assert_eq!(log.len() as u64, cap);
    let marker = format!("\n[stevedore: log truncated at {cap} bytes]\n");
    assert!(log.starts_with(b"hello world\nxxx"));
    assert!(
        log.ends_with(marker.as_bytes()),
        "{}",
        String::from_utf8_lossy(&log)
    );
    // Later output is dropped; the marker appears once.
    assert_eq!(
        store
            .append_log(&id, token, b"more output", cap, at(5))
            .await?,
        cap
    );
    assert_eq!(store.get_log(&acme.id, &id).await?, log);
    assert_eq!(store.get_task(&acme.id, &id).await?.log_size, cap);

    // A log filled exactly to the cap is cut back to make room for the marker.
    let other = enqueue_one(store, &acme.id, new_task("hello"), at(6)).await?;
    let leased = lease_one(store, at(6)).await?;
    assert_eq!(
        store
            .append_log(&other, leased.lease.token, &[b'a'; 60], cap, at(7))
            .await?,
        60
    );
    assert_eq!(
        store
            .append_log(&other, leased.lease.token, &[b'b'; 40], cap, at(7))
            .await?,
        cap
    );
    assert_eq!(
        store
            .append_log(&other, leased.lease.token, b"c", cap, at(8))
            .await?,
        cap
    );
    let log = store.get_log(&acme.id, &other).await?;
    let kept = cap as usize - marker.len();
    assert_eq!(log.len() as u64, cap);
    assert!(log[..kept].iter().take(60).all(|b| *b == b'a'));
    assert!(log[60.min(kept)..kept].iter().all(|b| *b == b'b'));
    assert!(log.ends_with(marker.as_bytes()));
    Ok(())
}

pub async fn log_is_read_from_any_offset_with_the_task_state(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let slice = store.get_log_since(&acme.id, &id, 0, 1024).await?;
    assert_eq!(
        slice,
        LogSlice {
            bytes: Vec::new(),
            size: 0,
            truncated_at: None,
            status: TaskStatus::Queued,
            percent: None,
            msg: None,
        },
        "a task without a log has an empty one"
    );

    let token = lease_one(store, at(1)).await?.lease.token;
    store.mark_running(&id, token, at(2), at(2)).await?;
    let mut log = Vec::new();
    for chunk in [&b"hello "[..], b"wor", b"ld\n", "caf\u{e9}\n".as_bytes()] {
        store.append_log(&id, token, chunk, 1024, at(3)).await?;
        log.extend_from_slice(chunk);
    }
    store
        .runner_progress(&id, token, Some(40), Some("warming up"), at(4))
        .await?;
    let size = log.len() as u64;
    let slice = store.get_log_since(&acme.id, &id, 0, 1024).await?;
    assert_eq!(slice.bytes, log);
    assert_eq!(slice.size, size);
    assert_eq!(
        (slice.status, slice.percent, slice.msg.as_deref()),
        (TaskStatus::Running, Some(40), Some("warming up"))
    );
    assert_eq!(slice.truncated_at, None);

    // Every offset and bound, across and inside chunks, reads exactly that part of the log.
    for offset in 0..=size + 2 {
        for max_bytes in [0u32, 1, 2, 5, 100] {
            let slice = store
                .get_log_since(&acme.id, &id, offset, max_bytes)
                .await?;
            let from = (offset as usize).min(log.len());
            let to = (offset + u64::from(max_bytes)).min(size) as usize;
            assert_eq!(
                slice.bytes,
                log[from..to.max(from)],
                "offset {offset}, max_bytes {max_bytes}"
            );
            assert_eq!(slice.size, size);
        }
    }

    store
        .complete(&id, token, &exited(0), &RunReport::default(), at(5))
        .await?;
    let slice = store.get_log_since(&acme.id, &id, 6, 1024).await?;
    assert_eq!((slice.status, slice.size), (TaskStatus::Complete, size));
    assert_eq!(slice.bytes, log[6..]);

    assert_not_found(
        store.get_log_since(&acme.id, "no-such-task", 0, 10).await,
        "no-such-task",
    );
    Ok(())
}

pub async fn log_slices_show_where_the_truncation_marker_begins(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let token = lease_one(store, at(1)).await?.lease.token;
    let cap = 100;
    store
        .append_log(&id, token, &[b'a'; 90], cap, at(2))
        .await?;
    let before = store.get_log_since(&acme.id, &id, 0, 1000).await?;
    assert_eq!((before.size, before.truncated_at), (90, None));

    // The next write passes the cap: the log is cut back and ends with the marker.
    store
        .append_log(&id, token, &[b'b'; 20], cap, at(3))
        .await?;
    let marker = format!("\n[stevedore: log truncated at {cap} bytes]\n");
    let kept = cap - marker.len() as u64;
    let slice = store.get_log_since(&acme.id, &id, 0, 1000).await?;
    assert_eq!((slice.size, slice.truncated_at), (cap, Some(kept)));
    assert!(slice.bytes.ends_with(marker.as_bytes()));
    let tail = store.get_log_since(&acme.id, &id, kept, 1000).await?;
    assert_eq!(tail.bytes, marker.as_bytes());
    Ok(())
}

// === cancel ===

pub async fn cancel_queued_leased_and_finished_tasks(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let running = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let queued = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let leased = lease_one(store, at(2)).await?;
    assert_eq!(leased.task.id, running);
    store
        .mark_running(&running, leased.lease.token, at(3), at(3))
        .await?;

    let cancelled = store.cancel_task(&acme.id, &queued, at(4)).await?;
    assert_eq!(
        (cancelled.status, cancelled.end_time),
        (TaskStatus::Cancelled, Some(at(4)))
    );
    assert_eq!(store.get_task(&acme.id, &queued).await?, cancelled);
    assert!(
        store
            .lease(&lease_request("runner-1", 5), at(5))
            .await?
            .is_empty()
    );

    let flagged = store.cancel_task(&acme.id, &running, at(5)).await?;
    assert_eq!(
        (flagged.status, flagged.cancel_requested),
        (TaskStatus::Running, true)
    );
    let reply = store
        .heartbeat(&running, leased.lease.token, 60, at(6))
        .await?;
    assert!(reply.cancel_requested);
    let done = store
        .complete(
            &running,
            leased.lease.token,
            &TaskOutcome::Cancelled,
            &RunReport::default(),
            at(7),
        )
        .await?;
    assert_eq!(done.status, TaskStatus::Cancelled);

    for finished in [&queued, &running] {
        match store.cancel_task(&acme.id, finished, at(8)).await {
            Err(StoreError::Conflict(message)) => {
                assert!(
                    message.contains(finished.as_str()) && message.contains("already"),
                    "{message}"
                );
            }
            other => panic!("cancelling a finished task: expected Conflict, got {other:?}"),
        }
    }
    assert_not_found(store.cancel_task(&acme.id, "nope", at(8)).await, "nope");

    // A task flagged for cancellation that its runner gives back is cancelled, not requeued.
    let flagged = enqueue_one(store, &acme.id, new_task("hello"), at(9)).await?;
    let leased = lease_one(store, at(9)).await?;
    store.cancel_task(&acme.id, &flagged, at(10)).await?;
    let requeue = Requeue {
        reason: "engine down".to_owned(),
        due_at: at(11),
        max_infra_attempts: 5,
    };
    let given_back = store
        .requeue(&flagged, leased.lease.token, &requeue, at(11))
        .await?;
    assert_eq!(given_back.status, TaskStatus::Cancelled);
    Ok(())
}

pub async fn cancel_all_cancels_a_codes_tasks(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let code = store
        .push_code(&acme.id, &image_spec("hello"), None, at(0))
        .await?;
    store
        .push_code(&acme.id, &image_spec("other"), None, at(0))
        .await?;
    let done = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let leased = lease_one(store, at(2)).await?;
    assert_eq!(leased.task.id, done);
    store
        .mark_running(&done, leased.lease.token, at(2), at(2))
        .await?;
    store
        .complete(
            &done,
            leased.lease.token,
            &exited(0),
            &RunReport::default(),
            at(3),
        )
        .await?;
    let running = enqueue_one(store, &acme.id, new_task("hello"), at(4)).await?;
    let leased = lease_one(store, at(5)).await?;
    assert_eq!(leased.task.id, running);
    let queued = store
        .enqueue(&acme.id, &vec![new_task("hello"); 2], at(6))
        .await?;
    let untouched = enqueue_one(store, &acme.id, new_task("other"), at(6)).await?;

    assert_eq!(
        store.cancel_all(&acme.id, &code.id, at(7)).await?,
        code_cancellation("hello", 2, 1)
    );
    for task in &queued {
        let task = store.get_task(&acme.id, &task.id).await?;
        assert_eq!(
            (task.status, task.end_time),
            (TaskStatus::Cancelled, Some(at(7)))
        );
    }
    assert!(store.get_task(&acme.id, &running).await?.cancel_requested);
    let reply = store
        .heartbeat(&running, leased.lease.token, 60, at(7))
        .await?;
    assert!(
        reply.cancel_requested,
        "the runner learns of the cancel on its next heartbeat"
    );
    assert_eq!(
        store.get_task(&acme.id, &done).await?.status,
        TaskStatus::Complete
    );
    assert_eq!(
        store.get_task(&acme.id, &untouched).await?.status,
        TaskStatus::Queued
    );
    assert_eq!(
        store.cancel_all(&acme.id, &code.id, at(8)).await?,
        code_cancellation("hello", 0, 0)
    );
    assert_not_found(store.cancel_all(&acme.id, "nope", at(8)).await, "nope");
    // A task asked to cancel whose runner went silent ends `cancelled` when rescued.
    assert_eq!(
        store.rescue_expired(at(68), 5).await?,
        rescued_one(&running, "hello", TaskStatus::Cancelled)
    );
    Ok(())
}

pub async fn progress_from_the_task_and_the_runner(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, leased.lease.token, at(2), at(2))
        .await?;
    let task = store
        .set_progress(&acme.id, &id, Some(10), Some("warming up"), at(3))
        .await?;
    assert_eq!(
        (task.percent, task.msg.as_deref()),
        (Some(10), Some("warming up"))
    );
    store
        .runner_progress(&id, leased.lease.token, Some(55), None, at(4))
        .await?;
    let task = store.get_task(&acme.id, &id).await?;
    assert_eq!(
        (task.percent, task.msg.as_deref(), task.updated_at),
        (Some(55), Some("warming up"), at(4))
    );
    store
        .complete(
            &id,
            leased.lease.token,
            &exited(0),
            &RunReport::default(),
            at(5),
        )
        .await?;
    assert!(matches!(
        store
            .set_progress(&acme.id, &id, Some(99), None, at(6))
            .await,
        Err(StoreError::Conflict(_))
    ));
    Ok(())
}

// === isolation and lists ===

pub async fn project_isolation(store: &dyn Store) -> Result<()> {
    let mine = project(store, "mine").await?;
    let theirs = project(store, "theirs").await?;
    let code = store
        .push_code(&mine.id, &image_spec("hello"), None, at(0))
        .await?;
    let id = enqueue_one(store, &mine.id, new_task("hello"), at(1)).await?;
    let leased = lease_one(store, at(2)).await?;
    store
        .append_log(&id, leased.lease.token, b"secret", 1024, at(3))
        .await?;
    let schedule = store
        .create_schedules(
            &mine.id,
            &[(schedule_spec("hello", 60), Some(at(60)))],
            at(3),
        )
        .await?
        .remove(0);

    let other = theirs.id.as_str();
    assert_not_found(store.get_code(other, &code.id).await, &code.id);
    assert_not_found(store.get_code_by_name(other, "hello").await, "hello");
    assert_not_found(store.get_revision(other, &code.id, 1).await, &code.id);
    assert_not_found(store.list_revisions(other, &code.id, ALL).await, &code.id);
    assert_not_found(store.get_package(other, &code.id, None).await, &code.id);
    assert_not_found(
        store
            .code_stats(other, &code.id, StatsWindow::default())
            .await,
        &code.id,
    );
    assert_not_found(
        store.set_code_paused(other, &code.id, true, at(4)).await,
        &code.id,
    );
    assert_not_found(store.cancel_all(other, &code.id, at(4)).await, &code.id);
    assert_not_found(store.delete_code(other, &code.id, at(4)).await, &code.id);
    assert_not_found(
        store.enqueue(other, &[new_task("hello")], at(4)).await,
        "hello",
    );
    assert!(store.list_codes(other, ALL).await?.is_empty());

    assert_not_found(store.get_task(other, &id).await, &id);
    assert_not_found(store.cancel_task(other, &id, at(4)).await, &id);
    assert_not_found(
        store.set_progress(other, &id, Some(1), None, at(4)).await,
        &id,
    );
    assert_not_found(store.get_log(other, &id).await, &id);
    assert_not_found(store.get_log_since(other, &id, 0, 1024).await, &id);
    assert!(
        store
            .list_tasks(other, &TaskFilter::default(), ALL)
            .await?
            .is_empty()
    );

    assert_not_found(store.get_schedule(other, &schedule.id).await, &schedule.id);
    assert_not_found(
        store.cancel_schedule(other, &schedule.id, at(4)).await,
        &schedule.id,
    );
    assert!(store.list_schedules(other, ALL).await?.is_empty());
    assert_not_found(
        store
            .create_schedules(other, &[(schedule_spec("hello", 60), Some(at(60)))], at(4))
            .await,
        "hello",
    );

    // Nothing of theirs changed anything of mine.
    assert!(!store.get_code(&mine.id, &code.id).await?.paused);
    let task = store.get_task(&mine.id, &id).await?;
    assert_eq!(
        (task.status, task.cancel_requested, task.percent),
        (TaskStatus::Preparing, false, None)
    );
    assert_eq!(
        store.get_schedule(&mine.id, &schedule.id).await?.status,
        ScheduleStatus::Scheduled
    );
    // The same code name in another project is another code.
    let their_code = store
        .push_code(other, &image_spec("hello"), None, at(5))
        .await?;
    assert_ne!(their_code.id, code.id);
    assert_eq!(their_code.rev, 1);
    Ok(())
}

pub async fn list_tasks_filters_and_pages(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    store
        .push_code(&acme.id, &image_spec("x"), None, at(0))
        .await?;
    store
        .push_code(&acme.id, &image_spec("y"), None, at(0))
        .await?;
    let x1 = enqueue_one(store, &acme.id, new_task("x"), at(1)).await?;
    let x2 = enqueue_one(store, &acme.id, new_task("x"), at(2)).await?;
    let labelled = NewTask {
        label: Some("nightly".to_owned()),
        ..new_task("x")
    };
    let x3 = enqueue_one(store, &acme.id, labelled, at(3)).await?;
    let y4 = enqueue_one(store, &acme.id, new_task("y"), at(4)).await?;
    let leased = lease_one(store, at(5)).await?;
    assert_eq!(leased.task.id, x1);
    store.cancel_task(&acme.id, &x2, at(6)).await?;

    let project_id = acme.id.as_str();
    let list = |filter: TaskFilter, page: Page| async move {
        let tasks = store.list_tasks(project_id, &filter, page).await?;
        Ok::<_, StoreError>(tasks.into_iter().map(|task| task.id).collect::<Vec<_>>())
    };
    let all = TaskFilter::default();
    assert_eq!(
        list(all.clone(), ALL).await?,
        vec![y4.clone(), x3.clone(), x2.clone(), x1.clone()]
    );
    assert_eq!(
        list(all.clone(), page(1, 3)).await?,
        vec![y4.clone(), x3.clone(), x2.clone()]
    );
    assert_eq!(list(all.clone(), page(2, 3)).await?, vec![x1.clone()]);
    assert!(list(all.clone(), page(3, 3)).await?.is_empty());
    let by_code = TaskFilter {
        code_name: Some("x".to_owned()),
        ..TaskFilter::default()
    };
    assert_eq!(
        list(by_code, ALL).await?,
        vec![x3.clone(), x2.clone(), x1.clone()]
    );
    let by_status = TaskFilter {
        statuses: vec![TaskStatus::Queued, TaskStatus::Cancelled],
        ..TaskFilter::default()
    };
    assert_eq!(
        list(by_status, ALL).await?,
        vec![y4.clone(), x3.clone(), x2.clone()]
    );
    let by_time = TaskFilter {
        from_time: Some(at(2)),
        to_time: Some(at(3)),
        ..TaskFilter::default()
    };
    assert_eq!(list(by_time, ALL).await?, vec![x3.clone(), x2.clone()]);
    let by_label = TaskFilter {
        label: Some("nightly".to_owned()),
        ..TaskFilter::default()
    };
    assert_eq!(list(by_label, ALL).await?, vec![x3.clone()]);
    let everything = TaskFilter {
        code_name: Some("x".to_owned()),
        label: None,
        statuses: vec![TaskStatus::Preparing],
        from_time: Some(at(1)),
        to_time: Some(at(1)),
    };
    assert_eq!(list(everything, ALL).await?, vec![x1]);
    Ok(())
}

pub async fn code_stats_count_by_status(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let empty = store
        .code_stats(&acme.id, &code.id, StatsWindow::default())
        .await?;
    assert!(empty.by_status.iter().all(|(_, count)| *count == 0));
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 5], at(0))
        .await?;
    let first = lease_one(store, at(1)).await?;
    let second = lease_one(store, at(1)).await?;
    store
        .mark_running(&second.task.id, second.lease.token, at(2), at(2))
        .await?;
    store
        .complete(
            &second.task.id,
            second.lease.token,
            &exited(1),
            &RunReport::default(),
            at(3),
        )
        .await?;
    let third = lease_one(store, at(4)).await?;
    store
        .mark_running(&third.task.id, third.lease.token, at(4), at(4))
        .await?;
    let stats = store
        .code_stats(&acme.id, &code.id, StatsWindow::default())
        .await?;
    let count = |status: TaskStatus| {
        stats
            .by_status
            .iter()
            .find(|(known, _)| *known == status)
            .map_or(0, |(_, count)| *count)
    };
    assert_eq!(count(TaskStatus::Queued), 2);
    assert_eq!(count(TaskStatus::Preparing), 1);
    assert_eq!(count(TaskStatus::Running), 1);
    assert_eq!(count(TaskStatus::Error), 1);
    assert_eq!(count(TaskStatus::Complete), 0);
    assert_eq!(first.task.status, TaskStatus::Preparing);

    // IronWorker's start_date/end_date: only tasks last changed inside the window count.
    let counts = |stats: CodeStats| -> Vec<(TaskStatus, u64)> {
        stats
            .by_status
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .collect()
    };
    let late = StatsWindow {
        updated_from: Some(at(3)),
        updated_to: None,
    };
    assert_eq!(
        counts(store.code_stats(&acme.id, &code.id, late).await?),
        vec![(TaskStatus::Running, 1), (TaskStatus::Error, 1)]
    );
    let early = StatsWindow {
        updated_from: None,
        updated_to: Some(at(1)),
    };
    assert_eq!(
        counts(store.code_stats(&acme.id, &code.id, early).await?),
        vec![(TaskStatus::Queued, 2), (TaskStatus::Preparing, 1)]
    );
    Ok(())
}

// === schedules ===

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

pub async fn schedules_are_created_all_or_nothing_and_cancelled(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let bad = [
        (schedule_spec("hello", 60), Some(at(60))),
        (schedule_spec("missing", 60), Some(at(60))),
    ];
    assert_not_found(
        store.create_schedules(&acme.id, &bad, at(1)).await,
        "missing",
    );
    assert!(store.list_schedules(&acme.id, ALL).await?.is_empty());

    let cron = ScheduleSpec {
        timing: ScheduleTiming::Cron {
            expression: "*/5 * * * *".to_owned(),
            timezone: "Europe/Berlin".to_owned(),
        },
        ..schedule_spec("hello", 60)
    };
    let created = store
        .create_schedules(
            &acme.id,
            &[
                (schedule_spec("hello", 60), Some(at(60))),
                (cron.clone(), None),
            ],
            at(2),
        )
        .await?;
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let every = &created[0];
    assert_eq!(
        (every.status, every.next_start, every.run_count),
        (ScheduleStatus::Scheduled, Some(at(60)), 0)
    );
    assert_eq!(
        (every.code_id.as_str(), every.project_id.as_str()),
        (code.id.as_str(), acme.id.as_str())
    );
    assert_eq!(every.spec, schedule_spec("hello", 60));
    assert_eq!(
        (created[1].status, created[1].next_start),
        (ScheduleStatus::Complete, None)
    );
    assert_eq!(created[1].spec, cron);
    assert_eq!(&store.get_schedule(&acme.id, &every.id).await?, every);
    let later = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 120), Some(at(120)))],
            at(3),
        )
        .await?
        .remove(0);
    let listed: Vec<String> = store
        .list_schedules(&acme.id, ALL)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed[0], later.id, "newest first");
    assert_eq!(listed.len(), 3);
    assert_eq!(store.list_schedules(&acme.id, page(2, 2)).await?.len(), 1);

    let cancelled = store.cancel_schedule(&acme.id, &every.id, at(4)).await?;
    assert_eq!(
        (cancelled.status, cancelled.next_start),
        (ScheduleStatus::Cancelled, None)
    );
    assert_eq!(store.get_schedule(&acme.id, &every.id).await?, cancelled);
    // Cancelling again is not an error and changes nothing.
    assert_eq!(
        store.cancel_schedule(&acme.id, &every.id, at(5)).await?,
        cancelled
    );
    assert_not_found(store.cancel_schedule(&acme.id, "nope", at(5)).await, "nope");
    assert!(
        store
            .due_schedules(at(1000), 10)
            .await?
            .iter()
            .all(|s| s.id != every.id)
    );
    Ok(())
}

pub async fn schedules_fire_once_per_due_time(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let schedule = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 60), Some(at(60)))],
            at(0),
        )
        .await?
        .remove(0);
    assert!(store.due_schedules(at(59), 10).await?.is_empty());
    let due = store.due_schedules(at(61), 10).await?;
    assert_eq!(due, vec![schedule.clone()]);

    let task = store
        .fire_schedule(&schedule.id, at(60), Some(at(120)), at(61))
        .await?
        .ok_or_else(|| StoreError::Corrupt("the schedule queued no task".to_owned()))?;
    assert_eq!(task.schedule_id.as_deref(), Some(schedule.id.as_str()));
    assert_eq!(
        (task.status, task.priority, task.timeout_secs),
        (TaskStatus::Queued, 1, 60)
    );
    assert_eq!(
        (task.payload.as_str(), task.label.as_deref()),
        (r#"{"from":"schedule"}"#, Some("nightly"))
    );
    assert_eq!(store.get_task(&acme.id, &task.id).await?, task);
    let fired = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!(
        (fired.run_count, fired.next_start, fired.last_run_time),
        (1, Some(at(120)), Some(at(61)))
    );
    assert!(store.due_schedules(at(61), 10).await?.is_empty());

    // A second scheduler that saw the same due time cannot fire it again.
    assert!(matches!(
        store
            .fire_schedule(&schedule.id, at(60), Some(at(120)), at(62))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?
            .len(),
        1
    );

    store
        .fire_schedule(&schedule.id, at(120), None, at(121))
        .await?;
    let complete = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!(
        (complete.status, complete.next_start, complete.run_count),
        (ScheduleStatus::Complete, None, 2)
    );
    assert!(store.due_schedules(at(10_000), 10).await?.is_empty());
    assert!(matches!(
        store
            .fire_schedule(&schedule.id, at(120), None, at(122))
            .await,
        Err(StoreError::Conflict(_))
    ));
    Ok(())
}

pub async fn a_schedule_at_its_max_concurrency_passes_a_fire_time(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let spec = ScheduleSpec {
        delay_secs: 30,
        max_concurrency: Some(1),
        run_times: Some(3),
        ..schedule_spec("hello", 60)
    };
    let schedule = store
        .create_schedules(&acme.id, &[(spec, Some(at(60)))], at(0))
        .await?
        .remove(0);
    let first = store
        .fire_schedule(&schedule.id, at(60), Some(at(120)), at(60))
        .await?
        .ok_or_else(|| StoreError::Corrupt("the first fire queued no task".to_owned()))?;
    // The schedule's delay is its tasks' delay.
    assert_eq!((first.delay_secs, first.due_at), (30, at(90)));

    // Its one task is still queued: the next fire time passes without a task, uncounted.
    let passed = store
        .fire_schedule(&schedule.id, at(120), Some(at(180)), at(120))
        .await?;
    assert_eq!(passed, None);
    let after = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!(
        (after.status, after.run_count, after.next_start),
        (ScheduleStatus::Scheduled, 1, Some(at(180)))
    );
    assert_eq!(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?
            .len(),
        1
    );

    // Once its task is finished, it fires again.
    store.cancel_task(&acme.id, &first.id, at(150)).await?;
    let second = store
        .fire_schedule(&schedule.id, at(180), Some(at(240)), at(180))
        .await?;
    assert!(second.is_some());
    let after = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!((after.run_count, after.next_start), (2, Some(at(240))));
    Ok(())
}

pub async fn a_scheduled_schedule_can_be_changed(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let schedule = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 60), Some(at(60)))],
            at(0),
        )
        .await?
        .remove(0);
    let changed_spec = ScheduleSpec {
        payload: "new".to_owned(),
        delay_secs: 5,
        max_concurrency: Some(2),
        ..schedule_spec("hello", 120)
    };
    let changed = store
        .update_schedule(&acme.id, &schedule.id, &changed_spec, Some(at(120)), at(10))
        .await?;
    assert_eq!(
        (&changed.spec, changed.next_start, changed.updated_at),
        (&changed_spec, Some(at(120)), at(10))
    );
    assert_eq!(store.get_schedule(&acme.id, &schedule.id).await?, changed);
    assert!(store.due_schedules(at(61), 10).await?.is_empty());

    // Another project's token cannot reach it; a cancelled one cannot change.
    let other = store.create_project("other", at(0)).await?;
    assert_not_found(
        store
            .update_schedule(&other.id, &schedule.id, &changed_spec, None, at(11))
            .await,
        &schedule.id,
    );
    store
        .cancel_schedule(&acme.id, &schedule.id, at(12))
        .await?;
    assert!(matches!(
        store
            .update_schedule(&acme.id, &schedule.id, &changed_spec, Some(at(120)), at(13))
            .await,
        Err(StoreError::Conflict(_))
    ));
    Ok(())
}

// === user retries ===

/// A project with a code `flaky` that retries `retries` times, `delay_secs` apart.
async fn project_with_retrying_code(
    store: &dyn Store,
    retries: u32,
    delay_secs: u32,
    backoff: RetriesBackoff,
) -> Result<Project> {
    let project = project(store, "acme").await?;
    let spec = CodeSpec {
        retries,
        retries_delay_secs: delay_secs,
        retries_backoff: backoff,
        ..image_spec("flaky")
    };
    store.push_code(&project.id, &spec, None, at(0)).await?;
    Ok(project)
}

/// Leases the one due task at `now`, starts it (unless the outcome is a setup failure) and
/// completes it with `outcome` a second later.
async fn run_and_end(store: &dyn Store, outcome: &TaskOutcome, now: Timestamp) -> Result<Task> {
    let leased = lease_one(store, now).await?;
    let (id, token) = (leased.task.id.as_str(), leased.lease.token);
    if !matches!(outcome, TaskOutcome::SetupFailed { .. }) {
        store.mark_running(id, token, now, now).await?;
    }
    let end = now + Duration::seconds(1);
    store
        .complete(id, token, outcome, &RunReport::default(), end)
        .await
}

/// The project's tasks that are retries, oldest first.
async fn retries_of(store: &dyn Store, project_id: &str) -> Result<Vec<Task>> {
    let mut tasks = store
        .list_tasks(project_id, &TaskFilter::default(), ALL)
        .await?;
    tasks.retain(|task| task.original_task_id.is_some());
    tasks.sort_by_key(|task| task.retry_count);
    Ok(tasks)
}

pub async fn a_failed_task_with_retries_left_queues_one_retry(store: &dyn Store) -> Result<()> {
    let acme = project_with_retrying_code(store, 2, 30, RetriesBackoff::Fixed).await?;
    let task = NewTask {
        payload: "{\"n\":7}".to_owned(),
        priority: 1,
        timeout_secs: 120,
        label: Some("nightly".to_owned()),
        ..new_task("flaky")
    };
    let id = enqueue_one(store, &acme.id, task, at(0)).await?;
    // A newer revision without retries changes nothing for the task that pinned revision 1.
    store
        .push_code(&acme.id, &image_spec("flaky"), None, at(1))
        .await?;

    let failed = run_and_end(store, &exited(1), at(10)).await?;
    assert_eq!(failed.status, TaskStatus::Error);
    assert_eq!(failed.msg.as_deref(), Some("exited with code 1"));
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), 1, "{retries:#?}");
    let retry = &retries[0];
    assert_ne!(retry.id, id);
    assert_eq!(
        (
            retry.status,
            retry.retry_count,
            retry.original_task_id.as_deref()
        ),
        (TaskStatus::Queued, 1, Some(id.as_str()))
    );
    assert_eq!(
        (
            retry.code_id.as_str(),
            retry.code_rev,
            retry.payload.as_str(),
            retry.priority,
            retry.timeout_secs,
            retry.label.as_deref(),
            retry.cluster.as_str(),
            retry.schedule_id.as_deref(),
        ),
        (
            failed.code_id.as_str(),
            1,
            "{\"n\":7}",
            1,
            120,
            Some("nightly"),
            "default",
            None,
        )
    );
    assert_eq!(
        (retry.created_at, retry.due_at, retry.delay_secs),
        (at(11), at(41), 30),
        "due retries_delay after the failure was recorded"
    );
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(40))
            .await?
            .is_empty()
    );

    // The retry fails too (out of memory): the chain goes on, pointing at the first task.
    let failed_again =
        run_and_end(store, &TaskOutcome::OutOfMemory { limit_mib: 256 }, at(41)).await?;
    assert_eq!(failed_again.id, retry.id);
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), 2, "{retries:#?}");
    assert_eq!(
        (
            retries[1].retry_count,
            retries[1].original_task_id.as_deref()
        ),
        (2, Some(id.as_str()))
    );
    assert_eq!(retries[1].due_at, at(72));

    // Retries exhausted: the last failure queues nothing.
    let last = run_and_end(store, &exited(2), at(72)).await?;
    assert_eq!((last.status, last.retry_count), (TaskStatus::Error, 2));
    assert_eq!(retries_of(store, &acme.id).await?.len(), 2);
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(10_000))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn timeouts_and_setup_failures_retry_but_cancels_and_successes_do_not(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_retrying_code(store, 5, 0, RetriesBackoff::Fixed).await?;
    let retried = [
        TaskOutcome::TimedOut { timeout_secs: 5 },
        TaskOutcome::SetupFailed {
            message: "image not found: nope:latest".to_owned(),
        },
    ];
    for outcome in retried {
        let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
        run_and_end(store, &outcome, at(1)).await?;
        let mut retries = retries_of(store, &acme.id).await?;
        retries.retain(|retry| retry.original_task_id.as_deref() == Some(id.as_str()));
        assert_eq!(retries.len(), 1, "{outcome:?}");
        // Out of the way of the next case.
        store.cancel_task(&acme.id, &retries[0].id, at(2)).await?;
    }
    let count = |tasks: Vec<Task>| tasks.len();
    let before = count(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?,
    );
    // Success and cancellation never retry.
    for outcome in [exited(0), TaskOutcome::Cancelled] {
        enqueue_one(store, &acme.id, new_task("flaky"), at(3)).await?;
        run_and_end(store, &outcome, at(4)).await?;
    }
    // A task whose user asked to cancel it does not retry, even if it exits non-zero first.
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(5)).await?;
    let leased = lease_one(store, at(6)).await?;
    store
        .mark_running(&id, leased.lease.token, at(6), at(6))
        .await?;
    store.cancel_task(&acme.id, &id, at(7)).await?;
    let failed = store
        .complete(
            &id,
            leased.lease.token,
            &exited(137),
            &RunReport::default(),
            at(8),
        )
        .await?;
    assert_eq!(failed.status, TaskStatus::Error);
    // A cancelled queued task never ran; nothing retries it either.
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(9)).await?;
    store.cancel_task(&acme.id, &id, at(9)).await?;
    let after = count(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?,
    );
    assert_eq!(after, before + 4, "no retries were queued");

    // A deleted code's failures are not retried: its queued tasks were cancelled with it.
    enqueue_one(store, &acme.id, new_task("flaky"), at(10)).await?;
    let leased = lease_one(store, at(11)).await?;
    let token = leased.lease.token;
    store
        .mark_running(&leased.task.id, token, at(11), at(11))
        .await?;
    store
        .delete_code(&acme.id, &leased.task.code_id, at(12))
        .await?;
    store
        .complete(
            &leased.task.id,
            token,
            &exited(1),
            &RunReport::default(),
            at(13),
        )
        .await?;
    let queued = store
        .list_tasks(
            &acme.id,
            &TaskFilter {
                statuses: vec![TaskStatus::Queued],
                ..TaskFilter::default()
            },
            ALL,
        )
        .await?;
    assert!(queued.is_empty(), "{queued:#?}");
    Ok(())
}

pub async fn infrastructure_give_ups_spend_no_user_retry(store: &dyn Store) -> Result<()> {
    let acme = project_with_retrying_code(store, 3, 0, RetriesBackoff::Fixed).await?;
    // The runner gives up on the infrastructure.
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let requeue = Requeue {
        reason: "engine down".to_owned(),
        due_at: at(2),
        max_infra_attempts: 1,
    };
    let gave_up = store
        .requeue(&id, leased.lease.token, &requeue, at(2))
        .await?;
    assert_eq!(gave_up.status, TaskStatus::Error);
    // The rescuer gives up on an expired lease.
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(3)).await?;
    lease_one(store, at(4)).await?;
    assert_eq!(
        store.rescue_expired(at(1000), 1).await?,
        rescued_one(&id, "flaky", TaskStatus::Error)
    );
    assert_eq!(
        store.get_task(&acme.id, &id).await?.status,
        TaskStatus::Error
    );
    // Infrastructure failures are the infrastructure's: the user's retries stay untouched.
    assert!(retries_of(store, &acme.id).await?.is_empty());
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(10_000))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn a_stale_completion_queues_no_retry(store: &dyn Store) -> Result<()> {
    let acme = project_with_retrying_code(store, 3, 0, RetriesBackoff::Fixed).await?;
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
    let dead = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, dead.lease.token, at(1), at(1))
        .await?;
    // The runner vanishes; its lease expires and the task is rescued.
    assert_eq!(
        store.rescue_expired(at(100), 5).await?,
        rescued_one(&id, "flaky", TaskStatus::Queued)
    );
    assert_stale(
        store
            .complete(
                &id,
                dead.lease.token,
                &exited(1),
                &RunReport::default(),
                at(101),
            )
            .await,
        "complete",
    );
    assert!(
        retries_of(store, &acme.id).await?.is_empty(),
        "a refused completion queues no retry"
    );
    // The rescued run fails for real: exactly one retry, however often it is reported.
    let alive = lease_one(store, at(102)).await?;
    store
        .mark_running(&id, alive.lease.token, at(102), at(102))
        .await?;
    store
        .complete(
            &id,
            alive.lease.token,
            &exited(1),
            &RunReport::default(),
            at(103),
        )
        .await?;
    for token in [dead.lease.token, alive.lease.token] {
        assert_stale(
            store
                .complete(&id, token, &exited(1), &RunReport::default(), at(104))
                .await,
            "a second complete",
        );
    }
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), 1, "{retries:#?}");
    assert_eq!(retries[0].retry_count, 1);
    Ok(())
}

pub async fn exponential_backoff_doubles_the_retry_delay(store: &dyn Store) -> Result<()> {
    let acme = project_with_retrying_code(store, 4, 10, RetriesBackoff::Exponential).await?;
    let code = store.get_code_by_name(&acme.id, "flaky").await?;
    assert_eq!(code.spec.retries_backoff, RetriesBackoff::Exponential);
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
    let mut now = at(1);
    let mut delays = Vec::new();
    for _ in 0..5 {
        let failed = run_and_end(store, &exited(1), now).await?;
        let retries = retries_of(store, &acme.id).await?;
        match retries
            .iter()
            .find(|task| task.retry_count == failed.retry_count + 1)
        {
            Some(retry) => {
                assert_eq!(retry.original_task_id.as_deref(), Some(id.as_str()));
                let ended = failed.end_time.expect("a finished task has an end time");
                delays.push((retry.due_at - ended).num_seconds());
                now = retry.due_at;
            }
            None => break,
        }
    }
    assert_eq!(
        delays,
        [10, 20, 40, 80],
        "four retries, each waiting twice as long"
    );
    Ok(())
}

/// With nobody else on the store, this process leads, and keeps leading while it holds on.
pub async fn a_lone_process_can_lead(store: &dyn Store) -> Result<()> {
    let leadership = store.try_lead().await?.expect("nobody else leads");
    assert!(leadership.is_held().await);
    assert!(
        leadership.is_held().await,
        "asking again does not give it up"
    );
    Ok(())
}

// === clusters and runners ===

fn cluster_spec(name: &str) -> ClusterSpec {
    ClusterSpec {
        name: name.to_owned(),
        memory_mib: Some(2048),
        disk_mib: None,
        runners: Some(2),
    }
}

fn assert_conflict<T: std::fmt::Debug>(result: Result<T>, operation: &str) {
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "{operation}: expected Conflict, got {result:?}"
    );
}

pub async fn clusters_are_owned_visible_and_unique(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let other = project(store, "other").await?;
    let gpu = store
        .create_cluster(Some(&acme.id), &cluster_spec("gpu"), at(1))
        .await?;
    assert_eq!(gpu.project_id.as_deref(), Some(acme.id.as_str()));
    assert_eq!(gpu.spec, cluster_spec("gpu"));
    assert_eq!(gpu.created_at, at(1));
    let shared = store
        .create_cluster(None, &cluster_spec("big"), at(2))
        .await?;
    assert_eq!(shared.project_id, None);

    // Names are unique across projects; `default` is built in.
    assert_conflict(
        store
            .create_cluster(Some(&other.id), &cluster_spec("gpu"), at(3))
            .await,
        "a taken name",
    );
    assert_conflict(
        store
            .create_cluster(Some(&other.id), &cluster_spec("default"), at(3))
            .await,
        "the default name",
    );
    assert_not_found(
        store
            .create_cluster(Some("no-such-project"), &cluster_spec("x"), at(3))
            .await,
        "no-such-project",
    );

    // A project sees its own and the shared ones; nobody else's.
    assert_eq!(store.get_cluster(Some(&acme.id), &gpu.id).await?, gpu);
    assert_eq!(store.get_cluster(None, &gpu.id).await?, gpu);
    assert_not_found(store.get_cluster(Some(&other.id), &gpu.id).await, &gpu.id);
    assert_eq!(
        store.get_cluster(Some(&other.id), &shared.id).await?,
        shared
    );
    let names = |clusters: Vec<crate::Cluster>| -> Vec<String> {
        clusters
            .into_iter()
            .map(|cluster| cluster.spec.name)
            .collect()
    };
    assert_eq!(
        names(store.list_clusters(Some(&acme.id)).await?),
        ["big", "gpu"]
    );
    assert_eq!(names(store.list_clusters(Some(&other.id)).await?), ["big"]);
    assert_eq!(names(store.list_clusters(None).await?), ["big", "gpu"]);
    assert_eq!(
        store.find_cluster_by_name(Some(&acme.id), "gpu").await?,
        Some(gpu.clone())
    );
    assert_eq!(
        store.find_cluster_by_name(Some(&other.id), "gpu").await?,
        None
    );
    assert_eq!(store.find_cluster_by_name(None, "nope").await?, None);

    // Update and delete.
    let spec = ClusterSpec {
        memory_mib: Some(4096),
        ..cluster_spec("gpu-2")
    };
    let updated = store.update_cluster(&gpu.id, &spec, at(5)).await?;
    assert_eq!(updated.spec, spec);
    assert_eq!(updated.created_at, at(1));
    assert_eq!(updated.updated_at, at(5));
    assert_eq!(store.get_cluster(None, &gpu.id).await?, updated);
    assert_conflict(
        store
            .update_cluster(&gpu.id, &cluster_spec("big"), at(6))
            .await,
        "renaming onto a taken name",
    );
    store.delete_cluster(&gpu.id).await?;
    assert_not_found(store.get_cluster(None, &gpu.id).await, &gpu.id);
    assert_not_found(store.delete_cluster(&gpu.id).await, &gpu.id);
    assert_not_found(store.update_cluster(&gpu.id, &spec, at(7)).await, &gpu.id);
    Ok(())
}

pub async fn clusters_keep_their_name_while_tasks_use_it(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let gpu = store
        .create_cluster(Some(&acme.id), &cluster_spec("gpu"), at(1))
        .await?;
    let task = NewTask {
        cluster: "gpu".to_owned(),
        ..new_task("hello")
    };
    let id = enqueue_one(store, &acme.id, task, at(2)).await?;
    assert_conflict(
        store.delete_cluster(&gpu.id).await,
        "delete with a queued task",
    );
    assert_conflict(
        store
            .update_cluster(&gpu.id, &cluster_spec("gpu-2"), at(3))
            .await,
        "rename with a queued task",
    );
    // Changing the other fields is fine.
    let spec = ClusterSpec {
        runners: Some(9),
        ..cluster_spec("gpu")
    };
    assert_eq!(
        store.update_cluster(&gpu.id, &spec, at(3)).await?.spec,
        spec
    );
    store.cancel_task(&acme.id, &id, at(4)).await?;
    store.delete_cluster(&gpu.id).await?;
    Ok(())
}

pub async fn cluster_load_counts_tasks_and_online_runners(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let in_cluster = |cluster: &str| NewTask {
        cluster: cluster.to_owned(),
        ..new_task("hello")
    };
    for cluster in ["gpu", "gpu", "gpu", "default"] {
        enqueue_one(store, &acme.id, in_cluster(cluster), at(1)).await?;
    }
    let runner = |id: &str, clusters: &[&str], capacity| RunnerSeen {
        id: id.to_owned(),
        clusters: clusters.iter().map(|c| (*c).to_owned()).collect(),
        capacity,
    };
    store
        .record_runner(&runner("r-gpu", &["gpu", "default"], 4), at(2))
        .await?;
    store
        .record_runner(&runner("r-old", &["gpu"], 8), at(0))
        .await?;
    store
        .record_runner(&runner("r-other", &["arm"], 2), at(2))
        .await?;
    let leased = store
        .lease(
            &LeaseRequest {
                clusters: vec!["gpu".to_owned()],
                ..lease_request("r-gpu", 2)
            },
            at(2),
        )
        .await?;
    assert_eq!(leased.len(), 2);

    let load = store.cluster_load("gpu", None, at(1), at(3)).await?;
    assert_eq!((load.queued, load.running), (1, 2));
    assert_eq!(load.runners.len(), 1, "{load:?}");
    let seen = &load.runners[0];
    assert_eq!(seen.id, "r-gpu");
    assert_eq!(seen.clusters, ["gpu", "default"]);
    assert_eq!((seen.capacity, seen.in_use), (4, 2));
    assert_eq!(seen.last_seen, at(2));

    // Seen again: the record is replaced.
    store
        .record_runner(&runner("r-gpu", &["gpu"], 6), at(10))
        .await?;
    // Long unseen, but a live lease keeps a runner online.
    let load = store.cluster_load("gpu", None, at(100), at(11)).await?;
    assert_eq!(load.runners.len(), 1);
    assert_eq!(load.runners[0].capacity, 6);
    assert_eq!(load.runners[0].last_seen, at(10));
    // Past the lease it is gone.
    let load = store.cluster_load("gpu", None, at(100), at(1000)).await?;
    assert!(load.runners.is_empty(), "{load:?}");

    // Counts can be limited to one project.
    let other = project(store, "other").await?;
    let load = store
        .cluster_load("gpu", Some(&other.id), at(0), at(3))
        .await?;
    assert_eq!((load.queued, load.running), (0, 0));
    let load = store
        .cluster_load("default", Some(&acme.id), at(0), at(3))
        .await?;
    assert_eq!((load.queued, load.running), (1, 0));
    Ok(())
}

// === gauges ===

pub async fn gauges_count_live_tasks_and_due_queues_by_priority(store: &dyn Store) -> Result<()> {
    let gauges = |queued, preparing, running, depth: [u64; 3]| StoreGauges {
        by_status: vec![
            (TaskStatus::Queued, queued),
            (TaskStatus::Preparing, preparing),
            (TaskStatus::Running, running),
        ],
        queue_depth: vec![(0, depth[0]), (1, depth[1]), (2, depth[2])],
    };
    // An empty store still reports every status and priority.
    assert_eq!(store.gauges(at(0)).await?, gauges(0, 0, 0, [0, 0, 0]));

    let acme = project_with_code(store, "hello").await?;
    let task = |priority: u8, delay_secs: u32| NewTask {
        priority,
        delay_secs,
        ..new_task("hello")
    };
    for new in [task(2, 0), task(2, 0), task(0, 0), task(1, 60)] {
        enqueue_one(store, &acme.id, new, at(0)).await?;
    }
    let first = lease_one(store, at(1)).await?;
    store
        .mark_running(&first.task.id, first.lease.token, at(1), at(1))
        .await?;
    let second = lease_one(store, at(1)).await?;
    assert_eq!(second.task.priority, 2);

    // The delayed task is queued but not yet due.
    assert_eq!(store.gauges(at(2)).await?, gauges(2, 1, 1, [1, 0, 0]));
    assert_eq!(store.gauges(at(60)).await?, gauges(2, 1, 1, [1, 1, 0]));

    // Finished tasks count nowhere, in every project.
    store
        .complete(
            &first.task.id,
            first.lease.token,
            &exited(0),
            &RunReport::default(),
            at(3),
        )
        .await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    enqueue_one(store, &other.id, task(2, 0), at(3)).await?;
    assert_eq!(store.gauges(at(4)).await?, gauges(3, 1, 0, [1, 0, 1]));
    Ok(())
}

// === concurrency ===
//
// Several callers at once, each on its own connection where the store has several: what the
// trait promises must hold however their statements interleave.

pub async fn concurrent_leasers_share_no_task_and_respect_max_concurrency(
    store: &dyn Store,
) -> Result<()> {
    let acme = project(store, "acme").await?;
    let mut limited = image_spec("limited");
    limited.max_concurrency = Some(3);
    store.push_code(&acme.id, &limited, None, at(0)).await?;
    store
        .push_code(&acme.id, &image_spec("free"), None, at(0))
        .await?;
    let limited_total = 24;
    let free_total = 40;
    store
        .enqueue(&acme.id, &vec![new_task("limited"); limited_total], at(1))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("free"); free_total], at(1))
        .await?;

    let mut seen: Vec<String> = Vec::new();
    let mut active_limited: Vec<LeasedTask> = Vec::new();
    for round in 0..200 {
        let now = at(2 + round);
        let lease =
            |name: &'static str| async move { store.lease(&lease_request(name, 4), now).await };
        let (a, b, c, d) = tokio::join!(lease("r1"), lease("r2"), lease("r3"), lease("r4"));
        let leased: Vec<LeasedTask> = [a?, b?, c?, d?].concat();
        if leased.is_empty() && active_limited.is_empty() {
            break;
        }
        for task in leased {
            assert!(
                !seen.contains(&task.task.id),
                "task {} was handed out twice",
                task.task.id
            );
            seen.push(task.task.id.clone());
            if task.task.code_name == "limited" {
                active_limited.push(task);
            } else {
                store
                    .complete(
                        &task.task.id,
                        task.lease.token,
                        &TaskOutcome::Cancelled,
                        &RunReport::default(),
                        now,
                    )
                    .await?;
            }
        }
        assert!(
            active_limited.len() <= 3,
            "round {round}: {} tasks of a code limited to 3 were active",
            active_limited.len()
        );
        // Finish two of the limited code's tasks, so its slots turn over.
        for task in active_limited.drain(..active_limited.len().min(2)) {
            store
                .complete(
                    &task.task.id,
                    task.lease.token,
                    &TaskOutcome::Cancelled,
                    &RunReport::default(),
                    now,
                )
                .await?;
        }
    }
    assert_eq!(
        seen.len(),
        limited_total + free_total,
        "every task ran once"
    );
    Ok(())
}

pub async fn concurrent_completions_record_one_result_and_one_retry(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_retrying_code(store, 1, 0, RetriesBackoff::Fixed).await?;
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let token = leased.lease.token;
    store.mark_running(&id, token, at(2), at(2)).await?;
    let id = id.as_str();
    let complete = |exit_code: i64| async move {
        store
            .complete(id, token, &exited(exit_code), &RunReport::default(), at(3))
            .await
    };
    let (a, b, c, d) = tokio::join!(complete(1), complete(2), complete(3), complete(4));
    let mut winners = Vec::new();
    for result in [a, b, c, d] {
        match result {
            Ok(task) => winners.push(task),
            Err(StoreError::StaleLease { .. }) => {}
            Err(other) => return Err(other),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one completion wins: {winners:?}");
    let stored = store.get_task(&acme.id, id).await?;
    assert_eq!(stored, winners[0]);
    assert_eq!(stored.status, TaskStatus::Error);
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), 1, "one failure, one retry: {retries:?}");
    assert_eq!(retries[0].original_task_id.as_deref(), Some(id));
    Ok(())
}

pub async fn concurrent_log_appends_stop_at_the_cap_with_one_marker(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let token = lease_one(store, at(1)).await?.lease.token;
    let cap = 200;
    let task_id = id.as_str();
    let append = |byte: u8| async move {
        store
            .append_log(task_id, token, &[byte; 45], cap, at(2))
            .await
    };
    let (a, b, c, d, e, f) = tokio::join!(
        append(b'a'),
        append(b'b'),
        append(b'c'),
        append(b'd'),
        append(b'e'),
        append(b'f')
    );
    for size in [a?, b?, c?, d?, e?, f?] {
        assert!(size <= cap);
    }
    let log = store.get_log(&acme.id, &id).await?;
    let marker = format!("\n[stevedore: log truncated at {cap} bytes]\n");
    assert_eq!(log.len() as u64, cap);
    assert!(log.ends_with(marker.as_bytes()));
    let text = String::from_utf8_lossy(&log);
    assert_eq!(text.matches("log truncated").count(), 1, "{text}");
    // Each write landed whole or cut at the marker, never interleaved with another.
    let kept = &log[..log.len() - marker.len()];
    for chunk in kept.chunks(45) {
        assert!(chunk.iter().all(|byte| *byte == chunk[0]), "{text}");
    }
    let slice = store.get_log_since(&acme.id, &id, 0, 1000).await?;
    assert_eq!((slice.bytes, slice.size), (log, cap));
    Ok(())
}

pub async fn concurrent_fires_of_a_schedule_queue_one_task(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let schedule = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 60), Some(at(60)))],
            at(0),
        )
        .await?
        .remove(0);
    let fire = || store.fire_schedule(&schedule.id, at(60), Some(at(120)), at(61));
    let (a, b, c, d) = tokio::join!(fire(), fire(), fire(), fire());
    let mut fired = 0;
    for result in [a, b, c, d] {
        match result {
            Ok(_) => fired += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(other) => return Err(other),
        }
    }
    assert_eq!(fired, 1);
    let tasks = store
        .list_tasks(&acme.id, &TaskFilter::default(), ALL)
        .await?;
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        store.get_schedule(&acme.id, &schedule.id).await?.run_count,
        1
    );
    Ok(())
}

// === usage ===

/// Runs one task of `code_name` to `outcome`: queued and leased a second before `start`, its
/// container up from `start` to `end`. Only this task may be queued meanwhile.
async fn run_task(
    store: &dyn Store,
    project_id: &str,
    code_name: &str,
    outcome: &TaskOutcome,
    start: Timestamp,
    end: Timestamp,
) -> Result<Task> {
    let queued_at = start - Duration::seconds(1);
    let id = enqueue_one(store, project_id, new_task(code_name), queued_at).await?;
    let leased = lease_one(store, queued_at).await?;
    store
        .mark_running(&id, leased.lease.token, start, start)
        .await?;
    let report = RunReport {
        start_time: Some(start),
        end_time: Some(end),
        ..RunReport::default()
    };
    store
        .complete(&id, leased.lease.token, outcome, &report, end)
        .await
}

fn runtime_spec(name: &str, runtime: &str) -> CodeSpec {
    CodeSpec {
        kind: CodeKind::Runtime {
            runtime: runtime.to_owned(),
            file_name: "main.py".to_owned(),
            stack: None,
        },
        ..image_spec(name)
    }
}

fn millis(secs: i64, millis: i64) -> Timestamp {
    at(secs) + Duration::milliseconds(millis)
}

/// `(bucket second, code, rev, [complete, error, timeout, cancelled], compute_ms)` of a row.
type UsageSummary = (i64, String, u32, [u64; 4], u64);

fn summarize(rows: &[UsageRow]) -> Vec<UsageSummary> {
    rows.iter()
        .map(|row| {
            (
                (row.bucket_start - at(0)).num_seconds(),
                row.code_name.clone(),
                row.code_rev,
                [row.complete, row.error, row.timeout, row.cancelled],
                row.compute_ms,
            )
        })
        .collect()
}

pub async fn usage_sums_finished_tasks_per_bucket_and_revision(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .push_code(&acme.id, &runtime_spec("py", "python"), None, at(0))
        .await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;

    let ok = exited(0);
    // Ended a moment before the window opens: left out.
    run_task(store, &acme.id, "hello", &ok, at(5), millis(19, 999)).await?;
    // Ended as the window opens: counted, in the bucket of second 0 (buckets follow the epoch,
    // not `from`).
    run_task(store, &acme.id, "hello", &ok, at(10), at(20)).await?;
    run_task(
        store,
        &acme.id,
        "hello",
        &exited(1),
        at(45),
        millis(50, 250),
    )
    .await?;
    // Another project's task in the same window: never counted.
    run_task(store, &other.id, "hello", &ok, at(30), at(40)).await?;
    let timed_out = TaskOutcome::TimedOut { timeout_secs: 4 };
    run_task(store, &acme.id, "hello", &timed_out, at(61), at(65)).await?;
    run_task(store, &acme.id, "py", &ok, at(62), at(70)).await?;
    // Cancelled while queued: a failure-free end with no compute time.
    let cancelled = enqueue_one(store, &acme.id, new_task("hello"), at(74)).await?;
    store.cancel_task(&acme.id, &cancelled, at(75)).await?;
    // A new revision is counted apart from the first.
    store
        .push_code(&acme.id, &image_spec("hello"), None, at(76))
        .await?;
    run_task(store, &acme.id, "hello", &ok, at(78), at(80)).await?;
    // Ended as the window closes: left out.
    run_task(store, &acme.id, "hello", &ok, at(100), at(120)).await?;
    // Still running: not finished, not counted.
    enqueue_one(store, &acme.id, new_task("hello"), at(110)).await?;
    let running = lease_one(store, at(110)).await?;
    store
        .mark_running(&running.task.id, running.lease.token, at(111), at(111))
        .await?;

    let per_minute = UsageQuery {
        from: at(20),
        to: at(120),
        bucket_secs: 60,
    };
    let rows = store.usage(&acme.id, &per_minute).await?;
    let expected: Vec<UsageSummary> = vec![
        (0, "hello".to_owned(), 1, [1, 1, 0, 0], 10_000 + 5_250),
        (60, "hello".to_owned(), 1, [0, 0, 1, 1], 4_000),
        (60, "hello".to_owned(), 2, [1, 0, 0, 0], 2_000),
        (60, "py".to_owned(), 1, [1, 0, 0, 0], 8_000),
    ];
    assert_eq!(summarize(&rows), expected);
    let py = rows
        .iter()
        .find(|row| row.code_name == "py")
        .expect("a py row");
    assert_eq!(
        py.kind,
        CodeKind::Runtime {
            runtime: "python".to_owned(),
            file_name: "main.py".to_owned(),
            stack: None,
        }
    );
    assert!(matches!(rows[0].kind, CodeKind::Image { .. }));
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    assert!(
        rows.iter()
            .filter(|row| row.code_name == "hello")
            .all(|row| row.code_id == code.id)
    );

    // One hour-wide bucket holds the whole window.
    let per_hour = UsageQuery {
        bucket_secs: 3600,
        ..per_minute
    };
    assert_eq!(
        summarize(&store.usage(&acme.id, &per_hour).await?),
        vec![
            (0, "hello".to_owned(), 1, [1, 1, 1, 1], 19_250),
            (0, "hello".to_owned(), 2, [1, 0, 0, 0], 2_000),
            (0, "py".to_owned(), 1, [1, 0, 0, 0], 8_000),
        ]
    );

    // A deleted code's finished tasks still count, with their revision's kind.
    let py_code = store.get_code_by_name(&acme.id, "py").await?;
    store.delete_code(&acme.id, &py_code.id, at(130)).await?;
    let after_delete = store.usage(&acme.id, &per_minute).await?;
    assert_eq!(summarize(&after_delete), expected);

    // The other project sees only its own task; an empty window has no rows.
    assert_eq!(
        summarize(&store.usage(&other.id, &per_minute).await?),
        vec![(0, "hello".to_owned(), 1, [1, 0, 0, 0], 10_000)]
    );
    let empty = UsageQuery {
        from: at(200),
        to: at(300),
        bucket_secs: 60,
    };
    assert!(store.usage(&acme.id, &empty).await?.is_empty());
    Ok(())
}

/// Queues a task of `hello` at `queued` (due at once), leases it at `leased` and starts its
/// container at `started`. Only this task may be queued meanwhile.
async fn start_task(
    store: &dyn Store,
    project_id: &str,
    queued: i64,
    leased: i64,
    started: Timestamp,
) -> Result<()> {
    let id = enqueue_one(store, project_id, new_task("hello"), at(queued)).await?;
    let lease = lease_one(store, at(leased)).await?;
    assert_eq!(lease.task.id, id);
    store
        .mark_running(&id, lease.lease.token, started, started)
        .await?;
    Ok(())
}

pub async fn queue_waits_sample_the_latest_starts(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    // Started before the window.
    start_task(store, &acme.id, 0, 1, at(1)).await?;
    start_task(store, &acme.id, 10, 13, millis(13, 500)).await?;
    start_task(store, &other.id, 20, 25, at(25)).await?;
    // A delayed task waits from its due time, not from when it was queued.
    let mut delayed = new_task("hello");
    delayed.delay_secs = 20;
    let id = enqueue_one(store, &acme.id, delayed, at(10)).await?;
    let lease = lease_one(store, at(31)).await?;
    assert_eq!(lease.task.id, id);
    store
        .mark_running(&id, lease.lease.token, at(32), at(32))
        .await?;
    // The container's clock ran behind: the start precedes the due time, the wait is zero.
    start_task(store, &acme.id, 40, 40, millis(39, 900)).await?;
    // Started as the window closes.
    start_task(store, &acme.id, 50, 60, at(60)).await?;

    let waits = store.queue_waits(&acme.id, at(10), at(60), 100).await?;
    let wait = |secs: i64, millis_part: i64, wait_ms: u64| QueueWait {
        started_at: millis(secs, millis_part),
        wait_ms,
    };
    assert_eq!(
        waits,
        vec![wait(39, 900, 0), wait(32, 0, 2_000), wait(13, 500, 3_500)]
    );
    assert_eq!(
        store.queue_waits(&acme.id, at(10), at(60), 2).await?,
        waits[..2].to_vec(),
        "the limit keeps the latest starts"
    );
    assert_eq!(
        store.queue_waits(&other.id, at(0), at(100), 100).await?,
        vec![wait(25, 0, 5_000)]
    );
    Ok(())
}

pub async fn project_counts_count_every_code_of_the_project(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .push_code(&acme.id, &image_spec("bye"), None, at(0))
        .await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    run_task(store, &acme.id, "hello", &exited(0), at(2), at(3)).await?;
    run_task(store, &acme.id, "bye", &exited(2), at(4), at(5)).await?;
    run_task(store, &other.id, "hello", &exited(2), at(6), at(7)).await?;
    store
        .enqueue(&acme.id, &[new_task("hello"), new_task("bye")], at(8))
        .await?;
    store
        .enqueue(&other.id, &[new_task("hello")], at(8))
        .await?;

    let nonzero = |stats: CodeStats| -> Vec<(TaskStatus, u64)> {
        assert_eq!(
            stats.by_status.len(),
            TaskStatus::ALL.len(),
            "zeros included"
        );
        stats
            .by_status
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .collect()
    };
    assert_eq!(
        nonzero(
            store
                .project_counts(&acme.id, StatsWindow::default())
                .await?
        ),
        vec![
            (TaskStatus::Queued, 2),
            (TaskStatus::Complete, 1),
            (TaskStatus::Error, 1)
        ]
    );
    let early = StatsWindow {
        updated_from: None,
        updated_to: Some(at(4)),
    };
    assert_eq!(
        nonzero(store.project_counts(&acme.id, early).await?),
        vec![(TaskStatus::Complete, 1)]
    );
    assert_eq!(
        nonzero(
            store
                .project_counts("no-such-project", StatsWindow::default())
                .await?
        ),
        vec![]
    );
    Ok(())
}

// === registry credentials ===

pub async fn registry_credentials_are_per_project_and_sealed(store: &dyn Store) -> Result<()> {
    let mine = project(store, "mine").await?;
    let theirs = project(store, "theirs").await?;
    let vault = CredentialVault::new(&CredentialKey::generate().unwrap());
    let sealed = vault.seal(&mine.id, "r.example:5000", "hunter2").unwrap();

    let stored = store
        .put_registry_credential(&mine.id, "r.example:5000", "alice", &sealed, at(1))
        .await?;
    assert_eq!(stored.username, "alice");
    assert_eq!(stored.sealed, sealed);
    assert_eq!((stored.created_at, stored.updated_at), (at(1), at(1)));
    assert_eq!(vault.open(&stored).unwrap(), "hunter2");

    // A second login replaces the first and keeps its creation time.
    let resealed = vault
        .seal(&mine.id, "r.example:5000", "correct horse")
        .unwrap();
    let replaced = store
        .put_registry_credential(&mine.id, "r.example:5000", "bob", &resealed, at(2))
        .await?;
    assert_eq!(replaced.username, "bob");
    assert_eq!((replaced.created_at, replaced.updated_at), (at(1), at(2)));
    let hub = vault.seal(&mine.id, "docker.io", "x").unwrap();
    store
        .put_registry_credential(&mine.id, "docker.io", "carol", &hub, at(3))
        .await?;
    let listed = store.list_registry_credentials(&mine.id).await?;
    assert_eq!(
        listed
            .iter()
            .map(|c| (c.registry.as_str(), c.username.as_str()))
            .collect::<Vec<_>>(),
        vec![("docker.io", "carol"), ("r.example:5000", "bob")]
    );
    assert_eq!(
        store
            .get_registry_credential(&mine.id, "r.example:5000")
            .await?,
        Some(replaced)
    );

    // Another project sees none of them and cannot remove them.
    assert_eq!(
        store.list_registry_credentials(&theirs.id).await?,
        Vec::new()
    );
    assert_eq!(
        store
            .get_registry_credential(&theirs.id, "r.example:5000")
            .await?,
        None
    );
    assert_not_found(
        store
            .delete_registry_credential(&theirs.id, "r.example:5000")
            .await,
        "r.example:5000",
    );
    assert_not_found(
        store
            .put_registry_credential("ghost", "docker.io", "x", &hub, at(4))
            .await,
        "ghost",
    );

    store
        .delete_registry_credential(&mine.id, "r.example:5000")
        .await?;
    assert_eq!(
        store
            .get_registry_credential(&mine.id, "r.example:5000")
            .await?,
        None
    );
    assert_eq!(store.list_registry_credentials(&mine.id).await?.len(), 1);
    Ok(())
}

pub async fn a_lease_carries_its_projects_credential_for_its_image_only(
    store: &dyn Store,
) -> Result<()> {
    let vault = CredentialVault::new(&CredentialKey::generate().unwrap());
    let mine = project(store, "mine").await?;
    let theirs = project(store, "theirs").await?;
    let private_spec = |name: &str| CodeSpec {
        kind: CodeKind::Image {
            image: "r.example:5000/team/app:1".to_owned(),
            command: None,
        },
        ..image_spec(name)
    };
    for project in [&mine, &theirs] {
        store
            .push_code(&project.id, &private_spec("private"), None, at(0))
            .await?;
        store
            .push_code(&project.id, &image_spec("public"), None, at(0))
            .await?;
    }
    let sealed = vault.seal(&mine.id, "r.example:5000", "hunter2").unwrap();
    store
        .put_registry_credential(&mine.id, "r.example:5000", "alice", &sealed, at(0))
        .await?;
    let mut queued = Vec::new();
    for (project, code) in [(&mine, "private"), (&mine, "public"), (&theirs, "private")] {
        queued.push(enqueue_one(store, &project.id, new_task(code), at(1)).await?);
    }

    let mut leased = store.lease(&lease_request("runner-1", 10), at(2)).await?;
    assert_eq!(leased.len(), 3);
    assert!(leased.iter().all(|task| task.registry_credential.is_none()));
    attach_registry_credentials(store, &vault, &mut leased).await?;
    let credential_of = |task_id: &str| {
        leased
            .iter()
            .find(|task| task.task.id == task_id)
            .and_then(|task| task.registry_credential.clone())
    };
    let credential = credential_of(&queued[0]).expect("my private image's credential");
    assert_eq!(credential.registry, "r.example:5000");
    assert_eq!(credential.username, "alice");
    assert_eq!(credential.password, "hunter2");
    // Another registry's image gets nothing, nor does another project's task.
    assert_eq!(credential_of(&queued[1]), None);
    assert_eq!(credential_of(&queued[2]), None);

    // A server holding another key leaves the credential out rather than fail the lease.
    let other = CredentialVault::new(&CredentialKey::generate().unwrap());
    for task in &mut leased {
        task.registry_credential = None;
    }
    attach_registry_credentials(store, &other, &mut leased).await?;
    assert!(leased.iter().all(|task| task.registry_credential.is_none()));
    Ok(())
}
