//! Projects' registry credentials, and the one a lease carries.

use stevedore_model::{CodeKind, CodeSpec};

use super::{assert_not_found, at, enqueue_one, image_spec, lease_request, new_task, project};
use crate::{CredentialKey, CredentialVault, Result, Store, attach_registry_credentials};

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
