-- Keel's SQLite schema, version 4: run priorities.
--
-- A run's priority (0 lowest .. 9 highest, 5 when not given) is on its row
-- and on each of its tasks. Claims take the due tasks of lowest rank,
-- `visible_at - priority * 10000` (PRIORITY_CREDIT = 10 s per level), so a
-- higher priority counts as having waited longer and nothing starves.
-- The rank is an expression index: it follows every change of
-- `visible_at` (claim, heartbeat, retry, defer, release) by itself.
-- Queries must repeat the expression word for word for SQLite to use it;
-- `visible_at` is in the index so the claim checks dueness without
-- reading the table.
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 5;
ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 5;
CREATE INDEX tasks_by_rank ON tasks (visible_at - priority * 10000, visible_at);
