-- Keel's SQLite schema, version 7: runs parked for approval are pending.
--
-- A run waiting for a human decision (AWAITING_APPROVAL) is not finished:
-- it counts as pending like the other unfinished statuses (PostgreSQL
-- counts every run whose outcome is NULL). The partial index repeats the
-- queries' WHERE clause word for word, as before.
DROP INDEX runs_pending;
CREATE INDEX runs_pending ON runs (tenant, agent, status)
    WHERE status IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL', 'AWAITING_APPROVAL');
