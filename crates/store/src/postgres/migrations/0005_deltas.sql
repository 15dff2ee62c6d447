-- Keel's PostgreSQL schema, version 5: streamed LLM output, kept until its
-- step is journaled.
--
-- One row per batch of text a worker streamed from the model (written every
-- ~50 ms or ~2 KB, never per token), keyed by the run, its LLM step, the
-- attempt at the step (a retried call streams under a new attempt, so a
-- reader can tell its text replaces the earlier attempt's) and the batch's
-- index within the attempt. The rows of a step are deleted by the append
-- that journals its `LlmCompleted` (the final message holds the text), and
-- every row of a run by the append that ends it: the table only holds the
-- answers being streamed right now, so it stays small.
CREATE TABLE deltas (
    run_id  uuid   NOT NULL,
    step    bigint NOT NULL,
    attempt bigint NOT NULL,
    idx     bigint NOT NULL,
    text    text   NOT NULL,
    at      bigint NOT NULL,
    PRIMARY KEY (run_id, step, attempt, idx)
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000);
