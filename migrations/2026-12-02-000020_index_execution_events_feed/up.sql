-- The event feed's order: a reader's (txid, id) > (cursor) AND txid < xmin
-- is one range scan. Built CONCURRENTLY: transitions go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_events_feed_idx ON execution_events (txid, id);
