//! The event feed: `execution_events` as an ordered, gap-free stream read
//! from a named consumer's durable cursor.
//!
//! NOTIFY is a wake-up: it is lost while a listener is disconnected, and it
//! says nothing about what happened before the listener started. The feed is
//! the record: every transition's event, in one order, from where a consumer
//! last acknowledged, at least once.
//!
//! **Why not by id.** Event ids come from a sequence, and a transaction that
//! took id 10 may commit after another that took id 11 has been read; a
//! reader that moved its cursor past 11 would never see 10. So each event
//! also stores the id of the transaction that wrote it (`txid`), the feed is
//! ordered by `(txid, id)`, and a read returns only the events of
//! transactions older than every transaction still running (the `xmin` of
//! its snapshot). Nothing can appear later below that line, so a cursor
//! never skips an event. The price: the feed waits for the oldest writing
//! transaction on the whole server (transaction ids are cluster-wide, so one
//! in another database counts too). A transaction that wrote anything and
//! stays open (idle in transaction) holds the feed back until it ends;
//! read-only sessions do not.
//! Set `idle_in_transaction_session_timeout` for services that might do that.
//!
//! **At least once.** [`next_events`] reads after the consumer's stored
//! position and does not move it; [`acknowledge`] moves it forward (never
//! back). A consumer that crashes between the two reads the same events
//! again: handle them idempotently (an event's `id` is unique). Several
//! processes reading under one consumer name all receive the same events;
//! use one reader per name.
//!
//! Events written before the feed existed (migration `000019`) have no
//! `txid` and are not in the feed; events go away with their execution
//! (pruning), read or not.
//!
//! ```no_run
//! # use workflow_db::engine::feed;
//! # fn run(conn: &mut diesel::PgConnection) -> workflow_db::Result<()> {
//! feed::register_consumer(conn, "billing")?;
//! loop {
//!     let events = feed::next_events(conn, "billing", 100)?;
//!     let Some(last) = events.last() else { break };
//!     for e in &events {
//!         println!("{} {:?} -> {}", e.event.execution_id, e.event.step_id, e.event.to_status);
//!     }
//!     feed::acknowledge(conn, "billing", last.position())?;
//! }
//! # Ok(())
//! # }
//! ```

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::ExecutionEvent;
use crate::prepared::prepared;

/// Longest consumer name (the table checks it too).
pub const MAX_CONSUMER_LEN: usize = 200;

/// A place in the feed: just after the event with this transaction id and
/// event id. [`FeedPosition::START`] is before every event.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct FeedPosition {
    /// `execution_events.txid` of the event.
    pub txid: i64,
    /// `execution_events.id` of the event.
    pub event_id: i64,
}

impl FeedPosition {
    /// Before every event.
    pub const START: FeedPosition = FeedPosition {
        txid: 0,
        event_id: 0,
    };
}

/// An event as the feed returns it: the event and its position.
#[derive(Debug, Clone, PartialEq, QueryableByName, Serialize, Deserialize)]
pub struct FeedEvent {
    /// The event.
    #[diesel(embed)]
    pub event: ExecutionEvent,
    /// The transaction that wrote it (`execution_events.txid`).
    #[diesel(sql_type = BigInt)]
    pub txid: i64,
}

impl FeedEvent {
    /// The position just after this event: acknowledge it once handled.
    pub fn position(&self) -> FeedPosition {
        FeedPosition {
            txid: self.txid,
            event_id: self.event.id,
        }
    }
}

#[derive(QueryableByName)]
struct Position {
    #[diesel(sql_type = BigInt)]
    txid: i64,
    #[diesel(sql_type = BigInt)]
    event_id: i64,
}

impl From<Position> for FeedPosition {
    fn from(p: Position) -> Self {
        FeedPosition {
            txid: p.txid,
            event_id: p.event_id,
        }
    }
}

/// Up to `limit` (at least 1) events after `after`, in feed order, each of a
/// transaction that committed before every transaction still running
/// (module docs). Without a consumer: the caller keeps the position.
#[tracing::instrument(skip(conn))]
pub fn read_events(
    conn: &mut PgConnection,
    after: FeedPosition,
    limit: i64,
) -> QueryResult<Vec<FeedEvent>> {
    prepared(
        diesel::sql_query(
            "SELECT id, execution_id, step_id, from_status, to_status, payload, created_at, txid \
             FROM execution_events \
             WHERE (txid, id) > ($1, $2) \
               AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
             ORDER BY txid, id LIMIT $3",
        )
        .bind::<BigInt, _>(after.txid)
        .bind::<BigInt, _>(after.event_id)
        .bind::<BigInt, _>(limit.max(1)),
    )
    .load(conn)
}

fn check_name(consumer: &str) -> Result<()> {
    let reason = if consumer.is_empty() {
        "a consumer name must not be empty"
    } else if consumer.chars().count() > MAX_CONSUMER_LEN {
        "a consumer name has at most 200 characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidId {
        what: "event feed consumer",
        input: consumer.chars().take(MAX_CONSUMER_LEN + 1).collect(),
        reason,
    })
}

fn unknown(consumer: &str) -> Error {
    Error::NotFound {
        entity: "event feed consumer",
        id: consumer.to_owned(),
    }
}

/// Registers `consumer` at [`FeedPosition::START`] unless it exists, and
/// returns its stored position (so calling it at every start-up is safe).
#[tracing::instrument(skip(conn))]
pub fn register_consumer(conn: &mut PgConnection, consumer: &str) -> Result<FeedPosition> {
    check_name(consumer)?;
    diesel::sql_query(
        "INSERT INTO event_feed_cursors (consumer) VALUES ($1) ON CONFLICT (consumer) DO NOTHING",
    )
    .bind::<Text, _>(consumer)
    .execute(conn)?;
    consumer_position(conn, consumer)?.ok_or_else(|| unknown(consumer))
}

/// The position `consumer` acknowledged last, or `None` when it is not
/// registered.
#[tracing::instrument(skip(conn))]
pub fn consumer_position(conn: &mut PgConnection, consumer: &str) -> Result<Option<FeedPosition>> {
    check_name(consumer)?;
    Ok(
        diesel::sql_query("SELECT txid, event_id FROM event_feed_cursors WHERE consumer = $1")
            .bind::<Text, _>(consumer)
            .get_result::<Position>(conn)
            .optional()?
            .map(FeedPosition::from),
    )
}

/// Up to `limit` events after `consumer`'s stored position (see
/// [`read_events`]); the position does not move until [`acknowledge`].
/// [`Error::NotFound`] when the consumer is not registered.
#[tracing::instrument(skip(conn))]
pub fn next_events(conn: &mut PgConnection, consumer: &str, limit: i64) -> Result<Vec<FeedEvent>> {
    let after = consumer_position(conn, consumer)?.ok_or_else(|| unknown(consumer))?;
    Ok(read_events(conn, after, limit)?)
}

/// Moves `consumer`'s position forward to `position` (an event's
/// [`FeedEvent::position`]) and returns the stored position: a position at or
/// before the stored one changes nothing (a slower reader of the same name
/// cannot move it back). [`Error::NotFound`] when the consumer is not
/// registered.
#[tracing::instrument(skip(conn))]
pub fn acknowledge(
    conn: &mut PgConnection,
    consumer: &str,
    position: FeedPosition,
) -> Result<FeedPosition> {
    check_name(consumer)?;
    diesel::sql_query(
        "UPDATE event_feed_cursors SET txid = $2, event_id = $3, updated_at = now() \
         WHERE consumer = $1 AND (txid, event_id) < ($2, $3)",
    )
    .bind::<Text, _>(consumer)
    .bind::<BigInt, _>(position.txid)
    .bind::<BigInt, _>(position.event_id)
    .execute(conn)?;
    consumer_position(conn, consumer)?.ok_or_else(|| unknown(consumer))
}

/// Forgets `consumer` and its position; `false` when it was not registered.
#[tracing::instrument(skip(conn))]
pub fn drop_consumer(conn: &mut PgConnection, consumer: &str) -> Result<bool> {
    check_name(consumer)?;
    let n = diesel::sql_query("DELETE FROM event_feed_cursors WHERE consumer = $1")
        .bind::<Text, _>(consumer)
        .execute(conn)?;
    Ok(n > 0)
}
