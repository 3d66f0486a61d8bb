//! The shared store suite against PostgreSQL, each test in a fresh database of a throwaway
//! cluster (`stevedore_store::testcluster`), plus what only several stores on one database can
//! show: two "servers" sharing leases, tokens, wake-ups and the leadership.
//!
//! Skipped with a message when PostgreSQL is not installed, unless `CI` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sqlx::Connection;
use stevedore_store::testcluster::{TestDatabase, fresh_database};
use stevedore_store::testsuite::{at, image_spec, lease_request, new_task};
use stevedore_store::{Leadership, PgOptions, PgStore, Store};

async fn connect(database: &TestDatabase) -> PgStore {
    let options = PgOptions {
        max_connections: 5,
        ..PgOptions::new(&database.url)
    };
    PgStore::connect(options)
        .await
        .expect("connect to the test database")
}

/// A fresh store in its own database; the database is dropped with the guard.
async fn fresh_store() -> Option<(PgStore, TestDatabase)> {
    let database = fresh_database().await?;
    let store = connect(&database).await;
    Some((store, database))
}

stevedore_store::store_test_suite!(optional fresh_store);

#[tokio::test]
async fn two_servers_share_leases_and_tokens() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let (one, two) = (connect(&database).await, connect(&database).await);
    let project = one.create_project("acme", at(0)).await.unwrap();
    let mut limited = image_spec("limited");
    limited.max_concurrency = Some(2);
    one.push_code(&project.id, &limited, None, at(0))
        .await
        .unwrap();
    two.enqueue(&project.id, &vec![new_task("limited"); 10], at(1))
        .await
        .unwrap();
    let (request_one, request_two) = (lease_request("runner-1", 5), lease_request("runner-2", 5));
    let (a, b) = tokio::join!(
        one.lease(&request_one, at(2)),
        two.lease(&request_two, at(2))
    );
    let leased = [a.unwrap(), b.unwrap()].concat();
    assert!(leased.len() <= 2, "max_concurrency holds across servers");
    // A lease granted through one server is honoured by the other; the next lease, from
    // either server, gets a token none of the earlier ones has.
    let first = &leased[0];
    two.heartbeat(&first.task.id, first.lease.token, 30, at(3))
        .await
        .unwrap();
    two.complete(
        &first.task.id,
        first.lease.token,
        &stevedore_model::TaskOutcome::Cancelled,
        &stevedore_store::RunReport::default(),
        at(3),
    )
    .await
    .unwrap();
    let next = one
        .lease(&lease_request("runner-1", 5), at(4))
        .await
        .unwrap();
    assert!(!next.is_empty());
    assert!(next.iter().all(|next| {
        leased
            .iter()
            .all(|earlier| earlier.lease.token != next.lease.token)
    }));
    one.close().await;
    two.close().await;
}

/// Servers racing for a project's last running slots: leases count their project's free slots
/// without waiting and confirm under its lock after writing, so those that went past the
/// quota are rolled back and done again under the lock. Round after round, the project never
/// runs more than its quota, and it fills up to it.
#[tokio::test]
async fn servers_racing_for_the_last_running_slots_never_pass_the_quota() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(connect(&database).await);
    }
    let project = servers[0].create_project("acme", at(0)).await.unwrap();
    servers[0]
        .push_code(&project.id, &image_spec("hello"), None, at(0))
        .await
        .unwrap();
    servers[0]
        .set_project_quota(
            &project.id,
            stevedore_model::Quota::RunningTasks,
            Some(7),
            at(0),
        )
        .await
        .unwrap();
    servers[1]
        .enqueue(&project.id, &vec![new_task("hello"); 200], at(1))
        .await
        .unwrap();
    let mut running: Vec<stevedore_store::LeasedTask> = Vec::new();
    for round in 0..12 {
        let leases = servers.iter().enumerate().map(|(index, server)| {
            let request = lease_request(&format!("runner-{index}"), 3);
            async move { server.lease(&request, at(2 + round)).await }
        });
        for leased in futures::future::join_all(leases).await {
            running.extend(leased.unwrap());
        }
        assert!(
            running.len() <= 7,
            "round {round}: {} running under a quota of 7",
            running.len()
        );
        // Everything leased can be leased again: one more lease fills the project up.
        running.extend(
            servers[round as usize % 4]
                .lease(&lease_request("runner-last", 7), at(2 + round))
                .await
                .unwrap(),
        );
        assert_eq!(running.len(), 7, "round {round}: the quota fills up");
        // Some finish, freeing slots for the next round's race.
        for done in running.drain(..4) {
            servers[1]
                .complete(
                    &done.task.id,
                    done.lease.token,
                    &stevedore_model::TaskOutcome::Cancelled,
                    &stevedore_store::RunReport::default(),
                    at(2 + round),
                )
                .await
                .unwrap();
        }
    }
    for server in servers {
        server.close().await;
    }
}

#[tokio::test]
async fn a_task_queued_by_one_server_wakes_the_other() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let (one, two) = (connect(&database).await, connect(&database).await);
    let mut signal = two.work_signal().expect("PostgreSQL has a work signal");
    let project = one.create_project("acme", at(0)).await.unwrap();
    one.push_code(&project.id, &image_spec("hello"), None, at(0))
        .await
        .unwrap();
    // The first tick says "listening now": whatever came before is unknown.
    tokio::time::timeout(Duration::from_secs(10), signal.notified())
        .await
        .expect("the listener starts");
    one.enqueue(&project.id, &[new_task("hello")], at(1))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), signal.notified())
        .await
        .expect("a task queued on one server wakes the other");
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn migrations_run_once_for_servers_starting_together() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let (one, two, three) =
        tokio::join!(connect(&database), connect(&database), connect(&database));
    for store in [&one, &two, &three] {
        store.close().await;
    }
    connect(&database).await.close().await;
}

/// Asks `store` to lead until it may, for up to ten seconds: a lock given up by a closed or
/// killed session is released by the server a moment later.
async fn lead_soon(store: &PgStore) -> Box<dyn Leadership> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(leadership) = store.try_lead().await.unwrap() {
            return leadership;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leadership was never given up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_server_leads_until_it_lets_go() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let (one, two) = (connect(&database).await, connect(&database).await);
    let leadership = one.try_lead().await.unwrap().expect("nobody leads yet");
    assert!(leadership.is_held().await);
    assert!(
        two.try_lead().await.unwrap().is_none(),
        "one leader at a time"
    );
    assert!(
        one.try_lead().await.unwrap().is_none(),
        "a second guard of the same store is refused too"
    );
    assert!(
        leadership.is_held().await,
        "being asked again changes nothing"
    );

    drop(leadership);
    let taken_over = lead_soon(&two).await;
    assert!(taken_over.is_held().await);
    assert!(one.try_lead().await.unwrap().is_none());
    drop(taken_over);
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn a_leader_whose_connection_dies_stops_leading() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let (one, two) = (connect(&database).await, connect(&database).await);
    let leadership = one.try_lead().await.unwrap().expect("nobody leads yet");
    assert!(two.try_lead().await.unwrap().is_none());

    // An administrator (or a network failure) ends the leader's session.
    let mut admin = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'stevedore leader'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, [true], "exactly the leader's session is ended");

    assert!(
        !leadership.is_held().await,
        "a dead connection holds no lock"
    );
    assert!(
        !leadership.is_held().await,
        "and a lost leadership stays lost"
    );
    let taken_over = lead_soon(&two).await;
    assert!(taken_over.is_held().await);
    drop(leadership);
    assert!(
        taken_over.is_held().await,
        "dropping the old guard takes nothing from the new"
    );
    drop(taken_over);
    admin.close().await.unwrap();
    one.close().await;
    two.close().await;
}

/// Databases made before ids became IronWorker's 24 hex digits hold 32-digit ids (UUID v7).
/// Such a row is served beside new ones: found by its id, listed newest first, leased in
/// order and cancelled.
#[tokio::test]
async fn rows_with_the_older_32_digit_ids_are_still_served() {
    use stevedore_store::{Page, TaskFilter};

    let Some(database) = fresh_database().await else {
        return;
    };
    let store = connect(&database).await;
    let project = store.create_project("acme", at(0)).await.unwrap();
    store
        .push_code(&project.id, &image_spec("hello"), None, at(0))
        .await
        .unwrap();
    let new = store
        .enqueue(&project.id, &[new_task("hello")], at(2))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(new.id.len(), 24);

    // A copy of the row under an id of the older form, queued a second earlier.
    let legacy = "019ae6a1c2d37c5e9f0a1b2c3d4e5f60";
    let mut conn = sqlx::PgConnection::connect(&database.url).await.unwrap();
    for statement in [
        "CREATE TEMP TABLE legacy AS SELECT * FROM tasks",
        "UPDATE legacy SET id = $1, created_at = created_at - 1000000, \
         updated_at = updated_at - 1000000, due_at = due_at - 1000000",
        "INSERT INTO tasks SELECT * FROM legacy",
    ] {
        let query = sqlx::query(statement);
        let query = if statement.contains("$1") {
            query.bind(legacy)
        } else {
            query
        };
        query.execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();

    let old = store.get_task(&project.id, legacy).await.unwrap();
    assert_eq!(old.id, legacy);
    let page = Page {
        page: 1,
        per_page: 10,
    };
    let listed: Vec<String> = store
        .list_tasks(&project.id, &TaskFilter::default(), page)
        .await
        .unwrap()
        .into_iter()
        .map(|task| task.id)
        .collect();
    assert_eq!(listed, vec![new.id.clone(), legacy.to_owned()]);
    let leased = store
        .lease(&lease_request("runner-1", 1), at(3))
        .await
        .unwrap();
    assert_eq!(leased[0].task.id, legacy, "the older task is due first");
    let cancelled = store.cancel_task(&project.id, legacy, at(4)).await.unwrap();
    assert_eq!(cancelled.id, legacy);
}

/// A database from before packages were stored once per checksum (migration 0009, a package
/// per revision in `code_packages`) keeps serving them, byte for byte, once migrated.
#[tokio::test]
async fn packages_stored_per_revision_are_served_after_the_migration() {
    use stevedore_store::testsuite::packages::{legacy_packages, legacy_packages_are_served};

    let Some(database) = fresh_database().await else {
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    sqlx::migrate::Migrator::new(migrations)
        .await
        .unwrap()
        .run_to(9, &mut conn)
        .await
        .unwrap();
    let legacy = legacy_packages();
    sqlx::query("INSERT INTO projects (id, name, created_at) VALUES ($1, 'legacy', 0)")
        .bind(&legacy.project_id)
        .execute(&mut conn)
        .await
        .unwrap();
    for (id, name, latest) in &legacy.codes {
        sqlx::query(
            "INSERT INTO codes (id, project_id, name, latest_rev, paused, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, FALSE, 0, 0)",
        )
        .bind(id)
        .bind(&legacy.project_id)
        .bind(name)
        .bind(latest)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    for revision in &legacy.revisions {
        let (sha256, size) = revision
            .package
            .as_ref()
            .map(|(sha256, bytes)| (sha256.clone(), bytes.len() as i64))
            .unzip();
        sqlx::query(
            "INSERT INTO code_revisions (code_id, rev, spec, package_sha256, package_size, \
             created_at) VALUES ($1, $2, $3, $4, $5, $2)",
        )
        .bind(&revision.code_id)
        .bind(revision.rev)
        .bind(&revision.spec)
        .bind(sha256)
        .bind(size)
        .execute(&mut conn)
        .await
        .unwrap();
        if let Some((_, bytes)) = &revision.package {
            sqlx::query("INSERT INTO code_packages (code_id, rev, bytes) VALUES ($1, $2, $3)")
                .bind(&revision.code_id)
                .bind(revision.rev)
                .bind(bytes)
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
    conn.close().await.unwrap();

    let store = connect(&database).await;
    legacy_packages_are_served(&store, &legacy).await.unwrap();
}
