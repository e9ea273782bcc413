//! The typed workflow graph stored in `workflows.nodes` / `workflows.edges`,
//! and its validation.
//!
//! ```
//! use serde_json::json;
//! use workflow_db::graph::{Edge, Node, WorkflowGraph};
//!
//! let graph = WorkflowGraph {
//!     nodes: vec![Node::new("fetch", "http"), Node::new("store", "sql")],
//!     edges: vec![Edge::new("fetch", "store")],
//! };
//! graph.validate()?;
//! assert_eq!(graph.nodes_json()[0]["type"], json!("http"));
//! # Ok::<(), workflow_db::Error>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// One node of a workflow: what to run and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique id of the node within its workflow.
    pub id: String,
    /// The kind of node (`"http"`, `"llm"`, ...), interpreted by the engine.
    #[serde(rename = "type")]
    pub r#type: String,
    /// Node configuration, interpreted by the engine. Keys the database
    /// reads, when present: `max_retries` (a non-negative integer, the
    /// step's retry budget), `priority` (an integer, over the execution's),
    /// `queue` (a non-empty string; default: the node type) and
    /// `concurrency_key` (a non-empty string, over the execution's); see
    /// `docs/engine.md`, "Flow control". The engine's own node types
    /// ([`TIMER_NODE_TYPE`], [`SIGNAL_NODE_TYPE`]) read their wait from it:
    /// see [`Node::timer`] and [`Node::signal`].
    #[serde(default)]
    pub config: Value,
}

/// The node type of a durable timer: the step completes, with no worker
/// involved, when its time comes (`config.seconds` after its upstream steps
/// are done, or at `config.until`). See [`Node::timer`].
pub const TIMER_NODE_TYPE: &str = "workflow_db.timer";

/// The node type of a signal wait: the step completes when a signal named
/// `config.signal` is sent to its execution, with the signal's payload as
/// its output, or fails after `config.timeout_seconds`. See [`Node::signal`].
pub const SIGNAL_NODE_TYPE: &str = "workflow_db.signal";

/// Node types (and queue names) starting with this are the engine's own.
pub const RESERVED_PREFIX: &str = "workflow_db.";

/// Whether a node type or queue name is in the engine's namespace
/// ([`RESERVED_PREFIX`]): no worker handles or claims it.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// Longest signal name.
pub const MAX_SIGNAL_NAME_LEN: usize = 200;

/// A dependency: `target` runs after `source` completed (or was skipped).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Edge {
    /// Upstream node id.
    pub source: String,
    /// Downstream node id.
    pub target: String,
}

/// A workflow definition's graph: nodes and the edges between them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkflowGraph {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The edges between node ids.
    pub edges: Vec<Edge>,
}

/// Per-node dependency information computed from a validated graph.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodePlan<'a> {
    pub node: &'a Node,
    pub upstream: i32,
    pub downstream: Vec<String>,
}

impl Node {
    /// A node with an empty (`{}`) configuration.
    pub fn new(id: impl Into<String>, r#type: impl Into<String>) -> Self {
        Node {
            id: id.into(),
            r#type: r#type.into(),
            config: Value::Object(Default::default()),
        }
    }

    /// Sets the configuration.
    pub fn config(mut self, config: Value) -> Self {
        self.config = config;
        self
    }

    /// A durable timer that completes `delay` after its upstream steps are
    /// done (a root node: after its insert, or its execution's
    /// `start_after`), with output
    /// `{"due_at", "fired_at"}`. No worker holds anything while it waits;
    /// the maintenance loop fires it (see `docs/engine.md`, "Timers and
    /// signals"). Sub-microsecond parts of `delay` are dropped.
    pub fn timer(id: impl Into<String>, delay: Duration) -> Self {
        Node::new(id, TIMER_NODE_TYPE).config(json!({"seconds": delay.as_secs_f64()}))
    }

    /// A durable timer that completes at `at` (or at once, when its
    /// upstream steps finish later than that).
    pub fn timer_until(id: impl Into<String>, at: DateTime<Utc>) -> Self {
        Node::new(id, TIMER_NODE_TYPE).config(json!({"until": at.to_rfc3339()}))
    }

    /// A step that waits for the signal `name` sent to its execution
    /// (`engine::send_signal`); the signal's payload becomes its output. A
    /// signal sent before the step is reached is kept for it; each signal is
    /// delivered to one step only. Waits for ever unless
    /// [`with_timeout`](Self::with_timeout) is set.
    pub fn signal(id: impl Into<String>, name: impl Into<String>) -> Self {
        Node::new(id, SIGNAL_NODE_TYPE).config(json!({"signal": name.into()}))
    }

    /// Sets `config.timeout_seconds`: a signal wait fails when no signal came
    /// within `timeout` of the step becoming ready.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        if let Value::Object(config) = &mut self.config {
            config.insert("timeout_seconds".into(), json!(timeout.as_secs_f64()));
        }
        self
    }

    /// Whether this is one of the engine's own wait nodes (a timer or a
    /// signal wait), which no worker runs.
    pub fn is_wait(&self) -> bool {
        self.r#type == TIMER_NODE_TYPE || self.r#type == SIGNAL_NODE_TYPE
    }

    /// The claim priority from `config.priority`, if set (validated by
    /// [`WorkflowGraph::validate`]).
    pub fn priority(&self) -> Option<i32> {
        self.config
            .get("priority")
            .and_then(Value::as_i64)
            .and_then(|n| i32::try_from(n).ok())
    }

    /// The queue from `config.queue`, if set.
    pub fn queue(&self) -> Option<&str> {
        self.config.get("queue").and_then(Value::as_str)
    }

    /// The concurrency key from `config.concurrency_key`, if set.
    pub fn concurrency_key(&self) -> Option<&str> {
        self.config.get("concurrency_key").and_then(Value::as_str)
    }

    /// What is wrong with the flow-control keys of `config`, if anything.
    fn config_error(&self) -> Option<String> {
        let bad = |key: &str, want: &str| {
            Some(format!(
                "node {:?}: config.{key} must be {want}, got {}",
                self.id, self.config[key]
            ))
        };
        if self.config.get("priority").is_some() && self.priority().is_none() {
            return bad("priority", "an integer (32 bits)");
        }
        for key in ["queue", "concurrency_key"] {
            if let Some(v) = self.config.get(key) {
                if v.as_str().is_none_or(str::is_empty) {
                    return bad(key, "a non-empty string");
                }
                if self.is_wait() {
                    return Some(format!(
                        "node {:?}: a {} node takes no config.{key} (it occupies no worker)",
                        self.id, self.r#type
                    ));
                }
            }
        }
        if self.queue().is_some_and(is_reserved) {
            return bad(
                "queue",
                "a name outside the engine's namespace workflow_db.*",
            );
        }
        self.wait_config_error()
    }

    /// What is wrong with a wait node's config (the rules the database's
    /// `workflow_db_wait_config_error` applies at insert), or with a type
    /// in the engine's namespace that is not one of its own.
    fn wait_config_error(&self) -> Option<String> {
        let number = |key: &str| self.config.get(key).map(Value::as_f64);
        let id = &self.id;
        match self.r#type.as_str() {
            TIMER_NODE_TYPE => match (number("seconds"), self.config.get("until")) {
                (None, None) => Some(format!(
                    "timer node {id:?} needs config.seconds (a delay) or config.until (an RFC 3339 time)"
                )),
                (Some(s), _) if s.is_none_or(|s| !(0.0..1e12).contains(&s)) => Some(format!(
                    "timer node {id:?}: config.seconds must be a number of seconds, 0 or more"
                )),
                (_, Some(until))
                    if until
                        .as_str()
                        .is_none_or(|u| DateTime::parse_from_rfc3339(u).is_err()) =>
                {
                    Some(format!(
                        "timer node {id:?}: config.until must be an RFC 3339 time, got {until}"
                    ))
                }
                _ => None,
            },
            SIGNAL_NODE_TYPE => {
                let name = self.config.get("signal").and_then(Value::as_str);
                if name.is_none_or(|n| n.is_empty() || n.chars().count() > MAX_SIGNAL_NAME_LEN) {
                    return Some(format!(
                        "signal node {id:?} needs config.signal, a name of 1 to {MAX_SIGNAL_NAME_LEN} characters"
                    ));
                }
                match number("timeout_seconds") {
                    Some(t) if t.is_none_or(|t| !(t > 0.0 && t < 1e12)) => Some(format!(
                        "signal node {id:?}: config.timeout_seconds must be a number of seconds, more than 0"
                    )),
                    _ => None,
                }
            }
            other if is_reserved(other) => Some(format!(
                "node {id:?}: type {other:?} is reserved: the engine's own types are \
                 {TIMER_NODE_TYPE} and {SIGNAL_NODE_TYPE}"
            )),
            _ => None,
        }
    }

    /// The retry budget from `config.max_retries`, if set.
    pub fn max_retries(&self) -> Option<i32> {
        self.config
            .get("max_retries")
            .and_then(Value::as_u64)
            .and_then(|n| i32::try_from(n).ok())
    }
}

impl Edge {
    /// An edge `source -> target`.
    pub fn new(source: impl Into<String>, target: impl Into<String>) -> Self {
        Edge {
            source: source.into(),
            target: target.into(),
        }
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidGraph { reason }
}

impl WorkflowGraph {
    /// Parses the JSON columns of a workflow row (`nodes`, `edges`).
    pub fn from_json(nodes: &Value, edges: &Value) -> Result<Self> {
        let nodes = Vec::<Node>::deserialize(nodes).map_err(|e| {
            invalid(format!(
                "nodes are not an array of {{id, type, config}}: {e}"
            ))
        })?;
        let edges = Vec::<Edge>::deserialize(edges)
            .map_err(|e| invalid(format!("edges are not an array of {{source, target}}: {e}")))?;
        Ok(WorkflowGraph { nodes, edges })
    }

    /// The nodes as the JSON array stored in `workflows.nodes`.
    pub fn nodes_json(&self) -> Value {
        serde_json::to_value(&self.nodes).unwrap_or(Value::Null)
    }

    /// The edges as the JSON array stored in `workflows.edges`.
    pub fn edges_json(&self) -> Value {
        serde_json::to_value(&self.edges).unwrap_or(Value::Null)
    }

    /// Checks that node ids are non-empty and unique, that every edge names
    /// two existing, distinct nodes, that no edge is repeated, and that the
    /// graph has no cycle. The error says what is wrong.
    pub fn validate(&self) -> Result<()> {
        self.plan().map(drop)
    }

    /// Validates the graph and computes, per node in order, the number of
    /// upstream nodes and the ids of the downstream nodes.
    pub(crate) fn plan(&self) -> Result<Vec<NodePlan<'_>>> {
        let mut index = HashMap::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            if node.id.is_empty() {
                return Err(invalid(format!("node #{i} has an empty id")));
            }
            if index.insert(node.id.as_str(), i).is_some() {
                return Err(invalid(format!("duplicate node id {:?}", node.id)));
            }
            if let Some(reason) = node.config_error() {
                return Err(invalid(reason));
            }
        }
        let mut plans: Vec<NodePlan<'_>> = self
            .nodes
            .iter()
            .map(|node| NodePlan {
                node,
                upstream: 0,
                downstream: Vec::new(),
            })
            .collect();
        let mut seen = HashSet::with_capacity(self.edges.len());
        for edge in &self.edges {
            let lookup = |id: &str, end: &str| {
                index.get(id).copied().ok_or_else(|| {
                    invalid(format!(
                        "edge {:?} -> {:?} names unknown {end} node {id:?}",
                        edge.source, edge.target
                    ))
                })
            };
            let source = lookup(&edge.source, "source")?;
            let target = lookup(&edge.target, "target")?;
            if source == target {
                return Err(invalid(format!("edge {:?} -> itself", edge.source)));
            }
            if !seen.insert((source, target)) {
                return Err(invalid(format!(
                    "duplicate edge {:?} -> {:?}",
                    edge.source, edge.target
                )));
            }
            plans[target].upstream += 1;
            plans[source].downstream.push(edge.target.clone());
        }
        check_acyclic(&plans, &index)?;
        Ok(plans)
    }
}

/// Kahn's algorithm: every node must be reachable by peeling off nodes
/// without upstream edges.
fn check_acyclic(plans: &[NodePlan<'_>], index: &HashMap<&str, usize>) -> Result<()> {
    let mut remaining: Vec<i32> = plans.iter().map(|p| p.upstream).collect();
    let mut ready: Vec<usize> = (0..plans.len()).filter(|&i| remaining[i] == 0).collect();
    let mut visited = 0;
    while let Some(i) = ready.pop() {
        visited += 1;
        for target in &plans[i].downstream {
            if let Some(&t) = index.get(target.as_str()) {
                remaining[t] -= 1;
                if remaining[t] == 0 {
                    ready.push(t);
                }
            }
        }
    }
    if visited == plans.len() {
        return Ok(());
    }
    let on_cycle: Vec<&str> = plans
        .iter()
        .zip(&remaining)
        .filter(|(_, r)| **r > 0)
        .map(|(p, _)| p.node.id.as_str())
        .collect();
    Err(invalid(format!(
        "the edges form a cycle through {}",
        on_cycle.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(nodes: &[&str], edges: &[(&str, &str)]) -> WorkflowGraph {
        WorkflowGraph {
            nodes: nodes.iter().map(|id| Node::new(*id, "t")).collect(),
            edges: edges.iter().map(|(s, t)| Edge::new(*s, *t)).collect(),
        }
    }

    fn reason(g: &WorkflowGraph) -> String {
        match g.validate() {
            Err(Error::InvalidGraph { reason }) => reason,
            other => panic!("expected InvalidGraph, got {other:?}"),
        }
    }

    #[test]
    fn plans_count_upstream_and_list_downstream() {
        let g = graph(&["a", "b", "c"], &[("a", "c"), ("b", "c")]);
        let plan = g.plan().unwrap();
        assert_eq!(plan[2].upstream, 2);
        assert_eq!(plan[0].downstream, ["c"]);
        assert_eq!(plan[0].upstream, 0);
    }

    #[test]
    fn invalid_graphs_say_what_is_wrong() {
        assert!(reason(&graph(&["a", "a"], &[])).contains("duplicate node id \"a\""));
        assert!(reason(&graph(&["a"], &[("a", "x")])).contains("unknown target node \"x\""));
        assert!(reason(&graph(&["a"], &[("y", "a")])).contains("unknown source node \"y\""));
        assert!(reason(&graph(&["a"], &[("a", "a")])).contains("itself"));
        assert!(reason(&graph(&["", "b"], &[])).contains("empty id"));
        assert!(reason(&graph(&["a", "b"], &[("a", "b"), ("a", "b")])).contains("duplicate edge"));
        let cycle = reason(&graph(
            &["a", "b", "c"],
            &[("a", "b"), ("b", "c"), ("c", "b")],
        ));
        assert!(cycle.contains("cycle through b, c"), "{cycle}");
    }

    #[test]
    fn json_round_trip_uses_type_and_source_target() {
        let g = graph(&["a", "b"], &[("a", "b")]);
        assert_eq!(g.nodes_json()[0]["type"], "t");
        assert_eq!(g.edges_json()[0]["source"], "a");
        assert_eq!(
            WorkflowGraph::from_json(&g.nodes_json(), &g.edges_json()).unwrap(),
            g
        );
        let bad = WorkflowGraph::from_json(&serde_json::json!([{"id": 1}]), &Value::Null);
        assert!(matches!(bad, Err(Error::InvalidGraph { .. })));
    }
}
