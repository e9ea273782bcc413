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

    /// Inserts the execution and returns the stored row.
    #[tracing::instrument(skip_all, fields(execution.id = %self.id, workflow.id = %self.workflow_id))]
    pub fn create(&self, conn: &mut PgConnection) -> QueryResult<Execution> {
        diesel::insert_into(executions::table)
            .values(self)
            .returning(Execution::as_returning())
            .get_result(conn)
    }
}

impl Execution {
    /// The execution with this id; `Err(NotFound)` when there is none.
    #[tracing::instrument(skip(conn))]
    pub fn find(conn: &mut PgConnection, id: Uuid) -> QueryResult<Execution> {
        executions::table
            .find(id)
            .select(Execution::as_select())
            .first(conn)
    }

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

    /// Up to `limit` executions in creation order after the id `after`
    /// (keyset pagination: pass the last id of the previous page).
    #[tracing::instrument(skip(conn))]
    pub fn list(
        conn: &mut PgConnection,
        after: Option<Uuid>,
        limit: i64,
    ) -> QueryResult<Vec<Execution>> {
        let mut query = executions::table
            .select(Execution::as_select())
            .order(executions::id)
            .limit(page_size(limit))
            .into_boxed();
        if let Some(after) = after {
            query = query.filter(executions::id.gt(after));
        }
        query.load(conn)
    }

    /// Applies `changes` and returns the updated row (unchanged if `changes` is empty).
    #[tracing::instrument(skip(conn, changes))]
    pub fn update(
        conn: &mut PgConnection,
        id: Uuid,
        changes: &ExecutionChanges,
    ) -> QueryResult<Execution> {
        if *changes == ExecutionChanges::default() {
            return Self::find(conn, id);
        }
        diesel::update(executions::table.find(id))
            .set(changes)
            .returning(Execution::as_returning())
            .get_result(conn)
    }

    /// Deletes the execution and its steps. Returns whether a row was deleted.
    #[tracing::instrument(skip(conn))]
    pub fn delete(conn: &mut PgConnection, id: Uuid) -> QueryResult<bool> {
        diesel::delete(executions::table.find(id))
            .execute(conn)
            .map(|n| n > 0)
    }
}
