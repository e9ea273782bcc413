#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod admin;
pub mod catalog;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod engine;
pub mod enums;
pub mod error;
pub mod graph;
pub mod migrate;
pub mod models;
#[cfg(feature = "studio")]
pub mod ops;
pub mod pool;
mod prepared;
#[cfg(feature = "runtime")]
pub mod runtime;
#[allow(missing_docs)]
pub mod schema;
pub mod seed;
#[cfg(feature = "studio")]
pub mod studio;
#[cfg(feature = "test-utils")]
pub mod testing;
#[cfg(feature = "test-utils")]
pub mod torture;

pub use config::{Config, DatabaseUrl, Environment};
pub use engine::{Backoff, ExecutionFilter, ExecutionPage, Notification, Started};
pub use enums::{AnyStatus, ExecutionStatus, StepStatus};
pub use error::{Error, LeaseLostReason, Result};
pub use graph::{Edge, Node, WorkflowGraph};
pub use migrate::{MIGRATIONS, Migrator, run_pending_migrations};
pub use models::{
    ConcurrencyLimit, Execution, ExecutionChanges, ExecutionEvent, ExecutionStep,
    ExecutionStepChanges, ExecutionWithSteps, Lease, NewExecution, NewExecutionStep, NewWorkflow,
    Queue, Schedule, Signal, Workflow, WorkflowChanges, WorkflowWithExecutions,
};
pub use pool::{PgPool, PooledConn, build_pool, connect};

/// What an engine needs to write its own queries against these tables:
/// the tables, the row and enum types, and Diesel's query DSL (`eq`, `and`,
/// `or`, `desc`, `asc`, `sql`, ...).
///
/// ```no_run
/// use workflow_db::prelude::*;
///
/// fn failed_for_user(conn: &mut PgConnection, user: &str) -> QueryResult<Vec<Execution>> {
///     executions::table
///         .filter(executions::status.eq(ExecutionStatus::Failed).and(executions::user_id.eq(user)))
///         .order(executions::started_at.desc())
///         .select(Execution::as_select())
///         .load(conn)
/// }
/// ```
pub mod prelude {
    pub use crate::enums::{ExecutionStatus, StepStatus};
    pub use crate::models::{
        Execution, ExecutionStep, NewExecution, NewExecutionStep, NewWorkflow, Schedule, Signal,
        Workflow,
    };
    pub use crate::schema::{
        concurrency_limits, execution_events, execution_signals, execution_steps, executions,
        queues, schedules, workflows,
    };
    pub use diesel::dsl::{exists, not, sql};
    pub use diesel::prelude::*;
    pub use diesel::{PgConnection, QueryResult};
}

/// The Rust examples of the guides in `docs/`, compiled as doctests so they
/// cannot rot.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../docs/admin.md")]
    struct Admin;
    #[doc = include_str!("../docs/engine.md")]
    struct Engine;
    #[doc = include_str!("../docs/operations.md")]
    struct Operations;
    #[doc = include_str!("../docs/development.md")]
    struct Development;
    #[doc = include_str!("../docs/benchmarks.md")]
    struct Benchmarks;
    #[cfg(feature = "runtime")]
    #[doc = include_str!("../docs/runtime.md")]
    struct Runtime;
}
