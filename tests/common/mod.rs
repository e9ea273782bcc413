//! Helpers shared by the integration tests: what "the database is unchanged"
//! means (admin tests) and small graphs and executions (engine tests).
#![allow(dead_code)]

#[cfg(feature = "cli")]
pub mod browser;
pub mod session;

use std::process::Command;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use std::time::Duration;
use workflow_db::testing::TestDatabase;
use workflow_db::{Edge, NewExecution, NewWorkflow, Node, Workflow, WorkflowGraph};

/// The password used in URLs whose output must never show it (trust auth ignores it).
pub const PASSWORD: &str = "s3cretPRODpw";

#[derive(QueryableByName, Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    #[diesel(sql_type = Text)]
    pub table: String,
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
}

/// Everything a refused command must leave as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Row count of every table of `public`, bookkeeping included.
    pub rows: Vec<TableCount>,
    /// `pg_dump --schema-only`.
    pub schema: String,
    /// `pg_dump --data-only`.
    pub data: String,
}

pub fn row_counts(conn: &mut PgConnection) -> Vec<TableCount> {
    diesel::sql_query(
        "SELECT tablename::text AS table, \
         (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM public.%I', tablename), \
          false, true, '')))[1]::text::bigint AS rows \
         FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    .load(conn)
    .unwrap()
}

/// `pg_dump` of the database with the given mode flag, minus the random
/// `\restrict` keys of recent pg_dump versions.
pub fn pg_dump(db: &TestDatabase, mode: &str) -> String {
    let out = Command::new("pg_dump")
        .args([mode, "--dbname", db.url().expose()])
        .output()
        .expect("pg_dump must be installed (postgresql-client)");
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn snapshot(db: &TestDatabase) -> Snapshot {
    Snapshot {
        rows: row_counts(&mut db.connect()),
        schema: pg_dump(db, "--schema-only"),
        data: pg_dump(db, "--data-only"),
    }
}

/// The test database's URL with [`PASSWORD`] in it, and optionally another host and user.
pub fn url_with(db: &TestDatabase, host: Option<&str>, user: Option<&str>) -> String {
    let mut url = url::Url::parse(db.url().expose()).unwrap();
    if let Some(host) = host {
        url.set_host(Some(host)).unwrap();
    }
    if let Some(user) = user {
        url.set_username(user).unwrap();
    }
    url.set_password(Some(PASSWORD)).unwrap();
    url.to_string()
}

/// Seeds the test database with the embedded seeds (so that emptying shows).
pub fn seeded() -> TestDatabase {
    let db = TestDatabase::new();
    workflow_db::seed::seed(&mut db.connect(), &workflow_db::seed::embedded()).unwrap();
    db
}

pub fn stamp(db: &TestDatabase) -> Option<String> {
    workflow_db::migrate::environment_stamp(&mut db.connect()).unwrap()
}

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
