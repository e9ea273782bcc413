//! Replay of failed and cancelled executions, re-runs from scratch, and
//! "why is it not running?" (issue 12), against PostgreSQL.

mod common;

use std::time::Duration;

use chrono::Utc;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;
use workflow_db::engine::{self, Backoff, CheckOptions, Why};
use workflow_db::schema::{execution_events, execution_steps};
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Edge, Error, Execution, ExecutionStatus, ExecutionStep, NewExecution, NewWorkflow, Node,
    StepStatus, Workflow, WorkflowGraph,
};

use common::LEASE;

/// a -> b -> c, and a -> d (d independent of b), every step without retries.
fn workflow(conn: &mut PgConnection) -> Workflow {
    let node = |id: &str| {
        let mut n = Node::new(id, "task");
        n.config = json!({"max_retries": 0});
        n
    };
    let graph = WorkflowGraph {
        nodes: vec![node("a"), node("b"), node("c"), node("d")],
        edges: vec![
            Edge::new("a", "b"),
            Edge::new("b", "c"),
            Edge::new("a", "d"),
        ],
    };
    NewWorkflow::from_graph("replayable", &graph)
        .create(conn)
        .unwrap()
}

fn steps(conn: &mut PgConnection, execution: uuid::Uuid) -> Vec<ExecutionStep> {
    execution_steps::table
        .filter(execution_steps::execution_id.eq(execution))
        .order(execution_steps::node_id)
        .select(ExecutionStep::as_select())
        .load(conn)
        .unwrap()
}

fn status_of(steps: &[ExecutionStep]) -> Vec<(&str, StepStatus)> {
    steps
        .iter()
        .map(|s| (s.node_id.as_str(), s.status))
        .collect()
}

/// Claims and completes every claimable step of `node`, with an output.
fn complete(conn: &mut PgConnection, node: &str) {
    for step in engine::claim_steps(conn, "w", 100, LEASE).unwrap() {
        let lease = step.lease().unwrap();
        if step.node_id == node {
            engine::complete_step(conn, &lease, Some(&json!({"node": node}))).unwrap();
        } else {
            engine::release_steps(conn, &[lease]).unwrap();
        }
    }
}

/// Runs a until done, then fails b for good: the execution fails, c and d
/// are skipped (d was released back to pending and skipped by the failure).
fn failed_execution(conn: &mut PgConnection, wf: &Workflow) -> Execution {
    let started = engine::start_execution(conn, &NewExecution::new(wf.id)).unwrap();
    complete(conn, "a");
    for step in engine::claim_steps(conn, "w", 100, LEASE).unwrap() {
        let lease = step.lease().unwrap();
        if step.node_id == "b" {
            engine::fail_step(conn, &lease, "boom", &Backoff::default()).unwrap();
        } else {
            engine::release_steps(conn, &[lease]).unwrap();
        }
    }
    let e = Execution::find(conn, started.execution.id).unwrap();
    assert_eq!(e.status, ExecutionStatus::Failed);
    e
}

fn clean(db: &TestDatabase) {
    let report = engine::check_invariants(&mut db.connect(), &CheckOptions::default()).unwrap();
    assert!(report.is_clean(), "{report}");
}

#[test]
fn replay_runs_failed_and_skipped_steps_again_and_keeps_completed_outputs() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let failed = failed_execution(&mut conn, &wf);
    let before = steps(&mut conn, failed.id);
    assert_eq!(
        status_of(&before),
        [
            ("a", StepStatus::Completed),
            ("b", StepStatus::Failed),
            ("c", StepStatus::Skipped),
            ("d", StepStatus::Skipped)
        ]
    );

    let replayed = engine::replay_execution(&mut conn, failed.id).unwrap();
    assert_eq!(replayed.status, ExecutionStatus::Running);
    assert_eq!((replayed.error, replayed.completed_at), (None, None));
    let after = steps(&mut conn, failed.id);
    assert_eq!(
        status_of(&after),
        [
            ("a", StepStatus::Completed),
            ("b", StepStatus::Pending),
            ("c", StepStatus::Pending),
            ("d", StepStatus::Pending)
        ]
    );
    assert_eq!(after[0].output, before[0].output, "a keeps its output");
    assert_eq!(after[0].attempt, before[0].attempt);
    assert_eq!((after[1].retry_count, after[1].error.as_deref()), (0, None));
    // b and d wait for nothing (a completed); c waits for b.
    let counters: Vec<i32> = after.iter().map(|s| s.upstream_pending).collect();
    assert_eq!(counters, [0, 0, 1, 0]);

    // The history records the new attempt.
    let transitions: Vec<(Option<String>, String)> = execution_events::table
        .filter(execution_events::execution_id.eq(failed.id))
        .filter(execution_events::step_id.eq(after[1].id))
        .order(execution_events::id)
        .select((execution_events::from_status, execution_events::to_status))
        .load(&mut conn)
        .unwrap();
    assert_eq!(
        transitions.last().unwrap(),
        &(Some("failed".to_owned()), "pending".to_owned())
    );

    // It now runs to the end: b and d, then c.
    let mut claimed = Vec::new();
    for _ in 0..3 {
        for step in engine::claim_steps(&mut conn, "w", 100, LEASE).unwrap() {
            claimed.push(step.node_id.clone());
            assert!(step.attempt > 0);
            engine::complete_step(&mut conn, &step.lease().unwrap(), None).unwrap();
        }
    }
    claimed.sort();
    assert_eq!(claimed, ["b", "c", "d"], "a is not run again");
    assert_eq!(
        Execution::find(&mut conn, failed.id).unwrap().status,
        ExecutionStatus::Completed
    );
    clean(&db);
}

#[test]
fn replay_of_a_cancelled_execution_and_of_one_with_nothing_left() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let e = engine::start_execution(&mut conn, &NewExecution::new(wf.id))
        .unwrap()
        .execution;
    engine::cancel(&mut conn, e.id).unwrap();
    let replayed = engine::replay_execution(&mut conn, e.id).unwrap();
    assert_eq!(replayed.status, ExecutionStatus::Running);
    let claimable: Vec<String> = engine::claim_steps(&mut conn, "w", 10, LEASE)
        .unwrap()
        .into_iter()
        .map(|s| s.node_id)
        .collect();
    assert_eq!(claimable, ["a"], "only the root is ready again");
    clean(&db);

    // Failed with every step completed (written with the triggers off, as
    // a hand-repair might leave it): nothing to run again, so the replay
    // completes it at once.
    let done = engine::start_execution(&mut conn, &NewExecution::new(wf.id))
        .unwrap()
        .execution;
    conn.batch_execute(&format!(
        "SET session_replication_role = replica; \
         UPDATE execution_steps SET status = 'completed', completed_at = now(), upstream_pending = 0 \
          WHERE execution_id = '{id}'; \
         UPDATE executions SET status = 'failed', completed_at = now() WHERE id = '{id}'; \
         SET session_replication_role = origin;",
        id = done.id
    ))
    .unwrap();
    let replayed = engine::replay_execution(&mut conn, done.id).unwrap();
    assert_eq!(replayed.status, ExecutionStatus::Completed);
    assert!(replayed.completed_at.is_some());
}

#[test]
fn replay_refuses_what_is_not_failed_or_cancelled_and_plain_sql_cannot_replay() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let running = engine::start_execution(&mut conn, &NewExecution::new(wf.id))
        .unwrap()
        .execution;
    let err = engine::replay_execution(&mut conn, running.id).unwrap_err();
    assert!(matches!(err, Error::IllegalTransition { .. }), "{err:?}");
    assert!(matches!(
        engine::replay_execution(&mut conn, uuid::Uuid::now_v7()).unwrap_err(),
        Error::NotFound { .. }
    ));

    let failed = failed_execution(&mut conn, &wf);
    let events_before: i64 = execution_events::table
        .count()
        .get_result(&mut conn)
        .unwrap();
    for sql in [
        format!(
            "UPDATE executions SET status = 'running' WHERE id = '{}'",
            failed.id
        ),
        format!(
            "UPDATE execution_steps SET status = 'pending' WHERE execution_id = '{}' AND status = 'failed'",
            failed.id
        ),
    ] {
        let err = conn.batch_execute(&sql).unwrap_err().to_string();
        assert!(err.contains("illegal"), "{sql}: {err}");
    }
    assert_eq!(
        Execution::find(&mut conn, failed.id).unwrap().status,
        ExecutionStatus::Failed
    );
    let events_after: i64 = execution_events::table
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(events_before, events_after, "nothing written");
    // The replay flag does not outlive the replay's transaction.
    engine::replay_execution(&mut conn, failed.id).unwrap();
    let other = failed_execution(&mut conn, &wf);
    assert!(
        conn.batch_execute(&format!(
            "UPDATE executions SET status = 'running' WHERE id = '{}'",
            other.id
        ))
        .is_err()
    );
}

#[test]
fn rerun_starts_a_new_linked_execution_with_the_same_input() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let old = engine::start_execution(
        &mut conn,
        &NewExecution::new(wf.id)
            .data(json!({"order": 7}))
            .user_id("u1")
            .priority(5),
    )
    .unwrap()
    .execution;
    engine::cancel(&mut conn, old.id).unwrap();
    let new = engine::rerun_execution(&mut conn, old.id).unwrap();
    assert!(new.created);
    let new = new.execution;
    assert_ne!(new.id, old.id);
    assert_eq!(new.rerun_of, Some(old.id));
    assert_eq!(
        (new.data, new.user_id, new.priority, new.status),
        (old.data, old.user_id, 5, ExecutionStatus::Running)
    );
    assert_eq!(
        Execution::find(&mut conn, old.id).unwrap().status,
        ExecutionStatus::Cancelled,
        "the old one is left alone"
    );
    // Deleting the old one keeps the new one, unlinked.
    diesel::delete(workflow_db::schema::executions::table.find(old.id))
        .execute(&mut conn)
        .unwrap();
    assert_eq!(Execution::find(&mut conn, new.id).unwrap().rerun_of, None);
}

fn reasons(list: &[Why], node: &str) -> Vec<String> {
    list.iter()
        .filter(|w| w.node_id.as_deref() == Some(node))
        .map(|w| w.reason.clone())
        .collect()
}

#[test]
fn why_names_what_each_step_waits_for() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let e = engine::start_execution(&mut conn, &NewExecution::new(wf.id))
        .unwrap()
        .execution;
    let why = engine::why_not_running(&mut conn, e.id).unwrap();
    assert_eq!(reasons(&why, "a"), ["claimable"]);
    assert_eq!(reasons(&why, "b"), ["upstream"]);
    let b = why
        .iter()
        .find(|w| w.node_id.as_deref() == Some("b"))
        .unwrap();
    assert!(b.detail.contains("a (pending)"), "{b:?}");

    // Running, then a retry with a backoff.
    let a = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    assert_eq!(
        reasons(&engine::why_not_running(&mut conn, e.id).unwrap(), "a"),
        ["running"]
    );
    conn.batch_execute(&format!(
        "UPDATE execution_steps SET max_retries = 3 WHERE id = '{}'",
        a.id
    ))
    .unwrap();
    let backoff = Backoff {
        base: Duration::from_secs(600),
        max: Duration::from_secs(600),
    };
    engine::fail_step(&mut conn, &a.lease().unwrap(), "flaky", &backoff).unwrap();
    let why = engine::why_step_not_running(&mut conn, a.id).unwrap();
    assert_eq!(why.len(), 1, "{why:?}");
    assert_eq!(why[0].reason, "retry_backoff");
    assert!(why[0].detail.contains("flaky"), "{why:?}");
    assert_eq!(why[0].step_id, Some(a.id));

    // Paused execution; paused queue; a key at its limit.
    engine::pause(&mut conn, e.id).unwrap();
    assert!(
        reasons(&engine::why_not_running(&mut conn, e.id).unwrap(), "a")
            .contains(&"execution_paused".to_owned())
    );
    engine::resume(&mut conn, e.id).unwrap();
    conn.batch_execute(&format!(
        "UPDATE execution_steps SET run_after = now() WHERE id = '{}'",
        a.id
    ))
    .unwrap();
    engine::pause_queue(&mut conn, "task").unwrap();
    assert_eq!(
        reasons(&engine::why_not_running(&mut conn, e.id).unwrap(), "a"),
        ["queue_paused"]
    );
    engine::resume_queue(&mut conn, "task").unwrap();

    engine::set_concurrency_limit(&mut conn, "tenant", 1).unwrap();
    let first = engine::start_execution(
        &mut conn,
        &NewExecution::new(wf.id).concurrency_key("tenant"),
    )
    .unwrap()
    .execution;
    let second = engine::start_execution(
        &mut conn,
        &NewExecution::new(wf.id).concurrency_key("tenant"),
    )
    .unwrap()
    .execution;
    assert_eq!(
        reasons(&engine::why_not_running(&mut conn, first.id).unwrap(), "a"),
        ["claimable"]
    );
    let held = engine::why_not_running(&mut conn, second.id).unwrap();
    assert_eq!(reasons(&held, "a"), ["concurrency_key"]);
    assert!(held[0].detail.contains("tenant"), "{held:?}");

    // Delayed start; finished; unknown.
    let later = engine::start_execution(
        &mut conn,
        &NewExecution::new(wf.id).start_after(Utc::now() + chrono::Duration::hours(1)),
    )
    .unwrap()
    .execution;
    assert_eq!(
        reasons(&engine::why_not_running(&mut conn, later.id).unwrap(), "a"),
        ["delayed_start"]
    );
    engine::cancel(&mut conn, later.id).unwrap();
    let finished = engine::why_not_running(&mut conn, later.id).unwrap();
    assert_eq!(
        finished
            .iter()
            .map(|w| w.reason.as_str())
            .collect::<Vec<_>>(),
        ["finished"]
    );
    let unknown = engine::why_not_running(&mut conn, uuid::Uuid::now_v7()).unwrap();
    assert_eq!(unknown[0].reason, "not_found");

    // The same from psql.
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        reason: String,
    }
    let rows: Vec<Row> = diesel::sql_query("SELECT reason FROM workflow_db_why_step($1)")
        .bind::<diesel::sql_types::Uuid, _>(a.id)
        .load(&mut conn)
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].reason, "claimable");
}
