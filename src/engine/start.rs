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
    if new.idempotency_key.is_none() && new.dedup_key.is_none() && new.start_after.is_none() {
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
            ..new.with_dedup_until()
        };
        if let Some(key) = &new.dedup_key {
            // Takes the (workflow, key) lock until commit: a racing start
            // with the same key waits here and then finds this one.
            if let Some(existing) = find_duplicate(conn, workflow.id, key)? {
                return Ok(Started {
                    execution: Execution::find(conn, existing)?,
                    created: false,
                });
            }
        }
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

        let steps = plan_steps(&new, plan);
        for chunk in steps.chunks(STEP_INSERT_CHUNK) {
            diesel::insert_into(execution_steps::table)
                .values(chunk)
                .execute(conn)?;
        }
        // Started now unless a start_after is still ahead (by the database's
        // clock, as the trigger that refuses an early start counts it).
        // RETURNING shows the row before the AFTER trigger settled it; a
        // workflow without steps completes there, so read it back.
        let started = diesel::update(executions::table.find(execution.id))
            .filter(
                executions::start_after
                    .is_null()
                    .or(executions::start_after.le(diesel::dsl::now)),
            )
            .set(executions::status.eq(ExecutionStatus::Running))
            .returning(Execution::as_returning())
            .get_result(conn)
            .optional()?;
        let execution = match started {
            Some(execution) if !steps.is_empty() => execution,
            _ => Execution::find(conn, execution.id)?,
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

/// One pending step per planned node, with its dependency counters, retry
/// budget and flow control (the node's `config.priority`, `config.queue`
/// and `config.concurrency_key` over the execution's; a timer or signal
/// wait takes no worker, so no concurrency key).
fn plan_steps(execution: &NewExecution, plan: Vec<NodePlan<'_>>) -> Vec<NewExecutionStep> {
    plan.into_iter()
        .map(|p| NewExecutionStep {
            upstream_pending: p.upstream,
            downstream: p.downstream,
            max_retries: p.node.max_retries().unwrap_or(DEFAULT_MAX_RETRIES),
            status: StepStatus::Pending,
            node_type: Some(p.node.r#type.clone()),
            priority: p.node.priority().unwrap_or(execution.priority),
            queue: p.node.queue().map(str::to_owned),
            concurrency_key: p
                .node
                .concurrency_key()
                .map(str::to_owned)
                .or_else(|| execution.concurrency_key.clone())
                .filter(|_| !p.node.is_wait()),
            ..NewExecutionStep::new(execution.id, p.node.id.clone())
        })
        .collect()
}

#[derive(QueryableByName)]
struct Duplicate {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Uuid>)]
    id: Option<uuid::Uuid>,
}

/// The execution that holds `key` for the workflow (see
/// [`NewExecution::dedup_key`]), under the (workflow, key) advisory lock
/// the insert trigger takes too, held until the transaction ends.
fn find_duplicate(
    conn: &mut PgConnection,
    workflow: uuid::Uuid,
    key: &str,
) -> QueryResult<Option<uuid::Uuid>> {
    Ok(
        diesel::sql_query("SELECT workflow_db_find_duplicate($1, $2) AS id")
            .bind::<diesel::sql_types::Uuid, _>(workflow)
            .bind::<diesel::sql_types::Text, _>(key)
            .get_result::<Duplicate>(conn)?
            .id,
    )
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
    let steps = plan_steps(&new, plan);
    Ok(Started {
        execution: bulk::insert_started_execution(conn, &new, &steps)?,
        created: true,
    })
}
