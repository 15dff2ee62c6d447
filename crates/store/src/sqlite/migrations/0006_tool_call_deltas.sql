-- Keel's SQLite schema, version 6: tool calls in streamed LLM output.
--
-- A batch of deltas also carries the tool calls the model was writing
-- since the previous batch: a JSON array of pieces, one per call
-- (`{"index", "id"?, "name"?, "arguments"}`: the id and the tool's name in
-- the batch where the call starts, then the next fragments of its
-- arguments), NULL when the batch has none. Compacted with the rest of the
-- row (the journaled `llm_completed` holds the calls whole).
ALTER TABLE deltas ADD COLUMN tool_calls TEXT;
