//! The crate for tokio services (feature `runtime`): an async face over
//! every engine operation and model query ([`AsyncPool`]), and the engine's
//! notifications as an async stream ([`Notifier`]).
//!
//! # The async face: `spawn_blocking` over the r2d2 pool
//!
//! [`AsyncPool::run`] takes a closure over `&mut PgConnection`, checks a
//! connection out of the crate's r2d2 pool ([`crate::PgPool`]) and runs the
//! closure on tokio's blocking thread pool. Every function of the crate is
//! usable from async code that way, unchanged:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use workflow_db::{engine, runtime::AsyncPool};
//! # async fn demo(pool: AsyncPool, w: String) -> workflow_db::Result<()> {
//! let lease = Duration::from_secs(30);
//! let steps = pool.run(move |c| engine::claim_steps(c, &w, 10, lease).map_err(Into::into)).await?;
//! # Ok(()) }
//! ```
//!
//! The alternative was `diesel-async`: a second connection type
//! (`AsyncPgConnection`), and every query run against it. The engine's
//! statements are hand-written SQL kept prepared through a wrapper made for
//! Diesel's sync connection, bulk loads stream binary `COPY FROM`, and the
//! tests, the torture run and the invariant checker all drive
//! `PgConnection`; sharing one query definition would have meant making
//! every function generic over two connection types and testing both.
//! `spawn_blocking` keeps one copy of every query and one set of tests, and
//! costs a hand-off to a blocking thread per call, against operations that
//! cost a network round trip and a commit. Measured by the workload
//! benchmark in one run (`bin/bench --only W2,ASYNC --runs 3 --duration
//! 3`; 2 cores shared with other builds, PostgreSQL 15 on the same machine;
//! medians): W2 through `AsyncPool` from a tokio multi-thread runtime, the
//! claim and the completion as two separate `run` calls (as a worker makes
//! them around its handler), against the sync W2 on one thread and
//! connection per worker:
//!
//! | W2 claim+complete | sync steps/s | async steps/s | async/sync |
//! |---|---:|---:|---:|
//! | 1 worker, claim 1 + complete_step | 568 | 582 | 1.02 |
//! | 1 worker, claim 10 + complete_steps 10 | 2,508 | 2,490 | 0.99 |
//! | 4 workers, claim 1 + complete_step | 840 | 744 | 0.89 |
//! | 4 workers, claim 10 + complete_steps 10 | 4,021 | 3,648 | 0.91 |
//!
//! The hand-off alone (`run` of a closure that does nothing: a permit, the
//! blocking pool, an r2d2 checkout and back) takes 0.017 ms at the median
//! and 0.068 ms at p99, about 2 % of a 1.8 ms claim+complete cycle. The
//! ratios are within the run-to-run spread of the sync figures themselves
//! (an earlier run of the same command gave 1.16, 0.84, 0.80 and 1.14): the
//! database, not the hand-off, bounds an engine worker. An async driver
//! would save those microseconds and cost a second implementation of the
//! engine.
//!
//! Callers beyond the pool's size wait for a connection as futures (a
//! semaphore in front of the pool), not on blocking threads, so a burst of
//! tasks does not fill tokio's blocking pool with threads parked on r2d2.
//!
//! # Notifications: a dedicated tokio-postgres connection
//!
//! [`Notifier`] holds its own connection (tokio-postgres, not a pooled
//! one: a `LISTEN` belongs to a session) and yields [`NotifierEvent`]s as
//! the socket delivers them, with [`NotifierEvent::Disconnected`] and
//! [`NotifierEvent::Reconnected`] when it lost notifications and when to
//! catch up. See [`notifier`].

pub mod maintenance;
pub mod notifier;
pub mod pool;
pub mod worker;

pub use maintenance::{
    MAINTENANCE_APPLICATION_NAME, MAINTENANCE_LOCK, Maintenance, MaintenanceHandle,
    MaintenanceOptions, MaintenanceStats,
};
pub use notifier::{NOTIFIER_APPLICATION_NAME, Notifier, NotifierEvent, NotifierOptions};
pub use pool::{AsyncPool, TaskFailed};
pub use worker::{
    HandlerError, HandlerResult, RetryPolicy, StepContext, Worker, WorkerHandle, WorkerHealth,
    WorkerOptions, WorkerReport, worker_id,
};
