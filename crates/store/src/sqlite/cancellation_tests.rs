//! Regression tests for issue 13, part 4: a write's caller dropped at any await point (a client
//! that disconnects, a remote runner's request timeout) leaves the writer's unit of work
//! committed whole or not at all, and the writer usable, with no transaction left open.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::pin;
use std::task::{Context, Poll, Waker};

use stevedore_model::{CodeSpec, TaskOutcome};
use tempfile::TempDir;

use super::{SqliteOptions, SqliteStore};
use crate::testsuite::{at, image_spec, lease_request, new_task};
use crate::{RunReport, Store};

/// How many polls the longest completion may take before the test gives up on it finishing.
const MAX_POLLS: usize = 10_000;

async fn fresh_store() -> (SqliteStore, TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(SqliteOptions::new(dir.path().join("stevedore.db")))
        .await
        .expect("open a fresh store");
    (store, dir)
}

/// From one snapshot: whether the task is finished, and how many retries it has.
async fn completion_and_retries(store: &SqliteStore, task_id: &str) -> (bool, i64) {
    let (status, retries): (String, i64) = sqlx::query_as(
        "SELECT (SELECT status FROM tasks WHERE id = ?1), \
         (SELECT COUNT(*) FROM tasks WHERE original_task_id = ?1)",
    )
    .bind(task_id)
    .fetch_one(&store.readers)
    .await
    .unwrap();
    (status == "error", retries)
}

/// Both the completion and its retry, or neither.
fn assert_whole_or_nothing(state: (bool, i64), polls: usize) {
    assert!(
        matches!(state, (true, 1) | (false, 0)),
        "after a drop at poll {polls}: completed {}, retries {}",
        state.0,
        state.1
    );
}

/// The writer takes a later write, which readers see committed, and holds no transaction
/// between units of work: not a group, and not one SQLite knows of but the store does not.
async fn assert_writer_usable(store: &SqliteStore, polls: usize) {
    let later = store
        .create_project(&format!("later-{polls}"), at(10))
        .await
        .unwrap();
    assert_eq!(store.get_project(&later.id).await.unwrap(), later);
    let mut writer = store.writing.lock_writer().await.unwrap();
    assert!(
        writer.group.is_none(),
        "a group left open after poll {polls}"
    );
    // `BEGIN` fails inside a transaction: this one proves none was open.
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut writer.conn)
        .await
        .unwrap();
    sqlx::query("ROLLBACK")
        .execute(&mut writer.conn)
        .await
        .unwrap();
}

/// Drops a failing completion, whose code retries, after 0, 1, 2, … polls, each poll followed
/// by a turn of the runtime so that the work it started moves on to its next await, until a
/// completion finishes: the drops land at every stage of the write, from before the writer is
/// held, through the transaction's `BEGIN` (poll 1 drops the caller right after it: before the
/// fix the writer was left in a transaction nobody tracked, and the later write never
/// committed), the completion's write and its retry's, to the `COMMIT`. After every drop the
/// completion and its retry are committed together or not at all, and the writer is usable,
/// with no transaction left open.
#[tokio::test]
async fn a_dropped_completion_commits_with_its_retry_or_not_at_all() {
    drop_a_completion_at_every_await(Contention::Alone).await;
}

/// The same with another writer waiting for the writer, so the completion opens a group
/// transaction, leaves it open for that writer and waits for it to commit.
#[tokio::test]
async fn a_dropped_completion_in_a_group_commits_with_its_retry_or_not_at_all() {
    drop_a_completion_at_every_await(Contention::AnotherWriterWaits).await;
}

/// Whether the completion finds the writer to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contention {
    Alone,
    AnotherWriterWaits,
}

async fn drop_a_completion_at_every_await(contention: Contention) {
    let (store, _dir) = fresh_store().await;
    let project = store.create_project("acme", at(0)).await.unwrap();
    let spec = CodeSpec {
        retries: 1,
        ..image_spec("flaky")
    };
    store
        .push_code(&project.id, &spec, None, at(0))
        .await
        .unwrap();
    let failed = TaskOutcome::Exited { exit_code: 1 };
    let report = RunReport::default();
    let mut context = Context::from_waker(Waker::noop());

    for polls in 0..MAX_POLLS {
        store
            .enqueue(&project.id, &[new_task("flaky")], at(1))
            .await
            .unwrap();
        // Only the new task is due; the retries queued so far wait for their delay.
        let mut leased = store
            .lease(&lease_request("runner-1", 1), at(2))
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        let leased = leased.remove(0);
        let task_id = leased.task.id.clone();
        store
            .mark_running(&task_id, leased.lease.token, at(2), at(2))
            .await
            .unwrap();

        let other_name = format!("other-{polls}");
        let mut other = pin!(store.create_project(&other_name, at(4)));
        let mut other_done = false;
        let finished = {
            let mut completion =
                pin!(store.complete(&task_id, leased.lease.token, &failed, &report, at(3)));
            let mut finished = false;
            // The test holds the writer until the completion (and the other write) queue for
            // it, so that the other write waits behind the completion.
            let mut held = Some(store.writing.lock_writer().await.unwrap());
            for _ in 0..polls {
                if let Poll::Ready(result) = completion.as_mut().poll(&mut context) {
                    result.unwrap();
                    finished = true;
                    break;
                }
                // The other write, a live caller, is driven beside the completion: it commits
                // the group the completion left open for it.
                if contention == Contention::AnotherWriterWaits
                    && !other_done
                    && let Poll::Ready(result) = other.as_mut().poll(&mut context)
                {
                    result.unwrap();
                    other_done = true;
                }
                held = None;
                tokio::task::yield_now().await;
            }
            drop(held);
            finished
        };
        assert_whole_or_nothing(completion_and_retries(&store, &task_id).await, polls);
        if !other_done {
            other.await.unwrap();
        }
        assert_writer_usable(&store, polls).await;
        // The work outlives its caller: by now it has ended, one way or the other.
        assert_whole_or_nothing(completion_and_retries(&store, &task_id).await, polls);
        if finished {
            assert_eq!(completion_and_retries(&store, &task_id).await, (true, 1));
            return;
        }
    }
    panic!("a completion did not finish within {MAX_POLLS} polls");
}
