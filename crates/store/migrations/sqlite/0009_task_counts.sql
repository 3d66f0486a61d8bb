-- Task counts by status and priority, kept by triggers in the same transaction as every
-- change of a task's status or priority, so the metrics gauges read a few rows instead of
-- counting a million queued tasks at each scrape. Every way a task's row changes (queueing,
-- leases, completions, cancels in bulk, rescues) goes through them; nothing can forget.
CREATE TABLE task_counts (
    status    TEXT NOT NULL,
    priority  INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    PRIMARY KEY (status, priority)
) STRICT, WITHOUT ROWID;

INSERT INTO task_counts (status, priority, n)
    SELECT status, priority, COUNT(*) FROM tasks GROUP BY status, priority;

CREATE TRIGGER tasks_counted_on_insert AFTER INSERT ON tasks
BEGIN
    INSERT INTO task_counts (status, priority, n) VALUES (NEW.status, NEW.priority, 1)
        ON CONFLICT (status, priority) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER tasks_counted_on_update AFTER UPDATE OF status, priority ON tasks
    WHEN OLD.status IS NOT NEW.status OR OLD.priority IS NOT NEW.priority
BEGIN
    UPDATE task_counts SET n = n - 1 WHERE status = OLD.status AND priority = OLD.priority;
    INSERT INTO task_counts (status, priority, n) VALUES (NEW.status, NEW.priority, 1)
        ON CONFLICT (status, priority) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER tasks_counted_on_delete AFTER DELETE ON tasks
BEGIN
    UPDATE task_counts SET n = n - 1 WHERE status = OLD.status AND priority = OLD.priority;
END;
