//! Declarative demo and test data (`seeds/*.json`), loaded idempotently.
//!
//! Each seed file is a JSON object with up to three arrays, `workflows`,
//! `executions` and `execution_steps`, whose objects carry fixed ids and the
//! columns to set (columns left out take their database default). The files
//! in the crate's `seeds/` folder are compiled in ([`embedded`]), so `db-seed`
//! works from anywhere; [`from_dir`] reads another folder.
//!
//! Loading only ever inserts what is missing (`INSERT .. ON CONFLICT (id) DO
//! NOTHING`): it never updates or deletes, so a second run changes nothing,
//! not even an `updated_at`, and seeding is allowed in every environment.
//! All files are parsed and checked before anything is written, and the
//! inserts run in one transaction: a bad file writes nothing.
//!
//! ```no_run
//! # fn demo(conn: &mut diesel::PgConnection) -> workflow_db::Result<()> {
//! let seeds = workflow_db::seed::SeedSet::parse(&workflow_db::seed::embedded())?;
//! let report = seeds.apply(conn)?;
//! println!("{report}");
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::enums::{ExecutionStatus, StepStatus};
use crate::error::{Error, Result};
use crate::schema::{execution_steps, executions, workflows};

/// One seed file: its name (for error messages) and its JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSource {
    /// The file's name, or its path when read from a folder.
    pub name: String,
    /// The JSON text.
    pub json: Cow<'static, str>,
}

/// The seed files compiled into the crate from `seeds/`, in name order.
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "seeds/01_order_fulfilment.json",
        include_str!("../seeds/01_order_fulfilment.json"),
    ),
    (
        "seeds/02_document_review.json",
        include_str!("../seeds/02_document_review.json"),
    ),
];

/// The seed files compiled into the crate (see [`EMBEDDED`]).
pub fn embedded() -> Vec<SeedSource> {
    EMBEDDED
        .iter()
        .map(|(name, json)| SeedSource {
            name: (*name).to_owned(),
            json: Cow::Borrowed(json),
        })
        .collect()
}

/// Every `*.json` file of `dir`, in name order. A folder without one is an error.
pub fn from_dir(dir: &Path) -> Result<Vec<SeedSource>> {
    let invalid = |message: String| Error::InvalidSeed {
        file: dir.display().to_string(),
        message,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| invalid(format!("cannot read: {e}")))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| invalid(format!("cannot read: {e}")))?
            .path();
        if path.extension().is_some_and(|ext| ext == "json") && path.is_file() {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Err(invalid("no *.json seed files in this folder".into()));
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let name = path.display().to_string();
            match std::fs::read_to_string(&path) {
                Ok(json) => Ok(SeedSource {
                    name,
                    json: Cow::Owned(json),
                }),
                Err(e) => Err(Error::InvalidSeed {
                    file: name,
                    message: format!("cannot read: {e}"),
                }),
            }
        })
        .collect()
}

/// The shape of one seed file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    #[serde(default)]
    workflows: Vec<SeedWorkflow>,
    #[serde(default)]
    executions: Vec<SeedExecution>,
    #[serde(default)]
    execution_steps: Vec<SeedStep>,
}

/// A workflow row; columns left out take their database default.
#[derive(Debug, Clone, Deserialize, Insertable)]
#[serde(deny_unknown_fields)]
#[diesel(table_name = workflows)]
struct SeedWorkflow {
    id: Uuid,
    name: String,
    description: Option<String>,
    nodes: Value,
    edges: Value,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

/// An execution row; columns left out take their database default.
#[derive(Debug, Clone, Deserialize, Insertable)]
#[serde(deny_unknown_fields)]
#[diesel(table_name = executions)]
struct SeedExecution {
    id: Uuid,
    workflow_id: Uuid,
    status: ExecutionStatus,
    user_id: Option<String>,
    data: Option<Value>,
    error: Option<String>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

/// An execution step row; columns left out take their database default.
#[derive(Debug, Clone, Deserialize, Insertable)]
#[serde(deny_unknown_fields)]
#[diesel(table_name = execution_steps)]
struct SeedStep {
    id: Uuid,
    execution_id: Uuid,
    node_id: String,
    status: StepStatus,
    input: Option<Value>,
    output: Option<Value>,
    validation: Option<Value>,
    retry_count: Option<i32>,
    error: Option<String>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

/// Parsed and checked seed data, ready to insert.
#[derive(Debug, Default)]
pub struct SeedSet {
    workflows: Vec<SeedWorkflow>,
    executions: Vec<SeedExecution>,
    execution_steps: Vec<SeedStep>,
}

/// How many rows of one table a seeding run inserted and found already present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TableSeedCount {
    /// The table.
    pub table: &'static str,
    /// Rows inserted by this run.
    pub inserted: usize,
    /// Rows of the seeds whose id was already present (left untouched).
    pub present: usize,
}

/// What a seeding run did, per table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SeedReport {
    /// One entry per table, in insertion order.
    pub tables: Vec<TableSeedCount>,
}

impl SeedReport {
    /// Rows inserted over all tables.
    pub fn inserted(&self) -> usize {
        self.tables.iter().map(|t| t.inserted).sum()
    }
}

impl fmt::Display for SeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            writeln!(
                f,
                "{:<16} {:>5} inserted {:>5} already present",
                t.table, t.inserted, t.present
            )?;
        }
        Ok(())
    }
}

/// Where a row was defined, for error messages.
struct Origin<'a> {
    file: &'a str,
    path: String,
}

impl Origin<'_> {
    fn error(&self, field: &str, message: impl fmt::Display) -> Error {
        Error::InvalidSeed {
            file: self.file.to_owned(),
            message: format!("{}.{field}: {message}", self.path),
        }
    }
}

/// The node ids of a workflow's `nodes`, checking the graph's shape.
fn node_ids(w: &SeedWorkflow, origin: &Origin<'_>) -> Result<BTreeSet<String>> {
    let Some(nodes) = w.nodes.as_array() else {
        return Err(origin.error("nodes", "must be an array of node objects"));
    };
    let mut ids = BTreeSet::new();
    for (i, node) in nodes.iter().enumerate() {
        match node.get("id").and_then(Value::as_str) {
            Some(id) if ids.insert(id.to_owned()) => {}
            Some(id) => {
                return Err(origin.error(
                    &format!("nodes[{i}].id"),
                    format!("duplicate node id {id:?}"),
                ));
            }
            None => return Err(origin.error(&format!("nodes[{i}].id"), "missing or not a string")),
        }
    }
    let Some(edges) = w.edges.as_array() else {
        return Err(origin.error("edges", "must be an array of {source, target} objects"));
    };
    for (i, edge) in edges.iter().enumerate() {
        for end in ["source", "target"] {
            match edge.get(end).and_then(Value::as_str) {
                Some(id) if ids.contains(id) => {}
                Some(id) => {
                    return Err(origin.error(
                        &format!("edges[{i}].{end}"),
                        format!("no node {id:?} in this workflow"),
                    ));
                }
                None => {
                    return Err(
                        origin.error(&format!("edges[{i}].{end}"), "missing or not a string")
                    );
                }
            }
        }
    }
    Ok(ids)
}

impl SeedSet {
    /// Parses and checks `sources`: unknown or missing fields, wrong types,
    /// duplicate ids, references to workflows, executions or nodes that the
    /// seeds do not define. The error names the file and the field.
    pub fn parse(sources: &[SeedSource]) -> Result<SeedSet> {
        let mut set = SeedSet::default();
        let mut seen: BTreeMap<Uuid, String> = BTreeMap::new();
        let mut workflow_nodes: BTreeMap<Uuid, BTreeSet<String>> = BTreeMap::new();
        let mut execution_workflow: BTreeMap<Uuid, Uuid> = BTreeMap::new();
        let mut unique = |id: Uuid, origin: &Origin<'_>| -> Result<()> {
            match seen.insert(id, format!("{} {}", origin.file, origin.path)) {
                None => Ok(()),
                Some(first) => Err(origin.error("id", format!("{id} is already used by {first}"))),
            }
        };
        for source in sources {
            let file: SeedFile = parse_file(source)?;
            let at = |table: &str, i: usize| Origin {
                file: &source.name,
                path: format!("{table}[{i}]"),
            };
            for (i, w) in file.workflows.into_iter().enumerate() {
                let origin = at("workflows", i);
                unique(w.id, &origin)?;
                if w.name.trim().is_empty() {
                    return Err(origin.error("name", "must not be empty"));
                }
                workflow_nodes.insert(w.id, node_ids(&w, &origin)?);
                set.workflows.push(w);
            }
            for (i, e) in file.executions.into_iter().enumerate() {
                let origin = at("executions", i);
                unique(e.id, &origin)?;
                if !workflow_nodes.contains_key(&e.workflow_id) {
                    return Err(origin.error(
                        "workflow_id",
                        format!(
                            "no workflow {} in the seeds (define it before its executions)",
                            e.workflow_id
                        ),
                    ));
                }
                execution_workflow.insert(e.id, e.workflow_id);
                set.executions.push(e);
            }
            for (i, s) in file.execution_steps.into_iter().enumerate() {
                let origin = at("execution_steps", i);
                unique(s.id, &origin)?;
                let Some(workflow) = execution_workflow.get(&s.execution_id) else {
                    return Err(origin.error(
                        "execution_id",
                        format!(
                            "no execution {} in the seeds (define it before its steps)",
                            s.execution_id
                        ),
                    ));
                };
                if !workflow_nodes[workflow].contains(&s.node_id) {
                    return Err(origin.error(
                        "node_id",
                        format!("workflow {workflow} has no node {:?}", s.node_id),
                    ));
                }
                if s.retry_count.is_some_and(|n| n < 0) {
                    return Err(origin.error("retry_count", "must not be negative"));
                }
                set.execution_steps.push(s);
            }
        }
        Ok(set)
    }

    /// Inserts the rows whose id is missing, in one transaction, and reports
    /// per table how many were inserted and how many were already present.
    /// Never updates or deletes.
    #[tracing::instrument(skip_all)]
    pub fn apply(&self, conn: &mut PgConnection) -> Result<SeedReport> {
        conn.transaction(|conn| {
            let inserted = diesel::insert_into(workflows::table)
                .values(&self.workflows)
                .on_conflict(workflows::id)
                .do_nothing()
                .execute(conn)?;
            let mut tables = vec![count("workflows", self.workflows.len(), inserted)];
            let inserted = diesel::insert_into(executions::table)
                .values(&self.executions)
                .on_conflict(executions::id)
                .do_nothing()
                .execute(conn)?;
            tables.push(count("executions", self.executions.len(), inserted));
            let inserted = diesel::insert_into(execution_steps::table)
                .values(&self.execution_steps)
                .on_conflict(execution_steps::id)
                .do_nothing()
                .execute(conn)?;
            tables.push(count(
                "execution_steps",
                self.execution_steps.len(),
                inserted,
            ));
            Ok(SeedReport { tables })
        })
    }
}

fn count(table: &'static str, total: usize, inserted: usize) -> TableSeedCount {
    TableSeedCount {
        table,
        inserted,
        present: total.saturating_sub(inserted),
    }
}

fn parse_file(source: &SeedSource) -> Result<SeedFile> {
    let de = &mut serde_json::Deserializer::from_str(&source.json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Error::InvalidSeed {
            file: source.name.clone(),
            message: if path == "." || path.is_empty() {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            },
        }
    })
}

/// Parses `sources` and inserts what is missing (see [`SeedSet`]).
pub fn seed(conn: &mut PgConnection, sources: &[SeedSource]) -> Result<SeedReport> {
    SeedSet::parse(sources)?.apply(conn)
}
