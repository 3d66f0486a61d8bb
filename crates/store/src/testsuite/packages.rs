//! Packages: stored once per checksum, read back in chunks, counted once per project, and
//! pruned in bounded calls that never take a package a task still needs.

use futures::TryStreamExt;
use stevedore_model::{NewTask, Quota, TaskOutcome};

use super::{
    ALL, SpooledPackage, at, enqueue_one, image_spec, lease_one, new_task, project, spool,
};
use crate::{PackagePrune, PackageStream, Result, RevisionPackage, RunReport, Store, StoreError};

/// `size` bytes in a pattern that differs for each `seed`.
fn patterned(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|at| ((at * 7919 + usize::from(seed) * 31) % 251) as u8)
        .collect()
}

async fn package(size: usize, seed: u8) -> Result<(Vec<u8>, SpooledPackage)> {
    let bytes = patterned(size, seed);
    let spooled = spool(&bytes).await?;
    Ok((bytes, spooled))
}

async fn chunks(stream: PackageStream) -> Result<Vec<bytes::Bytes>> {
    stream.chunks.try_collect().await
}

fn assert_removed<T: std::fmt::Debug>(result: Result<T>, code: &str, rev: u32) {
    match result {
        Err(error @ StoreError::PackageRemoved { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains(&format!("revision {rev} of code {code}"))
                    && message.contains("removed by retention"),
                "{message}"
            );
        }
        other => panic!("expected revision {rev}'s package removed, got {other:?}"),
    }
}

async fn package_bytes_used(store: &dyn Store, project_id: &str) -> Result<u64> {
    let quotas = store.project_quotas(project_id).await?;
    Ok(quotas
        .iter()
        .find(|quota| quota.quota == Quota::PackageBytes)
        .and_then(|quota| quota.used)
        .unwrap_or_default())
}

/// Calls `prune_packages` until it reports nothing done; the sum of what it did.
async fn prune_all(store: &dyn Store, keep: u32) -> Result<PackagePrune> {
    let mut total = PackagePrune::default();
    loop {
        let done = store.prune_packages(keep, 100).await?;
        if done == PackagePrune::default() {
            return Ok(total);
        }
        total.revisions += done.revisions;
        total.packages += done.packages;
        total.bytes += done.bytes;
    }
}

pub async fn a_package_is_stored_once_per_checksum_and_read_in_chunks(
    store: &dyn Store,
) -> Result<()> {
    let acme = project(store, "acme").await?;
    let other = project(store, "other").await?;
    // Three chunks: two whole ones and a short one.
    let (bytes, spooled) = package(2 * 1024 * 1024 + 12_345, 1).await?;
    let mut revisions = Vec::new();
    for (project_id, name, at_secs) in [
        (&acme.id, "hello", 1),
        (&acme.id, "hello", 2),
        (&acme.id, "twin", 3),
        (&other.id, "hello", 4),
    ] {
        let code = store
            .push_code(
                project_id,
                &image_spec(name),
                spooled.revision(),
                at(at_secs),
            )
            .await?;
        assert_eq!(
            code.package_sha256.as_deref(),
            Some(spooled.file.sha256.as_str())
        );
        assert_eq!(code.package_size, Some(bytes.len() as u64));
        revisions.push((project_id.clone(), code.id, code.rev));
    }
    assert_eq!(store.package_bytes().await?, bytes.len() as u64);
    for (project_id, code_id, rev) in &revisions {
        let stream = store.get_package(project_id, code_id, Some(*rev)).await?;
        assert_eq!(stream.size, bytes.len() as u64);
        let read = chunks(stream).await?;
        assert_eq!(
            read.iter().map(|chunk| chunk.len()).collect::<Vec<_>>(),
            [1 << 20, 1 << 20, 12_345],
            "read a chunk at a time"
        );
        assert_eq!(read.concat(), bytes);
    }
    // Another package is stored beside it; an empty one reads as nothing.
    let (small, small_spooled) = package(10, 2).await?;
    let code = store
        .push_code(
            &acme.id,
            &image_spec("small"),
            small_spooled.revision(),
            at(5),
        )
        .await?;
    assert_eq!(
        store.package_bytes().await?,
        (bytes.len() + small.len()) as u64
    );
    assert_eq!(
        store
            .get_package(&acme.id, &code.id, None)
            .await?
            .into_bytes()
            .await?,
        small
    );
    let empty = spool(b"").await?;
    let code = store
        .push_code(&acme.id, &image_spec("empty"), empty.revision(), at(6))
        .await?;
    let stream = store.get_package(&acme.id, &code.id, None).await?;
    assert_eq!(stream.size, 0);
    assert!(chunks(stream).await?.is_empty());
    Ok(())
}

pub async fn an_options_update_stores_and_reads_nothing(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let other = project(store, "other").await?;
    let (bytes, spooled) = package(1500, 1).await?;
    let first = store
        .push_code(&acme.id, &image_spec("hello"), spooled.revision(), at(1))
        .await?;
    let sha256 = spooled.file.sha256.clone();
    drop(spooled);
    // The file is gone: the options update needs nothing but the checksum.
    let mut changed = image_spec("hello");
    changed.retries = 3;
    let second = store
        .push_code(
            &acme.id,
            &changed,
            Some(RevisionPackage::Stored { sha256: &sha256 }),
            at(2),
        )
        .await?;
    assert_eq!((second.id.as_str(), second.rev), (first.id.as_str(), 2));
    assert_eq!(second.package_sha256.as_deref(), Some(sha256.as_str()));
    assert_eq!(second.package_size, Some(1500));
    assert_eq!(second.spec, changed);
    assert_eq!(store.package_bytes().await?, 1500);
    assert_eq!(package_bytes_used(store, &acme.id).await?, 1500);
    assert_eq!(
        store
            .get_package(&acme.id, &first.id, Some(2))
            .await?
            .into_bytes()
            .await?,
        bytes
    );
    // Only a package the project holds can be kept so: another project cannot name it.
    let unknown = "0".repeat(64);
    for (project_id, sha256) in [(&acme.id, unknown.as_str()), (&other.id, sha256.as_str())] {
        super::assert_not_found(
            store
                .push_code(
                    project_id,
                    &image_spec("hello"),
                    Some(RevisionPackage::Stored { sha256 }),
                    at(3),
                )
                .await,
            "package",
        );
    }
    assert_eq!(store.get_code_by_name(&acme.id, "hello").await?.rev, 2);
    super::assert_not_found(store.get_code_by_name(&other.id, "hello").await, "hello");
    Ok(())
}

pub async fn a_file_that_is_not_what_it_claims_stores_nothing(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let (bytes, mut spooled) = package(3 * 1024 * 1024, 1).await?;
    let truth = spooled.file.clone();
    spooled.file.sha256 = "0".repeat(64);
    let mut shorter = spooled.file.clone();
    shorter.sha256 = truth.sha256.clone();
    shorter.size -= 1;
    let mut longer = shorter.clone();
    longer.size += 2;
    let mut missing = truth.clone();
    missing.path.set_extension("missing");
    for file in [&spooled.file, &shorter, &longer, &missing] {
        let refused = store
            .push_code(
                &acme.id,
                &image_spec("hello"),
                Some(RevisionPackage::File(file)),
                at(1),
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::PackageFile(_))),
            "{file:?}: {refused:?}"
        );
    }
    super::assert_not_found(store.get_code_by_name(&acme.id, "hello").await, "hello");
    assert_eq!(store.package_bytes().await?, 0);
    // What the refused writes left is given up, and goes with the next pruning.
    assert_eq!(prune_all(store, 1).await?, PackagePrune::default());
    let code = store
        .push_code(
            &acme.id,
            &image_spec("hello"),
            Some(RevisionPackage::File(&truth)),
            at(2),
        )
        .await?;
    assert_eq!(
        store
            .get_package(&acme.id, &code.id, None)
            .await?
            .into_bytes()
            .await?,
        bytes
    );
    // A package to a project that does not exist is refused before its bytes are written.
    super::assert_not_found(
        store
            .push_code("ghost", &image_spec("x"), spooled.revision(), at(3))
            .await,
        "ghost",
    );
    Ok(())
}

pub async fn package_bytes_count_each_package_once_per_project(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let other = project(store, "other").await?;
    let (_, shared) = package(600, 1).await?;
    let (_, own) = package(100, 2).await?;
    for (name, at_secs) in [("a", 1), ("a", 2), ("b", 3)] {
        store
            .push_code(&acme.id, &image_spec(name), shared.revision(), at(at_secs))
            .await?;
    }
    assert_eq!(package_bytes_used(store, &acme.id).await?, 600);
    store
        .push_code(&other.id, &image_spec("a"), shared.revision(), at(4))
        .await?;
    // Each project is charged what its revisions hold; the store keeps it once.
    assert_eq!(package_bytes_used(store, &other.id).await?, 600);
    assert_eq!(package_bytes_used(store, &acme.id).await?, 600);
    assert_eq!(store.package_bytes().await?, 600);
    store
        .push_code(&acme.id, &image_spec("b"), own.revision(), at(5))
        .await?;
    assert_eq!(package_bytes_used(store, &acme.id).await?, 700);
    // A deleted code's revisions no longer count; another code still holding the package does.
    let a = store.get_code_by_name(&acme.id, "a").await?;
    store.delete_code(&acme.id, &a.id, at(6)).await?;
    assert_eq!(package_bytes_used(store, &acme.id).await?, 700);
    let b = store.get_code_by_name(&acme.id, "b").await?;
    store.delete_code(&acme.id, &b.id, at(7)).await?;
    assert_eq!(package_bytes_used(store, &acme.id).await?, 0);
    assert_eq!(package_bytes_used(store, &other.id).await?, 600);
    // At a limit, a package the project holds already still fits; a new one does not.
    store
        .set_project_quota(&other.id, Quota::PackageBytes, Some(650), at(8))
        .await?;
    store
        .push_code(&other.id, &image_spec("a"), shared.revision(), at(9))
        .await?;
    assert!(matches!(
        store
            .push_code(&other.id, &image_spec("a"), own.revision(), at(10))
            .await,
        Err(StoreError::QuotaExceeded(_))
    ));
    assert_eq!(store.get_code_by_name(&other.id, "a").await?.rev, 2);
    Ok(())
}

pub async fn pruning_keeps_the_newest_revisions_and_those_tasks_pin(
    store: &dyn Store,
) -> Result<()> {
    let acme = project(store, "acme").await?;
    let mut packages = Vec::new();
    for rev in 1..=4_u8 {
        let (bytes, spooled) = package(1000 + usize::from(rev), rev).await?;
        store
            .push_code(
                &acme.id,
                &image_spec("hello"),
                spooled.revision(),
                at(i64::from(rev)),
            )
            .await?;
        packages.push(bytes);
        if rev == 1 {
            // Queued now, the task pins revision 1.
            enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
        }
    }
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let total: u64 = packages.iter().map(|bytes| bytes.len() as u64).sum();
    assert_eq!(store.package_bytes().await?, total);

    // The newest two stay, and the first, which a queued task pins: the second goes.
    assert_eq!(
        prune_all(store, 2).await?,
        PackagePrune {
            revisions: 1,
            packages: 1,
            bytes: packages[1].len() as u64,
        }
    );
    assert_removed(
        store.get_package(&acme.id, &code.id, Some(2)).await,
        "hello",
        2,
    );
    for rev in [1_u32, 3, 4] {
        let read = store
            .get_package(&acme.id, &code.id, Some(rev))
            .await?
            .into_bytes()
            .await?;
        assert_eq!(read, packages[rev as usize - 1], "revision {rev}");
    }
    // The revision keeps its record of what was pushed.
    let second = store.get_revision(&acme.id, &code.id, 2).await?;
    assert_eq!(second.package_size, Some(packages[1].len() as u64));
    assert_eq!(
        store.package_bytes().await?,
        total - packages[1].len() as u64
    );

    // Leased and running, the task still pins its revision; finished, it no longer does.
    let leased = lease_one(store, at(10)).await?;
    assert_eq!(leased.task.code_rev, 1);
    assert_eq!(prune_all(store, 1).await?.revisions, 1, "only revision 3");
    assert_eq!(
        store
            .leased_package(&leased.task.id, leased.lease.token)
            .await?
            .into_bytes()
            .await?,
        packages[0]
    );
    store
        .mark_running(&leased.task.id, leased.lease.token, at(11), at(11))
        .await?;
    assert_eq!(prune_all(store, 1).await?, PackagePrune::default());
    store
        .complete(
            &leased.task.id,
            leased.lease.token,
            &TaskOutcome::Exited { exit_code: 0 },
            &RunReport::default(),
            at(12),
        )
        .await?;
    assert_eq!(
        prune_all(store, 1).await?,
        PackagePrune {
            revisions: 1,
            packages: 1,
            bytes: packages[0].len() as u64,
        }
    );
    assert_removed(
        store.get_package(&acme.id, &code.id, Some(1)).await,
        "hello",
        1,
    );
    // The latest is always kept, whatever `keep` says.
    assert_eq!(prune_all(store, 0).await?, PackagePrune::default());
    assert_eq!(store.package_bytes().await?, packages[3].len() as u64);
    assert_eq!(
        store
            .get_package(&acme.id, &code.id, None)
            .await?
            .into_bytes()
            .await?,
        packages[3]
    );
    Ok(())
}

pub async fn pruning_removes_the_packages_of_deleted_codes(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let (first, first_spooled) = package(700, 1).await?;
    let (second, second_spooled) = package(800, 2).await?;
    store
        .push_code(
            &acme.id,
            &image_spec("gone"),
            first_spooled.revision(),
            at(1),
        )
        .await?;
    let code = store
        .push_code(
            &acme.id,
            &image_spec("gone"),
            second_spooled.revision(),
            at(2),
        )
        .await?;
    enqueue_one(store, &acme.id, new_task("gone"), at(3)).await?;
    let leased = lease_one(store, at(4)).await?;
    store.delete_code(&acme.id, &code.id, at(5)).await?;

    // Deleted, its latest revision goes too, unless a task that is not finished pins it.
    assert_eq!(
        prune_all(store, 1).await?,
        PackagePrune {
            revisions: 1,
            packages: 1,
            bytes: first.len() as u64,
        }
    );
    assert_eq!(
        store
            .leased_package(&leased.task.id, leased.lease.token)
            .await?
            .into_bytes()
            .await?,
        second
    );
    store
        .complete(
            &leased.task.id,
            leased.lease.token,
            &TaskOutcome::Cancelled,
            &RunReport::default(),
            at(6),
        )
        .await?;
    assert_eq!(
        prune_all(store, 1).await?,
        PackagePrune {
            revisions: 1,
            packages: 1,
            bytes: second.len() as u64,
        }
    );
    assert_eq!(store.package_bytes().await?, 0);
    // The same bytes pushed again are stored anew.
    let again = store
        .push_code(
            &acme.id,
            &image_spec("gone"),
            second_spooled.revision(),
            at(7),
        )
        .await?;
    assert_eq!(
        store
            .get_package(&acme.id, &again.id, None)
            .await?
            .into_bytes()
            .await?,
        second
    );
    assert_eq!(store.package_bytes().await?, second.len() as u64);
    Ok(())
}

pub async fn pruning_keeps_a_package_another_revision_holds(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let other = project(store, "other").await?;
    let (shared, shared_spooled) = package(900, 1).await?;
    let (_, own) = package(100, 2).await?;
    let old = store
        .push_code(&acme.id, &image_spec("a"), shared_spooled.revision(), at(1))
        .await?;
    store
        .push_code(&acme.id, &image_spec("a"), own.revision(), at(2))
        .await?;
    let theirs = store
        .push_code(
            &other.id,
            &image_spec("a"),
            shared_spooled.revision(),
            at(3),
        )
        .await?;
    assert_eq!(
        prune_all(store, 1).await?,
        PackagePrune {
            revisions: 1,
            packages: 0,
            bytes: 0,
        }
    );
    assert_removed(store.get_package(&acme.id, &old.id, Some(1)).await, "a", 1);
    assert_eq!(
        store
            .get_package(&other.id, &theirs.id, None)
            .await?
            .into_bytes()
            .await?,
        shared
    );
    assert_eq!(store.package_bytes().await?, 1000);
    let revisions = store.list_revisions(&acme.id, &old.id, ALL).await?;
    assert_eq!(revisions.len(), 2, "revisions themselves stay");
    Ok(())
}

pub async fn pruning_is_bounded_per_call(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    for rev in 1..=6_u8 {
        let (_, spooled) = package(100, rev).await?;
        store
            .push_code(
                &acme.id,
                &image_spec("hello"),
                spooled.revision(),
                at(i64::from(rev)),
            )
            .await?;
    }
    let mut calls = Vec::new();
    loop {
        let done = store.prune_packages(1, 2).await?;
        calls.push((done.revisions, done.packages, done.bytes));
        if done == PackagePrune::default() {
            break;
        }
    }
    assert_eq!(calls, [(2, 2, 200), (2, 2, 200), (1, 1, 100), (0, 0, 0)]);
    assert_eq!(store.prune_packages(1, 0).await?, PackagePrune::default());
    assert_eq!(store.package_bytes().await?, 100);
    Ok(())
}

pub async fn a_retry_pinning_a_pruned_revision_is_refused(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let (_, first) = package(100, 1).await?;
    let (_, second) = package(100, 2).await?;
    store
        .push_code(&acme.id, &image_spec("hello"), first.revision(), at(1))
        .await?;
    enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let leased = lease_one(store, at(2)).await?;
    store
        .mark_running(&leased.task.id, leased.lease.token, at(2), at(2))
        .await?;
    let failed = store
        .complete(
            &leased.task.id,
            leased.lease.token,
            &TaskOutcome::Exited { exit_code: 1 },
            &RunReport::default(),
            at(3),
        )
        .await?;
    store
        .push_code(&acme.id, &image_spec("hello"), second.revision(), at(4))
        .await?;
    assert_eq!(prune_all(store, 1).await?.revisions, 1);
    let retry = NewTask::retry_of(&failed, 0);
    assert_eq!(retry.code_rev, Some(1));
    assert_removed(store.enqueue(&acme.id, &[retry], at(5)).await, "hello", 1);
    // The latest revision, and an older one that kept its package, are pinned as before.
    let mut on_latest = new_task("hello");
    on_latest.code_rev = Some(2);
    enqueue_one(store, &acme.id, on_latest, at(6)).await?;
    Ok(())
}

/// What a database at migration 0009 held, a package per revision in `code_packages`, for a
/// backend's migration test: it writes `rows` in the old schema, migrates, and hands the store
/// to `legacy_packages_are_served`.
pub struct LegacyPackages {
    pub project_id: String,
    pub small: Vec<u8>,
    /// More than two chunks.
    pub large: Vec<u8>,
    /// `codes` rows: id, name, latest revision.
    pub codes: Vec<(String, String, i64)>,
    /// `code_revisions` rows: code id, revision, spec JSON, package SHA-256 and size; with the
    /// package's bytes for `code_packages` when it has one.
    pub revisions: Vec<LegacyRevision>,
}

pub struct LegacyRevision {
    pub code_id: String,
    pub rev: i64,
    pub spec: String,
    pub package: Option<(String, Vec<u8>)>,
}

/// Two codes: `hello` with the small package twice and then the large one, `other` with the
/// small one and then none.
pub fn legacy_packages() -> LegacyPackages {
    use sha2::Digest;
    let small = patterned(5000, 1);
    let large = patterned(2 * 1024 * 1024 + 777, 2);
    let sha = |bytes: &[u8]| hex::encode(sha2::Sha256::digest(bytes));
    let spec = |name: &str| serde_json::to_string(&super::image_spec(name)).unwrap();
    let revision =
        |code_id: &str, rev: i64, name: &str, package: Option<&Vec<u8>>| LegacyRevision {
            code_id: code_id.to_owned(),
            rev,
            spec: spec(name),
            package: package.map(|bytes| (sha(bytes), bytes.clone())),
        };
    LegacyPackages {
        project_id: "legacy-project".to_owned(),
        codes: vec![
            ("legacy-hello".to_owned(), "hello".to_owned(), 3),
            ("legacy-other".to_owned(), "other".to_owned(), 2),
        ],
        revisions: vec![
            revision("legacy-hello", 1, "hello", Some(&small)),
            revision("legacy-hello", 2, "hello", Some(&small)),
            revision("legacy-hello", 3, "hello", Some(&large)),
            revision("legacy-other", 1, "other", Some(&small)),
            revision("legacy-other", 2, "other", None),
        ],
        small,
        large,
    }
}

/// After the migration: every package served byte for byte and in chunks, each stored once,
/// counted once, and pruned like any other.
pub async fn legacy_packages_are_served(store: &dyn Store, legacy: &LegacyPackages) -> Result<()> {
    let project = &legacy.project_id;
    for (code_id, rev, expected) in [
        ("legacy-hello", 1, &legacy.small),
        ("legacy-hello", 2, &legacy.small),
        ("legacy-hello", 3, &legacy.large),
        ("legacy-other", 1, &legacy.small),
    ] {
        let stream = store.get_package(project, code_id, Some(rev)).await?;
        let read = chunks(stream).await?;
        assert!(read.iter().all(|chunk| chunk.len() <= 1 << 20));
        assert_eq!(&read.concat(), expected, "{code_id} revision {rev}");
    }
    super::assert_not_found(
        store.get_package(project, "legacy-other", Some(2)).await,
        "package",
    );
    let both = (legacy.small.len() + legacy.large.len()) as u64;
    assert_eq!(store.package_bytes().await?, both);
    assert_eq!(package_bytes_used(store, project).await?, both);
    assert_eq!(
        prune_all(store, 1).await?,
        PackagePrune {
            revisions: 3,
            packages: 1,
            bytes: legacy.small.len() as u64,
        }
    );
    assert_eq!(
        store
            .get_package(project, "legacy-hello", None)
            .await?
            .into_bytes()
            .await?,
        legacy.large
    );
    // New pushes go on beside the migrated packages.
    let spooled = spool(&legacy.small).await?;
    let pushed = store
        .push_code(project, &image_spec("hello"), spooled.revision(), at(100))
        .await?;
    assert_eq!(pushed.rev, 4);
    assert_eq!(store.package_bytes().await?, both);
    Ok(())
}

pub async fn concurrent_pushes_of_one_package_store_it_once(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let other = project(store, "other").await?;
    let (bytes, spooled) = package(1024 * 1024 + 4321, 1).await?;
    let pushes = (0..6_i64).map(|at_secs| {
        let project_id = if at_secs % 2 == 0 {
            &acme.id
        } else {
            &other.id
        };
        let name = format!("code-{at_secs}");
        let spooled = &spooled;
        async move {
            store
                .push_code(
                    project_id,
                    &image_spec(&name),
                    spooled.revision(),
                    at(at_secs),
                )
                .await
                .map(|code| (project_id.clone(), code.id))
        }
    });
    let pushed = futures::future::try_join_all(pushes).await?;
    assert_eq!(store.package_bytes().await?, bytes.len() as u64);
    for (project_id, code_id) in &pushed {
        let read = store
            .get_package(project_id, code_id, None)
            .await?
            .into_bytes()
            .await?;
        assert_eq!(read, bytes);
    }
    // Whichever push lost a race to store it gave its own bytes up: pruning finds no package.
    assert_eq!(prune_all(store, 1).await?, PackagePrune::default());
    assert_eq!(store.package_bytes().await?, bytes.len() as u64);
    Ok(())
}

pub async fn a_push_racing_the_pruning_of_its_package_keeps_it(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    for round in 0..8_u8 {
        // `old` holds the package only through an old revision, which pruning drops, while
        // `new` pushes the same bytes: whichever comes first, `new` ends up with them.
        let (bytes, spooled) = package(2000, round.wrapping_mul(2)).await?;
        let (_, newer) = package(10, round.wrapping_mul(2).wrapping_add(1)).await?;
        let old_name = format!("old-{round}");
        let new_name = format!("new-{round}");
        let at_secs = i64::from(round) * 10;
        store
            .push_code(
                &acme.id,
                &image_spec(&old_name),
                spooled.revision(),
                at(at_secs),
            )
            .await?;
        store
            .push_code(
                &acme.id,
                &image_spec(&old_name),
                newer.revision(),
                at(at_secs + 1),
            )
            .await?;
        let (pruned, pushed) = futures::future::join(
            prune_all(store, 1),
            store.push_code(
                &acme.id,
                &image_spec(&new_name),
                spooled.revision(),
                at(at_secs + 2),
            ),
        )
        .await;
        pruned?;
        let pushed = pushed?;
        let read = store
            .get_package(&acme.id, &pushed.id, None)
            .await?
            .into_bytes()
            .await?;
        assert_eq!(read, bytes, "round {round}");
    }
    Ok(())
}
