//! The operator's view behind `db-ops` (feature `cli`): resolving the ids
//! people type (short ids, workflow names, statuses), the reads the engine
//! does not have (an execution's edges, running steps by queue, stuck work),
//! and the text drawing of a step table and of an execution's graph.
//!
//! Guide: `docs/admin.md`, "db-ops".

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz, Uuid as SqlUuid};
use serde::Serialize;
use uuid::Uuid;

use crate::engine::{self, ExecutionFilter};
use crate::enums::{ExecutionStatus, StepStatus};
use crate::error::{Error, Result};
use crate::models::{Execution, ExecutionStep};
use crate::schema::workflows;

/// The execution named by a full id or a short id (a unique prefix of at
/// least 8 hex digits).
pub fn resolve_execution(conn: &mut PgConnection, id: &str) -> Result<Execution> {
    engine::find_execution_by_short_id(conn, id)
}

/// The step named by a full id or a short id.
pub fn resolve_step(conn: &mut PgConnection, id: &str) -> Result<ExecutionStep> {
    engine::find_step_by_short_id(conn, id)
}

/// Narrows `filter` to a workflow given as an id or short id, else as a
/// name (every version of that name); [`Error::NotFound`] when nothing
/// matches.
pub fn filter_by_workflow(
    conn: &mut PgConnection,
    filter: &mut ExecutionFilter,
    id_or_name: &str,
) -> Result<()> {
    match engine::find_workflow_by_short_id(conn, id_or_name) {
        Ok(wf) => {
            filter.workflow_id = Some(wf.id);
            return Ok(());
        }
        Err(Error::NotFound { .. } | Error::InvalidId { .. }) => {}
        Err(e) => return Err(e),
    }
    let named: bool = diesel::select(diesel::dsl::exists(
        workflows::table.filter(workflows::name.eq(id_or_name)),
    ))
    .get_result(conn)?;
    if !named {
        return Err(Error::NotFound {
            entity: "workflow",
            id: id_or_name.to_owned(),
        });
    }
    filter.workflow_name = Some(id_or_name.to_owned());
    Ok(())
}

/// Parses an execution status by its name (`running`, `failed`, ...).
pub fn parse_execution_status(name: &str) -> std::result::Result<ExecutionStatus, String> {
    ExecutionStatus::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = ExecutionStatus::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown status {name:?} (one of {})", names.join(", "))
        })
}

/// Names of these workflows by id (one query).
pub fn workflow_names(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<HashMap<Uuid, String>> {
    Ok(workflows::table
        .filter(workflows::id.eq_any(ids))
        .select((workflows::id, workflows::name))
        .load::<(Uuid, String)>(conn)?
        .into_iter()
        .collect())
}

/// One edge between two steps of an execution (by node id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, QueryableByName, Serialize)]
pub struct StepEdge {
    /// The upstream node.
    #[diesel(sql_type = Text)]
    pub source: String,
    /// The downstream node.
    #[diesel(sql_type = Text)]
    pub target: String,
}

/// The edges of an execution as its steps record them (`downstream`,
/// fixed when the steps were created), sorted.
pub fn execution_edges(conn: &mut PgConnection, execution_id: Uuid) -> QueryResult<Vec<StepEdge>> {
    diesel::sql_query(
        "SELECT s.node_id AS source, d.target FROM execution_steps s \
           CROSS JOIN LATERAL unnest(s.downstream) AS d(target) \
          WHERE s.execution_id = $1 AND d.target IS NOT NULL ORDER BY 1, 2",
    )
    .bind::<SqlUuid, _>(execution_id)
    .load(conn)
}

#[derive(QueryableByName)]
struct QueueCount {
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = BigInt)]
    steps: i64,
}

/// Running steps by queue, largest first (reads the running steps only).
pub fn running_steps_by_queue(conn: &mut PgConnection) -> QueryResult<Vec<(String, i64)>> {
    Ok(diesel::sql_query(
        "SELECT workflow_db_step_queue(s.queue, s.node_type) AS queue, count(*) AS steps \
           FROM execution_steps s WHERE s.status = 'running' GROUP BY 1 ORDER BY steps DESC, queue",
    )
    .load::<QueueCount>(conn)?
    .into_iter()
    .map(|r| (r.queue, r.steps))
    .collect())
}

#[derive(QueryableByName)]
struct StatusCount {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Executions by status, every status listed, each count exact up to
/// `cap` and `cap + 1` beyond (each status's count stops at `cap + 1`
/// rows of its index, so this stays cheap on any table size).
pub fn count_by_status_capped(
    conn: &mut PgConnection,
    cap: i64,
) -> QueryResult<Vec<(ExecutionStatus, i64)>> {
    let rows: Vec<StatusCount> = diesel::sql_query(
        "SELECT s.status::text AS status, \
                (SELECT count(*) FROM (SELECT 1 FROM executions e \
                                        WHERE e.status = s.status LIMIT $1 + 1) x) AS n \
           FROM unnest(enum_range(NULL::execution_status)) AS s(status)",
    )
    .bind::<BigInt, _>(cap)
    .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(|r| ExecutionStatus::from_label(&r.status).map(|status| (status, r.n)))
        .collect())
}

/// Executions that finished in a time bucket with one status.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName, Serialize)]
pub struct Finished {
    /// Buckets back from now: 0 is the most recent `bucket_seconds`.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub bucket: i32,
    /// The final status.
    #[diesel(sql_type = Text)]
    pub status: String,
    /// How many.
    #[diesel(sql_type = BigInt)]
    pub executions: i64,
}

/// Executions that reached a final status in the last `window_seconds`,
/// by bucket of `bucket_seconds` (0 = the newest) and status (reads the
/// index of final executions by completion time, that window only).
pub fn finished_recently(
    conn: &mut PgConnection,
    window_seconds: i32,
    bucket_seconds: i32,
) -> QueryResult<Vec<Finished>> {
    diesel::sql_query(
        "SELECT floor(extract(epoch FROM statement_timestamp() - e.completed_at) / $2)::int4 AS bucket, \
                e.status::text AS status, count(*) AS executions \
           FROM executions e \
          WHERE e.status IN ('completed', 'failed', 'cancelled') \
            AND e.completed_at > statement_timestamp() - make_interval(secs => $1) \
          GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind::<diesel::sql_types::Integer, _>(window_seconds)
    .bind::<diesel::sql_types::Integer, _>(bucket_seconds.max(1))
    .load(conn)
}

/// A running step whose lease expired and that nothing reclaimed yet.
#[derive(Debug, Clone, PartialEq, QueryableByName, Serialize)]
pub struct ExpiredLease {
    /// The step.
    #[diesel(sql_type = SqlUuid)]
    pub step_id: Uuid,
    /// Its execution.
    #[diesel(sql_type = SqlUuid)]
    pub execution_id: Uuid,
    /// Its node id.
    #[diesel(sql_type = Text)]
    pub node_id: String,
    /// The worker that held the lease.
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    pub worker: Option<String>,
    /// When the lease expired.
    #[diesel(sql_type = Timestamptz)]
    pub locked_until: DateTime<Utc>,
}

/// A running execution none of whose steps is running or pending with its
/// upstream done: nothing can move it forward (every pending step waits on
/// upstream steps that will never complete, or none is left).
#[derive(Debug, Clone, PartialEq, QueryableByName, Serialize)]
pub struct StalledExecution {
    /// The execution.
    #[diesel(sql_type = SqlUuid)]
    pub execution_id: Uuid,
    /// Its pending steps (all blocked on their upstream).
    #[diesel(sql_type = BigInt)]
    pub pending_steps: i64,
}

/// Stuck work, as [`stuck`] finds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stuck {
    /// Running steps whose lease expired, not yet reclaimed.
    pub expired_leases: Vec<ExpiredLease>,
    /// Running executions with no runnable step.
    pub stalled_executions: Vec<StalledExecution>,
}

/// Stuck work, at most `limit` of each kind: running steps whose lease
/// expired (a reclaim by the maintenance loop has not happened yet) and
/// running executions with no step running and none pending with its
/// upstream done.
pub fn stuck(conn: &mut PgConnection, limit: i64) -> QueryResult<Stuck> {
    let expired_leases = diesel::sql_query(
        "SELECT s.id AS step_id, s.execution_id, s.node_id, s.locked_by AS worker, s.locked_until \
           FROM execution_steps s \
          WHERE s.status = 'running' AND s.locked_until < statement_timestamp() \
          ORDER BY s.locked_until, s.id LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    let stalled_executions = diesel::sql_query(
        "SELECT e.id AS execution_id, \
                (SELECT count(*) FROM execution_steps p \
                  WHERE p.execution_id = e.id AND p.status = 'pending') AS pending_steps \
           FROM executions e \
          WHERE e.status = 'running' \
            AND NOT EXISTS (SELECT 1 FROM execution_steps s WHERE s.execution_id = e.id \
                              AND (s.status = 'running' \
                                   OR (s.status = 'pending' AND s.upstream_pending = 0))) \
          ORDER BY e.id LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    Ok(Stuck {
        expired_leases,
        stalled_executions,
    })
}

/// Whether to colour output: stdout is a terminal and `NO_COLOR` is unset
/// or empty.
pub fn use_colour(stdout_is_terminal: bool) -> bool {
    stdout_is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A step status as text, coloured (ANSI) when `colour` is set.
pub fn paint(status: &str, colour: bool) -> String {
    if !colour {
        return status.to_owned();
    }
    let code = match status {
        "completed" => "32",
        "failed" => "31",
        "running" => "33",
        "skipped" | "cancelled" => "90",
        "paused" => "35",
        _ => "36",
    };
    format!("\x1b[{code}m{status}\x1b[0m")
}

/// `text` on one line (line breaks as spaces), cut to `max` characters
/// (the last one `…` when cut).
pub fn one_line(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut s: String = one_line.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// A time as the operator's view prints it (UTC, to the second), `-` when unset.
pub fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

/// Longest error shown in a table cell.
pub const ERROR_WIDTH: usize = 60;

/// The steps as a text table: node, type, queue, status, attempt, retries,
/// started, completed, error (truncated to [`ERROR_WIDTH`], one line).
pub fn step_table(steps: &[ExecutionStep]) -> Vec<String> {
    let header = [
        "NODE",
        "TYPE",
        "QUEUE",
        "STATUS",
        "ATTEMPT",
        "RETRIES",
        "STARTED",
        "COMPLETED",
        "ERROR",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 9]> = steps
        .iter()
        .map(|s| {
            [
                s.node_id.clone(),
                s.node_type.clone().unwrap_or_else(|| "-".into()),
                s.queue_name().to_owned(),
                s.status.as_str().to_owned(),
                s.attempt.to_string(),
                format!("{}/{}", s.retry_count, s.max_retries),
                time(s.started_at),
                time(s.completed_at),
                s.error
                    .as_deref()
                    .map_or_else(String::new, |e| one_line(e, ERROR_WIDTH)),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect()
}

/// The node ids in layers, in topological order: a node's layer is the
/// longest path to it from a root. Nodes on a cycle (which a validated
/// graph has not) end up in a last layer.
pub fn layers(nodes: &[&str], edges: &[StepEdge]) -> Vec<Vec<String>> {
    let mut indegree: BTreeMap<&str, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for e in edges {
        if indegree.contains_key(e.source.as_str()) {
            if let Some(d) = indegree.get_mut(e.target.as_str()) {
                *d += 1;
            }
        }
    }
    let mut level: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ready: Vec<&str> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(n, _)| *n)
        .collect();
    while let Some(node) = ready.pop() {
        let here = *level.entry(node).or_insert(0);
        for e in edges.iter().filter(|e| e.source == node) {
            let Some(d) = indegree.get_mut(e.target.as_str()) else {
                continue;
            };
            let target = e.target.as_str();
            let l = level.entry(target).or_insert(0);
            *l = (*l).max(here + 1);
            *d -= 1;
            if *d == 0 {
                ready.push(target);
            }
        }
    }
    let depth = level.values().copied().max().map_or(0, |m| m + 1);
    let mut out = vec![Vec::new(); depth];
    for node in nodes {
        if indegree.get(node).is_some_and(|d| *d == 0) {
            out[level[node]].push((*node).to_owned());
        }
    }
    let cyclic: Vec<String> = nodes
        .iter()
        .filter(|n| indegree.get(*n).is_some_and(|d| *d > 0))
        .map(|n| (*n).to_owned())
        .collect();
    if !cyclic.is_empty() {
        out.push(cyclic);
    }
    for layer in &mut out {
        layer.sort();
    }
    out
}

/// The execution's graph drawn as text: one line per node, grouped by
/// layer in topological order, with its status and its outgoing edges:
///
/// ```text
/// layer 0  fetch [completed] -> store, audit
/// layer 1  audit [failed]
///          store [skipped]
/// ```
pub fn draw_graph(steps: &[ExecutionStep], edges: &[StepEdge], colour: bool) -> Vec<String> {
    let status: HashMap<&str, StepStatus> = steps
        .iter()
        .map(|s| (s.node_id.as_str(), s.status))
        .collect();
    let nodes: Vec<&str> = steps.iter().map(|s| s.node_id.as_str()).collect();
    let layers = layers(&nodes, edges);
    let width = nodes.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let status_width = steps
        .iter()
        .map(|s| s.status.as_str().len())
        .max()
        .unwrap_or(0);
    let mut lines = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        for (j, node) in layer.iter().enumerate() {
            let label = if j == 0 {
                format!("layer {i:<2}")
            } else {
                " ".repeat(8)
            };
            let st = status.get(node.as_str()).map_or("?", |s| s.as_str());
            let pad = " ".repeat(status_width - st.len());
            let targets: Vec<&str> = edges
                .iter()
                .filter(|e| &e.source == node)
                .map(|e| e.target.as_str())
                .collect();
            let arrow = if targets.is_empty() {
                String::new()
            } else {
                format!(" -> {}", targets.join(", "))
            };
            let line = format!("{label} {node:<width$} [{}]{pad}{arrow}", paint(st, colour));
            lines.push(line.trim_end().to_owned());
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(s: &str, t: &str) -> StepEdge {
        StepEdge {
            source: s.into(),
            target: t.into(),
        }
    }

    #[test]
    fn layers_follow_the_longest_path() {
        let edges = [
            edge("a", "b"),
            edge("b", "c"),
            edge("a", "c"),
            edge("a", "d"),
        ];
        let l = layers(&["a", "b", "c", "d"], &edges);
        assert_eq!(l, vec![vec!["a"], vec!["b", "d"], vec!["c"]]);
    }

    #[test]
    fn paint_is_plain_without_colour() {
        assert_eq!(paint("failed", false), "failed");
        assert!(paint("failed", true).contains("\x1b[31m"));
        assert_eq!(one_line("ab\ncdef", 4), "ab …");
    }
}
