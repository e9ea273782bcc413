//! One module per table: the row type, the insert type, the changeset and the
//! queries. Every query takes `conn: &mut PgConnection` first, so callers can
//! compose them inside their own `conn.transaction(..)`.
//!
//! - Row types `Workflow`, `Execution`, `ExecutionStep` (and the read-only
//!   `ExecutionEvent` history); insert types `NewWorkflow`, `NewExecution`,
//!   `NewExecutionStep`, whose `::new` assigns a time-ordered UUIDv7 id
//!   (index-friendly); changesets `WorkflowChanges`, `ExecutionChanges`,
//!   `ExecutionStepChanges`.
//! - `find`, `list` (keyset pages in id order, at most [`MAX_PAGE_SIZE`] rows),
//!   `update` and `delete` on each row type; `Workflow::with_recent_executions`
//!   reads a workflow with its latest executions and their steps in three
//!   queries.
//! - `NewWorkflow::create` and `Workflow::update` validate the graph and so
//!   return the crate's `Result`.
//! - `Schedule` (table `schedules`): cron schedules; created, fired, paused
//!   and resumed through `crate::engine::schedule`.
//! - `Signal` (table `execution_signals`): signals sent to executions,
//!   through `crate::engine::send_signal`.
//! - `bulk` streams executions and steps through binary `COPY FROM` (constant
//!   memory) and inserts an execution with its steps in one statement.
//!
//! The schema these types map is described in `docs/engine.md` in the
//! repository.

/// Largest page a `list` function returns, whatever the caller asks for.
pub const MAX_PAGE_SIZE: i64 = 1000;

/// Clamps a requested page size to `1..=MAX_PAGE_SIZE`.
pub(crate) fn page_size(limit: i64) -> i64 {
    limit.clamp(1, MAX_PAGE_SIZE)
}

// Defined before the `mod` items below, so that they can use them.
/// The by-primary-key queries every row type has: `find`, `list` (keyset
/// pages in id order, which UUIDv7 ids make creation order) and `delete`.
macro_rules! by_id_queries {
    ($row:ident, $table:ident, $what:literal) => {
        impl $row {
            #[doc = concat!("The ", $what, " with this id; `Err(NotFound)` when there is none.")]
            #[tracing::instrument(skip(conn))]
            pub fn find(conn: &mut PgConnection, id: Uuid) -> QueryResult<$row> {
                $table::table.find(id).select($row::as_select()).first(conn)
            }

            #[doc = concat!(
                "Up to `limit` rows of `", stringify!($table), "` (at most ",
                "[`MAX_PAGE_SIZE`](crate::models::MAX_PAGE_SIZE)) in creation order, after the id ",
                "`after` (keyset pagination: pass the last id of the previous page)."
            )]
            #[tracing::instrument(skip(conn))]
            pub fn list(
                conn: &mut PgConnection,
                after: Option<Uuid>,
                limit: i64,
            ) -> QueryResult<Vec<$row>> {
                let mut query = $table::table
                    .select($row::as_select())
                    .order($table::id)
                    .limit($crate::models::page_size(limit))
                    .into_boxed();
                if let Some(after) = after {
                    query = query.filter($table::id.gt(after));
                }
                query.load(conn)
            }

            #[doc = concat!(
                "Deletes the ", $what, " and what cascades from it. Returns whether a row was deleted."
            )]
            #[tracing::instrument(skip(conn))]
            pub fn delete(conn: &mut PgConnection, id: Uuid) -> QueryResult<bool> {
                diesel::delete($table::table.find(id))
                    .execute(conn)
                    .map(|n| n > 0)
            }
        }
    };
}

/// `update(conn, id, &changes)` for a row type whose changeset needs no
/// checks: applies the changes and returns the row (unchanged if `changes` is empty).
macro_rules! changeset_update {
    ($row:ident, $table:ident, $changes:ident) => {
        impl $row {
            /// Applies `changes` and returns the updated row (unchanged if `changes` is empty).
            #[tracing::instrument(skip(conn, changes))]
            pub fn update(
                conn: &mut PgConnection,
                id: Uuid,
                changes: &$changes,
            ) -> QueryResult<$row> {
                if *changes == $changes::default() {
                    return Self::find(conn, id);
                }
                diesel::update($table::table.find(id))
                    .set(changes)
                    .returning($row::as_returning())
                    .get_result(conn)
            }
        }
    };
}

pub mod bulk;
mod event;
mod execution;
mod flow;
mod schedule;
mod signal;
mod step;
mod workflow;

pub use event::ExecutionEvent;
pub use execution::{Execution, ExecutionChanges, ExecutionWithSteps, NewExecution};
pub use flow::{ConcurrencyLimit, Queue};
pub use schedule::Schedule;
pub use signal::Signal;
pub use step::{ExecutionStep, ExecutionStepChanges, Lease, NewExecutionStep};
pub use workflow::{NewWorkflow, Workflow, WorkflowChanges, WorkflowWithExecutions};
