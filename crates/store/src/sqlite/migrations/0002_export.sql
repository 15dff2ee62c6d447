-- Keel's SQLite schema, version 2: event export and backpressure.

-- Settings of the database, one row each. `export` = 'on' once
-- `enable_export` was called: from then on, commits fill the outbox.
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per commit of a run's events (a submission, an append) while
-- export is on: the run and the seqs written. The relay deletes a row once
-- it published its events. Ids are never reused (AUTOINCREMENT), so a late
-- acknowledgement cannot delete a newer entry; the single writer gives them
-- out in commit order.
CREATE TABLE outbox (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT    NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL
);

-- Who publishes the outbox: one row per named lease, held until `until`.
CREATE TABLE relay_leases (
    name  TEXT    PRIMARY KEY,
    owner TEXT    NOT NULL,
    until INTEGER NOT NULL
) WITHOUT ROWID;

-- Unfinished runs only, for counting a tenant's (or an agent's) pending
-- runs however many finished ones there are. Queries must repeat this
-- WHERE clause word for word for SQLite to use the index, and `status` is
-- in it so that they read the index only (SQLite checks the clause again).
CREATE INDEX runs_pending ON runs (tenant, agent, status)
    WHERE status IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL');
