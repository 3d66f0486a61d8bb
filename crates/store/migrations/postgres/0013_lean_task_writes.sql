-- Leaner writes of a task's status: every change of status is an UPDATE that cannot be HOT
-- (the status is in index keys and predicates), so each one inserts into every index whose
-- predicate the new row passes, and the attempts trigger ran once per row.

-- A code's active tasks are counted through tasks_by_code_status (code_id, status, code_rev)
-- as well: this index only doubled its work on every lease and start.
DROP INDEX tasks_active_by_code;

-- Every query by runner asks for its active tasks only (its live leases, the tasks a
-- restarted runner held): finished tasks, which keep their last runner, need not enter it.
DROP INDEX tasks_by_runner;
CREATE INDEX tasks_by_runner ON tasks (runner_id) WHERE status IN ('preparing', 'running');

-- The attempts follow the status once per statement instead of once per row: a batch of
-- leases, starts or completions is one INSERT or UPDATE of its attempts, not one per task.
-- What is recorded is unchanged (0012). A statement updates a row at most once, so each task
-- has one old and one new row here.
DROP TRIGGER task_attempts_follow ON tasks;

CREATE OR REPLACE FUNCTION task_attempts_follow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Most statements (heartbeats, progress, log appends) change no status.
    IF NOT EXISTS (SELECT 1 FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
                   WHERE o.status IS DISTINCT FROM n.status) THEN
        RETURN NULL;
    END IF;
    -- The tasks' rows are locked by this update: no other attempt is numbered meanwhile.
    INSERT INTO task_attempts (task_id, attempt, runner_id, leased_at)
        SELECT n.id, (SELECT count(*) + 1 FROM task_attempts AS a WHERE a.task_id = n.id),
               n.runner_id, n.updated_at
        FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
        WHERE o.status = 'queued' AND n.status = 'preparing';
    UPDATE task_attempts AS a SET started_at = n.start_time
        FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
        WHERE o.status = 'preparing' AND n.status = 'running'
          AND a.task_id = n.id AND a.ended_at IS NULL;
    UPDATE task_attempts AS a SET
            ended_at = n.updated_at,
            ending = CASE n.status WHEN 'queued' THEN 'requeued' ELSE n.status END,
            exit_code = CASE n.status WHEN 'queued' THEN NULL ELSE n.exit_code END,
            reason = n.msg
        FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
        WHERE o.status IN ('preparing', 'running') AND n.status NOT IN ('preparing', 'running')
          AND a.task_id = n.id AND a.ended_at IS NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER task_attempts_follow AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_attempts_follow();
