-- Keel's PostgreSQL schema, version 6: run priorities.
--
-- A run's priority (0 lowest .. 9 highest, 5 when not given) is on its row
-- and on each of its tasks. Claims take the due tasks of lowest rank,
-- `visible_at - priority * 10000` (PRIORITY_CREDIT = 10 s per level), so a
-- higher priority counts as having waited longer and nothing starves.
-- The rank is an expression index: it follows every change of
-- `visible_at` (claim, heartbeat, retry, defer, release) by itself, and
-- adds no index write those changes did not already make (`visible_at`
-- is indexed by tasks_by_visible). `visible_at` is its second column, so
-- the claim checks dueness on the index entries it scans. Adding columns
-- with a constant default rewrites no table.
ALTER TABLE runs ADD COLUMN priority smallint NOT NULL DEFAULT 5;
ALTER TABLE tasks ADD COLUMN priority smallint NOT NULL DEFAULT 5;
CREATE INDEX tasks_by_rank ON tasks ((visible_at - priority * 10000), visible_at);
