-- The event feed: execution_events read in order from a consumer's durable
-- cursor (engine::feed). Ids come from a sequence, and a sequence alone is
-- not gap-free: a transaction that took id 10 may commit after another that
-- took id 11 was read, and a reader that moved past 11 would never see 10.
-- So every event also records the id of the transaction that wrote it, and a
-- reader reads in (txid, id) order and only the events of transactions older
-- than every transaction still running (its snapshot's xmin): no event can
-- appear later below that line.
--
-- Added without a default first and the default set after, so existing rows
-- keep NULL (events written before the feed existed are not in the feed) and
-- the table is not rewritten.
ALTER TABLE execution_events ADD COLUMN txid bigint;
ALTER TABLE execution_events ALTER COLUMN txid SET DEFAULT (pg_current_xact_id()::text::bigint);
COMMENT ON COLUMN execution_events.txid IS 'Id of the transaction that wrote the event (pg_current_xact_id(), by default; writers must not set it): with id, the event''s position in the feed. NULL for events written before the feed existed, which the feed does not return.';

CREATE TABLE event_feed_cursors (
    consumer text PRIMARY KEY CHECK (consumer <> '' AND length(consumer) <= 200),
    txid bigint NOT NULL DEFAULT 0,
    event_id bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE event_feed_cursors IS 'One row per named consumer of the event feed: the position (txid, event_id) of the last event it acknowledged. Moves only forward.';
COMMENT ON COLUMN event_feed_cursors.consumer IS 'The consumer''s name, chosen by the application (1 to 200 characters).';
COMMENT ON COLUMN event_feed_cursors.txid IS 'execution_events.txid of the last acknowledged event (0: none yet).';
COMMENT ON COLUMN event_feed_cursors.event_id IS 'execution_events.id of the last acknowledged event (0: none yet).';
COMMENT ON COLUMN event_feed_cursors.created_at IS 'When the consumer was first registered.';
COMMENT ON COLUMN event_feed_cursors.updated_at IS 'When the consumer last acknowledged an event.';
