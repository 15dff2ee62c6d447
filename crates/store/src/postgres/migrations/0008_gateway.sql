-- Keel's PostgreSQL schema, version 8: tool calls in streamed LLM output,
-- and circuit breakers shared by every process.
--
-- A batch of deltas also carries the tool calls the model was writing
-- since the previous batch: a JSON array of pieces, one per call
-- (`{"index", "id"?, "name"?, "arguments"}`: the id and the tool's name in
-- the batch where the call starts, then the next fragments of its
-- arguments), NULL when the batch has none. Compacted with the rest of the
-- row (the journaled `llm_completed` holds the calls whole). A nullable
-- column without a default rewrites no table.
ALTER TABLE deltas ADD COLUMN tool_calls text;

-- The latest transition of each LLM endpoint's circuit breaker, whichever
-- process made it: `state` is closed, open or half_open; `open_until` (epoch
-- ms) while open; `opened_at` when the opening that led here happened (open,
-- half_open); `failures` the consecutive failures behind the state;
-- `process` the process that wrote it. Written only on transitions (a few
-- rows, rarely updated); an older transition never replaces a newer one
-- (`updated_at`). Every process reads the whole table at most once a second
-- and refuses calls to an endpoint another process has open.
CREATE TABLE breakers (
    endpoint   text   PRIMARY KEY,
    state      text   NOT NULL,
    open_until bigint,
    opened_at  bigint,
    failures   bigint NOT NULL,
    process    text   NOT NULL,
    updated_at bigint NOT NULL
);
