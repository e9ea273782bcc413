//! The worker of feature `runtime`, against a real PostgreSQL: handlers by
//! node type, the concurrency limit, retries, panics and timeouts, lost
//! leases, notifications, and graceful shutdown.
#![cfg(feature = "runtime")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;
use workflow_db::runtime::{AsyncPool, RetryPolicy, Worker, WorkerOptions, worker_id};
use workflow_db::schema::{execution_events, execution_steps};
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Backoff, Edge, Error, Execution, ExecutionStatus, ExecutionStep, NewExecution, NewWorkflow,
    Node, StepStatus, Workflow, WorkflowGraph, engine,
};

/// How long a test waits for what should happen within a second or two.
const PATIENCE: Duration = Duration::from_secs(20);

fn pool(db: &TestDatabase) -> AsyncPool {
    let mut config = db.config();
    config.pool_size = 4;
    AsyncPool::new(workflow_db::build_pool(&config).unwrap())
}

/// Options for tests: short intervals, and a poll interval long enough that
/// a test finishing quickly proves something other than polling woke the worker.
fn options(concurrency: usize) -> WorkerOptions {
    let mut o = WorkerOptions::default();
    o.concurrency = concurrency;
    o.lease = Duration::from_secs(5);
    o.heartbeat_interval = Some(Duration::from_millis(200));
    o.poll_interval = Duration::from_millis(300);
    o.shutdown_timeout = Duration::from_secs(5);
    o
}

fn typed_workflow(
    conn: &mut PgConnection,
    nodes: &[(&str, &str, i64)],
    edges: &[(&str, &str)],
) -> Workflow {
    let graph = WorkflowGraph {
        nodes: nodes
            .iter()
            .map(|(id, ty, retries)| {
                let mut n = Node::new(*id, *ty);
                n.config = json!({ "max_retries": retries });
                n
            })
            .collect(),
        edges: edges.iter().map(|(s, t)| Edge::new(*s, *t)).collect(),
    };
    NewWorkflow::from_graph("worker-test", &graph)
        .create(conn)
        .unwrap()
}

fn start(conn: &mut PgConnection, wf: &Workflow) -> Uuid {
    engine::start_execution(conn, &NewExecution::new(wf.id))
        .unwrap()
        .execution
        .id
}

fn steps(conn: &mut PgConnection, execution: Uuid) -> Vec<ExecutionStep> {
    execution_steps::table
        .filter(execution_steps::execution_id.eq(execution))
        .order(execution_steps::node_id)
        .select(ExecutionStep::as_select())
        .load(conn)
        .unwrap()
}

/// Polls `check` on a connection of its own until it holds, or panics after PATIENCE.
async fn eventually<T>(
    db: &TestDatabase,
    what: &str,
    mut check: impl FnMut(&mut PgConnection) -> Option<T>,
) -> T {
    let mut conn = db.connect();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check(&mut conn) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn status(conn: &mut PgConnection, execution: Uuid) -> ExecutionStatus {
    Execution::find(conn, execution).unwrap().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_a_diamond_to_completion_with_handlers_by_node_type() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(
        &mut conn,
        &[
            ("a", "http", 0),
            ("b", "sql", 0),
            ("c", "sql", 0),
            ("d", "llm", 0),
        ],
        &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    );
    let ids: Vec<Uuid> = (0..5).map(|_| start(&mut conn, &wf)).collect();
    let worker = Worker::new(pool(&db), options(4))
        .handle("http", |s| async move {
            Ok(Some(
                json!({ "node": s.step().node_id, "attempt": s.attempt() }),
            ))
        })
        .handle("sql", |_| async { Ok(Some(json!("rows"))) })
        .handle("llm", |_| async { Ok(None) })
        .spawn()
        .await
        .unwrap();
    for id in &ids {
        let id = *id;
        eventually(&db, "every execution completed", |c| {
            (status(c, id) == ExecutionStatus::Completed).then_some(())
        })
        .await;
    }
    let health = worker.health();
    assert!(
        health.running && health.is_healthy(Duration::from_secs(10)),
        "{health:?}"
    );
    let report = worker.shutdown().await.unwrap();
    assert_eq!(report.completed, 20);
    assert_eq!(report.claimed, 20);
    assert_eq!((report.failed, report.lost, report.released), (0, 0, 0));
    let s = steps(&mut conn, ids[0]);
    assert_eq!(s[0].output, Some(json!({ "node": "a", "attempt": 1 })));
    assert_eq!(s[1].output, Some(json!("rows")));
    assert!(s.iter().all(|s| s.status == StepStatus::Completed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_at_most_its_concurrency_and_only_its_node_types() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let nodes: Vec<String> = (0..12).map(|i| format!("n{i:02}")).collect();
    let mut spec: Vec<(&str, &str, i64)> = nodes.iter().map(|n| (n.as_str(), "slow", 0)).collect();
    spec.push(("other", "email", 0));
    let wf = typed_workflow(&mut conn, &spec, &[]);
    let id = start(&mut conn, &wf);
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let worker = Worker::new(pool(&db), options(3))
        .handle("slow", move |_| {
            let (n, p) = (n.clone(), p.clone());
            async move {
                let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok(None)
            }
        })
        .spawn()
        .await
        .unwrap();
    eventually(&db, "the twelve slow steps completed", |c| {
        let done = steps(c, id)
            .iter()
            .filter(|s| s.status == StepStatus::Completed)
            .count();
        (done == 12).then_some(())
    })
    .await;
    let report = worker.shutdown().await.unwrap();
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "never more than 3 at once, and 3 used"
    );
    assert_eq!(report.completed, 12);
    let other = steps(&mut conn, id)
        .into_iter()
        .find(|s| s.node_id == "other")
        .unwrap();
    assert_eq!(
        other.status,
        StepStatus::Pending,
        "no handler for email: left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_failure_fails_its_own_execution() {
    // One execution per failing kind, so that no failure skips another.
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf_p = typed_workflow(&mut conn, &[("p", "panics", 0)], &[]);
    let wf_t = typed_workflow(&mut conn, &[("t", "hangs", 0)], &[]);
    let wf_e = typed_workflow(&mut conn, &[("e", "errs", 2)], &[]);
    let (p, t, e) = (
        start(&mut conn, &wf_p),
        start(&mut conn, &wf_t),
        start(&mut conn, &wf_e),
    );
    let fast = RetryPolicy {
        backoff: Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(50),
        },
        jitter: 0.5,
        timeout: Some(Duration::from_millis(100)),
    };
    let worker = Worker::new(pool(&db), options(4))
        .handle("panics", |_| async { panic!("handler bug") })
        .handle_with("hangs", fast, |s| async move {
            s.cancelled().await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(None)
        })
        .handle_with("errs", fast, |s| async move {
            Err(format!("refused on attempt {}", s.attempt()).into())
        })
        .spawn()
        .await
        .unwrap();
    for id in [p, t, e] {
        eventually(&db, "failed", |c| {
            (status(c, id) == ExecutionStatus::Failed).then_some(())
        })
        .await;
    }
    let report = worker.shutdown().await.unwrap();
    assert_eq!(report.failed, 5, "1 panic + 1 timeout + 3 attempts of e");
    let p = &steps(&mut conn, p)[0];
    assert_eq!(
        p.error.as_deref(),
        Some("the handler panicked: handler bug")
    );
    let t = &steps(&mut conn, t)[0];
    assert_eq!(t.error.as_deref(), Some("timed out after 100ms"));
    let e = &steps(&mut conn, e)[0];
    assert_eq!((e.retry_count, e.attempt), (2, 3));
    assert_eq!(e.error.as_deref(), Some("refused on attempt 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_cancels_the_handler_and_drops_its_result() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(&mut conn, &[("a", "long", 3)], &[]);
    let id = start(&mut conn, &wf);
    let cancelled = Arc::new(AtomicUsize::new(0));
    let seen = cancelled.clone();
    let worker = Worker::new(pool(&db), options(1))
        .handle("long", move |s| {
            let seen = seen.clone();
            async move {
                if s.attempt() == 1 {
                    s.cancelled().await;
                    seen.fetch_add(1, Ordering::SeqCst);
                    return Ok(Some(json!("stale result")));
                }
                Ok(Some(json!("fresh result")))
            }
        })
        .spawn()
        .await
        .unwrap();
    eventually(&db, "the step runs", |c| {
        (steps(c, id)[0].status == StepStatus::Running).then_some(())
    })
    .await;
    // Another party takes the step away: its lease expires and is reclaimed.
    conn.batch_execute(&format!(
        "UPDATE execution_steps SET locked_until = now() - interval '1 second' WHERE execution_id = '{id}'"
    ))
    .unwrap();
    assert_eq!(engine::reclaim_expired(&mut conn, 10).unwrap().len(), 1);
    eventually(&db, "the step completed by its next attempt", |c| {
        (status(c, id) == ExecutionStatus::Completed).then_some(())
    })
    .await;
    let report = worker.shutdown().await.unwrap();
    assert_eq!(
        cancelled.load(Ordering::SeqCst),
        1,
        "the first run was told"
    );
    assert_eq!(report.lost, 1);
    let s = &steps(&mut conn, id)[0];
    assert_eq!(s.output, Some(json!("fresh result")));
    assert_eq!(s.attempt, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_handlers_finish_then_releases_the_rest() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(
        &mut conn,
        &[("quick", "quick", 0), ("stuck", "stuck", 2)],
        &[],
    );
    let id = start(&mut conn, &wf);
    let mut o = options(2);
    o.shutdown_timeout = Duration::from_millis(500);
    let worker = Worker::new(pool(&db), o)
        .handle("quick", |_| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(Some(json!("finished during shutdown")))
        })
        .handle("stuck", |_| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(None)
        })
        .spawn()
        .await
        .unwrap();
    eventually(&db, "both steps run", |c| {
        steps(c, id)
            .iter()
            .all(|s| s.status == StepStatus::Running)
            .then_some(())
    })
    .await;
    let stopping = Instant::now();
    let report = worker.shutdown().await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "bounded by shutdown_timeout"
    );
    assert_eq!((report.completed, report.released), (1, 1));
    let s = steps(&mut conn, id);
    assert_eq!(s[0].status, StepStatus::Completed);
    assert_eq!(s[0].output, Some(json!("finished during shutdown")));
    assert_eq!(s[1].status, StepStatus::Pending, "released");
    assert_eq!(s[1].retry_count, 0, "a release spends no retry");
    assert!(s[1].locked_by.is_none());
    // Claimable at once by another worker.
    let again = engine::claim_steps(&mut conn, "next", 10, Duration::from_secs(5)).unwrap();
    assert_eq!(again.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_wake_an_idle_worker_and_retries_wake_it_on_time() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(&mut conn, &[("a", "flaky", 1)], &[]);
    let mut o = options(2);
    o.poll_interval = Duration::from_secs(3600); // only notifications and retry times wake it
    let worker = Worker::new(pool(&db), o)
        .notifications(db.url())
        .handle_with(
            "flaky",
            RetryPolicy {
                backoff: Backoff {
                    base: Duration::from_millis(300),
                    max: Duration::from_millis(300),
                },
                jitter: 0.0,
                timeout: None,
            },
            |s| async move {
                if s.attempt() == 1 {
                    return Err("first attempt fails".into());
                }
                Ok(Some(json!(s.attempt())))
            },
        )
        .spawn()
        .await
        .unwrap();
    // Idle now (its first look found nothing); a start must wake it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = start(&mut conn, &wf);
    eventually(&db, "completed by the retry", |c| {
        (status(c, id) == ExecutionStatus::Completed).then_some(())
    })
    .await;
    assert!(worker.health().listening);
    let report = worker.shutdown().await.unwrap();
    assert_eq!((report.completed, report.failed), (1, 1));
    let events: i64 = execution_events::table
        .filter(execution_events::execution_id.eq(id))
        .filter(execution_events::to_status.eq("running"))
        .filter(execution_events::step_id.is_not_null())
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(events, 2, "two runs");
}

#[tokio::test]
async fn invalid_options_and_a_worker_without_handlers_are_refused() {
    let db = TestDatabase::new();
    let mut o = options(0);
    let err = Worker::new(pool(&db), o.clone())
        .handle("x", |_| async { Ok(None) })
        .spawn()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidOption {
                option: "WorkerOptions::concurrency",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "invalid WorkerOptions::concurrency: 0 is not in 1..=1000"
    );
    o.concurrency = 2;
    o.heartbeat_interval = Some(o.lease);
    let err = Worker::new(pool(&db), o.clone())
        .handle("x", |_| async { Ok(None) })
        .spawn()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("below the lease"), "{err}");
    // A short lease alone is fine: the heartbeat defaults to a third of it.
    o.heartbeat_interval = None;
    o.lease = Duration::from_millis(600);
    let ok = Worker::new(pool(&db), o.clone())
        .handle("x", |_| async { Ok(None) })
        .spawn()
        .await
        .unwrap();
    ok.shutdown().await.unwrap();
    let err = Worker::new(pool(&db), options(1))
        .spawn()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid Worker::handle: the worker has no handler"
    );
    // The engine's own node types and queues run without a worker.
    let err = Worker::new(pool(&db), options(1))
        .handle(workflow_db::engine::TIMER_NODE_TYPE, |_| async { Ok(None) })
        .spawn()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("\"workflow_db.timer\" is the engine's own"),
        "{err}"
    );
    let mut o = options(1);
    o.queues = vec!["q".into(), workflow_db::engine::SIGNAL_NODE_TYPE.into()];
    let err = Worker::new(pool(&db), o)
        .handle("x", |_| async { Ok(None) })
        .spawn()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid WorkerOptions::queues: \"workflow_db.signal\" is one of the engine's own queues"),
        "{err}"
    );
    // A listener that cannot connect: refused at start, nothing running.
    let nowhere = workflow_db::DatabaseUrl::parse("postgres://postgres@127.0.0.1:1/none").unwrap();
    let err = Worker::new(pool(&db), options(1))
        .notifications(&nowhere)
        .handle("x", |_| async { Ok(None) })
        .spawn()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err}");
}

#[test]
fn worker_ids_are_unique_and_name_host_and_process() {
    let a = worker_id();
    let b = worker_id();
    let pid = std::process::id().to_string();
    assert!(a.contains(&format!("-{pid}-")), "{a}");
    let ids: std::collections::HashSet<String> = (0..200).map(|_| worker_id()).collect();
    assert!(
        ids.len() > 150,
        "random suffixes: {} distinct of 200",
        ids.len()
    );
    drop(b);
}

/// A step reclaimed and claimed again by the same worker while its first
/// run is still going: the first run's late result must not complete the
/// step under the second run's lease (runs are told apart by attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_of_an_earlier_attempt_never_completes_the_step() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = typed_workflow(&mut conn, &[("a", "slow", 3)], &[]);
    let id = start(&mut conn, &wf);
    let gates: Arc<[tokio::sync::Notify; 2]> =
        Arc::new([tokio::sync::Notify::new(), tokio::sync::Notify::new()]);
    let g = Arc::clone(&gates);
    let mut o = options(2);
    o.heartbeat_interval = Some(Duration::from_secs(4)); // no heartbeat finds the loss first
    let worker = Worker::new(pool(&db), o)
        .handle("slow", move |s| {
            let g = Arc::clone(&g);
            async move {
                let n = s.attempt();
                g[(n - 1) as usize].notified().await; // ignores its token on purpose
                Ok(Some(json!(format!("result of attempt {n}"))))
            }
        })
        .spawn()
        .await
        .unwrap();
    eventually(&db, "attempt 1 runs", |c| {
        let s = &steps(c, id)[0];
        (s.status == StepStatus::Running && s.attempt == 1).then_some(())
    })
    .await;
    conn.batch_execute(&format!(
        "UPDATE execution_steps SET locked_until = now() - interval '1 second' WHERE execution_id = '{id}'"
    ))
    .unwrap();
    assert_eq!(engine::reclaim_expired(&mut conn, 10).unwrap().len(), 1);
    eventually(&db, "attempt 2 runs on the same worker", |c| {
        let s = &steps(c, id)[0];
        (s.status == StepStatus::Running && s.attempt == 2).then_some(())
    })
    .await;
    assert_eq!(worker.health().in_flight, 2, "two runs, two slots");
    gates[0].notify_one(); // attempt 1 finishes late
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = &steps(&mut conn, id)[0];
    assert_eq!((s.status, s.attempt), (StepStatus::Running, 2), "{s:?}");
    gates[1].notify_one();
    eventually(&db, "completed by attempt 2", |c| {
        (status(c, id) == ExecutionStatus::Completed).then_some(())
    })
    .await;
    let report = worker.shutdown().await.unwrap();
    assert_eq!(
        steps(&mut conn, id)[0].output,
        Some(json!("result of attempt 2"))
    );
    assert_eq!((report.completed, report.lost), (1, 1));
}

/// A report that waits (another session holds its execution's row) must
/// not delay the heartbeats of other running steps: they run on their own
/// task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_report_does_not_starve_the_heartbeats() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let quick = typed_workflow(&mut conn, &[("q", "quick", 0)], &[]);
    let long = typed_workflow(&mut conn, &[("l", "long", 0)], &[]);
    let (e1, e2) = (start(&mut conn, &quick), start(&mut conn, &long));
    // Another session holds e1's row as the engine's own writers do (a
    // pause, a cancel): completing q waits for it; claims do not.
    let mut holder = db.connect();
    holder.batch_execute("BEGIN").unwrap();
    holder
        .batch_execute(&format!(
            "SELECT 1 FROM executions WHERE id = '{e1}' FOR NO KEY UPDATE"
        ))
        .unwrap();
    let mut o = options(2);
    o.lease = Duration::from_millis(1000);
    o.heartbeat_interval = Some(Duration::from_millis(250));
    let worker = Worker::new(pool(&db), o)
        .handle("quick", |_| async { Ok(None) })
        .handle("long", |s| async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(2500)) => Ok(Some(json!("done"))),
                () = s.cancelled() => Err("cancelled: lease lost".into()),
            }
        })
        .spawn()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    holder.batch_execute("COMMIT").unwrap();
    for id in [e1, e2] {
        eventually(&db, "both completed", |c| {
            (status(c, id) == ExecutionStatus::Completed).then_some(())
        })
        .await;
    }
    let report = worker.shutdown().await.unwrap();
    assert_eq!(report.lost, 0, "{report:?}");
    let l = &steps(&mut conn, e2)[0];
    assert_eq!((l.attempt, l.reclaims), (1, 0), "{l:?}");
    assert_eq!(l.output, Some(json!("done")));
}
