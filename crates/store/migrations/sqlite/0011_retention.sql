-- Retention: finished tasks' logs and payloads are removed after an age the operator sets,
-- the task rows stay. `log_removed_at` and `payload_removed_at` say when (the log's
-- `log_size` is the size it had; the payload is left empty).
ALTER TABLE tasks ADD COLUMN log_removed_at INTEGER;
ALTER TABLE tasks ADD COLUMN payload_removed_at INTEGER;

-- Finished tasks that still hold a log, or a payload, by when they ended: retention walks each
-- from its oldest in chunks (keyset by end time and id). Partial, so a task enters when it
-- finishes and leaves when retention has passed over it: neither unfinished tasks nor a
-- million tasks already pruned weigh on a walk.
CREATE INDEX tasks_log_kept ON tasks (end_time, id)
    WHERE end_time IS NOT NULL AND log_removed_at IS NULL;
CREATE INDEX tasks_payload_kept ON tasks (end_time, id)
    WHERE end_time IS NOT NULL AND payload_removed_at IS NULL;

-- The bytes the tasks of each status and priority hold, beside their count (0009): a task's
-- log while it is kept (`log_size`), and its payload's UTF-8 bytes. The same triggers keep
-- them, in the same transactions, so `Store::data_sizes` reads a few rows at a million tasks.
ALTER TABLE task_counts ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE task_counts ADD COLUMN payload_bytes INTEGER NOT NULL DEFAULT 0;

UPDATE task_counts SET
    log_bytes = coalesce((SELECT sum(log_size) FROM tasks AS t
        WHERE t.status = task_counts.status AND t.priority = task_counts.priority), 0),
    payload_bytes = coalesce((SELECT sum(octet_length(payload)) FROM tasks AS t
        WHERE t.status = task_counts.status AND t.priority = task_counts.priority), 0);

DROP TRIGGER tasks_counted_on_insert;
DROP TRIGGER tasks_counted_on_update;
DROP TRIGGER tasks_counted_on_delete;

CREATE TRIGGER tasks_counted_on_insert AFTER INSERT ON tasks
BEGIN
    INSERT INTO task_counts (status, priority, n, log_bytes, payload_bytes)
        VALUES (NEW.status, NEW.priority, 1,
            CASE WHEN NEW.log_removed_at IS NULL THEN NEW.log_size ELSE 0 END,
            octet_length(NEW.payload))
        ON CONFLICT (status, priority) DO UPDATE SET n = n + 1,
            log_bytes = log_bytes + excluded.log_bytes,
            payload_bytes = payload_bytes + excluded.payload_bytes;
END;

-- Every write of a task sets its status and log size, so the trigger fires on each and its
-- `WHEN` keeps it to real changes: a status or priority, a log append, a removal. The payload
-- itself only changes with `payload_removed_at`, which stands for it here: comparing
-- payloads on every heartbeat would cost for nothing.
CREATE TRIGGER tasks_counted_on_update
    AFTER UPDATE OF status, priority, log_size, log_removed_at, payload_removed_at ON tasks
    WHEN OLD.status IS NOT NEW.status OR OLD.priority IS NOT NEW.priority
        OR OLD.log_size IS NOT NEW.log_size OR OLD.log_removed_at IS NOT NEW.log_removed_at
        OR OLD.payload_removed_at IS NOT NEW.payload_removed_at
BEGIN
    UPDATE task_counts SET n = n - 1,
        log_bytes = log_bytes - CASE WHEN OLD.log_removed_at IS NULL THEN OLD.log_size ELSE 0 END,
        payload_bytes = payload_bytes - octet_length(OLD.payload)
        WHERE status = OLD.status AND priority = OLD.priority;
    INSERT INTO task_counts (status, priority, n, log_bytes, payload_bytes)
        VALUES (NEW.status, NEW.priority, 1,
            CASE WHEN NEW.log_removed_at IS NULL THEN NEW.log_size ELSE 0 END,
            octet_length(NEW.payload))
        ON CONFLICT (status, priority) DO UPDATE SET n = n + 1,
            log_bytes = log_bytes + excluded.log_bytes,
            payload_bytes = payload_bytes + excluded.payload_bytes;
END;

CREATE TRIGGER tasks_counted_on_delete AFTER DELETE ON tasks
BEGIN
    UPDATE task_counts SET n = n - 1,
        log_bytes = log_bytes - CASE WHEN OLD.log_removed_at IS NULL THEN OLD.log_size ELSE 0 END,
        payload_bytes = payload_bytes - octet_length(OLD.payload)
        WHERE status = OLD.status AND priority = OLD.priority;
END;
