//! One module per table: the row type, the insert type, the changeset and the
//! queries. Every query takes `conn: &mut PgConnection` first, so callers can
//! compose them inside their own `conn.transaction(..)`.

pub mod bulk;
mod event;
mod execution;
mod step;
mod workflow;

pub use event::ExecutionEvent;
pub use execution::{Execution, ExecutionChanges, ExecutionWithSteps, NewExecution};
pub use step::{ExecutionStep, ExecutionStepChanges, NewExecutionStep};
pub use workflow::{NewWorkflow, Workflow, WorkflowChanges, WorkflowWithExecutions};

/// Largest page a `list` function returns, whatever the caller asks for.
pub const MAX_PAGE_SIZE: i64 = 1000;

/// Clamps a requested page size to `1..=MAX_PAGE_SIZE`.
pub(crate) fn page_size(limit: i64) -> i64 {
    limit.clamp(1, MAX_PAGE_SIZE)
}
