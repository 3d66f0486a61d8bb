-- Task counts by status and priority for the metrics gauges, so that a scrape reads a few
-- rows instead of counting a million queued tasks. Several servers write tasks at once, so a
-- single counter row per status would make every status change wait for every other:
-- instead each statement that changes tasks appends its net change to `task_count_changes`
-- (a statement-level trigger, in the statement's own transaction: no row is shared, nobody
-- waits), and the gauges read `task_counts` plus the changes not yet folded into it. Folding
-- (`gauges::fold_task_counts`) moves the changes into `task_counts` in one transaction, so a
-- reader sees each change exactly once, before or after.
CREATE TABLE task_counts (
    status    TEXT NOT NULL,
    priority  SMALLINT NOT NULL,
    n         BIGINT NOT NULL,
    PRIMARY KEY (status, priority)
);

CREATE TABLE task_count_changes (
    id        BIGSERIAL PRIMARY KEY,
    status    TEXT NOT NULL,
    priority  SMALLINT NOT NULL,
    n         BIGINT NOT NULL
);

CREATE FUNCTION tasks_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_count_changes (status, priority, n)
            SELECT status, priority, count(*) FROM new_rows GROUP BY status, priority;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO task_count_changes (status, priority, n)
            SELECT status, priority, -count(*) FROM old_rows GROUP BY status, priority;
    ELSE
        INSERT INTO task_count_changes (status, priority, n)
            SELECT status, priority, sum(n) FROM (
                SELECT status, priority, 1 AS n FROM new_rows
                UNION ALL
                SELECT status, priority, -1 AS n FROM old_rows
            ) AS changed
            GROUP BY status, priority HAVING sum(n) <> 0;
    END IF;
    RETURN NULL;
END
$$;

-- The triggers first: they lock `tasks` against writes until this migration commits, so the
-- counts below are exact.
CREATE TRIGGER tasks_counted_on_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_count_changes();
CREATE TRIGGER tasks_counted_on_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_count_changes();
CREATE TRIGGER tasks_counted_on_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_count_changes();

INSERT INTO task_counts (status, priority, n)
    SELECT status, priority, count(*) FROM tasks GROUP BY status, priority;
