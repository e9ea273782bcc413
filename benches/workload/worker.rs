//! WORKER: W2 and W6 through the runtime's [`Worker`] (feature `runtime`),
//! each figure paired with the sync figure it mirrors, so the report prints
//! worker/sync (run `--only W2,W6,WORKER`).
//!
//! Every step of the benchmark's data is of node type [`NODE_TYPE`]: the
//! seeded workflows' ten nodes are all `"type": "task"`, and
//! `execution_steps.node_type` is copied from the graph at insert (by the
//! insert trigger for W2's plain `INSERT`, by `engine::start_execution` for
//! W6). The workers have one handler, for that type, that does nothing but
//! return the output JSON the sync figures write.
//!
//! A sync W2/W6 figure at `w` workers and batch `b` is `w` threads, each
//! with one connection, claiming `b` steps per statement and completing
//! them in one statement. Its worker figure is `w` [`Worker`] instances
//! with `concurrency` `b`, each on its own [`AsyncPool`] of two connections
//! (the worker's loop makes one database call at a time; its heartbeat task
//! gets the second) plus the notifier connection of
//! [`Worker::notifications`]: `w` independent claimers, as in the sync
//! figure, each claiming up to its free slots per statement and completing
//! whatever finished at that moment in one statement. One worker with
//! concurrency `w` would be one claimer, not `w`.
//!
//! Options are the defaults a service gets (lease 30 s, heartbeat every
//! lease / 3, notifications on) except `poll_interval`, [`POLL_INTERVAL`]: with
//! notifications it is only a safety net, and the figure measures the
//! worker, not a 5 s poll.
//!
//! W2 counts the steps completed in the database over `--duration`, after
//! `--warmup`, as two `count(*)` snapshots; W6 times from the workers'
//! spawn (their notifier connections opened inside the timing, as the sync
//! threads open theirs) to the moment no execution is left unfinished. The
//! graceful shutdown after each figure (`WorkerHandle::shutdown`) is not
//! counted: its longest time goes into a note. With `concurrency` above 1
//! the steps per claim and per completion statement are figures of their
//! own, read from the history (`execution_events.txid`: one transaction per
//! statement).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use serde_json::Value;
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use workflow_db::runtime::{AsyncPool, StepContext, Worker, WorkerHandle, WorkerOptions};
use workflow_db::{Config, DatabaseUrl};

use crate::Res;
use crate::claim::{
    any_unfinished, claim_sizes, w2_batched_name, w2_single_name, w6_name, workers_label,
};
use crate::data::{NODES, step_output};
use crate::db::{Bench, count_on};
use crate::report::{Better, fmt};

/// The node type of every step of the benchmark's workflows.
pub const NODE_TYPE: &str = "task";

/// The workers' `poll_interval` (the default is 5 s).
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The steps of W2's queue (`W2_POOL_RUNNING`: 10,000 executions x 10).
const W2_QUEUE: i64 = 100_000;

/// The longest a W6 figure may take before the benchmark gives up.
const W6_LIMIT: Duration = Duration::from_secs(300);

/// The longest graceful shutdown of any worker since the last
/// [`Bench::worker_group`] note, in microseconds.
static SHUTDOWN_MAX_MICROS: AtomicU64 = AtomicU64::new(0);

/// How `workers` workers of `concurrency` slots are described in a name.
fn fleet_label(workers: usize, concurrency: i64) -> String {
    let each = if workers == 1 { "" } else { " each" };
    format!("runtime Worker x{workers}, concurrency {concurrency}{each}, notifications on")
}

/// The W2 figure through `workers` workers of `concurrency` slots.
pub fn worker_w2_name(workers: usize, concurrency: i64) -> String {
    format!(
        "W2 claim+complete, {} ({}, no-op handler)",
        workers_label(workers),
        fleet_label(workers, concurrency)
    )
}

/// The W6 figure through `workers` workers of `concurrency` slots, `n` executions.
pub fn worker_w6_name(workers: usize, concurrency: i64, n: u64) -> String {
    format!(
        "W6 engine loop, {}, {} ({n} executions of the 10-node chain)",
        workers_label(workers),
        fleet_label(workers, concurrency)
    )
}

/// W6's end: counts the runs of the chain's last node (`node-9`) and wakes
/// the benchmark when all `n` executions have run it.
struct LastNode {
    runs: AtomicU64,
    n: u64,
    all: Notify,
}

/// Steps per statement, from the history of the figure's steps.
#[derive(QueryableByName)]
struct Statements {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    claimed: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    claims: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    completed: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    completions: i64,
}

const STATEMENTS: &str = "\
SELECT count(*) FILTER (WHERE to_status = 'running') AS claimed,
       count(DISTINCT txid) FILTER (WHERE to_status = 'running') AS claims,
       count(*) FILTER (WHERE to_status = 'completed') AS completed,
       count(DISTINCT txid) FILTER (WHERE to_status = 'completed') AS completions
  FROM execution_events WHERE step_id IS NOT NULL";

/// `workers` pools of two connections each (the worker's loop, its
/// heartbeat task), built before any timing.
fn pools(rt: &Runtime, url: &DatabaseUrl, workers: usize) -> Res<Vec<AsyncPool>> {
    let mut config = Config::new(url.clone());
    config.pool_size = 2;
    rt.block_on(async move {
        let mut pools = Vec::with_capacity(workers);
        for _ in 0..workers {
            pools.push(AsyncPool::from_config(&config).await?);
        }
        Res::Ok(pools)
    })
}

/// One worker per pool, `concurrency` slots each, with notifications, a
/// handler for [`NODE_TYPE`] that returns the sync figures' output JSON
/// (and counts `node-9` runs into `last` for W6).
fn spawn(
    rt: &Runtime,
    url: &DatabaseUrl,
    pools: Vec<AsyncPool>,
    concurrency: i64,
    last: Option<Arc<LastNode>>,
) -> Res<Vec<WorkerHandle>> {
    let output = Arc::new(step_output(42, 0));
    rt.block_on(async move {
        let mut handles = Vec::with_capacity(pools.len());
        for pool in pools {
            let mut options = WorkerOptions::default();
            options.concurrency = concurrency as usize;
            options.poll_interval = POLL_INTERVAL;
            let (output, last) = (Arc::clone(&output), last.clone());
            let handle = Worker::new(pool, options)
                .notifications(url)
                .handle(NODE_TYPE, move |step: StepContext| {
                    // (No let chain: the crate's rust-version is 1.85.)
                    if let Some(last) = &last {
                        if step.step().node_id == "node-9"
                            && last.runs.fetch_add(1, Ordering::Relaxed) + 1 >= last.n
                        {
                            last.all.notify_one();
                        }
                    }
                    let output = Value::clone(&output);
                    async move { Ok(Some(output)) }
                })
                .spawn()
                .await?;
            handles.push(handle);
        }
        Res::Ok(handles)
    })
}

impl Bench {
    pub fn worker_group(&mut self, rep: usize) -> Res<()> {
        eprintln!("WORKER W2 and W6 through runtime::Worker (rep {rep})");
        let rt = self.runtime()?;
        let batches = self.args.batches.clone();
        for workers in [1usize, 4] {
            for c in claim_sizes(&batches) {
                let name = worker_w2_name(workers, c);
                self.w2_pool_running()?;
                let v = self.worker_w2(&rt, &name, workers, c)?;
                self.report.ours(&name, "steps/s", Better::Higher, v);
                let sync = if c == 1 {
                    w2_single_name(workers)
                } else {
                    w2_batched_name(workers, c)
                };
                self.report.pair(&name, &sync);
            }
        }
        let n = self.args.w6_executions;
        for c in claim_sizes(&batches) {
            for workers in [1usize, 4] {
                let name = worker_w6_name(workers, c, n);
                self.w6_executions(n)?;
                let v = self.worker_w6(&rt, &name, workers, c)?;
                self.report.ours(&name, "steps/s", Better::Higher, v);
                self.report.pair(&name, &w6_name(workers, c, n));
            }
        }
        if rep == self.args.runs {
            let ms = SHUTDOWN_MAX_MICROS.swap(0, Ordering::Relaxed) as f64 / 1000.0;
            self.report.notes.push(format!(
                "WORKER: each figure ends with a graceful WorkerHandle::shutdown of its workers, \
                 not counted in the figure; the longest took {} ms",
                fmt(ms)
            ));
        }
        Ok(())
    }

    /// Steps completed per second by `workers` workers of `concurrency`
    /// slots over W2's queue, after the warm-up.
    fn worker_w2(&mut self, rt: &Runtime, name: &str, workers: usize, c: i64) -> Res<f64> {
        const COMPLETED: &str = "execution_steps WHERE status = 'completed'";
        let pools = pools(rt, &self.url, workers)?;
        let mut conn = self.conn()?;
        let handles = spawn(rt, &self.url, pools, c, None)?;
        std::thread::sleep(Duration::from_secs_f64(self.args.warmup));
        let t0 = Instant::now();
        let before = count_on(&mut conn, COMPLETED)?;
        std::thread::sleep(
            (t0 + Duration::from_secs_f64(self.args.duration))
                .saturating_duration_since(Instant::now()),
        );
        let t1 = Instant::now();
        let after = count_on(&mut conn, COMPLETED)?;
        self.shut_down(rt, name, handles)?;
        if after >= W2_QUEUE {
            self.report.notes.push(format!(
                "{name}: the queue ran dry during the measurement (the figure is low)"
            ));
        }
        self.statements(name, c)?;
        Ok((after - before) as f64 / (t1 - t0).as_secs_f64())
    }

    /// Steps per second of `workers` workers of `concurrency` slots
    /// driving W6's executions to the end.
    fn worker_w6(&mut self, rt: &Runtime, name: &str, workers: usize, c: i64) -> Res<f64> {
        let n = self.args.w6_executions;
        let pools = pools(rt, &self.url, workers)?;
        let mut conn = self.conn()?;
        let last = Arc::new(LastNode {
            runs: AtomicU64::new(0),
            n,
            all: Notify::new(),
        });
        let t0 = Instant::now();
        let handles = spawn(rt, &self.url, pools, c, Some(Arc::clone(&last)))?;
        let waited = rt.block_on(async {
            tokio::time::timeout(W6_LIMIT, async {
                while last.runs.load(Ordering::Relaxed) < n {
                    last.all.notified().await;
                }
            })
            .await
        });
        // The last handlers ran; their completions are a statement away.
        let mut finished = waited.is_ok();
        while finished && any_unfinished(&mut conn)? {
            if t0.elapsed() > W6_LIMIT {
                finished = false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let secs = t0.elapsed().as_secs_f64();
        self.shut_down(rt, name, handles)?;
        let (done, steps) = (
            self.count("executions WHERE status = 'completed'")?,
            self.count("execution_steps WHERE status = 'completed'")?,
        );
        if !finished || done as u64 != n || steps as u64 != n * NODES as u64 {
            return Err(format!(
                "{name}: ended with {done}/{n} executions and {steps} steps completed \
                 ({} node-9 runs)",
                last.runs.load(Ordering::Relaxed)
            )
            .into());
        }
        self.statements(name, c)?;
        Ok((n * NODES as u64) as f64 / secs)
    }

    /// Shuts the workers down gracefully (timed apart, not counted); what
    /// went wrong in them goes into the notes.
    fn shut_down(&mut self, rt: &Runtime, name: &str, handles: Vec<WorkerHandle>) -> Res<()> {
        let mut trouble: Vec<String> = handles
            .iter()
            .filter_map(|h| h.health().last_error)
            .collect();
        let t = Instant::now();
        let reports = rt.block_on(async {
            let stopping: Vec<_> = handles
                .into_iter()
                .map(|h| tokio::spawn(h.shutdown()))
                .collect();
            let mut reports = Vec::with_capacity(stopping.len());
            for s in stopping {
                reports.push(s.await??);
            }
            Res::Ok(reports)
        })?;
        SHUTDOWN_MAX_MICROS.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        for r in &reports {
            if r.failed + r.lost + r.released > 0 {
                trouble.push(format!(
                    "{} failed, {} leases lost, {} released",
                    r.failed, r.lost, r.released
                ));
            }
        }
        if !trouble.is_empty() {
            eprintln!("  {name}: {}", trouble.join("; "));
            self.report
                .notes
                .push(format!("{name}: {}", trouble.join("; ")));
        }
        Ok(())
    }

    /// Records the steps per claim and per completion statement of the
    /// figure just run (from the history; with one slot both are 1).
    fn statements(&mut self, name: &str, concurrency: i64) -> Res<()> {
        if concurrency == 1 {
            return Ok(());
        }
        let s: Statements = diesel::sql_query(STATEMENTS).get_result(&mut self.conn()?)?;
        for (what, steps, statements) in [
            ("claim", s.claimed, s.claims),
            ("complete_steps", s.completed, s.completions),
        ] {
            if statements > 0 {
                self.report.ours(
                    &format!("{name}: steps per {what} statement"),
                    "steps",
                    Better::Higher,
                    steps as f64 / statements as f64,
                );
            }
        }
        Ok(())
    }
}
