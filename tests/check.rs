//! The invariant checker (`engine::check_invariants`, `db-check`): a database
//! the engine wrote is clean, and every invariant fires on data broken on
//! purpose with SQL (the triggers bypassed with `session_replication_role =
//! replica`, constraints dropped where they would refuse the damage).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;
use workflow_db::Lease;
use workflow_db::engine::{self, Backoff, CheckOptions, InvariantKind, InvariantReport};
use workflow_db::testing::TestDatabase;
use workflow_db::{Execution, ExecutionStep, NewExecution, NewWorkflow, Node, WorkflowGraph};

use common::{LEASE, start, workflow};

const DIAMOND: (&[&str], &[(&str, &str)]) = (
    &["a", "b", "c", "d"],
    &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
);

fn check(conn: &mut PgConnection) -> InvariantReport {
    engine::check_invariants(conn, &CheckOptions::default()).unwrap()
}

fn kinds(report: &InvariantReport) -> BTreeSet<InvariantKind> {
    report.counts.keys().copied().collect()
}

/// The report holds exactly `expected` kinds (nothing else fires), and each
/// `(kind, execution, step)` of `located` is listed.
fn assert_found(
    report: &InvariantReport,
    expected: &[InvariantKind],
    located: &[(InvariantKind, Uuid, Option<Uuid>)],
) {
    assert_eq!(
        kinds(report),
        expected.iter().copied().collect(),
        "violations: {:#?}",
        report.violations
    );
    for (kind, execution, step) in located {
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.kind == *kind && v.execution_id == *execution && v.step_id == *step),
            "{kind} at {execution}/{step:?} not listed: {:#?}",
            report.violations
        );
    }
    assert!(!report.is_clean());
}

/// Runs `sql` with the triggers off (the test server's user is a superuser).
fn corrupt(conn: &mut PgConnection, sql: &str) {
    conn.transaction(|c| {
        c.batch_execute("SET LOCAL session_replication_role = replica")?;
        c.batch_execute(sql)
    })
    .unwrap_or_else(|e| panic!("corrupting with {sql}: {e}"));
}

/// Drops the CHECK constraints that tie the lease to the status (if the
/// schema has any), so that a test can break that invariant.
fn drop_lease_constraints(conn: &mut PgConnection) {
    conn.batch_execute(
        "DO $$ DECLARE c record; BEGIN \
           FOR c IN SELECT conname FROM pg_constraint \
                    WHERE conrelid = 'execution_steps'::regclass AND contype = 'c' \
                      AND pg_get_constraintdef(oid) ~ 'locked_(by|until)' LOOP \
             EXECUTE format('ALTER TABLE execution_steps DROP CONSTRAINT %I', c.conname); \
           END LOOP; END $$",
    )
    .unwrap();
}

/// The step ids of an execution by node id.
fn step_ids(conn: &mut PgConnection, execution: &Execution) -> BTreeMap<String, Uuid> {
    ExecutionStep::list_for_execution(conn, execution.id)
        .unwrap()
        .into_iter()
        .map(|s| (s.node_id, s.id))
        .collect()
}

/// Claims every ready step (worker "w") and completes those named in `nodes`
/// (all when empty), repeatedly, until nothing more is claimable. Steps
/// claimed but not named stay running.
fn complete(conn: &mut PgConnection, nodes: &[&str]) {
    loop {
        let claimed = engine::claim_steps(conn, "w", 100, LEASE).unwrap();
        let mut progressed = false;
        for s in &claimed {
            if nodes.is_empty() || nodes.contains(&s.node_id.as_str()) {
                engine::complete_step(
                    conn,
                    &Lease::new(s.id, "w", s.attempt),
                    Some(&json!({"ok": true})),
                )
                .unwrap();
                progressed = true;
            }
        }
        if !progressed {
            return;
        }
    }
}

fn diamond(conn: &mut PgConnection) -> (Execution, BTreeMap<String, Uuid>) {
    let wf = workflow(conn, DIAMOND.0, DIAMOND.1);
    let ex = start(conn, &wf);
    let ids = step_ids(conn, &ex);
    (ex, ids)
}

fn status(conn: &mut PgConnection, execution: Uuid) -> String {
    #[derive(QueryableByName)]
    struct S {
        #[diesel(sql_type = diesel::sql_types::Text)]
        status: String,
    }
    diesel::sql_query("SELECT status::text FROM executions WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(execution)
        .get_result::<S>(conn)
        .unwrap()
        .status
}

/// A database the engine wrote in ordinary use: chains and diamonds run to
/// the end, retries, a failure for good, a cancel with a step still running
/// that reports later, pause and resume, a sub-execution, an expired lease
/// reclaimed, an execution left running mid-way and one paused.
fn ordinary_use(conn: &mut PgConnection) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let fast = Backoff {
        base: Duration::from_millis(1),
        max: Duration::from_millis(1),
    };
    // Run to completion, with a retry on the way.
    let (ex, _) = diamond(conn);
    ids.push(ex.id);
    let a = engine::claim_steps(conn, "w", 10, LEASE).unwrap();
    engine::fail_step(
        conn,
        &Lease::new(a[0].id, "w", a[0].attempt),
        "flaky",
        &fast,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    complete(conn, &[]);
    assert_eq!(status(conn, ex.id), "completed");

    // Fails for good (no retries): pending steps skipped.
    let g = WorkflowGraph {
        nodes: vec![
            Node::new("x", "task").config(json!({"max_retries": 0})),
            Node::new("y", "task"),
        ],
        edges: vec![workflow_db::Edge::new("x", "y")],
    };
    let wf = NewWorkflow::from_graph("fails", &g).create(conn).unwrap();
    let failing = start(conn, &wf);
    ids.push(failing.id);
    let x = engine::claim_steps(conn, "w", 10, LEASE).unwrap();
    engine::fail_step(conn, &Lease::new(x[0].id, "w", x[0].attempt), "boom", &fast).unwrap();
    assert_eq!(status(conn, failing.id), "failed");

    // Cancelled while a step runs; the step reports afterwards.
    let (cancelled, _) = diamond(conn);
    ids.push(cancelled.id);
    let a = engine::claim_steps(conn, "w", 10, LEASE).unwrap();
    engine::cancel(conn, cancelled.id).unwrap();
    engine::complete_step(conn, &Lease::new(a[0].id, "w", a[0].attempt), None).unwrap();

    // Paused, a step completes meanwhile, resumed, run to the end; with a
    // sub-execution run to the end as well.
    let chain = workflow(conn, &["p", "q", "r"], &[("p", "q"), ("q", "r")]);
    let paused = start(conn, &chain);
    ids.push(paused.id);
    let p = engine::claim_steps(conn, "w", 10, LEASE).unwrap();
    engine::pause(conn, paused.id).unwrap();
    engine::complete_step(conn, &Lease::new(p[0].id, "w", p[0].attempt), None).unwrap();
    assert!(
        engine::claim_steps(conn, "w", 10, LEASE)
            .unwrap()
            .is_empty()
    );
    engine::resume(conn, paused.id).unwrap();
    let child = engine::start_execution(conn, &NewExecution::new(chain.id).parent(paused.id))
        .unwrap()
        .execution;
    ids.push(child.id);
    complete(conn, &[]);
    assert_eq!(status(conn, paused.id), "completed");
    assert_eq!(status(conn, child.id), "completed");

    // An expired lease, reclaimed, then completed.
    let single = workflow(conn, &["s"], &[]);
    let reclaimed = start(conn, &single);
    ids.push(reclaimed.id);
    engine::claim_steps(conn, "crashed", 10, Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(engine::reclaim_expired(conn, 10).unwrap().len(), 1);
    complete(conn, &[]);
    assert_eq!(status(conn, reclaimed.id), "completed");

    // Left mid-way: one step running, others pending; and one paused.
    let (midway, _) = diamond(conn);
    ids.push(midway.id);
    complete(conn, &["a", "b"]);
    let (held, _) = diamond(conn);
    ids.push(held.id);
    engine::pause(conn, held.id).unwrap();
    ids
}

#[test]
fn a_database_in_ordinary_use_is_clean() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let ids = ordinary_use(&mut conn);
    let report = check(&mut conn);
    assert_eq!(report.total(), 0, "{report}\n{:#?}", report.violations);
    assert!(report.is_clean());
    assert_eq!(report.executions, ids.len() as u64);
    assert!(report.steps > 20, "{report}");
    assert_eq!(report.batches, 1);

    // Batches of one or two executions find the same (nothing) and count the same.
    for batch_size in [1, 2] {
        let mut options = CheckOptions::default();
        options.batch_size = batch_size;
        let batched = engine::check_invariants(&mut conn, &options).unwrap();
        assert_eq!(batched.total(), 0);
        assert_eq!(
            (batched.executions, batched.steps),
            (report.executions, report.steps)
        );
        assert_eq!(
            batched.batches,
            (ids.len() as u64).div_ceil(batch_size as u64)
        );
    }
}

#[test]
fn the_shipped_seeds_are_clean() {
    let db = common::seeded();
    let report = check(&mut db.connect());
    // Warnings only: seeded running steps hold long-expired leases, and the
    // seeds leave some nodes without a step on purpose.
    assert!(report.is_clean(), "{report}\n{:#?}", report.violations);
    assert_eq!(report.executions, 6);
}

#[test]
fn an_empty_database_is_clean() {
    let db = TestDatabase::new();
    let report = check(&mut db.connect());
    assert!(report.is_clean());
    assert_eq!((report.executions, report.steps, report.total()), (0, 0, 0));
}

#[test]
fn running_step_without_lease() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["none"]); // claims a, leaves it running
    drop_lease_constraints(&mut conn);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET locked_until = NULL WHERE id = '{}'",
            ids["a"]
        ),
    );
    assert_found(
        &check(&mut conn),
        &[InvariantKind::RunningWithoutLease],
        &[(InvariantKind::RunningWithoutLease, ex.id, Some(ids["a"]))],
    );
}

#[test]
fn expired_lease_is_a_warning_after_the_grace_period() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["none"]);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET locked_until = now() - interval '10 minutes' WHERE id = '{}'",
            ids["a"]
        ),
    );
    let report = check(&mut conn);
    assert_eq!(kinds(&report), [InvariantKind::ExpiredLease].into());
    assert!(report.is_clean(), "a warning only");
    assert_eq!((report.errors(), report.warnings()), (0, 1));
    assert_eq!(report.violations[0].step_id, Some(ids["a"]));
    assert_eq!(report.violations[0].execution_id, ex.id);
    assert!(report.violations[0].detail.contains("expired"));

    // Within a longer grace, or with the check off, nothing.
    let mut options = CheckOptions::default();
    options.expired_lease_grace = Some(Duration::from_secs(3600));
    assert_eq!(
        engine::check_invariants(&mut conn, &options)
            .unwrap()
            .total(),
        0
    );
    options.expired_lease_grace = None;
    assert_eq!(
        engine::check_invariants(&mut conn, &options)
            .unwrap()
            .total(),
        0
    );
}

#[test]
fn lease_while_not_running() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["a"]); // a completed, b and c running, d pending
    drop_lease_constraints(&mut conn);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET locked_by = 'ghost', locked_until = now() + interval '1 minute' \
             WHERE id = '{a}'; \
             UPDATE execution_steps SET locked_by = 'stale' WHERE id = '{d}';",
            a = ids["a"],
            d = ids["d"],
        ),
    );
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::LeaseWhileNotRunning],
        &[
            (InvariantKind::LeaseWhileNotRunning, ex.id, Some(ids["a"])),
            (InvariantKind::LeaseWhileNotRunning, ex.id, Some(ids["d"])),
        ],
    );
    assert_eq!(report.count(InvariantKind::LeaseWhileNotRunning), 2);
}

#[test]
fn upstream_pending_mismatch() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET upstream_pending = 0 WHERE id = '{}'",
            ids["d"]
        ),
    );
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::UpstreamPendingMismatch],
        &[(
            InvariantKind::UpstreamPendingMismatch,
            ex.id,
            Some(ids["d"]),
        )],
    );
    assert!(
        report.violations[0]
            .detail
            .contains("upstream_pending 0, but 2 of its 2 upstream steps are unfinished"),
        "{}",
        report.violations[0].detail
    );
}

#[test]
fn step_ran_before_its_upstream() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    // b runs while a (its upstream) is still pending: what a hand-written claim could do.
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET status = 'running', locked_by = 'w', \
             locked_until = now() + interval '1 minute', started_at = now() WHERE id = '{}'",
            ids["b"]
        ),
    );
    assert_found(
        &check(&mut conn),
        &[InvariantKind::RanBeforeUpstream],
        &[(InvariantKind::RanBeforeUpstream, ex.id, Some(ids["b"]))],
    );
}

#[test]
fn dangling_downstream() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET downstream = downstream || 'nowhere'::text WHERE id = '{}'",
            ids["a"]
        ),
    );
    let report = check(&mut conn);
    assert_eq!(
        kinds(&report),
        [InvariantKind::DanglingDownstream].into(),
        "{:#?}",
        report.violations
    );
    // A warning: rows written by hand, but nothing waits for the missing step.
    assert!(report.is_clean());
    assert_eq!((report.errors(), report.warnings()), (0, 1));
    assert_eq!(report.violations[0].execution_id, ex.id);
    assert_eq!(report.violations[0].step_id, Some(ids["a"]));
    assert!(report.violations[0].detail.contains("nowhere"));
}

#[test]
fn pending_step_under_final_execution() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["a", "b"]); // c running (legitimate under a cancelled execution), d pending
    // The execution is cancelled (with its event) but d was not skipped.
    corrupt(
        &mut conn,
        &format!(
            "UPDATE executions SET status = 'cancelled', completed_at = now() WHERE id = '{id}'; \
             INSERT INTO execution_events (execution_id, from_status, to_status) \
             VALUES ('{id}', 'running', 'cancelled');",
            id = ex.id
        ),
    );
    assert_found(
        &check(&mut conn),
        &[InvariantKind::PendingUnderFinalExecution],
        &[(
            InvariantKind::PendingUnderFinalExecution,
            ex.id,
            Some(ids["d"]),
        )],
    );
}

#[test]
fn completed_execution_with_unfinished_steps() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, _) = diamond(&mut conn);
    complete(&mut conn, &["a", "b", "c"]); // d claimed, left running
    corrupt(
        &mut conn,
        &format!(
            "UPDATE executions SET status = 'completed', completed_at = now() WHERE id = '{id}'; \
             INSERT INTO execution_events (execution_id, from_status, to_status) \
             VALUES ('{id}', 'running', 'completed');",
            id = ex.id
        ),
    );
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::CompletedWithUnfinishedSteps],
        &[(InvariantKind::CompletedWithUnfinishedSteps, ex.id, None)],
    );
    assert!(
        report.violations[0]
            .detail
            .contains("0 pending and 1 running"),
        "{}",
        report.violations[0].detail
    );
}

/// Marks the running step `step` failed (with its event) behind the triggers' back.
fn fail_silently(conn: &mut PgConnection, execution: Uuid, step: Uuid) {
    drop_lease_constraints(conn);
    corrupt(
        conn,
        &format!(
            "UPDATE execution_steps SET status = 'failed', error = 'boom', completed_at = now(), \
             locked_by = NULL, locked_until = NULL WHERE id = '{step}'; \
             INSERT INTO execution_events (execution_id, step_id, from_status, to_status) \
             VALUES ('{execution}', '{step}', 'running', 'failed');"
        ),
    );
}

#[test]
fn completed_execution_with_failed_step() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["a", "b", "c"]);
    fail_silently(&mut conn, ex.id, ids["d"]);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE executions SET status = 'completed', completed_at = now() WHERE id = '{id}'; \
             INSERT INTO execution_events (execution_id, from_status, to_status) \
             VALUES ('{id}', 'running', 'completed');",
            id = ex.id
        ),
    );
    assert_found(
        &check(&mut conn),
        &[InvariantKind::CompletedWithFailedStep],
        &[(
            InvariantKind::CompletedWithFailedStep,
            ex.id,
            Some(ids["d"]),
        )],
    );
}

#[test]
fn running_execution_with_failed_step() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["none"]); // a running
    fail_silently(&mut conn, ex.id, ids["a"]);
    assert_found(
        &check(&mut conn),
        &[InvariantKind::RunningWithFailedStep],
        &[(InvariantKind::RunningWithFailedStep, ex.id, Some(ids["a"]))],
    );
}

#[test]
fn running_execution_with_all_steps_final_is_stuck() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["a", "b", "c"]); // d running
    // d completes, but the execution does not settle (what issue 10's resume race left).
    drop_lease_constraints(&mut conn);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET status = 'completed', completed_at = now(), \
             locked_by = NULL, locked_until = NULL WHERE id = '{d}'; \
             INSERT INTO execution_events (execution_id, step_id, from_status, to_status) \
             VALUES ('{ex}', '{d}', 'running', 'completed');",
            d = ids["d"],
            ex = ex.id
        ),
    );
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::RunningWithAllStepsFinal],
        &[(InvariantKind::RunningWithAllStepsFinal, ex.id, None)],
    );
    assert!(
        report.violations[0]
            .detail
            .contains("4 steps are all final")
    );
}

#[test]
fn step_started_under_pending_execution() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["solo"], &[]);
    // Inserted with the models (no start): the execution stays pending.
    let ex = NewExecution::new(wf.id).create(&mut conn).unwrap();
    let step = workflow_db::NewExecutionStep::new(ex.id, "solo")
        .create(&mut conn)
        .unwrap();
    assert_eq!(check(&mut conn).total(), 0, "a pending execution is fine");
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET status = 'completed', completed_at = now() WHERE id = '{}'",
            step.id
        ),
    );
    assert_found(
        &check(&mut conn),
        &[InvariantKind::StepStartedUnderPendingExecution],
        &[(
            InvariantKind::StepStartedUnderPendingExecution,
            ex.id,
            Some(step.id),
        )],
    );
}

#[test]
fn step_event_chain_with_a_gap() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["a"]);
    // A second pending -> running after running -> completed: not contiguous.
    conn.batch_execute(&format!(
        "INSERT INTO execution_events (execution_id, step_id, from_status, to_status) \
         VALUES ('{ex}', '{a}', 'pending', 'running'), ('{ex}', '{a}', 'running', 'completed')",
        ex = ex.id,
        a = ids["a"]
    ))
    .unwrap();
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::StepEventChain],
        &[(InvariantKind::StepEventChain, ex.id, Some(ids["a"]))],
    );
    assert!(
        report.violations[0]
            .detail
            .contains("starts from pending but the previous event"),
        "{}",
        report.violations[0].detail
    );
}

#[test]
fn step_event_chain_not_ending_in_the_status() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["none"]); // a running, with its event
    drop_lease_constraints(&mut conn);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET status = 'pending', locked_by = NULL, locked_until = NULL \
             WHERE id = '{}'",
            ids["a"]
        ),
    );
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::StepEventChain],
        &[(InvariantKind::StepEventChain, ex.id, Some(ids["a"]))],
    );
    assert!(
        report.violations[0]
            .detail
            .contains("ends in running but the step is pending"),
        "{}",
        report.violations[0].detail
    );
}

#[test]
fn step_event_with_an_illegal_transition() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    // pending -> completed skips running; the chain is contiguous and ends
    // in the status, but the transition is illegal.
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET status = 'completed', completed_at = now() WHERE id = '{c}'; \
             INSERT INTO execution_events (execution_id, step_id, from_status, to_status) \
             VALUES ('{ex}', '{c}', 'pending', 'completed');",
            ex = ex.id,
            c = ids["c"]
        ),
    );
    let report = check(&mut conn);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.kind == InvariantKind::StepEventChain
                && v.step_id == Some(ids["c"])
                && v.detail.contains("illegal transition pending -> completed")),
        "{:#?}",
        report.violations
    );
}

#[test]
fn execution_event_chain() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, _) = diamond(&mut conn);
    // An event says the execution was paused; it was not. Inserting events
    // is allowed (the table is append-only, not insert-only).
    conn.batch_execute(&format!(
        "INSERT INTO execution_events (execution_id, from_status, to_status) \
         VALUES ('{}', 'running', 'paused')",
        ex.id
    ))
    .unwrap();
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::ExecutionEventChain],
        &[(InvariantKind::ExecutionEventChain, ex.id, None)],
    );
    assert!(
        report.violations[0]
            .detail
            .contains("ends in paused but the execution is running"),
        "{}",
        report.violations[0].detail
    );
}

#[test]
fn final_execution_without_completed_at() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, _) = diamond(&mut conn);
    complete(&mut conn, &[]);
    assert_eq!(status(&mut conn, ex.id), "completed");
    corrupt(
        &mut conn,
        &format!(
            "UPDATE executions SET completed_at = NULL WHERE id = '{}'",
            ex.id
        ),
    );
    assert_found(
        &check(&mut conn),
        &[InvariantKind::ExecutionCompletedAtMissing],
        &[(InvariantKind::ExecutionCompletedAtMissing, ex.id, None)],
    );
}

#[test]
fn final_step_without_completed_at() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    complete(&mut conn, &["a"]);
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET completed_at = NULL WHERE id = '{}'",
            ids["a"]
        ),
    );
    assert_found(
        &check(&mut conn),
        &[InvariantKind::StepCompletedAtMissing],
        &[(InvariantKind::StepCompletedAtMissing, ex.id, Some(ids["a"]))],
    );
}

#[test]
fn parked_mismatch_when_the_column_exists() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (ex, ids) = diamond(&mut conn);
    let report = check(&mut conn);
    if !report.parked_checked {
        eprintln!("execution_steps.parked does not exist in this schema: nothing to check");
        return;
    }
    assert_eq!(report.total(), 0);
    engine::pause(&mut conn, ex.id).unwrap();
    assert_eq!(check(&mut conn).total(), 0, "paused: parked steps");
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET parked = false WHERE id = '{}'",
            ids["a"]
        ),
    );
    assert_found(
        &check(&mut conn),
        &[InvariantKind::ParkedMismatch],
        &[(InvariantKind::ParkedMismatch, ex.id, Some(ids["a"]))],
    );
}

#[test]
fn batches_find_everything_and_the_list_is_capped() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, DIAMOND.0, DIAMOND.1);
    let executions: Vec<Execution> = (0..5).map(|_| start(&mut conn, &wf)).collect();
    // d of every execution claims it has no upstream left, a of every
    // execution names a node that does not exist: 5 violations of each kind.
    corrupt(
        &mut conn,
        "UPDATE execution_steps SET upstream_pending = 0 WHERE node_id = 'd'; \
         UPDATE execution_steps SET downstream = downstream || 'nowhere'::text WHERE node_id = 'a'",
    );
    let mut options = CheckOptions::default();
    options.batch_size = 2;
    options.max_per_kind = 3;
    let report = engine::check_invariants(&mut conn, &options).unwrap();
    assert_eq!(report.batches, 3);
    assert_eq!(report.executions, 5);
    assert_eq!(report.steps, 20);
    assert_eq!(report.count(InvariantKind::UpstreamPendingMismatch), 5);
    assert_eq!(report.count(InvariantKind::DanglingDownstream), 5);
    // At most 3 listed of each kind: one kind does not hide the other.
    assert_eq!(report.violations.len(), 6);
    assert!(report.truncated());
    let mut ids: Vec<Uuid> = executions.iter().map(|e| e.id).collect();
    ids.sort();
    for kind in [
        InvariantKind::UpstreamPendingMismatch,
        InvariantKind::DanglingDownstream,
    ] {
        // In id order: the first three executions.
        let listed: Vec<Uuid> = report
            .violations
            .iter()
            .filter(|v| v.kind == kind)
            .map(|v| v.execution_id)
            .collect();
        assert_eq!(listed, ids[..3], "{kind}");
    }

    // Progress is reported after each batch.
    let mut seen = Vec::new();
    engine::check_invariants_with_progress(&mut conn, &options, |p| seen.push(p.executions))
        .unwrap();
    assert_eq!(seen, [2, 4, 5]);
}

#[test]
fn it_runs_with_select_privileges_only() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    ordinary_use(&mut conn);
    // A role that may only read: the checker needs nothing more. Roles are
    // per server, so the name is unique and the role dropped at the end.
    let role = format!("{}_reader", db.name());
    conn.batch_execute(&format!(
        "CREATE ROLE {role} NOLOGIN; GRANT USAGE ON SCHEMA public TO {role}; \
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}; SET ROLE {role}"
    ))
    .unwrap();
    let report = engine::check_invariants(&mut conn, &CheckOptions::default());
    conn.batch_execute(&format!(
        "RESET ROLE; DROP OWNED BY {role}; DROP ROLE {role}"
    ))
    .unwrap();
    let report = report.unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(report.executions > 0);
}

// ---------------------------------------------------------------------------
// Flow control (migration 000025): keys, queues, delayed starts.

/// A one-node workflow; `config` is the node's (e.g. `{"queue": "q"}`).
fn one_node(conn: &mut PgConnection, config: serde_json::Value) -> workflow_db::Workflow {
    let graph = WorkflowGraph {
        nodes: vec![Node::new("a", "task").config(config)],
        edges: vec![],
    };
    NewWorkflow::from_graph("flow", &graph)
        .create(conn)
        .unwrap()
}

/// Starts an execution of `wf` with concurrency key `key`; returns it and
/// its step's id.
fn start_keyed(
    conn: &mut PgConnection,
    wf: &workflow_db::Workflow,
    key: &str,
) -> (Execution, Uuid) {
    let ex = engine::start_execution(conn, &NewExecution::new(wf.id).concurrency_key(key))
        .unwrap()
        .execution;
    let step = step_ids(conn, &ex)["a"];
    (ex, step)
}

fn throttled(conn: &mut PgConnection, step: Uuid) -> bool {
    use workflow_db::schema::execution_steps;
    execution_steps::table
        .find(step)
        .select(execution_steps::throttled)
        .first(conn)
        .unwrap()
}

/// The nil id, which the checks of queues (rows of no execution) name.
const NIL: Uuid = Uuid::nil();

/// Flow control in ordinary use is clean: throttled steps behind a key at
/// its limit, a limited queue at its limit, a paused queue, a delayed start
/// still ahead, a deduplicated start, priorities.
#[test]
fn flow_control_in_ordinary_use_is_clean() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, json!({}));
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    let (_, first) = start_keyed(&mut conn, &wf, "k");
    let (_, second) = start_keyed(&mut conn, &wf, "k");
    assert!(!throttled(&mut conn, first));
    assert!(throttled(&mut conn, second), "the key is at its limit");
    let on_q = one_node(&mut conn, json!({"queue": "q", "priority": 5}));
    engine::set_queue_limit(&mut conn, "q", Some(1)).unwrap();
    for _ in 0..2 {
        start(&mut conn, &on_q);
    }
    engine::claim_from(&mut conn, "w", &["q".to_owned()], 10, LEASE).unwrap();
    let on_paused = one_node(&mut conn, json!({"queue": "p"}));
    start(&mut conn, &on_paused);
    engine::pause_queue(&mut conn, "p").unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let delayed = engine::start_execution(&mut conn, &NewExecution::new(wf.id).start_after(later))
        .unwrap()
        .execution;
    assert_eq!(status(&mut conn, delayed.id), "pending");
    let deduped = NewExecution::new(on_paused.id).dedup_key("once");
    assert!(
        engine::start_execution(&mut conn, &deduped)
            .unwrap()
            .created
    );
    assert!(
        !engine::start_execution(&mut conn, &deduped)
            .unwrap()
            .created
    );

    let report = check(&mut conn);
    assert_eq!(report.total(), 0, "{report}\n{:#?}", report.violations);
    // Also with a grace of zero for overdue starts: the start is ahead.
    let mut options = CheckOptions::default();
    options.expired_lease_grace = Some(Duration::ZERO);
    let report = engine::check_invariants(&mut conn, &options).unwrap();
    assert_eq!(report.total(), 0, "{report}\n{:#?}", report.violations);
}

#[test]
fn concurrency_key_over_limit() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, json!({}));
    engine::set_concurrency_limit(&mut conn, "k", 2).unwrap();
    let started: Vec<(Execution, Uuid)> =
        (0..3).map(|_| start_keyed(&mut conn, &wf, "k")).collect();
    let running = engine::claim_steps(&mut conn, "w", 10, LEASE).unwrap();
    assert_eq!(running.len(), 2, "the third is throttled");
    let (_, third) = started
        .iter()
        .find(|(_, s)| !running.iter().any(|r| r.id == *s))
        .unwrap();
    assert!(throttled(&mut conn, *third));
    assert_eq!(check(&mut conn).total(), 0);
    // Admitted behind the trigger's back: 2 running + 1 admitted > 2.
    corrupt(
        &mut conn,
        &format!("UPDATE execution_steps SET throttled = false WHERE id = '{third}'"),
    );
    let report = check(&mut conn);
    assert_found(&report, &[InvariantKind::ConcurrencyKeyOverLimit], &[]);
    assert_eq!(report.count(InvariantKind::ConcurrencyKeyOverLimit), 1);
    let v = &report.violations[0];
    // The execution named is one with a running step of the key.
    assert!(
        running.iter().any(|r| r.execution_id == v.execution_id),
        "{v}"
    );
    assert_eq!(v.step_id, None);
    assert_eq!(v.detail, "key k: 2 running + 1 admitted > max_running 2");
}

#[test]
fn throttled_without_limit() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, json!({}));
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    start_keyed(&mut conn, &wf, "k");
    let (second, step) = start_keyed(&mut conn, &wf, "k");
    assert!(throttled(&mut conn, step));
    // The limit removed without its trigger, which would release the step.
    corrupt(&mut conn, "DELETE FROM concurrency_limits WHERE key = 'k'");
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::ThrottledWithoutLimit],
        &[(InvariantKind::ThrottledWithoutLimit, second.id, Some(step))],
    );
    assert_eq!(report.count(InvariantKind::ThrottledWithoutLimit), 1);
    assert!(report.violations[0].detail.contains("has no limit"));
}

#[test]
fn throttled_with_a_free_slot_is_a_warning_until_a_rebalance() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, json!({}));
    engine::set_concurrency_limit(&mut conn, "k", 1).unwrap();
    start_keyed(&mut conn, &wf, "k");
    let (second, step) = start_keyed(&mut conn, &wf, "k");
    assert!(throttled(&mut conn, step));
    // The limit raised without its trigger, which would admit the step.
    corrupt(
        &mut conn,
        "UPDATE concurrency_limits SET max_running = 3 WHERE key = 'k'",
    );
    let report = check(&mut conn);
    assert_eq!(
        kinds(&report),
        [InvariantKind::ThrottledWithFreeSlot].into(),
        "{:#?}",
        report.violations
    );
    assert!(report.is_clean(), "a warning only");
    assert_eq!((report.errors(), report.warnings()), (0, 1));
    let v = &report.violations[0];
    assert_eq!((v.execution_id, v.step_id), (second.id, Some(step)));
    assert_eq!(
        v.detail,
        "step a is throttled but key k has 0 running + 1 admitted of 3"
    );
    // What the maintenance loop does: admitted, and nothing left.
    assert_eq!(engine::rebalance_concurrency_keys(&mut conn).unwrap(), 1);
    assert!(!throttled(&mut conn, step));
    assert_eq!(check(&mut conn).total(), 0);
}

#[test]
fn queue_counter_mismatch() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, json!({"queue": "q"}));
    engine::set_queue_limit(&mut conn, "q", Some(5)).unwrap();
    start(&mut conn, &wf);
    start(&mut conn, &wf);
    assert_eq!(
        engine::claim_from(&mut conn, "w", &["q".to_owned()], 10, LEASE)
            .unwrap()
            .len(),
        2
    );
    assert_eq!(check(&mut conn).total(), 0);
    corrupt(&mut conn, "UPDATE queues SET running = 1 WHERE name = 'q'");
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::QueueCounterMismatch],
        &[(InvariantKind::QueueCounterMismatch, NIL, None)],
    );
    assert_eq!(report.count(InvariantKind::QueueCounterMismatch), 1);
    assert_eq!(
        report.violations[0].detail,
        "queue q: running counter 1, running steps 2"
    );
    // A check of no execution in particular: once, whatever the batches.
    let mut options = CheckOptions::default();
    options.batch_size = 1;
    let batched = engine::check_invariants(&mut conn, &options).unwrap();
    assert_eq!(batched.batches, 2);
    assert_eq!(batched.count(InvariantKind::QueueCounterMismatch), 1);
}

#[test]
fn queue_over_limit() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, json!({"queue": "q"}));
    engine::set_queue_limit(&mut conn, "q", Some(3)).unwrap();
    for _ in 0..4 {
        start(&mut conn, &wf);
    }
    let running = engine::claim_steps(&mut conn, "w", 10, LEASE).unwrap();
    assert_eq!(running.len(), 3, "the limit holds");
    assert_eq!(check(&mut conn).total(), 0);
    // The limit lowered under the 3 running steps, behind the triggers' back.
    corrupt(
        &mut conn,
        "UPDATE queues SET max_running = 2 WHERE name = 'q'",
    );
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::QueueOverLimit],
        &[(InvariantKind::QueueOverLimit, NIL, None)],
    );
    assert_eq!(report.count(InvariantKind::QueueOverLimit), 1);
    assert_eq!(
        report.violations[0].detail,
        "queue q: 3 running steps > max_running 2"
    );
    // Nothing more is claimed meanwhile; once one finishes, it is not.
    assert!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .is_empty()
    );
    engine::complete_step(&mut conn, &running[0].lease().unwrap(), None).unwrap();
    assert_eq!(check(&mut conn).total(), 0);
}

#[test]
fn delayed_start_overdue_is_a_warning_after_the_grace_period() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = one_node(&mut conn, json!({}));
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let delayed = engine::start_execution(&mut conn, &NewExecution::new(wf.id).start_after(later))
        .unwrap()
        .execution;
    assert_eq!(status(&mut conn, delayed.id), "pending");
    let mut options = CheckOptions::default();
    options.expired_lease_grace = Some(Duration::from_secs(1));
    assert_eq!(
        engine::check_invariants(&mut conn, &options)
            .unwrap()
            .total(),
        0
    );
    // Its time came 10 minutes ago and nothing started it.
    corrupt(
        &mut conn,
        &format!(
            "UPDATE executions SET start_after = now() - interval '10 minutes' WHERE id = '{}'",
            delayed.id
        ),
    );
    for options in [options.clone(), CheckOptions::default()] {
        let report = engine::check_invariants(&mut conn, &options).unwrap();
        assert_eq!(
            kinds(&report),
            [InvariantKind::DelayedStartOverdue].into(),
            "{:#?}",
            report.violations
        );
        assert!(report.is_clean(), "a warning only");
        assert_eq!((report.errors(), report.warnings()), (0, 1));
        let v = &report.violations[0];
        assert_eq!((v.execution_id, v.step_id), (delayed.id, None));
        assert!(v.detail.starts_with("pending execution due at "), "{v}");
    }
    // Within a longer grace, or with the check off, nothing.
    options.expired_lease_grace = Some(Duration::from_secs(3600));
    assert_eq!(
        engine::check_invariants(&mut conn, &options)
            .unwrap()
            .total(),
        0
    );
    options.expired_lease_grace = None;
    assert_eq!(
        engine::check_invariants(&mut conn, &options)
            .unwrap()
            .total(),
        0
    );
    // Started (what the maintenance loop does): nothing either.
    assert_eq!(
        engine::start_due_executions(&mut conn, 10).unwrap(),
        vec![delayed.id]
    );
    assert_eq!(check(&mut conn).total(), 0);
}

// ---------------------------------------------------------------------------
// Timers and signals (migration 000039): every wait kind against data the
// engine wrote (Node::timer, Node::signal, send_signal, fire_due_waits),
// then broken with the triggers off.

const HOUR: Duration = Duration::from_secs(3600);

fn waits_workflow(
    conn: &mut PgConnection,
    nodes: Vec<Node>,
    edges: &[(&str, &str)],
) -> workflow_db::Workflow {
    let graph = WorkflowGraph {
        nodes,
        edges: edges
            .iter()
            .map(|(s, t)| workflow_db::Edge::new(*s, *t))
            .collect(),
    };
    NewWorkflow::from_graph("waits", &graph)
        .create(conn)
        .unwrap()
}

fn step_status(conn: &mut PgConnection, step: Uuid) -> String {
    #[derive(QueryableByName)]
    struct S {
        #[diesel(sql_type = diesel::sql_types::Text)]
        status: String,
    }
    diesel::sql_query("SELECT status::text FROM execution_steps WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(step)
        .get_result::<S>(conn)
        .unwrap()
        .status
}

fn fire(conn: &mut PgConnection) -> engine::WaitReport {
    engine::fire_due_waits(conn, 100).unwrap()
}

fn with_grace(grace: Option<Duration>) -> CheckOptions {
    let mut options = CheckOptions::default();
    options.expired_lease_grace = grace;
    options
}

/// Waits in every state are clean, also with a grace of zero once the due
/// ones ran: an armed timer, signal waits with and without a timeout, a
/// signal delivered at once and one kept for a step not reached yet, a
/// signal inserted with plain SQL that woke its step (before the
/// maintenance loop delivers it), a timer fired, a signal wait timed out,
/// a due timer of a paused execution, a root timer of a delayed start.
#[test]
fn waits_in_every_state_are_clean() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = waits_workflow(
        &mut conn,
        vec![
            Node::timer("t", HOUR),
            Node::signal("s", "go"),
            Node::signal("st", "go2").with_timeout(HOUR),
        ],
        &[],
    );
    let waiting = start(&mut conn, &wf);
    let ids = step_ids(&mut conn, &waiting);

    let wf = waits_workflow(
        &mut conn,
        vec![
            Node::signal("now", "go"),
            Node::new("work", "task"),
            Node::signal("later", "go"),
        ],
        &[("work", "later")],
    );
    let mailbox = start(&mut conn, &wf);
    let mailbox_ids = step_ids(&mut conn, &mailbox);
    let first = engine::send_signal(&mut conn, mailbox.id, "go", Some(&json!(1))).unwrap();
    assert_eq!(first.signal.delivered_to, Some(mailbox_ids["now"]));
    let second = engine::send_signal(&mut conn, mailbox.id, "go", Some(&json!(2))).unwrap();
    assert_eq!(second.signal.delivered_to, None, "kept for `later`");

    let wf = waits_workflow(&mut conn, vec![Node::signal("w", "sql")], &[]);
    let woken = start(&mut conn, &wf);
    diesel::sql_query("INSERT INTO execution_signals (execution_id, name) VALUES ($1, 'sql')")
        .bind::<diesel::sql_types::Uuid, _>(woken.id)
        .execute(&mut conn)
        .unwrap();

    let wf = waits_workflow(
        &mut conn,
        vec![Node::timer("z", Duration::ZERO), Node::new("next", "task")],
        &[("z", "next")],
    );
    let fired = start(&mut conn, &wf);
    let wf = waits_workflow(
        &mut conn,
        vec![Node::signal("late", "never").with_timeout(Duration::from_millis(1))],
        &[],
    );
    let timed_out = start(&mut conn, &wf);
    let wf = waits_workflow(&mut conn, vec![Node::timer("p", Duration::ZERO)], &[]);
    let paused = start(&mut conn, &wf);
    engine::pause(&mut conn, paused.id).unwrap();
    let wf = waits_workflow(&mut conn, vec![Node::timer("d", HOUR)], &[]);
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let delayed = engine::start_execution(&mut conn, &NewExecution::new(wf.id).start_after(later))
        .unwrap()
        .execution;
    std::thread::sleep(Duration::from_millis(20));

    // Due waits not yet run, within the grace: clean.
    let report = check(&mut conn);
    assert_eq!(report.total(), 0, "{report}\n{:#?}", report.violations);
    let mut expected = engine::WaitReport::default();
    expected.due = 3;
    expected.timers_fired = 1;
    expected.signals_delivered = 1;
    expected.signals_timed_out = 1;
    assert_eq!(fire(&mut conn), expected, "z, w and late (p is paused)");
    assert_eq!(status(&mut conn, timed_out.id), "failed");
    assert_eq!(status(&mut conn, woken.id), "completed");
    assert_eq!(status(&mut conn, fired.id), "running");
    assert_eq!(status(&mut conn, paused.id), "paused");
    assert_eq!(status(&mut conn, delayed.id), "pending");
    for node in ["t", "s", "st"] {
        assert_eq!(step_status(&mut conn, ids[node]), "pending", "{node}");
    }

    for options in [CheckOptions::default(), with_grace(Some(Duration::ZERO)), {
        let mut o = with_grace(Some(Duration::ZERO));
        o.batch_size = 1;
        o
    }] {
        let report = engine::check_invariants(&mut conn, &options).unwrap();
        assert_eq!(report.total(), 0, "{report}\n{:#?}", report.violations);
        assert_eq!(report.executions, 7);
    }
}

#[test]
fn timer_unarmed() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = waits_workflow(
        &mut conn,
        vec![Node::timer("t", HOUR), Node::signal("s", "go")],
        &[],
    );
    let ex = start(&mut conn, &wf);
    let ids = step_ids(&mut conn, &ex);
    assert_eq!(check(&mut conn).total(), 0, "a signal wait has no wake_at");
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET wake_at = NULL WHERE id = '{}'",
            ids["t"]
        ),
    );
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::TimerUnarmed],
        &[(InvariantKind::TimerUnarmed, ex.id, Some(ids["t"]))],
    );
    assert_eq!(report.count(InvariantKind::TimerUnarmed), 1);
    assert!(
        report.violations[0]
            .detail
            .starts_with("ready timer step t has no wake_at (wait_seconds '3600'"),
        "{}",
        report.violations[0]
    );
    // Nothing ever fires it.
    assert_eq!(fire(&mut conn), engine::WaitReport::default());
    // The explanation's fix: armed, it fires at the next round.
    diesel::sql_query("UPDATE execution_steps SET wake_at = now() WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(ids["t"])
        .execute(&mut conn)
        .unwrap();
    assert_eq!(check(&mut conn).total(), 0);
    assert_eq!(fire(&mut conn).timers_fired, 1);
    assert_eq!(step_status(&mut conn, ids["t"]), "completed");
    assert_eq!(check(&mut conn).total(), 0);
}

#[test]
fn wait_overdue_is_a_warning_after_the_grace_period() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = waits_workflow(&mut conn, vec![Node::timer("t", HOUR)], &[]);
    let timer = start(&mut conn, &wf);
    let t = step_ids(&mut conn, &timer)["t"];
    let wf = waits_workflow(
        &mut conn,
        vec![Node::signal("s", "go").with_timeout(HOUR)],
        &[],
    );
    let signal = start(&mut conn, &wf);
    let s = step_ids(&mut conn, &signal)["s"];
    let mut options = with_grace(Some(Duration::from_secs(1)));
    assert_eq!(
        engine::check_invariants(&mut conn, &options)
            .unwrap()
            .total(),
        0
    );
    // Their time came 10 minutes ago and nothing ran them.
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_steps SET wake_at = now() - interval '10 minutes', \
                    wait_until = CASE WHEN wait_signal IS NOT NULL THEN now() - interval '10 minutes' END \
              WHERE id IN ('{t}', '{s}')"
        ),
    );
    for options in [options.clone(), CheckOptions::default()] {
        let report = engine::check_invariants(&mut conn, &options).unwrap();
        assert_eq!(
            kinds(&report),
            [InvariantKind::WaitOverdue].into(),
            "{:#?}",
            report.violations
        );
        assert!(report.is_clean(), "a warning only");
        assert_eq!((report.errors(), report.warnings()), (0, 2));
        let found: BTreeSet<(Uuid, Option<Uuid>)> = report
            .violations
            .iter()
            .map(|v| (v.execution_id, v.step_id))
            .collect();
        assert_eq!(found, [(timer.id, Some(t)), (signal.id, Some(s))].into());
        let v = report
            .violations
            .iter()
            .find(|v| v.step_id == Some(t))
            .unwrap();
        assert!(
            v.detail
                .starts_with("ready workflow_db.timer step t was due at "),
            "{v}"
        );
    }
    // Within a longer grace, or with the check off, nothing.
    options.expired_lease_grace = Some(HOUR);
    assert_eq!(
        engine::check_invariants(&mut conn, &options)
            .unwrap()
            .total(),
        0
    );
    options.expired_lease_grace = None;
    assert_eq!(
        engine::check_invariants(&mut conn, &options)
            .unwrap()
            .total(),
        0
    );
    // A paused execution's wait is not due (it is parked).
    engine::pause(&mut conn, timer.id).unwrap();
    let report = check(&mut conn);
    assert_eq!(
        report
            .violations
            .iter()
            .map(|v| v.step_id)
            .collect::<Vec<_>>(),
        [Some(s)]
    );
    engine::resume(&mut conn, timer.id).unwrap();
    // What the maintenance loop does: fired and timed out, nothing left.
    let ran = fire(&mut conn);
    assert_eq!((ran.timers_fired, ran.signals_timed_out), (1, 1));
    assert_eq!(status(&mut conn, timer.id), "completed");
    assert_eq!(status(&mut conn, signal.id), "failed");
    assert_eq!(check(&mut conn).total(), 0);
}

#[test]
fn signal_undelivered() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = waits_workflow(&mut conn, vec![Node::signal("s", "go")], &[]);
    let forever = start(&mut conn, &wf);
    let wf = waits_workflow(
        &mut conn,
        vec![Node::signal("s", "go").with_timeout(HOUR)],
        &[],
    );
    let bounded = start(&mut conn, &wf);
    let steps = [
        step_ids(&mut conn, &forever)["s"],
        step_ids(&mut conn, &bounded)["s"],
    ];
    // A signal nobody waits for is kept, not a violation.
    engine::send_signal(&mut conn, forever.id, "other", None).unwrap();
    assert_eq!(check(&mut conn).total(), 0);
    // Signals inserted without their trigger, which would wake the steps.
    let signals = [Uuid::now_v7(), Uuid::now_v7()];
    for (ex, id) in [(forever.id, signals[0]), (bounded.id, signals[1])] {
        corrupt(
            &mut conn,
            &format!(
                "INSERT INTO execution_signals (id, execution_id, name, payload) \
                 VALUES ('{id}', '{ex}', 'go', '1')"
            ),
        );
    }
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::SignalUndelivered],
        &[
            (InvariantKind::SignalUndelivered, forever.id, Some(steps[0])),
            (InvariantKind::SignalUndelivered, bounded.id, Some(steps[1])),
        ],
    );
    assert_eq!(report.count(InvariantKind::SignalUndelivered), 2);
    for v in &report.violations {
        let signal = if v.execution_id == forever.id {
            signals[0]
        } else {
            signals[1]
        };
        assert!(
            v.detail
                .starts_with("step s waits for signal 'go' (wake_at ")
                && v.detail.contains(&format!(
                    "1 undelivered signal(s) of that name wait, the oldest {signal} sent at "
                )),
            "{v}"
        );
    }
    // Stuck: the maintenance loop does not see them.
    assert_eq!(fire(&mut conn), engine::WaitReport::default());
    // The explanation's fix: woken, they are delivered at the next round.
    diesel::sql_query("UPDATE execution_steps SET wake_at = now() WHERE id = ANY($1)")
        .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&steps[..])
        .execute(&mut conn)
        .unwrap();
    assert_eq!(check(&mut conn).total(), 0);
    assert_eq!(fire(&mut conn).signals_delivered, 2);
    assert_eq!(status(&mut conn, forever.id), "completed");
    assert_eq!(status(&mut conn, bounded.id), "completed");
    assert_eq!(check(&mut conn).total(), 0);
}

#[test]
fn signal_delivery_mismatch() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = waits_workflow(&mut conn, vec![Node::signal("s", "go")], &[]);
    // Four executions whose signal step took its signal, one still waiting,
    // one with an ordinary step done.
    let mut delivered = Vec::new();
    for _ in 0..3 {
        let ex = start(&mut conn, &wf);
        let step = step_ids(&mut conn, &ex)["s"];
        let sent = engine::send_signal(&mut conn, ex.id, "go", None).unwrap();
        assert_eq!(sent.signal.delivered_to, Some(step));
        delivered.push((ex.id, step, sent.signal.id));
    }
    let waiting = start(&mut conn, &wf);
    let waiting_step = step_ids(&mut conn, &waiting)["s"];
    let plain = workflow(&mut conn, &["a"], &[]);
    let done = start(&mut conn, &plain);
    complete(&mut conn, &[]);
    assert_eq!(status(&mut conn, done.id), "completed");
    let done_step = step_ids(&mut conn, &done)["a"];
    assert_eq!(check(&mut conn).total(), 0);

    let [
        (moved_from, moved_step, moved),
        (_, renamed_step, renamed),
        (other, _, _),
    ] = delivered[..]
    else {
        unreachable!()
    };
    corrupt(
        &mut conn,
        &format!(
            // Its signal now belongs to another execution.
            "UPDATE execution_signals SET execution_id = '{other}' WHERE id = '{moved}'; \
             UPDATE execution_signals SET name = 'went' WHERE id = '{renamed}'; \
             INSERT INTO execution_signals (execution_id, name, delivered_to, delivered_at) \
             VALUES ('{w}', 'go', '{waiting_step}', now()), \
                    ('{d}', 'go', '{done_step}', now());",
            w = waiting.id,
            d = done.id,
        ),
    );
    let located = [
        (
            InvariantKind::SignalDeliveryMismatch,
            other,
            Some(moved_step),
        ),
        (
            InvariantKind::SignalDeliveryMismatch,
            delivered[1].0,
            Some(renamed_step),
        ),
        (
            InvariantKind::SignalDeliveryMismatch,
            waiting.id,
            Some(waiting_step),
        ),
        (
            InvariantKind::SignalDeliveryMismatch,
            done.id,
            Some(done_step),
        ),
    ];
    let report = check(&mut conn);
    assert_found(&report, &[InvariantKind::SignalDeliveryMismatch], &located);
    assert_eq!(report.count(InvariantKind::SignalDeliveryMismatch), 4);
    let detail = |step: Uuid| {
        report
            .violations
            .iter()
            .find(|v| v.step_id == Some(step))
            .unwrap()
            .detail
            .clone()
    };
    assert!(
        detail(moved_step).starts_with(&format!("signal {moved} 'go' was delivered at "))
            && detail(moved_step).ends_with(&format!(
                "to completed step s ('workflow_db.signal', waits for 'go') of execution {moved_from}"
            )),
        "{}",
        detail(moved_step)
    );
    assert!(
        detail(renamed_step).contains(" 'went' was delivered at "),
        "{}",
        detail(renamed_step)
    );
    assert!(
        detail(waiting_step).contains("to pending step s "),
        "{}",
        detail(waiting_step)
    );
    assert!(
        detail(done_step).contains("to completed step a ('task', waits for NULL) of execution"),
        "{}",
        detail(done_step)
    );
    // Found once each, whatever the batches (the moved signal's step and
    // its new execution are in different batches).
    let mut options = CheckOptions::default();
    options.batch_size = 1;
    let batched = engine::check_invariants(&mut conn, &options).unwrap();
    assert_eq!(batched.batches, 5);
    assert_eq!(batched.count(InvariantKind::SignalDeliveryMismatch), 4);
    assert_found(&batched, &[InvariantKind::SignalDeliveryMismatch], &located);
}

#[test]
fn signal_step_without_signal() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // With a timer, fired: a completed timer takes no signal.
    let wf = waits_workflow(
        &mut conn,
        vec![Node::signal("s", "go"), Node::timer("t", Duration::ZERO)],
        &[],
    );
    let mut done = Vec::new();
    for _ in 0..2 {
        let ex = start(&mut conn, &wf);
        let sent = engine::send_signal(&mut conn, ex.id, "go", Some(&json!({"ok": true}))).unwrap();
        assert_eq!(sent.report.timers_fired, 1);
        assert_eq!(status(&mut conn, ex.id), "completed");
        done.push((ex.id, step_ids(&mut conn, &ex)["s"], sent.signal.id));
    }
    assert_eq!(check(&mut conn).total(), 0);
    // One signal taken back (undelivered: kept in a finished execution,
    // which waits for nothing, so not a violation itself), one deleted.
    corrupt(
        &mut conn,
        &format!(
            "UPDATE execution_signals SET delivered_to = NULL, delivered_at = NULL WHERE id = '{}'; \
             DELETE FROM execution_signals WHERE id = '{}'",
            done[0].2, done[1].2
        ),
    );
    let report = check(&mut conn);
    assert_found(
        &report,
        &[InvariantKind::SignalStepWithoutSignal],
        &[
            (
                InvariantKind::SignalStepWithoutSignal,
                done[0].0,
                Some(done[0].1),
            ),
            (
                InvariantKind::SignalStepWithoutSignal,
                done[1].0,
                Some(done[1].1),
            ),
        ],
    );
    assert_eq!(report.count(InvariantKind::SignalStepWithoutSignal), 2);
    assert_eq!(
        report.violations[0].detail,
        "completed signal step s (waits for 'go') took no signal"
    );
}

#[cfg(feature = "cli")]
mod binary {
    use std::process::{Command, Output};

    use serde_json::Value;

    use super::*;

    fn db_check(url: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_db-check"))
            .args(args)
            .env("DATABASE_URL", url)
            .env_remove("APP_ENV")
            .env_remove("RUST_ENV")
            .env_remove("NODE_ENV")
            .current_dir(std::env::temp_dir()) // no .env from the checkout
            .output()
            .unwrap()
    }

    fn text(o: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    fn json_lines(o: &Output) -> Vec<Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// A database with one execution stuck running and one expired lease.
    fn broken() -> (TestDatabase, Uuid) {
        let db = TestDatabase::new();
        let mut conn = db.connect();
        let (ex, ids) = diamond(&mut conn);
        complete(&mut conn, &["a", "b", "c"]);
        drop_lease_constraints(&mut conn);
        corrupt(
            &mut conn,
            &format!(
                "UPDATE execution_steps SET status = 'completed', completed_at = now(), \
                 locked_by = NULL, locked_until = NULL WHERE id = '{d}'; \
                 INSERT INTO execution_events (execution_id, step_id, from_status, to_status) \
                 VALUES ('{ex}', '{d}', 'running', 'completed');",
                d = ids["d"],
                ex = ex.id
            ),
        );
        let (_, other) = diamond(&mut conn);
        complete(&mut conn, &["none"]);
        corrupt(
            &mut conn,
            &format!(
                "UPDATE execution_steps SET locked_until = now() - interval '1 hour' WHERE id = '{}'",
                other["a"]
            ),
        );
        (db, ex.id)
    }

    #[test]
    fn clean_exits_0_broken_exits_6() {
        let db = TestDatabase::new();
        ordinary_use(&mut db.connect());
        let url = db.url().expose().to_owned();
        let o = db_check(&url, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let out = text(&o);
        assert!(out.starts_with("db-check: target "), "{out}");
        assert!(out.contains(": clean"), "{out}");

        let (broken, stuck) = broken();
        let o = db_check(broken.url().expose(), &["--batch", "1"]);
        assert_eq!(o.status.code(), Some(6), "{}", text(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stdout.contains(&format!(
                "error running_with_all_steps_final execution {stuck}: running execution whose 4 steps are all final"
            )),
            "{stdout}"
        );
        assert!(
            stdout.contains("running_with_all_steps_final: 1 ("),
            "{stdout}"
        );
        assert!(
            stdout.contains("INVARIANTS BROKEN: 1 error(s), 1 warning(s)"),
            "{stdout}"
        );
        assert!(stdout.contains("in 2 batch(es)"), "{stdout}");
        // The warning goes to stderr, as the other binaries' warnings do.
        assert!(
            stderr.contains("warning: expired_lease execution"),
            "{stderr}"
        );

        // A longer grace hides the warning; the error stays.
        let o = db_check(broken.url().expose(), &["--lease-grace", "7200"]);
        assert_eq!(o.status.code(), Some(6));
        assert!(!text(&o).contains("expired_lease"), "{}", text(&o));
        // The exit code does not depend on how many violations are listed.
        let o = db_check(broken.url().expose(), &["--limit", "0"]);
        assert_eq!(o.status.code(), Some(6), "{}", text(&o));
        assert!(!text(&o).contains("error running_with_all_steps_final"));
        assert!(text(&o).contains("running_with_all_steps_final: 1 ("));
    }

    #[test]
    fn warnings_alone_exit_0() {
        let db = TestDatabase::new();
        let mut conn = db.connect();
        let (_, ids) = diamond(&mut conn);
        complete(&mut conn, &["none"]);
        corrupt(
            &mut conn,
            &format!(
                "UPDATE execution_steps SET locked_until = now() - interval '1 hour' WHERE id = '{}'",
                ids["a"]
            ),
        );
        let o = db_check(db.url().expose(), &[]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert!(text(&o).contains("clean, 1 warning(s)"), "{}", text(&o));
    }

    #[test]
    fn json_lines_shape() {
        let (db, stuck) = broken();
        let o = db_check(db.url().expose(), &["--json"]);
        assert_eq!(o.status.code(), Some(6), "{}", text(&o));
        assert!(
            o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let lines = json_lines(&o);
        assert_eq!(lines[0]["event"], "target");
        let violations: Vec<&Value> = lines.iter().filter(|l| l["event"] == "violation").collect();
        assert_eq!(violations.len(), 2, "{lines:#?}");
        let stuck_line = violations
            .iter()
            .find(|v| v["kind"] == "running_with_all_steps_final")
            .unwrap();
        assert_eq!(stuck_line["severity"], "error");
        assert_eq!(stuck_line["execution_id"], stuck.to_string());
        assert!(stuck_line["step_id"].is_null());
        assert!(stuck_line["detail"].as_str().unwrap().contains("all final"));
        let warning = violations
            .iter()
            .find(|v| v["kind"] == "expired_lease")
            .unwrap();
        assert_eq!(warning["severity"], "warning");
        assert_eq!(warning["level"], "warning");
        assert!(warning["step_id"].is_string());
        let counts: Vec<&Value> = lines.iter().filter(|l| l["event"] == "count").collect();
        assert_eq!(counts.len(), 2);
        assert!(
            counts
                .iter()
                .all(|c| c["count"] == 1 && c["explanation"].is_string())
        );
        let summary = lines.last().unwrap();
        assert_eq!(summary["event"], "check");
        assert_eq!(summary["clean"], false);
        assert_eq!(summary["errors"], 1);
        assert_eq!(summary["warnings"], 1);
        assert_eq!(summary["executions"], 2);
        assert_eq!(summary["steps"], 8);
        assert_eq!(summary["listed"], 2);
        assert_eq!(summary["truncated"], false);
        assert!(summary["duration_ms"].is_u64());
        assert!(summary["target"].as_str().unwrap().contains(db.name()));

        let clean = TestDatabase::new();
        let o = db_check(clean.url().expose(), &["--json"]);
        assert_eq!(o.status.code(), Some(0));
        let lines = json_lines(&o);
        assert_eq!(lines.len(), 2, "target and check: {lines:#?}");
        assert_eq!(lines[1]["clean"], true);
    }

    /// A flow-control kind in the JSON lines: a queue whose counter is
    /// wrong (an error, of no execution in particular: the nil id).
    #[test]
    fn json_lines_name_a_queue_counter_mismatch() {
        let db = TestDatabase::new();
        let mut conn = db.connect();
        let wf = one_node(&mut conn, json!({"queue": "q"}));
        engine::set_queue_limit(&mut conn, "q", Some(5)).unwrap();
        start(&mut conn, &wf);
        engine::claim_steps(&mut conn, "w", 10, LEASE).unwrap();
        let o = db_check(db.url().expose(), &["--json"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        // Below the limit: queue_over_limit compares the counter, not the
        // running steps, so a counter above it would report that kind too.
        corrupt(&mut conn, "UPDATE queues SET running = 3 WHERE name = 'q'");
        let o = db_check(db.url().expose(), &["--json"]);
        assert_eq!(o.status.code(), Some(6), "{}", text(&o));
        let lines = json_lines(&o);
        let violations: Vec<&Value> = lines.iter().filter(|l| l["event"] == "violation").collect();
        assert_eq!(violations.len(), 1, "{lines:#?}");
        let v = violations[0];
        assert_eq!(v["kind"], "queue_counter_mismatch");
        assert_eq!(v["severity"], "error");
        assert_eq!(v["execution_id"], NIL.to_string());
        assert!(v["step_id"].is_null());
        assert_eq!(v["detail"], "queue q: running counter 3, running steps 1");
        let summary = lines.last().unwrap();
        assert_eq!(summary["event"], "check");
        assert_eq!(summary["errors"], 1);
        assert_eq!(summary["warnings"], 0);
    }

    #[test]
    fn errors_exit_1_and_the_password_never_appears() {
        let secret = "pr0d-S3cret-pw";
        let (db, _) = broken();
        let with_password =
            db.url()
                .expose()
                .replacen("postgres@", &format!("postgres:{secret}@"), 1);
        assert!(with_password.contains(secret));
        let unreachable = format!("postgres://postgres:{secret}@127.0.0.1:1/nowhere");
        for (url, args) in [
            (with_password.as_str(), &[][..]),
            (with_password.as_str(), &["--json"][..]),
            (unreachable.as_str(), &[][..]),
            (unreachable.as_str(), &["--json"][..]),
            (with_password.as_str(), &["--batch", "0"][..]),
        ] {
            let o = db_check(url, args);
            assert!(
                !text(&o).contains(secret),
                "password leaked by {args:?}: {}",
                text(&o)
            );
        }
        let o = db_check(&unreachable, &[]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&o.stderr)
                .starts_with("db-check: error: cannot connect to 127.0.0.1:1"),
            "{}",
            text(&o)
        );
        let o = db_check(&unreachable, &["--json"]);
        assert_eq!(o.status.code(), Some(1));
        let last = json_lines(&o).pop().unwrap();
        assert_eq!(last["event"], "error");
        assert_eq!(last["exit_code"], 1);
        // A usage error is clap's exit 2.
        assert_eq!(
            db_check(&with_password, &["--batch", "0"]).status.code(),
            Some(2)
        );
    }
}
