//! Flow control (migration 000025): priorities, queues, concurrency keys,
//! delayed starts and deduplication — each rule proven against a real
//! database, and the exact ones under real concurrency: several connections,
//! threads released together by a barrier while another connection samples
//! every committed state, and forced interleavings (a session holding its
//! transaction open while another one runs; "B now waits for A" read from
//! `pg_stat_activity` and `pg_blocking_pids`, never slept for).
mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Uuid as SqlUuid};
use serde_json::{Value, json};
use uuid::Uuid;
use workflow_db::engine::{self, CheckOptions, InvariantKind};
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Edge, Error, Execution, ExecutionStatus, ExecutionStep, Lease, NewExecution, NewWorkflow, Node,
    StepStatus, Workflow, WorkflowGraph,
};

use common::LEASE;
use common::session::{Session, State, ok};

/// Hang guard of every loop that waits for other threads (not a measurement).
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Workflows, executions, steps.

/// `n` nodes `{prefix}{i}` of type `ty` with this config.
fn nodes(prefix: &str, n: usize, ty: &str, config: Value) -> Vec<Node> {
    (0..n)
        .map(|i| Node::new(format!("{prefix}{i}"), ty).config(config.clone()))
        .collect()
}

fn workflow_of(conn: &mut PgConnection, nodes: Vec<Node>, edges: &[(&str, &str)]) -> Workflow {
    let graph = WorkflowGraph {
        nodes,
        edges: edges.iter().map(|(s, t)| Edge::new(*s, *t)).collect(),
    };
    NewWorkflow::from_graph("flow", &graph)
        .create(conn)
        .unwrap()
}

/// A workflow of one node `n` of type `ty`.
fn one_node(conn: &mut PgConnection, ty: &str) -> Workflow {
    workflow_of(conn, vec![Node::new("n", ty)], &[])
}

/// Starts `new`, which must create an execution.
fn start(conn: &mut PgConnection, new: NewExecution) -> Execution {
    let started = engine::start_execution(conn, &new).unwrap();
    assert!(started.created, "a new execution was expected");
    started.execution
}

fn execution(conn: &mut PgConnection, id: Uuid) -> Execution {
    Execution::find(conn, id).unwrap()
}

fn steps(conn: &mut PgConnection, execution: Uuid) -> Vec<ExecutionStep> {
    ExecutionStep::list_for_execution(conn, execution).unwrap()
}

fn step_of(conn: &mut PgConnection, execution: Uuid, node: &str) -> ExecutionStep {
    steps(conn, execution)
        .into_iter()
        .find(|s| s.node_id == node)
        .unwrap_or_else(|| panic!("no step {node} in execution {execution}"))
}

/// The step of a one-node execution.
fn only_step(conn: &mut PgConnection, execution: Uuid) -> ExecutionStep {
    let mut all = steps(conn, execution);
    assert_eq!(all.len(), 1);
    all.remove(0)
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn claim(conn: &mut PgConnection, limit: i64) -> Vec<ExecutionStep> {
    engine::claim_steps(conn, "w", limit, LEASE).unwrap()
}

fn claim_from(conn: &mut PgConnection, queues: &[&str], limit: i64) -> Vec<ExecutionStep> {
    engine::claim_from(conn, "w", &names(queues), limit, LEASE).unwrap()
}

/// Claims one step at a time until nothing is claimable; returns them in claim order.
fn claim_one_by_one(conn: &mut PgConnection) -> Vec<ExecutionStep> {
    let mut order = Vec::new();
    for _ in 0..1000 {
        let mut one = claim(conn, 1);
        assert!(one.len() <= 1);
        match one.pop() {
            Some(s) => order.push(s),
            None => return order,
        }
    }
    panic!("more than 1000 claims")
}

fn complete(conn: &mut PgConnection, step: &ExecutionStep) {
    let lease = step.lease().expect("a claimed step");
    engine::complete_step(conn, &lease, None).unwrap();
}

fn exec(conn: &mut PgConnection, sql: &str, id: Uuid) -> QueryResult<usize> {
    diesel::sql_query(sql).bind::<SqlUuid, _>(id).execute(conn)
}

/// Moves the `run_after` of an execution's steps to `now() + offset` (an SQL interval).
fn set_run_after(conn: &mut PgConnection, execution: Uuid, offset: &str) {
    diesel::sql_query(
        "UPDATE execution_steps SET run_after = now() + $2::interval WHERE execution_id = $1",
    )
    .bind::<SqlUuid, _>(execution)
    .bind::<Text, _>(offset)
    .execute(conn)
    .unwrap();
}

/// A step moved `pending -> running` by hand (the trigger gives it a default lease).
const START_BY_HAND: &str = "UPDATE execution_steps SET status = 'running' WHERE id = $1";

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn scalar(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<N>(conn).unwrap().n
}

#[derive(QueryableByName)]
struct Fingerprint {
    #[diesel(sql_type = Text)]
    t: String,
}

/// Every row a flow-control refusal could have changed, and the history's size.
fn fingerprint(conn: &mut PgConnection) -> String {
    diesel::sql_query(
        "SELECT concat_ws(' | ', \
           (SELECT json_agg(s ORDER BY s.id) FROM execution_steps s)::text, \
           (SELECT json_agg(x ORDER BY x.id) FROM executions x)::text, \
           (SELECT json_agg(q ORDER BY q.name) FROM queues q)::text, \
           (SELECT json_agg(c ORDER BY c.key) FROM concurrency_limits c)::text, \
           (SELECT count(*) FROM execution_events)::text) AS t",
    )
    .get_result::<Fingerprint>(conn)
    .unwrap()
    .t
}

/// What a refused write reported.
#[derive(Debug)]
struct Refusal {
    kind: String,
    message: String,
    constraint: Option<String>,
}

fn refusal<T: Debug>(what: &str, result: QueryResult<T>) -> Refusal {
    match result {
        Err(DieselError::DatabaseError(kind, info)) => Refusal {
            kind: format!("{kind:?}"),
            message: info.message().to_owned(),
            constraint: info.constraint_name().map(str::to_owned),
        },
        other => panic!("{what}: the database must refuse this write, got {other:?}"),
    }
}

/// Asserts `result` is a check_violation naming `constraint`, with `text` in its message.
fn assert_refused<T: Debug>(what: &str, result: QueryResult<T>, constraint: &str, text: &str) {
    let r = refusal(what, result);
    assert_eq!(
        r.kind,
        format!("{:?}", DatabaseErrorKind::CheckViolation),
        "{what}: {r:?}"
    );
    assert_eq!(r.constraint.as_deref(), Some(constraint), "{what}: {r:?}");
    assert!(r.message.contains(text), "{what}: {text:?} not in {r:?}");
}

#[derive(QueryableByName, Debug, Clone, Copy, PartialEq, Eq)]
struct QueueCount {
    /// Running steps of the queue, counted.
    #[diesel(sql_type = BigInt)]
    running: i64,
    /// `queues.running`, when the queue has a row.
    #[diesel(sql_type = Nullable<Integer>)]
    counter: Option<i32>,
}

/// The queue's running steps and its counter, read in one snapshot.
fn queue_count(conn: &mut PgConnection, queue: &str) -> QueueCount {
    diesel::sql_query(
        "SELECT (SELECT count(*) FROM execution_steps s WHERE s.status = 'running' \
                   AND workflow_db_step_queue(s.queue, s.node_type) = $1) AS running, \
                (SELECT u.running FROM queues u WHERE u.name = $1) AS counter",
    )
    .bind::<Text, _>(queue)
    .get_result(conn)
    .unwrap()
}

#[derive(QueryableByName, Debug, Clone, Copy, PartialEq, Eq)]
struct KeyUse {
    #[diesel(sql_type = BigInt)]
    running: i64,
    /// Ready (pending, upstream done, not parked) and not throttled.
    #[diesel(sql_type = BigInt)]
    admitted: i64,
    /// Ready and throttled.
    #[diesel(sql_type = BigInt)]
    throttled: i64,
}

/// A key's running, admitted and throttled steps, read in one snapshot.
fn key_use(conn: &mut PgConnection, key: &str) -> KeyUse {
    diesel::sql_query(
        "SELECT count(*) FILTER (WHERE status = 'running') AS running, \
                count(*) FILTER (WHERE status = 'pending' AND upstream_pending = 0 AND NOT parked \
                                   AND NOT throttled) AS admitted, \
                count(*) FILTER (WHERE status = 'pending' AND upstream_pending = 0 AND NOT parked \
                                   AND throttled) AS throttled \
           FROM execution_steps WHERE concurrency_key = $1",
    )
    .bind::<Text, _>(key)
    .get_result(conn)
    .unwrap()
}

fn key(running: i64, admitted: i64, throttled: i64) -> KeyUse {
    KeyUse {
        running,
        admitted,
        throttled,
    }
}

/// The invariant checker finds no error (warnings allowed); returns the report's counts.
fn assert_invariants(conn: &mut PgConnection) -> std::collections::BTreeMap<InvariantKind, u64> {
    let report = engine::check_invariants(conn, &CheckOptions::default()).unwrap();
    assert!(
        report.is_clean(),
        "invariant violations: {:#?}",
        report.violations
    );
    report.counts
}

fn exec_status(conn: &mut PgConnection, id: Uuid) -> ExecutionStatus {
    execution(conn, id).status
}

// ---------------------------------------------------------------------------
// 1. Priorities.

#[test]
fn a_higher_priority_is_claimed_before_older_lower_priorities() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    let oldest_low = start(&mut conn, NewExecution::new(wf.id));
    let old_low = start(&mut conn, NewExecution::new(wf.id));
    let mid = start(&mut conn, NewExecution::new(wf.id).priority(5));
    let high = start(&mut conn, NewExecution::new(wf.id).priority(10));
    // The highest priority of all, but not due for an hour: it does not
    // hold anything back.
    let later_top = start(&mut conn, NewExecution::new(wf.id).priority(99));
    set_run_after(&mut conn, oldest_low.id, "-4 seconds");
    set_run_after(&mut conn, old_low.id, "-3 seconds");
    set_run_after(&mut conn, mid.id, "-2 seconds");
    set_run_after(&mut conn, high.id, "-1 second");
    set_run_after(&mut conn, later_top.id, "1 hour");

    for (e, p) in [(&oldest_low, 0), (&mid, 5), (&high, 10), (&later_top, 99)] {
        assert_eq!(e.priority, p);
        assert_eq!(
            only_step(&mut conn, e.id).priority,
            p,
            "the step copies its execution's priority"
        );
    }
    let order: Vec<Uuid> = claim_one_by_one(&mut conn)
        .iter()
        .map(|s| s.execution_id)
        .collect();
    assert_eq!(
        order,
        [high.id, mid.id, oldest_low.id, old_low.id],
        "highest priority first, then the oldest run_after; the step not yet due waits"
    );
    assert_eq!(
        only_step(&mut conn, later_top.id).status,
        StepStatus::Pending
    );
}

#[test]
fn a_node_priority_overrides_its_executions_and_priority_is_strict_across_queues() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // Every node in a queue of its own (its type), except `low`, which shares `urgent`'s.
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::new("urgent", "a").config(json!({"priority": 100})),
            Node::new("plain", "b"),
            Node::new("zero", "c").config(json!({"priority": 0})),
            Node::new("low", "a").config(json!({"priority": -5})),
        ],
        &[],
    );
    let other = one_node(&mut conn, "d");
    let e = start(&mut conn, NewExecution::new(wf.id).priority(10));
    let o = start(&mut conn, NewExecution::new(other.id).priority(50));
    // Oldest first within a priority would put e's steps first: all of e's are older.
    set_run_after(&mut conn, e.id, "-10 seconds");

    let priority = |conn: &mut PgConnection, node: &str| step_of(conn, e.id, node).priority;
    assert_eq!(priority(&mut conn, "urgent"), 100);
    assert_eq!(
        priority(&mut conn, "plain"),
        10,
        "no config.priority: the execution's"
    );
    assert_eq!(
        priority(&mut conn, "zero"),
        0,
        "an explicit 0 overrides the execution's 10"
    );
    assert_eq!(priority(&mut conn, "low"), -5);
    assert_eq!(only_step(&mut conn, o.id).priority, 50);

    let order: Vec<String> = claim_one_by_one(&mut conn)
        .into_iter()
        .map(|s| s.node_id)
        .collect();
    assert_eq!(order, ["urgent", "n", "plain", "zero", "low"]);
}

#[test]
fn equal_priorities_are_claimed_oldest_run_after_first() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    let a = start(&mut conn, NewExecution::new(wf.id).priority(7));
    let b = start(&mut conn, NewExecution::new(wf.id).priority(7));
    let c = start(&mut conn, NewExecution::new(wf.id).priority(7));
    set_run_after(&mut conn, b.id, "-3 seconds");
    set_run_after(&mut conn, c.id, "-2 seconds");
    set_run_after(&mut conn, a.id, "-1 second");
    let order: Vec<Uuid> = claim_one_by_one(&mut conn)
        .iter()
        .map(|s| s.execution_id)
        .collect();
    assert_eq!(order, [b.id, c.id, a.id]);

    // claim_from orders the same way across the queues it serves.
    let wf2 = workflow_of(
        &mut conn,
        vec![
            Node::new("x", "qx"),
            Node::new("y", "qy"),
            Node::new("z", "qz"),
        ],
        &[],
    );
    let e = start(&mut conn, NewExecution::new(wf2.id));
    for (node, offset) in [("x", "-1 second"), ("y", "-3 seconds"), ("z", "-2 seconds")] {
        diesel::sql_query(
            "UPDATE execution_steps SET run_after = now() + $3::interval \
             WHERE execution_id = $1 AND node_id = $2",
        )
        .bind::<SqlUuid, _>(e.id)
        .bind::<Text, _>(node)
        .bind::<Text, _>(offset)
        .execute(&mut conn)
        .unwrap();
    }
    let first = claim_from(&mut conn, &["qx", "qy", "qz"], 1);
    assert_eq!(first[0].node_id, "y");
    let second = claim_from(&mut conn, &["qx", "qz"], 1);
    assert_eq!(second[0].node_id, "z");
}

// ---------------------------------------------------------------------------
// 2. Queues.

#[test]
fn a_node_queue_routes_its_step_and_the_default_queue_is_the_node_type() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::new("a", "http").config(json!({"queue": "fast"})),
            Node::new("b", "http"),
            Node::new("c", "sql"),
        ],
        &[],
    );
    let e = start(&mut conn, NewExecution::new(wf.id));
    let a = step_of(&mut conn, e.id, "a");
    assert_eq!(a.queue.as_deref(), Some("fast"));
    assert_eq!(a.queue_name(), "fast");
    let b = step_of(&mut conn, e.id, "b");
    assert_eq!(b.queue, None);
    assert_eq!(b.queue_name(), "http");
    assert_eq!(step_of(&mut conn, e.id, "c").queue_name(), "sql");
    assert_eq!(
        engine::ready_steps_by_queue(&mut conn).unwrap(),
        [
            ("fast".to_owned(), 1),
            ("http".to_owned(), 1),
            ("sql".to_owned(), 1)
        ]
    );

    let http = claim_from(&mut conn, &["http"], 10);
    assert_eq!(
        http.iter().map(|s| s.node_id.as_str()).collect::<Vec<_>>(),
        ["b"],
        "a is of type http but routed to queue fast"
    );
    let fast = claim_from(&mut conn, &["fast"], 10);
    assert_eq!(fast.len(), 1);
    assert_eq!(fast[0].node_id, "a");
    let sql = claim_from(&mut conn, &["nope", "sql"], 10);
    assert_eq!(sql.len(), 1);
    assert_eq!(sql[0].node_id, "c");

    // A step without a node type (its node is not in the graph) runs on "default".
    exec(
        &mut conn,
        "INSERT INTO execution_steps (id, execution_id, node_id) VALUES (gen_random_uuid(), $1, 'ghost')",
        e.id,
    )
    .unwrap();
    assert!(claim_from(&mut conn, &["http", "sql", "fast"], 10).is_empty());
    let ghost = claim_from(&mut conn, &[engine::DEFAULT_QUEUE], 10);
    assert_eq!(ghost.len(), 1);
    assert_eq!(ghost[0].node_id, "ghost");
    assert_eq!(ghost[0].queue_name(), "default");
}

#[test]
fn a_paused_queue_is_claimed_by_nobody_and_refuses_a_start_by_hand() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::new("r", "q"),
            Node::new("p1", "q"),
            Node::new("p2", "q"),
            Node::new("other", "task"),
        ],
        &[],
    );
    let e = start(&mut conn, NewExecution::new(wf.id));
    set_run_after(&mut conn, e.id, "-1 second");
    let running = claim_from(&mut conn, &["q"], 1);
    assert_eq!(running.len(), 1);

    let q = engine::pause_queue(&mut conn, "q").unwrap();
    assert!(q.paused);
    assert_eq!(q.max_running, None);
    assert_eq!(q.running, 1, "the step already running is counted");

    assert!(claim_from(&mut conn, &["q"], 10).is_empty());
    let any = claim(&mut conn, 10);
    assert_eq!(
        any.iter().map(|s| s.node_id.as_str()).collect::<Vec<_>>(),
        ["other"],
        "claim_steps skips the paused queue"
    );
    assert_eq!(
        engine::next_claimable_at(&mut conn, &names(&["q"])).unwrap(),
        None
    );
    assert!(
        engine::ready_steps_by_queue(&mut conn)
            .unwrap()
            .contains(&("q".to_owned(), 2)),
        "the depth still shows the paused queue's waiting steps"
    );

    // A start by hand is refused, and changes nothing.
    let pending = steps(&mut conn, e.id)
        .into_iter()
        .find(|s| s.queue_name() == "q" && s.status == StepStatus::Pending)
        .unwrap();
    let before = fingerprint(&mut conn);
    assert_refused(
        "a step of a paused queue started by hand",
        exec(&mut conn, START_BY_HAND, pending.id),
        "queues_max_running",
        "queue q is paused",
    );
    assert_eq!(
        fingerprint(&mut conn),
        before,
        "the refused start changed nothing"
    );

    // The running step finishes as usual.
    complete(&mut conn, &running[0]);
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 0,
            counter: Some(0)
        }
    );

    // Resumed: a queue neither paused nor limited needs no row.
    assert_eq!(engine::resume_queue(&mut conn, "q").unwrap(), None);
    assert!(engine::list_queues(&mut conn).unwrap().is_empty());
    assert_eq!(claim_from(&mut conn, &["q"], 10).len(), 2);

    // A paused limited queue keeps its limit when resumed.
    engine::set_queue_limit(&mut conn, "lim", Some(5)).unwrap();
    assert!(engine::pause_queue(&mut conn, "lim").unwrap().paused);
    let resumed = engine::resume_queue(&mut conn, "lim")
        .unwrap()
        .expect("still limited");
    assert!(!resumed.paused);
    assert_eq!(resumed.max_running, Some(5));

    assert!(matches!(
        engine::pause_queue(&mut conn, ""),
        Err(Error::InvalidOption { .. })
    ));
    assert_invariants(&mut conn);
}

#[test]
fn a_paused_or_full_queue_does_not_hold_back_other_queues() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let bulk = workflow_of(&mut conn, nodes("b", 500, "bulk", json!({})), &[]);
    let light = workflow_of(&mut conn, nodes("l", 5, "light", json!({})), &[]);
    start(&mut conn, NewExecution::new(bulk.id).priority(100));
    start(&mut conn, NewExecution::new(light.id));
    engine::pause_queue(&mut conn, "bulk").unwrap();

    let got = claim(&mut conn, 10);
    assert_eq!(
        got.len(),
        5,
        "every light step, past 500 higher-priority paused ones"
    );
    assert!(got.iter().all(|s| s.queue_name() == "light"));
    assert!(claim(&mut conn, 10).is_empty());

    // Resumed but limited to 2: the two it may run, then the other queue's.
    engine::set_queue_limit(&mut conn, "bulk", Some(2)).unwrap();
    engine::resume_queue(&mut conn, "bulk").unwrap();
    start(&mut conn, NewExecution::new(light.id));
    let got = claim(&mut conn, 10);
    let by_queue =
        |list: &[ExecutionStep], q: &str| list.iter().filter(|s| s.queue_name() == q).count();
    assert_eq!((by_queue(&got, "bulk"), by_queue(&got, "light")), (2, 5));
    start(&mut conn, NewExecution::new(light.id));
    let got = claim(&mut conn, 10);
    assert_eq!(
        (by_queue(&got, "bulk"), by_queue(&got, "light")),
        (0, 5),
        "the full queue waits"
    );
    assert_eq!(
        engine::next_claimable_at(&mut conn, &names(&["bulk"])).unwrap(),
        None
    );
}

// ---------------------------------------------------------------------------
// 3. Queue limits.

#[test]
fn a_queue_limit_counts_refuses_starts_beyond_it_and_can_be_lowered_or_removed() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(&mut conn, nodes("n", 6, "q", json!({})), &[]);
    start(&mut conn, NewExecution::new(wf.id));
    let first = claim_from(&mut conn, &["q"], 2);
    assert_eq!(first.len(), 2);

    // The new row counts the steps already running.
    let q = engine::set_queue_limit(&mut conn, "q", Some(3))
        .unwrap()
        .unwrap();
    assert_eq!((q.max_running, q.running), (Some(3), 2));
    let third = claim(&mut conn, 10);
    assert_eq!(third.len(), 1, "only the room left");
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 3,
            counter: Some(3)
        }
    );

    // Beyond the limit, a start by hand is refused and changes nothing.
    let pending = ExecutionStep::list_for_execution(&mut conn, third[0].execution_id)
        .unwrap()
        .into_iter()
        .find(|s| s.status == StepStatus::Pending)
        .unwrap();
    let before = fingerprint(&mut conn);
    assert_refused(
        "a start beyond the queue's limit",
        exec(&mut conn, START_BY_HAND, pending.id),
        "queues_max_running",
        "queue q is at its limit of 3 running step(s)",
    );
    assert_eq!(fingerprint(&mut conn), before);

    // Lowered below the running steps: they go on; new ones wait until below.
    engine::set_queue_limit(&mut conn, "q", Some(1)).unwrap();
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 3,
            counter: Some(3)
        }
    );
    complete(&mut conn, &first[0]);
    complete(&mut conn, &first[1]);
    assert!(claim(&mut conn, 10).is_empty(), "1 running, limit 1");
    complete(&mut conn, &third[0]);
    let next = claim(&mut conn, 10);
    assert_eq!(next.len(), 1);

    // Removed: the row goes, the queue runs freely.
    assert_eq!(engine::set_queue_limit(&mut conn, "q", None).unwrap(), None);
    assert!(engine::list_queues(&mut conn).unwrap().is_empty());
    assert_eq!(claim(&mut conn, 10).len(), 2);
    assert!(matches!(
        engine::set_queue_limit(&mut conn, "q", Some(0)),
        Err(Error::InvalidOption { .. })
    ));
    assert_invariants(&mut conn);
}

#[test]
fn a_queue_limit_holds_exactly_while_many_workers_claim_and_complete() {
    const LIMIT: i64 = 3;
    const WORKERS: usize = 8;
    const STEPS: usize = 50;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(&mut conn, nodes("n", 5, "q", json!({})), &[]);
    let executions: Vec<Uuid> = (0..STEPS / 5)
        .map(|_| start(&mut conn, NewExecution::new(wf.id)).id)
        .collect();
    engine::set_queue_limit(&mut conn, "q", Some(LIMIT as i32)).unwrap();

    let completed = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(WORKERS + 1);
    let deadline = Instant::now() + DEADLINE;
    let (samples, max_seen, claims) = thread::scope(|s| {
        let (db, completed, stop, barrier) = (&db, &completed, &stop, &barrier);
        let sampler = s.spawn(move || {
            let mut c = db.connect();
            barrier.wait();
            let (mut samples, mut max_seen) = (0u64, 0i64);
            while !stop.load(SeqCst) {
                let n = queue_count(&mut c, "q");
                assert!(
                    n.running <= LIMIT,
                    "{} steps of q running at once (limit {LIMIT})",
                    n.running
                );
                assert_eq!(
                    n.counter,
                    Some(n.running as i32),
                    "queues.running equals the running steps in every snapshot"
                );
                max_seen = max_seen.max(n.running);
                samples += 1;
            }
            (samples, max_seen)
        });
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                s.spawn(move || {
                    let mut c = db.connect();
                    let worker = format!("w{w}");
                    let q = names(&["q"]);
                    barrier.wait();
                    let mut claims = 0usize;
                    for i in w.. {
                        if completed.load(SeqCst) >= STEPS {
                            return claims;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "workers did not finish within {DEADLINE:?}"
                        );
                        let batch = 1 + (i % 5) as i64;
                        let claimed = if i % 2 == 0 {
                            engine::claim_from(&mut c, &worker, &q, batch, LEASE)
                        } else {
                            engine::claim_steps(&mut c, &worker, batch, LEASE)
                        }
                        .unwrap();
                        assert!(claimed.len() as i64 <= batch.min(LIMIT));
                        if claimed.is_empty() {
                            thread::sleep(Duration::from_micros(300));
                            continue;
                        }
                        claims += 1;
                        thread::sleep(Duration::from_millis(1));
                        let reports: Vec<(Lease, Option<Value>)> =
                            claimed.iter().map(|s| (s.lease().unwrap(), None)).collect();
                        engine::complete_steps(&mut c, &reports).unwrap();
                        completed.fetch_add(claimed.len(), SeqCst);
                    }
                    unreachable!()
                })
            })
            .collect();
        let claims: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
        stop.store(true, SeqCst);
        let (samples, max_seen) = sampler.join().unwrap();
        (samples, max_seen, claims)
    });
    assert_eq!(completed.load(SeqCst), STEPS);
    assert!(samples > 20, "the sampler read only {samples} states");
    assert_eq!(max_seen, LIMIT, "the queue was run at its limit");
    assert!(claims >= STEPS.div_ceil(LIMIT as usize));
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 0,
            counter: Some(0)
        }
    );
    for id in executions {
        assert_eq!(exec_status(&mut conn, id), ExecutionStatus::Completed);
    }
    assert_invariants(&mut conn);
}

/// Session A claims 2 of a queue limited to 3 in a transaction it keeps
/// open; B's claim (5) does not wait for the queue's row (SKIP LOCKED): it
/// takes nothing of that queue this time. Returns how many B took.
fn claim_behind_an_open_claim(db: &TestDatabase, conn: &mut PgConnection) -> usize {
    let wf = workflow_of(conn, nodes("n", 10, "q", json!({})), &[]);
    start(conn, NewExecution::new(wf.id));
    engine::set_queue_limit(conn, "q", Some(3)).unwrap();

    let mut a = Session::new(db, "A");
    let mut b = Session::new(db, "B");
    a.begin();
    a.run("A claims 2", |c| {
        engine::claim_from(c, "A", &names(&["q"]), 2, LEASE).map(|v| v.len())
    });
    assert_eq!(a.settle(conn), State::Done);
    assert_eq!(a.last(), ok("2"));
    assert_eq!(queue_count(conn, "q").running, 0, "A has not committed");

    b.run("B claims 5", |c| {
        engine::claim_steps(c, "B", 5, LEASE).map(|v| v.len())
    });
    assert_eq!(
        b.settle(conn),
        State::Done,
        "B does not wait for A's queue row"
    );
    let taken: usize = b.last().unwrap().parse().unwrap();
    a.commit();
    assert_eq!(a.settle(conn), State::Done);
    a.finish();
    b.finish();
    taken
}

#[test]
fn a_claim_waiting_behind_an_open_claim_never_exceeds_the_room_left() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let taken = claim_behind_an_open_claim(&db, &mut conn);
    assert!(taken <= 1, "B took {taken} with room for 1");
    let n = queue_count(&mut conn, "q");
    assert_eq!(
        n,
        QueueCount {
            running: 2 + taken as i64,
            counter: Some(2 + taken as i32)
        }
    );

    // Fill the queue; then nothing more is claimed, and a start by hand is refused.
    claim(&mut conn, 10);
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 3,
            counter: Some(3)
        }
    );
    assert!(claim(&mut conn, 10).is_empty());
    let e = execution_of_queue(&mut conn, "q");
    let pending: Uuid = ExecutionStep::list_for_execution(&mut conn, e)
        .unwrap()
        .into_iter()
        .find(|s| s.status == StepStatus::Pending)
        .unwrap()
        .id;
    let before = fingerprint(&mut conn);
    assert_refused(
        "a start by hand on a full queue",
        exec(&mut conn, START_BY_HAND, pending),
        "queues_max_running",
        "queue q is at its limit of 3",
    );
    assert_eq!(fingerprint(&mut conn), before);
    assert_invariants(&mut conn);
}

#[test]
fn a_claim_behind_an_open_claim_comes_back_short_and_the_next_takes_the_room() {
    // Documented (docs/engine.md, Flow control): a claim skips a limited
    // queue whose row another transaction holds, so it may return fewer than
    // the room (never more); the next claim takes what is left.
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let taken = claim_behind_an_open_claim(&db, &mut conn);
    assert!(taken <= 1, "never beyond the limit: {taken}");
    let next = engine::claim_from(&mut conn, "again", &["q".to_owned()], 5, LEASE).unwrap();
    assert_eq!(
        taken + next.len(),
        1,
        "together they take exactly the room left"
    );
}

fn execution_of_queue(conn: &mut PgConnection, queue: &str) -> Uuid {
    diesel::sql_query(
        "SELECT execution_id AS id FROM execution_steps \
         WHERE workflow_db_step_queue(queue, node_type) = $1 LIMIT 1",
    )
    .bind::<Text, _>(queue)
    .get_result::<IdRow>(conn)
    .unwrap()
    .id
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

// ---------------------------------------------------------------------------
// 4. Concurrency keys.

#[test]
fn a_concurrency_key_admits_at_most_its_limit_and_the_highest_priority_next() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "tenant-a", 2).unwrap();
    let a: Vec<Execution> = [0, 5, 1, 9, 3]
        .into_iter()
        .map(|p| {
            start(
                &mut conn,
                NewExecution::new(wf.id)
                    .concurrency_key("tenant-a")
                    .priority(p),
            )
        })
        .collect();
    let b: Vec<Execution> = (0..3)
        .map(|_| {
            start(
                &mut conn,
                NewExecution::new(wf.id).concurrency_key("tenant-b"),
            )
        })
        .collect();
    let throttled = |conn: &mut PgConnection| -> Vec<bool> {
        a.iter().map(|e| only_step(conn, e.id).throttled).collect()
    };
    assert_eq!(a[0].concurrency_key.as_deref(), Some("tenant-a"));
    assert_eq!(
        only_step(&mut conn, a[0].id).concurrency_key.as_deref(),
        Some("tenant-a")
    );
    assert_eq!(throttled(&mut conn), [false, false, true, true, true]);
    assert_eq!(key_use(&mut conn, "tenant-a"), key(0, 2, 3));
    assert_eq!(
        key_use(&mut conn, "tenant-b"),
        key(0, 3, 0),
        "tenant-b has no limit"
    );

    let claimed = claim(&mut conn, 10);
    let ids: BTreeSet<Uuid> = claimed.iter().map(|s| s.execution_id).collect();
    let expected: BTreeSet<Uuid> = [a[0].id, a[1].id, b[0].id, b[1].id, b[2].id].into();
    assert_eq!(
        ids, expected,
        "the two admitted tenant-a steps and every tenant-b step"
    );
    assert!(
        claim(&mut conn, 10).is_empty(),
        "the rest of tenant-a is throttled"
    );
    assert_eq!(key_use(&mut conn, "tenant-a"), key(2, 0, 3));
    let of = |list: &[ExecutionStep], e: &Execution| {
        list.iter()
            .find(|s| s.execution_id == e.id)
            .unwrap()
            .clone()
    };

    // Each completion admits the best throttled step: priority 9, then 3, then 1.
    complete(&mut conn, &of(&claimed, &a[0]));
    assert_eq!(throttled(&mut conn), [false, false, true, false, true]);
    assert_eq!(key_use(&mut conn, "tenant-a"), key(1, 1, 2));
    let p9 = claim(&mut conn, 10);
    assert_eq!(p9.len(), 1);
    assert_eq!(p9[0].execution_id, a[3].id);

    complete(&mut conn, &of(&claimed, &a[1]));
    assert_eq!(throttled(&mut conn), [false, false, true, false, false]);
    let p3 = claim(&mut conn, 10);
    assert_eq!(p3[0].execution_id, a[4].id);
    assert_eq!(key_use(&mut conn, "tenant-a"), key(2, 0, 1));

    complete(&mut conn, &p9[0]);
    let p1 = claim(&mut conn, 10);
    assert_eq!(p1[0].execution_id, a[2].id);
    assert_eq!(key_use(&mut conn, "tenant-a"), key(2, 0, 0));
    assert_invariants(&mut conn);
}

#[test]
fn a_node_concurrency_key_overrides_its_executions() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::new("x", "task").config(json!({"concurrency_key": "node-key"})),
            Node::new("y", "task"),
        ],
        &[],
    );
    let e1 = start(
        &mut conn,
        NewExecution::new(wf.id).concurrency_key("exec-key"),
    );
    let e2 = start(&mut conn, NewExecution::new(wf.id));
    assert_eq!(
        step_of(&mut conn, e1.id, "x").concurrency_key.as_deref(),
        Some("node-key")
    );
    assert_eq!(
        step_of(&mut conn, e1.id, "y").concurrency_key.as_deref(),
        Some("exec-key")
    );
    assert_eq!(
        step_of(&mut conn, e2.id, "x").concurrency_key.as_deref(),
        Some("node-key")
    );
    assert_eq!(step_of(&mut conn, e2.id, "y").concurrency_key, None);

    // A new limit throttles at once (the newest step of the key).
    engine::set_concurrency_limit(&mut conn, "node-key", 1).unwrap();
    assert_eq!(key_use(&mut conn, "node-key"), key(0, 1, 1));
    assert!(step_of(&mut conn, e2.id, "x").throttled);
    assert_eq!(claim(&mut conn, 10).len(), 3, "x of e1, both y");
}

#[test]
fn a_thousand_throttled_steps_of_one_key_do_not_delay_another_key() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    engine::set_concurrency_limit(&mut conn, "tenant-a", 2).unwrap();
    let big = workflow_of(&mut conn, nodes("a", 1000, "task", json!({})), &[]);
    let small = workflow_of(&mut conn, nodes("b", 20, "task", json!({})), &[]);
    start(
        &mut conn,
        NewExecution::new(big.id)
            .concurrency_key("tenant-a")
            .priority(100),
    );
    assert_eq!(key_use(&mut conn, "tenant-a"), key(0, 2, 998));
    start(
        &mut conn,
        NewExecution::new(small.id).concurrency_key("tenant-b"),
    );

    let keys = |list: &[ExecutionStep]| {
        let mut by: HashMap<String, usize> = HashMap::new();
        for s in list {
            *by.entry(s.concurrency_key.clone().unwrap()).or_default() += 1;
        }
        (
            by.get("tenant-a").copied().unwrap_or(0),
            by.get("tenant-b").copied().unwrap_or(0),
        )
    };
    assert_eq!(
        keys(&claim(&mut conn, 10)),
        (2, 8),
        "tenant-a's two (higher priority), then tenant-b"
    );
    assert_eq!(keys(&claim(&mut conn, 10)), (0, 10));
    assert_eq!(keys(&claim(&mut conn, 10)), (0, 2));
    assert!(claim(&mut conn, 10).is_empty());
    assert_eq!(
        engine::next_claimable_at(&mut conn, &names(&["task"])).unwrap(),
        None
    );
}

#[test]
fn raising_lowering_and_removing_a_key_limit() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    let all: Vec<Execution> = (0..8)
        .map(|i| {
            start(
                &mut conn,
                NewExecution::new(wf.id).concurrency_key("k").priority(i),
            )
        })
        .collect();
    assert_eq!(key_use(&mut conn, "k"), key(0, 1, 7));

    // Raised: more admitted at once, the highest priorities first.
    let limit = engine::set_concurrency_limit(&mut conn, "k", 3).unwrap();
    assert_eq!((limit.key.as_str(), limit.max_running), ("k", 3));
    assert_eq!(key_use(&mut conn, "k"), key(0, 3, 5));
    let admitted: BTreeSet<i32> = all
        .iter()
        .map(|e| only_step(&mut conn, e.id))
        .filter(|s| !s.throttled)
        .map(|s| s.priority)
        .collect();
    assert_eq!(
        admitted,
        [7, 6, 5].into(),
        "a limit change ranks every step of the key that is not running: the best three"
    );
    let running = claim(&mut conn, 10);
    assert_eq!(running.len(), 3);
    engine::set_concurrency_limit(&mut conn, "k", 4).unwrap();
    assert_eq!(key_use(&mut conn, "k"), key(3, 1, 4));

    // Lowered: nothing running stops, the admitted one is held back again.
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    assert_eq!(key_use(&mut conn, "k"), key(3, 0, 5));
    assert!(claim(&mut conn, 10).is_empty());
    complete(&mut conn, &running[0]);
    complete(&mut conn, &running[1]);
    assert_eq!(key_use(&mut conn, "k"), key(1, 0, 5), "still at the limit");
    complete(&mut conn, &running[2]);
    assert_eq!(key_use(&mut conn, "k"), key(0, 1, 4));

    // Removed: every throttled step is released.
    assert_eq!(engine::list_concurrency_limits(&mut conn).unwrap().len(), 1);
    assert!(engine::remove_concurrency_limit(&mut conn, "k").unwrap());
    assert!(!engine::remove_concurrency_limit(&mut conn, "k").unwrap());
    assert!(
        engine::list_concurrency_limits(&mut conn)
            .unwrap()
            .is_empty()
    );
    assert_eq!(key_use(&mut conn, "k"), key(0, 5, 0));
    assert_eq!(claim(&mut conn, 10).len(), 5);
    assert!(matches!(
        engine::set_concurrency_limit(&mut conn, "k", 0),
        Err(Error::InvalidOption { .. })
    ));
    assert_invariants(&mut conn);
}

#[test]
fn a_throttled_step_cannot_be_started_by_hand() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));
    let second = start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));
    let held = only_step(&mut conn, second.id);
    assert!(held.throttled);

    let before = fingerprint(&mut conn);
    assert_refused(
        "a throttled step started by hand",
        exec(&mut conn, START_BY_HAND, held.id),
        "execution_steps_throttle_check",
        "execution_steps_throttle_check",
    );
    assert_eq!(fingerprint(&mut conn), before);
    // Clearing `throttled` in the same statement does not get past the limit.
    assert_refused(
        "a throttled step released and started by hand",
        exec(
            &mut conn,
            "UPDATE execution_steps SET status = 'running', throttled = false WHERE id = $1",
            held.id,
        ),
        "concurrency_limits_max_running",
        "concurrency key k is at its limit of 1",
    );
    assert_eq!(fingerprint(&mut conn), before);
    // Nor does releasing it by hand: the key stays within its limit.
    exec(
        &mut conn,
        "UPDATE execution_steps SET throttled = false WHERE id = $1",
        held.id,
    )
    .unwrap();
    let k = key_use(&mut conn, "k");
    assert!(k.running + k.admitted <= 1, "{k:?}");
    assert_eq!(claim(&mut conn, 10).len(), 1);
    assert!(claim(&mut conn, 10).is_empty());
}

#[test]
fn a_concurrency_limit_holds_exactly_while_many_workers_start_claim_and_complete() {
    const LIMIT: i64 = 3;
    const WORKERS: usize = 6;
    const STARTERS: usize = 2;
    const UPFRONT: usize = 20;
    const PER_STARTER: usize = 10;
    const OTHER: usize = 10;
    const TOTAL: usize = UPFRONT + STARTERS * PER_STARTER + OTHER;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "tenant-a", LIMIT as i32).unwrap();
    for i in 0..UPFRONT {
        start(
            &mut conn,
            NewExecution::new(wf.id)
                .concurrency_key("tenant-a")
                .priority((i % 4) as i32),
        );
    }
    for _ in 0..OTHER {
        start(
            &mut conn,
            NewExecution::new(wf.id).concurrency_key("tenant-b"),
        );
    }

    let completed = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(WORKERS + STARTERS + 1);
    let deadline = Instant::now() + DEADLINE;
    let (samples, max_seen) = thread::scope(|s| {
        let (db, completed, stop, barrier) = (&db, &completed, &stop, &barrier);
        let sampler = s.spawn(move || {
            let mut c = db.connect();
            barrier.wait();
            let (mut samples, mut max_seen) = (0u64, 0i64);
            while !stop.load(SeqCst) {
                let k = key_use(&mut c, "tenant-a");
                assert!(k.running <= LIMIT, "{k:?}: more than {LIMIT} running");
                assert!(
                    k.running + k.admitted <= LIMIT,
                    "{k:?}: more than {LIMIT} running or admitted"
                );
                max_seen = max_seen.max(k.running);
                samples += 1;
            }
            (samples, max_seen)
        });
        let starters: Vec<_> = (0..STARTERS)
            .map(|_| {
                s.spawn(move || {
                    let mut c = db.connect();
                    barrier.wait();
                    for i in 0..PER_STARTER {
                        let new = NewExecution::new(wf.id)
                            .concurrency_key("tenant-a")
                            .priority(i as i32);
                        assert!(engine::start_execution(&mut c, &new).unwrap().created);
                    }
                })
            })
            .collect();
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                s.spawn(move || {
                    let mut c = db.connect();
                    let worker = format!("w{w}");
                    barrier.wait();
                    for i in w.. {
                        if completed.load(SeqCst) >= TOTAL {
                            return;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "workers did not finish within {DEADLINE:?}"
                        );
                        let claimed =
                            engine::claim_steps(&mut c, &worker, 1 + (i % 4) as i64, LEASE)
                                .unwrap();
                        let mine = claimed
                            .iter()
                            .filter(|s| s.concurrency_key.as_deref() == Some("tenant-a"))
                            .count();
                        assert!(mine as i64 <= LIMIT);
                        if claimed.is_empty() {
                            thread::sleep(Duration::from_micros(300));
                            continue;
                        }
                        thread::sleep(Duration::from_millis(1));
                        let reports: Vec<(Lease, Option<Value>)> =
                            claimed.iter().map(|s| (s.lease().unwrap(), None)).collect();
                        engine::complete_steps(&mut c, &reports).unwrap();
                        completed.fetch_add(claimed.len(), SeqCst);
                    }
                })
            })
            .collect();
        for t in starters {
            t.join().unwrap();
        }
        for t in workers {
            t.join().unwrap();
        }
        stop.store(true, SeqCst);
        sampler.join().unwrap()
    });
    assert_eq!(completed.load(SeqCst), TOTAL);
    assert!(samples > 20, "the sampler read only {samples} states");
    assert_eq!(max_seen, LIMIT, "the key was run at its limit");
    assert_eq!(key_use(&mut conn, "tenant-a"), key(0, 0, 0));
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM executions WHERE status <> 'completed'"
        ),
        0
    );
    assert_invariants(&mut conn);
}

#[test]
fn a_start_waiting_on_a_key_row_sees_the_slot_the_open_start_took() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "k", 2).unwrap();
    start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));

    let mut a = Session::new(&db, "A");
    let mut b = Session::new(&db, "B");
    let (new_a, new_b) = (
        NewExecution::new(wf.id).concurrency_key("k"),
        NewExecution::new(wf.id).concurrency_key("k"),
    );
    let (id_a, id_b) = (new_a.id, new_b.id);
    a.begin();
    a.run("A starts", move |c| {
        engine::start_execution(c, &new_a).map(|s| s.created)
    });
    assert_eq!(a.settle(&mut conn), State::Done);
    assert_eq!(a.last(), ok("true"));
    b.run("B starts", move |c| {
        engine::start_execution(c, &new_b).map(|s| s.created)
    });
    assert_eq!(
        b.settle(&mut conn),
        State::Blocked,
        "B's admission waits for the key's row"
    );
    assert!(b.blockers(&mut conn).contains(&a.pid));
    a.commit();
    assert_eq!(a.settle(&mut conn), State::Done);
    assert_eq!(b.settle(&mut conn), State::Done);
    assert_eq!(b.last(), ok("true"));
    a.finish();
    b.finish();

    assert!(
        !only_step(&mut conn, id_a).throttled,
        "A took the last slot"
    );
    assert!(only_step(&mut conn, id_b).throttled, "B found the key full");
    assert_eq!(key_use(&mut conn, "k"), key(0, 2, 1));
}

#[test]
fn rebalance_admits_a_step_whose_admission_was_skipped() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    let first = start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));
    let second = start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));
    let running = claim(&mut conn, 10);
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].execution_id, first.id);
    let held = only_step(&mut conn, second.id);
    assert!(held.throttled);
    assert_eq!(
        engine::rebalance_concurrency_keys(&mut conn).unwrap(),
        1,
        "the key with a throttled step is looked at"
    );
    assert!(
        only_step(&mut conn, second.id).throttled,
        "but it has no free slot"
    );

    // L holds the throttled step's row while the slot frees.
    let mut l = Session::new(&db, "L");
    let mut w = Session::new(&db, "W");
    l.begin();
    l.run("L locks the throttled step", move |c| {
        exec(
            c,
            "SELECT 1 FROM execution_steps WHERE id = $1 FOR UPDATE",
            held.id,
        )
    });
    assert_eq!(l.settle(&mut conn), State::Done);
    let lease = running[0].lease().unwrap();
    w.run("W completes the running step", move |c| {
        engine::complete_step(c, &lease, None).map(|s| s.status)
    });
    assert_eq!(
        w.settle(&mut conn),
        State::Done,
        "the completion does not wait for L"
    );
    assert_eq!(w.last(), ok("Completed"));
    assert!(
        only_step(&mut conn, second.id).throttled,
        "its admission was skipped"
    );
    assert!(claim(&mut conn, 10).is_empty());
    let counts = assert_invariants(&mut conn);
    assert_eq!(counts.get(&InvariantKind::ThrottledWithFreeSlot), Some(&1));

    l.rollback();
    assert_eq!(l.settle(&mut conn), State::Done);
    l.finish();
    w.finish();
    assert_eq!(engine::rebalance_concurrency_keys(&mut conn).unwrap(), 1);
    assert!(!only_step(&mut conn, second.id).throttled);
    assert_eq!(claim(&mut conn, 10).len(), 1);
    assert_eq!(engine::rebalance_concurrency_keys(&mut conn).unwrap(), 0);
    assert!(assert_invariants(&mut conn).is_empty());
}

#[test]
fn pausing_an_execution_frees_its_slot_and_resuming_it_waits_for_one() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    let first = start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));
    let second = start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));
    assert!(only_step(&mut conn, second.id).throttled);

    engine::pause(&mut conn, first.id).unwrap();
    assert!(
        !only_step(&mut conn, second.id).throttled,
        "the paused one's slot went to the next"
    );
    assert_eq!(key_use(&mut conn, "k"), key(0, 1, 0));
    engine::resume(&mut conn, first.id).unwrap();
    assert!(
        only_step(&mut conn, first.id).throttled,
        "resumed into a full key: held back"
    );
    assert_eq!(key_use(&mut conn, "k"), key(0, 1, 1));
    let got = claim(&mut conn, 10);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].execution_id, second.id);
}

#[test]
fn a_freed_slot_goes_to_the_highest_priority_even_when_a_downstream_step_becomes_ready() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let chain = workflow_of(
        &mut conn,
        vec![Node::new("a1", "task"), Node::new("a2", "task")],
        &[("a1", "a2")],
    );
    let single = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    let low = start(&mut conn, NewExecution::new(chain.id).concurrency_key("k"));
    let high = start(
        &mut conn,
        NewExecution::new(single.id)
            .concurrency_key("k")
            .priority(10),
    );
    assert!(only_step(&mut conn, high.id).throttled);
    let a1 = claim(&mut conn, 10);
    assert_eq!(a1[0].node_id, "a1");
    complete(&mut conn, &a1[0]);
    assert!(
        !only_step(&mut conn, high.id).throttled,
        "the freed slot goes to the priority-10 step; a2 (priority 0) is held back"
    );
    assert!(step_of(&mut conn, low.id, "a2").throttled);
}

/// The claimable notifications committed so far, as (queue, steps), sorted.
fn wakeups(listener: &mut PgConnection) -> Vec<(String, u32)> {
    listener.batch_execute("SELECT 1").unwrap();
    let mut out: Vec<(String, u32)> = listener
        .notifications_iter()
        .map(|n| n.unwrap())
        .filter(|n| n.channel == engine::CLAIMABLE_CHANNEL)
        .map(|n| {
            serde_json::from_str::<engine::Claimable>(&n.payload).expect("a claimable payload")
        })
        .map(|c| (c.queue, c.steps))
        .collect();
    out.sort();
    out
}

#[test]
fn workers_are_woken_when_a_key_admits_a_step_or_a_queue_gains_room() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let mut listener = db.connect();
    listener
        .batch_execute("LISTEN workflow_db_claimable")
        .unwrap();
    let wf = one_node(&mut conn, "mail");
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));
    start(&mut conn, NewExecution::new(wf.id).concurrency_key("k"));
    assert_eq!(
        wakeups(&mut listener),
        [("mail".to_owned(), 1)],
        "only the admitted step"
    );

    // A slot frees: the admitted step wakes its queue's workers.
    let first = claim(&mut conn, 10);
    assert!(wakeups(&mut listener).is_empty(), "a claim wakes nobody");
    complete(&mut conn, &first[0]);
    assert_eq!(wakeups(&mut listener), [("mail".to_owned(), 1)]);

    // A full queue gains room.
    engine::remove_concurrency_limit(&mut conn, "k").unwrap();
    start(&mut conn, NewExecution::new(wf.id));
    engine::set_queue_limit(&mut conn, "mail", Some(1)).unwrap();
    wakeups(&mut listener);
    let running = claim(&mut conn, 10);
    assert_eq!(running.len(), 1);
    assert!(wakeups(&mut listener).is_empty());
    complete(&mut conn, &running[0]);
    assert_eq!(
        wakeups(&mut listener),
        [("mail".to_owned(), 1)],
        "room in a limited queue"
    );

    // A resumed queue.
    engine::pause_queue(&mut conn, "mail").unwrap();
    wakeups(&mut listener);
    engine::resume_queue(&mut conn, "mail").unwrap();
    assert_eq!(wakeups(&mut listener), [("mail".to_owned(), 0)]);
    assert_eq!(claim(&mut conn, 10).len(), 1);
}

// ---------------------------------------------------------------------------
// 5. Delayed start.

#[test]
fn a_delayed_execution_stays_pending_until_it_is_due() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![Node::new("a", "task"), Node::new("b", "task")],
        &[("a", "b")],
    );
    let at = Utc::now() + chrono::Duration::hours(1);
    let e = start(&mut conn, NewExecution::new(wf.id).start_after(at));
    assert_eq!(e.status, ExecutionStatus::Pending);
    assert!(e.start_after.is_some());
    assert!(
        steps(&mut conn, e.id)
            .iter()
            .all(|s| s.status == StepStatus::Pending && s.parked)
    );
    assert!(claim(&mut conn, 10).is_empty());

    let before = fingerprint(&mut conn);
    assert_refused(
        "an early start by hand",
        exec(
            &mut conn,
            "UPDATE executions SET status = 'running' WHERE id = $1",
            e.id,
        ),
        "executions_start_after",
        "may not start before",
    );
    assert_eq!(fingerprint(&mut conn), before);
    assert!(
        engine::start_due_executions(&mut conn, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(exec_status(&mut conn, e.id), ExecutionStatus::Pending);

    // Due: started once, its root step claimable.
    exec(
        &mut conn,
        "UPDATE executions SET start_after = now() - interval '1 second' WHERE id = $1",
        e.id,
    )
    .unwrap();
    assert_eq!(engine::start_due_executions(&mut conn, 10).unwrap(), [e.id]);
    assert_eq!(exec_status(&mut conn, e.id), ExecutionStatus::Running);
    assert!(
        engine::start_due_executions(&mut conn, 10)
            .unwrap()
            .is_empty()
    );
    let got = claim(&mut conn, 10);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].node_id, "a");
    assert_invariants(&mut conn);
}

#[test]
fn a_start_after_in_the_past_starts_at_once_and_clearing_it_starts_by_hand() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    let past = start(
        &mut conn,
        NewExecution::new(wf.id).start_after(Utc::now() - chrono::Duration::minutes(1)),
    );
    assert_eq!(past.status, ExecutionStatus::Running);
    assert_eq!(claim(&mut conn, 10).len(), 1);

    let later = start(
        &mut conn,
        NewExecution::new(wf.id).start_after(Utc::now() + chrono::Duration::hours(1)),
    );
    exec(
        &mut conn,
        "UPDATE executions SET status = 'running', start_after = NULL WHERE id = $1",
        later.id,
    )
    .unwrap();
    assert_eq!(exec_status(&mut conn, later.id), ExecutionStatus::Running);
    assert_eq!(claim(&mut conn, 10).len(), 1);
}

#[test]
fn a_delayed_start_of_a_limited_key_is_admitted_when_it_starts() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    let at = Utc::now() + chrono::Duration::hours(1);
    let delayed: Vec<Uuid> = (0..3)
        .map(|_| {
            start(
                &mut conn,
                NewExecution::new(wf.id)
                    .concurrency_key("k")
                    .start_after(at),
            )
            .id
        })
        .collect();
    assert_eq!(
        key_use(&mut conn, "k"),
        key(0, 0, 0),
        "parked: neither admitted nor throttled"
    );
    batch(
        &mut conn,
        "UPDATE executions SET start_after = now() - interval '1 second'",
    );
    let mut started = engine::start_due_executions(&mut conn, 10).unwrap();
    started.sort();
    let mut expected = delayed.clone();
    expected.sort();
    assert_eq!(started, expected);
    assert_eq!(key_use(&mut conn, "k"), key(0, 1, 2));
}

fn batch(conn: &mut PgConnection, sql: &str) {
    conn.batch_execute(sql).unwrap();
}

/// `n` delayed executions, then made due.
fn due_executions(conn: &mut PgConnection, wf: &Workflow, n: usize) -> Vec<Uuid> {
    let at = Utc::now() + chrono::Duration::hours(1);
    let ids = (0..n)
        .map(|_| start(conn, NewExecution::new(wf.id).start_after(at)).id)
        .collect();
    batch(
        conn,
        "UPDATE executions SET start_after = now() - interval '1 second' WHERE status = 'pending'",
    );
    ids
}

#[test]
fn concurrent_start_due_executions_start_each_execution_once() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");

    // Forced: A's batch is started but not committed; B skips it, takes the rest.
    let first: BTreeSet<Uuid> = due_executions(&mut conn, &wf, 25).into_iter().collect();
    let mut a = Session::new(&db, "A");
    let mut b = Session::new(&db, "B");
    let (tx, rx) = mpsc::channel::<(char, Vec<Uuid>)>();
    let tx_b = tx.clone();
    a.begin();
    a.run("A starts 10", move |c| {
        engine::start_due_executions(c, 10).map(|ids| tx.send(('A', ids)).unwrap())
    });
    assert_eq!(a.settle(&mut conn), State::Done);
    b.run("B starts up to 100", move |c| {
        engine::start_due_executions(c, 100).map(|ids| tx_b.send(('B', ids)).unwrap())
    });
    assert_eq!(
        b.settle(&mut conn),
        State::Done,
        "B skips A's rows instead of waiting"
    );
    a.commit();
    assert_eq!(a.settle(&mut conn), State::Done);
    let outcomes = [a.finish(), b.finish()];
    assert!(
        outcomes.iter().flatten().all(|(_, o)| o.is_ok()),
        "{outcomes:?}"
    );
    let got: HashMap<char, Vec<Uuid>> = rx.try_iter().collect();
    assert_eq!(got[&'A'].len(), 10);
    assert_eq!(got[&'B'].len(), 15);
    let union: BTreeSet<Uuid> = got.values().flatten().copied().collect();
    assert_eq!(union, first, "each one started exactly once");
    assert!(
        engine::start_due_executions(&mut conn, 100)
            .unwrap()
            .is_empty()
    );

    // Threads released together, small batches, until none is due.
    const THREADS: usize = 4;
    let second: BTreeSet<Uuid> = due_executions(&mut conn, &wf, 60).into_iter().collect();
    let barrier = Barrier::new(THREADS);
    let deadline = Instant::now() + DEADLINE;
    let all: Vec<Uuid> = thread::scope(|s| {
        let (db, barrier) = (&db, &barrier);
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(move || {
                    let mut c = db.connect();
                    barrier.wait();
                    let mut mine = Vec::new();
                    loop {
                        assert!(Instant::now() < deadline);
                        let ids = engine::start_due_executions(&mut c, 7).unwrap();
                        if ids.is_empty() {
                            return mine;
                        }
                        mine.extend(ids);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(all.len(), second.len(), "no execution returned twice");
    assert_eq!(all.iter().copied().collect::<BTreeSet<_>>(), second);
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM (SELECT execution_id FROM execution_events \
             WHERE step_id IS NULL AND to_status = 'running' GROUP BY execution_id HAVING count(*) <> 1) x"
        ),
        0,
        "one start event per execution"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM executions WHERE status = 'running'"
        ),
        85
    );
}

#[test]
fn an_execution_inserted_running_before_its_start_after_is_refused() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    let result = diesel::sql_query(
        "INSERT INTO executions (id, workflow_id, status, start_after) \
         VALUES (gen_random_uuid(), $1, 'running', now() + interval '1 hour')",
    )
    .bind::<SqlUuid, _>(wf.id)
    .execute(&mut conn);
    assert_refused(
        "a running execution inserted before its start_after",
        result,
        "executions_start_after",
        "may not start before",
    );
}

// ---------------------------------------------------------------------------
// 6. Deduplication.

#[test]
fn a_dedup_key_returns_the_unfinished_execution_then_starts_a_new_one() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    let other = one_node(&mut conn, "task");
    let first = start(&mut conn, NewExecution::new(wf.id).dedup_key("k"));
    assert_eq!(first.dedup_key.as_deref(), Some("k"));
    assert_eq!(first.dedup_until, None);

    let again =
        engine::start_execution(&mut conn, &NewExecution::new(wf.id).dedup_key("k")).unwrap();
    assert!(!again.created);
    assert_eq!(again.execution.id, first.id);
    start(&mut conn, NewExecution::new(wf.id).dedup_key("k2"));
    start(&mut conn, NewExecution::new(other.id).dedup_key("k"));

    // A plain insert with the key is refused while the first holds it.
    let before = fingerprint(&mut conn);
    let r = refusal(
        "a plain insert of a duplicate",
        NewExecution::new(wf.id).dedup_key("k").create(&mut conn),
    );
    assert_eq!(r.kind, format!("{:?}", DatabaseErrorKind::UniqueViolation));
    assert_eq!(r.constraint.as_deref(), Some("executions_dedup"));
    assert_eq!(fingerprint(&mut conn), before);

    // Completed: the key starts a new one; cancelled: again.
    let s = claim(&mut conn, 10)
        .into_iter()
        .find(|s| s.execution_id == first.id)
        .unwrap();
    complete(&mut conn, &s);
    assert_eq!(exec_status(&mut conn, first.id), ExecutionStatus::Completed);
    let second = start(&mut conn, NewExecution::new(wf.id).dedup_key("k"));
    assert_ne!(second.id, first.id);
    let dup = engine::start_execution(&mut conn, &NewExecution::new(wf.id).dedup_key("k")).unwrap();
    assert_eq!((dup.created, dup.execution.id), (false, second.id));
    engine::cancel(&mut conn, second.id).unwrap();
    let third = start(&mut conn, NewExecution::new(wf.id).dedup_key("k"));
    assert!(third.id != first.id && third.id != second.id);
}

#[test]
fn a_dedup_window_holds_after_the_execution_finished() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    let hour = Duration::from_secs(3600);
    let before_start = Utc::now();
    let first = start(&mut conn, NewExecution::new(wf.id).dedup_window("w", hour));
    let until = first.dedup_until.expect("a window sets dedup_until");
    assert!(
        until >= before_start + chrono::Duration::minutes(59)
            && until <= Utc::now() + chrono::Duration::minutes(61)
    );
    let s = claim(&mut conn, 10);
    complete(&mut conn, &s[0]);
    assert_eq!(exec_status(&mut conn, first.id), ExecutionStatus::Completed);

    let dup = engine::start_execution(&mut conn, &NewExecution::new(wf.id).dedup_window("w", hour))
        .unwrap();
    assert_eq!(
        (dup.created, dup.execution.id),
        (false, first.id),
        "finished, but within its window"
    );
    let dup = engine::start_execution(&mut conn, &NewExecution::new(wf.id).dedup_key("w")).unwrap();
    assert_eq!(
        (dup.created, dup.execution.id),
        (false, first.id),
        "the key is held, whatever the new start's window"
    );

    let before = fingerprint(&mut conn);
    let r = refusal(
        "a plain SQL insert within the window",
        exec(
            &mut conn,
            "INSERT INTO executions (id, workflow_id, dedup_key) VALUES (gen_random_uuid(), $1, 'w')",
            wf.id,
        ),
    );
    assert_eq!(r.kind, format!("{:?}", DatabaseErrorKind::UniqueViolation));
    assert_eq!(r.constraint.as_deref(), Some("executions_dedup"));
    assert!(r.message.contains(&first.id.to_string()), "{r:?}");
    assert_eq!(fingerprint(&mut conn), before);

    // Past the window, the key is free.
    exec(
        &mut conn,
        "UPDATE executions SET dedup_until = now() - interval '1 second' WHERE id = $1",
        first.id,
    )
    .unwrap();
    let next = start(&mut conn, NewExecution::new(wf.id).dedup_window("w", hour));
    assert_ne!(next.id, first.id);
}

#[test]
fn racing_starts_with_one_dedup_key_create_exactly_one() {
    const THREADS: usize = 8;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");
    for round in 0..3 {
        let key = format!("race-{round}");
        let barrier = Barrier::new(THREADS);
        let results: Vec<(Uuid, bool)> = thread::scope(|s| {
            let (db, barrier, key) = (&db, &barrier, &key);
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(move || {
                        let mut c = db.connect();
                        let new = NewExecution::new(wf.id).dedup_key(key.as_str());
                        barrier.wait();
                        let started = engine::start_execution(&mut c, &new).unwrap();
                        (started.execution.id, started.created)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            results.iter().filter(|(_, created)| *created).count(),
            1,
            "{results:?}"
        );
        let ids: BTreeSet<Uuid> = results.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 1, "every caller got the one execution");
    }
    assert_eq!(scalar(&mut conn, "SELECT count(*) AS n FROM executions"), 3);
}

#[test]
fn a_start_with_a_dedup_key_waits_for_an_open_one_and_returns_it() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, "task");

    for a_commits in [true, false] {
        let key = format!("open-{a_commits}");
        let new_a = NewExecution::new(wf.id).dedup_key(key.as_str());
        let new_b = NewExecution::new(wf.id).dedup_key(key.as_str());
        let (id_a, id_b) = (new_a.id, new_b.id);
        let mut a = Session::new(&db, "A");
        let mut b = Session::new(&db, "B");
        a.begin();
        a.run("A starts", move |c| {
            engine::start_execution(c, &new_a).map(|s| s.created)
        });
        assert_eq!(a.settle(&mut conn), State::Done);
        assert_eq!(a.last(), ok("true"));
        b.run("B starts", move |c| {
            engine::start_execution(c, &new_b)
                .map(|s| (s.execution.id == id_a, s.execution.id == id_b, s.created))
        });
        assert_eq!(
            b.settle(&mut conn),
            State::Blocked,
            "B waits for A's (workflow, key) lock"
        );
        assert!(b.blockers(&mut conn).contains(&a.pid));
        if a_commits {
            a.commit();
        } else {
            a.rollback();
        }
        assert_eq!(a.settle(&mut conn), State::Done);
        assert_eq!(b.settle(&mut conn), State::Done);
        if a_commits {
            assert_eq!(
                b.last(),
                ok("(true, false, false)"),
                "B returns A's execution"
            );
        } else {
            assert_eq!(
                b.last(),
                ok("(false, true, true)"),
                "A rolled back: B creates its own"
            );
        }
        a.finish();
        b.finish();
    }

    // A plain insert waits the same way, then is refused.
    let new_a = NewExecution::new(wf.id).dedup_key("plain");
    let mut a = Session::new(&db, "A");
    let mut b = Session::new(&db, "B");
    a.begin();
    a.run("A starts", move |c| {
        engine::start_execution(c, &new_a).map(|s| s.created)
    });
    assert_eq!(a.settle(&mut conn), State::Done);
    let wf_id = wf.id;
    b.run("B inserts", move |c| {
        exec(
            c,
            "INSERT INTO executions (id, workflow_id, dedup_key) VALUES (gen_random_uuid(), $1, 'plain')",
            wf_id,
        )
    });
    assert_eq!(b.settle(&mut conn), State::Blocked);
    a.commit();
    assert_eq!(a.settle(&mut conn), State::Done);
    assert_eq!(b.settle(&mut conn), State::Done);
    let outcome = b.last().unwrap_err();
    assert!(outcome.contains("has the same dedup key"), "{outcome}");
    a.finish();
    b.finish();
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM executions WHERE dedup_key = 'plain'"
        ),
        1
    );
}

// ---------------------------------------------------------------------------
// 7. Graph validation.

#[test]
fn flow_control_config_keys_are_validated() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let cases = [
        (json!({"priority": "high"}), "config.priority"),
        (json!({"priority": 1.5}), "config.priority"),
        (json!({"priority": 1_i64 << 40}), "config.priority"),
        (json!({"queue": ""}), "config.queue"),
        (json!({"queue": 7}), "config.queue"),
        (json!({"concurrency_key": ""}), "config.concurrency_key"),
        (json!({"concurrency_key": null}), "config.concurrency_key"),
    ];
    for (config, key) in cases {
        let graph = WorkflowGraph {
            nodes: vec![
                Node::new("fine", "t"),
                Node::new("bad-node", "t").config(config.clone()),
            ],
            edges: vec![],
        };
        match NewWorkflow::from_graph("v", &graph).create(&mut conn) {
            Err(Error::InvalidGraph { reason }) => {
                assert!(reason.contains("bad-node"), "{config}: {reason}");
                assert!(reason.contains(key), "{config}: {reason}");
            }
            other => panic!("{config}: expected InvalidGraph, got {other:?}"),
        }
    }
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) AS n FROM workflows"),
        0,
        "nothing written"
    );
    let fine = WorkflowGraph {
        nodes: vec![
            Node::new("a", "t")
                .config(json!({"priority": -3, "queue": "q", "concurrency_key": "k"})),
        ],
        edges: vec![],
    };
    NewWorkflow::from_graph("v", &fine)
        .create(&mut conn)
        .unwrap();
}

// ---------------------------------------------------------------------------
// Exactness of the queue counter whoever writes (defects found while testing).

/// A running execution of a workflow with nodes a and b of type q, a queue limited to `limit`.
fn limited_queue(conn: &mut PgConnection, limit: i32) -> Execution {
    let wf = workflow_of(conn, vec![Node::new("a", "q"), Node::new("b", "q")], &[]);
    let e = start(conn, NewExecution::new(wf.id));
    engine::set_queue_limit(conn, "q", Some(limit)).unwrap();
    e
}

#[test]
fn a_step_inserted_running_counts_against_its_queue_and_key() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let e = limited_queue(&mut conn, 1);
    let insert_running = |conn: &mut PgConnection, node: &str, key: Option<&str>| {
        diesel::sql_query(
            "INSERT INTO execution_steps (id, execution_id, node_id, status, concurrency_key, queue) \
             VALUES (gen_random_uuid(), $1, $2, 'running', $3, 'q')",
        )
        .bind::<SqlUuid, _>(e.id)
        .bind::<Text, _>(node)
        .bind::<Nullable<Text>, _>(key)
        .execute(conn)
    };
    insert_running(&mut conn, "x", None).unwrap();
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 1,
            counter: Some(1)
        }
    );
    assert_refused(
        "a second running step inserted into a full queue",
        insert_running(&mut conn, "y", None),
        "queues_max_running",
        "queue q is at its limit",
    );
    let x = step_of(&mut conn, e.id, "x");
    exec(
        &mut conn,
        "UPDATE execution_steps SET status = 'completed' WHERE id = $1",
        x.id,
    )
    .expect("the inserted step can finish");
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 0,
            counter: Some(0)
        }
    );

    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    engine::set_queue_limit(&mut conn, "q", None).unwrap();
    insert_running(&mut conn, "k1", Some("k")).unwrap();
    assert_refused(
        "a running step inserted beyond its key's limit",
        insert_running(&mut conn, "k2", Some("k")),
        "concurrency_limits_max_running",
        "concurrency key k is at its limit",
    );
}

#[test]
fn a_running_step_moved_to_another_queue_moves_its_count() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    limited_queue(&mut conn, 5);
    engine::set_queue_limit(&mut conn, "q2", Some(5)).unwrap();
    let a = claim_from(&mut conn, &["q"], 1).remove(0);
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 1,
            counter: Some(1)
        }
    );
    exec(
        &mut conn,
        "UPDATE execution_steps SET queue = 'q2' WHERE id = $1",
        a.id,
    )
    .unwrap();
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 0,
            counter: Some(0)
        }
    );
    assert_eq!(
        queue_count(&mut conn, "q2"),
        QueueCount {
            running: 1,
            counter: Some(1)
        }
    );

    engine::pause_queue(&mut conn, "q").unwrap();
    assert_refused(
        "a running step moved into a paused queue",
        exec(
            &mut conn,
            "UPDATE execution_steps SET queue = NULL WHERE id = $1",
            a.id,
        ),
        "queues_max_running",
        "queue q is paused",
    );
    assert_invariants(&mut conn);
}

#[test]
fn deleting_a_running_step_frees_its_queue_slot() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let e = limited_queue(&mut conn, 1);
    claim_from(&mut conn, &["q"], 1);
    engine::cancel(&mut conn, e.id).unwrap();
    assert_eq!(
        queue_count(&mut conn, "q").running,
        1,
        "a cancelled execution's running step runs on"
    );
    exec(&mut conn, "DELETE FROM executions WHERE id = $1", e.id).unwrap();
    assert_eq!(
        queue_count(&mut conn, "q"),
        QueueCount {
            running: 0,
            counter: Some(0)
        }
    );
}

#[test]
fn pausing_a_configured_queue_does_not_stall_other_queues() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::new("a", "q"),
            Node::new("o1", "other"),
            Node::new("o2", "third"),
        ],
        &[],
    );
    start(&mut conn, NewExecution::new(wf.id));
    engine::set_queue_limit(&mut conn, "q", Some(5)).unwrap();

    let mut h = Session::new(&db, "H");
    let mut p = Session::new(&db, "P");
    let mut w = Session::new(&db, "W");
    h.begin();
    h.run("H claims from another queue, transaction open", |c| {
        engine::claim_from(c, "H", &names(&["other"]), 1, LEASE).map(|v| v.len())
    });
    assert_eq!(h.settle(&mut conn), State::Done);
    p.run("P pauses q", |c| {
        engine::pause_queue(c, "q").map(|q| q.paused)
    });
    let paused = p.settle(&mut conn);
    w.run("W claims from a third queue", |c| {
        engine::claim_from(c, "W", &names(&["third"]), 1, LEASE).map(|v| v.len())
    });
    let claimed = w.settle(&mut conn);
    h.commit();
    h.settle(&mut conn);
    p.settle(&mut conn);
    w.settle(&mut conn);
    h.finish();
    p.finish();
    w.finish();
    assert_eq!(
        (paused, claimed),
        (State::Done, State::Done),
        "(pause of q, claim from a third queue): Blocked = it waited for H's open transaction \
         on an unrelated queue (the claim behind the pause's SHARE lock request)"
    );
}
