-- Keel's PostgreSQL schema, version 7: what a run's LLM calls cost.
--
-- `cost_usd` is the run's total so far (the sum of its `llm_completed`
-- events' `cost_usd`), written with the rest of the projection on every
-- append. It is in no index, so those updates stay heap-only (HOT), like
-- the token counts. Usage reports sum it over a tenant's or an agent's
-- runs (an agent's through runs_by_agent). Adding a column with a constant
-- default rewrites no table; runs before it count 0.
ALTER TABLE runs ADD COLUMN cost_usd double precision NOT NULL DEFAULT 0;
