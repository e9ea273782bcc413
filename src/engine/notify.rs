use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde::Deserialize;
use uuid::Uuid;

use crate::enums::{AnyStatus, ExecutionStatus, StepStatus};

/// The channel every committed transition is notified on.
pub const CHANNEL: &str = "workflow_db_events";

/// The channel on which the database says that steps became claimable (see
/// [`Claimable`]).
pub const CLAIMABLE_CHANNEL: &str = "workflow_db_claimable";

/// How often [`wait_for_notifications`] looks at the socket.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Committed transitions, as sent by the triggers' `pg_notify`: one per
/// execution status change, and one per statement, execution and new step
/// status (a batch of 50 completions of one execution is one notification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// The execution concerned.
    pub execution_id: Uuid,
    /// The step concerned when exactly one step changed; `None` when several
    /// did (see `steps`) or when the execution itself changed status.
    pub step_id: Option<Uuid>,
    /// The new status (an [`AnyStatus::Step`] when `steps > 0`).
    pub status: AnyStatus,
    /// How many steps of the execution reached `status` in one statement;
    /// 0 when the execution itself changed status.
    pub steps: u32,
}

/// Steps became claimable: sent by the database (whoever wrote) once per
/// statement and queue when steps become pending with every upstream step
/// done under a running execution and admitted by their concurrency key — a
/// start, an upstream step finishing, a resume, a retry scheduled, a
/// release, a reclaim, a key admitting a step — and when a limited queue
/// gains room or a queue is resumed or its limit changed (then `steps` is
/// the room freed, or 0). It means "claim now" when `run_after` has come,
/// and "claimable at `run_after`" for a retry with a backoff. A wake-up, not
/// a promise: another worker may claim them first, and a retry under an
/// execution paused or finished in the same statement is parked or skipped
/// after the notification was queued.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claimable {
    /// The steps' queue (see [`crate::ExecutionStep::queue_name`]).
    pub queue: String,
    /// How many steps of that queue became claimable in the statement.
    pub steps: u32,
    /// The earliest time one of them may be claimed.
    pub run_after: DateTime<Utc>,
}

impl Claimable {
    pub(crate) fn parse(payload: &str) -> Option<Claimable> {
        serde_json::from_str(payload).ok()
    }
}

#[derive(Deserialize)]
struct Payload {
    execution_id: Uuid,
    step_id: Option<Uuid>,
    status: String,
    #[serde(default)]
    steps: u32,
}

impl Notification {
    /// The notification the triggers sent for an event of the feed (one
    /// step, or the execution itself); `None` for an unknown status.
    pub(crate) fn from_event(
        execution_id: Uuid,
        step_id: Option<Uuid>,
        status: &str,
    ) -> Option<Notification> {
        let status = match step_id {
            Some(_) => StepStatus::from_label(status)?.into(),
            None => ExecutionStatus::from_label(status)?.into(),
        };
        Some(Notification {
            execution_id,
            step_id,
            status,
            steps: u32::from(step_id.is_some()),
        })
    }

    pub(crate) fn parse(payload: &str) -> Option<Notification> {
        let p: Payload = serde_json::from_str(payload).ok()?;
        let status = if p.steps > 0 || p.step_id.is_some() {
            StepStatus::from_label(&p.status)?.into()
        } else {
            ExecutionStatus::from_label(&p.status)?.into()
        };
        Some(Notification {
            execution_id: p.execution_id,
            step_id: p.step_id,
            status,
            steps: p.steps.max(u32::from(p.step_id.is_some())),
        })
    }
}

/// Subscribes this connection to [`CHANNEL`]. Use a dedicated connection
/// (not a pooled one that goes back to the pool), outside a transaction.
#[tracing::instrument(skip(conn))]
pub fn listen(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute("LISTEN workflow_db_events")
}

/// Ends the subscription.
#[tracing::instrument(skip(conn))]
pub fn unlisten(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute("UNLISTEN workflow_db_events")
}

/// The notifications that arrived so far, without waiting. Payloads that
/// are not ours (someone else notifying on the channel) are skipped.
pub fn poll_notifications(conn: &mut PgConnection) -> QueryResult<Vec<Notification>> {
    let mut out = Vec::new();
    for n in conn.notifications_iter() {
        let n = n?;
        if n.channel != CHANNEL {
            continue;
        }
        match Notification::parse(&n.payload) {
            Some(parsed) => out.push(parsed),
            None => tracing::warn!(channel = %n.channel, "ignoring a malformed notification"),
        }
    }
    Ok(out)
}

/// Waits up to `timeout` for notifications and returns them (empty on
/// timeout), after [`listen`].
pub fn wait_for_notifications(
    conn: &mut PgConnection,
    timeout: Duration,
) -> QueryResult<Vec<Notification>> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = poll_notifications(conn)?;
        let now = Instant::now();
        if !got.is_empty() || now >= deadline {
            return Ok(got);
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}
