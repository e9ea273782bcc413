//! Regression tests for the interleavings of issue 10, each one forced, never
//! hoped for: several real connections, transactions held open while another
//! session acts, and "B now waits for A's lock" read from `pg_stat_activity`
//! rather than slept for. No test measures time.
//!
//! A [`Session`] is one connection driven by its own thread: the test sends it
//! statements, and [`Session::settle`] waits until it has run them all or is
//! waiting on a lock (the interleaving point the next step depends on).

mod common;

use std::fmt::Debug;
use std::time::Duration;

use chrono::Utc;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text, Uuid as SqlUuid};
use serde_json::json;
use uuid::Uuid;
use workflow_db::Lease;
use workflow_db::engine::{self, Backoff};
use workflow_db::models::bulk::{self, CopyStep};
use workflow_db::schema::execution_steps;
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Error, Execution, ExecutionStatus, ExecutionStep, NewExecution, NewExecutionStep, StepStatus,
};

use common::session::{Outcome, Session, State};
use common::{LEASE, start, workflow};

/// Asserts that every statement of every session succeeded; a deadlock
/// (SQLSTATE 40P01, "deadlock detected") is called out by name.
fn assert_all_ok(what: &str, sessions: &[(&str, &[(String, Outcome)])]) {
    let failed: Vec<String> = sessions
        .iter()
        .flat_map(|(name, outcomes)| {
            outcomes.iter().filter_map(move |(label, outcome)| {
                outcome
                    .as_ref()
                    .err()
                    .map(|e| format!("session {name}, `{label}`: {e}"))
            })
        })
        .collect();
    let deadlock = failed.iter().any(|f| f.contains("deadlock detected"));
    assert!(
        failed.is_empty(),
        "{what}: every statement must succeed{}, but:\n  {}\nall outcomes: {sessions:#?}",
        if deadlock {
            " — PostgreSQL found a DEADLOCK (SQLSTATE 40P01)"
        } else {
            ""
        },
        failed.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// Small helpers.

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Nullable<Bool>)]
    flag: Option<bool>,
}

/// `sql` must select one bigint named `n`, with `$1` the id.
fn count(conn: &mut PgConnection, sql: &str, id: Uuid) -> i64 {
    diesel::sql_query(sql)
        .bind::<SqlUuid, _>(id)
        .get_result::<Count>(conn)
        .unwrap()
        .n
}

fn exec_sql(conn: &mut PgConnection, sql: &str, id: Uuid) -> QueryResult<usize> {
    diesel::sql_query(sql).bind::<SqlUuid, _>(id).execute(conn)
}

fn status(conn: &mut PgConnection, id: Uuid) -> ExecutionStatus {
    Execution::find(conn, id).unwrap().status
}

fn step(conn: &mut PgConnection, id: Uuid) -> ExecutionStep {
    ExecutionStep::find(conn, id).unwrap()
}

fn step_of(conn: &mut PgConnection, execution: Uuid, node: &str) -> ExecutionStep {
    ExecutionStep::list_for_execution(conn, execution)
        .unwrap()
        .into_iter()
        .find(|s| s.node_id == node)
        .unwrap_or_else(|| panic!("no step {node} in execution {execution}"))
}

fn exists(conn: &mut PgConnection, execution: Uuid) -> bool {
    Execution::find(conn, execution)
        .optional()
        .unwrap()
        .is_some()
}

fn set_max_retries(conn: &mut PgConnection, step: Uuid, max_retries: i32) {
    diesel::update(execution_steps::table.find(step))
        .set(execution_steps::max_retries.eq(max_retries))
        .execute(conn)
        .unwrap();
}

/// Moves a running step's lease into the past, as a crashed worker leaves it.
fn expire_lease(conn: &mut PgConnection, step: Uuid) {
    exec_sql(
        conn,
        "UPDATE execution_steps SET locked_until = now() - interval '1 second' WHERE id = $1",
        step,
    )
    .unwrap();
}

/// Claims and completes every step until nothing is claimable.
fn run_everything(conn: &mut PgConnection) {
    loop {
        let claimed = engine::claim_steps(conn, "drain", 100, LEASE).unwrap();
        if claimed.is_empty() {
            return;
        }
        for s in claimed {
            engine::complete_step(conn, &Lease::new(s.id, "drain", s.attempt), None).unwrap();
        }
    }
}

fn no_backoff() -> Backoff {
    Backoff {
        base: Duration::ZERO,
        max: Duration::ZERO,
    }
}

fn node_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The refusal the schema must give: a `check_violation`.
fn assert_check_violation<T: Debug>(what: &str, result: QueryResult<T>) {
    match result {
        Err(DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, _)) => {}
        other => panic!(
            "{what}: the schema must refuse this write with a check_violation (SQLSTATE 23514), got {other:?}"
        ),
    }
}

// ---------------------------------------------------------------------------
// 1. Resume racing the last completion (or the last failure).

#[derive(Debug, Clone, Copy)]
enum LastStep {
    Completes,
    FailsForGood,
}

/// Whose transaction is held open while the other side acts.
#[derive(Debug, Clone, Copy)]
enum HeldOpen {
    /// The step is finished in an open transaction; resume runs meanwhile.
    StepSide,
    /// The execution is resumed in an open transaction; the step finishes meanwhile.
    ResumeSide,
}

/// A paused execution whose only (so last) step is running; one side
/// finishes the step, the other resumes the execution, one of them in a
/// transaction that commits after the other acted. Returns the execution's
/// final status.
fn resume_races_the_last_step(last: LastStep, held_open: HeldOpen) -> ExecutionStatus {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let a = step_of(&mut conn, ex.id, "a");
    if let LastStep::FailsForGood = last {
        set_max_retries(&mut conn, a.id, 0);
    }
    let claimed = engine::claim_steps(&mut conn, "w", 1, LEASE).unwrap();
    assert_eq!(claimed.len(), 1);
    let lease = claimed[0].lease().unwrap();
    engine::pause(&mut conn, ex.id).unwrap();

    let finish_step = move |c: &mut PgConnection| {
        match last {
            LastStep::Completes => engine::complete_step(c, &lease, None),
            LastStep::FailsForGood => engine::fail_step(c, &lease, "boom", &Backoff::default()),
        }
        .map(|s| s.status)
    };
    let resume = move |c: &mut PgConnection| engine::resume(c, ex.id).map(|e| e.status);

    let mut step_side = Session::new(&db, "step");
    let mut resume_side = Session::new(&db, "resume");
    match held_open {
        HeldOpen::StepSide => {
            step_side.begin();
            step_side.run("finish the last step", finish_step);
            assert_eq!(step_side.settle(&mut conn), State::Done);
            // Today the resume does not wait (nothing locks a paused
            // execution); a fix may make it wait for the step's transaction.
            resume_side.run("resume", resume);
            resume_side.settle(&mut conn);
            step_side.commit();
        }
        HeldOpen::ResumeSide => {
            resume_side.begin();
            resume_side.run("resume", resume);
            assert_eq!(resume_side.settle(&mut conn), State::Done);
            step_side.run("finish the last step", finish_step);
            step_side.settle(&mut conn);
            resume_side.commit();
        }
    }
    let step_outcomes = step_side.finish();
    let resume_outcomes = resume_side.finish();
    assert_all_ok(
        "resume racing the last step",
        &[("step", &step_outcomes), ("resume", &resume_outcomes)],
    );
    status(&mut conn, ex.id)
}

#[test]
fn resume_during_an_uncommitted_last_completion_completes_the_execution() {
    assert_eq!(
        resume_races_the_last_step(LastStep::Completes, HeldOpen::StepSide),
        ExecutionStatus::Completed,
        "the last step completed (committed after the resume): the execution must complete, \
         not stay running for ever"
    );
}

#[test]
fn last_completion_during_an_uncommitted_resume_completes_the_execution() {
    assert_eq!(
        resume_races_the_last_step(LastStep::Completes, HeldOpen::ResumeSide),
        ExecutionStatus::Completed,
        "the last step completed while the resume was uncommitted: the execution must complete, \
         not stay running for ever"
    );
}

#[test]
fn resume_during_an_uncommitted_last_failure_fails_the_execution() {
    assert_eq!(
        resume_races_the_last_step(LastStep::FailsForGood, HeldOpen::StepSide),
        ExecutionStatus::Failed,
        "the last step failed for good (committed after the resume): the execution must fail, \
         not stay running for ever"
    );
}

#[test]
fn last_failure_during_an_uncommitted_resume_fails_the_execution() {
    assert_eq!(
        resume_races_the_last_step(LastStep::FailsForGood, HeldOpen::ResumeSide),
        ExecutionStatus::Failed,
        "the last step failed for good while the resume was uncommitted: the execution must fail, \
         not stay running for ever"
    );
}

// ---------------------------------------------------------------------------
// 2. Cancel / fail-for-good of an execution with many pending steps.

const MANY: usize = 2000;

/// Every step of `execution` but `except` is skipped, with exactly one
/// `skipped` event each, and the execution has exactly one event to `to`.
fn assert_skipped_once_each(
    conn: &mut PgConnection,
    execution: Uuid,
    except: Option<Uuid>,
    to: &str,
) {
    let steps = ExecutionStep::list_for_execution(conn, execution).unwrap();
    let not_skipped: Vec<(String, StepStatus)> = steps
        .iter()
        .filter(|s| Some(s.id) != except && s.status != StepStatus::Skipped)
        .map(|s| (s.node_id.clone(), s.status))
        .collect();
    assert!(
        not_skipped.is_empty(),
        "every pending step must be skipped; not skipped: {not_skipped:?}"
    );
    let expected = steps.len() as i64 - i64::from(except.is_some());
    let skipped_events = count(
        conn,
        "SELECT count(*) AS n FROM execution_events \
         WHERE execution_id = $1 AND step_id IS NOT NULL AND to_status = 'skipped'",
        execution,
    );
    let steps_with_one = count(
        conn,
        "SELECT count(*) AS n FROM (SELECT step_id FROM execution_events \
           WHERE execution_id = $1 AND step_id IS NOT NULL AND to_status = 'skipped' \
           GROUP BY step_id HAVING count(*) = 1) one",
        execution,
    );
    assert_eq!(
        (skipped_events, steps_with_one),
        (expected, expected),
        "exactly one `skipped` event per skipped step ({expected} steps)"
    );
    let own = count(
        conn,
        &format!(
            "SELECT count(*) AS n FROM execution_events \
             WHERE execution_id = $1 AND step_id IS NULL AND to_status = '{to}'"
        ),
        execution,
    );
    assert_eq!(own, 1, "exactly one `{to}` event for the execution");
}

#[test]
fn cancelling_an_execution_with_many_pending_steps_skips_each_once() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let names = node_names("n", MANY);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let wf = workflow(&mut conn, &names, &[]);
    let ex = start(&mut conn, &wf);
    let cancelled = engine::cancel(&mut conn, ex.id).unwrap();
    assert_eq!(cancelled.status, ExecutionStatus::Cancelled);
    assert_eq!(status(&mut conn, ex.id), ExecutionStatus::Cancelled);
    assert_skipped_once_each(&mut conn, ex.id, None, "cancelled");
}

#[test]
fn failing_a_step_for_good_among_many_pending_steps_skips_each_once() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // "bad" is the only claimable step: the others wait for it.
    let names = node_names("n", MANY);
    let mut nodes = vec!["bad"];
    nodes.extend(names.iter().map(String::as_str));
    let edges: Vec<(&str, &str)> = names.iter().map(|n| ("bad", n.as_str())).collect();
    let wf = workflow(&mut conn, &nodes, &edges);
    let ex = start(&mut conn, &wf);
    let bad = step_of(&mut conn, ex.id, "bad");
    set_max_retries(&mut conn, bad.id, 0);
    let claimed = engine::claim_steps(&mut conn, "w", 10, LEASE).unwrap();
    assert_eq!(claimed.iter().map(|s| s.id).collect::<Vec<_>>(), [bad.id]);
    let failed = engine::fail_step(
        &mut conn,
        &claimed[0].lease().unwrap(),
        "no retries",
        &no_backoff(),
    )
    .unwrap();
    assert_eq!(failed.status, StepStatus::Failed);
    assert_eq!(status(&mut conn, ex.id), ExecutionStatus::Failed);
    assert_skipped_once_each(&mut conn, ex.id, Some(bad.id), "failed");
}

// ---------------------------------------------------------------------------
// 3. Deadlocks.

/// (a) Two sessions each send one step of the same execution back to pending
/// (a retry) and then fail another for good, interleaved A-retry, B-retry,
/// A-fail, B-fail. Today each retry takes `FOR SHARE` on the execution and
/// each failure then asks for `FOR NO KEY UPDATE` on it: a deadlock.
#[test]
fn retry_then_fail_for_good_in_two_sessions_does_not_deadlock() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a1", "a2", "b1", "b2"], &[]);
    let ex = start(&mut conn, &wf);
    let [a1, a2, b1, b2] = ["a1", "a2", "b1", "b2"].map(|n| step_of(&mut conn, ex.id, n).id);
    for id in [a2, b2] {
        set_max_retries(&mut conn, id, 0);
    }
    assert_eq!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .len(),
        4
    );

    let fail = |id: Uuid| {
        move |c: &mut PgConnection| {
            // Each step was claimed once: attempt 1.
            engine::fail_step(c, &Lease::new(id, "w", 1), "boom", &no_backoff()).map(|s| s.status)
        }
    };
    let mut a = Session::new(&db, "A");
    let mut b = Session::new(&db, "B");
    a.begin();
    a.run("A: retry a1", fail(a1));
    assert_eq!(a.settle(&mut conn), State::Done);
    b.begin();
    b.run("B: retry b1", fail(b1));
    b.settle(&mut conn);
    a.run("A: fail a2 for good", fail(a2));
    a.settle(&mut conn);
    b.run("B: fail b2 for good", fail(b2));
    b.settle(&mut conn);
    a.commit();
    b.commit();
    let (a, b) = (a.finish(), b.finish());
    assert_all_ok(
        "retry + fail for good in two sessions",
        &[("A", &a), ("B", &b)],
    );
    assert_eq!(
        status(&mut conn, ex.id),
        ExecutionStatus::Failed,
        "a step failed for good: the execution must be failed"
    );
}

/// (d) A pause (the same for a cancel or a settle) holds its execution and,
/// in its trigger, updates the execution's pending steps with a snapshot in
/// which step `m` is still pending. A claim of `m` commits meanwhile and its
/// worker reports on `m` at once. If the report locked `m` before the
/// execution, the pause (following `m`'s update chain) would wait for the
/// report and the report for the pause's execution: a deadlock. A gate
/// session holding another pending step `p` stops the pause before it reaches
/// `m`, so the report runs exactly in that window.
#[test]
fn a_report_right_after_its_claim_does_not_deadlock_with_a_pause() {
    for report in [
        "complete",
        "fail",
        "complete_steps",
        "complete_steps over two executions",
    ] {
        let db = TestDatabase::new();
        let mut conn = db.connect();
        // Started first, so its id sorts first: a batch over k and m locks
        // `other` before `ex`, and must lock both before any step row.
        let single = workflow(&mut conn, &["k"], &[]);
        let other = start(&mut conn, &single);
        let k = engine::claim_steps(&mut conn, "w", 1, LEASE).unwrap()[0].id;
        let wf = workflow(&mut conn, &["p", "m"], &[]);
        let ex = start(&mut conn, &wf);
        assert!(other.id < ex.id);
        let (p, m) = (
            step_of(&mut conn, ex.id, "p").id,
            step_of(&mut conn, ex.id, "m").id,
        );
        set_max_retries(&mut conn, m, 0);

        let mut gate = Session::new(&db, "gate");
        gate.begin();
        gate.run("gate: hold p", move |c: &mut PgConnection| {
            exec_sql(
                c,
                "SELECT 1 FROM execution_steps WHERE id = $1 FOR UPDATE",
                p,
            )
        });
        assert_eq!(gate.settle(&mut conn), State::Done);
        let mut claimer = Session::new(&db, "claimer");
        claimer.begin();
        claimer.run("claimer: claim m", move |c: &mut PgConnection| {
            exec_sql(
                c,
                "UPDATE execution_steps SET status = 'running', locked_by = 'w', \
                 locked_until = now() + interval '1 minute' WHERE id = $1",
                m,
            )
        });
        assert_eq!(claimer.settle(&mut conn), State::Done);
        // The pause's park statement sees m pending and waits for the gate at p.
        let mut pauser = Session::new(&db, "pauser");
        pauser.run("pauser: pause", move |c: &mut PgConnection| {
            engine::pause(c, ex.id).map(|e| e.status)
        });
        assert_eq!(pauser.settle(&mut conn), State::Blocked);
        claimer.commit();
        assert_eq!(claimer.settle(&mut conn), State::Done);
        // The worker reports at once: it must wait for the pause (the
        // execution first), not hold m.
        let mut reporter = Session::new(&db, "reporter");
        reporter.run(
            &format!("reporter: {report} m"),
            move |c: &mut PgConnection| match report {
                // m and k were each started once (attempt 1).
                "complete" => {
                    engine::complete_step(c, &Lease::new(m, "w", 1), None).map(|s| s.status)
                }
                "fail" => engine::fail_step(c, &Lease::new(m, "w", 1), "boom", &no_backoff())
                    .map(|s| s.status),
                "complete_steps" => {
                    engine::complete_steps(c, &[(Lease::new(m, "w", 1), None)]).map(|s| s[0].status)
                }
                _ => engine::complete_steps(
                    c,
                    &[(Lease::new(k, "w", 1), None), (Lease::new(m, "w", 1), None)],
                )
                .map(|s| s[1].status),
            },
        );
        assert_eq!(reporter.settle(&mut conn), State::Blocked);
        gate.commit();
        let (gate, claimer, pauser, reporter) = (
            gate.finish(),
            claimer.finish(),
            pauser.finish(),
            reporter.finish(),
        );
        assert_all_ok(
            &format!("pause while a just-claimed step is reported ({report})"),
            &[
                ("gate", &gate),
                ("claimer", &claimer),
                ("pauser", &pauser),
                ("reporter", &reporter),
            ],
        );
        let m_now = step(&mut conn, m);
        assert!(
            matches!(m_now.status, StepStatus::Completed | StepStatus::Failed),
            "{report}: m is reported: {m_now:?}"
        );
        assert!(step(&mut conn, p).parked, "{report}: the pause parked p");
        // A failure while paused leaves the execution paused (it fails on resume).
        assert_eq!(status(&mut conn, ex.id), ExecutionStatus::Paused);
    }
}

/// (b) `reclaim_expired` in two sessions over expired leases of one
/// execution, some with retries left, some without, interleaved so that each
/// session first sends a step back to pending and then fails one for good
/// (two calls in one transaction each; the one-statement race is
/// [`concurrent_reclaim_statements_over_one_execution_do_not_deadlock`]).
#[test]
fn concurrent_reclaims_in_transactions_do_not_deadlock() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["r1", "r2", "f1", "f2"], &[]);
    let ex = start(&mut conn, &wf);
    let ids = ["r1", "r2", "f1", "f2"].map(|n| step_of(&mut conn, ex.id, n).id);
    let [r1, r2, f1, f2] = ids;
    for id in [f1, f2] {
        set_max_retries(&mut conn, id, 0);
    }
    assert_eq!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .len(),
        4
    );
    // Expired leases, in the order reclaim takes them (oldest first): the two
    // retries, then the two failures.
    for (age, id) in [(40, r1), (30, r2), (20, f1), (10, f2)] {
        diesel::sql_query(
            "UPDATE execution_steps SET locked_until = now() - make_interval(secs => $2) WHERE id = $1",
        )
        .bind::<SqlUuid, _>(id)
        .bind::<Integer, _>(age)
        .execute(&mut conn)
        .unwrap();
    }

    let reclaim_one = |c: &mut PgConnection| {
        engine::reclaim_expired_with(c, 1, engine::ReclaimPolicy::CountAsFailure).map(|steps| {
            steps
                .iter()
                .map(|s| (s.node_id.clone(), s.status))
                .collect::<Vec<_>>()
        })
    };
    let mut a = Session::new(&db, "A");
    let mut b = Session::new(&db, "B");
    a.begin();
    a.run("A: reclaim one (r1, a retry)", reclaim_one);
    assert_eq!(a.settle(&mut conn), State::Done);
    b.begin();
    b.run("B: reclaim one (r2, a retry)", reclaim_one);
    b.settle(&mut conn);
    a.run("A: reclaim one (f1, fails for good)", reclaim_one);
    a.settle(&mut conn);
    b.run("B: reclaim one (f2, fails for good)", reclaim_one);
    b.settle(&mut conn);
    a.commit();
    b.commit();
    let (a, b) = (a.finish(), b.finish());
    assert_all_ok("two concurrent reclaimers", &[("A", &a), ("B", &b)]);
    // Whatever is left (a reaper runs again) settles without error too.
    while !engine::reclaim_expired_with(&mut conn, 10, engine::ReclaimPolicy::CountAsFailure)
        .unwrap()
        .is_empty()
    {}
    assert_eq!(
        status(&mut conn, ex.id),
        ExecutionStatus::Failed,
        "two steps failed for good: the execution must be failed"
    );
    let unfinished: Vec<(String, StepStatus)> = ExecutionStep::list_for_execution(&mut conn, ex.id)
        .unwrap()
        .into_iter()
        .filter(|s| matches!(s.status, StepStatus::Pending | StepStatus::Running))
        .map(|s| (s.node_id, s.status))
        .collect();
    assert!(
        unfinished.is_empty(),
        "no step may stay pending or running under a failed execution: {unfinished:?}"
    );
}

/// (b) The reclaim deadlock within ONE statement per session: each
/// `reclaim_expired` call reclaims, in id order, a step with retries left
/// (today its trigger takes `FOR SHARE` on execution E), the step of a gated
/// execution (X or Y, see [`gate`]; its event waits for the gate) and a step
/// without retries (its trigger asks for `FOR NO KEY UPDATE` on E). Both
/// statements stop at their gated step holding `FOR SHARE` on E; opening the
/// gate makes each wait for the other.
#[test]
fn concurrent_reclaim_statements_over_one_execution_do_not_deadlock() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let nodes = [
        ("r1", sid(1), 3),
        ("f1", sid(3), 0),
        ("r2", sid(4), 3),
        ("f2", sid(6), 0),
    ];
    let (x, y) = (sid(2), sid(5));
    let (e, ex_x, ex_y) = insert_gated(&mut conn, &nodes, &[], x, y);
    assert_eq!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .len(),
        6
    );
    // Expired leases; reclaim takes the oldest first: r1, x, f1 for A, then
    // r2, y, f2 for B (A holds its three).
    for (age, id) in [
        (60, sid(1)),
        (50, x),
        (40, sid(3)),
        (30, sid(4)),
        (20, y),
        (10, sid(6)),
    ] {
        diesel::sql_query(
            "UPDATE execution_steps SET locked_until = now() - make_interval(secs => $2) WHERE id = $1",
        )
        .bind::<SqlUuid, _>(id)
        .bind::<Integer, _>(age)
        .execute(&mut conn)
        .unwrap();
    }
    let mut gate = gate(&db, &mut conn, [ex_x, ex_y]);
    let reclaim_three = |c: &mut PgConnection| {
        engine::reclaim_expired_with(c, 3, engine::ReclaimPolicy::CountAsFailure).map(|steps| {
            steps
                .iter()
                .map(|s| (s.node_id.clone(), s.status))
                .collect::<Vec<_>>()
        })
    };
    let mut a = Session::new(&db, "A");
    let mut b = Session::new(&db, "B");
    a.run("A: reclaim_expired(3)", reclaim_three);
    a.settle(&mut conn);
    b.run("B: reclaim_expired(3)", reclaim_three);
    b.settle(&mut conn);
    gate.commit();
    let gate = gate.finish();
    let (a, b) = (a.finish(), b.finish());
    assert_all_ok(
        "two concurrent reclaim statements",
        &[("gate", &gate), ("A", &a), ("B", &b)],
    );
    while !engine::reclaim_expired(&mut conn, 10).unwrap().is_empty() {}
    assert_eq!(
        status(&mut conn, e),
        ExecutionStatus::Failed,
        "two steps failed for good: the execution must be failed"
    );
    let unfinished: Vec<(String, StepStatus)> = ExecutionStep::list_for_execution(&mut conn, e)
        .unwrap()
        .into_iter()
        .filter(|s| matches!(s.status, StepStatus::Pending | StepStatus::Running))
        .map(|s| (s.node_id, s.status))
        .collect();
    assert!(
        unfinished.is_empty(),
        "no step may stay pending or running under a failed execution: {unfinished:?}"
    );
    for id in [x, y] {
        assert_eq!(
            step(&mut conn, id).status,
            StepStatus::Pending,
            "the gated steps had retries left"
        );
    }
}

/// Step ids in an order the test chooses (the interleavings depend on it).
fn sid(k: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + k)
}

/// Inserts execution E of a workflow with these nodes (name, step id, retry
/// budget) and edges, planned as `start_execution` would, and two one-step
/// executions X and Y (steps `x`, `y`, 3 retries); all steps in ONE
/// statement in id order, so that heap order, claim order and id order
/// agree. Then starts the three. Returns (E, X, Y).
fn insert_gated(
    conn: &mut PgConnection,
    nodes: &[(&str, Uuid, i32)],
    edges: &[(&str, &str)],
    x: Uuid,
    y: Uuid,
) -> (Uuid, Uuid, Uuid) {
    let names: Vec<&str> = nodes.iter().map(|(n, ..)| *n).collect();
    let dag = workflow(conn, &names, edges);
    let single = workflow(conn, &["x"], &[]);
    let (e, ex_x, ex_y) = (
        NewExecution::new(dag.id),
        NewExecution::new(single.id),
        NewExecution::new(single.id),
    );
    for new in [&e, &ex_x, &ex_y] {
        new.create(conn).unwrap();
    }
    let mut steps: Vec<NewExecutionStep> = nodes
        .iter()
        .map(|&(node, id, max_retries)| NewExecutionStep {
            id,
            upstream_pending: edges.iter().filter(|(_, t)| *t == node).count() as i32,
            downstream: edges
                .iter()
                .filter(|(s, _)| *s == node)
                .map(|(_, t)| (*t).to_owned())
                .collect(),
            max_retries,
            ..NewExecutionStep::new(e.id, node)
        })
        .collect();
    for (new, id) in [(&ex_x, x), (&ex_y, y)] {
        steps.push(NewExecutionStep {
            id,
            max_retries: 3,
            ..NewExecutionStep::new(new.id, "x")
        });
    }
    steps.sort_by_key(|s| s.id);
    NewExecutionStep::create_many(conn, &steps).unwrap();
    for execution in [e.id, ex_x.id, ex_y.id] {
        engine::transition_execution(
            conn,
            execution,
            ExecutionStatus::Pending,
            ExecutionStatus::Running,
        )
        .unwrap();
    }
    (e.id, ex_x.id, ex_y.id)
}

/// A session holding `executions` `FOR UPDATE` in an open transaction: every
/// event of their steps waits for it (the event's foreign-key check takes
/// `FOR KEY SHARE` on the execution). [`Session::commit`] opens the gate.
fn gate(db: &TestDatabase, observer: &mut PgConnection, executions: [Uuid; 2]) -> Session {
    let mut gate = Session::new(db, "gate");
    gate.begin();
    gate.run("lock the gate executions", move |c| {
        diesel::sql_query("SELECT id FROM executions WHERE id = ANY($1) FOR UPDATE")
            .bind::<diesel::sql_types::Array<SqlUuid>, _>(executions.to_vec())
            .execute(c)
    });
    assert_eq!(gate.settle(observer), State::Done);
    gate
}

/// (c) `complete_steps` from two workers over a layered DAG whose batches
/// share their downstream steps: A completes `a1, x, a2` and B `b1, y, b2`
/// (ascending ids), where `a1 -> d1`, `a2 -> d2`, `b1 -> d2`, `b2 -> d1`,
/// `d1, d2 -> z -> tail` (all in execution E) and `x`, `y` are the steps of
/// two other executions, X and Y.
///
/// Today the per-row AFTER triggers run in row order at the end of each
/// statement; each records its event (whose foreign-key check takes
/// `FOR KEY SHARE` on the step's execution), decrements (so locks) its
/// downstream row, then share-locks the first unfinished step of the
/// execution nobody holds (the "fast path"; `tail`, first in heap and index
/// order, so that it is not d2). A third session holds X and Y `FOR UPDATE`:
/// A stops at `x`'s event holding d1, B at `y`'s holding d2; releasing the
/// gate makes A want d2 and B want d1. (The gate is the middle step of each
/// batch, so this holds whether a batch's rows are processed in ascending or
/// descending id order; all steps are inserted in id order so that heap order
/// agrees too.)
#[test]
fn batched_completions_sharing_downstream_steps_do_not_deadlock() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let edges = [
        ("a1", "d1"),
        ("a2", "d2"),
        ("b1", "d2"),
        ("b2", "d1"),
        ("d1", "z"),
        ("d2", "z"),
        ("z", "tail"),
    ];
    // Ids so that each batch, in id order, is (E, gated, E).
    let nodes = [
        ("tail", sid(0), 3),
        ("a1", sid(1), 3),
        ("a2", sid(3), 3),
        ("b1", sid(4), 3),
        ("b2", sid(6), 3),
        ("d1", sid(7), 3),
        ("d2", sid(8), 3),
        ("z", sid(9), 3),
    ];
    let id_of = |node: &str| nodes.iter().find(|(n, ..)| *n == node).unwrap().1;
    let (x, y) = (sid(2), sid(5));
    let (e, ex_x, ex_y) = insert_gated(&mut conn, &nodes, &edges, x, y);
    let batch_a = [id_of("a1"), x, id_of("a2")];
    let batch_b = [id_of("b1"), y, id_of("b2")];
    let claim = |conn: &mut PgConnection, worker: &str| {
        let mut ids: Vec<Uuid> = engine::claim_steps(conn, worker, 3, LEASE)
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(claim(&mut conn, "wa"), batch_a, "worker A holds a1, x, a2");
    assert_eq!(claim(&mut conn, "wb"), batch_b, "worker B holds b1, y, b2");
    let mut gate = gate(&db, &mut conn, [ex_x, ex_y]);

    let complete = |worker: &'static str, batch: [Uuid; 3]| {
        let steps: Vec<(Lease, Option<serde_json::Value>)> = batch
            .iter()
            .map(|id| (Lease::new(*id, worker, 1), Some(json!({ "by": worker }))))
            .collect();
        move |c: &mut PgConnection| engine::complete_steps(c, &steps).map(|d| d.len())
    };
    let mut a = Session::new(&db, "A");
    let mut b = Session::new(&db, "B");
    a.run("A: complete_steps(a1, x, a2)", complete("wa", batch_a));
    // Today: blocked at x's event (A holds d1). A fix may block elsewhere.
    a.settle(&mut conn);
    b.run("B: complete_steps(b1, y, b2)", complete("wb", batch_b));
    b.settle(&mut conn);
    gate.commit();
    let gate = gate.finish();
    let (a, b) = (a.finish(), b.finish());
    assert_all_ok(
        "two batched completions sharing downstream steps",
        &[("gate", &gate), ("A", &a), ("B", &b)],
    );

    let d1 = step(&mut conn, id_of("d1"));
    let d2 = step(&mut conn, id_of("d2"));
    let z = step(&mut conn, id_of("z"));
    assert_eq!(
        (d1.upstream_pending, d2.upstream_pending, z.upstream_pending),
        (0, 0, 2),
        "downstream counters: d1 and d2 are ready, z still waits for both"
    );
    for execution in [ex_x, ex_y] {
        assert_eq!(status(&mut conn, execution), ExecutionStatus::Completed);
    }
    run_everything(&mut conn);
    assert_eq!(status(&mut conn, e), ExecutionStatus::Completed);
}

// ---------------------------------------------------------------------------
// 4. Leases and hand-written runs.

#[derive(QueryableByName)]
struct User {
    #[diesel(sql_type = Text)]
    user: String,
}

/// (e) Two statements of one transaction on one execution against a batch
/// (found by the torture, seeds 505 and 2222). Session T retries `a` (queue
/// `qb`) of execution E, then completes `b` (queue `qa`) of E; session U
/// completes `x` (`qa`) and `y` (`qb`) of another execution in one
/// statement, between T's two. The queues have rows (a limit), so each
/// report locks its steps' queue rows in name order. If T's first statement
/// locked only `qb`, U would hold `qa` and wait for `qb`, and T's second
/// statement would wait for `qa`: a deadlock. A statement that ends attempts
/// of an execution locks the queues of all of its running steps, as it
/// already does with the keys of its unfinished steps.
#[test]
fn two_reports_in_one_transaction_and_a_batch_over_two_queues_do_not_deadlock() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let node = |id: &str, queue: &str| {
        workflow_db::Node::new(id, "task").config(json!({ "queue": queue }))
    };
    let create = |conn: &mut PgConnection, nodes: Vec<workflow_db::Node>| {
        let graph = workflow_db::WorkflowGraph {
            nodes,
            edges: Vec::new(),
        };
        workflow_db::NewWorkflow::from_graph("queues", &graph)
            .create(conn)
            .unwrap()
    };
    let wf_e = create(&mut conn, vec![node("a", "qb"), node("b", "qa")]);
    let wf_u = create(&mut conn, vec![node("x", "qa"), node("y", "qb")]);
    for q in ["qa", "qb"] {
        engine::set_queue_limit(&mut conn, q, Some(10)).unwrap();
    }
    let e = start(&mut conn, &wf_e);
    let u = start(&mut conn, &wf_u);
    let claimed = engine::claim_steps(&mut conn, "w", 10, LEASE).unwrap();
    assert_eq!(claimed.len(), 4);
    let lease = |ex: Uuid, n: &str| {
        claimed
            .iter()
            .find(|s| s.execution_id == ex && s.node_id == n)
            .and_then(ExecutionStep::lease)
            .unwrap()
    };
    let (a, b, x, y) = (
        lease(e.id, "a"),
        lease(e.id, "b"),
        lease(u.id, "x"),
        lease(u.id, "y"),
    );

    let b_id = b.step_id;
    let mut t = Session::new(&db, "T");
    let mut batch = Session::new(&db, "U");
    t.begin();
    t.run("T: retry a (qb)", move |c| {
        engine::fail_step(c, &a, "boom", &no_backoff()).map(|s| s.status)
    });
    assert_eq!(t.settle(&mut conn), State::Done);
    batch.run("U: complete x (qa) and y (qb)", move |c| {
        engine::complete_steps(c, &[(x, None), (y, None)]).map(|s| s.len())
    });
    assert_eq!(
        batch.settle(&mut conn),
        State::Blocked,
        "the batch waits for a queue row T holds"
    );
    t.run("T: complete b (qa)", move |c| {
        engine::complete_step(c, &b, None).map(|s| s.status)
    });
    t.settle(&mut conn);
    t.commit();
    let (t, batch) = (t.finish(), batch.finish());
    assert_all_ok(
        "two reports in one transaction vs a batch",
        &[("T", &t), ("U", &batch)],
    );
    assert_eq!(status(&mut conn, u.id), ExecutionStatus::Completed);
    assert_eq!(step(&mut conn, b_id).status, StepStatus::Completed);
}

/// A hand-written claim of one step, leased to worker `w` by the database.
fn claim_by_hand(id: Uuid) -> impl FnOnce(&mut PgConnection) -> QueryResult<usize> + Send {
    move |c| {
        diesel::sql_query(
            "UPDATE execution_steps SET status = 'running', locked_by = 'w' WHERE id = $1",
        )
        .bind::<SqlUuid, _>(id)
        .execute(c)
    }
}

/// (f) A heartbeat against a pause (the same for a cancel or a failure for
/// good, whose trigger skips the pending steps). The pause's trigger updates
/// the steps that were pending in its snapshot; a step a claim made running
/// since is locked by the update's recheck and stays locked. Steps `s1 <
/// s2` (ids) lie in the heap as `s2, s1`; claims C1 (`s1`) and C2 (`s2`)
/// are open. The pause waits for C2 at `s2`, first in heap order; C1
/// commits; worker `w` heartbeats `s1` in an open transaction, then C2
/// commits: the pause locks `s2` and wants `s1`, which the heartbeat's
/// transaction holds while its next heartbeat wants `s2`: a deadlock
/// (torture seed 505). The execution trigger now locks the steps it updates
/// in id order, as every other writer does.
#[test]
fn a_heartbeat_and_a_pause_over_steps_claimed_meanwhile_do_not_deadlock() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[]);
    let new = NewExecution::new(wf.id);
    new.create(&mut conn).unwrap();
    let (s1, s2) = (sid(1), sid(2));
    for (id, node) in [(s2, "b"), (s1, "a")] {
        NewExecutionStep::create_many(
            &mut conn,
            &[NewExecutionStep {
                id,
                ..NewExecutionStep::new(new.id, node)
            }],
        )
        .unwrap();
    }
    engine::transition_execution(
        &mut conn,
        new.id,
        ExecutionStatus::Pending,
        ExecutionStatus::Running,
    )
    .unwrap();

    let mut c1 = Session::new(&db, "C1");
    let mut c2 = Session::new(&db, "C2");
    let mut pause = Session::new(&db, "P");
    let mut beat = Session::new(&db, "H");
    for (c, id) in [(&mut c1, s1), (&mut c2, s2)] {
        c.begin();
        c.run("claim by hand", claim_by_hand(id));
        assert_eq!(c.settle(&mut conn), State::Done);
    }
    let ex = new.id;
    pause.run("P: pause", move |c| engine::pause(c, ex).map(|e| e.status));
    assert_eq!(pause.settle(&mut conn), State::Blocked);
    c1.commit();
    assert_eq!(c1.settle(&mut conn), State::Done);
    pause.settle(&mut conn);
    let leases = |conn: &mut PgConnection, id: Uuid| vec![step(conn, id).lease().unwrap()];
    let (l1, l2) = (leases(&mut conn, s1), vec![Lease::new(s2, "w", 1)]);
    beat.begin();
    beat.run("H: heartbeat s1", move |c| engine::heartbeat(c, &l1, LEASE));
    beat.settle(&mut conn);
    c2.commit();
    c2.settle(&mut conn);
    pause.settle(&mut conn);
    beat.run("H: heartbeat s2", move |c| engine::heartbeat(c, &l2, LEASE));
    beat.commit();
    let outcomes = [c1.finish(), c2.finish(), pause.finish(), beat.finish()];
    assert_all_ok(
        "a heartbeat and a pause over steps claimed meanwhile",
        &[
            ("C1", &outcomes[0]),
            ("C2", &outcomes[1]),
            ("P", &outcomes[2]),
            ("H", &outcomes[3]),
        ],
    );
    assert_eq!(status(&mut conn, ex), ExecutionStatus::Paused);
    assert_eq!(
        outcomes[3][2].1,
        Ok(format!("{:?}", vec![s2])),
        "the second heartbeat kept s2's lease"
    );
}

fn session_user(conn: &mut PgConnection) -> String {
    diesel::sql_query("SELECT session_user::text AS user")
        .get_result::<User>(conn)
        .unwrap()
        .user
}

#[test]
fn a_step_run_by_hand_is_not_leased_to_its_previous_worker() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let a = engine::claim_steps(&mut conn, "w1", 1, Duration::from_secs(1))
        .unwrap()
        .remove(0);
    expire_lease(&mut conn, a.id);
    let reclaimed = engine::reclaim_expired(&mut conn, 10).unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(
        step(&mut conn, a.id).status,
        StepStatus::Pending,
        "retries left"
    );

    // A plain-SQL runner (psql, another service) starts the step by hand.
    exec_sql(
        &mut conn,
        "UPDATE execution_steps SET status = 'running' WHERE id = $1",
        a.id,
    )
    .unwrap();
    let held = step(&mut conn, a.id);
    let me = session_user(&mut conn);
    assert_eq!(
        held.locked_by.as_deref(),
        Some(me.as_str()),
        "a step run by hand is leased to the writing role, not to its previous worker w1"
    );
    assert!(held.locked_until.is_some(), "with a lease");

    let stale = engine::complete_step(&mut conn, &Lease::new(a.id, "w1", a.attempt), None);
    assert!(
        matches!(&stale, Err(Error::LeaseLost { step_id, worker, .. }) if *step_id == a.id && worker == "w1"),
        "the previous worker's report on a step now run by {me} must be refused with LeaseLost, got {stale:?}"
    );
    assert_eq!(step(&mut conn, a.id), held, "nothing changed");
    engine::complete_step(&mut conn, &held.lease().unwrap(), None).unwrap();
    assert_eq!(status(&mut conn, ex.id), ExecutionStatus::Completed);
}

#[test]
fn a_step_that_is_not_running_holds_no_lease() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(
        &mut conn,
        &["reclaimed", "retried", "completed", "failed"],
        &[],
    );
    let ex = start(&mut conn, &wf);
    let [reclaimed, retried, completed, failed] =
        ["reclaimed", "retried", "completed", "failed"].map(|n| step_of(&mut conn, ex.id, n).id);
    set_max_retries(&mut conn, failed, 0);
    assert_eq!(
        engine::claim_steps(&mut conn, "w", 10, LEASE)
            .unwrap()
            .len(),
        4
    );
    let lease = |conn: &mut PgConnection, id: Uuid| {
        let s = step(conn, id);
        (s.status, s.locked_by, s.locked_until)
    };

    expire_lease(&mut conn, reclaimed);
    assert_eq!(engine::reclaim_expired(&mut conn, 10).unwrap().len(), 1);
    assert_eq!(
        lease(&mut conn, reclaimed),
        (StepStatus::Pending, None, None),
        "a reclaimed step holds no lease (locked_by and locked_until NULL)"
    );
    engine::fail_step(
        &mut conn,
        &Lease::new(retried, "w", 1),
        "flaky",
        &no_backoff(),
    )
    .unwrap();
    assert_eq!(
        lease(&mut conn, retried),
        (StepStatus::Pending, None, None),
        "a step sent back to pending by a failure holds no lease"
    );
    engine::complete_step(&mut conn, &Lease::new(completed, "w", 1), None).unwrap();
    assert_eq!(
        lease(&mut conn, completed),
        (StepStatus::Completed, None, None),
        "a completed step holds no lease"
    );
    engine::fail_step(
        &mut conn,
        &Lease::new(failed, "w", 1),
        "boom",
        &no_backoff(),
    )
    .unwrap();
    assert_eq!(
        lease(&mut conn, failed),
        (StepStatus::Failed, None, None),
        "a step failed for good holds no lease"
    );
    assert_eq!(status(&mut conn, ex.id), ExecutionStatus::Failed);
    for id in [reclaimed, retried] {
        assert_eq!(
            lease(&mut conn, id),
            (StepStatus::Skipped, None, None),
            "a skipped step holds no lease"
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Writes the status trigger never sees, refused by the schema.

/// Every row of the execution and its history, to compare before/after.
fn state_of(conn: &mut PgConnection, ex: Uuid) -> (Execution, Vec<ExecutionStep>, i64) {
    (
        Execution::find(conn, ex).unwrap(),
        ExecutionStep::list_for_execution(conn, ex).unwrap(),
        count(
            conn,
            "SELECT count(*) AS n FROM execution_events WHERE execution_id = $1",
            ex,
        ),
    )
}

#[test]
fn clearing_the_lease_of_a_running_step_is_refused() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    let a = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let before = state_of(&mut conn, ex.id);
    assert_check_violation(
        "UPDATE execution_steps SET locked_until = NULL on a running step",
        exec_sql(
            &mut conn,
            "UPDATE execution_steps SET locked_until = NULL WHERE id = $1",
            a.id,
        ),
    );
    assert_eq!(state_of(&mut conn, ex.id), before, "nothing changed");
}

/// A running step must hold a lease: the schema refuses to insert one
/// without (check_violation, nothing inserted) or gives it a default lease
/// (as it does for a step set running by hand); either way no lease-less
/// running step exists afterwards.
fn assert_running_insert_holds_a_lease<T: Debug>(
    conn: &mut PgConnection,
    what: &str,
    step_id: Uuid,
    result: QueryResult<T>,
) {
    match result {
        Err(DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, _)) => {
            assert!(
                ExecutionStep::find(conn, step_id)
                    .optional()
                    .unwrap()
                    .is_none(),
                "{what}: refused, so nothing may be inserted"
            );
        }
        Ok(_) => {
            let s = step(conn, step_id);
            assert!(
                s.locked_by.is_some() && s.locked_until.is_some(),
                "{what}: the schema must refuse a running step without a lease (check_violation) \
                 or give it one; it stored status {:?}, locked_by {:?}, locked_until {:?}",
                s.status,
                s.locked_by,
                s.locked_until
            );
        }
        Err(other) => panic!("{what}: expected a check_violation or a leased step, got {other:?}"),
    }
}

#[test]
fn inserting_a_running_step_without_a_lease_is_refused_or_leased() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);

    let running = NewExecutionStep {
        status: StepStatus::Running,
        ..NewExecutionStep::new(ex.id, "extra")
    };
    let result = running.create(&mut conn);
    assert_running_insert_holds_a_lease(
        &mut conn,
        "NewExecutionStep::create of a running step without locked_until",
        running.id,
        result,
    );
    let copied = CopyStep {
        status: StepStatus::Running,
        ..CopyStep::pending(ex.id, "copied")
    };
    let copied_id = copied.id;
    let result = bulk::copy_steps(&mut conn, [copied]);
    assert_running_insert_holds_a_lease(
        &mut conn,
        "COPY of a running step (COPY cannot set a lease)",
        copied_id,
        result,
    );

    let new = NewExecution {
        status: ExecutionStatus::Running,
        ..NewExecution::new(wf.id)
    };
    let step = NewExecutionStep {
        status: StepStatus::Running,
        ..NewExecutionStep::new(new.id, "a")
    };
    let step_id = step.id;
    let result = bulk::insert_execution_with_steps(&mut conn, &new, &[step]);
    assert_running_insert_holds_a_lease(
        &mut conn,
        "insert_execution_with_steps with a running step without locked_until",
        step_id,
        result,
    );
}

#[test]
fn inserting_a_pending_step_into_a_final_execution_is_refused() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let done = start(&mut conn, &wf);
    run_everything(&mut conn);
    assert_eq!(status(&mut conn, done.id), ExecutionStatus::Completed);
    let cancelled = start(&mut conn, &wf);
    engine::cancel(&mut conn, cancelled.id).unwrap();

    for ex in [done.id, cancelled.id] {
        let before = state_of(&mut conn, ex);
        let what = format!(
            "inserting a pending step into a {} execution",
            before.0.status.as_str()
        );
        assert_check_violation(&what, NewExecutionStep::new(ex, "late").create(&mut conn));
        assert_eq!(state_of(&mut conn, ex), before, "{what}: nothing changed");
    }
}

/// The one-statement insert of an execution that is already final together
/// with a pending step (the issue names `insert_execution_with_steps`): the
/// step would stay pending for ever just the same.
#[test]
fn inserting_a_final_execution_with_a_pending_step_is_refused() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let new = NewExecution {
        status: ExecutionStatus::Cancelled,
        ..NewExecution::new(wf.id)
    };
    let step = NewExecutionStep::new(new.id, "a");
    assert_check_violation(
        "insert_execution_with_steps of a cancelled execution with a pending step",
        bulk::insert_execution_with_steps(&mut conn, &new, &[step]),
    );
    assert!(!exists(&mut conn, new.id), "nothing inserted");
}

const HAND_CLAIM: &str = "UPDATE execution_steps \
     SET status = 'running', locked_by = 'x', locked_until = now() + interval '1 minute' WHERE id = $1";

#[test]
fn a_hand_written_claim_of_a_step_whose_upstream_is_not_done_is_refused() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[("a", "b")]);
    let ex = start(&mut conn, &wf);
    let b = step_of(&mut conn, ex.id, "b");
    assert_eq!(b.upstream_pending, 1);
    let before = state_of(&mut conn, ex.id);
    assert_check_violation(
        "a hand-written claim of a step with upstream_pending > 0",
        exec_sql(&mut conn, HAND_CLAIM, b.id),
    );
    assert_eq!(state_of(&mut conn, ex.id), before, "nothing changed");
}

#[test]
fn a_hand_written_claim_under_a_paused_execution_is_refused() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let ex = start(&mut conn, &wf);
    engine::pause(&mut conn, ex.id).unwrap();
    let a = step_of(&mut conn, ex.id, "a");
    assert_eq!(
        (a.status, a.upstream_pending),
        (StepStatus::Pending, 0),
        "ready"
    );
    let before = state_of(&mut conn, ex.id);
    assert_check_violation(
        "a hand-written claim of a ready step of a paused execution",
        exec_sql(&mut conn, HAND_CLAIM, a.id),
    );
    assert_eq!(state_of(&mut conn, ex.id), before, "nothing changed");
}

// ---------------------------------------------------------------------------
// 6. Leases use the statement's clock, not the transaction's.

/// Whether the step's lease is still valid at this very moment.
fn lease_valid_now(conn: &mut PgConnection, id: Uuid) -> bool {
    diesel::sql_query(
        "SELECT locked_until > clock_timestamp() AS flag FROM execution_steps WHERE id = $1",
    )
    .bind::<SqlUuid, _>(id)
    .get_result::<Flag>(conn)
    .unwrap()
    .flag
    .unwrap_or(false)
}

/// The transaction has been open longer than the lease (3 s) is long.
const OLD_TRANSACTION: &str = "SELECT pg_sleep(3.2)";
const SHORT_LEASE: Duration = Duration::from_secs(3);

#[test]
fn a_claim_in_an_old_transaction_gives_a_lease_that_is_still_valid() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    start(&mut conn, &wf);
    let (claimed, valid) = conn
        .transaction(|c| {
            diesel::sql_query(OLD_TRANSACTION).execute(c)?;
            let claimed = engine::claim_steps(c, "w", 1, SHORT_LEASE)?;
            let valid = claimed.first().map(|s| lease_valid_now(c, s.id));
            QueryResult::Ok((claimed, valid))
        })
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        valid,
        Some(true),
        "the lease of a claim made 3.2 s into a transaction must end 3 s after the claim \
         (locked_until > clock_timestamp()), not 1 s after the transaction began: {:?}",
        claimed[0].locked_until
    );
    let mut other = db.connect();
    let reclaimed = engine::reclaim_expired(&mut other, 10).unwrap();
    let taken = engine::claim_steps(&mut other, "w2", 10, LEASE).unwrap();
    assert!(
        reclaimed.is_empty() && taken.is_empty(),
        "another worker must not get the step while w's lease is valid: reclaimed {reclaimed:?}, claimed {taken:?}"
    );
}

#[test]
fn a_heartbeat_in_an_old_transaction_keeps_the_lease_valid() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    start(&mut conn, &wf);
    let a = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    let (held, valid) = conn
        .transaction(|c| {
            diesel::sql_query(OLD_TRANSACTION).execute(c)?;
            let held = engine::heartbeat(c, &[Lease::new(a.id, "w", a.attempt)], SHORT_LEASE)?;
            let valid = lease_valid_now(c, a.id);
            QueryResult::Ok((held, valid))
        })
        .unwrap();
    assert_eq!(held, [a.id], "the lease was held");
    assert!(
        valid,
        "a heartbeat 3.2 s into a transaction must extend the lease to 3 s after the heartbeat \
         (locked_until > clock_timestamp()), not move it into the past: {:?}",
        step(&mut conn, a.id).locked_until
    );
    let mut other = db.connect();
    let reclaimed = engine::reclaim_expired(&mut other, 10).unwrap();
    assert!(
        reclaimed.is_empty(),
        "the step must not be reclaimed while w's lease is valid: {reclaimed:?}"
    );
}

// ---------------------------------------------------------------------------
// 7. Prune keeps what is still in use.

fn make_old(conn: &mut PgConnection, ids: &[Uuid]) {
    diesel::sql_query(
        "UPDATE executions SET completed_at = now() - interval '1 day' WHERE id = ANY($1)",
    )
    .bind::<diesel::sql_types::Array<SqlUuid>, _>(ids)
    .execute(conn)
    .unwrap();
}

/// An old, final chain of `depth` executions (root first, each the parent of
/// the next); session B starts a sub-execution of the last one in an open
/// transaction, prune runs meanwhile (and may wait), then B commits. Returns
/// the chain, the sub-execution's id, and whether B's start committed.
fn prune_races_a_sub_start(depth: usize) -> (TestDatabase, Vec<Uuid>, Uuid, bool) {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let mut chain: Vec<Uuid> = Vec::new();
    for _ in 0..depth {
        let mut new = NewExecution::new(wf.id);
        if let Some(parent) = chain.last() {
            new = new.parent(*parent);
        }
        chain.push(
            engine::start_execution(&mut conn, &new)
                .unwrap()
                .execution
                .id,
        );
    }
    run_everything(&mut conn);
    for id in &chain {
        assert_eq!(status(&mut conn, *id), ExecutionStatus::Completed);
    }
    make_old(&mut conn, &chain);

    let sub = NewExecution::new(wf.id).parent(*chain.last().unwrap());
    let sub_id = sub.id;
    let mut b = Session::new(&db, "sub-start");
    b.begin();
    b.run("start a sub-execution", move |c| {
        engine::start_execution(c, &sub).map(|s| s.execution.status)
    });
    b.settle(&mut conn);
    let mut pruner = Session::new(&db, "prune");
    pruner.run("prune_executions(now, 100)", |c| {
        engine::prune_executions(c, Utc::now(), 100)
    });
    pruner.settle(&mut conn);
    b.commit();
    let b = b.finish();
    let pruned = pruner.finish();
    assert_all_ok("prune", &[("prune", &pruned)]);
    let committed = b.iter().all(|(_, o)| o.is_ok());
    if !committed {
        assert!(
            !exists(&mut conn, sub_id),
            "a refused sub-start leaves nothing behind: {b:?}"
        );
    }
    (db, chain, sub_id, committed)
}

fn assert_sub_execution_survives(depth: usize) {
    let (db, chain, sub, committed) = prune_races_a_sub_start(depth);
    let mut conn = db.connect();
    if committed {
        assert!(
            exists(&mut conn, sub),
            "the sub-execution started (and committed) while prune ran was deleted by it \
             (cascade from its old, final ancestor)"
        );
        let steps = ExecutionStep::list_for_execution(&mut conn, sub).unwrap();
        assert_eq!(steps.len(), 1, "with its step");
        assert_eq!(status(&mut conn, sub), ExecutionStatus::Running);
        for id in chain {
            assert!(
                exists(&mut conn, id),
                "an ancestor of an execution that exists was deleted"
            );
        }
    }
}

/// The sub-execution's parent is old and final. (Today the child's
/// foreign-key check holds the parent `FOR KEY SHARE`, so prune's `SKIP
/// LOCKED` skips it: this one passes before the fix too; a regression guard.)
#[test]
fn prune_keeps_a_sub_execution_started_under_an_old_final_parent() {
    assert_sub_execution_survives(1);
}

/// The sub-execution's parent and grandparent are old and final. Today
/// prune selects and deletes the grandparent (nothing locks it), its cascade
/// to the parent waits for the sub-start's `FOR KEY SHARE`, and once that
/// commits the cascade (a fresh snapshot) deletes the new, running
/// sub-execution too.
#[test]
fn prune_does_not_cascade_into_a_sub_execution_committed_while_it_waits() {
    assert_sub_execution_survives(2);
}

#[test]
fn prune_keeps_a_cancelled_execution_whose_step_still_runs() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let busy = start(&mut conn, &wf);
    let a = engine::claim_steps(&mut conn, "w", 1, LEASE)
        .unwrap()
        .remove(0);
    engine::cancel(&mut conn, busy.id).unwrap();
    let idle = start(&mut conn, &wf);
    engine::cancel(&mut conn, idle.id).unwrap();
    make_old(&mut conn, &[busy.id, idle.id]);
    assert_eq!(step(&mut conn, a.id).status, StepStatus::Running);

    let deleted = engine::prune_executions(&mut conn, Utc::now(), 100).unwrap();
    assert!(
        exists(&mut conn, busy.id),
        "prune deleted a cancelled execution whose step still runs under a live lease"
    );
    assert_eq!(
        step(&mut conn, a.id).status,
        StepStatus::Running,
        "the step is kept"
    );
    assert!(!exists(&mut conn, idle.id), "the idle one is pruned");
    assert_eq!(deleted, 1);
    // The worker can still report.
    engine::complete_step(&mut conn, &Lease::new(a.id, "w", a.attempt), None).unwrap();
}

// ---------------------------------------------------------------------------
// 8. Claims do not scan past ready steps of paused executions.

/// Rows read so far from the engine's tables (index entries plus sequential
/// scan rows), from the cumulative statistics.
fn rows_read(conn: &mut PgConnection) -> i64 {
    diesel::sql_query("SELECT pg_stat_clear_snapshot()")
        .execute(conn)
        .unwrap();
    diesel::sql_query(
        "SELECT (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes \
                 WHERE relname IN ('execution_steps', 'executions'))::bigint \
              + (SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables \
                 WHERE relname IN ('execution_steps', 'executions'))::bigint AS n",
    )
    .get_result::<Count>(conn)
    .unwrap()
    .n
}

/// Runs `f` in a transaction whose statistics are flushed at its commit
/// (`pg_stat_force_next_flush`, PostgreSQL 15+: a backend otherwise flushes
/// at most once a second), and returns its result and the rows it read.
fn measured<T>(conn: &mut PgConnection, f: impl FnOnce(&mut PgConnection) -> T) -> (T, i64) {
    let flush = |conn: &mut PgConnection| {
        conn.transaction(|c| diesel::sql_query("SELECT pg_stat_force_next_flush()").execute(c))
            .unwrap();
    };
    flush(conn);
    let before = rows_read(conn);
    let value = conn
        .transaction(|c| {
            diesel::sql_query("SELECT pg_stat_force_next_flush()").execute(c)?;
            QueryResult::Ok(f(c))
        })
        .unwrap();
    let after = rows_read(conn);
    (value, after - before)
}

#[test]
fn a_claim_does_not_scan_past_the_ready_steps_of_a_paused_execution() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let names = node_names("n", MANY);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let big = workflow(&mut conn, &names, &[]);
    let paused = start(&mut conn, &big);
    engine::pause(&mut conn, paused.id).unwrap();
    // Started later: its steps come after the paused ones in claim order.
    let small = workflow(&mut conn, &["only"], &[]);
    let running = start(&mut conn, &small);

    // The defect is LIVE index entries of the paused steps that every claim
    // scans past. The row versions the pause made dead (with a design that
    // moves paused steps out of the claim index) are VACUUM's to remove
    // (autovacuum may be off on a test server), so clean them first.
    diesel::sql_query("VACUUM execution_steps")
        .execute(&mut conn)
        .unwrap();
    let (claimed, read) = measured(&mut conn, |c| {
        engine::claim_steps(c, "w", 1, LEASE).unwrap()
    });
    assert_eq!(claimed.len(), 1, "the running execution's step is claimed");
    assert_eq!(claimed[0].execution_id, running.id);
    assert!(
        read < 100,
        "one claim read {read} rows/index entries of executions and execution_steps; \
         it must not scan past the {MANY} ready steps of the paused execution"
    );
}

/// Cancelling touches each step a bounded number of times (today each
/// skipped row's trigger rescans the unfinished-steps index over every row
/// the statement already skipped: quadratic).
#[test]
fn cancelling_many_pending_steps_reads_each_a_bounded_number_of_times() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let names = node_names("n", MANY);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let wf = workflow(&mut conn, &names, &[]);
    let ex = start(&mut conn, &wf);
    let (cancelled, read) = measured(&mut conn, |c| engine::cancel(c, ex.id).unwrap());
    assert_eq!(cancelled.status, ExecutionStatus::Cancelled);
    assert!(
        read < 20 * MANY as i64,
        "cancelling an execution of {MANY} pending steps read {read} rows/index entries \
         (quadratic in the steps); at most 20 per step expected"
    );
}
