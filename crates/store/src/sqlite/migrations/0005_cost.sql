-- Keel's SQLite schema, version 5: what a run's LLM calls cost.
--
-- `cost_usd` is the run's total so far (the sum of its `llm_completed`
-- events' `cost_usd`), written with the rest of the projection on every
-- append, and in no index. Usage reports sum it over a tenant's or an
-- agent's runs (an agent's through runs_by_agent). Runs before it count 0.
ALTER TABLE runs ADD COLUMN cost_usd REAL NOT NULL DEFAULT 0;
