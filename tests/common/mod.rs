//! Helpers shared by the engine tests.
#![allow(dead_code)]

use std::time::Duration;

use diesel::PgConnection;
use workflow_db::{Edge, NewExecution, NewWorkflow, Node, Workflow, WorkflowGraph};

/// A lease long enough never to expire during a test.
pub const LEASE: Duration = Duration::from_secs(60);

/// A graph with these nodes (type "task") and edges.
pub fn graph(nodes: &[&str], edges: &[(&str, &str)]) -> WorkflowGraph {
    WorkflowGraph {
        nodes: nodes.iter().map(|id| Node::new(*id, "task")).collect(),
        edges: edges.iter().map(|(s, t)| Edge::new(*s, *t)).collect(),
    }
}

/// Creates a workflow with this graph.
pub fn workflow(conn: &mut PgConnection, nodes: &[&str], edges: &[(&str, &str)]) -> Workflow {
    NewWorkflow::from_graph("test", &graph(nodes, edges))
        .create(conn)
        .unwrap()
}

/// Starts an execution of the workflow.
pub fn start(conn: &mut PgConnection, wf: &Workflow) -> workflow_db::Execution {
    workflow_db::engine::start_execution(conn, &NewExecution::new(wf.id))
        .unwrap()
        .execution
}
