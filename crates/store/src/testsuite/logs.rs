//! Task logs: appends up to the cap, and reads from any offset with the task's state.

use stevedore_model::TaskStatus;

use super::{assert_not_found, at, enqueue_one, exited, lease_one, new_task, project_with_code};
use crate::{LogSlice, Result, RunReport, Store};

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
