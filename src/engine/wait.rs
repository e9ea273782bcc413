//! Durable timers and signals: the wait steps the engine runs itself.
//!
//! A node of type [`TIMER_NODE_TYPE`] ([`Node::timer`](crate::Node::timer),
//! [`Node::timer_until`](crate::Node::timer_until)) completes when its time
//! comes; one of type [`SIGNAL_NODE_TYPE`]
//! ([`Node::signal`](crate::Node::signal)) completes when a signal of its
//! name is sent to its execution ([`send_signal`]), with the signal's
//! payload as its output, or fails after its timeout. No worker claims them
//! and nothing is held while they wait: the database arms each wait step
//! when it becomes ready (`execution_steps.wake_at`), and
//! [`fire_due_waits`], which the maintenance leader runs every round, takes
//! the due ones. See `docs/engine.md`, "Timers and signals".

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::graph::MAX_SIGNAL_NAME_LEN;
pub use crate::graph::{SIGNAL_NODE_TYPE, TIMER_NODE_TYPE};
use crate::models::Signal;
use crate::prepared::prepared;
use crate::schema::execution_signals;

/// The worker name the history shows for the runs of timers and signal
/// waits (`execution_events.payload.worker`).
pub const WAITS_WORKER: &str = "workflow-db:waits";

/// Wait steps [`fire_due_waits`] takes per transaction by default.
pub const DEFAULT_WAIT_BATCH: i64 = 100;

/// What one [`fire_due_waits`] (or [`send_signal`]) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitReport {
    /// Due wait steps looked at (the batch; less than the limit when no
    /// more were due).
    pub due: u64,
    /// Timers completed.
    pub timers_fired: u64,
    /// Signals delivered (each completes one signal step).
    pub signals_delivered: u64,
    /// Signal waits failed at their timeout.
    pub signals_timed_out: u64,
}

/// A due wait step, locked.
#[derive(QueryableByName)]
struct Due {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    execution_id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    wait_signal: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    wait_until: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    wake_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    now: DateTime<Utc>,
}

/// The due wait steps (`{filter}`: all, or one execution's), their
/// executions locked first in id order (the engine's lock order) with SKIP
/// LOCKED (an execution another transaction holds, a sender or a worker
/// reporting, is left for a later call: a fire never waits for one), then
/// the steps of the locked executions still due, locked with SKIP LOCKED.
/// The statement reads one snapshot; a step whose row changed since is
/// re-checked on its newest version when locked (a step completed or
/// parked meanwhile drops out), and a step woken by a transaction that
/// committed meanwhile is found by the next call. `= ANY(ARRAY(..))` reads
/// the steps by primary key (a semi-join would scan every due step:
/// quadratic over a backlog) after the execution locks are taken.
const DUE: &str = "\
WITH due AS (
    SELECT s.id, s.execution_id FROM execution_steps s
     WHERE s.status = 'pending' AND s.upstream_pending = 0 AND NOT s.parked
       AND s.wake_at <= statement_timestamp() {filter}
     ORDER BY s.wake_at LIMIT $1),
locked AS (
    SELECT e.id FROM executions e WHERE e.id IN (SELECT d.execution_id FROM due d)
     ORDER BY e.id FOR NO KEY UPDATE SKIP LOCKED)
SELECT s.id, s.execution_id, s.wait_signal, s.wait_until, s.wake_at, statement_timestamp() AS now
  FROM execution_steps s
 WHERE s.id = ANY(ARRAY(SELECT d.id FROM due d))
   AND s.execution_id = ANY(ARRAY(SELECT l.id FROM locked l))
   AND s.status = 'pending' AND s.upstream_pending = 0 AND NOT s.parked
   AND s.wake_at <= statement_timestamp()
 ORDER BY s.id
 FOR UPDATE OF s SKIP LOCKED";

#[derive(QueryableByName)]
struct Waiting {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    execution_id: Uuid,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Nullable<Jsonb>)]
    payload: Option<Value>,
}

/// Runs the wait steps that are due, up to `limit` (clamped to 1..=10,000)
/// in one transaction: completes the timers whose time has come (output
/// `{"due_at", "fired_at"}`), delivers to each signal step that a signal of
/// its name waits for the oldest such signal (the step's output is its
/// payload), and fails the signal waits whose timeout passed with no
/// signal. Each is a `pending -> running -> completed` (or `failed`)
/// transition, with events and NOTIFYs like any step, by the worker
/// [`WAITS_WORKER`]; downstream steps are unblocked, and the execution
/// completes or fails, as for any step.
///
/// Safe to call from many processes at once (the maintenance leader does,
/// every round): it locks the executions concerned, then the steps, both
/// with SKIP LOCKED, then the signals, so no step runs twice and no signal
/// is delivered twice, and it never waits for an execution another
/// transaction holds (that one's waits are left for a later call). The
/// completions and failures are one statement (one pass over the
/// concurrency keys, in key order). Call it outside a transaction (it is
/// one), in a loop while `due` equals `limit`: calls repeated inside one
/// outer transaction lock executions out of order and may deadlock.
#[tracing::instrument(skip(conn))]
pub fn fire_due_waits(conn: &mut PgConnection, limit: i64) -> Result<WaitReport> {
    fire_waits(conn, None, limit)
}

fn fire_waits(conn: &mut PgConnection, execution: Option<Uuid>, limit: i64) -> Result<WaitReport> {
    let limit = limit.clamp(1, 10_000);
    conn.transaction(|conn| {
        let due: Vec<Due> = match execution {
            None => prepared(diesel::sql_query(DUE.replace("{filter}", "")).bind::<BigInt, _>(limit))
                .load(conn)?,
            Some(id) => prepared(
                diesel::sql_query(DUE.replace("{filter}", "AND s.execution_id = $2"))
                    .bind::<BigInt, _>(limit)
                    .bind::<SqlUuid, _>(id),
            )
            .load(conn)?,
        };
        let mut report = WaitReport {
            due: due.len() as u64,
            ..WaitReport::default()
        };
        if due.is_empty() {
            return Ok(report);
        }
        // The undelivered signals of the due signal steps' executions and
        // names, oldest first, locked (their executions are locked by this
        // transaction, so nobody else delivers them meanwhile).
        let signal_steps: Vec<&Due> = due.iter().filter(|d| d.wait_signal.is_some()).collect();
        // Only the (execution, name) pairs a due step waits for; per pair a
        // queue, oldest first.
        let mut waiting: HashMap<(Uuid, String), VecDeque<Waiting>> = HashMap::new();
        if !signal_steps.is_empty() {
            let executions: Vec<Uuid> = signal_steps.iter().map(|d| d.execution_id).collect();
            let names: Vec<&str> = signal_steps
                .iter()
                .filter_map(|d| d.wait_signal.as_deref())
                .collect();
            let signals: Vec<Waiting> = prepared(
                diesel::sql_query(
                    "SELECT g.id, g.execution_id, g.name, g.payload FROM execution_signals g \
                     WHERE (g.execution_id, g.name) IN (SELECT DISTINCT * FROM unnest($1::uuid[], $2::text[])) \
                       AND g.delivered_to IS NULL \
                     ORDER BY g.sent_at, g.id FOR UPDATE OF g",
                )
                .bind::<Array<SqlUuid>, _>(&executions)
                .bind::<Array<Text>, _>(&names),
            )
            .load(conn)?;
            for w in signals {
                waiting
                    .entry((w.execution_id, w.name.clone()))
                    .or_default()
                    .push_back(w);
            }
        }
        // What to do with each due step.
        let mut complete: Vec<(Uuid, Option<Value>)> = Vec::new();
        let mut timed_out: Vec<(Uuid, String)> = Vec::new();
        let mut rearm: Vec<Uuid> = Vec::new();
        let mut deliveries: Vec<(Uuid, Uuid)> = Vec::new();
        for d in &due {
            match &d.wait_signal {
                None => {
                    complete.push((d.id, Some(json!({"due_at": d.wake_at, "fired_at": d.now}))));
                    report.timers_fired += 1;
                }
                Some(name) => {
                    let next = waiting
                        .get_mut(&(d.execution_id, name.clone()))
                        .and_then(VecDeque::pop_front);
                    if let Some(signal) = next {
                        complete.push((d.id, signal.payload));
                        deliveries.push((signal.id, d.id));
                        report.signals_delivered += 1;
                    } else if let Some(deadline) = d.wait_until.filter(|t| *t <= d.now) {
                        timed_out.push((
                            d.id,
                            format!("signal {name:?} not received by {}", deadline.to_rfc3339()),
                        ));
                        report.signals_timed_out += 1;
                    } else {
                        // Woken for a signal another step took first: wait
                        // on until the deadline (or for ever).
                        rearm.push(d.id);
                    }
                }
            }
        }
        if !rearm.is_empty() {
            prepared(
                diesel::sql_query("UPDATE execution_steps SET wake_at = wait_until WHERE id = ANY($1)")
                    .bind::<Array<SqlUuid>, _>(&rearm),
            )
            .execute(conn)?;
        }
        let run: Vec<Uuid> = complete
            .iter()
            .map(|(id, _)| *id)
            .chain(timed_out.iter().map(|(id, _)| *id))
            .collect();
        if run.is_empty() {
            return Ok(report);
        }
        // pending -> running: the lease lasts the transaction.
        let started = prepared(
            diesel::sql_query(
                "UPDATE execution_steps SET status = 'running', locked_by = $2, \
                        locked_until = statement_timestamp() + interval '5 minutes' \
                 WHERE id = ANY($1) AND status = 'pending'",
            )
            .bind::<Array<SqlUuid>, _>(&run)
            .bind::<Text, _>(WAITS_WORKER),
        )
        .execute(conn)?;
        // The steps are locked by this transaction: both updates take them
        // all (anything else is a broken invariant; roll back).
        if started != run.len() {
            return Err(Error::Query(diesel::result::Error::NotFound));
        }
        // Completions (timers, delivered signals) and timeouts in ONE
        // statement: its trigger settles the executions and locks the
        // concurrency keys of their unfinished steps once, in key order.
        let mut ids: Vec<Uuid> = Vec::with_capacity(run.len());
        let mut statuses: Vec<&str> = Vec::with_capacity(run.len());
        let mut outputs: Vec<Option<Value>> = Vec::with_capacity(run.len());
        let mut errors: Vec<Option<String>> = Vec::with_capacity(run.len());
        for (id, output) in complete {
            ids.push(id);
            statuses.push("completed");
            outputs.push(output);
            errors.push(None);
        }
        for (id, error) in timed_out {
            ids.push(id);
            statuses.push("failed");
            outputs.push(None);
            errors.push(Some(error));
        }
        let ended = prepared(
            diesel::sql_query(
                "UPDATE execution_steps s SET status = x.status::step_status, output = x.output, \
                        error = coalesce(x.error, s.error) \
                 FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[]) AS x(id, status, output, error) \
                 WHERE s.id = x.id AND s.status = 'running' AND s.locked_by = $5",
            )
            .bind::<Array<SqlUuid>, _>(&ids)
            .bind::<Array<Text>, _>(&statuses)
            .bind::<Array<Nullable<Jsonb>>, _>(&outputs)
            .bind::<Array<Nullable<Text>>, _>(&errors)
            .bind::<Text, _>(WAITS_WORKER),
        )
        .execute(conn)?;
        if ended != ids.len() {
            return Err(Error::Query(diesel::result::Error::NotFound));
        }
        if !deliveries.is_empty() {
            let (signals, steps): (Vec<Uuid>, Vec<Uuid>) = deliveries.into_iter().unzip();
            prepared(
                diesel::sql_query(
                    "UPDATE execution_signals g SET delivered_to = x.step, delivered_at = statement_timestamp() \
                     FROM unnest($1::uuid[], $2::uuid[]) AS x(signal, step) WHERE g.id = x.signal",
                )
                .bind::<Array<SqlUuid>, _>(&signals)
                .bind::<Array<SqlUuid>, _>(&steps),
            )
            .execute(conn)?;
        }
        Ok(report)
    })
}

/// What [`send_signal`] did: the stored signal (its `delivered_to` set
/// when a step took it at once) and the waits it ran.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SignalSent {
    /// The signal as stored.
    pub signal: Signal,
    /// The wait steps of the execution run in the same transaction.
    pub report: WaitReport,
}

/// Sends the signal `name` with `payload` to an execution, in one
/// transaction: the signal is stored (a mailbox per execution and name,
/// first in first out), and when a step of the execution waits for that
/// name now, it takes the oldest undelivered signal of the name (this one,
/// unless older ones wait) and completes with its payload as output, in
/// the same transaction. Otherwise the signal is kept until a step of the
/// execution waits for it; the maintenance loop then delivers it within a
/// round. Each signal is delivered to at most one step, each step takes at
/// most one signal.
///
/// Refused with [`Error::SignalRefused`] (nothing written) when the
/// execution is final or the name is empty or longer than
/// [`MAX_SIGNAL_NAME_LEN`] characters; [`Error::NotFound`] when there is no
/// such execution.
#[tracing::instrument(skip(conn, payload))]
pub fn send_signal(
    conn: &mut PgConnection,
    execution_id: Uuid,
    name: &str,
    payload: Option<&Value>,
) -> Result<SignalSent> {
    let refused = |reason: String| Error::SignalRefused {
        execution_id,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.chars().count() > MAX_SIGNAL_NAME_LEN {
        return Err(refused(format!(
            "a signal name has 1 to {MAX_SIGNAL_NAME_LEN} characters"
        )));
    }
    conn.transaction(|conn| {
        let id = Uuid::now_v7();
        let inserted = diesel::insert_into(execution_signals::table)
            .values((
                execution_signals::id.eq(id),
                execution_signals::execution_id.eq(execution_id),
                execution_signals::name.eq(name),
                execution_signals::payload.eq(payload),
            ))
            .execute(conn);
        if let Err(e) = inserted {
            use diesel::result::{DatabaseErrorKind, Error as DieselError};
            return Err(match &e {
                DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => {
                    Error::NotFound {
                        entity: "execution",
                        id: execution_id.to_string(),
                    }
                }
                DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, info)
                    if info.constraint_name() == Some("execution_signals_unfinished") =>
                {
                    refused(info.message().to_owned())
                }
                _ => e.into(),
            });
        }
        let report = fire_waits(conn, Some(execution_id), 10_000)?;
        let signal = execution_signals::table
            .find(id)
            .select(Signal::as_select())
            .first(conn)?;
        Ok(SignalSent { signal, report })
    })
}

/// The signals sent to an execution, oldest first, delivered or not.
#[tracing::instrument(skip(conn))]
pub fn list_signals(conn: &mut PgConnection, execution_id: Uuid) -> QueryResult<Vec<Signal>> {
    Signal::for_execution(conn, execution_id)
}
