use diesel::prelude::*;

use crate::enums::{ExecutionStatus, StepStatus};
use crate::error::{Error, Result};
use crate::graph::NodePlan;
use crate::models::{Execution, NewExecution, NewExecutionStep, Workflow, bulk};
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

/// Starts an execution of the workflow's current version, atomically:
/// inserts the execution and one step per node (each knowing how many
/// upstream steps it waits for and which steps wait for it) and moves it
/// `pending -> running`, which makes its root steps claimable, with the
/// transition's event and NOTIFY. Without an idempotency key this is one
/// statement after the workflow read (two round trips); with a key, or for a
/// workflow without nodes (which completes at once), one transaction in which
/// the triggers do the transition.
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
    if new.idempotency_key.is_none() {
        let workflow = find_workflow(conn, new)?;
        let graph = workflow.graph()?;
        let plan = graph.plan()?;
        if !plan.is_empty() {
            return start_in_one_statement(conn, new, &workflow, plan);
        }
    }
    conn.transaction(|conn| {
        let workflow = find_workflow(conn, new)?;
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

        let steps = plan_steps(execution.id, plan);
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

fn find_workflow(conn: &mut PgConnection, new: &NewExecution) -> Result<Workflow> {
    Workflow::find(conn, new.workflow_id)
        .optional()?
        .ok_or_else(|| Error::NotFound {
            entity: "workflow",
            id: new.workflow_id.to_string(),
        })
}

/// One pending step per planned node, with its dependency counters and retry budget.
fn plan_steps(execution_id: uuid::Uuid, plan: Vec<NodePlan<'_>>) -> Vec<NewExecutionStep> {
    plan.into_iter()
        .map(|p| NewExecutionStep {
            upstream_pending: p.upstream,
            downstream: p.downstream,
            max_retries: p.node.max_retries().unwrap_or(DEFAULT_MAX_RETRIES),
            status: StepStatus::Pending,
            node_type: Some(p.node.r#type.clone()),
            ..NewExecutionStep::new(execution_id, p.node.id.clone())
        })
        .collect()
}

/// The common start (no idempotency key, at least one node) as ONE statement,
/// atomic on its own ([`bulk::insert_execution_with_steps`] plus the start
/// event and NOTIFY): the execution is inserted already `running`, so history
/// and listeners see what the trigger-driven path produces. With the workflow
/// read before, two round trips in all (the hand-written BEGIN/INSERT/INSERT/
/// COMMIT takes four).
fn start_in_one_statement(
    conn: &mut PgConnection,
    new: &NewExecution,
    workflow: &Workflow,
    plan: Vec<NodePlan<'_>>,
) -> Result<Started> {
    let new = NewExecution {
        status: ExecutionStatus::Running,
        workflow_version: workflow.version,
        ..new.clone()
    };
    let steps = plan_steps(new.id, plan);
    Ok(Started {
        execution: bulk::insert_started_execution(conn, &new, &steps)?,
        created: true,
    })
}
