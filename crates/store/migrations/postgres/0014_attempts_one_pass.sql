-- The attempts trigger looks at a statement's changes once: one pass over the transition
-- tables counts the leases and endings it holds, and only the statements those call for run.
-- A batch of starts used to run all three (each a join of the transition tables, the two that
-- had nothing to do included).
--
-- A start is no longer written to the attempt when it happens: the task's row holds it
-- (`start_time`, cleared whenever the task is given back), so the attempt takes it when it
-- ends, and until then the store reads the open attempt's start from the task. A batch of
-- starts writes no attempt at all.
CREATE OR REPLACE FUNCTION task_attempts_follow() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    leased BIGINT;
    ended  BIGINT;
BEGIN
    SELECT count(*) FILTER (WHERE o.status = 'queued' AND n.status = 'preparing'),
           count(*) FILTER (WHERE o.status IN ('preparing', 'running')
                              AND n.status NOT IN ('preparing', 'running'))
        INTO leased, ended
        FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
        WHERE o.status IS DISTINCT FROM n.status;
    -- The tasks' rows are locked by this update: no other attempt is numbered meanwhile.
    IF leased > 0 THEN
        INSERT INTO task_attempts (task_id, attempt, runner_id, leased_at)
            SELECT n.id, (SELECT count(*) + 1 FROM task_attempts AS a WHERE a.task_id = n.id),
                   n.runner_id, n.updated_at
            FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
            WHERE o.status = 'queued' AND n.status = 'preparing';
    END IF;
    IF ended > 0 THEN
        UPDATE task_attempts AS a SET
                started_at = COALESCE(a.started_at, o.start_time),
                ended_at = n.updated_at,
                ending = CASE n.status WHEN 'queued' THEN 'requeued' ELSE n.status END,
                exit_code = CASE n.status WHEN 'queued' THEN NULL ELSE n.exit_code END,
                reason = n.msg
            FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
            WHERE o.status IN ('preparing', 'running')
              AND n.status NOT IN ('preparing', 'running')
              AND a.task_id = n.id AND a.ended_at IS NULL;
    END IF;
    RETURN NULL;
END
$$;
