//! Projects and tokens, and what one project may see of another's.

use stevedore_model::{ScheduleStatus, TaskStatus};

use super::{
    ALL, assert_not_found, at, enqueue_one, image_spec, lease_one, new_task, new_token, project,
    schedule_spec,
};
use crate::{Result, StatsWindow, Store, StoreError, TaskFilter, TokenRole};

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
        .create_token(
            &new_token(Some(&acme.id), TokenRole::Project),
            "sha-project",
            at(2),
        )
        .await?;
    assert_eq!(token.project_id.as_deref(), Some(acme.id.as_str()));
    assert_eq!(store.find_token("sha-project").await?, Some(token));
    let admin = store
        .create_token(&new_token(None, TokenRole::Admin), "sha-admin", at(3))
        .await?;
    assert_eq!(store.find_token("sha-admin").await?, Some(admin));
    let runner = store
        .create_token(&new_token(None, TokenRole::Runner), "sha-runner", at(3))
        .await?;
    assert_eq!(
        store.find_token("sha-runner").await?.map(|t| t.role),
        Some(runner.role)
    );
    assert_eq!(store.find_token("sha-unknown").await?, None);
    // A runner token limited to clusters, bound to a project, keeps both.
    let scoped = store
        .create_token(
            &crate::NewToken {
                project_id: Some(acme.id.clone()),
                role: TokenRole::Runner,
                clusters: Some(vec!["gpu".to_owned(), "arm".to_owned()]),
            },
            "sha-scoped",
            at(3),
        )
        .await?;
    assert_eq!(store.find_token("sha-scoped").await?, Some(scoped.clone()));
    assert_eq!(
        scoped.clusters.as_deref(),
        Some(&["gpu".to_owned(), "arm".to_owned()][..])
    );
    assert_not_found(
        store
            .create_token(
                &new_token(Some("ghost"), TokenRole::Project),
                "sha-ghost",
                at(4),
            )
            .await,
        "ghost",
    );
    Ok(())
}

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
