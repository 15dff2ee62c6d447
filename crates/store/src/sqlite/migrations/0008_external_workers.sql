-- Keel's SQLite schema: external workers' queues.
--
-- A tool call made by an external worker is a task with a `queue` (the
-- tool's `worker:`) and the position of its call. The engine never claims
-- such a task: its claim reads `tasks_by_rank`, now holding only tasks
-- without a queue (the claim repeats `queue IS NULL` so SQLite uses the
-- partial index), and external workers lease from `tasks_by_queue`. A dead
-- letter keeps the queue and call so a re-drive puts the call back in it.
ALTER TABLE tasks ADD COLUMN queue TEXT;
ALTER TABLE tasks ADD COLUMN call_index INTEGER;
ALTER TABLE dead_letters ADD COLUMN queue TEXT;
ALTER TABLE dead_letters ADD COLUMN call_index INTEGER;
DROP INDEX tasks_by_rank;
CREATE INDEX tasks_by_rank ON tasks (visible_at - priority * 10000, visible_at)
    WHERE queue IS NULL;
CREATE INDEX tasks_by_queue ON tasks (queue, visible_at - priority * 10000, visible_at)
    WHERE queue IS NOT NULL;
