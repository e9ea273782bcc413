//! Flow control: queues (pause, limit), concurrency keys (limits) and
//! delayed starts. The rules live in the database (migration 000025): these
//! functions only write the rows that configure them, and start what is due.
//! Guide: `docs/engine.md`, "Flow control".

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Uuid as SqlUuid};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::models::{ConcurrencyLimit, Queue};
use crate::schema::{concurrency_limits, queues};

fn positive(option: &'static str, n: i32) -> Result<i32> {
    if n > 0 {
        Ok(n)
    } else {
        Err(Error::InvalidOption {
            option,
            reason: format!("must be at least 1, got {n}"),
        })
    }
}

fn named<'a>(option: &'static str, name: &'a str) -> Result<&'a str> {
    if name.is_empty() {
        Err(Error::InvalidOption {
            option,
            reason: "must not be empty".into(),
        })
    } else {
        Ok(name)
    }
}

/// How long configuring a new queue or concurrency limit waits for the open
/// transactions that write steps (its row's insert counts while step
/// writers wait, and every step write waits behind that request):
/// bounded, so a long transaction elsewhere makes the call fail with a lock
/// timeout instead of stalling every writer behind it.
const NEW_QUEUE_LOCK_TIMEOUT: &str = "5s";

/// Sets `paused` and/or `max_running` (`None` leaves a column as it is) on
/// the queue's row, inserting it when there is none. An existing row is
/// updated in place; only a new row counts the queue's running steps (its
/// insert trigger holds step writers off for that moment, at most
/// [`NEW_QUEUE_LOCK_TIMEOUT`]). Runs in the caller's transaction.
fn configure(
    conn: &mut PgConnection,
    name: &str,
    paused: Option<bool>,
    max_running: Option<Option<i32>>,
) -> QueryResult<Queue> {
    let update = diesel::sql_query(
        "UPDATE queues SET paused = coalesce($2, paused), \
                max_running = CASE WHEN $3 THEN $4 ELSE max_running END \
          WHERE name = $1 \
         RETURNING name, paused, max_running, running, created_at, updated_at",
    )
    .bind::<Text, _>(name)
    .bind::<Nullable<diesel::sql_types::Bool>, _>(paused)
    .bind::<diesel::sql_types::Bool, _>(max_running.is_some())
    .bind::<Nullable<Integer>, _>(max_running.flatten());
    let insert = diesel::sql_query(
        "INSERT INTO queues (name, paused, max_running) \
         VALUES ($1, coalesce($2, false), CASE WHEN $3 THEN $4 END) \
         ON CONFLICT (name) DO NOTHING \
         RETURNING name, paused, max_running, running, created_at, updated_at",
    )
    .bind::<Text, _>(name)
    .bind::<Nullable<diesel::sql_types::Bool>, _>(paused)
    .bind::<diesel::sql_types::Bool, _>(max_running.is_some())
    .bind::<Nullable<Integer>, _>(max_running.flatten());
    // Update, else insert; a racing call may insert the row between the
    // two, and another remove it again (a resume of a free queue), so
    // try a few times before giving up with NotFound.
    for _ in 0..RACE_ATTEMPTS {
        if let Some(queue) = update.clone().get_result::<Queue>(conn).optional()? {
            return Ok(queue);
        }
        let previous = set_lock_timeout(conn, NEW_QUEUE_LOCK_TIMEOUT)?;
        let inserted = insert.clone().get_result::<Queue>(conn).optional()?;
        set_lock_timeout(conn, &previous)?;
        if let Some(queue) = inserted {
            return Ok(queue);
        }
    }
    update.get_result(conn)
}

/// How often an update-else-insert tries before a race it keeps losing
/// (the row inserted and removed again by others in between) is an error.
const RACE_ATTEMPTS: usize = 3;

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    previous: String,
}

/// Sets `lock_timeout` for the rest of the transaction; returns the value
/// it had.
fn set_lock_timeout(conn: &mut PgConnection, value: &str) -> QueryResult<String> {
    let previous = diesel::sql_query("SELECT current_setting('lock_timeout') AS previous")
        .get_result::<Setting>(conn)?
        .previous;
    diesel::sql_query("SELECT set_config('lock_timeout', $1, true)")
        .bind::<Text, _>(value)
        .execute(conn)?;
    Ok(previous)
}

/// A queue that is neither paused nor limited needs no row: removing it
/// spares its counter's updates on every start and finish.
fn drop_if_free(conn: &mut PgConnection, name: &str) -> QueryResult<()> {
    diesel::delete(
        queues::table
            .filter(queues::name.eq(name))
            .filter(queues::paused.eq(false))
            .filter(queues::max_running.is_null()),
    )
    .execute(conn)
    .map(drop)
}

/// Wakes the queue's workers (a claimable notification with no steps).
fn wake(conn: &mut PgConnection, name: &str) -> QueryResult<()> {
    diesel::sql_query(
        "SELECT pg_notify('workflow_db_claimable', json_build_object(\
             'queue', $1::text, 'steps', 0, 'run_after', statement_timestamp())::text)",
    )
    .bind::<Text, _>(name)
    .execute(conn)
    .map(drop)
}

/// Pauses a queue: no claim takes its steps, and any other writer that
/// starts one is refused (constraint `queues_max_running`). Steps already
/// running finish and report as usual. Returns the queue's row.
#[tracing::instrument(skip(conn))]
pub fn pause_queue(conn: &mut PgConnection, name: &str) -> Result<Queue> {
    let name = named("queue", name)?;
    Ok(conn.transaction(|conn| configure(conn, name, Some(true), None))?)
}

/// Resumes a paused queue and wakes its workers; `None` when the queue is
/// now unconfigured (not limited either, so its row was removed).
#[tracing::instrument(skip(conn))]
pub fn resume_queue(conn: &mut PgConnection, name: &str) -> Result<Option<Queue>> {
    let name = named("queue", name)?;
    Ok(conn.transaction(|conn| {
        let queue = diesel::update(queues::table.find(name))
            .set(queues::paused.eq(false))
            .returning(Queue::as_returning())
            .get_result(conn)
            .optional()?;
        drop_if_free(conn, name)?;
        wake(conn, name)?;
        Ok::<_, diesel::result::Error>(queue.filter(|q| q.max_running.is_some()))
    })?)
}

/// Sets (`Some(n)`, n ≥ 1) or removes (`None`) the queue's limit on running
/// steps. Claims then take at most `n - running` of its steps, exactly
/// under any concurrency, and any other writer that would start one more is
/// refused. Lowering a limit stops no running step: new ones wait until
/// the queue is below it. Returns the queue's row (`None` when it is now
/// unconfigured).
#[tracing::instrument(skip(conn))]
pub fn set_queue_limit(
    conn: &mut PgConnection,
    name: &str,
    max_running: Option<i32>,
) -> Result<Option<Queue>> {
    let name = named("queue", name)?;
    let max_running = max_running
        .map(|n| positive("max_running", n))
        .transpose()?;
    Ok(conn.transaction(|conn| {
        let queue = configure(conn, name, None, Some(max_running))?;
        drop_if_free(conn, name)?;
        wake(conn, name)?;
        Ok::<_, diesel::result::Error>(
            (queue.paused || queue.max_running.is_some()).then_some(queue),
        )
    })?)
}

/// The configured (paused or limited) queues, by name.
#[tracing::instrument(skip(conn))]
pub fn list_queues(conn: &mut PgConnection) -> QueryResult<Vec<Queue>> {
    queues::table
        .select(Queue::as_select())
        .order(queues::name)
        .load(conn)
}

/// Sets the limit of a concurrency key: at most `max_running` (≥ 1) steps
/// of the key running or admitted (ready to be claimed) at once. Ready
/// steps beyond it are throttled (out of every claim's sight, so other keys
/// are never delayed) and admitted one by one as slots free, highest
/// priority and oldest first. Lowering a limit stops no running step.
#[tracing::instrument(skip(conn))]
pub fn set_concurrency_limit(
    conn: &mut PgConnection,
    key: &str,
    max_running: i32,
) -> Result<ConcurrencyLimit> {
    let key = named("key", key)?;
    let max_running = positive("max_running", max_running)?;
    Ok(conn.transaction(|conn| {
        let update = || {
            diesel::update(concurrency_limits::table.find(key))
                .set(concurrency_limits::max_running.eq(max_running))
                .returning(ConcurrencyLimit::as_returning())
        };
        // Update, else insert (as for queues: retried while racing calls
        // insert and remove the row in between).
        for _ in 0..RACE_ATTEMPTS {
            if let Some(limit) = update().get_result(conn).optional()? {
                return Ok(limit);
            }
            // A new limit holds step writers off while its first rebalance
            // counts (its insert trigger): for at most NEW_QUEUE_LOCK_TIMEOUT.
            let previous = set_lock_timeout(conn, NEW_QUEUE_LOCK_TIMEOUT)?;
            let inserted = diesel::insert_into(concurrency_limits::table)
                .values((
                    concurrency_limits::key.eq(key),
                    concurrency_limits::max_running.eq(max_running),
                ))
                .on_conflict_do_nothing()
                .returning(ConcurrencyLimit::as_returning())
                .get_result(conn)
                .optional()?;
            set_lock_timeout(conn, &previous)?;
            if let Some(limit) = inserted {
                return Ok(limit);
            }
        }
        update().get_result(conn)
    })?)
}

/// Removes a key's limit; its throttled steps become claimable at once.
/// Returns whether there was one.
#[tracing::instrument(skip(conn))]
pub fn remove_concurrency_limit(conn: &mut PgConnection, key: &str) -> QueryResult<bool> {
    diesel::delete(concurrency_limits::table.find(key))
        .execute(conn)
        .map(|n| n > 0)
}

/// The concurrency limits, by key.
#[tracing::instrument(skip(conn))]
pub fn list_concurrency_limits(conn: &mut PgConnection) -> QueryResult<Vec<ConcurrencyLimit>> {
    concurrency_limits::table
        .select(ConcurrencyLimit::as_select())
        .order(concurrency_limits::key)
        .load(conn)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Admits throttled steps into free slots of their keys, for the keys with
/// throttled ready steps, in one call (keys locked in key order), and
/// releases throttled steps whose key has no limit (left so by a write the
/// triggers could not see). The step trigger admits whenever a slot frees;
/// a step another transaction held at that moment is skipped (never waited
/// for, so no deadlock) and admitted here. The maintenance loop runs it
/// every round. Call it outside a transaction. Returns how many keys were
/// looked at.
#[tracing::instrument(skip(conn))]
pub fn rebalance_concurrency_keys(conn: &mut PgConnection) -> QueryResult<i64> {
    // Two statements, each its own transaction when the caller has none:
    // the release takes step rows, the rebalance keys then steps; held
    // together, they would take steps before keys and could deadlock with
    // a report that holds a key and waits for a step.
    let looked_at = diesel::sql_query(
        "WITH k AS (SELECT array_agg(c.key ORDER BY c.key) AS keys FROM concurrency_limits c \
                     WHERE EXISTS (SELECT 1 FROM execution_steps s \
                                    WHERE s.concurrency_key = c.key AND s.throttled \
                                      AND s.status = 'pending' AND s.upstream_pending = 0 \
                                      AND NOT s.parked)) \
         SELECT coalesce(cardinality(k.keys), 0)::bigint AS n FROM k, \
                LATERAL (SELECT workflow_db_rebalance_keys(k.keys, '{}', '{}') \
                          WHERE k.keys IS NOT NULL) r",
    )
    .get_result::<Count>(conn)
    .optional()?
    .map_or(0, |c| c.n);
    diesel::sql_query(
        "UPDATE execution_steps s SET throttled = false \
          WHERE s.throttled AND s.status = 'pending' \
            AND NOT EXISTS (SELECT 1 FROM concurrency_limits c WHERE c.key = s.concurrency_key)",
    )
    .execute(conn)?;
    Ok(looked_at)
}

#[derive(QueryableByName)]
struct Started {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// Starts up to `limit` executions whose delayed start has come
/// (`pending`, `start_after` past), oldest first, in one statement (SKIP
/// LOCKED: concurrent callers start different ones); returns their ids.
/// The maintenance loop runs it every round, so a delayed execution starts
/// within one round of its time.
#[tracing::instrument(skip(conn))]
pub fn start_due_executions(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<Uuid>> {
    diesel::sql_query(
        "UPDATE executions SET status = 'running' \
          WHERE id = ANY(ARRAY(SELECT x.id FROM executions x \
                                WHERE x.status = 'pending' AND x.start_after <= statement_timestamp() \
                                ORDER BY x.start_after, x.id LIMIT $1 FOR UPDATE SKIP LOCKED)) \
            AND status = 'pending' \
          RETURNING id",
    )
    .bind::<BigInt, _>(limit.clamp(1, crate::models::MAX_PAGE_SIZE))
    .load::<Started>(conn)
    .map(|rows| rows.into_iter().map(|r| r.id).collect())
}
