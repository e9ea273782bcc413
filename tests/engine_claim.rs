//! Claiming work: SKIP LOCKED under real concurrency, leases, dependencies, retries.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use diesel::prelude::*;
use workflow_db::Lease;
use workflow_db::engine::{self, Backoff, ReclaimPolicy};
use workflow_db::schema::execution_steps;
use workflow_db::testing::TestDatabase;
use workflow_db::{Error, Execution, ExecutionStatus, ExecutionStep, LeaseLostReason, StepStatus};

use common::{LEASE, start, workflow};

const WORKERS: usize = 4;
const EXECUTIONS: usize = 10;
const NODES: usize = 1000;

fn pending(conn: &mut PgConnection) -> i64 {
    execution_steps::table
        .filter(execution_steps::status.eq_any([StepStatus::Pending, StepStatus::Running]))
        .count()
        .get_result(conn)
        .unwrap()
}

#[test]
fn four_workers_claim_ten_thousand_steps_once_each_and_lose_none() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let ids: Vec<String> = (0..NODES).map(|i| format!("n{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let wf = workflow(&mut conn, &ids, &[]);
    let executions: Vec<Execution> = (0..EXECUTIONS).map(|_| start(&mut conn, &wf)).collect();
    assert_eq!(pending(&mut conn), (EXECUTIONS * NODES) as i64);

    let barrier = Arc::new(Barrier::new(WORKERS));
    let handles: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (barrier, mut conn) = (barrier.clone(), db.connect());
            std::thread::spawn(move || {
                let worker = format!("worker-{w}");
                let mut claimed = Vec::new();
                barrier.wait();
                loop {
                    let batch = engine::claim_steps(&mut conn, &worker, 50, LEASE).unwrap();
                    if batch.is_empty() {
                        // Rows briefly locked by other workers are skipped; stop
                        // only when nothing is left to run.
                        if pending(&mut conn) == 0 {
                            return claimed;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    conn.transaction::<_, workflow_db::Error, _>(|conn| {
                        for step in &batch {
                            assert_eq!(step.locked_by.as_deref(), Some(worker.as_str()));
                            engine::complete_step(
                                conn,
                                &Lease::new(step.id, &worker, step.attempt),
                                None,
                            )?;
                        }
                        Ok(())
                    })
                    .unwrap();
                    claimed.extend(batch.into_iter().map(|s| s.id));
                }
            })
        })
        .collect();
    let per_worker: Vec<Vec<uuid::Uuid>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let total: usize = per_worker.iter().map(Vec::len).sum();
    let unique: HashSet<uuid::Uuid> = per_worker.iter().flatten().copied().collect();
    assert_eq!(total, EXECUTIONS * NODES, "every step claimed");
    assert_eq!(unique.len(), total, "no step claimed twice");
    assert!(
        per_worker.iter().all(|c| !c.is_empty()),
        "all workers got work"
    );
    let completed: i64 = execution_steps::table
        .filter(execution_steps::status.eq(StepStatus::Completed))
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(completed, (EXECUTIONS * NODES) as i64);
    for ex in executions {
        assert_eq!(
            Execution::find(&mut conn, ex.id).unwrap().status,
            ExecutionStatus::Completed,
            "the last step completed each execution"
        );
    }
}

#[test]
fn a_claimed_step_is_locked_against_other_claimers() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[]);
    start(&mut conn, &wf);
    let mut other = db.connect();
    conn.transaction(|conn| {
        let mine = engine::claim_steps(conn, "w1", 1, LEASE)?;
        // Uncommitted: the other worker skips the locked row and gets the other one.
        let theirs = engine::claim_steps(&mut other, "w2", 10, LEASE)?;
        assert_eq!((mine.len(), theirs.len()), (1, 1));
        assert_ne!(mine[0].id, theirs[0].id);
        QueryResult::Ok(())
    })
    .unwrap();
    assert!(
        engine::claim_steps(&mut other, "w2", 10, LEASE)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_step_is_not_claimable_until_its_upstream_steps_are_done() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // a -> b -> d, a -> c -> d
    let wf = workflow(
        &mut conn,
        &["a", "b", "c", "d"],
        &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    );
    let ex = start(&mut conn, &wf);
    let claim = |conn: &mut PgConnection| -> Vec<String> {
        let mut ids: Vec<String> = engine::claim_steps(conn, "w", 10, LEASE)
            .unwrap()
            .into_iter()
            .map(|s| s.node_id)
            .collect();
        ids.sort();
        ids
    };
    let step = |conn: &mut PgConnection, node: &str| -> ExecutionStep {
        ExecutionStep::list_for_execution(conn, ex.id)
            .unwrap()
            .into_iter()
            .find(|s| s.node_id == node)
            .unwrap()
    };
    assert_eq!(claim(&mut conn), ["a"]);
    assert!(claim(&mut conn).is_empty(), "b and c wait for a");
    assert_eq!(step(&mut conn, "d").upstream_pending, 2);
    let a = step(&mut conn, "a");
    engine::complete_step(&mut conn, &Lease::new(a.id, "w", a.attempt), None).unwrap();
    assert_eq!(claim(&mut conn), ["b", "c"]);
    let b = step(&mut conn, "b");
    engine::complete_step(&mut conn, &Lease::new(b.id, "w", b.attempt), None).unwrap();
    assert!(claim(&mut conn).is_empty(), "d still waits for c");
    let c = step(&mut conn, "c");
    engine::complete_step(&mut conn, &Lease::new(c.id, "w", c.attempt), None).unwrap();
    assert_eq!(claim(&mut conn), ["d"]);

    // A skipped upstream step counts as done.
    let wf = workflow(&mut conn, &["x", "y"], &[("x", "y")]);
    let ex = start(&mut conn, &wf);
    let x = ExecutionStep::list_for_execution(&mut conn, ex.id)
        .unwrap()
        .remove(0);
    engine::transition_step(&mut conn, x.id, StepStatus::Pending, StepStatus::Skipped).unwrap();
    assert_eq!(claim(&mut conn), ["y"]);
}

#[test]
fn an_expired_lease_counted_as_a_failure_spends_a_retry() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let step = engine::claim_steps(&mut conn, "w1", 1, LEASE)
        .unwrap()
        .remove(0);
    assert_eq!(
        engine::heartbeat(&mut conn, &[Lease::new(step.id, "w1", step.attempt)], LEASE).unwrap(),
        [step.id]
    );
    assert!(
        engine::reclaim_expired(&mut conn, 10).unwrap().is_empty(),
        "lease still valid"
    );

    // The worker went silent: its lease is in the past.
    diesel::sql_query("UPDATE execution_steps SET locked_until = now() - interval '1 second'")
        .execute(&mut conn)
        .unwrap();
    let reclaimed =
        engine::reclaim_expired_with(&mut conn, 10, ReclaimPolicy::CountAsFailure).unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(
        (
            reclaimed[0].status,
            reclaimed[0].retry_count,
            reclaimed[0].reclaims
        ),
        (StepStatus::Pending, 1, 1)
    );
    assert!(
        reclaimed[0]
            .error
            .as_deref()
            .unwrap()
            .contains("lease of worker w1 expired")
    );

    let again = engine::claim_steps(&mut conn, "w2", 1, LEASE)
        .unwrap()
        .remove(0);
    assert_eq!(
        (again.id, again.locked_by.as_deref()),
        (step.id, Some("w2"))
    );
    // The old worker has lost it.
    assert!(
        engine::heartbeat(&mut conn, &[Lease::new(step.id, "w1", step.attempt)], LEASE)
            .unwrap()
            .is_empty()
    );
    let err = engine::complete_step(&mut conn, &Lease::new(step.id, "w1", step.attempt), None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLostReason::Superseded,
                ..
            }
        ),
        "{err}"
    );
    engine::complete_step(&mut conn, &again.lease().unwrap(), None).unwrap();
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Completed
    );

    // With no retries left an expired lease fails the step (and the execution).
    let ex = start(&mut conn, &wf);
    diesel::update(execution_steps::table.filter(execution_steps::execution_id.eq(ex.id)))
        .set(execution_steps::max_retries.eq(0))
        .execute(&mut conn)
        .unwrap();
    engine::claim_steps(&mut conn, "w1", 1, Duration::ZERO).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let failed =
        engine::reclaim_expired_with(&mut conn, 10, ReclaimPolicy::CountAsFailure).unwrap();
    assert_eq!(failed[0].status, StepStatus::Failed);
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Failed
    );
}

#[test]
fn a_failed_attempt_is_retried_after_its_backoff() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    start(&mut conn, &wf);
    let step = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let backoff = Backoff {
        base: Duration::from_secs(3600),
        max: Duration::from_secs(7200),
    };
    let retry = engine::fail_step(
        &mut conn,
        &Lease::new(step.id, "w", step.attempt),
        "flaky",
        &backoff,
    )
    .unwrap();
    assert_eq!((retry.status, retry.retry_count), (StepStatus::Pending, 1));
    assert_eq!(retry.error.as_deref(), Some("flaky"));
    let wait = retry.run_after - chrono::Utc::now();
    assert!(wait > chrono::TimeDelta::minutes(59), "{wait}");
    assert!(
        engine::claim_steps(&mut conn, "w", 1, LEASE)
            .unwrap()
            .is_empty(),
        "not before its retry time"
    );
    diesel::update(execution_steps::table)
        .set(execution_steps::run_after.eq(diesel::dsl::now))
        .execute(&mut conn)
        .unwrap();
    let again = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let retry = engine::fail_step(
        &mut conn,
        &Lease::new(again.id, "w", again.attempt),
        "flaky",
        &backoff,
    )
    .unwrap();
    let wait = retry.run_after - chrono::Utc::now();
    assert!(
        wait > chrono::TimeDelta::minutes(119),
        "doubled, capped: {wait}"
    );
}

#[test]
fn an_expired_lease_cannot_report_even_before_it_is_reclaimed() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let step = engine::claim_steps(&mut conn, "w1", 1, LEASE)
        .unwrap()
        .remove(0);
    // The worker stalled past its lease; no reaper has run yet.
    diesel::sql_query("UPDATE execution_steps SET locked_until = now() - interval '1 second'")
        .execute(&mut conn)
        .unwrap();
    let stalled = ExecutionStep::find(&mut conn, step.id).unwrap();

    assert!(
        engine::heartbeat(&mut conn, &[Lease::new(step.id, "w1", step.attempt)], LEASE)
            .unwrap()
            .is_empty(),
        "an expired lease is not extended"
    );
    let err = engine::complete_step(&mut conn, &Lease::new(step.id, "w1", step.attempt), None)
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    let err = engine::fail_step(
        &mut conn,
        &Lease::new(step.id, "w1", step.attempt),
        "late",
        &Backoff::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert_eq!(
        ExecutionStep::find(&mut conn, step.id).unwrap(),
        stalled,
        "nothing changed"
    );
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Running
    );
    // The reaper hands it to someone else.
    assert_eq!(engine::reclaim_expired(&mut conn, 10).unwrap().len(), 1);
    let again = engine::claim_steps(&mut conn, "w2", 1, LEASE)
        .unwrap()
        .remove(0);
    engine::complete_step(&mut conn, &Lease::new(again.id, "w2", again.attempt), None).unwrap();
}

#[test]
fn a_huge_retry_count_backs_off_no_longer_than_the_cap() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    start(&mut conn, &wf);
    diesel::update(execution_steps::table)
        .set((
            execution_steps::retry_count.eq(5000),
            execution_steps::max_retries.eq(10_000),
        ))
        .execute(&mut conn)
        .unwrap();
    let step = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(600),
    };
    let retry = engine::fail_step(
        &mut conn,
        &Lease::new(step.id, "w", step.attempt),
        "flaky",
        &backoff,
    )
    .unwrap();
    assert_eq!(
        (retry.status, retry.retry_count),
        (StepStatus::Pending, 5001)
    );
    let wait = retry.run_after - chrono::Utc::now();
    assert!(
        wait > chrono::TimeDelta::minutes(9) && wait <= chrono::TimeDelta::minutes(10),
        "capped at max: {wait}"
    );

    // An unbounded max is clamped too.
    let step = {
        diesel::update(execution_steps::table)
            .set(execution_steps::run_after.eq(diesel::dsl::now))
            .execute(&mut conn)
            .unwrap();
        engine::claim_steps(&mut conn, "w", 1, LEASE)
            .unwrap()
            .remove(0)
    };
    let unbounded = Backoff {
        base: Duration::from_secs(1),
        max: Duration::MAX,
    };
    let retry = engine::fail_step(
        &mut conn,
        &Lease::new(step.id, "w", step.attempt),
        "flaky",
        &unbounded,
    )
    .unwrap();
    assert_eq!(retry.status, StepStatus::Pending);
}

#[test]
fn complete_steps_completes_a_batch_in_one_statement_or_nothing() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b", "c"], &[]);
    let ex = start(&mut conn, &wf);
    let claimed = engine::claim_steps(&mut conn, "w1", 10, LEASE).unwrap();
    assert_eq!(claimed.len(), 3);
    // One step of the batch is not ours: nothing is completed.
    let mut batch: Vec<_> = claimed
        .iter()
        .map(|s| (s.lease().unwrap(), Some(serde_json::json!({"n": 1}))))
        .collect();
    let mut forged = batch.clone();
    forged[1].0.worker = "w2".into();
    let err = engine::complete_steps(&mut conn, &forged).unwrap_err();
    assert!(
        matches!(err, Error::LeaseLost { step_id, reason: LeaseLostReason::Superseded, .. } if step_id == claimed[1].id),
        "{err}"
    );
    assert!(
        ExecutionStep::list_for_execution(&mut conn, ex.id)
            .unwrap()
            .iter()
            .all(|s| s.status == StepStatus::Running)
    );
    batch[2].1 = None;
    let done = engine::complete_steps(&mut conn, &batch).unwrap();
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|s| s.status == StepStatus::Completed));
    let outputs: Vec<_> = ExecutionStep::list_for_execution(&mut conn, ex.id)
        .unwrap()
        .into_iter()
        .map(|s| (s.id, s.output))
        .collect();
    for (lease, output) in &batch {
        assert!(outputs.contains(&(lease.step_id, output.clone())));
    }
    // The last completion settled the execution, as with complete_step.
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Completed
    );
}

/// The engine keeps its hot statements prepared per connection. A migration
/// that adds a column while a service runs must not break them: PostgreSQL
/// refuses to reuse a prepared statement whose result columns changed
/// ("cached plan must not change result type"), so they list their columns.
#[test]
fn prepared_engine_statements_survive_a_column_added_under_a_running_service() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b", "c", "d"], &[]);
    // Warm every statement past PostgreSQL's five custom plans, so the
    // connection holds prepared statements and generic plans.
    for _ in 0..6 {
        start(&mut conn, &wf);
    }
    for _ in 0..6 {
        let step = engine::claim_steps(&mut conn, "w", 1, LEASE)
            .unwrap()
            .remove(0);
        engine::heartbeat(&mut conn, &[Lease::new(step.id, "w", step.attempt)], LEASE).unwrap();
        engine::complete_step(&mut conn, &Lease::new(step.id, "w", step.attempt), None).unwrap();
    }

    for _ in 0..6 {
        let batch: Vec<_> = engine::claim_steps(&mut conn, "w", 2, LEASE)
            .unwrap()
            .into_iter()
            .map(|s| (s.lease().unwrap(), None))
            .collect();
        engine::complete_steps(&mut conn, &batch).unwrap();
    }

    use diesel::connection::SimpleConnection;
    db.connect()
        .batch_execute(
            "ALTER TABLE execution_steps ADD COLUMN added_later int; \
             ALTER TABLE executions ADD COLUMN added_later int",
        )
        .unwrap();

    let execution = start(&mut conn, &wf);
    let step = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    engine::heartbeat(&mut conn, &[Lease::new(step.id, "w", step.attempt)], LEASE).unwrap();
    let done =
        engine::complete_step(&mut conn, &Lease::new(step.id, "w", step.attempt), None).unwrap();
    assert_eq!(done.status, StepStatus::Completed);
    let batch: Vec<_> = engine::claim_steps(&mut conn, "w", 2, LEASE)
        .unwrap()
        .into_iter()
        .map(|s| (s.lease().unwrap(), None))
        .collect();
    assert_eq!(engine::complete_steps(&mut conn, &batch).unwrap().len(), 2);
    let failed = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let retried = engine::fail_step(
        &mut conn,
        &Lease::new(failed.id, "w", failed.attempt),
        "boom",
        &Backoff::default(),
    )
    .unwrap();
    assert_eq!(retried.status, StepStatus::Pending);
    assert_eq!(execution.status, ExecutionStatus::Running);
}

fn expire_all_leases(conn: &mut PgConnection) {
    diesel::sql_query(
        "UPDATE execution_steps SET locked_until = now() - interval '1 second' \
         WHERE status = 'running'",
    )
    .execute(conn)
    .unwrap();
}

/// Fencing: the attempt number is the lease token. A worker that stalled past
/// its lease, whose step was reclaimed and claimed again under the SAME
/// worker id, is refused on every report and changes nothing.
#[test]
fn a_stale_holder_is_refused_even_under_the_same_worker_id() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let first = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let stale = first.lease().unwrap();
    assert_eq!(stale.attempt, 1);

    // Expired but not yet reclaimed: refused as expired.
    expire_all_leases(&mut conn);
    let err = engine::complete_step(&mut conn, &stale, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLostReason::Expired,
                attempt: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(engine::reclaim_expired(&mut conn, 10).unwrap().len(), 1);
    let second = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let current = second.lease().unwrap();
    assert_eq!(
        (current.step_id, current.worker.as_str(), current.attempt),
        (stale.step_id, "w", 2)
    );

    let before = ExecutionStep::find(&mut conn, stale.step_id).unwrap();
    assert!(
        engine::heartbeat(&mut conn, std::slice::from_ref(&stale), LEASE)
            .unwrap()
            .is_empty()
    );
    for err in [
        engine::complete_step(&mut conn, &stale, None).unwrap_err(),
        engine::fail_step(&mut conn, &stale, "late", &Backoff::default()).unwrap_err(),
        engine::complete_steps(&mut conn, &[(stale.clone(), None)]).unwrap_err(),
    ] {
        assert!(
            matches!(
                err,
                Error::LeaseLost {
                    reason: LeaseLostReason::Superseded,
                    attempt: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("no longer leased to worker \"w\" (attempt 1)"),
            "{err}"
        );
    }
    assert!(
        engine::release_steps(&mut conn, std::slice::from_ref(&stale))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ExecutionStep::find(&mut conn, stale.step_id).unwrap(),
        before,
        "nothing changed"
    );

    assert_eq!(
        engine::heartbeat(&mut conn, std::slice::from_ref(&current), LEASE).unwrap(),
        [current.step_id]
    );
    engine::complete_step(&mut conn, &current, None).unwrap();
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Completed
    );
    let err = engine::complete_step(&mut conn, &current, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLostReason::Finished(StepStatus::Completed),
                ..
            }
        ),
        "{err}"
    );

    // A step whose execution is gone.
    let ex = start(&mut conn, &wf);
    let gone = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    diesel::delete(workflow_db::schema::executions::table.find(ex.id))
        .execute(&mut conn)
        .unwrap();
    let err = engine::complete_step(&mut conn, &gone.lease().unwrap(), None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLostReason::Deleted,
                ..
            }
        ),
        "{err}"
    );
}

/// Every run is numbered by the database, whoever starts it.
#[test]
fn a_run_started_by_hand_gets_a_new_attempt_number() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    start(&mut conn, &wf);
    let claimed = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let stale = claimed.lease().unwrap();
    diesel::sql_query("UPDATE execution_steps SET status = 'pending' WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(claimed.id)
        .execute(&mut conn)
        .unwrap();
    diesel::sql_query(
        "UPDATE execution_steps SET status = 'running', locked_by = 'w' WHERE id = $1",
    )
    .bind::<diesel::sql_types::Uuid, _>(claimed.id)
    .execute(&mut conn)
    .unwrap();
    let by_hand = ExecutionStep::find(&mut conn, claimed.id).unwrap();
    assert_eq!(by_hand.attempt, 2);
    let err = engine::complete_step(&mut conn, &stale, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLostReason::Superseded,
                ..
            }
        ),
        "{err}"
    );
    engine::complete_step(&mut conn, &by_hand.lease().unwrap(), None).unwrap();
}

/// A worker shutting down hands its steps back: pending, claimable at once,
/// no retry spent; leases it no longer holds are skipped.
#[test]
fn release_steps_hands_steps_back_without_spending_a_retry() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[]);
    let ex = start(&mut conn, &wf);
    let claimed = engine::claim_steps(&mut conn, "w", 2, LEASE).unwrap();
    let leases: Vec<Lease> = claimed.iter().map(|s| s.lease().unwrap()).collect();
    let mut not_mine = leases[1].clone();
    not_mine.attempt += 1;

    let released = engine::release_steps(&mut conn, &[leases[0].clone(), not_mine]).unwrap();
    assert_eq!(released.len(), 1);
    let r = &released[0];
    assert_eq!(
        (r.id, r.status, r.retry_count),
        (leases[0].step_id, StepStatus::Pending, 0)
    );
    assert_eq!((r.locked_by.as_deref(), r.locked_until), (None, None));
    let still = ExecutionStep::find(&mut conn, leases[1].step_id).unwrap();
    assert_eq!(
        still.status,
        StepStatus::Running,
        "a lease not held is not released"
    );

    // Claimable at once, as a new attempt; the old lease is dead.
    let again = engine::claim_steps(&mut conn, "w2", 1, LEASE)
        .unwrap()
        .remove(0);
    assert_eq!(
        (again.id, again.attempt, again.retry_count),
        (leases[0].step_id, 2, 0)
    );
    assert!(engine::complete_step(&mut conn, &leases[0], None).is_err());
    let history: Vec<(Option<String>, String)> =
        workflow_db::ExecutionEvent::for_step(&mut conn, again.id)
            .unwrap()
            .into_iter()
            .map(|e| (e.from_status, e.to_status))
            .collect();
    assert_eq!(
        history,
        [
            (Some("pending".into()), "running".into()),
            (Some("running".into()), "pending".into()),
            (Some("pending".into()), "running".into()),
        ]
    );
    engine::complete_steps(
        &mut conn,
        &[(again.lease().unwrap(), None), (leases[1].clone(), None)],
    )
    .unwrap();
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Completed
    );
}

#[test]
fn by_default_a_crash_spends_no_retry_until_the_step_was_reclaimed_too_often() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let expire = |conn: &mut PgConnection| {
        diesel::sql_query(
            "UPDATE execution_steps SET locked_until = now() - interval '1 second' WHERE status = 'running'",
        )
        .execute(conn)
        .unwrap();
    };
    // max_retries is 0 here: under CountAsFailure the first crash would fail it.
    for n in 1..=engine::DEFAULT_MAX_RECLAIMS {
        let s = engine::claim_steps(&mut conn, "w", 1, LEASE)
            .unwrap()
            .remove(0);
        assert_eq!(s.attempt, n);
        expire(&mut conn);
        let r = engine::reclaim_expired(&mut conn, 10).unwrap().remove(0);
        assert_eq!(
            (r.status, r.retry_count, r.reclaims),
            (StepStatus::Pending, 0, n),
            "reclaim {n}: back to pending, no retry spent"
        );
        assert!(r.locked_by.is_none() && r.locked_until.is_none());
    }
    // One crash too many: the step itself is the problem.
    engine::claim_steps(&mut conn, "w", 1, LEASE).unwrap();
    expire(&mut conn);
    let r = engine::reclaim_expired(&mut conn, 10).unwrap().remove(0);
    assert_eq!(
        (r.status, r.reclaims),
        (StepStatus::Failed, engine::DEFAULT_MAX_RECLAIMS + 1)
    );
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("lease of worker w expired"),
        "{r:?}"
    );
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Failed
    );

    // A policy of its own: no reclaim allowed.
    let ex = start(&mut conn, &wf);
    engine::claim_steps(&mut conn, "w", 1, LEASE).unwrap();
    expire(&mut conn);
    let r = engine::reclaim_expired_with(&mut conn, 10, ReclaimPolicy::Requeue { max_reclaims: 0 })
        .unwrap()
        .remove(0);
    assert_eq!(r.status, StepStatus::Failed);
    assert_eq!(
        Execution::find(&mut conn, ex.id).unwrap().status,
        ExecutionStatus::Failed
    );
}
