-- Keel's SQLite schema, version 9: runs undoing their calls, and runs
-- waiting for their child runs, are pending.
--
-- A run that failed or was cancelled after calls of tools with `compensate`
-- is COMPENSATING until its compensations ran; a run whose `spawn_agents`
-- calls wait for their children is AWAITING_CHILDREN. Neither is finished:
-- both count as pending like the other unfinished statuses (PostgreSQL
-- counts every run whose outcome is NULL). The partial index repeats the
-- queries' WHERE clause word for word, as before.
DROP INDEX runs_pending;
CREATE INDEX runs_pending ON runs (tenant, agent, status)
    WHERE status IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL', 'AWAITING_APPROVAL', 'AWAITING_CHILDREN', 'COMPENSATING');
