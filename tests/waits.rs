//! Durable timers and signals (migrations 000039–000041): wait steps the
//! engine runs itself. Each rule against a real database; the races (a
//! signal sent while the step becomes ready, several deliverers at once)
//! with real connections, forced interleavings (a session holding its
//! transaction open, the other seen waiting in `pg_blocking_pids`) and
//! threads released together by a barrier. Time is never slept for: a wait
//! is made due by moving its `wake_at` (or deadline) into the past.
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use serde_json::{Value, json};
use uuid::Uuid;
use workflow_db::engine::{
    self, CheckOptions, SIGNAL_NODE_TYPE, TIMER_NODE_TYPE, WAITS_WORKER, WaitReport,
};
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Edge, Error, Execution, ExecutionEvent, ExecutionStatus, ExecutionStep, NewExecution,
    NewWorkflow, Node, StepStatus, Workflow, WorkflowGraph,
};

use common::LEASE;
use common::session::{Session, State};

const HOUR: Duration = Duration::from_secs(3600);

fn workflow_of(conn: &mut PgConnection, nodes: Vec<Node>, edges: &[(&str, &str)]) -> Workflow {
    let graph = WorkflowGraph {
        nodes,
        edges: edges.iter().map(|(s, t)| Edge::new(*s, *t)).collect(),
    };
    NewWorkflow::from_graph("waits", &graph)
        .create(conn)
        .unwrap()
}

fn start(conn: &mut PgConnection, new: NewExecution) -> Execution {
    engine::start_execution(conn, &new).unwrap().execution
}

fn step_of(conn: &mut PgConnection, execution: Uuid, node: &str) -> ExecutionStep {
    ExecutionStep::list_for_execution(conn, execution)
        .unwrap()
        .into_iter()
        .find(|s| s.node_id == node)
        .unwrap_or_else(|| panic!("no step {node}"))
}

fn status(conn: &mut PgConnection, id: Uuid) -> ExecutionStatus {
    Execution::find(conn, id).unwrap().status
}

/// Makes the ready waits of an execution due now, as if their time had come.
fn make_due(conn: &mut PgConnection, execution: Uuid) {
    diesel::sql_query(
        "UPDATE execution_steps SET wake_at = now() - interval '1 second', \
                wait_until = CASE WHEN wait_signal IS NOT NULL AND wait_until IS NOT NULL \
                                  THEN now() - interval '1 second' ELSE wait_until END \
          WHERE execution_id = $1 AND wake_at IS NOT NULL",
    )
    .bind::<SqlUuid, _>(execution)
    .execute(conn)
    .unwrap();
}

fn fire(conn: &mut PgConnection) -> WaitReport {
    engine::fire_due_waits(conn, 100).unwrap()
}

fn report(due: u64, timers: u64, delivered: u64, timed_out: u64) -> WaitReport {
    let mut r = WaitReport::default();
    r.due = due;
    r.timers_fired = timers;
    r.signals_delivered = delivered;
    r.signals_timed_out = timed_out;
    r
}

fn claim_all(conn: &mut PgConnection) -> Vec<ExecutionStep> {
    engine::claim_steps(conn, "w", 100, LEASE).unwrap()
}

fn complete(conn: &mut PgConnection, step: &ExecutionStep) {
    engine::complete_step(conn, &step.lease().unwrap(), None).unwrap();
}

fn close_to(a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    (a - b).abs() < TimeDelta::seconds(30)
}

/// The step's history as `from->to@worker`.
fn history(conn: &mut PgConnection, step: Uuid) -> Vec<String> {
    use workflow_db::prelude::execution_events as ev;
    ev::table
        .filter(ev::step_id.eq(step))
        .order(ev::id)
        .select(ExecutionEvent::as_select())
        .load(conn)
        .unwrap()
        .into_iter()
        .map(|e| {
            format!(
                "{}->{}@{}",
                e.from_status.unwrap_or_default(),
                e.to_status,
                e.payload
                    .as_ref()
                    .and_then(|p| p.get("worker"))
                    .and_then(Value::as_str)
                    .unwrap_or("-")
            )
        })
        .collect()
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn scalar(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<N>(conn).unwrap().n
}

fn assert_clean(conn: &mut PgConnection) {
    let report = engine::check_invariants(conn, &CheckOptions::default()).unwrap();
    assert!(report.is_clean(), "{:#?}", report.violations);
}

// ---------------------------------------------------------------------------
// Timers.

#[test]
fn a_timer_fires_when_due_and_not_before_then_unblocks_its_downstream() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![Node::timer("wait", HOUR), Node::new("after", "work")],
        &[("wait", "after")],
    );
    let e = start(&mut conn, NewExecution::new(wf.id));
    let timer = step_of(&mut conn, e.id, "wait");
    assert_eq!(timer.node_type.as_deref(), Some(TIMER_NODE_TYPE));
    let wake = timer.wake_at.expect("a ready timer is armed");
    assert!(
        close_to(wake, timer.created_at + TimeDelta::hours(1)),
        "{wake} vs {}",
        timer.created_at
    );
    // Not due: nothing fires, no worker claims it.
    assert_eq!(fire(&mut conn), WaitReport::default());
    assert!(claim_all(&mut conn).is_empty());
    assert_eq!(step_of(&mut conn, e.id, "wait").status, StepStatus::Pending);

    make_due(&mut conn, e.id);
    assert!(
        claim_all(&mut conn).is_empty(),
        "workers never take a timer"
    );
    assert_eq!(fire(&mut conn), report(1, 1, 0, 0));
    let fired = step_of(&mut conn, e.id, "wait");
    assert_eq!(fired.status, StepStatus::Completed);
    let output = fired.output.clone().unwrap();
    assert!(
        output.get("due_at").is_some() && output.get("fired_at").is_some(),
        "{output}"
    );
    assert_eq!(
        history(&mut conn, fired.id),
        [
            format!("pending->running@{WAITS_WORKER}"),
            format!("running->completed@{WAITS_WORKER}")
        ]
    );
    // Fired once: a second call finds nothing.
    assert_eq!(fire(&mut conn), WaitReport::default());
    let next = claim_all(&mut conn);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].node_id, "after");
    complete(&mut conn, &next[0]);
    assert_eq!(status(&mut conn, e.id), ExecutionStatus::Completed);
    assert_clean(&mut conn);
}

#[test]
fn a_timer_counts_from_its_upstream_being_done_and_a_root_from_the_delayed_start() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::new("first", "work"),
            Node::timer("then", HOUR),
            Node::timer("root", HOUR),
        ],
        &[("first", "then")],
    );
    let at = Utc::now() + TimeDelta::days(1);
    let delayed = start(&mut conn, NewExecution::new(wf.id).start_after(at));
    let root = step_of(&mut conn, delayed.id, "root");
    assert!(
        close_to(root.wake_at.unwrap(), at + TimeDelta::hours(1)),
        "a root timer of a delayed execution counts from its start: {:?}",
        root.wake_at
    );

    let e = start(&mut conn, NewExecution::new(wf.id));
    assert_eq!(
        step_of(&mut conn, e.id, "then").wake_at,
        None,
        "not ready, not armed"
    );
    // Pretend `first` ran for a while: the timer counts from its completion.
    let first = claim_all(&mut conn);
    assert_eq!(first.len(), 1, "{first:?}");
    complete(&mut conn, &first[0]);
    let then = step_of(&mut conn, e.id, "then");
    assert!(close_to(
        then.wake_at.unwrap(),
        Utc::now() + TimeDelta::hours(1)
    ));
}

#[test]
fn a_timer_until_an_absolute_time_waits_for_it_or_fires_at_once_when_past() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let later = Utc::now() + TimeDelta::days(2);
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::timer_until("later", later),
            Node::timer_until("past", Utc::now() - TimeDelta::days(1)),
        ],
        &[],
    );
    let e = start(&mut conn, NewExecution::new(wf.id));
    let step = step_of(&mut conn, e.id, "later");
    assert!(close_to(step.wake_at.unwrap(), later));
    assert_eq!(
        step.wait_until.map(|t| t.timestamp()),
        Some(later.timestamp())
    );
    assert_eq!(fire(&mut conn), report(1, 1, 0, 0));
    assert_eq!(
        step_of(&mut conn, e.id, "past").status,
        StepStatus::Completed
    );
    assert_eq!(
        step_of(&mut conn, e.id, "later").status,
        StepStatus::Pending
    );
}

#[test]
fn a_paused_execution_keeps_its_due_timer_until_it_resumes() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(&mut conn, vec![Node::timer("wait", HOUR)], &[]);
    let e = start(&mut conn, NewExecution::new(wf.id));
    make_due(&mut conn, e.id);
    engine::pause(&mut conn, e.id).unwrap();
    assert_eq!(fire(&mut conn), WaitReport::default());
    assert_eq!(step_of(&mut conn, e.id, "wait").status, StepStatus::Pending);
    engine::resume(&mut conn, e.id).unwrap();
    assert_eq!(fire(&mut conn), report(1, 1, 0, 0));
    assert_eq!(status(&mut conn, e.id), ExecutionStatus::Completed);
}

#[test]
fn wait_steps_take_no_concurrency_key_and_no_queue_and_no_worker_claims_them() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![Node::timer("t", Duration::ZERO), Node::signal("s", "go")],
        &[],
    );
    engine::set_concurrency_limit(&mut conn, "tenant", 1).unwrap();
    let e = start(
        &mut conn,
        NewExecution::new(wf.id).concurrency_key("tenant"),
    );
    for node in ["t", "s"] {
        let s = step_of(&mut conn, e.id, node);
        assert_eq!(s.concurrency_key, None, "{node}");
        assert!(!s.throttled, "{node}");
    }
    let queues = [TIMER_NODE_TYPE.to_owned(), SIGNAL_NODE_TYPE.to_owned()];
    assert!(
        engine::claim_from(&mut conn, "w", &queues, 10, LEASE)
            .unwrap()
            .is_empty()
    );
    assert!(claim_all(&mut conn).is_empty());
    assert_eq!(engine::next_claimable_at(&mut conn, &queues).unwrap(), None);
    assert!(engine::ready_steps_by_queue(&mut conn).unwrap().is_empty());
    // The timer of 0 s is due at once.
    assert_eq!(fire(&mut conn), report(1, 1, 0, 0));
}

// ---------------------------------------------------------------------------
// Signals.

#[test]
fn a_signal_sent_to_a_waiting_step_completes_it_at_once_with_its_payload() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::signal("approve", "approved"),
            Node::new("ship", "work"),
        ],
        &[("approve", "ship")],
    );
    let e = start(&mut conn, NewExecution::new(wf.id));
    let waiting = step_of(&mut conn, e.id, "approve");
    assert_eq!(waiting.wait_signal.as_deref(), Some("approved"));
    assert_eq!(waiting.wake_at, None, "no timeout: nothing to wake for");
    let payload = json!({"by": "alice"});
    let sent = engine::send_signal(&mut conn, e.id, "approved", Some(&payload)).unwrap();
    assert_eq!(sent.signal.delivered_to, Some(waiting.id));
    assert_eq!(sent.report, report(1, 0, 1, 0));
    let done = step_of(&mut conn, e.id, "approve");
    assert_eq!(done.status, StepStatus::Completed);
    assert_eq!(done.output, Some(payload));
    assert_eq!(
        history(&mut conn, done.id),
        [
            format!("pending->running@{WAITS_WORKER}"),
            format!("running->completed@{WAITS_WORKER}")
        ]
    );
    let next = claim_all(&mut conn);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].node_id, "ship");
    assert_clean(&mut conn);
}

#[test]
fn a_signal_sent_before_the_step_is_reached_is_kept_and_delivered_once_it_is() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![Node::new("first", "work"), Node::signal("wait", "go")],
        &[("first", "wait")],
    );
    let e = start(&mut conn, NewExecution::new(wf.id));
    let sent = engine::send_signal(&mut conn, e.id, "go", Some(&json!(1))).unwrap();
    assert_eq!(sent.signal.delivered_to, None, "nobody waits yet");
    assert_eq!(sent.report, WaitReport::default());
    let wait_id = step_of(&mut conn, e.id, "wait").id;
    let why = engine::why_step_not_running(&mut conn, wait_id).unwrap();
    assert!(
        why.iter()
            .any(|w| w.reason == "signal" && w.detail.contains("kept")),
        "{why:?}"
    );

    let first = claim_all(&mut conn);
    complete(&mut conn, &first[0]);
    let wait = step_of(&mut conn, e.id, "wait");
    assert!(
        wait.wake_at.is_some_and(|t| t <= Utc::now()),
        "woken at once: {wait:?}"
    );
    assert_eq!(fire(&mut conn), report(1, 0, 1, 0));
    let wait = step_of(&mut conn, e.id, "wait");
    assert_eq!(wait.status, StepStatus::Completed);
    assert_eq!(wait.output, Some(json!(1)));
    assert_eq!(status(&mut conn, e.id), ExecutionStatus::Completed);
    let signals = engine::list_signals(&mut conn, e.id).unwrap();
    assert_eq!(signals.len(), 1);
    assert_eq!(signals[0].delivered_to, Some(wait.id));
    assert_eq!(fire(&mut conn), WaitReport::default());
}

#[test]
fn signals_are_a_mailbox_per_name_first_in_first_out_one_per_step() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::signal("one", "tick"),
            Node::new("between", "work"),
            Node::signal("two", "tick"),
            Node::signal("other", "tock"),
        ],
        &[("one", "between"), ("between", "two")],
    );
    let e = start(&mut conn, NewExecution::new(wf.id));
    let a = engine::send_signal(&mut conn, e.id, "tick", Some(&json!("a"))).unwrap();
    let b = engine::send_signal(&mut conn, e.id, "tick", Some(&json!("b"))).unwrap();
    assert_eq!(
        a.signal.delivered_to,
        Some(step_of(&mut conn, e.id, "one").id)
    );
    assert_eq!(
        b.signal.delivered_to, None,
        "one signal per step; b is kept"
    );
    assert_eq!(
        step_of(&mut conn, e.id, "other").status,
        StepStatus::Pending
    );
    let between = claim_all(&mut conn);
    complete(&mut conn, &between[0]);
    assert_eq!(fire(&mut conn), report(1, 0, 1, 0));
    assert_eq!(step_of(&mut conn, e.id, "two").output, Some(json!("b")));
    assert_eq!(
        step_of(&mut conn, e.id, "other").status,
        StepStatus::Pending
    );
    engine::send_signal(&mut conn, e.id, "tock", None).unwrap();
    let other = step_of(&mut conn, e.id, "other");
    assert_eq!((other.status, other.output), (StepStatus::Completed, None));
    assert_eq!(status(&mut conn, e.id), ExecutionStatus::Completed);
    assert_clean(&mut conn);
}

#[test]
fn a_signal_wait_fails_at_its_timeout_and_a_replay_waits_again() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![Node::signal("approve", "approved").with_timeout(HOUR)],
        &[],
    );
    let e = start(&mut conn, NewExecution::new(wf.id));
    let step = step_of(&mut conn, e.id, "approve");
    let deadline = step.wait_until.expect("a deadline");
    assert!(close_to(deadline, Utc::now() + TimeDelta::hours(1)));
    assert_eq!(step.wake_at, Some(deadline));
    let why = engine::why_step_not_running(&mut conn, step.id).unwrap();
    assert!(
        why.iter()
            .any(|w| w.reason == "signal" && w.detail.contains("then fails")),
        "{why:?}"
    );
    make_due(&mut conn, e.id);
    assert_eq!(fire(&mut conn), report(1, 0, 0, 1));
    let failed = step_of(&mut conn, e.id, "approve");
    assert_eq!(failed.status, StepStatus::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap()
            .contains("signal \"approved\" not received by"),
        "{:?}",
        failed.error
    );
    assert_eq!(status(&mut conn, e.id), ExecutionStatus::Failed);

    engine::replay_execution(&mut conn, e.id).unwrap();
    let again = step_of(&mut conn, e.id, "approve");
    assert_eq!(again.status, StepStatus::Pending);
    assert!(close_to(
        again.wait_until.unwrap(),
        Utc::now() + TimeDelta::hours(1)
    ));
    let sent = engine::send_signal(&mut conn, e.id, "approved", Some(&json!(true))).unwrap();
    assert_eq!(sent.signal.delivered_to, Some(again.id));
    assert_eq!(status(&mut conn, e.id), ExecutionStatus::Completed);
    assert_clean(&mut conn);
}

#[test]
fn a_signal_is_refused_for_a_final_or_unknown_execution_or_a_bad_name_and_nothing_is_kept() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(&mut conn, vec![Node::signal("s", "go")], &[]);
    let e = start(&mut conn, NewExecution::new(wf.id));
    engine::cancel(&mut conn, e.id).unwrap();
    match engine::send_signal(&mut conn, e.id, "go", None) {
        Err(Error::SignalRefused { reason, .. }) => {
            assert!(reason.contains("cancelled"), "{reason}")
        }
        other => panic!("expected SignalRefused, got {other:?}"),
    }
    match engine::send_signal(&mut conn, Uuid::now_v7(), "go", None) {
        Err(Error::NotFound { entity, .. }) => assert_eq!(entity, "execution"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    for name in [String::new(), "x".repeat(201)] {
        assert!(matches!(
            engine::send_signal(&mut conn, e.id, &name, None),
            Err(Error::SignalRefused { .. })
        ));
    }
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) AS n FROM execution_signals"),
        0
    );
    // Plain SQL is refused the same way.
    let by_hand =
        diesel::sql_query("INSERT INTO execution_signals (execution_id, name) VALUES ($1, 'go')")
            .bind::<SqlUuid, _>(e.id)
            .execute(&mut conn);
    match by_hand {
        Err(DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, info)) => {
            assert_eq!(info.constraint_name(), Some("execution_signals_unfinished"))
        }
        other => panic!("expected a check violation, got {other:?}"),
    }
}

#[test]
fn a_signal_inserted_with_plain_sql_is_delivered_by_the_next_fire() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(&mut conn, vec![Node::signal("s", "go")], &[]);
    let e = start(&mut conn, NewExecution::new(wf.id));
    // Two in one transaction keep their order (sent_at is the clock's, ids are random).
    conn.transaction(|c| {
        for payload in ["{\"x\": 1}", "{\"x\": 2}"] {
            diesel::sql_query(
                "INSERT INTO execution_signals (execution_id, name, payload) VALUES ($1, 'go', $2::jsonb)",
            )
            .bind::<SqlUuid, _>(e.id)
            .bind::<Text, _>(payload)
            .execute(c)?;
        }
        QueryResult::Ok(())
    })
    .unwrap();
    let s = step_of(&mut conn, e.id, "s");
    assert_eq!(s.status, StepStatus::Pending);
    assert!(s.wake_at.is_some(), "the insert trigger woke the step");
    assert_eq!(fire(&mut conn), report(1, 0, 1, 0));
    assert_eq!(step_of(&mut conn, e.id, "s").output, Some(json!({"x": 1})));
}

// ---------------------------------------------------------------------------
// Validation, in Rust and in the database.

#[test]
fn wait_nodes_with_a_wrong_config_are_refused_with_the_reason() {
    let cases: Vec<(Node, &str)> = vec![
        (Node::new("t", TIMER_NODE_TYPE), "needs config.seconds"),
        (
            Node::new("t", TIMER_NODE_TYPE).config(json!({"seconds": -1})),
            "0 or more",
        ),
        (
            Node::new("t", TIMER_NODE_TYPE).config(json!({"until": "tomorrow"})),
            "RFC 3339",
        ),
        (Node::new("s", SIGNAL_NODE_TYPE), "needs config.signal"),
        (
            Node::signal("s", "go").config(json!({"signal": "go", "timeout_seconds": 0})),
            "more than 0",
        ),
        (
            Node::timer("t", HOUR).config(json!({"seconds": 1, "queue": "q"})),
            "takes no config.queue",
        ),
        (
            Node::signal("s", "go").config(json!({"signal": "go", "concurrency_key": "k"})),
            "takes no config.concurrency_key",
        ),
        (Node::new("x", "workflow_db.sleep"), "reserved"),
        (
            Node::new("w", "work").config(json!({"queue": "workflow_db.timer"})),
            "namespace",
        ),
    ];
    for (node, text) in cases {
        let graph = WorkflowGraph {
            nodes: vec![node.clone()],
            edges: vec![],
        };
        match graph.validate() {
            Err(Error::InvalidGraph { reason }) => {
                assert!(
                    reason.contains(text),
                    "{node:?}: {text:?} not in {reason:?}"
                )
            }
            other => panic!("{node:?}: expected InvalidGraph, got {other:?}"),
        }
    }
}

#[test]
fn the_database_refuses_wait_steps_and_queues_that_break_the_rules_for_any_writer() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // A workflow written by hand, past the crate's validation.
    let wf: Uuid = Uuid::now_v7();
    diesel::sql_query(
        "INSERT INTO workflows (id, name, nodes, edges) VALUES ($1, 'raw', \
         '[{\"id\": \"t\", \"type\": \"workflow_db.timer\", \"config\": {}}]', '[]')",
    )
    .bind::<SqlUuid, _>(wf)
    .execute(&mut conn)
    .unwrap();
    let e = Uuid::now_v7();
    diesel::sql_query(
        "INSERT INTO executions (id, workflow_id, status) VALUES ($1, $2, 'running')",
    )
    .bind::<SqlUuid, _>(e)
    .bind::<SqlUuid, _>(wf)
    .execute(&mut conn)
    .unwrap();
    let insert_step = |conn: &mut PgConnection| {
        diesel::sql_query(
            "INSERT INTO execution_steps (id, execution_id, node_id, status) \
             VALUES (gen_random_uuid(), $1, 't', 'pending')",
        )
        .bind::<SqlUuid, _>(e)
        .execute(conn)
    };
    match insert_step(&mut conn) {
        Err(DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, info)) => {
            assert_eq!(info.constraint_name(), Some("execution_steps_wait_check"));
            assert!(
                info.message().contains("needs config.seconds"),
                "{}",
                info.message()
            );
        }
        other => panic!("expected a check violation, got {other:?}"),
    }
    // With a valid config, the untyped insert takes its type and its wait from the graph.
    diesel::sql_query(
        "UPDATE workflows SET nodes = '[{\"id\": \"t\", \"type\": \"workflow_db.timer\", \"config\": {\"seconds\": 60}}]' \
         WHERE id = $1",
    )
    .bind::<SqlUuid, _>(wf)
    .execute(&mut conn)
    .unwrap();
    insert_step(&mut conn).unwrap();
    let s = step_of(&mut conn, e, "t");
    assert_eq!(s.node_type.as_deref(), Some(TIMER_NODE_TYPE));
    assert!(close_to(
        s.wake_at.unwrap(),
        Utc::now() + TimeDelta::minutes(1)
    ));

    for sql in [
        "INSERT INTO queues (name, paused) VALUES ('workflow_db.timer', true)",
        "UPDATE execution_steps SET concurrency_key = 'k'",
        "UPDATE execution_steps SET queue = 'q'",
    ] {
        match diesel::sql_query(sql).execute(&mut conn) {
            Err(DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, _)) => {}
            other => panic!("{sql}: expected a check violation, got {other:?}"),
        }
    }
    assert!(matches!(
        engine::pause_queue(&mut conn, TIMER_NODE_TYPE),
        Err(Error::Query(_))
    ));
}

// ---------------------------------------------------------------------------
// Races.

fn signal_workflow(conn: &mut PgConnection) -> Workflow {
    workflow_of(
        conn,
        vec![Node::new("first", "work"), Node::signal("wait", "go")],
        &[("first", "wait")],
    )
}

/// The upstream step completes in a transaction held open while the signal
/// is sent: the sender waits for the execution's lock, then finds the step
/// ready and delivers at once. Exactly one delivery.
#[test]
fn a_signal_sent_while_the_step_becomes_ready_waits_and_then_delivers() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = signal_workflow(&mut conn);
    let e = start(&mut conn, NewExecution::new(wf.id));
    let first = claim_all(&mut conn).remove(0);
    let lease = first.lease().unwrap();

    let mut a = Session::new(&db, "completer");
    let mut b = Session::new(&db, "sender");
    a.begin();
    a.run("complete first", move |c| {
        engine::complete_step(c, &lease, None)
    });
    assert_eq!(a.settle(&mut conn), State::Done);
    let id = e.id;
    b.run("send", move |c| {
        engine::send_signal(c, id, "go", Some(&json!("late"))).map(|s| s.signal.delivered_to)
    });
    assert_eq!(b.settle(&mut conn), State::Blocked);
    assert_eq!(b.blockers(&mut conn), [a.pid]);
    a.commit();
    assert_eq!(a.settle(&mut conn), State::Done);
    assert_eq!(b.settle(&mut conn), State::Done);
    let wait = step_of(&mut conn, e.id, "wait");
    assert_eq!(b.last(), Ok(format!("Some({})", wait.id)));
    assert_eq!(wait.status, StepStatus::Completed);
    assert_eq!(wait.output, Some(json!("late")));
    a.finish();
    b.finish();
    assert_eq!(fire(&mut conn), WaitReport::default());
    assert_clean(&mut conn);
}

/// The other order: the signal is sent in a transaction held open while the
/// upstream step completes; the completion waits, then arms the step awake
/// (it sees the committed signal), and the next fire delivers it.
#[test]
fn a_step_becoming_ready_while_a_signal_is_sent_sees_it_and_is_woken() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = signal_workflow(&mut conn);
    let e = start(&mut conn, NewExecution::new(wf.id));
    let first = claim_all(&mut conn).remove(0);
    let lease = first.lease().unwrap();

    let mut a = Session::new(&db, "sender");
    let mut b = Session::new(&db, "completer");
    a.begin();
    let id = e.id;
    a.run("send", move |c| {
        engine::send_signal(c, id, "go", Some(&json!("early"))).map(|s| s.signal.delivered_to)
    });
    assert_eq!(a.settle(&mut conn), State::Done);
    assert_eq!(a.last(), Ok("None".to_owned()));
    b.run("complete first", move |c| {
        engine::complete_step(c, &lease, None).map(|s| s.status)
    });
    assert_eq!(b.settle(&mut conn), State::Blocked);
    assert_eq!(b.blockers(&mut conn), [a.pid]);
    a.commit();
    assert_eq!(a.settle(&mut conn), State::Done);
    assert_eq!(b.settle(&mut conn), State::Done);
    let wait = step_of(&mut conn, e.id, "wait");
    assert!(wait.wake_at.is_some_and(|t| t <= Utc::now()), "{wait:?}");
    assert_eq!(fire(&mut conn), report(1, 0, 1, 0));
    assert_eq!(
        step_of(&mut conn, e.id, "wait").output,
        Some(json!("early"))
    );
    a.finish();
    b.finish();
    assert_clean(&mut conn);
}

/// Four deliverers and four senders at once over many executions: every
/// wait step runs exactly once, every signal is delivered at most once and
/// every signal step takes exactly one.
#[test]
fn racing_deliverers_and_senders_deliver_each_signal_once_and_fire_each_timer_once() {
    const EXECUTIONS: usize = 40;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![
            Node::timer("t", Duration::ZERO),
            Node::signal("s1", "go"),
            Node::signal("s2", "go"),
        ],
        &[("t", "s2")],
    );
    let ids: Vec<Uuid> = (0..EXECUTIONS)
        .map(|_| start(&mut conn, NewExecution::new(wf.id)).id)
        .collect();
    let ids = Arc::new(ids);
    let barrier = Arc::new(Barrier::new(8));
    let mut threads = Vec::new();
    for i in 0..8 {
        let url = db.url().clone();
        let ids = Arc::clone(&ids);
        let barrier = Arc::clone(&barrier);
        threads.push(thread::spawn(move || {
            let mut c = workflow_db::connect(&url).unwrap();
            barrier.wait();
            let mut total = WaitReport::default();
            if i < 4 {
                for _ in 0..20 {
                    let r = engine::fire_due_waits(&mut c, 7).unwrap();
                    total.timers_fired += r.timers_fired;
                    total.signals_delivered += r.signals_delivered;
                }
            } else {
                // Each sender sends two signals to its share of executions.
                for id in ids.iter().skip(i - 4).step_by(4) {
                    for _ in 0..2 {
                        let r = engine::send_signal(&mut c, *id, "go", Some(&json!(i))).unwrap();
                        total.timers_fired += r.report.timers_fired;
                        total.signals_delivered += r.report.signals_delivered;
                    }
                }
            }
            total
        }));
    }
    let mut timers = 0;
    let mut delivered = 0;
    for t in threads {
        let r = t.join().unwrap();
        timers += r.timers_fired;
        delivered += r.signals_delivered;
    }
    // Whatever the threads left due.
    loop {
        let r = fire(&mut conn);
        timers += r.timers_fired;
        delivered += r.signals_delivered;
        if r.due == 0 {
            break;
        }
    }
    assert_eq!(timers, EXECUTIONS as u64, "each timer fired once");
    assert_eq!(
        delivered,
        2 * EXECUTIONS as u64,
        "each signal step took one"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM execution_signals WHERE delivered_to IS NOT NULL"
        ),
        2 * EXECUTIONS as i64
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM executions WHERE status <> 'completed'"
        ),
        0
    );
    // One start and one completion per wait step in the history.
    let starts: HashMap<String, i64> = diesel::sql_query(
        "SELECT step_id::text AS s, count(*) AS n FROM execution_events \
          WHERE to_status = 'running' AND step_id IS NOT NULL GROUP BY step_id",
    )
    .load::<StepCount>(&mut conn)
    .unwrap()
    .into_iter()
    .map(|r| (r.s, r.n))
    .collect();
    assert_eq!(starts.len(), 3 * EXECUTIONS);
    assert!(starts.values().all(|n| *n == 1), "{starts:?}");
    assert_clean(&mut conn);
}

#[derive(QueryableByName)]
struct StepCount {
    #[diesel(sql_type = Text)]
    s: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Review finding: a signal sent in a REPEATABLE READ transaction while its
/// step became ready was kept for ever (its wake-up read an old snapshot).
/// Signals, and inserts of wait steps, require READ COMMITTED, as every
/// status change does; the refusal writes nothing.
#[test]
fn signals_and_wait_steps_are_refused_outside_read_committed() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = signal_workflow(&mut conn);
    let e = start(&mut conn, NewExecution::new(wf.id));
    let refused = |conn: &mut PgConnection, what: &str, f: &dyn Fn(&mut PgConnection) -> String| {
        conn.build_transaction()
            .repeatable_read()
            .run(|c| {
                let err = f(c);
                assert!(err.contains("READ COMMITTED"), "{what}: {err}");
                QueryResult::Ok(())
            })
            .unwrap_or(());
    };
    refused(&mut conn, "send_signal", &|c| {
        engine::send_signal(c, e.id, "go", None)
            .unwrap_err()
            .to_string()
    });
    refused(&mut conn, "plain insert", &|c| {
        diesel::sql_query("INSERT INTO execution_signals (execution_id, name) VALUES ($1, 'go')")
            .bind::<SqlUuid, _>(e.id)
            .execute(c)
            .unwrap_err()
            .to_string()
    });
    refused(&mut conn, "start with a wait step", &|c| {
        engine::start_execution(c, &NewExecution::new(wf.id))
            .unwrap_err()
            .to_string()
    });
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) AS n FROM execution_signals"),
        0
    );
    assert_eq!(scalar(&mut conn, "SELECT count(*) AS n FROM executions"), 1);
}

/// Review finding: a plain multi-row INSERT of signals for two executions,
/// listed against id order, locked them in row order and deadlocked with a
/// batch of completions (which locks executions in id order). The signals'
/// trigger now locks the executions of the whole statement in id order.
#[test]
fn a_multi_row_signal_insert_and_a_batch_of_completions_do_not_deadlock() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(
        &mut conn,
        vec![Node::new("w", "work"), Node::signal("s", "go")],
        &[],
    );
    let e1 = start(&mut conn, NewExecution::new(wf.id)).id;
    let e2 = start(&mut conn, NewExecution::new(wf.id)).id;
    assert!(e1 < e2);
    let s2 = step_of(&mut conn, e2, "s").id;
    let leases: Vec<(workflow_db::Lease, Option<Value>)> = claim_all(&mut conn)
        .iter()
        .map(|s| (s.lease().unwrap(), None))
        .collect();
    assert_eq!(leases.len(), 2);

    // H holds E2's signal step; S inserts signals for E2 then E1; W
    // completes the work steps of E1 and E2 in one batch.
    let mut h = Session::new(&db, "holder");
    let mut s = Session::new(&db, "sender");
    let mut w = Session::new(&db, "worker");
    h.begin();
    h.run("lock E2's signal step", move |c| {
        diesel::sql_query("SELECT 1 FROM execution_steps WHERE id = $1 FOR UPDATE")
            .bind::<SqlUuid, _>(s2)
            .execute(c)
    });
    assert_eq!(h.settle(&mut conn), State::Done);
    s.run("insert E2, E1", move |c| {
        diesel::sql_query(
            "INSERT INTO execution_signals (execution_id, name) VALUES ($1, 'go'), ($2, 'go')",
        )
        .bind::<SqlUuid, _>(e2)
        .bind::<SqlUuid, _>(e1)
        .execute(c)
    });
    assert_eq!(s.settle(&mut conn), State::Blocked);
    w.run("complete both", move |c| {
        engine::complete_steps(c, &leases).map(|d| d.len())
    });
    assert_eq!(w.settle(&mut conn), State::Blocked);
    h.commit();
    assert_eq!(h.settle(&mut conn), State::Done);
    assert_eq!(s.settle(&mut conn), State::Done);
    assert_eq!(w.settle(&mut conn), State::Done);
    for (name, outcomes) in [("sender", s.finish()), ("worker", w.finish())] {
        for (label, outcome) in outcomes {
            assert!(outcome.is_ok(), "{name} {label}: {outcome:?}");
        }
    }
    h.finish();
    assert_eq!(fire(&mut conn), report(2, 0, 2, 0));
    for e in [e1, e2] {
        assert_eq!(status(&mut conn, e), ExecutionStatus::Completed);
    }
    assert_clean(&mut conn);
}

/// Review finding: `fire_due_waits` waited for an execution another
/// transaction held (an idle session in a transaction stalled every wait
/// and the maintenance round). It skips such an execution and takes it at
/// a later call.
#[test]
fn a_fire_skips_an_execution_another_transaction_holds() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow_of(&mut conn, vec![Node::timer("t", Duration::ZERO)], &[]);
    let held = start(&mut conn, NewExecution::new(wf.id)).id;
    let free = start(&mut conn, NewExecution::new(wf.id)).id;
    let mut h = Session::new(&db, "holder");
    h.begin();
    h.run("hold the execution", move |c| {
        diesel::sql_query("SELECT 1 FROM executions WHERE id = $1 FOR NO KEY UPDATE")
            .bind::<SqlUuid, _>(held)
            .execute(c)
    });
    assert_eq!(h.settle(&mut conn), State::Done);
    assert_eq!(fire(&mut conn), report(1, 1, 0, 0));
    assert_eq!(status(&mut conn, free), ExecutionStatus::Completed);
    assert_eq!(status(&mut conn, held), ExecutionStatus::Running);
    h.rollback();
    assert_eq!(h.settle(&mut conn), State::Done);
    h.finish();
    assert_eq!(fire(&mut conn), report(1, 1, 0, 0));
    assert_eq!(status(&mut conn, held), ExecutionStatus::Completed);
}

/// Why, for a signal wait without a timeout: no deadline is invented (the
/// detail read "until , then fails" and "(timeout )" before migration
/// 000043).
#[test]
fn why_a_signal_wait_without_a_timeout_names_no_deadline() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = signal_workflow(&mut conn);
    let e = start(&mut conn, NewExecution::new(wf.id));
    let wait = step_of(&mut conn, e.id, "wait");
    let detail = |conn: &mut PgConnection| {
        engine::why_step_not_running(conn, wait.id)
            .unwrap()
            .into_iter()
            .find(|w| w.reason == "signal")
            .expect("a signal reason")
            .detail
    };
    assert_eq!(detail(&mut conn), "then waits for signal 'go' (no timeout)");
    let first = claim_all(&mut conn).remove(0);
    complete(&mut conn, &first);
    assert_eq!(detail(&mut conn), "waits for signal 'go' (no timeout)");
}
