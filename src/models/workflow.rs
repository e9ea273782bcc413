use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Execution, ExecutionStep, ExecutionWithSteps, page_size};
use crate::error::{Error, Result};
use crate::graph::WorkflowGraph;
use crate::schema::{executions, workflows};

/// A workflow definition (table `workflows`).
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Identifiable, Serialize, Deserialize)]
#[diesel(table_name = workflows, check_for_backend(diesel::pg::Pg))]
pub struct Workflow {
    /// Primary key (UUIDv7).
    pub id: Uuid,
    /// Human-readable name.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// JSON array of nodes (id, type, config).
    pub nodes: Value,
    /// JSON array of edges (source, target).
    pub edges: Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Version of the definition (1 at creation, + 1 on every change).
    pub version: i32,
}

/// A workflow to insert; [`NewWorkflow::new`] assigns a fresh UUIDv7.
#[derive(Debug, Clone, PartialEq, Insertable, Serialize, Deserialize)]
#[diesel(table_name = workflows)]
pub struct NewWorkflow {
    /// Primary key; keep the generated UUIDv7 unless you need a fixed id.
    pub id: Uuid,
    /// Human-readable name (not empty).
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// JSON array of nodes.
    pub nodes: Value,
    /// JSON array of edges.
    pub edges: Value,
}

/// Changes to a workflow; `None` leaves a column as it is.
#[derive(Debug, Clone, Default, PartialEq, AsChangeset, Serialize, Deserialize)]
#[diesel(table_name = workflows)]
pub struct WorkflowChanges {
    /// New name.
    pub name: Option<String>,
    /// New description (`Some(None)` clears it).
    pub description: Option<Option<String>>,
    /// New nodes.
    pub nodes: Option<Value>,
    /// New edges.
    pub edges: Option<Value>,
}

/// A workflow with its most recent executions and all their steps (see
/// [`Workflow::with_recent_executions`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkflowWithExecutions {
    /// The workflow.
    #[serde(flatten)]
    pub workflow: Workflow,
    /// Its most recent executions, newest first.
    pub executions: Vec<ExecutionWithSteps>,
}

impl NewWorkflow {
    /// A workflow named `name` with the given graph and a fresh UUIDv7.
    pub fn new(name: impl Into<String>, nodes: Value, edges: Value) -> Self {
        NewWorkflow {
            id: Uuid::now_v7(),
            name: name.into(),
            description: None,
            nodes,
            edges,
        }
    }

    /// A workflow named `name` with a typed graph and a fresh UUIDv7.
    pub fn from_graph(name: impl Into<String>, graph: &WorkflowGraph) -> Self {
        Self::new(name, graph.nodes_json(), graph.edges_json())
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Validates the graph ([`WorkflowGraph::validate`]), inserts the
    /// workflow at version 1 and returns the stored row. An invalid graph is
    /// refused with [`Error::InvalidGraph`] and nothing is written.
    #[tracing::instrument(skip_all, fields(workflow.id = %self.id))]
    pub fn create(&self, conn: &mut PgConnection) -> Result<Workflow> {
        WorkflowGraph::from_json(&self.nodes, &self.edges)?.validate()?;
        Ok(diesel::insert_into(workflows::table)
            .values(self)
            .returning(Workflow::as_returning())
            .get_result(conn)?)
    }
}

impl WorkflowChanges {
    fn is_empty(&self) -> bool {
        *self == WorkflowChanges::default()
    }
}

impl Workflow {
    /// The workflow with this id; `Err(NotFound)` when there is none.
    #[tracing::instrument(skip(conn))]
    pub fn find(conn: &mut PgConnection, id: Uuid) -> QueryResult<Workflow> {
        workflows::table
            .find(id)
            .select(Workflow::as_select())
            .first(conn)
    }

    /// Up to `limit` workflows (at most [`super::MAX_PAGE_SIZE`]) in creation
    /// order, after the id `after` (keyset pagination: pass the last id of the
    /// previous page).
    #[tracing::instrument(skip(conn))]
    pub fn list(
        conn: &mut PgConnection,
        after: Option<Uuid>,
        limit: i64,
    ) -> QueryResult<Vec<Workflow>> {
        let mut query = workflows::table
            .select(Workflow::as_select())
            .order(workflows::id)
            .limit(page_size(limit))
            .into_boxed();
        if let Some(after) = after {
            query = query.filter(workflows::id.gt(after));
        }
        query.load(conn)
    }

    /// The typed graph of this definition.
    pub fn graph(&self) -> Result<WorkflowGraph> {
        WorkflowGraph::from_json(&self.nodes, &self.edges)
    }

    /// Applies `changes` (last writer wins) and returns the updated row
    /// (unchanged if `changes` is empty). A changed graph is validated first
    /// (merged with the stored half when only nodes or only edges change).
    /// The version goes up by one when the definition changes.
    #[tracing::instrument(skip(conn, changes))]
    pub fn update(
        conn: &mut PgConnection,
        id: Uuid,
        changes: &WorkflowChanges,
    ) -> Result<Workflow> {
        Self::update_where(conn, id, None, changes)
    }

    /// Optimistic update: applies `changes` only if the workflow is still at
    /// `expected_version` (the version the caller read), else fails with
    /// [`Error::VersionConflict`] and writes nothing. The graph is validated
    /// as in [`Workflow::update`].
    #[tracing::instrument(skip(conn, changes))]
    pub fn update_versioned(
        conn: &mut PgConnection,
        id: Uuid,
        expected_version: i32,
        changes: &WorkflowChanges,
    ) -> Result<Workflow> {
        Self::update_where(conn, id, Some(expected_version), changes)
    }

    fn update_where(
        conn: &mut PgConnection,
        id: Uuid,
        expected_version: Option<i32>,
        changes: &WorkflowChanges,
    ) -> Result<Workflow> {
        conn.transaction(|conn| {
            // The row lock makes the version check and the graph validation
            // (merged with the stored half) hold for the row we write.
            let current = workflows::table
                .find(id)
                .select(Workflow::as_select())
                .for_no_key_update()
                .first(conn)
                .optional()?
                .ok_or_else(|| Error::NotFound {
                    entity: "workflow",
                    id: id.to_string(),
                })?;
            if let Some(expected) = expected_version.filter(|&v| v != current.version) {
                return Err(Error::VersionConflict {
                    id,
                    expected,
                    actual: current.version,
                });
            }
            if changes.nodes.is_some() || changes.edges.is_some() {
                let nodes = changes.nodes.as_ref().unwrap_or(&current.nodes);
                let edges = changes.edges.as_ref().unwrap_or(&current.edges);
                WorkflowGraph::from_json(nodes, edges)?.validate()?;
            }
            if changes.is_empty() {
                return Ok(current);
            }
            Ok(diesel::update(workflows::table.find(id))
                .set(changes)
                .returning(Workflow::as_returning())
                .get_result(conn)?)
        })
    }

    /// Deletes the workflow, its executions and their steps (ON DELETE CASCADE).
    /// Returns whether a row was deleted.
    #[tracing::instrument(skip(conn))]
    pub fn delete(conn: &mut PgConnection, id: Uuid) -> QueryResult<bool> {
        diesel::delete(workflows::table.find(id))
            .execute(conn)
            .map(|n| n > 0)
    }

    /// The workflow with its `limit` most recent executions (by `started_at`,
    /// newest first) and all their steps, in three queries whatever the
    /// number of executions (no N+1): the workflow, its executions
    /// (`executions_workflow_id_started_at_idx` serves both filter and
    /// order), and every step of those executions in one `= ANY(..)` query,
    /// grouped in memory.
    #[tracing::instrument(skip(conn))]
    pub fn with_recent_executions(
        conn: &mut PgConnection,
        id: Uuid,
        limit: i64,
    ) -> QueryResult<WorkflowWithExecutions> {
        let workflow = Self::find(conn, id)?;
        let executions: Vec<Execution> = Execution::belonging_to(&workflow)
            .select(Execution::as_select())
            .order((executions::started_at.desc(), executions::id.desc()))
            .limit(page_size(limit))
            .load(conn)?;
        let steps: Vec<ExecutionStep> = ExecutionStep::belonging_to(&executions)
            .select(ExecutionStep::as_select())
            .order(crate::schema::execution_steps::id)
            .load(conn)?;
        let executions = steps
            .grouped_by(&executions)
            .into_iter()
            .zip(executions)
            .map(|(steps, execution)| ExecutionWithSteps { execution, steps })
            .collect();
        Ok(WorkflowWithExecutions {
            workflow,
            executions,
        })
    }
}
