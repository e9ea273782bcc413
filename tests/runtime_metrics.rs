//! What the runtime reports through the `metrics` facade, read back from a
//! recording exporter (its own test binary: the recorder is process-wide).
#![cfg(feature = "runtime")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::json;
use workflow_db::runtime::maintenance::{Maintenance, MaintenanceOptions};
use workflow_db::runtime::{AsyncPool, RetryPolicy, Worker, WorkerOptions};
use workflow_db::testing::TestDatabase;
use workflow_db::{Edge, ExecutionStatus, NewExecution, NewWorkflow, Node, WorkflowGraph, engine};

/// Every metric by name and labels (`name{k=v,..}`), summed where it is a
/// counter, last value for gauges, count of samples for histograms.
fn read(snapshotter: &Snapshotter) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let k = key.key();
        let mut labels: Vec<String> = k
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = if labels.is_empty() {
            k.name().to_owned()
        } else {
            format!("{}{{{}}}", k.name(), labels.join(","))
        };
        let v = match value {
            DebugValue::Counter(c) => c as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        };
        out.insert(name, v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_and_maintenance_report_their_work() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let db = TestDatabase::new();
    let mut conn = db.connect();
    let mut failing = Node::new("bad", "flaky");
    failing.config = json!({ "max_retries": 0 });
    let wf = NewWorkflow::from_graph(
        "metrics",
        &WorkflowGraph {
            nodes: vec![Node::new("a", "http"), Node::new("b", "http")],
            edges: vec![Edge::new("a", "b")],
        },
    )
    .create(&mut conn)
    .unwrap();
    let bad = NewWorkflow::from_graph(
        "bad",
        &WorkflowGraph {
            nodes: vec![failing],
            edges: vec![],
        },
    )
    .create(&mut conn)
    .unwrap();
    let ids: Vec<_> = (0..3)
        .map(|_| {
            engine::start_execution(&mut conn, &NewExecution::new(wf.id))
                .unwrap()
                .execution
                .id
        })
        .collect();
    let bad_id = engine::start_execution(&mut conn, &NewExecution::new(bad.id))
        .unwrap()
        .execution
        .id;
    // Waiting work of a type nobody serves: the queue depth shows it.
    let idle = NewWorkflow::from_graph(
        "idle",
        &WorkflowGraph {
            nodes: vec![Node::new("x", "email")],
            edges: vec![],
        },
    )
    .create(&mut conn)
    .unwrap();
    engine::start_execution(&mut conn, &NewExecution::new(idle.id)).unwrap();

    let pool = AsyncPool::new(workflow_db::build_pool(&db.config()).unwrap());
    let mut mo = MaintenanceOptions::default();
    mo.interval = Duration::from_millis(50);
    mo.queue_depth_every = Some(Duration::from_millis(50));
    let maintenance = Maintenance::new(pool.clone(), db.url(), mo)
        .unwrap()
        .spawn();
    let mut wo = WorkerOptions::default();
    wo.poll_interval = Duration::from_millis(100);
    let worker = Worker::new(pool, wo)
        .handle("http", |_| async { Ok(None) })
        .handle_with("flaky", RetryPolicy::default(), |_| async {
            Err("no".into())
        })
        .spawn()
        .await
        .unwrap();

    // (A snapshot resets what it reads: one snapshot, at the end.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = ids.iter().chain([&bad_id]).all(|id| {
            workflow_db::Execution::find(&mut conn, *id)
                .unwrap()
                .status
                .is_final()
        });
        if done && maintenance.is_leader() && maintenance.stats().leader_rounds >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done: {:?}",
            maintenance.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.shutdown().await.unwrap();
    maintenance.shutdown().await.unwrap();
    assert_eq!(
        workflow_db::Execution::find(&mut conn, bad_id)
            .unwrap()
            .status,
        ExecutionStatus::Failed
    );

    let m = read(&snapshotter);
    assert_eq!(
        m.get("workflow_db_steps_claimed_total"),
        Some(&7.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("workflow_db_steps_completed_total{node_type=http}"),
        Some(&6.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("workflow_db_steps_failed_total{node_type=flaky}"),
        Some(&1.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("workflow_db_step_seconds{node_type=http}"),
        Some(&6.0),
        "{m:?}"
    );
    assert!(
        m.get("workflow_db_claim_seconds")
            .is_some_and(|n| *n >= 2.0),
        "{m:?}"
    );
    assert_eq!(m.get("workflow_db_steps_in_flight"), Some(&0.0), "{m:?}");
    assert_eq!(
        m.get("workflow_db_ready_steps{queue=email}"),
        Some(&1.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("workflow_db_maintenance_leader"),
        Some(&0.0),
        "stepped down at shutdown: {m:?}"
    );
}
