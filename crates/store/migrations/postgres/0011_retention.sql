-- Retention: finished tasks' logs and payloads are removed after an age the operator sets,
-- the task rows stay. `log_removed_at` and `payload_removed_at` say when (the log's
-- `log_size` is the size it had; the payload is left empty). Adding the columns locks `tasks`
-- against every other statement until this migration commits, so the totals below are exact.
ALTER TABLE tasks ADD COLUMN log_removed_at BIGINT, ADD COLUMN payload_removed_at BIGINT;

-- Finished tasks that still hold a log, or a payload, by when they ended: retention walks each
-- from its oldest in chunks (keyset by end time and id). Partial, so a task enters when it
-- finishes and leaves when retention has passed over it. Only columns that change when a task
-- finishes or is pruned are in them, so a log append stays a HOT update.
CREATE INDEX tasks_log_kept ON tasks (end_time, id)
    WHERE end_time IS NOT NULL AND log_removed_at IS NULL;
CREATE INDEX tasks_payload_kept ON tasks (end_time, id)
    WHERE end_time IS NOT NULL AND payload_removed_at IS NULL;

-- The bytes the tasks of each status and priority hold, beside their count (0009): a task's
-- log while it is kept (`log_size`), and its payload. The statement triggers append their net
-- changes with the counts' and the folds move them alike, so `Store::data_sizes` reads a few
-- rows at a million tasks and no writer waits for another to count.
ALTER TABLE task_counts
    ADD COLUMN log_bytes BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN payload_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE task_count_changes
    ADD COLUMN log_bytes BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN payload_bytes BIGINT NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION tasks_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_count_changes (status, priority, n, log_bytes, payload_bytes)
            SELECT status, priority, count(*),
                sum(CASE WHEN log_removed_at IS NULL THEN log_size ELSE 0 END),
                sum(octet_length(payload))
            FROM new_rows GROUP BY status, priority;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO task_count_changes (status, priority, n, log_bytes, payload_bytes)
            SELECT status, priority, -count(*),
                -sum(CASE WHEN log_removed_at IS NULL THEN log_size ELSE 0 END),
                -sum(octet_length(payload))
            FROM old_rows GROUP BY status, priority;
    ELSE
        -- `octet_length` of a payload stored out of line reads its TOAST pointer, not the value.
        INSERT INTO task_count_changes (status, priority, n, log_bytes, payload_bytes)
            SELECT status, priority, sum(n), sum(log_bytes), sum(payload_bytes) FROM (
                SELECT status, priority, 1 AS n,
                    CASE WHEN log_removed_at IS NULL THEN log_size ELSE 0 END AS log_bytes,
                    octet_length(payload) AS payload_bytes
                FROM new_rows
                UNION ALL
                SELECT status, priority, -1,
                    -CASE WHEN log_removed_at IS NULL THEN log_size ELSE 0 END,
                    -octet_length(payload)
                FROM old_rows
            ) AS changed
            GROUP BY status, priority
            HAVING sum(n) <> 0 OR sum(log_bytes) <> 0 OR sum(payload_bytes) <> 0;
    END IF;
    RETURN NULL;
END
$$;

-- Counted afresh under the lock: the counts too, so that the changes not yet folded (which
-- carry no bytes) are gone with them.
DELETE FROM task_count_changes;
DELETE FROM task_counts;
INSERT INTO task_counts (status, priority, n, log_bytes, payload_bytes)
    SELECT status, priority, count(*),
        sum(CASE WHEN log_removed_at IS NULL THEN log_size ELSE 0 END),
        sum(octet_length(payload))
    FROM tasks GROUP BY status, priority;
