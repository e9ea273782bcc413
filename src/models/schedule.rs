use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::Workflow;
use crate::schema::schedules;

/// A cron schedule that starts executions of a workflow (table
/// `schedules`). Create one with [`crate::engine::NewSchedule`]; it is
/// fired by [`crate::engine::fire_due_schedules`] (which the maintenance
/// leader calls every round).
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
#[diesel(table_name = schedules, belongs_to(Workflow), check_for_backend(diesel::pg::Pg))]
pub struct Schedule {
    /// Primary key (UUIDv7); part of the idempotency key of every execution
    /// the schedule starts.
    pub id: Uuid,
    /// Unique name (1 to 200 characters).
    pub name: String,
    /// The workflow each tick starts.
    pub workflow_id: Uuid,
    /// The cron expression (5 fields, or 6 with seconds first).
    pub cron: String,
    /// The IANA time zone the expression is read in.
    pub time_zone: String,
    /// JSON data of the executions it starts.
    pub data: Option<Value>,
    /// User id of the executions it starts.
    pub user_id: Option<String>,
    /// A paused schedule does not fire.
    pub paused: bool,
    /// `"skip"` or `"catch_up"`; [`Schedule::policy`] reads it with
    /// `catch_up_limit`.
    pub missed_ticks: String,
    /// For `catch_up`: the most ticks one firing starts.
    pub catch_up_limit: Option<i32>,
    /// The earliest tick not yet fired nor skipped (due when at or before now).
    pub next_fire_at: DateTime<Utc>,
    /// The latest tick that started an execution.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// Why a firing paused the schedule (only while paused).
    pub last_error: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

by_id_queries!(Schedule, schedules, "schedule");

impl Schedule {
    /// The schedule named `name`, if any.
    #[tracing::instrument(skip(conn))]
    pub fn find_by_name(conn: &mut PgConnection, name: &str) -> QueryResult<Option<Schedule>> {
        schedules::table
            .filter(schedules::name.eq(name))
            .select(Schedule::as_select())
            .first(conn)
            .optional()
    }

    /// Every schedule, or those of one workflow, by name (schedules are
    /// few: no paging).
    #[tracing::instrument(skip(conn))]
    pub fn list_all(
        conn: &mut PgConnection,
        workflow_id: Option<Uuid>,
    ) -> QueryResult<Vec<Schedule>> {
        let mut query = schedules::table
            .select(Schedule::as_select())
            .order(schedules::name)
            .into_boxed();
        if let Some(workflow_id) = workflow_id {
            query = query.filter(schedules::workflow_id.eq(workflow_id));
        }
        query.load(conn)
    }
}
