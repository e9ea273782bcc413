//! Node types on steps, typed claims, and the database's "claimable"
//! notifications that wake workers.

mod common;

use std::time::Duration;

use chrono::Utc;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use workflow_db::engine::{self, Backoff, Claimable};
use workflow_db::models::bulk::{self, CopyStep};
use workflow_db::schema::execution_steps;
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Edge, Execution, ExecutionStep, NewExecution, NewExecutionStep, NewWorkflow, Node, StepStatus,
    Workflow, WorkflowGraph,
};

use common::LEASE;

/// A workflow whose nodes have these (id, type) pairs and edges.
fn typed_workflow(
    conn: &mut PgConnection,
    nodes: &[(&str, &str)],
    edges: &[(&str, &str)],
) -> Workflow {
    let graph = WorkflowGraph {
        nodes: nodes.iter().map(|(id, ty)| Node::new(*id, *ty)).collect(),
        edges: edges.iter().map(|(s, t)| Edge::new(*s, *t)).collect(),
    };
    NewWorkflow::from_graph("typed", &graph)
        .create(conn)
        .unwrap()
}

fn start(conn: &mut PgConnection, wf: &Workflow) -> Execution {
    engine::start_execution(conn, &NewExecution::new(wf.id))
        .unwrap()
        .execution
}

fn step(conn: &mut PgConnection, execution: &Execution, node: &str) -> ExecutionStep {
    execution_steps::table
        .filter(execution_steps::execution_id.eq(execution.id))
        .filter(execution_steps::node_id.eq(node))
        .select(ExecutionStep::as_select())
        .first(conn)
        .unwrap()
}

fn types(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// A connection listening on the claimable channel.
fn listener(db: &TestDatabase) -> PgConnection {
    let mut conn = db.connect();
    conn.batch_execute("LISTEN workflow_db_claimable").unwrap();
    conn
}

/// Every claimable notification committed so far (a `SELECT 1` first, so
/// that libpq has read what the server sent).
fn received(conn: &mut PgConnection) -> Vec<Claimable> {
    conn.batch_execute("SELECT 1").unwrap();
    let mut out: Vec<Claimable> = conn
        .notifications_iter()
        .map(|n| n.unwrap())
        .filter(|n| n.channel == engine::CLAIMABLE_CHANNEL)
        .map(|n| serde_json::from_str(&n.payload).expect("a claimable payload"))
        .collect();
    out.sort_by(|a, b| a.queue.cmp(&b.queue));
    out
}

fn summary(list: &[Claimable]) -> Vec<(Option<&str>, u32)> {
    list.iter()
        .map(|c| (Some(c.queue.as_str()), c.steps))
        .collect()
}

#[test]
fn steps_carry_their_node_type_whoever_inserts_them() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(
        &mut conn,
        &[("fetch", "http"), ("store", "sql")],
        &[("fetch", "store")],
    );
    let started = start(&mut conn, &wf);
    assert_eq!(
        step(&mut conn, &started, "fetch").node_type.as_deref(),
        Some("http")
    );
    assert_eq!(
        step(&mut conn, &started, "store").node_type.as_deref(),
        Some("sql")
    );

    // Inserted by the model without a type, by COPY, and by plain SQL: the
    // database copies the type from the workflow's graph.
    let execution = NewExecution::new(wf.id).create(&mut conn).unwrap();
    NewExecutionStep::new(execution.id, "fetch")
        .create(&mut conn)
        .unwrap();
    bulk::copy_steps(
        &mut conn,
        [CopyStep::pending(execution.id, "store".to_owned())],
    )
    .unwrap();
    conn.batch_execute(&format!(
        "INSERT INTO execution_steps (id, execution_id, node_id) VALUES (gen_random_uuid(), '{}', 'ghost')",
        execution.id
    ))
    .unwrap();
    assert_eq!(
        step(&mut conn, &execution, "fetch").node_type.as_deref(),
        Some("http")
    );
    assert_eq!(
        step(&mut conn, &execution, "store").node_type.as_deref(),
        Some("sql")
    );
    // A node the graph does not have: no type, and typed claims never take it.
    assert_eq!(step(&mut conn, &execution, "ghost").node_type, None);

    // A type given at insert is kept.
    let other = NewExecution::new(wf.id).create(&mut conn).unwrap();
    NewExecutionStep {
        node_type: Some("custom".into()),
        ..NewExecutionStep::new(other.id, "fetch")
    }
    .create(&mut conn)
    .unwrap();
    assert_eq!(
        step(&mut conn, &other, "fetch").node_type.as_deref(),
        Some("custom")
    );
}

#[test]
fn a_typed_claim_takes_only_the_types_it_serves_in_claim_order() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(
        &mut conn,
        &[("a", "http"), ("b", "sql"), ("c", "llm"), ("d", "http")],
        &[],
    );
    let executions: Vec<Execution> = (0..3).map(|_| start(&mut conn, &wf)).collect();

    assert!(
        engine::claim_from(&mut conn, "w", &[], 10, LEASE)
            .unwrap()
            .is_empty()
    );
    assert!(
        engine::claim_from(&mut conn, "w", &types(&["email"]), 10, LEASE)
            .unwrap()
            .is_empty()
    );

    let http = engine::claim_from(&mut conn, "w", &types(&["http"]), 100, LEASE).unwrap();
    assert_eq!(http.len(), 6, "a and d of three executions");
    assert!(http.iter().all(|s| s.node_type.as_deref() == Some("http")));
    assert!(http.iter().all(|s| s.status == StepStatus::Running));

    // Two types: at most `limit`, oldest run_after first across both.
    let two = engine::claim_from(&mut conn, "w", &types(&["sql", "llm"]), 4, LEASE).unwrap();
    assert_eq!(two.len(), 4);
    let rest = engine::claim_from(&mut conn, "w", &types(&["sql", "llm"]), 100, LEASE).unwrap();
    assert_eq!(rest.len(), 2);
    let first_rest = rest.iter().map(|s| (s.run_after, s.id)).min().unwrap();
    assert!(
        two.iter().all(|s| (s.run_after, s.id) < first_rest),
        "the batch of 4 took the first steps in claim order"
    );
    assert!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .is_empty()
    );
    drop(executions);
}

#[test]
fn a_queue_claim_reads_the_claimable_index_and_skips_other_queues() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let plan: String = diesel::sql_query(
        "EXPLAIN (COSTS OFF) SELECT c.id FROM unnest(ARRAY['http']) AS t(queue) \
         CROSS JOIN LATERAL (SELECT s.id, s.run_after FROM execution_steps s \
           WHERE workflow_db_step_queue(s.queue, s.node_type) = t.queue AND s.status = 'pending' \
             AND s.upstream_pending = 0 AND NOT s.parked AND NOT s.throttled \
             AND s.run_after <= statement_timestamp() \
           ORDER BY s.priority DESC, s.run_after, s.id LIMIT 10) c",
    )
    .load::<Plan>(&mut conn)
    .unwrap()
    .into_iter()
    .map(|p| p.line)
    .collect::<Vec<_>>()
    .join("\n");
    assert!(
        plan.contains("execution_steps_claimable_idx") && !plan.contains("Sort"),
        "plan:\n{plan}"
    );
}

#[derive(QueryableByName)]
struct Plan {
    #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
    line: String,
}

#[test]
fn the_database_notifies_claimable_work_per_node_type() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let mut listen = listener(&db);
    // a -> (b, c) -> d, with c and d of one type.
    let wf = typed_workflow(
        &mut conn,
        &[("a", "http"), ("b", "sql"), ("c", "llm"), ("d", "llm")],
        &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    );

    // A start: only `a` is claimable.
    let execution = start(&mut conn, &wf);
    let got = received(&mut listen);
    assert_eq!(summary(&got), [(Some("http"), 1)]);
    assert!(got[0].run_after <= Utc::now());

    // A claim makes nothing claimable; completing `a` makes b and c claimable.
    let a = engine::claim_from(&mut conn, "w", &types(&["http"]), 1, LEASE).unwrap();
    assert!(received(&mut listen).is_empty(), "a claim wakes nobody");
    engine::complete_step(&mut conn, &a[0].lease().unwrap(), None).unwrap();
    assert_eq!(
        summary(&received(&mut listen)),
        [(Some("llm"), 1), (Some("sql"), 1)]
    );

    // A failure with retries left: claimable again, at the backoff's end.
    conn.batch_execute(&format!(
        "UPDATE execution_steps SET max_retries = 3 WHERE execution_id = '{}'",
        execution.id
    ))
    .unwrap();
    let b = engine::claim_from(&mut conn, "w", &types(&["sql"]), 1, LEASE).unwrap();
    let before = Utc::now();
    let backoff = Backoff {
        base: Duration::from_secs(60),
        max: Duration::from_secs(60),
    };
    engine::fail_step(&mut conn, &b[0].lease().unwrap(), "boom", &backoff).unwrap();
    let got = received(&mut listen);
    assert_eq!(summary(&got), [(Some("sql"), 1)]);
    assert!(
        got[0].run_after >= before + chrono::Duration::seconds(59),
        "{got:?}"
    );

    // Paused, nothing is claimable; resumed, the ready steps are (c now; b at its retry time).
    engine::pause(&mut conn, execution.id).unwrap();
    assert!(received(&mut listen).is_empty());
    engine::resume(&mut conn, execution.id).unwrap();
    assert_eq!(
        summary(&received(&mut listen)),
        [(Some("llm"), 1), (Some("sql"), 1)]
    );

    // A release hands a step back: claimable at once.
    let c = engine::claim_from(&mut conn, "w", &types(&["llm"]), 1, LEASE).unwrap();
    assert_eq!(c[0].node_id, "c");
    engine::release_steps(&mut conn, &[c[0].lease().unwrap()]).unwrap();
    assert_eq!(summary(&received(&mut listen)), [(Some("llm"), 1)]);

    // A rolled-back transaction notifies nothing.
    conn.transaction::<(), diesel::result::Error, _>(|conn| {
        let c = engine::claim_from(conn, "w", &types(&["llm"]), 1, LEASE)?;
        engine::complete_step(conn, &c[0].lease().unwrap(), None).unwrap();
        Err(diesel::result::Error::RollbackTransaction)
    })
    .unwrap_err();
    assert!(received(&mut listen).is_empty());
}

#[test]
fn many_steps_becoming_claimable_in_one_statement_are_one_notification_per_type() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let mut listen = listener(&db);
    let mut nodes: Vec<(String, &str)> = vec![("root".to_owned(), "http")];
    nodes.extend((0..50).map(|i| (format!("x{i}"), if i % 2 == 0 { "sql" } else { "llm" })));
    let node_refs: Vec<(&str, &str)> = nodes.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let edges: Vec<(&str, &str)> = node_refs[1..].iter().map(|(n, _)| ("root", *n)).collect();
    let wf = typed_workflow(&mut conn, &node_refs, &edges);
    start(&mut conn, &wf);
    received(&mut listen);
    let root = engine::claim_steps(&mut conn, "w", 1, LEASE).unwrap();
    engine::complete_step(&mut conn, &root[0].lease().unwrap(), None).unwrap();
    assert_eq!(
        summary(&received(&mut listen)),
        [(Some("llm"), 25), (Some("sql"), 25)]
    );
}

#[test]
fn next_claimable_at_is_when_an_idle_worker_should_wake() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(&mut conn, &[("a", "http"), ("b", "sql")], &[("a", "b")]);
    let http = types(&["http"]);
    assert_eq!(engine::next_claimable_at(&mut conn, &http).unwrap(), None);

    let execution = start(&mut conn, &wf);
    let now = engine::next_claimable_at(&mut conn, &http)
        .unwrap()
        .expect("a is ready");
    assert!(now <= Utc::now());
    // b waits for a: not claimable by time.
    assert_eq!(
        engine::next_claimable_at(&mut conn, &types(&["sql"])).unwrap(),
        None
    );

    conn.batch_execute(&format!(
        "UPDATE execution_steps SET max_retries = 1 WHERE execution_id = '{}'",
        execution.id
    ))
    .unwrap();
    let a = engine::claim_from(&mut conn, "w", &http, 1, LEASE).unwrap();
    assert_eq!(
        engine::next_claimable_at(&mut conn, &http).unwrap(),
        None,
        "running"
    );
    let before = Utc::now();
    let backoff = Backoff {
        base: Duration::from_secs(30),
        max: Duration::from_secs(30),
    };
    engine::fail_step(&mut conn, &a[0].lease().unwrap(), "boom", &backoff).unwrap();
    let at = engine::next_claimable_at(&mut conn, &http)
        .unwrap()
        .expect("the retry");
    assert!(
        at >= before + chrono::Duration::seconds(29)
            && at <= Utc::now() + chrono::Duration::seconds(31)
    );
    assert!(
        engine::claim_from(&mut conn, "w", &http, 1, LEASE)
            .unwrap()
            .is_empty()
    );

    // A paused execution's steps are not claimable at any time.
    engine::pause(&mut conn, execution.id).unwrap();
    assert_eq!(engine::next_claimable_at(&mut conn, &http).unwrap(), None);
}

#[test]
fn ready_steps_by_queue_is_the_queue_depth() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(
        &mut conn,
        &[("a", "http"), ("b", "http"), ("c", "sql"), ("d", "sql")],
        &[("c", "d")],
    );
    assert!(engine::ready_steps_by_queue(&mut conn).unwrap().is_empty());
    let execution = start(&mut conn, &wf);
    start(&mut conn, &wf);
    assert_eq!(
        engine::ready_steps_by_queue(&mut conn).unwrap(),
        [("http".to_owned(), 4), ("sql".to_owned(), 2)],
        "d waits for c"
    );
    engine::claim_from(&mut conn, "w", &types(&["http"]), 3, LEASE).unwrap();
    engine::pause(&mut conn, execution.id).unwrap();
    let depth = engine::ready_steps_by_queue(&mut conn).unwrap();
    assert_eq!(
        depth.iter().map(|(_, n)| n).sum::<i64>(),
        1 + 1,
        "{depth:?}"
    );
}
