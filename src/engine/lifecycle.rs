use diesel::prelude::*;
use uuid::Uuid;

use crate::enums::{AnyStatus, ExecutionStatus, StepStatus};
use crate::error::{Error, Result};
use crate::models::{Execution, ExecutionStep};
use crate::prepared::prepared;
use crate::schema::{execution_steps, executions};

/// The error for a compare-and-set update that matched no row: the row is
/// gone, or another writer changed its status first.
fn lost(id: Uuid, entity: &'static str, expected: AnyStatus, actual: Option<AnyStatus>) -> Error {
    match actual {
        None => Error::NotFound {
            entity,
            id: id.to_string(),
        },
        Some(actual) => Error::TransitionConflict {
            id,
            expected,
            actual,
        },
    }
}

/// A compare-and-set status update of one row of `$table`: refuses an
/// illegal pair before any SQL, applies only if the row still has `$from`,
/// and otherwise reports what happened (gone, or changed by another writer).
macro_rules! compare_and_set {
    ($conn:expr, $table:ident, $row:ty, $status:ty, $entity:literal, $id:expr, $from:expr, $to:expr) => {{
        let (conn, id, from, to): (&mut PgConnection, Uuid, $status, $status) =
            ($conn, $id, $from, $to);
        if !from.can_transition_to(to) {
            return Err(Error::IllegalTransition {
                from: from.into(),
                to: to.into(),
            });
        }
        let updated = diesel::update(
            $table::table
                .filter($table::id.eq(id))
                .filter($table::status.eq(from)),
        )
        .set($table::status.eq(to))
        .returning(<$row>::as_returning())
        .get_result(conn)
        .optional()?;
        if let Some(row) = updated {
            return Ok(row);
        }
        let actual = $table::table
            .find(id)
            .select($table::status)
            .first::<$status>(conn)
            .optional()?;
        Err(lost(id, $entity, from.into(), actual.map(Into::into)))
    }};
}

/// Moves an execution `from -> to`, as a compare-and-set: it applies only if
/// the row still has status `from`. An illegal pair is refused before any
/// SQL ([`Error::IllegalTransition`], as the database would); a row that
/// changed meanwhile gives [`Error::TransitionConflict`], so of two racing
/// transitions exactly one is applied and the other is reported.
#[tracing::instrument(skip(conn))]
pub fn transition_execution(
    conn: &mut PgConnection,
    id: Uuid,
    from: ExecutionStatus,
    to: ExecutionStatus,
) -> Result<Execution> {
    compare_and_set!(
        conn,
        executions,
        Execution,
        ExecutionStatus,
        "execution",
        id,
        from,
        to
    )
}

/// Moves a step `from -> to` (compare-and-set, as [`transition_execution`]).
/// Workers use [`super::complete_step`] and [`super::fail_step`]; this is for
/// engine decisions such as skipping a branch (`pending -> skipped`).
///
/// `pending -> running` is refused with [`Error::RunRequiresClaim`] before any
/// SQL: a step starts only by [`super::claim_steps`], which gives it a lease
/// (the database refuses a lease-less running step too).
#[tracing::instrument(skip(conn))]
pub fn transition_step(
    conn: &mut PgConnection,
    id: Uuid,
    from: StepStatus,
    to: StepStatus,
) -> Result<ExecutionStep> {
    if (from, to) == (StepStatus::Pending, StepStatus::Running) {
        return Err(Error::RunRequiresClaim { step_id: id });
    }
    // The lock order: the execution first (as every statement that moves a
    // step out of pending or running does). A skip of a pending step would
    // otherwise hold the step while its trigger waits for the execution, as a
    // cancel holds the execution and waits for the execution's pending steps.
    conn.transaction(|conn| {
        prepared(
            diesel::sql_query(
                "SELECT 1 FROM executions \
                 WHERE id = (SELECT execution_id FROM execution_steps WHERE id = $1) \
                 FOR NO KEY UPDATE",
            )
            .bind::<diesel::sql_types::Uuid, _>(id),
        )
        .execute(conn)?;
        compare_and_set!(
            conn,
            execution_steps,
            ExecutionStep,
            StepStatus,
            "step",
            id,
            from,
            to
        )
    })
}

/// Pauses a running execution: no step of it is claimed until [`resume`].
/// Steps already running finish normally.
pub fn pause(conn: &mut PgConnection, id: Uuid) -> Result<Execution> {
    transition_execution(conn, id, ExecutionStatus::Running, ExecutionStatus::Paused)
}

/// Resumes a paused execution; the database completes it right away if its
/// steps all finished while it was paused.
pub fn resume(conn: &mut PgConnection, id: Uuid) -> Result<Execution> {
    transition_execution(conn, id, ExecutionStatus::Paused, ExecutionStatus::Running)
}

/// Cancels an execution that is not final, whatever its status (one
/// statement, so a concurrent pause or resume cannot make it miss): the
/// database skips its pending steps in the same transaction, so nothing more
/// is claimed. Steps already running may still report; their results are
/// recorded. Cancelling a final execution is an [`Error::IllegalTransition`].
#[tracing::instrument(skip(conn))]
pub fn cancel(conn: &mut PgConnection, id: Uuid) -> Result<Execution> {
    let not_final: Vec<ExecutionStatus> = ExecutionStatus::ALL
        .into_iter()
        .filter(|s| s.can_transition_to(ExecutionStatus::Cancelled))
        .collect();
    let updated = diesel::update(
        executions::table
            .filter(executions::id.eq(id))
            .filter(executions::status.eq_any(not_final)),
    )
    .set(executions::status.eq(ExecutionStatus::Cancelled))
    .returning(Execution::as_returning())
    .get_result(conn)
    .optional()?;
    if let Some(row) = updated {
        return Ok(row);
    }
    match Execution::find(conn, id).optional()? {
        None => Err(Error::NotFound {
            entity: "execution",
            id: id.to_string(),
        }),
        Some(current) => Err(Error::IllegalTransition {
            from: current.status.into(),
            to: ExecutionStatus::Cancelled.into(),
        }),
    }
}
