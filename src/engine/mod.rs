//! The operations a workflow engine runs on: start executions, claim and
//! finish steps, drive the execution state machine, query, prune and listen.
//!
//! PostgreSQL enforces the state machine itself (triggers on `executions`
//! and `execution_steps`): an illegal status change fails whoever writes it,
//! every transition appends a row to `execution_events` and sends a
//! `NOTIFY workflow_db_events` in the same transaction, a step that completes
//! unblocks its downstream steps, and an execution completes (or fails) when
//! its steps are final. The functions here are thin, single-statement where
//! it matters (claim, complete, fail), and compose inside a caller's
//! `conn.transaction(..)`. Status changes must run in READ COMMITTED
//! transactions (PostgreSQL's default); the triggers refuse them under
//! REPEATABLE READ and SERIALIZABLE.
//!
//! Cron schedules that start executions, exactly once per tick, are in
//! [`schedule`]; durable timers and signals (wait steps the engine runs
//! itself) in [`wait`].
//!
//! The guide to this module — what PostgreSQL enforces, every operation, and
//! the notes on worker ids, leases and transactions — is `docs/engine.md` in
//! the repository.
//!
//! ```no_run
//! use std::time::Duration;
//! use serde_json::json;
//! use workflow_db::engine::{self, Backoff};
//! use workflow_db::{Edge, NewExecution, NewWorkflow, Node, WorkflowGraph};
//!
//! fn run(conn: &mut diesel::PgConnection) -> workflow_db::Result<()> {
//!     let graph = WorkflowGraph {
//!         nodes: vec![Node::new("fetch", "http"), Node::new("store", "sql")],
//!         edges: vec![Edge::new("fetch", "store")],
//!     };
//!     let wf = NewWorkflow::from_graph("ingest", &graph).create(conn)?;
//!     let new = NewExecution::new(wf.id).user_id("u1").idempotency_key("batch-7");
//!     let started = engine::start_execution(conn, &new)?;
//!     println!("execution {} (new: {})", started.execution.id, started.created);
//!
//!     // A worker: claim, work, report. Only "fetch" is claimable until it completes.
//!     for step in engine::claim_steps(conn, "worker-1", 10, Duration::from_secs(30))? {
//!         // The lease (step, worker, attempt) is what a report presents.
//!         let lease = step.lease().expect("a claimed step is leased");
//!         match step.node_id.as_str() {
//!             "fetch" => engine::complete_step(conn, &lease, Some(&json!({"rows": 3})))?,
//!             _ => engine::fail_step(conn, &lease, "not implemented", &Backoff::default())?,
//!         };
//!     }
//!     Ok(())
//! }
//! ```

mod check;
mod claim;
pub mod feed;
mod flow;
mod lifecycle;
mod notify;
mod query;
mod recovery;
pub mod schedule;
mod start;
pub mod wait;

pub use check::{
    CheckOptions, CheckProgress, InvariantKind, InvariantReport, Severity, Violation,
    check_invariants, check_invariants_with_progress,
};
pub use claim::{
    Backoff, DEFAULT_MAX_RECLAIMS, DEFAULT_QUEUE, ReclaimPolicy, claim_from, claim_steps,
    complete_step, complete_steps, fail_step, heartbeat, next_claimable_at, ready_steps_by_queue,
    reclaim_expired, reclaim_expired_with, release_steps,
};
pub use flow::{
    list_concurrency_limits, list_queues, pause_queue, rebalance_concurrency_keys,
    remove_concurrency_limit, resume_queue, set_concurrency_limit, set_queue_limit,
    start_due_executions,
};
pub use lifecycle::{cancel, pause, resume, transition_execution, transition_step};
pub use notify::{
    CHANNEL, CLAIMABLE_CHANNEL, Claimable, Notification, listen, poll_notifications, unlisten,
    wait_for_notifications,
};
pub use query::{
    ExecutionFilter, ExecutionPage, ancestors, count_by_status, descendants,
    find_execution_by_short_id, find_step_by_short_id, find_workflow_by_short_id, list_executions,
    prune_executions,
};
pub use recovery::{
    Why, replay_execution, rerun_execution, why_not_running, why_schedule_not_firing,
    why_step_not_running,
};
pub use schedule::{
    DEFAULT_SCHEDULE_BATCH, FireReport, Fired, MAX_CATCH_UP, MissedTicks, NewSchedule,
    PausedOnError, delete_schedule, find_schedule, fire_due_schedules, fire_due_schedules_batch,
    fire_times, get_schedule, list_schedules, next_fire_times, pause_schedule, resume_schedule,
    schedule_tick_key,
};
pub use start::{DEFAULT_MAX_RETRIES, Started, start_execution};
pub use wait::{
    DEFAULT_WAIT_BATCH, SIGNAL_NODE_TYPE, SignalSent, TIMER_NODE_TYPE, WAITS_WORKER, WaitReport,
    fire_due_waits, list_signals, send_signal,
};
