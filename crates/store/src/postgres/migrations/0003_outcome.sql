-- Keel's PostgreSQL schema, version 3: run updates that stay on their page.
--
-- Every append updates its run row, and the status flips between
-- AWAITING_LLM and AWAITING_TOOL at almost every one. While `status` was in
-- an index, none of those updates could be HOT (heap-only tuples: the new
-- version stays on its page and no index gets a new entry), so each one
-- wrote a new entry into every index of `runs`. The indexes now hold
-- `outcome` instead: NULL while the run is unfinished, its terminal status
-- once it is over. It changes once in a run's life; `status` is in no index.
ALTER TABLE runs ADD COLUMN outcome text;
UPDATE runs SET outcome = status WHERE status NOT IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL');

DROP INDEX runs_by_status;
DROP INDEX runs_pending;
-- Listings by status: a terminal one by its outcome, an unfinished one
-- among the unfinished runs (outcome IS NULL).
CREATE INDEX runs_by_outcome ON runs (tenant, outcome, id);
-- Unfinished runs only, for counting a tenant's (or an agent's) pending
-- runs however many finished ones there are.
CREATE INDEX runs_pending ON runs (tenant, agent) WHERE outcome IS NULL;
