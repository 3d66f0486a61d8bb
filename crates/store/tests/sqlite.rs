//! The shared store suite against SQLite, plus what only a file on disk can show: data and the
//! leases survive closing and reopening the database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use stevedore_store::testsuite::{at, image_spec, lease_request, new_task};
use stevedore_store::{SqliteOptions, SqliteStore, Store, SyncMode};
use tempfile::TempDir;

/// A fresh store in its own temporary directory; the directory lives as long as the guard.
async fn fresh_store() -> (SqliteStore, TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(SqliteOptions::new(dir.path().join("stevedore.db")))
        .await
        .expect("open a fresh store");
    (store, dir)
}

stevedore_store::store_test_suite!(fresh_store);

async fn open(dir: &TempDir, sync: SyncMode) -> SqliteStore {
    let options = SqliteOptions {
        path: dir.path().join("nested/dir/stevedore.db"),
        sync,
    };
    SqliteStore::open(options).await.expect("open the store")
}

#[tokio::test]
async fn data_and_lease_tokens_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, SyncMode::Full).await;
    let project = store.create_project("acme", at(0)).await.unwrap();
    store
        .push_code(&project.id, &image_spec("hello"), None, at(0))
        .await
        .unwrap();
    let queued = store
        .enqueue(&project.id, &vec![new_task("hello"); 3], at(1))
        .await
        .unwrap();
    let first = store
        .lease(&lease_request("runner-1", 2), at(2))
        .await
        .unwrap();
    store.close().await;
    drop(store);

    let store = open(&dir, SyncMode::Full).await;
    assert_eq!(
        store.find_project_by_name("acme").await.unwrap(),
        Some(project.clone())
    );
    for task in &queued {
        let stored = store.get_task(&project.id, &task.id).await.unwrap();
        assert_eq!(stored.id, task.id);
    }
    let again = store
        .lease(&lease_request("runner-1", 2), at(3))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    // The leases granted before the restart hold: their tokens are still the tasks' own, and
    // the new lease's token is none of them.
    for leased in &first {
        store
            .heartbeat(&leased.task.id, leased.lease.token, 30, at(3))
            .await
            .expect("a lease survives a reopen");
        assert_ne!(again[0].lease.token, leased.lease.token);
    }
}

#[tokio::test]
async fn a_store_dropped_without_close_keeps_its_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, SyncMode::Normal).await;
    let project = store.create_project("acme", at(0)).await.unwrap();
    store
        .push_code(&project.id, &image_spec("hello"), None, at(0))
        .await
        .unwrap();
    let (leased_id, leased_token) = {
        store
            .enqueue(&project.id, &[new_task("hello")], at(1))
            .await
            .unwrap();
        let leased = store
            .lease(&lease_request("runner-1", 1), at(2))
            .await
            .unwrap();
        (leased[0].task.id.clone(), leased[0].lease.token)
    };
    drop(store);

    let store = open(&dir, SyncMode::Normal).await;
    let code = store.get_code_by_name(&project.id, "hello").await.unwrap();
    assert_eq!(code.rev, 1);
    store
        .enqueue(&project.id, &[new_task("hello")], at(3))
        .await
        .unwrap();
    let leased = store
        .lease(&lease_request("runner-1", 1), at(4))
        .await
        .unwrap();
    assert_ne!(leased[0].lease.token, leased_token);
    store
        .heartbeat(&leased_id, leased_token, 30, at(4))
        .await
        .expect("the lease committed before the drop holds");
}

#[tokio::test]
async fn migrations_run_once() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let store = open(&dir, SyncMode::Normal).await;
        store.close().await;
    }
}

/// Databases made before ids became IronWorker's 24 hex digits hold 32-digit ids (UUID v7).
/// Such a row is served beside new ones: found by its id, listed newest first, leased in
/// order and completed.
#[tokio::test]
async fn rows_with_the_older_32_digit_ids_are_still_served() {
    use sqlx::Connection;
    use stevedore_store::{Page, TaskFilter};

    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, SyncMode::Normal).await;
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
    let path = dir.path().join("nested/dir/stevedore.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    for statement in [
        "CREATE TEMP TABLE legacy AS SELECT * FROM tasks",
        "UPDATE legacy SET id = ?1, created_at = created_at - 1000000, \
         updated_at = updated_at - 1000000, due_at = due_at - 1000000",
        "INSERT INTO tasks SELECT * FROM legacy",
    ] {
        sqlx::query(statement)
            .bind(legacy)
            .execute(&mut conn)
            .await
            .unwrap();
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
    use sqlx::{ConnectOptions, Connection};
    use stevedore_store::testsuite::packages::{legacy_packages, legacy_packages_are_served};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stevedore.db");
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .foreign_keys(true)
        .connect()
        .await
        .unwrap();
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    sqlx::migrate::Migrator::new(migrations)
        .await
        .unwrap()
        .run_to(9, &mut conn)
        .await
        .unwrap();
    let legacy = legacy_packages();
    sqlx::query("INSERT INTO projects (id, name, created_at) VALUES (?1, 'legacy', 0)")
        .bind(&legacy.project_id)
        .execute(&mut conn)
        .await
        .unwrap();
    for (id, name, latest) in &legacy.codes {
        sqlx::query(
            "INSERT INTO codes (id, project_id, name, latest_rev, paused, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, 0, 0, 0)",
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
             created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?2)",
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
            sqlx::query("INSERT INTO code_packages (code_id, rev, bytes) VALUES (?1, ?2, ?3)")
                .bind(&revision.code_id)
                .bind(revision.rev)
                .bind(bytes)
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
    conn.close().await.unwrap();

    let store = SqliteStore::open(SqliteOptions::new(&path)).await.unwrap();
    legacy_packages_are_served(&store, &legacy).await.unwrap();
}

/// What a push leaves when it fails half-way, and what pruning leaves of it: nothing. A write
/// still within its hour is left alone; one past it (a crashed server's) is deleted.
#[tokio::test]
async fn pruning_deletes_the_chunks_of_abandoned_writes_only() {
    use sqlx::Connection;
    use stevedore_store::RevisionPackage;
    use stevedore_store::testsuite::spool;

    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, SyncMode::Normal).await;
    let project = store.create_project("acme", at(0)).await.unwrap();
    let bytes: Vec<u8> = (0..3 * 1024 * 1024).map(|at| (at % 251) as u8).collect();
    let spooled = spool(&bytes).await.unwrap();
    let mut lying = spooled.file.clone();
    lying.sha256 = "0".repeat(64);
    store
        .push_code(
            &project.id,
            &image_spec("hello"),
            Some(RevisionPackage::File(&lying)),
            at(1),
        )
        .await
        .unwrap_err();

    let path = dir.path().join("nested/dir/stevedore.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let chunks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM package_chunks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(chunks, 3, "the refused write's chunks, given up");
    // A write in progress (an hour to go) and a crashed one (its hour past), by hand.
    for (id, from_now) in [(1001_i64, 3_600_000_000_i64), (1002, -1)] {
        sqlx::query(
            "INSERT INTO package_blobs (id, loose_until) VALUES (?1, \
             CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER) + ?2)",
        )
        .bind(id)
        .bind(from_now)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query("INSERT INTO package_chunks (blob, seq, bytes) VALUES (?1, 0, x'00')")
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(
        store.prune_packages(1, 100).await.unwrap(),
        stevedore_store::PackagePrune::default(),
        "leftovers are no packages"
    );
    let left: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT blob FROM package_chunks")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, [1001]);
    let blobs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM package_blobs")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(blobs, 1);
    conn.close().await.unwrap();

    // The same bytes, honestly described, are stored once as usual.
    let code = store
        .push_code(&project.id, &image_spec("hello"), spooled.revision(), at(2))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_package(&project.id, &code.id, None)
            .await
            .unwrap()
            .into_bytes()
            .await
            .unwrap(),
        bytes
    );
}
