-- Keel's PostgreSQL schema, version 1.
-- Ids are uuid, times are epoch milliseconds (bigint), JSON is jsonb, but for
-- the journal's. Counts that are u32 in Rust (steps, attempts) are bigint, so
-- every value fits.
-- Names are compared and sorted byte-wise (COLLATE "C" in the queries), as
-- in SQLite, whatever the database's collation.

-- Agent versions; `id` is the registration order ("latest" = highest id).
CREATE TABLE agents (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant     text   NOT NULL,
    name       text   NOT NULL,
    version    text   NOT NULL,
    spec       jsonb  NOT NULL,
    created_at bigint NOT NULL,
    UNIQUE (tenant, name, version)
);
CREATE INDEX agents_by_name ON agents (tenant, name, id);

-- One row per run: the projection of its journal as of `last_seq`. Every
-- append updates it; the free space left in each page lets most of those
-- updates stay on their page (HOT) while the status does not change.
CREATE TABLE runs (
    id              uuid   PRIMARY KEY,
    tenant          text   NOT NULL,
    agent           text   NOT NULL,
    version         text   NOT NULL,
    status          text   NOT NULL,
    steps           bigint NOT NULL,
    input           jsonb  NOT NULL,
    output          text,
    error           text,
    input_tokens    bigint NOT NULL,
    output_tokens   bigint NOT NULL,
    last_seq        bigint NOT NULL,
    idempotency_key text,
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL,
    UNIQUE (tenant, idempotency_key)
) WITH (fillfactor = 80);
-- Listings are newest first; UUID v7 ids sort by creation time.
CREATE INDEX runs_by_tenant ON runs (tenant, id);
CREATE INDEX runs_by_status ON runs (tenant, status, id);
CREATE INDEX runs_by_agent ON runs (tenant, agent, id);

-- The journal: `data` is the JSON of the event, `kind` its tag. `data` is
-- `json`, not `jsonb`: it keeps the exact text written, and a step's output
-- may hold any string, while jsonb refuses U+0000 (`\u0000`). It is never
-- queried inside, and json is cheaper to write and to read back whole.
CREATE TABLE events (
    run_id uuid   NOT NULL REFERENCES runs (id),
    seq    bigint NOT NULL,
    kind   text   NOT NULL,
    data   json   NOT NULL,
    at     bigint NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- The queue. `visible_at` is when the task can be claimed: its run time while
-- unleased, its lease expiry while leased. So "claimable" is `visible_at <= now`
-- and an expired lease needs no reaper. Rows come and go with every step, so
-- the table is vacuumed more eagerly than the default (dead index entries
-- would slow down the claim's scan of `tasks_by_visible`).
CREATE TABLE tasks (
    id           uuid   PRIMARY KEY,
    run_id       uuid   NOT NULL REFERENCES runs (id),
    kind         text   NOT NULL,
    step         bigint NOT NULL,
    attempts     bigint NOT NULL,
    max_attempts bigint NOT NULL,
    visible_at   bigint NOT NULL,
    lease_owner  text,
    lease_token  bigint,
    last_error   text,
    created_at   bigint NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000);
CREATE INDEX tasks_by_visible ON tasks (visible_at);
CREATE INDEX tasks_by_run ON tasks (run_id);
CREATE INDEX tasks_by_owner ON tasks (lease_owner) WHERE lease_owner IS NOT NULL;

-- Tasks that used their attempts; the id is the task's, kept on redrive.
CREATE TABLE dead_letters (
    id           uuid   PRIMARY KEY,
    run_id       uuid   NOT NULL REFERENCES runs (id),
    kind         text   NOT NULL,
    step         bigint NOT NULL,
    attempts     bigint NOT NULL,
    max_attempts bigint NOT NULL,
    error        text   NOT NULL,
    created_at   bigint NOT NULL
);
CREATE INDEX dead_letters_by_time ON dead_letters (created_at, id);
