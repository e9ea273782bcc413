use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::Execution;
use crate::enums::StepStatus;
use crate::schema::execution_steps;

/// One node run inside an execution (table `execution_steps`).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    QueryableByName,
    Selectable,
    Identifiable,
    Associations,
    Serialize,
    Deserialize,
)]
#[diesel(table_name = execution_steps, belongs_to(Execution), check_for_backend(diesel::pg::Pg))]
pub struct ExecutionStep {
    /// Primary key (UUIDv7).
    pub id: Uuid,
    /// The execution this step belongs to.
    pub execution_id: Uuid,
    /// The workflow node this step runs.
    pub node_id: String,
    /// Lifecycle status.
    pub status: StepStatus,
    /// JSON input.
    pub input: Option<Value>,
    /// JSON output.
    pub output: Option<Value>,
    /// JSON validation result.
    pub validation: Option<Value>,
    /// Retries so far.
    pub retry_count: i32,
    /// Error of the last failed attempt.
    pub error: Option<String>,
    /// When the current attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    pub completed_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Upstream steps not yet completed or skipped; runnable at 0.
    pub upstream_pending: i32,
    /// Retries a failure may still schedule up to (see `retry_count`).
    pub max_retries: i32,
    /// Earliest time the step may be claimed.
    pub run_after: DateTime<Utc>,
    /// Worker holding the lease of the running step (`None` when not running).
    pub locked_by: Option<String>,
    /// When the lease of the running step expires (`None` when not running).
    pub locked_until: Option<DateTime<Utc>>,
    /// The step's execution is not running (pending or paused), so the step
    /// is not claimed even when ready; maintained by the database.
    pub parked: bool,
    /// How many times the step was started; the current run's lease token
    /// (see [`Lease`]). Numbered by the database on every `pending -> running`.
    pub attempt: i32,
    /// The type of the step's workflow node: which handler runs it, and its
    /// queue unless [`queue`](Self::queue) is set. `None` when the node is
    /// not in its workflow's graph.
    pub node_type: Option<String>,
    /// How many runs ended with the lease expired and the step reclaimed
    /// (see [`crate::engine::ReclaimPolicy`]).
    pub reclaims: i32,
    /// Claim priority: higher first, then the oldest `run_after`.
    pub priority: i32,
    /// The queue it runs on; `None` means its node type's queue (see
    /// [`ExecutionStep::queue_name`]).
    pub queue: Option<String>,
    /// Concurrency key (a tenant, a customer); see
    /// [`crate::engine::set_concurrency_limit`].
    pub concurrency_key: Option<String>,
    /// Held back because its concurrency key is at its limit: not
    /// claimable until a slot frees; maintained by the database.
    pub throttled: bool,
    /// A wait step: the timer's delay, or the signal wait's timeout, in
    /// seconds from the moment the step is ready (from its node's config).
    pub wait_seconds: Option<f64>,
    /// A timer's absolute time (`config.until`), or the deadline of a
    /// signal wait in progress.
    pub wait_until: Option<DateTime<Utc>>,
    /// A signal wait ([`crate::graph::SIGNAL_NODE_TYPE`]): the name of the
    /// signal it waits for.
    pub wait_signal: Option<String>,
    /// A ready timer or signal wait: when the engine looks at it next (the
    /// timer's time, the signal's deadline, or now when a signal waits for
    /// it); maintained by the database.
    pub wake_at: Option<DateTime<Utc>>,
}

/// The right to report on one run of a step: what a claim hands out
/// ([`ExecutionStep::lease`] of a claimed step). Heartbeat, complete, fail
/// and release present it, and the database accepts them only while this
/// worker holds this attempt under an unexpired lease: a worker that stalled
/// past its lease, whose step was reclaimed and started again (by anyone,
/// even under the same worker id), holds an older attempt and is refused
/// with [`crate::Error::LeaseLost`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// The step.
    pub step_id: Uuid,
    /// The worker the claim leased it to.
    pub worker: String,
    /// The run ([`ExecutionStep::attempt`]) the lease is for.
    pub attempt: i32,
}

impl Lease {
    /// A lease by its parts (e.g. kept across a restart of the worker's
    /// bookkeeping); normally taken from a claimed step with
    /// [`ExecutionStep::lease`].
    pub fn new(step_id: Uuid, worker: impl Into<String>, attempt: i32) -> Lease {
        Lease {
            step_id,
            worker: worker.into(),
            attempt,
        }
    }
}

/// A step to insert; [`NewExecutionStep::new`] assigns a fresh UUIDv7 and status `pending`.
#[derive(Debug, Clone, PartialEq, Insertable, Serialize, Deserialize)]
#[diesel(table_name = execution_steps)]
pub struct NewExecutionStep {
    /// Primary key; keep the generated UUIDv7 unless you need a fixed id.
    pub id: Uuid,
    /// The execution it belongs to.
    pub execution_id: Uuid,
    /// The workflow node it runs (unique within the execution).
    pub node_id: String,
    /// Initial status (normally `pending`).
    pub status: StepStatus,
    /// JSON input.
    pub input: Option<Value>,
    /// Number of upstream steps it waits for (default 0).
    pub upstream_pending: i32,
    /// Node ids of the steps waiting for this one.
    pub downstream: Vec<String>,
    /// Retries a failure may schedule (default 0).
    pub max_retries: i32,
    /// The node's type; `None` lets the database copy it from the workflow's
    /// graph at insert (the engine's start sets it).
    pub node_type: Option<String>,
    /// Claim priority (higher first; default 0).
    pub priority: i32,
    /// Queue; `None`: the node type's queue.
    pub queue: Option<String>,
    /// Concurrency key.
    pub concurrency_key: Option<String>,
}

/// Changes to a step; `None` leaves a column as it is.
#[derive(Debug, Clone, Default, PartialEq, AsChangeset, Serialize, Deserialize)]
#[diesel(table_name = execution_steps)]
pub struct ExecutionStepChanges {
    /// New status.
    pub status: Option<StepStatus>,
    /// New input.
    pub input: Option<Option<Value>>,
    /// New output.
    pub output: Option<Option<Value>>,
    /// New validation result.
    pub validation: Option<Option<Value>>,
    /// New retry count.
    pub retry_count: Option<i32>,
    /// New error message.
    pub error: Option<Option<String>>,
    /// New start time.
    pub started_at: Option<Option<DateTime<Utc>>>,
    /// New completion time.
    pub completed_at: Option<Option<DateTime<Utc>>>,
}

impl NewExecutionStep {
    /// A pending step of `execution_id` running `node_id`, with a fresh UUIDv7.
    pub fn new(execution_id: Uuid, node_id: impl Into<String>) -> Self {
        NewExecutionStep {
            id: Uuid::now_v7(),
            execution_id,
            node_id: node_id.into(),
            status: StepStatus::Pending,
            input: None,
            upstream_pending: 0,
            downstream: Vec::new(),
            max_retries: 0,
            node_type: None,
            priority: 0,
            queue: None,
            concurrency_key: None,
        }
    }

    /// Sets the JSON input.
    pub fn input(mut self, input: Value) -> Self {
        self.input = Some(input);
        self
    }

    /// Inserts the step and returns the stored row.
    #[tracing::instrument(skip_all, fields(step.id = %self.id, execution.id = %self.execution_id))]
    pub fn create(&self, conn: &mut PgConnection) -> QueryResult<ExecutionStep> {
        diesel::insert_into(execution_steps::table)
            .values(self)
            .returning(ExecutionStep::as_returning())
            .get_result(conn)
    }

    /// Inserts many steps in one statement and returns the stored rows.
    #[tracing::instrument(skip_all, fields(count = steps.len()))]
    pub fn create_many(
        conn: &mut PgConnection,
        steps: &[NewExecutionStep],
    ) -> QueryResult<Vec<ExecutionStep>> {
        diesel::insert_into(execution_steps::table)
            .values(steps)
            .returning(ExecutionStep::as_returning())
            .get_results(conn)
    }
}

by_id_queries!(ExecutionStep, execution_steps, "step");
changeset_update!(ExecutionStep, execution_steps, ExecutionStepChanges);

impl ExecutionStep {
    /// The queue the step runs on: [`queue`](Self::queue), else its node
    /// type, else `"default"` (the database's `workflow_db_step_queue`).
    pub fn queue_name(&self) -> &str {
        self.queue
            .as_deref()
            .or(self.node_type.as_deref())
            .unwrap_or(crate::engine::DEFAULT_QUEUE)
    }

    /// The lease of this run, when the row shows the step running under a
    /// worker (as every step returned by a claim does); `None` otherwise.
    pub fn lease(&self) -> Option<Lease> {
        match (self.status, &self.locked_by) {
            (StepStatus::Running, Some(worker)) => {
                Some(Lease::new(self.id, worker.clone(), self.attempt))
            }
            _ => None,
        }
    }

    /// Every step of an execution, in creation order.
    #[tracing::instrument(skip(conn))]
    pub fn list_for_execution(
        conn: &mut PgConnection,
        execution_id: Uuid,
    ) -> QueryResult<Vec<ExecutionStep>> {
        execution_steps::table
            .filter(execution_steps::execution_id.eq(execution_id))
            .select(ExecutionStep::as_select())
            .order(execution_steps::id)
            .load(conn)
    }
}
