-- Every attempt at running a task: each lease of it, who held it, when its container started
-- and how the attempt ended (`requeued` with the reason, or the task's final status). Kept by
-- triggers on the task's status, in the transaction of the change, so every way a task is
-- leased, started, given back or finished is recorded without the code that does it knowing.
CREATE TABLE task_attempts (
    task_id     TEXT NOT NULL REFERENCES tasks (id),
    attempt     INTEGER NOT NULL,
    runner_id   TEXT,
    leased_at   INTEGER NOT NULL,
    started_at  INTEGER,
    ended_at    INTEGER,
    -- `requeued`, or the status the task ended with.
    ending      TEXT,
    exit_code   INTEGER,
    -- Why: the task's message at the end (a requeue's reason, an error's message).
    reason      TEXT,
    PRIMARY KEY (task_id, attempt)
) STRICT, WITHOUT ROWID;

CREATE TRIGGER task_attempt_leased AFTER UPDATE OF status ON tasks
    WHEN OLD.status = 'queued' AND NEW.status = 'preparing'
BEGIN
    INSERT INTO task_attempts (task_id, attempt, runner_id, leased_at)
        VALUES (NEW.id,
                (SELECT COUNT(*) + 1 FROM task_attempts WHERE task_id = NEW.id),
                NEW.runner_id, NEW.updated_at);
END;

CREATE TRIGGER task_attempt_started AFTER UPDATE OF status ON tasks
    WHEN OLD.status = 'preparing' AND NEW.status = 'running'
BEGIN
    UPDATE task_attempts SET started_at = NEW.start_time
        WHERE task_id = NEW.id AND ended_at IS NULL;
END;

CREATE TRIGGER task_attempt_ended AFTER UPDATE OF status ON tasks
    WHEN OLD.status IN ('preparing', 'running') AND NEW.status NOT IN ('preparing', 'running')
BEGIN
    UPDATE task_attempts SET
            ended_at = NEW.updated_at,
            ending = CASE NEW.status WHEN 'queued' THEN 'requeued' ELSE NEW.status END,
            exit_code = CASE NEW.status WHEN 'queued' THEN NULL ELSE NEW.exit_code END,
            reason = NEW.msg
        WHERE task_id = NEW.id AND ended_at IS NULL;
END;
