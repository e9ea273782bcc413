//! Recovery and insight: replay a failed or cancelled execution from where
//! it stopped, re-run one from scratch, and ask what a step or execution
//! waits for. Guide: `docs/engine.md`, "Replay and why".

use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text, Uuid as SqlUuid};
use serde::Serialize;
use uuid::Uuid;

use super::start::{Started, start_execution};
use crate::enums::ExecutionStatus;
use crate::error::{Error, Result};
use crate::models::{Execution, NewExecution};
use crate::schema::executions;

/// Failed and skipped steps of `$1` back to pending, each with its
/// dependency counter recomputed (its upstream steps that are not
/// completed: failed and skipped ones run again, running ones still run);
/// the transition trigger resets the retry budget and the error, the
/// statement trigger records the history and makes the ready ones claimable.
const RESET_STEPS: &str = "\
UPDATE execution_steps s SET status = 'pending', run_after = statement_timestamp(), reclaims = 0,
       throttled = false,
       upstream_pending = (SELECT count(*) FROM execution_steps u
                            WHERE u.execution_id = s.execution_id AND s.node_id = ANY (u.downstream)
                              AND u.status <> 'completed')
 WHERE s.execution_id = $1 AND s.status IN ('failed', 'skipped')";

/// Replays a failed or cancelled execution from where it stopped, in one
/// transaction: the execution returns to `running` (its error and
/// `completed_at` cleared), its failed and skipped steps to `pending` with a
/// fresh retry budget, and its completed steps keep their outputs (steps
/// still running under a cancelled execution go on and report as usual).
/// The history records each of these transitions (`failed -> running`,
/// `failed -> pending`, `skipped -> pending`), and the next runs are new
/// attempts. An execution with nothing left to run completes. These
/// transitions are refused to any writer whose transaction did not set
/// `workflow_db.replay` to its own transaction id, as this function does
/// (and resets before it returns). Every skipped step runs again, also one
/// skipped by hand while the execution ran; a `start_after` is not waited
/// for again; a dedup key held while unfinished is held again, even if a
/// newer execution holds it too.
///
/// Errors: [`Error::NotFound`]; [`Error::IllegalTransition`] when the
/// execution is not failed or cancelled.
#[tracing::instrument(skip(conn))]
pub fn replay_execution(conn: &mut PgConnection, id: Uuid) -> Result<Execution> {
    conn.transaction(|conn| {
        let status = executions::table
            .find(id)
            .select(executions::status)
            .for_no_key_update()
            .first::<ExecutionStatus>(conn)
            .optional()?
            .ok_or_else(|| Error::NotFound {
                entity: "execution",
                id: id.to_string(),
            })?;
        if !matches!(status, ExecutionStatus::Failed | ExecutionStatus::Cancelled) {
            return Err(Error::IllegalTransition {
                from: status.into(),
                to: ExecutionStatus::Running.into(),
            });
        }
        replaying(conn, true)?;
        diesel::update(executions::table.find(id))
            .set(executions::status.eq(ExecutionStatus::Running))
            .execute(conn)?;
        diesel::sql_query(RESET_STEPS)
            .bind::<SqlUuid, _>(id)
            .execute(conn)?;
        replaying(conn, false)?;
        // Nothing left to run (a cancelled execution whose steps all
        // completed): it completes now, as any other would.
        diesel::sql_query(
            "UPDATE executions e SET status = 'completed' WHERE e.id = $1 AND e.status = 'running' \
               AND NOT EXISTS (SELECT 1 FROM execution_steps s \
                                WHERE s.execution_id = e.id AND s.status IN ('pending', 'running'))",
        )
        .bind::<SqlUuid, _>(id)
        .execute(conn)?;
        Ok(Execution::find(conn, id)?)
    })
}

/// Marks (or unmarks) this transaction as replaying: the setting holds the
/// transaction's id, which is what the triggers compare it with.
fn replaying(conn: &mut PgConnection, on: bool) -> QueryResult<()> {
    diesel::sql_query(if on {
        "SELECT set_config('workflow_db.replay', txid_current()::text, true)"
    } else {
        "SELECT set_config('workflow_db.replay', '', true)"
    })
    .execute(conn)
    .map(drop)
}

/// Re-runs an execution from scratch: a new execution of the same workflow
/// (its current version) with the same data, user, parent, priority and
/// concurrency key, linked to the old one by `rerun_of`. The old one is
/// left as it is (it may even still run). Errors: [`Error::NotFound`], and
/// those of [`start_execution`].
#[tracing::instrument(skip(conn))]
pub fn rerun_execution(conn: &mut PgConnection, id: Uuid) -> Result<Started> {
    let old = Execution::find(conn, id)
        .optional()?
        .ok_or_else(|| Error::NotFound {
            entity: "execution",
            id: id.to_string(),
        })?;
    let new = NewExecution {
        user_id: old.user_id,
        data: old.data,
        parent_execution_id: old.parent_execution_id,
        priority: old.priority,
        concurrency_key: old.concurrency_key,
        rerun_of: Some(old.id),
        ..NewExecution::new(old.workflow_id)
    };
    start_execution(conn, &new)
}

/// One thing a step, or an execution, waits for (see [`why_not_running`]).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName, Serialize)]
pub struct Why {
    /// The step concerned (`None`: the execution itself, or a schedule).
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub step_id: Option<Uuid>,
    /// Its node id.
    #[diesel(sql_type = Nullable<Text>)]
    pub node_id: Option<String>,
    /// A stable code: `not_found`, `finished`, `no_runnable_step`,
    /// `running`, `execution_final`, `delayed_start`, `execution_pending`,
    /// `execution_paused`, `upstream`, `timer`, `signal`, `retry_backoff`,
    /// `scheduled`, `concurrency_key`, `queue_paused`, `queue_full`, or
    /// `claimable` (nothing holds it back: it waits for a worker of its
    /// queue); for a schedule `schedule_paused`, `schedule_due`,
    /// `schedule_next`.
    #[diesel(sql_type = Text)]
    pub reason: String,
    /// The facts, in words (which upstream steps, until when, which key).
    #[diesel(sql_type = Text)]
    pub detail: String,
}

/// What an execution waits for, as the database sees it now: for a
/// finished execution one `finished` row, for one with nothing pending or
/// running one `no_runnable_step` row, else each pending or running step's
/// reasons (several when several apply: a paused execution's step may also
/// wait for its upstream and its key). The SQL function
/// `workflow_db_why_execution(id)` gives the same rows to psql users.
#[tracing::instrument(skip(conn))]
pub fn why_not_running(conn: &mut PgConnection, execution_id: Uuid) -> QueryResult<Vec<Why>> {
    diesel::sql_query("SELECT step_id, node_id, reason, detail FROM workflow_db_why_execution($1)")
        .bind::<SqlUuid, _>(execution_id)
        .load(conn)
}

/// What a schedule waits for (`workflow_db_why_schedule(name or id)` in
/// SQL): one row, `schedule_paused` (with the error that paused it),
/// `schedule_due` (a tick is due: the maintenance loop fires it) or
/// `schedule_next` (when its next tick comes); `not_found`. `step_id` and
/// `node_id` are `None`.
#[tracing::instrument(skip(conn))]
pub fn why_schedule_not_firing(
    conn: &mut PgConnection,
    schedule_id: Uuid,
) -> QueryResult<Vec<Why>> {
    diesel::sql_query(
        "SELECT NULL::uuid AS step_id, NULL::text AS node_id, reason, detail \
           FROM workflow_db_why_schedule($1::text)",
    )
    .bind::<SqlUuid, _>(schedule_id)
    .load(conn)
}

/// [`why_not_running`] for one step (`workflow_db_why_step(id)` in SQL).
#[tracing::instrument(skip(conn))]
pub fn why_step_not_running(conn: &mut PgConnection, step_id: Uuid) -> QueryResult<Vec<Why>> {
    diesel::sql_query(
        "SELECT s.id AS step_id, s.node_id, w.reason, w.detail \
           FROM workflow_db_why_step($1) w LEFT JOIN execution_steps s ON s.id = $1",
    )
    .bind::<SqlUuid, _>(step_id)
    .load(conn)
}
