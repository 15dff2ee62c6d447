-- Keel's PostgreSQL schema: external workers' queues.
--
-- A tool call made by an external worker is a task with a `queue` (the
-- tool's `worker:`) and the position of its call. The engine never claims
-- such a task: its claim scans `tasks_by_rank`, now holding only tasks
-- without a queue, and external workers lease from `tasks_by_queue`. A
-- dead letter keeps the queue and call so a re-drive puts the call back in
-- it. Nullable columns without a default rewrite no table.
ALTER TABLE tasks ADD COLUMN queue text;
ALTER TABLE tasks ADD COLUMN call_index bigint;
ALTER TABLE dead_letters ADD COLUMN queue text;
ALTER TABLE dead_letters ADD COLUMN call_index bigint;
DROP INDEX tasks_by_rank;
CREATE INDEX tasks_by_rank ON tasks ((visible_at - priority * 10000), visible_at)
    WHERE queue IS NULL;
CREATE INDEX tasks_by_queue ON tasks (queue, (visible_at - priority * 10000), visible_at)
    WHERE queue IS NOT NULL;
