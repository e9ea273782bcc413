use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::data_types::PgInterval;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Double, Integer, Interval, Text, Uuid as SqlUuid};
use serde_json::Value;
use uuid::Uuid;

use crate::enums::StepStatus;
use crate::error::{Error, LeaseLostReason, Result};
use crate::models::{ExecutionStep, Lease, MAX_PAGE_SIZE};
use crate::prepared::{prepared, step_columns};
use crate::schema::execution_steps;

/// How long a failed step waits before its retry: `base * 2^retry_count`,
/// capped at `max` (the exponent is clamped to 30, so any retry count works).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay of the first retry.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    /// One second, doubling, at most five minutes.
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

fn interval(d: Duration) -> PgInterval {
    PgInterval::from_microseconds(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Microseconds, at most [`MAX_BACKOFF`] (the interval arithmetic in SQL
/// must stay in range).
fn micros(d: Duration) -> f64 {
    d.min(MAX_BACKOFF).as_micros() as f64
}

/// Longest delay [`fail_step`] schedules, whatever [`Backoff::max`] says (100 years).
const MAX_BACKOFF: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The queue of a step whose node has neither a queue nor a type (the
/// database's `workflow_db_step_queue`).
pub const DEFAULT_QUEUE: &str = "default";

/// The queues `$3` names, as rows `names(queue)`.
const GIVEN_QUEUES: &str =
    "names(queue) AS (SELECT DISTINCT t.queue FROM unnest($3::text[]) AS t(queue))";

/// Every queue with claimable steps, as rows `names(queue)` (and one NULL
/// row at the end): a loose index scan of `execution_steps_claimable_idx`,
/// one probe per queue.
const READY_QUEUES: &str = "\
names(queue) AS (
    SELECT (SELECT workflow_db_step_queue(x.queue, x.node_type) FROM execution_steps x
             WHERE x.status = 'pending' AND x.upstream_pending = 0 AND NOT x.parked AND NOT x.throttled
             ORDER BY workflow_db_step_queue(x.queue, x.node_type) LIMIT 1)
    UNION ALL
    SELECT (SELECT workflow_db_step_queue(x.queue, x.node_type) FROM execution_steps x
             WHERE workflow_db_step_queue(x.queue, x.node_type) > n.queue
               AND x.status = 'pending' AND x.upstream_pending = 0 AND NOT x.parked AND NOT x.throttled
             ORDER BY workflow_db_step_queue(x.queue, x.node_type) LIMIT 1)
      FROM names n WHERE n.queue IS NOT NULL)";

/// The claim, over the queues `{names}` yields: the rows of those queues
/// that are limited (and not paused) locked in name order with SKIP LOCKED,
/// so that their room (`max_running - running`) is exact under concurrency
/// and a claim never waits for a queue row (another claim, or a report in a
/// transaction not yet committed, holding one): a limited queue whose row
/// is held counts as room 0 this time, and the claim comes back short, never
/// over; paused ones are read without a lock (room 0; a start that races a
/// pause is refused by the trigger); then per queue the first
/// `room` claimable steps of `execution_steps_claimable_idx` (highest
/// priority, then oldest `run_after`); the first `{over}` of those across
/// the queues as candidates (nothing locked so far); then the first
/// `{limit}` candidates still claimable, locked with SKIP LOCKED (so at most
/// `{limit}` step rows are locked). A paused queue, a full one, a throttled
/// step (its key at its limit) and a step of a paused execution are never
/// scanned past. The engine's own queues (`workflow_db.*`: timers and
/// signal waits, which `engine::fire_due_waits` runs) are never claimed. `= ANY(ARRAY(..))` runs each subquery once as an init plan
/// and updates by primary key. Batch sizes are literals: every call of one
/// size reuses one prepared plan (at most [`MAX_PAGE_SIZE`] statements per
/// form and connection). `{over}` is twice the limit, so that candidates
/// other workers take at the same moment seldom leave a claim short. Lease
/// times use `statement_timestamp()`, so a claim inside a long transaction
/// still hands out a full lease.
const CLAIM: &str = concat!("\
WITH RECURSIVE {names},
q AS MATERIALIZED (
    SELECT u.name, u.paused, u.max_running FROM queues u
     WHERE u.name IN (SELECT n.queue FROM names n)),
lim AS MATERIALIZED (
    SELECT u.name, u.max_running - u.running AS room FROM queues u
     WHERE u.name IN (SELECT q.name FROM q WHERE NOT q.paused AND q.max_running IS NOT NULL)
       AND NOT u.paused AND u.max_running IS NOT NULL
     ORDER BY u.name FOR NO KEY UPDATE SKIP LOCKED),
room AS MATERIALIZED (
    SELECT n.queue, CASE WHEN q.name IS NULL OR (NOT q.paused AND q.max_running IS NULL) THEN {over}
                         WHEN q.paused THEN 0
                         ELSE least(greatest(coalesce(lim.room, 0), 0), {over}) END AS room
      FROM names n LEFT JOIN q ON q.name = n.queue LEFT JOIN lim ON lim.name = n.queue
     WHERE n.queue IS NOT NULL AND NOT starts_with(n.queue, 'workflow_db.'))
UPDATE execution_steps SET status = 'running', locked_by = $1, locked_until = statement_timestamp() + $2
WHERE id = ANY(ARRAY(
    SELECT s.id FROM execution_steps s
    WHERE s.id = ANY(ARRAY(
        SELECT c.id FROM room r CROSS JOIN LATERAL (
            SELECT x.id, x.priority, x.run_after FROM execution_steps x
            WHERE workflow_db_step_queue(x.queue, x.node_type) = r.queue
              AND x.status = 'pending' AND x.upstream_pending = 0 AND NOT x.parked AND NOT x.throttled
              AND x.run_after <= statement_timestamp()
            ORDER BY x.priority DESC, x.run_after, x.id
            LIMIT r.room) c
        ORDER BY c.priority DESC, c.run_after, c.id
        LIMIT {over}))
      AND s.status = 'pending' AND s.upstream_pending = 0 AND NOT s.parked AND NOT s.throttled
    ORDER BY s.priority DESC, s.run_after, s.id
    LIMIT {limit}
    FOR UPDATE SKIP LOCKED))
RETURNING ", step_columns!());

fn claim_sql(names: &str, limit: i64) -> String {
    CLAIM
        .replace("{names}", names)
        .replace("{limit}", &limit.to_string())
        .replace("{over}", &(2 * limit).to_string())
}

/// Claims up to `limit` (clamped to `1..=`[`MAX_PAGE_SIZE`]) runnable steps
/// of any queue for `worker`, in one statement, with a lease of `lease`:
/// highest priority first, then oldest `run_after`. A step is runnable when
/// it is pending, its execution is running, its `run_after` has come, every
/// upstream step is completed or skipped, its concurrency key admitted it
/// (not throttled), and its queue is neither paused nor at its limit.
/// Concurrent workers never receive the same step (`FOR UPDATE SKIP
/// LOCKED`). Each claim is a `pending -> running` transition (event +
/// NOTIFY). The queues are found with one index probe each: with many
/// queues, claim from the ones a worker serves ([`claim_from`]).
#[tracing::instrument(skip(conn))]
pub fn claim_steps(
    conn: &mut PgConnection,
    worker: &str,
    limit: i64,
    lease: Duration,
) -> QueryResult<Vec<ExecutionStep>> {
    let limit = limit.clamp(1, MAX_PAGE_SIZE);
    prepared(
        diesel::sql_query(claim_sql(READY_QUEUES, limit))
            .bind::<Text, _>(worker)
            .bind::<Interval, _>(interval(lease)),
    )
    .load(conn)
}

/// [`claim_steps`] from the named queues only (a step's queue is its node's
/// `config.queue`, else its node type: see [`ExecutionStep::queue_name`]):
/// up to `limit` runnable steps, highest priority then oldest `run_after`
/// first across the queues, in one statement over
/// `execution_steps_claimable_idx`. Steps of other queues are never
/// scanned. An empty `queues` claims nothing.
#[tracing::instrument(skip(conn))]
pub fn claim_from(
    conn: &mut PgConnection,
    worker: &str,
    queues: &[String],
    limit: i64,
    lease: Duration,
) -> QueryResult<Vec<ExecutionStep>> {
    if queues.is_empty() {
        return Ok(Vec::new());
    }
    let limit = limit.clamp(1, MAX_PAGE_SIZE);
    prepared(
        diesel::sql_query(claim_sql(GIVEN_QUEUES, limit))
            .bind::<Text, _>(worker)
            .bind::<Interval, _>(interval(lease))
            .bind::<Array<Text>, _>(queues),
    )
    .load(conn)
}

#[derive(QueryableByName)]
struct NextRun {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    at: Option<DateTime<Utc>>,
}

/// When the next step of one of `queues` becomes claimable by time: the
/// earliest `run_after` of the steps that wait for nothing else (pending,
/// upstream done, execution running, admitted by their key) in queues that
/// are neither paused nor full; it may be in the past when some are
/// claimable now. `None` when no such step exists (the next work then comes
/// with a notification: see `docs/engine.md`). One probe per queue of
/// `execution_steps_claimable_at_idx`. A worker that found nothing to claim
/// sleeps until this time (or a notification), instead of polling.
#[tracing::instrument(skip(conn))]
pub fn next_claimable_at(
    conn: &mut PgConnection,
    queues: &[String],
) -> QueryResult<Option<DateTime<Utc>>> {
    Ok(prepared(
        diesel::sql_query(
            "SELECT min(c.at) AS at FROM unnest($1::text[]) AS t(queue) \
             LEFT JOIN queues u ON u.name = t.queue \
             CROSS JOIN LATERAL (SELECT s.run_after AS at FROM execution_steps s \
                 WHERE workflow_db_step_queue(s.queue, s.node_type) = t.queue \
                   AND s.status = 'pending' AND s.upstream_pending = 0 AND NOT s.parked \
                   AND NOT s.throttled \
                 ORDER BY s.run_after LIMIT 1) c \
             WHERE (u.name IS NULL \
                OR (NOT u.paused AND (u.max_running IS NULL OR u.running < u.max_running))) \
               AND NOT starts_with(t.queue, 'workflow_db.')",
        )
        .bind::<Array<Text>, _>(queues),
    )
    .get_result::<NextRun>(conn)?
    .at)
}

#[derive(QueryableByName)]
struct QueueCount {
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = BigInt)]
    steps: i64,
}

/// The predicate of the claimable steps' partial indexes, for step alias `$s`.
macro_rules! ready {
    ($s:literal) => {
        concat!(
            $s,
            ".status = 'pending' AND ",
            $s,
            ".upstream_pending = 0 AND NOT ",
            $s,
            ".parked AND NOT ",
            $s,
            ".throttled"
        )
    };
}

/// The queue depth: steps claimable now (pending, upstream done, execution
/// running, admitted by their key, `run_after` come), by queue (timers and
/// signal waits, which wait for their time, not for a worker, left out), largest
/// first (paused and full queues included: their steps are waiting). Reads
/// the claimable steps' index, so it costs in proportion to them; the
/// maintenance leader publishes it as a gauge every few seconds.
///
/// The queues come from a loose scan of `execution_steps_claimable_at_idx`
/// (one probe per queue), then each queue's ready steps are counted on its
/// range of that index: left to itself the planner counted through the
/// unfinished steps' index instead (96,000 rows read for 7,000 ready ones
/// at a million executions; 41 → 26 ms).
#[tracing::instrument(skip(conn))]
pub fn ready_steps_by_queue(conn: &mut PgConnection) -> QueryResult<Vec<(String, i64)>> {
    Ok(diesel::sql_query(concat!(
        "WITH RECURSIVE q(name) AS ( \
            (SELECT workflow_db_step_queue(s.queue, s.node_type) FROM execution_steps s \
              WHERE ",
        ready!("s"),
        " ORDER BY 1 LIMIT 1) \
          UNION ALL \
            SELECT (SELECT workflow_db_step_queue(s.queue, s.node_type) FROM execution_steps s \
                     WHERE ",
        ready!("s"),
        " AND workflow_db_step_queue(s.queue, s.node_type) > q.name \
                     ORDER BY 1 LIMIT 1) \
              FROM q WHERE q.name IS NOT NULL) \
        SELECT q.name AS queue, c.steps FROM q \
         CROSS JOIN LATERAL (SELECT count(*) AS steps FROM execution_steps s \
                              WHERE ",
        ready!("s"),
        " AND workflow_db_step_queue(s.queue, s.node_type) = q.name \
                                AND s.run_after <= statement_timestamp()) c \
         WHERE q.name IS NOT NULL AND NOT starts_with(q.name, 'workflow_db.') AND c.steps > 0 \
         ORDER BY c.steps DESC, q.name",
    ))
    .load::<QueueCount>(conn)?
    .into_iter()
    .map(|r| (r.queue, r.steps))
    .collect())
}

/// The leases `$1` (ids), `$2` (workers), `$3` (attempts) as rows
/// `x(step_id, holder, held_attempt)`.
macro_rules! leases_as_rows {
    () => {
        "unnest($1::uuid[], $2::text[], $3::int4[]) AS x(step_id, holder, held_attempt)"
    };
}

/// [`held_by!`] for a batch: step `s` is held under lease row `x`
/// (`x(step_id, holder, held_attempt, ..)`).
macro_rules! held_in_batch {
    () => {
        "s.id = x.step_id AND s.locked_by = x.holder AND s.attempt = x.held_attempt \
         AND s.locked_until > statement_timestamp()"
    };
}

/// Extends the leases still held to `statement_timestamp() + lease` and
/// returns the ids of their steps; a missing id means that lease is lost
/// (expired, even if not yet reclaimed; the step reclaimed, started again or
/// finished): stop working on that step.
#[tracing::instrument(skip(conn, leases), fields(count = leases.len()))]
pub fn heartbeat(
    conn: &mut PgConnection,
    leases: &[Lease],
    lease: Duration,
) -> QueryResult<Vec<Uuid>> {
    let (ids, workers, attempts) = lease_columns(leases.iter());
    prepared(
        diesel::sql_query(concat!(
            "UPDATE execution_steps s SET locked_until = statement_timestamp() + $4 FROM ",
            leases_as_rows!(),
            " WHERE ",
            held_in_batch!(),
            " RETURNING s.id"
        ))
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<Text>, _>(workers)
        .bind::<Array<Integer>, _>(attempts)
        .bind::<Interval, _>(interval(lease)),
    )
    .load::<StepId>(conn)
    .map(|rows| rows.into_iter().map(|r| r.id).collect())
}

/// The columns of `leases` in step id order (the lock order), for
/// [`leases_as_rows!`].
fn lease_columns<'a>(
    leases: impl Iterator<Item = &'a Lease>,
) -> (Vec<Uuid>, Vec<&'a str>, Vec<i32>) {
    let mut sorted: Vec<&Lease> = leases.collect();
    sorted.sort_by_key(|l| l.step_id);
    (
        sorted.iter().map(|l| l.step_id).collect(),
        sorted.iter().map(|l| l.worker.as_str()).collect(),
        sorted.iter().map(|l| l.attempt).collect(),
    )
}

#[derive(QueryableByName)]
struct StepId {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// "Running as attempt `$3` leased to `$2`, lease unexpired", as a filter that only the
/// primary key can serve: `locked_until` is set by the claim and cleared by
/// the transition trigger whenever the step leaves `running`. An expired
/// lease no longer counts even before `reclaim_expired` runs: the step may be
/// reclaimed and handed to another worker at any moment. (A `status = 'running'`
/// filter tempts the planner into `execution_steps_status_idx`, whose
/// `running` range fills with dead entries as steps finish.)
macro_rules! held_by {
    () => {
        "id = $1 AND locked_by = $2 AND attempt = $3 AND locked_until > statement_timestamp()"
    };
}

/// The lock order's first step for statements that end attempts: `WITH
/// locked AS (..)` locks the executions of the steps `$steps` (an SQL
/// expression yielding step ids) `FOR NO KEY UPDATE`, in id order; the
/// statement's `WHERE` then requires `(SELECT count(*) FROM locked) > 0`, an
/// uncorrelated one-time filter that reads the whole CTE (so locks every
/// execution; an `EXISTS` would stop at the first) before the first step row
/// is locked. Taking the executions before the steps matters: a pause, cancel
/// or settle holds its execution and waits for a pending step a claim
/// holds; if that claim commits and its worker then reported on the step
/// while holding the step's row and waiting for the execution, the two
/// would deadlock.
macro_rules! lock_executions_of {
    ($steps:literal) => {
        concat!(
            "WITH locked AS (SELECT e.id FROM executions e WHERE e.id IN \
               (SELECT st.execution_id FROM execution_steps st WHERE st.id IN (",
            $steps,
            ")) ORDER BY e.id FOR NO KEY UPDATE) "
        )
    };
}

/// The end of an attempt that may be retried: back to `pending` (retry
/// count + 1, not before `$run_after`) while retries remain, else `failed`.
/// SET expressions all read the old row.
macro_rules! retry_or_fail {
    ($run_after:literal) => {
        concat!(
            "status = CASE WHEN retry_count < max_retries THEN 'pending' ELSE 'failed' END::step_status, ",
            "retry_count = CASE WHEN retry_count < max_retries THEN retry_count + 1 ELSE retry_count END, ",
            "run_after = CASE WHEN retry_count < max_retries THEN ",
            $run_after,
            " ELSE run_after END"
        )
    };
}

/// What [`reclaim_expired_with`] does with a step whose lease expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimPolicy {
    /// A crash is not the step's own failure: the step goes back to
    /// `pending`, claimable at once, without spending a retry
    /// (`retry_count` unchanged; `reclaims` + 1). A step reclaimed more
    /// than `max_reclaims` times fails for good: a step that kills every
    /// worker that runs it (an input that runs it out of memory) must not
    /// loop for ever.
    Requeue {
        /// Reclaims allowed before the next one fails the step.
        max_reclaims: i32,
    },
    /// An expired lease counts as a failed attempt: a retry is spent
    /// (claimable at once), and the step fails for good when none is left.
    CountAsFailure,
}

/// Reclaims a step allowed by [`ReclaimPolicy::default`].
pub const DEFAULT_MAX_RECLAIMS: i32 = 3;

impl Default for ReclaimPolicy {
    /// [`ReclaimPolicy::Requeue`] with [`DEFAULT_MAX_RECLAIMS`]: a deploy
    /// or a crash does not eat a step's retries, which are for its own
    /// errors; three crashes in a row say the step itself is the problem.
    fn default() -> Self {
        ReclaimPolicy::Requeue {
            max_reclaims: DEFAULT_MAX_RECLAIMS,
        }
    }
}

/// [`reclaim_expired_with`] under [`ReclaimPolicy::default`]: a crash does
/// not spend a retry.
#[tracing::instrument(skip(conn))]
pub fn reclaim_expired(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<ExecutionStep>> {
    reclaim_expired_with(conn, limit, ReclaimPolicy::default())
}

/// Returns running steps whose lease expired before now to `pending`
/// (claimable at once) or marks them `failed`, as `policy` says; at most
/// `limit` per call, oldest lease first, skipping rows being written. Call
/// it periodically ([`crate::runtime::maintenance`] does). The step's
/// `error` says whose lease expired when. Returns the changed steps.
#[tracing::instrument(skip(conn))]
pub fn reclaim_expired_with(
    conn: &mut PgConnection,
    limit: i64,
    policy: ReclaimPolicy,
) -> QueryResult<Vec<ExecutionStep>> {
    macro_rules! reclaim {
        ($set:expr) => {
            concat!(
                lock_executions_of!(
                    "SELECT x.id FROM execution_steps x \
                 WHERE x.status = 'running' AND x.locked_until < statement_timestamp() \
                 ORDER BY x.locked_until LIMIT $1"
                ),
                "UPDATE execution_steps SET ",
                $set,
                ", reclaims = reclaims + 1\
                 , error = format('lease of worker %s expired at %s', locked_by, locked_until) \
             WHERE id = ANY(ARRAY(SELECT id FROM execution_steps \
                          WHERE status = 'running' AND locked_until < statement_timestamp() \
                            AND execution_id IN (SELECT id FROM locked) \
                            AND (SELECT count(*) FROM locked) > 0 \
                          ORDER BY locked_until LIMIT $1 FOR UPDATE SKIP LOCKED)) \
               AND status = 'running' AND locked_until < statement_timestamp() \
             RETURNING ",
                step_columns!()
            )
        };
    }
    let limit = limit.max(1);
    match policy {
        ReclaimPolicy::Requeue { max_reclaims } => prepared(
            diesel::sql_query(reclaim!(
                "status = CASE WHEN reclaims < $2 THEN 'pending' ELSE 'failed' END::step_status, \
                 run_after = CASE WHEN reclaims < $2 THEN statement_timestamp() ELSE run_after END"
            ))
            .bind::<BigInt, _>(limit)
            .bind::<Integer, _>(max_reclaims.max(0)),
        )
        .load(conn),
        ReclaimPolicy::CountAsFailure => prepared(
            diesel::sql_query(reclaim!(retry_or_fail!("statement_timestamp()")))
                .bind::<BigInt, _>(limit),
        )
        .load(conn),
    }
}

/// Completes several held steps, storing each one's output, in ONE
/// statement (the batched counterpart of [`complete_step`], for workers that
/// claim in batches). All or nothing: when any lease is no longer honoured,
/// nothing is completed and that step's [`Error::LeaseLost`] is returned.
/// The database handles the batch as a set: one event per step, the
/// downstream counters and each execution's settle once per statement, one
/// NOTIFY per execution. The statement locks the steps' executions first, in
/// id order (the engine's lock order, see `docs/engine.md`): batches of
/// several workers over steps of the same executions serialise on them and
/// do not deadlock.
#[tracing::instrument(skip(conn, steps), fields(count = steps.len()))]
pub fn complete_steps(
    conn: &mut PgConnection,
    steps: &[(Lease, Option<Value>)],
) -> Result<Vec<ExecutionStep>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let mut sorted: Vec<&(Lease, Option<Value>)> = steps.iter().collect();
    sorted.sort_by_key(|(lease, _)| lease.step_id);
    let (ids, workers, attempts) = lease_columns(sorted.iter().map(|(lease, _)| lease));
    let outputs: Vec<Option<&Value>> = sorted.iter().map(|(_, o)| o.as_ref()).collect();
    conn.transaction(|conn| {
        let done: Vec<ExecutionStep> = prepared(
            diesel::sql_query(concat!(
                lock_executions_of!("SELECT unnest($1::uuid[])"),
                "UPDATE execution_steps s SET status = 'completed', output = x.step_output \
                 FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::jsonb[]) \
                   AS x(step_id, holder, held_attempt, step_output) \
                 WHERE ",
                held_in_batch!(),
                " AND (SELECT count(*) FROM locked) > 0 RETURNING ",
                step_columns!()
            ))
            .bind::<Array<SqlUuid>, _>(&ids)
            .bind::<Array<Text>, _>(&workers)
            .bind::<Array<Integer>, _>(&attempts)
            .bind::<Array<diesel::sql_types::Nullable<diesel::sql_types::Jsonb>>, _>(&outputs),
        )
        .load(conn)?;
        if done.len() == ids.len() {
            return Ok(done);
        }
        let missing = sorted
            .iter()
            .map(|(lease, _)| lease)
            .find(|lease| !done.iter().any(|s| s.id == lease.step_id))
            .unwrap_or(&sorted[0].0);
        Err(why_not(conn, missing))
    })
}

/// Hands held steps back: each goes back to `pending`, claimable at once,
/// without spending a retry (`retry_count` unchanged) — for a worker that
/// shuts down before it could run them. Leases no longer honoured are
/// skipped (those steps are not this worker's to release); returns the
/// released steps. One statement, in the engine's lock order.
#[tracing::instrument(skip(conn, leases), fields(count = leases.len()))]
pub fn release_steps(conn: &mut PgConnection, leases: &[Lease]) -> Result<Vec<ExecutionStep>> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, workers, attempts) = lease_columns(leases.iter());
    Ok(prepared(
        diesel::sql_query(concat!(
            lock_executions_of!("SELECT unnest($1::uuid[])"),
            "UPDATE execution_steps s SET status = 'pending', run_after = statement_timestamp() FROM ",
            leases_as_rows!(),
            " WHERE ",
            held_in_batch!(),
            " AND (SELECT count(*) FROM locked) > 0 RETURNING ",
            step_columns!()
        ))
        .bind::<Array<SqlUuid>, _>(&ids)
        .bind::<Array<Text>, _>(&workers)
        .bind::<Array<Integer>, _>(&attempts),
    )
    .load(conn)?)
}

/// Completes a held step, storing its output, in one statement.
/// The database unblocks the downstream steps and completes the execution
/// when this was its last step, in the same transaction.
///
/// Fails with [`Error::LeaseLost`] (and changes nothing) when the lease is
/// no longer honoured: expired, the step taken over or already finished.
#[tracing::instrument(skip(conn, output))]
pub fn complete_step(
    conn: &mut PgConnection,
    lease: &Lease,
    output: Option<&Value>,
) -> Result<ExecutionStep> {
    let updated = prepared(
        diesel::sql_query(concat!(
            lock_executions_of!("$1"),
            "UPDATE execution_steps SET status = 'completed', output = $4 WHERE ",
            held_by!(),
            " AND (SELECT count(*) FROM locked) > 0 RETURNING ",
            step_columns!()
        ))
        .bind::<SqlUuid, _>(lease.step_id)
        .bind::<Text, _>(&lease.worker)
        .bind::<Integer, _>(lease.attempt)
        .bind::<diesel::sql_types::Nullable<diesel::sql_types::Jsonb>, _>(output),
    )
    .get_result::<ExecutionStep>(conn)
    .optional()?;
    updated.map_or_else(|| Err(why_not(conn, lease)), Ok)
}

/// Fails the current attempt of a step `worker` holds, storing `error`, in
/// one statement: while retries remain the step goes back to `pending`
/// (retry count + 1) and becomes claimable after `backoff`; otherwise it is
/// `failed`, and the database fails the execution (skipping its pending
/// steps) in the same transaction. A retry under an execution that is
/// already final is skipped by the database at the end of the statement (the
/// returned row still shows `pending`).
#[tracing::instrument(skip(conn, error))]
pub fn fail_step(
    conn: &mut PgConnection,
    lease: &Lease,
    error: &str,
    backoff: &Backoff,
) -> Result<ExecutionStep> {
    let updated = prepared(
        diesel::sql_query(concat!(
            lock_executions_of!("$1"),
            "UPDATE execution_steps SET ",
            retry_or_fail!(
                "statement_timestamp() + least($5 * power(2, least(retry_count, 30)), $6) * interval '1 microsecond'"
            ),
            ", error = $4 WHERE ",
            held_by!(),
            " AND (SELECT count(*) FROM locked) > 0 RETURNING ",
            step_columns!()
        ))
        .bind::<SqlUuid, _>(lease.step_id)
        .bind::<Text, _>(&lease.worker)
        .bind::<Integer, _>(lease.attempt)
        .bind::<Text, _>(error)
        .bind::<Double, _>(micros(backoff.base))
        .bind::<Double, _>(micros(backoff.max)),
    )
    .get_result::<ExecutionStep>(conn)
    .optional()?;
    updated.map_or_else(|| Err(why_not(conn, lease)), Ok)
}

/// Why a lease-guarded update matched no row: the one "no longer yours"
/// error, with its reason.
fn why_not(conn: &mut PgConnection, lease: &Lease) -> Error {
    let row = execution_steps::table
        .find(lease.step_id)
        .select((
            execution_steps::status,
            execution_steps::locked_by,
            execution_steps::attempt,
        ))
        .first::<(StepStatus, Option<String>, i32)>(conn)
        .optional();
    let reason = match row {
        Err(e) => return e.into(),
        Ok(None) => LeaseLostReason::Deleted,
        Ok(Some((StepStatus::Running, Some(holder), attempt)))
            if holder == lease.worker && attempt == lease.attempt =>
        {
            LeaseLostReason::Expired
        }
        Ok(Some((StepStatus::Running | StepStatus::Pending, _, _))) => LeaseLostReason::Superseded,
        Ok(Some((status, _, _))) => LeaseLostReason::Finished(status),
    };
    Error::LeaseLost {
        step_id: lease.step_id,
        worker: lease.worker.clone(),
        attempt: lease.attempt,
        reason,
    }
}
