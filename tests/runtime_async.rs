//! The async face (`AsyncPool`) and the notification stream (`Notifier`)
//! of feature `runtime`, against a real PostgreSQL.
#![cfg(feature = "runtime")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;
use workflow_db::runtime::{
    AsyncPool, NOTIFIER_APPLICATION_NAME, Notifier, NotifierEvent, NotifierOptions, TaskFailed,
};
use workflow_db::testing::TestDatabase;
use workflow_db::{DatabaseUrl, Error, ExecutionStatus, NewExecution, StepStatus, engine};

use common::{LEASE, workflow};

/// How long a test waits for an event that should come at once.
const PATIENCE: Duration = Duration::from_secs(15);

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn backend_pid(conn: &mut PgConnection) -> workflow_db::Result<i32> {
    Ok(diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)?
        .pid)
}

fn async_pool(db: &TestDatabase, size: u32) -> AsyncPool {
    let mut config = db.config();
    config.pool_size = size;
    config.connect_timeout = Duration::from_secs(1);
    AsyncPool::new(workflow_db::build_pool(&config).unwrap())
}

/// Starts an execution of `wf` through the pool; its id.
async fn start(pool: &AsyncPool, wf: Uuid) -> Uuid {
    pool.run(move |c| engine::start_execution(c, &NewExecution::new(wf)))
        .await
        .unwrap()
        .execution
        .id
}

/// The next event, failing the test when none comes in time.
async fn next_event(n: &mut Notifier) -> NotifierEvent {
    tokio::time::timeout(PATIENCE, n.next())
        .await
        .expect("no notifier event in time")
        .expect("the notifier stream ended")
}

/// Reads events until a notification about `execution`; every event read
/// before it (that one included).
async fn until_notified(n: &mut Notifier, execution: Uuid) -> Vec<NotifierEvent> {
    let mut seen = Vec::new();
    loop {
        let e = next_event(n).await;
        let done = matches!(&e, NotifierEvent::Notification(x) if x.execution_id == execution);
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// The executions notified in `events`, each once, in order of first notification.
fn notified_executions(events: &[NotifierEvent]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for e in events {
        if let NotifierEvent::Notification(n) = e {
            if !ids.contains(&n.execution_id) {
                ids.push(n.execution_id);
            }
        }
    }
    ids
}

/// Reads events until `Disconnected` (its reason); notifications before it
/// must be about `earlier` executions (the rest of their notifications).
async fn until_disconnected(n: &mut Notifier, earlier: &[Uuid]) -> String {
    loop {
        match next_event(n).await {
            NotifierEvent::Disconnected { reason } => return reason,
            NotifierEvent::Notification(x) if earlier.contains(&x.execution_id) => {}
            NotifierEvent::Claimable(_) => {}
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
}

/// Reads events until `Reconnected`; notifications before it must be about
/// `earlier` executions (the catch-up replays from a little before the
/// disconnection: duplicates, never gaps).
async fn until_reconnected(n: &mut Notifier, earlier: &[Uuid]) {
    loop {
        match next_event(n).await {
            NotifierEvent::Reconnected => return,
            NotifierEvent::Notification(x) if earlier.contains(&x.execution_id) => {}
            other => panic!("expected Reconnected, got {other:?}"),
        }
    }
}

// ------------------------------------------------------------- AsyncPool

/// Eight tasks claim and complete every step through the pool while a
/// ticker runs on the same single-threaded runtime. Each claim also holds
/// its connection in `pg_sleep(0.3)`: had any database call run on the
/// runtime's one thread, the ticker would have waited at least that long
/// once. It never does, and every step is completed exactly once.
#[test]
fn engine_operations_from_many_tasks_never_block_a_current_thread_runtime() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b", "c"], &[]);
    let executions: Vec<Uuid> = (0..8).map(|_| common::start(&mut conn, &wf).id).collect();
    let pool = async_pool(&db, 8);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (longest_gap, ticks, completed) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let mut interval = tokio::time::interval(Duration::from_millis(10));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let (mut last, mut longest, mut ticks) = (Instant::now(), Duration::ZERO, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    interval.tick().await;
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                    ticks += 1;
                }
                (longest, ticks)
            }
        });
        let workers: Vec<_> = (0..8)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let worker = format!("async-{i}");
                    let mut completed = Vec::new();
                    loop {
                        let w = worker.clone();
                        let claimed = pool
                            .run(move |c| {
                                c.batch_execute("SELECT pg_sleep(0.3)")?;
                                Ok(engine::claim_steps(c, &w, 1, LEASE)?)
                            })
                            .await
                            .unwrap();
                        let Some(step) = claimed.into_iter().next() else {
                            return completed;
                        };
                        let lease = step.lease().unwrap();
                        // Async work between the claim and the report.
                        tokio::task::yield_now().await;
                        let done = pool
                            .run(move |c| engine::complete_step(c, &lease, None))
                            .await
                            .unwrap();
                        assert_eq!(done.status, StepStatus::Completed);
                        completed.push(done.id);
                    }
                })
            })
            .collect();
        let mut completed = Vec::new();
        for w in workers {
            completed.extend(w.await.unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        let (longest, ticks) = ticker.await.unwrap();
        (longest, ticks, completed)
    });

    assert!(
        longest_gap < Duration::from_millis(300),
        "the ticker waited {longest_gap:?} once: a database call blocked the runtime"
    );
    assert!(ticks > 10, "the ticker ticked only {ticks} times");
    let mut unique = completed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((completed.len(), unique.len()), (24, 24));
    for id in executions {
        let e = workflow_db::Execution::find(&mut conn, id).unwrap();
        assert_eq!(e.status, ExecutionStatus::Completed, "execution {id}");
    }
}

/// A closure that panics inside an open transaction: the caller gets a
/// `TaskFailed::Panicked` error naming the panic, the pool (of one
/// connection) discarded that connection (so its transaction rolled back)
/// and hands out a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_closure_is_an_error_and_the_pool_stays_usable() {
    let db = TestDatabase::new();
    let pool = async_pool(&db, 1);
    let before = pool.run(backend_pid).await.unwrap();

    let err = pool
        .run(|c| -> workflow_db::Result<()> {
            c.batch_execute("BEGIN; CREATE TABLE panic_marker (x int)")?;
            panic!("boom inside the closure")
        })
        .await
        .unwrap_err();
    match TaskFailed::of(&err) {
        Some(TaskFailed::Panicked { message }) => assert_eq!(message, "boom inside the closure"),
        other => panic!("expected a panic error, got {other:?}: {err}"),
    }
    assert!(
        err.to_string()
            .contains("panicked: boom inside the closure"),
        "{err}"
    );

    for _ in 0..3 {
        let (pid, marker) = pool
            .run(|c| {
                let pid = backend_pid(c)?;
                let marker = diesel::sql_query(
                    "SELECT to_regclass('public.panic_marker') IS NOT NULL AS flag",
                )
                .get_result::<Flag>(c)?
                .flag;
                Ok((pid, marker))
            })
            .await
            .unwrap();
        assert_ne!(pid, before, "the panicked connection went back to the pool");
        assert!(!marker, "the panicked closure's transaction was committed");
    }
    // Ordinary errors stay ordinary errors.
    let err = pool
        .run(|c| Ok(c.batch_execute("SELECT * FROM no_such_table")?))
        .await
        .unwrap_err();
    assert!(TaskFailed::of(&err).is_none());
    assert!(matches!(err, Error::Query(_)), "{err:?}");
}

/// Callers beyond the pool's size wait as futures; one that waits longer
/// than the pool's connection timeout gets the pool's own error, and the
/// pool serves it again once the connection is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_waiting_past_the_connection_timeout_gets_the_pool_error() {
    let db = TestDatabase::new();
    let pool = async_pool(&db, 1); // connection_timeout 1 s
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.run(|c| Ok(c.batch_execute("SELECT pg_sleep(2.5)")?))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let err = pool.run(|_| Ok(())).await.unwrap_err();
    assert!(matches!(err, Error::Pool(_)), "{err:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    holder.await.unwrap().unwrap();
    assert!(pool.run(backend_pid).await.is_ok());
}

// -------------------------------------------------------------- Notifier

/// A start committed by another connection arrives as a notification, with
/// nothing else first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_receives_a_start_committed_by_another_connection() {
    let db = TestDatabase::new();
    let wf = workflow(&mut db.connect(), &["a", "b"], &[("a", "b")]).id;
    let pool = async_pool(&db, 2);
    let mut notifier = Notifier::from_config(&db.config()).await.unwrap();

    let id = start(&pool, wf).await;
    let seen = until_notified(&mut notifier, id).await;
    assert_eq!(notified_executions(&seen), vec![id], "{seen:?}");
    let NotifierEvent::Notification(n) = seen.last().unwrap() else {
        unreachable!()
    };
    assert_eq!(n.execution_id, id);

    // Its connection is the notifier's, visible under its name.
    let named: Count = pool
        .run(|c| {
            Ok(diesel::sql_query(format!(
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = '{NOTIFIER_APPLICATION_NAME}'"
            ))
            .get_result(c)?)
        })
        .await
        .unwrap();
    assert_eq!(named.n, 1);
}

/// A transaction that starts an execution and rolls back notifies nothing:
/// the next notification is the one of a start committed after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_notification_for_a_rolled_back_transaction() {
    let db = TestDatabase::new();
    let wf = workflow(&mut db.connect(), &["a"], &[]).id;
    let pool = async_pool(&db, 2);
    let mut notifier = Notifier::connect(db.url()).await.unwrap();

    let rolled_back = pool
        .run(move |c| {
            let mut id = None;
            let r = c.transaction::<(), Error, _>(|c| {
                id = Some(
                    engine::start_execution(c, &NewExecution::new(wf))?
                        .execution
                        .id,
                );
                Err(Error::Query(diesel::result::Error::RollbackTransaction))
            });
            assert!(r.is_err());
            Ok(id.unwrap())
        })
        .await
        .unwrap();
    let committed = start(&pool, wf).await;
    let seen = until_notified(&mut notifier, committed).await;
    assert!(
        !notified_executions(&seen).contains(&rolled_back),
        "notified for a rolled-back start: {seen:?}"
    );
    assert_eq!(notified_executions(&seen), vec![committed]);
}

/// Killing the notifier's backend: it says `Disconnected`, reconnects by
/// itself, says `Reconnected` (under its application_name again), and
/// delivers what commits after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_reconnects_after_its_backend_is_killed_and_says_so() {
    let db = TestDatabase::new();
    let wf = workflow(&mut db.connect(), &["a"], &[]).id;
    let pool = async_pool(&db, 2);
    let mut notifier = Notifier::connect(db.url()).await.unwrap();
    let first = start(&pool, wf).await;
    until_notified(&mut notifier, first).await;

    let mut earlier = vec![first];
    for round in 0..2 {
        let killed: Count = pool
            .run(|c| {
                Ok(diesel::sql_query(format!(
                    "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = '{NOTIFIER_APPLICATION_NAME}'"
                ))
                .get_result(c)?)
            })
            .await
            .unwrap();
        assert_eq!(killed.n, 1, "round {round}");

        let reason = until_disconnected(&mut notifier, &earlier).await;
        assert!(reason.contains("terminat"), "round {round}: {reason}");
        until_reconnected(&mut notifier, &earlier).await;
        let after = start(&pool, wf).await;
        let seen = until_notified(&mut notifier, after).await;
        let new: Vec<Uuid> = notified_executions(&seen)
            .into_iter()
            .filter(|e| !earlier.contains(e))
            .collect();
        assert_eq!(new, vec![after], "round {round}");
        earlier.push(after);
    }
}

/// A connection that goes silent without closing (a frozen proxy stands in
/// for a dead network path) is found by the health check, reported and
/// replaced: the notifier is never deaf without saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_found_by_the_health_check_and_replaced() {
    let db = TestDatabase::new();
    let wf = workflow(&mut db.connect(), &["a"], &[]).id;
    let pool = async_pool(&db, 2);
    let proxy = FreezableProxy::start(db.url()).await;

    let mut options = NotifierOptions::default();
    options.health_check_interval = Duration::from_millis(300);
    options.health_check_timeout = Duration::from_millis(500);
    let mut notifier = Notifier::connect_with(&proxy.url, options).await.unwrap();
    let first = start(&pool, wf).await;
    until_notified(&mut notifier, first).await;

    proxy.freeze_current();
    let t0 = Instant::now();
    let reason = until_disconnected(&mut notifier, &[first]).await;
    assert!(reason.contains("health check"), "{reason}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    until_reconnected(&mut notifier, &[first]).await;
    let after = start(&pool, wf).await;
    let seen = until_notified(&mut notifier, after).await;
    let new: Vec<Uuid> = notified_executions(&seen)
        .into_iter()
        .filter(|e| *e != first)
        .collect();
    assert_eq!(new, vec![after]);
}

/// Notifications committed while the connection was dead are not lost: after
/// the reconnection the notifier replays them from the event feed (the
/// feed's horizon may trail behind other databases' transactions, so they
/// may come just after `Reconnected`). With the catch-up off they never
/// come: this is what the replay adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnection_the_notifier_replays_what_it_missed_from_the_feed() {
    for catch_up in [true, false] {
        let db = TestDatabase::new();
        let wf = workflow(&mut db.connect(), &["a"], &[]).id;
        let pool = async_pool(&db, 2);
        let proxy = FreezableProxy::start(db.url()).await;
        let mut options = NotifierOptions::default();
        options.health_check_interval = Duration::from_millis(300);
        options.health_check_timeout = Duration::from_millis(500);
        options.catch_up = catch_up;
        let mut notifier = Notifier::connect_with(&proxy.url, options).await.unwrap();
        let first = start(&pool, wf).await;
        until_notified(&mut notifier, first).await;

        // Dead path: these commits' NOTIFYs go nowhere.
        proxy.freeze_current();
        let mut missed = Vec::new();
        for _ in 0..3 {
            missed.push(start(&pool, wf).await);
        }
        until_disconnected(&mut notifier, &[first]).await;
        let mut seen: Vec<NotifierEvent> = Vec::new();
        loop {
            let e = next_event(&mut notifier).await;
            let reconnected = e == NotifierEvent::Reconnected;
            seen.push(e);
            if reconnected {
                break;
            }
        }
        let after = start(&pool, wf).await;
        seen.extend(until_notified(&mut notifier, after).await);
        if catch_up {
            // Read on until every missed execution was replayed.
            let deadline = Instant::now() + PATIENCE;
            while !missed
                .iter()
                .all(|m| notified_executions(&seen).contains(m))
            {
                assert!(Instant::now() < deadline, "not replayed: {seen:?}");
                seen.push(next_event(&mut notifier).await);
            }
            let replayed: Vec<(Uuid, Option<Uuid>, String)> = seen
                .iter()
                .filter_map(|e| match e {
                    NotifierEvent::Notification(n) if missed.contains(&n.execution_id) => {
                        Some((n.execution_id, n.step_id, n.status.to_string()))
                    }
                    _ => None,
                })
                .collect();
            for m in &missed {
                assert!(
                    replayed
                        .iter()
                        .any(|(e, s, status)| e == m && s.is_none() && status == "running"),
                    "the start of {m} replayed: {replayed:?}"
                );
            }
        } else {
            assert!(
                missed
                    .iter()
                    .all(|m| !notified_executions(&seen).contains(m)),
                "without catch-up the missed notifications are gone: {seen:?}"
            );
        }
    }
}

/// The first connection failing is an error naming the target, never the
/// password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_that_cannot_connect_fails_without_the_password() {
    // Nothing listens on a port just released.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = DatabaseUrl::parse(&format!(
        "postgres://postgres:{}@127.0.0.1:{port}/wf?sslmode=disable",
        common::PASSWORD
    ))
    .unwrap();
    let err = Notifier::connect(&url).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    let shown = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
    assert!(shown.contains(&port.to_string()), "{shown}");
    assert!(!shown.contains(common::PASSWORD), "{shown}");
}

/// A TCP proxy to the test server whose current connections can be frozen:
/// they stay open but nothing passes any more. Later connections pass.
struct FreezableProxy {
    url: DatabaseUrl,
    frozen: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>,
}

impl FreezableProxy {
    async fn start(target: &DatabaseUrl) -> FreezableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = format!("{}:{}", target.host_name().unwrap(), target.port());
        let mut url = url::Url::parse(target.expose()).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(port)).unwrap();
        let frozen: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let flags = Arc::clone(&frozen);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.unwrap();
                let flag = Arc::new(AtomicBool::new(false));
                flags.lock().unwrap().push(Arc::clone(&flag));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, Arc::clone(&flag)));
                tokio::spawn(pipe(sr, cw, flag));
            }
        });
        FreezableProxy {
            url: DatabaseUrl::parse(url.as_str()).unwrap(),
            frozen,
        }
    }

    /// Freezes every connection open now.
    fn freeze_current(&self) {
        for f in self.frozen.lock().unwrap().iter() {
            f.store(true, Ordering::SeqCst);
        }
    }
}

/// Copies `from` to `to` until either closes; once `frozen`, drops
/// everything read (the connection stays open and says nothing).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
