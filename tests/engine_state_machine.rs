//! The state machine, enforced by PostgreSQL: triggers, history, notifications,
//! pause/resume/cancel and racing transitions.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use diesel::prelude::*;
use serde_json::json;
use workflow_db::Lease;
use workflow_db::engine::{self, Backoff};
use workflow_db::schema::{execution_events, execution_steps};
use workflow_db::testing::TestDatabase;
use workflow_db::{
    AnyStatus, Error, Execution, ExecutionEvent, ExecutionStatus, ExecutionStep, LeaseLostReason,
    StepStatus, Workflow, WorkflowChanges,
};

use common::{LEASE, start, workflow};

fn steps(conn: &mut PgConnection, execution: &Execution) -> Vec<ExecutionStep> {
    ExecutionStep::list_for_execution(conn, execution.id).unwrap()
}

#[test]
fn illegal_transition_in_raw_sql_is_refused_by_postgres() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let step = &steps(&mut conn, &ex)[0];

    // pending -> completed skips running: refused, whoever writes.
    let err = diesel::sql_query("UPDATE execution_steps SET status = 'completed' WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(step.id)
        .execute(&mut conn)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("illegal step transition pending -> completed"),
        "{err}"
    );
    // Through the crate's error type the refusal is typed.
    assert!(matches!(
        Error::from(err),
        Error::IllegalTransition {
            from: AnyStatus::Step(StepStatus::Pending),
            to: AnyStatus::Step(StepStatus::Completed)
        }
    ));
    let err = diesel::sql_query("UPDATE executions SET status = 'pending' WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(ex.id)
        .execute(&mut conn)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("illegal execution transition running -> pending"),
        "{err}"
    );
    // Nothing changed.
    assert_eq!(steps(&mut conn, &ex)[0], *step);
    assert_eq!(Execution::find(&mut conn, ex.id).unwrap(), ex);

    // The crate's own update API hits the same wall.
    let err = Execution::update(
        &mut conn,
        ex.id,
        &workflow_db::ExecutionChanges {
            status: Some(ExecutionStatus::Pending),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(
        Error::from(err),
        Error::IllegalTransition {
            from: AnyStatus::Execution(ExecutionStatus::Running),
            to: AnyStatus::Execution(ExecutionStatus::Pending)
        }
    ));
    // Rust refuses an illegal pair before any SQL.
    let err = engine::transition_execution(
        &mut conn,
        ex.id,
        ExecutionStatus::Running,
        ExecutionStatus::Pending,
    )
    .unwrap_err();
    assert!(matches!(err, Error::IllegalTransition { .. }), "{err}");
}

#[test]
fn transitions_set_times_and_append_history() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[("a", "b")]);
    let ex = start(&mut conn, &wf);
    assert_eq!(ex.status, ExecutionStatus::Running);
    assert_eq!(ex.workflow_version, 1);
    assert!(ex.started_at.is_some() && ex.completed_at.is_none());

    let claimed = engine::claim_steps(&mut conn, "w1", 10, LEASE).unwrap();
    assert_eq!(claimed.len(), 1, "b waits for a");
    let a = &claimed[0];
    assert_eq!(a.node_id, "a");
    assert!(a.started_at.is_some());
    let failed = engine::fail_step(
        &mut conn,
        &Lease::new(a.id, "w1", a.attempt),
        "boom",
        &Backoff {
            base: Duration::ZERO,
            max: Duration::ZERO,
        },
    )
    .unwrap();
    assert_eq!(
        (failed.status, failed.retry_count),
        (StepStatus::Pending, 1)
    );
    let a = engine::claim_steps(&mut conn, "w2", 10, LEASE)
        .unwrap()
        .remove(0);
    let done = engine::complete_step(
        &mut conn,
        &Lease::new(a.id, "w2", a.attempt),
        Some(&json!({"ok": true})),
    )
    .unwrap();
    assert_eq!(done.output, Some(json!({"ok": true})));
    assert!(done.completed_at.is_some());
    let b = engine::claim_steps(&mut conn, "w1", 10, LEASE)
        .unwrap()
        .remove(0);
    engine::complete_step(&mut conn, &Lease::new(b.id, "w1", b.attempt), None).unwrap();

    let ex = Execution::find(&mut conn, ex.id).unwrap();
    assert_eq!(
        ex.status,
        ExecutionStatus::Completed,
        "last step completes the execution"
    );
    assert!(ex.completed_at.is_some());

    let history: Vec<(Option<String>, String)> = ExecutionEvent::for_step(&mut conn, a.id)
        .unwrap()
        .into_iter()
        .map(|e| (e.from_status, e.to_status))
        .collect();
    let t = |f: &str, to: &str| (Some(f.to_owned()), to.to_owned());
    assert_eq!(
        history,
        [
            t("pending", "running"),
            t("running", "pending"),
            t("pending", "running"),
            t("running", "completed")
        ]
    );
    let attempts = ExecutionEvent::for_step(&mut conn, a.id).unwrap();
    assert_eq!(attempts[1].payload.as_ref().unwrap()["error"], "boom");
    assert_eq!(attempts[3].payload.as_ref().unwrap()["worker"], "w2");
    let of_execution: Vec<String> = ExecutionEvent::for_execution(&mut conn, ex.id)
        .unwrap()
        .into_iter()
        .filter(|e| e.step_id.is_none())
        .map(|e| e.to_status)
        .collect();
    assert_eq!(of_execution, ["running", "completed"]);

    // Append-only: no UPDATE, no DELETE; gone only with the execution.
    for sql in [
        "UPDATE execution_events SET to_status = 'x'",
        "DELETE FROM execution_events",
    ] {
        let err = diesel::sql_query(sql).execute(&mut conn).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    Execution::delete(&mut conn, ex.id).unwrap();
    let left: i64 = execution_events::table
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(left, 0);
}

#[test]
fn failing_for_good_fails_the_execution_and_skips_the_rest() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b", "c"], &[("a", "b")]);
    let ex = start(&mut conn, &wf);
    diesel::update(execution_steps::table)
        .set(execution_steps::max_retries.eq(0))
        .execute(&mut conn)
        .unwrap();
    let claimed = engine::claim_steps(&mut conn, "w", 1, LEASE).unwrap();
    let a = claimed
        .iter()
        .find(|s| s.node_id == "a")
        .unwrap_or(&claimed[0]);
    let failed = engine::fail_step(
        &mut conn,
        &Lease::new(a.id, "w", a.attempt),
        "no retries",
        &Backoff::default(),
    )
    .unwrap();
    assert_eq!(failed.status, StepStatus::Failed);
    let ex = Execution::find(&mut conn, ex.id).unwrap();
    assert_eq!(ex.status, ExecutionStatus::Failed);
    assert!(
        ex.error.as_deref().unwrap().contains("no retries"),
        "{:?}",
        ex.error
    );
    assert!(
        steps(&mut conn, &ex)
            .iter()
            .all(|s| s.id == a.id || s.status == StepStatus::Skipped)
    );
    // A final step cannot be reported on again: no longer the worker's.
    let err =
        engine::complete_step(&mut conn, &Lease::new(a.id, "w", a.attempt), None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLostReason::Finished(StepStatus::Failed),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn pause_resume_and_cancel() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b", "c"], &[]);
    let ex = start(&mut conn, &wf);
    let running = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);

    let paused = engine::pause(&mut conn, ex.id).unwrap();
    assert_eq!(paused.status, ExecutionStatus::Paused);
    assert!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .is_empty(),
        "paused: nothing claimable"
    );
    // A step already running may finish while paused.
    engine::complete_step(
        &mut conn,
        &Lease::new(running.id, "w", running.attempt),
        None,
    )
    .unwrap();
    let err = engine::pause(&mut conn, ex.id).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TransitionConflict {
                actual: AnyStatus::Execution(ExecutionStatus::Paused),
                ..
            }
        ),
        "{err}"
    );

    let resumed = engine::resume(&mut conn, ex.id).unwrap();
    assert_eq!(resumed.status, ExecutionStatus::Running);
    assert_eq!(
        resumed.started_at, ex.started_at,
        "resuming keeps the start time"
    );
    let again = engine::claim_steps(&mut conn, "w", 1, LEASE).unwrap();
    assert_eq!(again.len(), 1);

    let cancelled = engine::cancel(&mut conn, ex.id).unwrap();
    assert_eq!(cancelled.status, ExecutionStatus::Cancelled);
    assert!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .is_empty()
    );
    let statuses: Vec<StepStatus> = steps(&mut conn, &ex).iter().map(|s| s.status).collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StepStatus::Skipped)
            .count(),
        1,
        "the pending step is skipped: {statuses:?}"
    );
    assert!(
        statuses.contains(&StepStatus::Running),
        "the running one may still report"
    );
    let ex = Execution::find(&mut conn, ex.id).unwrap();
    assert!(ex.completed_at.is_some());
    let err = engine::cancel(&mut conn, ex.id).unwrap_err();
    assert!(
        matches!(
            err,
            Error::IllegalTransition {
                from: AnyStatus::Execution(ExecutionStatus::Cancelled),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn resuming_an_execution_whose_steps_all_finished_completes_it() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let a = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    engine::pause(&mut conn, ex.id).unwrap();
    engine::complete_step(&mut conn, &Lease::new(a.id, "w", a.attempt), None).unwrap();
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Paused
    );
    engine::resume(&mut conn, ex.id).unwrap();
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Completed
    );
}

#[test]
fn two_racing_transitions_on_one_row_are_decided_once() {
    let db = TestDatabase::new();
    let mut setup = db.connect();
    let wf = workflow(&mut setup, &["a"], &[]);
    for _ in 0..10 {
        let ex = start(&mut setup, &wf);
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = [ExecutionStatus::Cancelled, ExecutionStatus::Paused]
            .into_iter()
            .map(|to| {
                let (barrier, mut conn) = (barrier.clone(), db.connect());
                std::thread::spawn(move || {
                    barrier.wait();
                    engine::transition_execution(&mut conn, ex.id, ExecutionStatus::Running, to)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<&Execution> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        let loser = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(
            matches!(loser, Error::TransitionConflict { expected: AnyStatus::Execution(ExecutionStatus::Running), actual, .. }
                if *actual == AnyStatus::Execution(winners[0].status)),
            "{loser}"
        );
        let events: i64 = execution_events::table
            .filter(execution_events::execution_id.eq(ex.id))
            .filter(execution_events::step_id.is_null())
            .filter(execution_events::from_status.eq("running"))
            .count()
            .get_result(&mut setup)
            .unwrap();
        assert_eq!(events, 1, "exactly one transition recorded");
    }
}

#[test]
fn committed_transitions_are_notified() {
    let db = TestDatabase::new();
    let mut listener = db.connect();
    engine::listen(&mut listener).unwrap();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let started = engine::wait_for_notifications(&mut listener, Duration::from_secs(2)).unwrap();
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0].execution_id, ex.id);
    assert_eq!(
        (started[0].step_id, started[0].status),
        (None, AnyStatus::Execution(ExecutionStatus::Running))
    );
    let step = conn
        .transaction(|conn| {
            let step = engine::claim_steps(conn, "w", 1, LEASE)?.remove(0);
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                engine::poll_notifications(&mut listener)?.is_empty(),
                "not delivered before commit"
            );
            QueryResult::Ok(step)
        })
        .unwrap();
    let claimed = engine::wait_for_notifications(&mut listener, Duration::from_secs(2)).unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(
        (claimed[0].step_id, claimed[0].status),
        (Some(step.id), AnyStatus::Step(StepStatus::Running))
    );
    engine::unlisten(&mut listener).unwrap();
}

#[test]
fn workflow_updates_are_validated_and_optimistic() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[("a", "b")]);
    assert_eq!(wf.version, 1);

    let err = Workflow::update_versioned(
        &mut conn,
        wf.id,
        1,
        &WorkflowChanges {
            edges: Some(json!([{"source": "a", "target": "zz"}])),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("unknown target node \"zz\""),
        "{err}"
    );
    let err = workflow_db::NewWorkflow::new(
        "bad",
        json!([{"id": "x", "type": "t"}, {"id": "x", "type": "t"}]),
        json!([]),
    )
    .create(&mut conn)
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidGraph { reason } if reason.contains("duplicate node id")),
        "{err}"
    );

    let renamed = Workflow::update_versioned(
        &mut conn,
        wf.id,
        1,
        &WorkflowChanges {
            name: Some("v2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(renamed.version, 2);
    let err = Workflow::update_versioned(
        &mut conn,
        wf.id,
        1,
        &WorkflowChanges {
            name: Some("stale".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::VersionConflict {
                expected: 1,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(Workflow::find(&mut conn, wf.id).unwrap().name, "v2");
    // Any writer bumps the version, psql included.
    diesel::sql_query("UPDATE workflows SET description = 'by hand'")
        .execute(&mut conn)
        .unwrap();
    let wf = Workflow::find(&mut conn, wf.id).unwrap();
    assert_eq!(wf.version, 3);
    let ex = start(&mut conn, &wf);
    assert_eq!(ex.workflow_version, 3, "an execution records its version");

    // Racing optimistic writers: exactly one wins.
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = ["x", "y"]
        .into_iter()
        .map(|name| {
            let (barrier, mut conn) = (barrier.clone(), db.connect());
            std::thread::spawn(move || {
                barrier.wait();
                Workflow::update_versioned(
                    &mut conn,
                    wf.id,
                    3,
                    &WorkflowChanges {
                        name: Some(name.into()),
                        ..Default::default()
                    },
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(Error::VersionConflict { actual: 4, .. })))
    );
}

#[test]
fn a_legal_transition_written_by_hand_gets_the_same_treatment() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[("a", "b")]);
    let ex = start(&mut conn, &wf);
    let a = steps(&mut conn, &ex)
        .into_iter()
        .find(|s| s.node_id == "a")
        .unwrap();
    // Another service, or psql, moves the step by hand (running needs a lease).
    for set in [
        "status = 'running', locked_by = 'psql', locked_until = now() + interval '1 minute'",
        "status = 'completed'",
    ] {
        diesel::sql_query(format!(
            "UPDATE execution_steps SET {set} WHERE id = '{}'",
            a.id
        ))
        .execute(&mut conn)
        .unwrap();
    }
    let a = ExecutionStep::find(&mut conn, a.id).unwrap();
    assert!(
        a.started_at.is_some() && a.completed_at.is_some(),
        "times set by the trigger"
    );
    assert_eq!(
        ExecutionEvent::for_step(&mut conn, a.id).unwrap().len(),
        2,
        "history written"
    );
    let b = engine::claim_steps(&mut conn, "w", 10, LEASE).unwrap();
    assert_eq!(b.len(), 1, "downstream unblocked");
    assert_eq!(b[0].node_id, "b");
}

#[test]
fn a_step_runs_only_through_a_claim() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let before = steps(&mut conn, &ex);
    let a = before[0].clone();

    // Rust refuses before any SQL, with a typed error.
    let err = engine::transition_step(&mut conn, a.id, StepStatus::Pending, StepStatus::Running)
        .unwrap_err();
    assert!(
        matches!(err, Error::RunRequiresClaim { step_id } if step_id == a.id),
        "{err}"
    );
    assert!(err.to_string().contains("claim it"), "{err}");
    assert_eq!(steps(&mut conn, &ex), before, "nothing changed");
    assert!(
        ExecutionEvent::for_step(&mut conn, a.id)
            .unwrap()
            .is_empty(),
        "no history written"
    );
    // Whoever writes by hand gets a default lease, so the step can never be
    // stranded running without one: it is reclaimable once the lease expires.
    conn.transaction(|conn| {
        diesel::sql_query("UPDATE execution_steps SET status = 'running' WHERE id = $1")
            .bind::<diesel::sql_types::Uuid, _>(a.id)
            .execute(conn)?;
        let held = ExecutionStep::find(conn, a.id)?;
        assert_eq!(held.locked_by.as_deref(), Some("postgres"));
        assert!(held.locked_until.is_some());
        diesel::result::QueryResult::Ok(())
    })
    .unwrap();
    diesel::sql_query(
        "UPDATE execution_steps SET locked_until = now() - interval '1 second' WHERE id = $1",
    )
    .bind::<diesel::sql_types::Uuid, _>(a.id)
    .execute(&mut conn)
    .unwrap();
    assert_eq!(engine::reclaim_expired(&mut conn, 10).unwrap().len(), 1);

    // A claim runs it, with a lease that a worker can report under.
    let claimed = engine::claim_steps(&mut conn, "w", 1, LEASE).unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(claimed[0].locked_until.is_some());
    engine::complete_step(&mut conn, &claimed[0].lease().unwrap(), None).unwrap();
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Completed
    );
}

#[test]
fn a_retry_under_a_final_execution_is_skipped() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);

    // fail_step with retries left after the execution was cancelled.
    let ex = start(&mut conn, &wf);
    let a = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    engine::cancel(&mut conn, ex.id).unwrap();
    engine::fail_step(
        &mut conn,
        &Lease::new(a.id, "w", a.attempt),
        "flaky",
        &Backoff::default(),
    )
    .unwrap();
    let a = ExecutionStep::find(&mut conn, a.id).unwrap();
    assert_eq!(a.status, StepStatus::Skipped, "not pending for ever");
    let history: Vec<(Option<String>, String)> = ExecutionEvent::for_step(&mut conn, a.id)
        .unwrap()
        .into_iter()
        .map(|e| (e.from_status, e.to_status))
        .collect();
    let t = |f: &str, to: &str| (Some(f.to_owned()), to.to_owned());
    assert_eq!(
        history,
        [
            t("pending", "running"),
            t("running", "pending"),
            t("pending", "skipped")
        ]
    );

    // A reclaimed lease under a failed execution.
    let wf = workflow(&mut conn, &["x", "y"], &[]);
    let ex = start(&mut conn, &wf);
    let claimed = engine::claim_steps(&mut conn, "w", 2, LEASE).unwrap();
    let (x, y) = (&claimed[0], &claimed[1]);
    diesel::update(execution_steps::table.filter(execution_steps::id.eq(x.id)))
        .set(execution_steps::max_retries.eq(0))
        .execute(&mut conn)
        .unwrap();
    engine::fail_step(
        &mut conn,
        &Lease::new(x.id, "w", x.attempt),
        "boom",
        &Backoff::default(),
    )
    .unwrap();
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Failed
    );
    diesel::sql_query(
        "UPDATE execution_steps SET locked_until = now() - interval '1 second' WHERE id = $1",
    )
    .bind::<diesel::sql_types::Uuid, _>(y.id)
    .execute(&mut conn)
    .unwrap();
    assert_eq!(engine::reclaim_expired(&mut conn, 10).unwrap().len(), 1);
    assert_eq!(
        ExecutionStep::find(&mut conn, y.id).unwrap().status,
        StepStatus::Skipped
    );
    assert!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn transitions_outside_read_committed_are_refused() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let a = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);

    let err = conn
        .build_transaction()
        .repeatable_read()
        .run(|conn| engine::complete_step(conn, &Lease::new(a.id, "w", a.attempt), None))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("workflow-db engine transitions require READ COMMITTED"),
        "{err}"
    );
    let err = conn
        .build_transaction()
        .serializable()
        .run(|conn| engine::cancel(conn, ex.id))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("workflow-db engine transitions require READ COMMITTED"),
        "{err}"
    );
    assert_eq!(
        ExecutionStep::find(&mut conn, a.id).unwrap(),
        a,
        "unchanged"
    );
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Running
    );

    // READ COMMITTED (the default) works, in a transaction or not.
    conn.build_transaction()
        .read_committed()
        .run(|conn| engine::complete_step(conn, &Lease::new(a.id, "w", a.attempt), None))
        .unwrap();
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Completed
    );
}
