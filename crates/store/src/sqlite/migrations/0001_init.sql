-- Keel's SQLite schema, version 1.
-- Ids are hyphenated UUID text, times are epoch milliseconds, JSON is text.

-- Agent versions; `id` is the registration order ("latest" = highest id).
CREATE TABLE agents (
    id         INTEGER PRIMARY KEY,
    tenant     TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    version    TEXT    NOT NULL,
    spec       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (tenant, name, version)
);
CREATE INDEX agents_by_name ON agents (tenant, name, id);

-- One row per run: the projection of its journal as of `last_seq`.
CREATE TABLE runs (
    id              TEXT    PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    agent           TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    steps           INTEGER NOT NULL,
    input           TEXT    NOT NULL,
    output          TEXT,
    error           TEXT,
    input_tokens    INTEGER NOT NULL,
    output_tokens   INTEGER NOT NULL,
    last_seq        INTEGER NOT NULL,
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (tenant, idempotency_key)
);
-- Listings are newest first; UUID v7 text sorts by creation time.
CREATE INDEX runs_by_tenant ON runs (tenant, id);
CREATE INDEX runs_by_status ON runs (tenant, status, id);
CREATE INDEX runs_by_agent ON runs (tenant, agent, id);

-- The journal: `data` is the JSON of the event, `kind` its tag.
CREATE TABLE events (
    run_id TEXT    NOT NULL REFERENCES runs (id),
    seq    INTEGER NOT NULL,
    kind   TEXT    NOT NULL,
    data   TEXT    NOT NULL,
    at     INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

-- The queue. `visible_at` is when the task can be claimed: its run time while
-- unleased, its lease expiry while leased. So "claimable" is `visible_at <= now`
-- and an expired lease needs no reaper.
CREATE TABLE tasks (
    id           TEXT    PRIMARY KEY,
    run_id       TEXT    NOT NULL REFERENCES runs (id),
    kind         TEXT    NOT NULL,
    step         INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    visible_at   INTEGER NOT NULL,
    lease_owner  TEXT,
    lease_token  INTEGER,
    last_error   TEXT,
    created_at   INTEGER NOT NULL
);
CREATE INDEX tasks_by_visible ON tasks (visible_at);
CREATE INDEX tasks_by_run ON tasks (run_id);
CREATE INDEX tasks_by_owner ON tasks (lease_owner) WHERE lease_owner IS NOT NULL;

-- Tasks that used their attempts; the id is the task's, kept on redrive.
CREATE TABLE dead_letters (
    id           TEXT    PRIMARY KEY,
    run_id       TEXT    NOT NULL REFERENCES runs (id),
    kind         TEXT    NOT NULL,
    step         INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    error        TEXT    NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE INDEX dead_letters_by_time ON dead_letters (created_at, id);
