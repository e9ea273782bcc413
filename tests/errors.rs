//! What the crate's `Error` says about a failure: SQLSTATE, retryable or not,
//! the connection's fault or not. Every failure is produced for real on
//! PostgreSQL, in a forced order (barriers, and waiting until
//! `pg_stat_activity` shows a session blocked), never by hoping for a race.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Uuid as SqlUuid};
use uuid::Uuid;
use workflow_db::engine::{self, ExecutionFilter};
use workflow_db::error::sqlstate;
use workflow_db::schema::executions;
use workflow_db::testing::TestDatabase;
use workflow_db::{Error, ExecutionStatus, Lease, LeaseLostReason, NewExecution};

use common::{LEASE, start, workflow};

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn backend_pid(conn: &mut PgConnection) -> i32 {
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)
        .unwrap()
        .pid
}

/// Terminates the session `pid` from another connection and waits (up to
/// 5 s) until it is gone.
fn terminate(db: &TestDatabase, pid: i32) {
    #[derive(QueryableByName)]
    struct Done {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        done: bool,
    }
    let done: Done = diesel::sql_query("SELECT pg_terminate_backend($1, 5000) AS done")
        .bind::<Integer, _>(pid)
        .get_result(&mut db.connect())
        .unwrap();
    assert!(done.done, "backend {pid} was not terminated");
}

/// Waits until session `pid` is blocked on a lock (as `pg_stat_activity`
/// says), so that the next step of a test happens strictly after it.
fn wait_until_blocked(observer: &mut PgConnection, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let Count { n } = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
        )
        .bind::<Integer, _>(pid)
        .get_result(observer)
        .unwrap();
        if n == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "session {pid} never blocked on a lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock_execution(conn: &mut PgConnection, id: Uuid) -> Result<(), Error> {
    diesel::sql_query("SELECT id FROM executions WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(id)
        .execute(conn)?;
    Ok(())
}

fn status(conn: &mut PgConnection, id: Uuid) -> ExecutionStatus {
    executions::table
        .find(id)
        .select(executions::status)
        .first(conn)
        .unwrap()
}

/// Two transactions each lock one execution, then cancel the other's:
/// a real deadlock. The session that waits second (and whose
/// `deadlock_timeout` is short) is the one PostgreSQL aborts.
#[test]
fn a_deadlock_is_retryable_with_sqlstate_40p01_and_the_retry_succeeds() {
    let db = TestDatabase::new();
    let mut setup = db.connect();
    let wf = workflow(&mut setup, &["a"], &[]);
    let (e1, e2) = (start(&mut setup, &wf).id, start(&mut setup, &wf).id);

    let mut a = db.connect();
    let mut b = db.connect();
    // Only B runs the deadlock check in time; A would wait 60 s before
    // checking, so A is never the victim.
    a.batch_execute("SET deadlock_timeout = '60s'").unwrap();
    b.batch_execute("SET deadlock_timeout = '50ms'").unwrap();
    let a_pid = backend_pid(&mut a);

    let locked = Arc::new(Barrier::new(2));
    let winner = {
        let locked = locked.clone();
        std::thread::spawn(move || {
            let result = a.transaction::<_, Error, _>(|conn| {
                lock_execution(conn, e1)?;
                locked.wait();
                // Blocks on B's lock of e2 until B is aborted.
                engine::cancel(conn, e2)
            });
            (result, a)
        })
    };

    let mut observer = db.connect();
    let err = b
        .transaction::<_, Error, _>(|conn| {
            lock_execution(conn, e2)?;
            locked.wait();
            // A now asks for e2; only once it waits does B ask for e1.
            wait_until_blocked(&mut observer, a_pid);
            engine::cancel(conn, e1)
        })
        .expect_err("B closes the cycle and is the deadlock victim");

    assert_eq!(err.sqlstate(), Some(sqlstate::DEADLOCK_DETECTED), "{err:?}");
    assert!(err.is_retryable(), "{err:?}");
    assert!(!err.is_connection_error(), "{err:?}");

    let (won, _a) = winner.join().unwrap();
    assert_eq!(won.unwrap().status, ExecutionStatus::Cancelled);
    assert_eq!(
        status(&mut setup, e1),
        ExecutionStatus::Running,
        "the victim's transaction was rolled back"
    );

    // Retryable means: the same transaction, run again, goes through.
    let retried = b
        .transaction::<_, Error, _>(|conn| {
            lock_execution(conn, e2)?;
            engine::cancel(conn, e1)
        })
        .unwrap();
    assert_eq!(retried.status, ExecutionStatus::Cancelled);
}

/// A REPEATABLE READ transaction updates a row another transaction changed
/// after its snapshot was taken. (On a scratch table: the engine's status
/// triggers refuse transitions outside READ COMMITTED.)
#[test]
fn a_serialization_failure_is_retryable_with_sqlstate_40001() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let mut other = db.connect();
    conn.batch_execute("CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL); INSERT INTO counter VALUES (1, 0)")
        .unwrap();
    let read = |conn: &mut PgConnection| -> QueryResult<i64> {
        diesel::sql_query("SELECT n::bigint AS n FROM counter WHERE id = 1")
            .get_result::<Count>(conn)
            .map(|c| c.n)
    };
    let increment = "UPDATE counter SET n = n + 1 WHERE id = 1";

    let err = conn
        .build_transaction()
        .repeatable_read()
        .run::<_, Error, _>(|conn| {
            // The snapshot is taken here.
            assert_eq!(read(conn)?, 0);
            other.batch_execute(increment)?;
            conn.batch_execute(increment)?;
            Ok(())
        })
        .expect_err("the row changed after the snapshot");

    assert!(
        matches!(
            err.as_query_error(),
            Some(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::SerializationFailure,
                _
            ))
        ),
        "{err:?}"
    );
    assert_eq!(err.sqlstate(), Some(sqlstate::SERIALIZATION_FAILURE));
    assert!(err.is_retryable());
    assert!(!err.is_connection_error());
    assert_eq!(
        read(&mut conn).unwrap(),
        1,
        "the failed transaction was rolled back"
    );

    // Retryable means: the same transaction, run again, goes through.
    conn.build_transaction()
        .repeatable_read()
        .run::<_, Error, _>(|conn| {
            assert_eq!(read(conn)?, 1);
            conn.batch_execute(increment)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(read(&mut conn).unwrap(), 2);
}

#[test]
fn a_unique_violation_is_not_retryable_with_sqlstate_23505() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let new = NewExecution::new(wf.id).idempotency_key("once");
    new.create(&mut conn).unwrap();

    let err = Error::from(new.create(&mut conn).unwrap_err());
    assert_eq!(err.sqlstate(), Some(sqlstate::UNIQUE_VIOLATION), "{err:?}");
    assert!(!err.is_retryable());
    assert!(!err.is_connection_error());
}

#[test]
fn lease_lost_is_not_retryable_and_has_no_sqlstate() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    start(&mut conn, &wf);
    let step = engine::claim_steps(&mut conn, "w1", 1, LEASE)
        .unwrap()
        .remove(0);
    let lease = Lease::new(step.id, "w1", step.attempt);
    engine::complete_step(&mut conn, &lease, None).unwrap();

    let err = engine::complete_step(&mut conn, &lease, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLostReason::Finished(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(!err.is_connection_error());
    assert_eq!(err.sqlstate(), None);
}

/// Lock timeout (55P03, retryable), `NOWAIT` (55P03), statement timeout
/// (57014, not retryable) and a statement in an aborted transaction (25P02):
/// the codes Diesel reports as `Unknown`, recognised by their message.
#[test]
fn lock_and_statement_timeouts_get_their_sqlstate() {
    let db = TestDatabase::new();
    let mut holder = db.connect();
    let mut conn = db.connect();
    let wf = workflow(&mut holder, &["a"], &[]);
    let id = start(&mut holder, &wf).id;

    holder
        .transaction::<_, Error, _>(|holder| {
            lock_execution(holder, id)?;

            conn.batch_execute("SET lock_timeout = '50ms'")?;
            let err = engine::cancel(&mut conn, id).unwrap_err();
            assert_eq!(
                err.sqlstate(),
                Some(sqlstate::LOCK_NOT_AVAILABLE),
                "{err:?}"
            );
            assert!(err.is_retryable());
            conn.batch_execute("RESET lock_timeout")?;

            let err = Error::from(
                diesel::sql_query("SELECT id FROM executions WHERE id = $1 FOR UPDATE NOWAIT")
                    .bind::<SqlUuid, _>(id)
                    .execute(&mut conn)
                    .unwrap_err(),
            );
            assert_eq!(
                err.sqlstate(),
                Some(sqlstate::LOCK_NOT_AVAILABLE),
                "{err:?}"
            );
            assert!(err.is_retryable());
            Ok(())
        })
        .unwrap();

    conn.batch_execute("SET statement_timeout = '50ms'")
        .unwrap();
    let err = Error::from(conn.batch_execute("SELECT pg_sleep(5)").unwrap_err());
    assert_eq!(err.sqlstate(), Some(sqlstate::QUERY_CANCELED), "{err:?}");
    assert!(!err.is_retryable());
    assert!(!err.is_connection_error());
    conn.batch_execute("RESET statement_timeout").unwrap();

    let aborted = conn
        .transaction::<(), Error, _>(|conn| {
            let _ = conn.batch_execute("SELECT 1 / 0");
            conn.batch_execute("SELECT 1")?;
            Ok(())
        })
        .unwrap_err();
    assert_eq!(
        aborted.sqlstate(),
        Some(sqlstate::IN_FAILED_SQL_TRANSACTION)
    );
    assert!(!aborted.is_retryable());
}

fn assert_connection_error(err: &Error) {
    assert!(
        err.is_connection_error(),
        "a broken connection must report as one, got {err:?} ({err})"
    );
    assert!(!err.to_string().contains("type oid"), "{err}");
    assert!(
        !err.is_retryable(),
        "the outcome is unknown, not retryable: {err:?}"
    );
}

/// The first query that binds a status after the connection broke (here
/// the first such query of the connection at all, so Diesel has not looked
/// the enum's oid up yet) reports the broken connection.
#[test]
fn a_broken_connection_reports_as_a_connection_error_not_a_missing_type_oid() {
    let db = TestDatabase::new();
    let wf = workflow(&mut db.connect(), &["a"], &[]);
    let id = start(&mut db.connect(), &wf).id;

    let mut conn = db.connect();
    terminate(&db, backend_pid(&mut conn));
    // `cancel` binds `execution_status` values (`status = ANY($2)`).
    let err = engine::cancel(&mut conn, id).unwrap_err();
    assert_connection_error(&err);
}

#[test]
fn a_broken_pooled_connection_reports_as_a_connection_error_and_is_replaced() {
    let db = TestDatabase::new();
    let wf = workflow(&mut db.connect(), &["a"], &[]);
    start(&mut db.connect(), &wf);
    let pool = db.pool();
    let filter = ExecutionFilter {
        statuses: vec![ExecutionStatus::Running],
        ..ExecutionFilter::default()
    };

    {
        let mut conn = pool.get().unwrap();
        terminate(&db, backend_pid(&mut conn));
        let err = engine::list_executions(&mut conn, &filter, None, 10).unwrap_err();
        assert_connection_error(&err);
        let err = Error::from(workflow_db::pool::ping(&mut conn).unwrap_err());
        assert_connection_error(&err);
    }
    // The pool discarded the broken connection and opens a new one.
    let page = engine::list_executions(&mut pool.get().unwrap(), &filter, None, 10).unwrap();
    assert_eq!(page.executions.len(), 1);
}

/// A connection opened outside the crate gets the same behaviour from
/// `pool::prepare_connection`; without it, Diesel reports the failed type
/// lookup (the behaviour this guards against, shown to prove that the
/// test exercises it).
#[test]
fn prepare_connection_makes_a_connection_of_ones_own_report_a_broken_connection() {
    let db = TestDatabase::new();
    let wf = workflow(&mut db.connect(), &["a"], &[]);
    let id = start(&mut db.connect(), &wf).id;

    let mut unprepared = PgConnection::establish(db.url().expose()).unwrap();
    terminate(&db, backend_pid(&mut unprepared));
    let err = engine::cancel(&mut unprepared, id).unwrap_err();
    assert!(
        err.to_string().contains("Failed to find a type oid"),
        "Diesel's own behaviour changed; revisit pool::prepare_connection: {err:?}"
    );
    assert!(!err.is_connection_error());

    let mut prepared = PgConnection::establish(db.url().expose()).unwrap();
    workflow_db::pool::prepare_connection(&mut prepared).unwrap();
    terminate(&db, backend_pid(&mut prepared));
    let err = engine::cancel(&mut prepared, id).unwrap_err();
    assert_connection_error(&err);
}

/// In a database the migrations have not reached, preparing a connection
/// looks nothing up and fails nothing.
#[test]
fn connections_to_an_unmigrated_database_open_as_before() {
    let db = TestDatabase::empty();
    let mut conn = db.connect();
    diesel::sql_query("SELECT 1").execute(&mut conn).unwrap();
    workflow_db::pool::prepare_connection(&mut conn).unwrap();
}
