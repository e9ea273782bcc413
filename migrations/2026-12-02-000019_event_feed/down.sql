DROP TABLE event_feed_cursors;
ALTER TABLE execution_events DROP COLUMN txid;
