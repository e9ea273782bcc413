use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde::Deserialize;
use uuid::Uuid;

use crate::enums::{AnyStatus, ExecutionStatus, StepStatus};

/// The channel every committed transition is notified on.
pub const CHANNEL: &str = "workflow_db_events";

/// How often [`wait_for_notifications`] looks at the socket.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// One committed transition, as sent by the triggers' `pg_notify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// The execution concerned.
    pub execution_id: Uuid,
    /// The step concerned; `None` when the execution itself changed status.
    pub step_id: Option<Uuid>,
    /// The new status.
    pub status: AnyStatus,
}

#[derive(Deserialize)]
struct Payload {
    execution_id: Uuid,
    step_id: Option<Uuid>,
    status: String,
}

impl Notification {
    fn parse(payload: &str) -> Option<Notification> {
        let p: Payload = serde_json::from_str(payload).ok()?;
        let status = match p.step_id {
            Some(_) => StepStatus::from_label(&p.status)?.into(),
            None => ExecutionStatus::from_label(&p.status)?.into(),
        };
        Some(Notification {
            execution_id: p.execution_id,
            step_id: p.step_id,
            status,
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
