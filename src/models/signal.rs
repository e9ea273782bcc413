use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::Execution;
use crate::schema::execution_signals;

/// A signal sent to an execution (table `execution_signals`): kept until a
/// step waiting for its name takes it (see [`crate::engine::send_signal`]).
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
#[diesel(table_name = execution_signals, belongs_to(Execution), check_for_backend(diesel::pg::Pg))]
pub struct Signal {
    /// Primary key (UUIDv7 when sent by the crate).
    pub id: Uuid,
    /// The execution it was sent to.
    pub execution_id: Uuid,
    /// Its name: the `config.signal` of the nodes that wait for it.
    pub name: String,
    /// JSON payload: the output of the step it is delivered to.
    pub payload: Option<Value>,
    /// When it was sent.
    pub sent_at: DateTime<Utc>,
    /// The step that took it; `None` while undelivered.
    pub delivered_to: Option<Uuid>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
}

impl Signal {
    /// The signals of an execution, oldest first (delivered or not).
    #[tracing::instrument(skip(conn))]
    pub fn for_execution(conn: &mut PgConnection, execution_id: Uuid) -> QueryResult<Vec<Signal>> {
        execution_signals::table
            .filter(execution_signals::execution_id.eq(execution_id))
            .order((execution_signals::sent_at, execution_signals::id))
            .select(Signal::as_select())
            .load(conn)
    }
}
