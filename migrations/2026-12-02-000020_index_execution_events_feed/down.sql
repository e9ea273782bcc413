DROP INDEX CONCURRENTLY IF EXISTS execution_events_feed_idx;
