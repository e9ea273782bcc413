//! The randomized concurrency torture (`workflow_db::torture`), bounded for
//! CI: 4 threads for 40 s by default, then a drain and the invariant check;
//! flow control (priorities, queues, concurrency keys, delayed starts, dedup
//! keys) and timers and signals (a maintenance leader firing due waits, a
//! signal sender, the checks of every wait step at the end) are in its mix.
//! `TORTURE_SEED` replays a run's choices, `TORTURE_SECONDS` and
//! `TORTURE_THREADS` change its size; for long runs use the example:
//! `cargo run --release --example torture --features test-utils -- --seconds 600 --seed 42`.

use workflow_db::testing::TestDatabase;
use workflow_db::torture::{self, TortureConfig};

#[test]
fn torture() {
    let config = TortureConfig::from_env();
    eprintln!(
        "torture: seed {} ({} threads, {} s); replay with TORTURE_SEED={}",
        config.seed,
        config.threads,
        config.duration.as_secs(),
        config.seed
    );
    let db = TestDatabase::new();
    let report = torture::run(db.url(), &config).unwrap();
    eprintln!("{report}");
    assert!(
        report.passed(),
        "the torture failed; replay with TORTURE_SEED={}\n{report}",
        config.seed
    );
    // It did something: executions ran to the end, some were refused along the way.
    let finished: i64 = report.statuses.values().sum();
    assert!(finished > 0, "{report}");
    // Flow control was in the mix: claims by queue, delayed starts started.
    for op in ["claim", "claim_from", "start_due", "queue_pause"] {
        assert!(
            report.ops.get(op).copied().unwrap_or(0) > 0,
            "{op}: {report}"
        );
    }
    // Timers and signals were: timers fired, signals delivered at once and
    // later, refused, timed out, and the end-of-run checks looked at each
    // kind of wait step (a run of normal length; a short one may miss some).
    if config.duration >= NORMAL_LENGTH {
        let missing = report.waits.missing();
        assert!(
            missing.is_empty(),
            "waits not exercised: {}\n{report}",
            missing.join(", ")
        );
    }
}

/// A run at least this long must show every kind of wait activity.
const NORMAL_LENGTH: std::time::Duration = std::time::Duration::from_secs(20);

/// Flow control under races the torture met, made deterministic (a third
/// session holding a row, or a sleep in the test database's copy of a
/// function, fixes the interleaving). Two were deadlocks the torture found
/// in the first lock order of migration 000025 (claims waited for `queues`
/// rows that reports in open transactions held; `rebalance_concurrency_keys`
/// took the keys out of key order); each asserts what the engine promises
/// now: no deadlock.
mod flow_control_lock_order {
    use std::thread;
    use std::time::Duration;

    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use serde_json::json;
    use workflow_db::engine;
    use workflow_db::testing::TestDatabase;
    use workflow_db::{NewExecution, NewWorkflow, Node, WorkflowGraph};

    const LONG: Duration = Duration::from_secs(60);

    fn one_node(conn: &mut PgConnection, name: &str, config: serde_json::Value) -> uuid::Uuid {
        let graph = WorkflowGraph {
            nodes: vec![Node::new("a", "task").config(config)],
            edges: vec![],
        };
        NewWorkflow::from_graph(name, &graph)
            .create(conn)
            .unwrap()
            .id
    }

    fn start(conn: &mut PgConnection, workflow: uuid::Uuid, key: Option<&str>) {
        let mut new = NewExecution::new(workflow);
        if let Some(key) = key {
            new = new.concurrency_key(key);
        }
        engine::start_execution(conn, &new).unwrap();
    }

    fn connect(db: &TestDatabase) -> PgConnection {
        PgConnection::establish(db.url().expose()).unwrap()
    }

    /// Two single statements: the maintenance loop's
    /// `rebalance_concurrency_keys` locks the keys one call at a time in
    /// the order it scans `concurrency_limits` (not by key), while
    /// `complete_steps` over steps of two keys locks them in key order.
    /// A third session holding `ka` for a moment forces the interleaving:
    /// the batch waits for `ka`, the rebalance takes `kb` and queues for
    /// `ka`; when `ka` is free the batch takes it and waits for `kb`.
    #[test]
    fn rebalance_and_a_batch_completion_over_two_keys() {
        let db = TestDatabase::new();
        let mut conn = db.connect();
        let wf = one_node(&mut conn, "one", json!({}));
        engine::set_concurrency_limit(&mut conn, "ka", 1).unwrap();
        engine::set_concurrency_limit(&mut conn, "kb", 1).unwrap();
        for key in ["ka", "ka", "kb", "kb"] {
            start(&mut conn, wf, Some(key));
        }
        let running = engine::claim_steps(&mut conn, "w", 10, LONG).unwrap();
        assert_eq!(running.len(), 2, "one per key, the others throttled");
        // A new version of ka's row, after kb's: the rebalance scans kb first.
        engine::set_concurrency_limit(&mut conn, "ka", 1).unwrap();
        let mut holder = connect(&db);
        holder
            .batch_execute(
                "BEGIN; SELECT 1 FROM concurrency_limits WHERE key = 'ka' FOR NO KEY UPDATE",
            )
            .unwrap();
        let items: Vec<_> = running.iter().map(|s| (s.lease().unwrap(), None)).collect();
        let mut c1 = connect(&db);
        let batch = thread::spawn(move || engine::complete_steps(&mut c1, &items).map(|d| d.len()));
        thread::sleep(Duration::from_millis(300));
        let mut c2 = connect(&db);
        let rebalance = thread::spawn(move || engine::rebalance_concurrency_keys(&mut c2));
        thread::sleep(Duration::from_millis(300));
        holder.batch_execute("COMMIT").unwrap();
        let (batch, rebalance) = (batch.join().unwrap(), rebalance.join().unwrap());
        assert!(
            batch.is_ok() && rebalance.is_ok(),
            "batch: {batch:?}\nrebalance: {rebalance:?}"
        );
    }

    /// Admission under a racing claim: `workflow_db_rebalance_keys` counts
    /// the key's running steps and its admitted steps in two statements
    /// (two snapshots) under the key's row lock, which claims do not take;
    /// a claim committing between the two counts (admitted -> running) is
    /// counted in neither, so the room is one too large. The statement
    /// that admits the steps re-runs the rebalance (its own trigger, with
    /// the admitted steps as `own`), which throttles the excess again: the
    /// key ends within its limit. (The torture's sampler once saw `key k1:
    /// 2 running + 3 admitted > max_running 4` on 71cacdf, whose re-check
    /// was different; a second claim racing the re-check's own two counts
    /// is not covered here.) To make the interleaving certain, the test
    /// database's copy of the function sleeps after the count of running
    /// steps (the function is otherwise unchanged).
    #[test]
    fn a_claim_between_the_two_counts_of_a_rebalance_does_not_over_admit() {
        let db = TestDatabase::new();
        let mut conn = db.connect();
        let wf = one_node(&mut conn, "one", json!({}));
        engine::set_concurrency_limit(&mut conn, "k", 2).unwrap();
        for _ in 0..4 {
            start(&mut conn, wf, Some("k"));
        }
        // 1 running, 1 admitted, 2 throttled.
        let first = engine::claim_steps(&mut conn, "w", 1, LONG).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(held(&mut conn), 2);
        #[derive(QueryableByName)]
        struct Def {
            #[diesel(sql_type = diesel::sql_types::Text)]
            def: String,
        }
        let def = diesel::sql_query(
            "SELECT pg_get_functiondef('workflow_db_rebalance_keys(text[], uuid[], text[])'::regprocedure) AS def",
        )
        .get_result::<Def>(&mut conn)
        .unwrap()
        .def;
        // Sleep right after the count of running steps.
        let at = def
            .find("INTO running_n")
            .expect("the count of running steps");
        let at = at + def[at..].find(';').unwrap() + 1;
        let slow = format!(
            "{}\n        PERFORM pg_sleep(0.5);{}",
            &def[..at],
            &def[at..]
        );
        conn.batch_execute(&slow).unwrap();

        // The completion frees a slot; its rebalance counts 0 running, then
        // sleeps; meanwhile the admitted step is claimed; then it counts 0
        // admitted, and admits both throttled steps.
        let lease = first[0].lease().unwrap();
        let mut c1 = connect(&db);
        let complete =
            thread::spawn(move || engine::complete_step(&mut c1, &lease, None).map(drop));
        thread::sleep(Duration::from_millis(200));
        assert_eq!(
            engine::claim_steps(&mut conn, "w", 1, LONG).unwrap().len(),
            1
        );
        complete.join().unwrap().unwrap();
        let n = held(&mut conn);
        assert!(n <= 2, "key k holds {n} steps running or admitted, limit 2");
    }

    /// The key's running and admitted steps, in one statement.
    fn held(conn: &mut PgConnection) -> i64 {
        #[derive(QueryableByName)]
        struct Held {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query(
            "SELECT count(*) AS n FROM execution_steps s WHERE s.concurrency_key = 'k' \
             AND (s.status = 'running' OR (s.status = 'pending' AND s.upstream_pending = 0 \
                  AND NOT s.parked AND NOT s.throttled))",
        )
        .get_result::<Held>(conn)
        .unwrap()
        .n
    }

    /// A transaction that reclaims (locking the key of the reclaimed step)
    /// and then claims (locking the queue rows of the ready queues, waiting
    /// for them) against a completion of a step of that key in a limited
    /// queue (queue row first, then the key): the torture's
    /// `tx_reclaim_claim`, which follows the engine's documented lock order.
    /// The same holds for any transaction that ends an attempt and then
    /// claims, or ends attempts of one execution in two statements whose
    /// steps are in different configured queues (`tx_fail_and_complete`).
    #[test]
    fn reclaim_then_claim_in_one_transaction_against_a_completion() {
        let db = TestDatabase::new();
        let mut conn = db.connect();
        let on_task = one_node(&mut conn, "task", json!({}));
        let on_qa = one_node(&mut conn, "qa", json!({"queue": "qa"}));
        engine::set_queue_limit(&mut conn, "qa", Some(10)).unwrap();
        engine::set_concurrency_limit(&mut conn, "ka", 5).unwrap();
        // s1 (queue task, key ka): claimed under a lease that expires.
        start(&mut conn, on_task, Some("ka"));
        assert_eq!(
            engine::claim_steps(&mut conn, "crashed", 1, Duration::from_millis(1))
                .unwrap()
                .len(),
            1
        );
        // s2 (queue qa, key ka): running under w.
        start(&mut conn, on_qa, Some("ka"));
        let s2 = engine::claim_steps(&mut conn, "w", 1, LONG).unwrap();
        assert_eq!(s2.len(), 1);
        // s3 (queue qa, no key): ready, so a claim locks qa's row.
        start(&mut conn, on_qa, None);
        thread::sleep(Duration::from_millis(20));

        let mut c1 = connect(&db);
        let lease = s2[0].lease().unwrap();
        let tx = conn.transaction(|c| {
            assert_eq!(engine::reclaim_expired(c, 10)?.len(), 1);
            let complete =
                thread::spawn(move || engine::complete_step(&mut c1, &lease, None).map(drop));
            thread::sleep(Duration::from_millis(300));
            let claimed = engine::claim_steps(c, "w", 10, LONG);
            Ok::<_, diesel::result::Error>((complete, claimed))
        });
        let (complete, claimed) = match tx {
            Ok((complete, claimed)) => (complete.join().unwrap(), claimed.map(|c| c.len())),
            Err(e) => panic!("the reclaim-then-claim transaction: {e}"),
        };
        assert!(
            complete.is_ok() && claimed.is_ok(),
            "complete: {complete:?}\nclaim: {claimed:?}"
        );
    }
}
