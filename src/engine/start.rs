use diesel::prelude::*;

use crate::enums::{ExecutionStatus, StepStatus};
use crate::error::{Error, Result};
use crate::models::{Execution, NewExecution, NewExecutionStep, Workflow};
use crate::schema::{execution_steps, executions};

/// Rows per INSERT when creating steps (8 parameters each, well below
/// PostgreSQL's 65,535 bind parameters).
const STEP_INSERT_CHUNK: usize = 4096;

/// Retry budget of a step whose node sets no `config.max_retries`.
pub const DEFAULT_MAX_RETRIES: i32 = 3;

/// The outcome of [`start_execution`].
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    /// The execution (the existing one when `created` is false).
    pub execution: Execution,
    /// Whether this call created it (false: the idempotency key was already used).
    pub created: bool,
}

/// Starts an execution of the workflow's current version in one transaction:
/// inserts the execution and one step per node (each knowing how many
/// upstream steps it waits for and which steps wait for it), then moves the
/// execution `pending -> running`, which makes its root steps claimable. A
/// workflow without nodes completes at once.
///
/// With an idempotency key, a repeated start (also two racing ones: the
/// unique index makes the second wait for the first) returns the existing
/// execution with `created: false`.
///
/// `new` says what to start ([`NewExecution::new`] with the user, data,
/// idempotency key and parent set); its status and `workflow_version` are
/// overwritten. Each step's retry budget is its node's `config.max_retries`,
/// else [`DEFAULT_MAX_RETRIES`].
#[tracing::instrument(skip_all, fields(workflow.id = %new.workflow_id, execution.id = %new.id))]
pub fn start_execution(conn: &mut PgConnection, new: &NewExecution) -> Result<Started> {
    conn.transaction(|conn| {
        let workflow = Workflow::find(conn, new.workflow_id)
            .optional()?
            .ok_or_else(|| Error::NotFound {
                entity: "workflow",
                id: new.workflow_id.to_string(),
            })?;
        let graph = workflow.graph()?;
        let plan = graph.plan()?;
        let new = NewExecution {
            status: ExecutionStatus::Pending,
            workflow_version: workflow.version,
            ..new.clone()
        };
        let insert = diesel::insert_into(executions::table).values(&new);
        let execution = match &new.idempotency_key {
            None => insert
                .returning(Execution::as_returning())
                .get_result(conn)?,
            Some(key) => {
                let inserted = insert
                    .on_conflict((executions::workflow_id, executions::idempotency_key))
                    .filter_target(executions::idempotency_key.is_not_null())
                    .do_nothing()
                    .returning(Execution::as_returning())
                    .get_result(conn)
                    .optional()?;
                match inserted {
                    Some(execution) => execution,
                    None => {
                        // The key is taken (by a committed start: a racing one
                        // made our INSERT wait until it committed).
                        let existing = executions::table
                            .filter(executions::workflow_id.eq(workflow.id))
                            .filter(executions::idempotency_key.eq(key))
                            .select(Execution::as_select())
                            .first(conn)?;
                        return Ok(Started {
                            execution: existing,
                            created: false,
                        });
                    }
                }
            }
        };

        let steps: Vec<NewExecutionStep> = plan
            .into_iter()
            .map(|p| NewExecutionStep {
                upstream_pending: p.upstream,
                downstream: p.downstream,
                max_retries: p.node.max_retries().unwrap_or(DEFAULT_MAX_RETRIES),
                status: StepStatus::Pending,
                ..NewExecutionStep::new(execution.id, p.node.id.clone())
            })
            .collect();
        for chunk in steps.chunks(STEP_INSERT_CHUNK) {
            diesel::insert_into(execution_steps::table)
                .values(chunk)
                .execute(conn)?;
        }
        // RETURNING shows the row before the AFTER trigger settled it; a
        // workflow without steps completes there, so read it back.
        let execution = diesel::update(executions::table.find(execution.id))
            .set(executions::status.eq(ExecutionStatus::Running))
            .returning(Execution::as_returning())
            .get_result(conn)?;
        let execution = if steps.is_empty() {
            Execution::find(conn, execution.id)?
        } else {
            execution
        };
        Ok(Started {
            execution,
            created: true,
        })
    })
}
