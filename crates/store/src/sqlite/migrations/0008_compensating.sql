-- Keel's SQLite schema, version 8: runs undoing their calls are pending.
--
-- A run that failed or was cancelled after calls of tools with `compensate`
-- is COMPENSATING until its compensations ran: it is not finished and
-- counts as pending like the other unfinished statuses (PostgreSQL counts
-- every run whose outcome is NULL). The partial index repeats the
-- queries' WHERE clause word for word, as before.
DROP INDEX runs_pending;
CREATE INDEX runs_pending ON runs (tenant, agent, status)
    WHERE status IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL', 'AWAITING_APPROVAL', 'COMPENSATING');
