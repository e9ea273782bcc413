use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::schema::execution_events;

/// One status transition of an execution or a step (table `execution_events`).
///
/// Rows are written by PostgreSQL triggers in the transaction of the
/// transition, whoever writes it; the table refuses UPDATE and DELETE (rows
/// go away only with their execution).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    QueryableByName,
    Selectable,
    Identifiable,
    Serialize,
    Deserialize,
)]
#[diesel(table_name = execution_events, check_for_backend(diesel::pg::Pg))]
pub struct ExecutionEvent {
    /// Primary key, increasing with insertion order.
    pub id: i64,
    /// The execution concerned.
    pub execution_id: Uuid,
    /// The step concerned; `None` for the execution's own transitions.
    pub step_id: Option<Uuid>,
    /// Status before.
    pub from_status: Option<String>,
    /// Status after.
    pub to_status: String,
    /// Node id, worker, retry count and error, where they apply.
    pub payload: Option<Value>,
    /// Transaction time of the transition.
    pub created_at: DateTime<Utc>,
}

impl ExecutionEvent {
    /// The history of an execution and all its steps, oldest first.
    #[tracing::instrument(skip(conn))]
    pub fn for_execution(
        conn: &mut PgConnection,
        execution_id: Uuid,
    ) -> QueryResult<Vec<ExecutionEvent>> {
        execution_events::table
            .filter(execution_events::execution_id.eq(execution_id))
            .order(execution_events::id)
            .select(ExecutionEvent::as_select())
            .load(conn)
    }

    /// The per-attempt history of one step, oldest first.
    #[tracing::instrument(skip(conn))]
    pub fn for_step(conn: &mut PgConnection, step_id: Uuid) -> QueryResult<Vec<ExecutionEvent>> {
        execution_events::table
            .filter(execution_events::step_id.eq(step_id))
            .order(execution_events::id)
            .select(ExecutionEvent::as_select())
            .load(conn)
    }
}
