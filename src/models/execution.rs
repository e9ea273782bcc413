use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{ExecutionStep, Workflow, page_size};
use crate::enums::ExecutionStatus;
use crate::schema::executions;

/// A run of a workflow (table `executions`).
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
#[diesel(table_name = executions, belongs_to(Workflow), check_for_backend(diesel::pg::Pg))]
pub struct Execution {
    /// Primary key (UUIDv7).
    pub id: Uuid,
    /// The workflow being run.
    pub workflow_id: Uuid,
    /// Lifecycle status.
    pub status: ExecutionStatus,
    /// Who started it, if known.
    pub user_id: Option<String>,
    /// JSON input and state.
    pub data: Option<Value>,
    /// Error message when it failed.
    pub error: Option<String>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    pub completed_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The workflow version it was started from.
    pub workflow_version: i32,
    /// Caller key that makes a repeated start return this execution.
    pub idempotency_key: Option<String>,
    /// The execution that started this one as a sub-workflow.
    pub parent_execution_id: Option<Uuid>,
    /// Claim priority of its steps (higher first; see `docs/engine.md`, "Flow control").
    pub priority: i32,
    /// Concurrency key of its steps (a tenant, a customer), limited by
    /// [`crate::engine::set_concurrency_limit`].
    pub concurrency_key: Option<String>,
    /// Delayed start: it stays pending until then ([`crate::engine::start_due_executions`]).
    pub start_after: Option<DateTime<Utc>>,
    /// Deduplication key: a start with the same key returns this execution
    /// while it holds the key (see [`NewExecution::dedup_key`]).
    pub dedup_key: Option<String>,
    /// Until when the dedup key holds; `None`: while this execution is unfinished.
    pub dedup_until: Option<DateTime<Utc>>,
    /// The execution this one re-runs from scratch
    /// ([`crate::engine::rerun_execution`]).
    pub rerun_of: Option<Uuid>,
}

/// An execution to insert; [`NewExecution::new`] assigns a fresh UUIDv7 and
/// status `pending`.
#[derive(Debug, Clone, PartialEq, Insertable, Serialize, Deserialize)]
#[diesel(table_name = executions)]
pub struct NewExecution {
    /// Primary key; keep the generated UUIDv7 unless you need a fixed id.
    pub id: Uuid,
    /// The workflow to run.
    pub workflow_id: Uuid,
    /// Initial status (normally `pending`).
    pub status: ExecutionStatus,
    /// Who starts it.
    pub user_id: Option<String>,
    /// JSON input and state.
    pub data: Option<Value>,
    /// The workflow version it runs (default 1).
    pub workflow_version: i32,
    /// Caller key, unique per workflow.
    pub idempotency_key: Option<String>,
    /// The parent execution of a sub-workflow.
    pub parent_execution_id: Option<Uuid>,
    /// Claim priority of its steps (higher first, default 0); a node's
    /// `config.priority` overrides it for that node's step.
    pub priority: i32,
    /// Concurrency key of its steps; a node's `config.concurrency_key`
    /// overrides it for that node's step.
    pub concurrency_key: Option<String>,
    /// Delayed start: [`crate::engine::start_execution`] leaves it pending
    /// until then.
    pub start_after: Option<DateTime<Utc>>,
    /// Deduplication key (see [`NewExecution::dedup_key`]).
    pub dedup_key: Option<String>,
    /// Until when the dedup key holds; `None` with a key: while unfinished.
    /// Set from [`NewExecution::dedup_window`] at insert.
    pub dedup_until: Option<DateTime<Utc>>,
    /// How long the dedup key holds from the start (`None`: while
    /// unfinished); turned into `dedup_until` when the row is inserted.
    #[diesel(skip_insertion)]
    pub dedup_window: Option<std::time::Duration>,
    /// The execution this one re-runs ([`crate::engine::rerun_execution`]).
    pub rerun_of: Option<Uuid>,
}

/// Changes to an execution; `None` leaves a column as it is.
#[derive(Debug, Clone, Default, PartialEq, AsChangeset, Serialize, Deserialize)]
#[diesel(table_name = executions)]
pub struct ExecutionChanges {
    /// New status.
    pub status: Option<ExecutionStatus>,
    /// New data.
    pub data: Option<Option<Value>>,
    /// New error message.
    pub error: Option<Option<String>>,
    /// New start time.
    pub started_at: Option<Option<DateTime<Utc>>>,
    /// New completion time.
    pub completed_at: Option<Option<DateTime<Utc>>>,
}

/// An execution with all its steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecutionWithSteps {
    /// The execution.
    #[serde(flatten)]
    pub execution: Execution,
    /// Its steps, in creation order.
    pub steps: Vec<ExecutionStep>,
}

impl NewExecution {
    /// A pending execution of `workflow_id` with a fresh UUIDv7.
    pub fn new(workflow_id: Uuid) -> Self {
        NewExecution {
            id: Uuid::now_v7(),
            workflow_id,
            status: ExecutionStatus::Pending,
            user_id: None,
            data: None,
            workflow_version: 1,
            idempotency_key: None,
            parent_execution_id: None,
            priority: 0,
            concurrency_key: None,
            start_after: None,
            dedup_key: None,
            dedup_until: None,
            dedup_window: None,
            rerun_of: None,
        }
    }

    /// Sets the user who starts it.
    pub fn user_id(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Sets the JSON input and state.
    pub fn data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// Sets the idempotency key (unique per workflow; see [`crate::engine::start_execution`]).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Makes it a sub-workflow of the execution `parent`.
    pub fn parent(mut self, parent: Uuid) -> Self {
        self.parent_execution_id = Some(parent);
        self
    }

    /// Links it to the execution it re-runs (see [`crate::engine::rerun_execution`]).
    pub fn rerun_of(mut self, execution: Uuid) -> Self {
        self.rerun_of = Some(execution);
        self
    }

    /// Sets the claim priority of its steps (higher first; default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the concurrency key of its steps (a tenant, a customer): with a
    /// limit set ([`crate::engine::set_concurrency_limit`]), at most that
    /// many steps of the key run (or are ready to be claimed) at once.
    pub fn concurrency_key(mut self, key: impl Into<String>) -> Self {
        self.concurrency_key = Some(key.into());
        self
    }

    /// Delays the start: [`crate::engine::start_execution`] leaves it pending
    /// (nothing claims its steps) until `at`, when
    /// [`crate::engine::start_due_executions`] (run by the maintenance loop)
    /// starts it. A time in the past starts it at once.
    pub fn start_after(mut self, at: DateTime<Utc>) -> Self {
        self.start_after = Some(at);
        self
    }

    /// Deduplicates on `key` while the execution is unfinished: a start of
    /// the same workflow with the same key returns this execution
    /// (`created: false`) until it is completed, failed or cancelled; after
    /// that the key starts a new one. Unlike the idempotency key, the
    /// database keeps no unique index on it: plain inserts are refused by a
    /// trigger (constraint `executions_dedup`).
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup_key = Some(key.into());
        self.dedup_window = None;
        self
    }

    /// Deduplicates on `key` for `window` from the start (debouncing), whether
    /// or not the execution has finished.
    pub fn dedup_window(mut self, key: impl Into<String>, window: std::time::Duration) -> Self {
        self.dedup_key = Some(key.into());
        self.dedup_window = Some(window);
        self
    }

    /// `dedup_until` from the window, counted from now.
    pub(crate) fn with_dedup_until(&self) -> Self {
        let mut new = self.clone();
        if let (Some(_), Some(window)) = (&new.dedup_key, new.dedup_window) {
            let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
            new.dedup_until = Some(
                Utc::now()
                    .checked_add_signed(window)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
            );
        }
        new
    }

    /// Inserts the execution and returns the stored row.
    #[tracing::instrument(skip_all, fields(execution.id = %self.id, workflow.id = %self.workflow_id))]
    pub fn create(&self, conn: &mut PgConnection) -> QueryResult<Execution> {
        diesel::insert_into(executions::table)
            .values(self.with_dedup_until())
            .returning(Execution::as_returning())
            .get_result(conn)
    }
}

by_id_queries!(Execution, executions, "execution");
changeset_update!(Execution, executions, ExecutionChanges);

impl Execution {
    /// Up to `limit` executions of a workflow, newest (`started_at`) first.
    #[tracing::instrument(skip(conn))]
    pub fn list_for_workflow(
        conn: &mut PgConnection,
        workflow_id: Uuid,
        limit: i64,
    ) -> QueryResult<Vec<Execution>> {
        executions::table
            .filter(executions::workflow_id.eq(workflow_id))
            .select(Execution::as_select())
            .order((executions::started_at.desc(), executions::id.desc()))
            .limit(page_size(limit))
            .load(conn)
    }
}
