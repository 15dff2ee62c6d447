-- Keel's PostgreSQL schema, version 2: event export and backpressure.

-- Settings of the database, one row each. `export` = 'on' once
-- `enable_export` was called: from then on, commits fill the outbox.
CREATE TABLE settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- One row per commit of a run's events (a submission, an append) while
-- export is on: the run and the seqs written. The relay deletes a row once
-- it published its events, so rows come and go like tasks, and the table is
-- vacuumed as eagerly.
--
-- Ids come from a sequence as each transaction inserts, so they are not in
-- commit order across transactions. For one run they are: an append can
-- only write after the run's previous append committed (the run row's
-- lock). That needs a sequence cache of 1 (the default): with a larger one,
-- each session would draw from a range of its own.
CREATE TABLE outbox (
    id        bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    run_id    uuid   NOT NULL,
    first_seq bigint NOT NULL,
    last_seq  bigint NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000);

-- Who publishes the outbox: one row per named lease, held until `until`.
CREATE TABLE relay_leases (
    name  text   PRIMARY KEY,
    owner text   NOT NULL,
    until bigint NOT NULL
);

-- Unfinished runs only, for counting a tenant's (or an agent's) pending
-- runs however many finished ones there are. `status` is already indexed
-- (runs_by_status), so this index changes nothing for HOT updates.
CREATE INDEX runs_pending ON runs (tenant, agent)
    WHERE status IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL');
