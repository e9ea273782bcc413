use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use crate::schema::{concurrency_limits, queues};

/// A paused or limited queue (table `queues`); a queue without a row runs
/// freely. Written by [`crate::engine::pause_queue`],
/// [`crate::engine::resume_queue`] and [`crate::engine::set_queue_limit`].
#[derive(
    Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable, Serialize, Deserialize,
)]
#[diesel(table_name = queues, check_for_backend(diesel::pg::Pg))]
pub struct Queue {
    /// The queue's name (a step's [`crate::ExecutionStep::queue_name`]).
    pub name: String,
    /// Nothing is claimed from it; running steps finish.
    pub paused: bool,
    /// Most steps running at once; `None`: no limit.
    pub max_running: Option<i32>,
    /// Steps running now (kept exact by the database).
    pub running: i32,
    /// When it was first configured.
    pub created_at: DateTime<Utc>,
    /// Last change (the counter included).
    pub updated_at: DateTime<Utc>,
}

/// A concurrency key's limit (table `concurrency_limits`), written by
/// [`crate::engine::set_concurrency_limit`].
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Serialize, Deserialize)]
#[diesel(table_name = concurrency_limits, check_for_backend(diesel::pg::Pg))]
pub struct ConcurrencyLimit {
    /// The key (a tenant, a customer).
    pub key: String,
    /// Most steps of the key running or admitted at once.
    pub max_running: i32,
    /// When the limit was first set.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}
