-- Keel's PostgreSQL schema, version 4: rate limits shared by every process.
--
-- One row per limit key (e.g. `openai/gpt-4o:rpm`): the GCRA's theoretical
-- arrival time and the time a provider asked us to wait until, both in
-- nanoseconds since the epoch (the arithmetic is in the store crate's
-- `limit` module). Each take updates its row in place, so the table is
-- tiny and hot: pages are kept half empty so the updates stay HOT (no
-- index entry per update) and old versions are pruned on the page.
CREATE TABLE rate_limits (
    key           text   PRIMARY KEY,
    tat_ns        bigint NOT NULL,
    held_until_ns bigint NOT NULL
) WITH (fillfactor = 50);
