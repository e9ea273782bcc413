//! Streaming bulk load (binary COPY through Diesel), against a real PostgreSQL.

use chrono::{TimeZone, Utc};
use diesel::prelude::*;
use serde_json::json;
use workflow_db::models::bulk::{self, CopyExecution, CopyStep};
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Execution, ExecutionStatus, ExecutionStep, NewExecution, NewWorkflow, StepStatus, Workflow,
};

fn workflow(conn: &mut PgConnection) -> Workflow {
    NewWorkflow::new(
        "bulk",
        json!([{"id": "a", "type": "task", "config": {}}]),
        json!([]),
    )
    .create(conn)
    .unwrap()
}

#[test]
fn copy_round_trips_every_column_and_every_status() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let t0 = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
    let executions: Vec<CopyExecution> = ExecutionStatus::ALL
        .iter()
        .enumerate()
        .map(|(i, &status)| CopyExecution {
            status,
            user_id: (i % 2 == 0).then(|| format!("user-{i}")),
            data: Some(json!({"i": i, "s": "é\"\\\n", "nested": {"a": [1, 2.5, null]}})),
            error: (status == ExecutionStatus::Failed).then(|| "boom".to_owned()),
            started_at: Some(t0 + chrono::Duration::microseconds(i as i64 * 1_234_567)),
            completed_at: None,
            ..CopyExecution::from(NewExecution::new(wf.id))
        })
        .collect();
    // Borrowed items work as well as owned ones.
    assert_eq!(
        bulk::copy_executions(&mut conn, &executions).unwrap(),
        executions.len()
    );
    for e in &executions {
        let row = Execution::find(&mut conn, e.id).unwrap();
        assert_eq!(
            (
                row.workflow_id,
                row.status,
                &row.user_id,
                &row.data,
                &row.error,
                row.started_at,
                row.completed_at
            ),
            (
                e.workflow_id,
                e.status,
                &e.user_id,
                &e.data,
                &e.error,
                e.started_at,
                e.completed_at
            )
        );
    }

    let steps: Vec<CopyStep> = StepStatus::ALL
        .iter()
        .enumerate()
        .map(|(k, &status)| CopyStep {
            status,
            input: Some(json!({"nodeId": format!("node-{k}")})),
            output: (status == StepStatus::Completed).then(|| json!({"ok": true})),
            error: (status == StepStatus::Failed).then(|| "timeout".to_owned()),
            retry_count: k as i32,
            started_at: Some(t0),
            completed_at: (k % 2 == 1).then_some(t0),
            ..CopyStep::pending(executions[0].id, format!("node-{k}"))
        })
        .collect();
    // An owned iterator that is never collected by the library.
    assert_eq!(
        bulk::copy_steps(&mut conn, steps.clone().into_iter()).unwrap(),
        steps.len()
    );
    for s in &steps {
        let row = ExecutionStep::find(&mut conn, s.id).unwrap();
        assert_eq!(row.execution_id, s.execution_id);
        assert_eq!(row.node_id, s.node_id);
        assert_eq!(row.status, s.status);
        assert_eq!(row.input, s.input);
        assert_eq!(row.output, s.output);
        assert_eq!(row.error, s.error);
        assert_eq!(row.retry_count, s.retry_count);
        assert_eq!(row.started_at, s.started_at);
        assert_eq!(row.completed_at, s.completed_at);
    }
}

#[test]
fn copy_streams_many_rows_and_an_empty_iterator() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    assert_eq!(
        bulk::copy_executions(&mut conn, std::iter::empty::<CopyExecution>()).unwrap(),
        0
    );
    // Enough rows to fill the 256 KiB buffer several times.
    let ids: Vec<uuid::Uuid> = (0..2000).map(|_| uuid::Uuid::now_v7()).collect();
    let n = bulk::copy_executions(
        &mut conn,
        ids.iter().map(|&id| CopyExecution {
            id,
            data: Some(json!({"pad": "x".repeat(200)})),
            ..CopyExecution::from(NewExecution::new(wf.id))
        }),
    )
    .unwrap();
    assert_eq!(n, 2000);
    let n = bulk::copy_steps(
        &mut conn,
        ids.iter()
            .flat_map(|&id| (0..10).map(move |k| CopyStep::pending(id, format!("node-{k}")))),
    )
    .unwrap();
    assert_eq!(n, 20_000);
    let count: i64 = workflow_db::schema::execution_steps::table
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(count, 20_000);
}

#[test]
fn a_violated_constraint_fails_the_whole_copy_and_leaves_the_connection_usable() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let e = CopyExecution::from(NewExecution::new(wf.id));
    let steps = vec![
        CopyStep::pending(e.id, "node-0"),
        CopyStep::pending(uuid::Uuid::now_v7(), "node-1"),
    ];
    bulk::copy_executions(&mut conn, [&e]).unwrap();
    let err = bulk::copy_steps(&mut conn, &steps).unwrap_err();
    assert!(
        err.to_string().contains("foreign key"),
        "unexpected error: {err}"
    );
    assert!(
        ExecutionStep::list_for_execution(&mut conn, e.id)
            .unwrap()
            .is_empty()
    );
    // Duplicate (execution_id, node_id) is refused too.
    let dup = [
        CopyStep::pending(e.id, "node-0"),
        CopyStep::pending(e.id, "node-0"),
    ];
    assert!(bulk::copy_steps(&mut conn, &dup).is_err());
    assert_eq!(Workflow::find(&mut conn, wf.id).unwrap().id, wf.id);
}

#[test]
fn one_statement_start_inserts_the_execution_and_its_steps() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let e = NewExecution::new(wf.id)
        .user_id("user-1")
        .data(json!({"trigger": "api"}));
    let steps: Vec<_> = (0..10)
        .map(|k| {
            workflow_db::NewExecutionStep::new(e.id, format!("node-{k}"))
                .input(json!({"nodeId": format!("node-{k}")}))
        })
        .collect();
    bulk::insert_execution_with_steps(&mut conn, &e, &steps).unwrap();
    let row = Execution::find(&mut conn, e.id).unwrap();
    assert_eq!(row.user_id.as_deref(), Some("user-1"));
    assert_eq!(row.status, ExecutionStatus::Pending);
    assert!(row.started_at.is_some());
    let stored = ExecutionStep::list_for_execution(&mut conn, e.id).unwrap();
    assert_eq!(stored.len(), 10);
    for (s, n) in stored.iter().zip(&steps) {
        assert_eq!((s.id, &s.node_id, &s.input), (n.id, &n.node_id, &n.input));
        assert_eq!(s.status, StepStatus::Pending);
    }
    // Atomic: a failing step (duplicate node) leaves no execution behind.
    let e2 = NewExecution::new(wf.id);
    let dup = vec![
        workflow_db::NewExecutionStep::new(e2.id, "a"),
        workflow_db::NewExecutionStep::new(e2.id, "a"),
    ];
    assert!(bulk::insert_execution_with_steps(&mut conn, &e2, &dup).is_err());
    assert!(Execution::find(&mut conn, e2.id).is_err());
}

#[test]
fn one_statement_insert_keeps_the_dependency_counters() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn);
    let e = NewExecution::new(wf.id);
    let steps = vec![
        workflow_db::NewExecutionStep {
            downstream: vec!["b".into(), "c,d".into()],
            max_retries: 5,
            ..workflow_db::NewExecutionStep::new(e.id, "a")
        },
        workflow_db::NewExecutionStep {
            upstream_pending: 1,
            ..workflow_db::NewExecutionStep::new(e.id, "b")
        },
    ];
    bulk::insert_execution_with_steps(&mut conn, &e, &steps).unwrap();
    let stored = ExecutionStep::list_for_execution(&mut conn, e.id).unwrap();
    let a = stored.iter().find(|s| s.node_id == "a").unwrap();
    let b = stored.iter().find(|s| s.node_id == "b").unwrap();
    use workflow_db::schema::execution_steps as s;
    let downstream = |id| {
        s::table
            .find(id)
            .select(s::downstream)
            .first::<Vec<Option<String>>>(&mut db.connect())
            .unwrap()
    };
    assert_eq!(
        downstream(a.id),
        vec![Some("b".to_owned()), Some("c,d".to_owned())]
    );
    assert!(downstream(b.id).is_empty());
    assert_eq!((a.upstream_pending, a.max_retries), (0, 5));
    assert_eq!(b.upstream_pending, 1);
}
