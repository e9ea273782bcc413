//! How an execution settles when many of its steps change at once (the
//! set-based triggers): CANCEL (`engine::cancel`, and a step failing for
//! good with `engine::fail_step`, in one running execution of 1,000 and of
//! 10,000 pending steps, both as independent nodes and as a chain), FANIN (1,000
//! parallel nodes feeding one join node, drained by 4 workers) and DRAIN (one
//! execution of 10,000 independent steps drained by 4 workers, so that every
//! batch settles the same execution).
//!
//! Every workflow here is created once per bench database (`settle-*`, nodes
//! with `config.max_retries = 0`) and started with `engine::start_execution`,
//! so its steps carry the engine's dependency counters.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;
use workflow_db::schema::{executions, workflows};
use workflow_db::{
    Backoff, Edge, ExecutionStatus, NewExecution, NewWorkflow, Node, StepStatus, WorkflowGraph,
    engine,
};

use crate::Res;
use crate::claim::{LEASE, complete_batch, take_deadlock_retries, workers_label};
use crate::data::{Rng, now_nanos};
use crate::db::{Bench, connect, count_on};
use crate::report::Better;

/// Workers of the FANIN and DRAIN figures.
const WORKERS: usize = 4;
/// Upper bound of the target for cancel / fail-for-good at 10k steps.
const TARGET_10K_SECS: f64 = 0.5;

/// The graph of a `settle-*` workflow.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// `n` nodes without edges: every step is claimable at once.
    Independent(usize),
    /// `n` nodes `node-0 -> node-1 -> ..`: one claimable step, the others
    /// waiting for their upstream.
    Chain(usize),
    /// `n` parallel nodes, each feeding the node `join` (n + 1 steps).
    FanIn(usize),
}

impl Shape {
    fn steps(self) -> usize {
        match self {
            Shape::Independent(n) | Shape::Chain(n) => n,
            Shape::FanIn(n) => n + 1,
        }
    }

    fn workflow_name(self) -> String {
        match self {
            Shape::Independent(n) => format!("settle-independent-{n}"),
            Shape::Chain(n) => format!("settle-chain-{n}"),
            Shape::FanIn(n) => format!("settle-fanin-{n}"),
        }
    }

    /// How figure names describe the shape.
    fn label(self) -> &'static str {
        match self {
            Shape::Independent(_) => "independent nodes",
            Shape::Chain(_) => "a chain",
            Shape::FanIn(_) => "fan-in",
        }
    }

    fn graph(self) -> WorkflowGraph {
        let node = |id: String| Node::new(id, "task").config(json!({"max_retries": 0}));
        let (nodes, edges) = match self {
            Shape::Independent(n) => ((0..n).map(|k| node(format!("node-{k}"))).collect(), vec![]),
            Shape::Chain(n) => (
                (0..n).map(|k| node(format!("node-{k}"))).collect(),
                (1..n)
                    .map(|k| Edge::new(format!("node-{}", k - 1), format!("node-{k}")))
                    .collect(),
            ),
            Shape::FanIn(n) => (
                (0..n)
                    .map(|k| node(format!("node-{k}")))
                    .chain([node("join".into())])
                    .collect(),
                (0..n)
                    .map(|k| Edge::new(format!("node-{k}"), "join"))
                    .collect(),
            ),
        };
        WorkflowGraph { nodes, edges }
    }
}

/// `1k`, `10k`: a step count in a figure's name.
fn count_label(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn cancel_name(shape: Shape) -> String {
    format!(
        "CANCEL engine::cancel, 1 running execution of {} pending steps ({})",
        count_label(shape.steps()),
        shape.label()
    )
}

fn fail_name(shape: Shape) -> String {
    format!(
        "CANCEL fail for good (engine::fail_step, max_retries 0), 1 execution of {} steps ({}; fails it, skips {})",
        count_label(shape.steps()),
        shape.label(),
        shape.steps() - 1
    )
}

fn status_of(conn: &mut PgConnection, id: Uuid) -> Res<ExecutionStatus> {
    Ok(executions::table
        .find(id)
        .select(executions::status)
        .first(conn)?)
}

/// Steps of execution `id` in `status`.
fn steps_in(conn: &mut PgConnection, id: Uuid, status: StepStatus) -> Res<i64> {
    count_on(
        conn,
        &format!(
            "execution_steps WHERE execution_id = '{id}' AND status = '{}'",
            status.as_str()
        ),
    )
}

impl Bench {
    /// The id of the `settle-*` workflow of `shape`, created on first use.
    fn settle_workflow(&self, conn: &mut PgConnection, shape: Shape) -> Res<Uuid> {
        let name = shape.workflow_name();
        let found = workflows::table
            .filter(workflows::name.eq(&name))
            .select(workflows::id)
            .first::<Uuid>(conn)
            .optional()?;
        match found {
            Some(id) => Ok(id),
            None => Ok(NewWorkflow::from_graph(name, &shape.graph())
                .description("Benchmark workflow of the settle figures")
                .create(conn)?
                .id),
        }
    }

    /// Starts an execution of `shape` with the engine (running, its steps
    /// pending) and returns its id.
    fn start_settle(&self, conn: &mut PgConnection, shape: Shape) -> Res<Uuid> {
        let workflow = self.settle_workflow(conn, shape)?;
        let started =
            engine::start_execution(conn, &NewExecution::new(workflow).user_id("settle"))?;
        let e = started.execution;
        if e.status != ExecutionStatus::Running {
            return Err(format!(
                "a {} execution started {:?}",
                shape.workflow_name(),
                e.status
            )
            .into());
        }
        Ok(e.id)
    }

    /// CANCEL: `engine::cancel` of one running execution with 1,000 and
    /// 10,000 pending steps, and a step of such an execution failing for good
    /// (`engine::fail_step` with no retries left, which fails the execution
    /// and skips the other steps); both as independent nodes and as a chain.
    /// Only the cancel / fail call is timed (autocommit, so its commit
    /// included), on one connection warmed up on a 10-step execution of the
    /// same shape first (trigger plans cached, as in a pooled engine).
    pub fn cancel_group(&mut self, rep: usize) -> Res<()> {
        eprintln!("CANCEL cancel and fail-for-good (rep {rep})");
        self.reset_runs()?;
        let mut conn = self.conn()?;
        // Warm-up shape first, then 1k and 10k, per shape.
        let cases: Vec<(Shape, bool)> = [Shape::Independent as fn(usize) -> Shape, Shape::Chain]
            .into_iter()
            .flat_map(|shape| {
                [
                    (shape(10), true),
                    (shape(1000), false),
                    (shape(10_000), false),
                ]
            })
            .collect();
        // The executions to fail are started first and in the order they are
        // failed: claims go by (run_after, id), and run_after is the start's
        // transaction time, so `claim_steps(1)` returns a step of the oldest
        // execution that still has a claimable one. Failing it skips the
        // rest, so the next claim moves to the next execution. The executions
        // to cancel come last.
        let mut fails = Vec::new();
        for &(shape, warm) in &cases {
            fails.push((shape, warm, self.start_settle(&mut conn, shape)?));
        }
        let mut cancels = Vec::new();
        for &(shape, warm) in &cases {
            cancels.push((shape, warm, self.start_settle(&mut conn, shape)?));
        }
        self.sql("VACUUM ANALYZE executions, execution_steps")?;

        let worker = "settle-fail";
        for (shape, warm, id) in fails {
            let claimed = engine::claim_steps(&mut conn, worker, 1, LEASE)?;
            let step = match claimed.as_slice() {
                [s] if s.execution_id == id => s.clone(),
                [s] => {
                    return Err(format!(
                        "fail-for-good: the claim returned a step of another execution ({} instead of {id})",
                        s.execution_id
                    )
                    .into());
                }
                _ => return Err("fail-for-good: the claim found no step".into()),
            };
            let t0 = Instant::now();
            let failed = engine::fail_step(
                &mut conn,
                &step
                    .lease()
                    .ok_or("fail-for-good: the claimed step has no lease")?,
                "bench: fails for good",
                &Backoff::default(),
            )?;
            let secs = t0.elapsed().as_secs_f64();
            let (status, skipped) = (
                status_of(&mut conn, id)?,
                steps_in(&mut conn, id, StepStatus::Skipped)?,
            );
            if failed.status != StepStatus::Failed
                || status != ExecutionStatus::Failed
                || skipped as usize != shape.steps() - 1
            {
                return Err(format!(
                    "fail-for-good of a {} execution: step {:?}, execution {status:?}, {skipped} of {} other steps skipped",
                    shape.workflow_name(),
                    failed.status,
                    shape.steps() - 1
                )
                .into());
            }
            if !warm {
                self.report
                    .ours(&fail_name(shape), "s", Better::Lower, secs);
            }
        }
        for (shape, warm, id) in cancels {
            let t0 = Instant::now();
            let cancelled = engine::cancel(&mut conn, id)?;
            let secs = t0.elapsed().as_secs_f64();
            let skipped = steps_in(&mut conn, id, StepStatus::Skipped)?;
            if cancelled.status != ExecutionStatus::Cancelled || skipped as usize != shape.steps() {
                return Err(format!(
                    "cancel of a {} execution: execution {:?}, {skipped} of {} steps skipped",
                    shape.workflow_name(),
                    cancelled.status,
                    shape.steps()
                )
                .into());
            }
            if !warm {
                self.report
                    .ours(&cancel_name(shape), "s", Better::Lower, secs);
            }
        }
        for shape in [Shape::Independent as fn(usize) -> Shape, Shape::Chain] {
            for name in [cancel_name, fail_name] {
                let (big, small) = (name(shape(10_000)), name(shape(1000)));
                self.report.growth(&big, &small, 10.0);
                self.report.target(&big, TARGET_10K_SECS);
            }
        }
        Ok(())
    }

    /// FANIN: one execution of 1,000 parallel nodes feeding one join node,
    /// drained by 4 workers (claim `--batch` steps per statement +
    /// `complete_steps`) until it is completed.
    pub fn fanin(&mut self, rep: usize) -> Res<()> {
        eprintln!("FANIN fan-in 1,000 (rep {rep})");
        let shape = Shape::FanIn(1000);
        for batch in self.args.batches.clone() {
            let secs = self.drain(shape, batch)?;
            let name = format!(
                "FANIN 1 execution, 1,000 parallel nodes -> 1 join node, {}, claim_steps {batch} + complete_steps {batch}",
                workers_label(WORKERS)
            );
            let steps = shape.steps() as f64;
            self.report.ours(
                &format!("{name}: throughput"),
                "steps/s",
                Better::Higher,
                steps / secs,
            );
            self.report
                .ours(&format!("{name}: drain time"), "s", Better::Lower, secs);
            take_deadlock_retries(self, &name);
        }
        Ok(())
    }

    /// DRAIN: one execution of 10,000 independent steps drained by 4
    /// workers (claim `--batch` + `complete_steps`): every batch settles the
    /// same execution, so the workers meet on its row.
    pub fn drain_one(&mut self, rep: usize) -> Res<()> {
        eprintln!("DRAIN one 10,000-step execution (rep {rep})");
        let shape = Shape::Independent(10_000);
        for batch in self.args.batches.clone() {
            let secs = self.drain(shape, batch)?;
            let name = format!(
                "DRAIN 1 execution of 10k independent steps, {}, claim_steps {batch} + complete_steps {batch}",
                workers_label(WORKERS)
            );
            self.report.ours(
                &name,
                "steps/s",
                Better::Higher,
                shape.steps() as f64 / secs,
            );
            take_deadlock_retries(self, &name);
        }
        Ok(())
    }

    /// Starts one execution of `shape` (on an emptied database, then
    /// `VACUUM ANALYZE`, not timed) and lets [`WORKERS`] workers claim
    /// `batch` steps per statement and complete them until it is final;
    /// returns the seconds from the workers' start (connected) until the
    /// last one saw the execution final. Checks it ended completed with
    /// every step completed.
    fn drain(&mut self, shape: Shape, batch: i64) -> Res<f64> {
        self.reset_runs()?;
        let id = {
            let mut conn = self.conn()?;
            self.start_settle(&mut conn, shape)?
        };
        self.sql("VACUUM ANALYZE executions, execution_steps")?;
        let barrier = Barrier::new(WORKERS + 1);
        let secs = std::thread::scope(|s| -> Res<f64> {
            let handles: Vec<_> = (0..WORKERS)
                .map(|c| {
                    let (url, barrier) = (&self.url, &barrier);
                    s.spawn(move || -> Res<()> {
                        let conn = connect(url);
                        barrier.wait();
                        let mut conn = conn?;
                        let worker = format!("settle-{c}");
                        let mut rng = Rng(now_nanos() ^ c as u64);
                        loop {
                            if complete_batch(&mut conn, &worker, batch, &mut rng)? > 0 {
                                continue;
                            }
                            match status_of(&mut conn, id)? {
                                ExecutionStatus::Pending
                                | ExecutionStatus::Running
                                | ExecutionStatus::Paused => {
                                    std::thread::sleep(Duration::from_micros(100))
                                }
                                _ => return Ok(()),
                            }
                        }
                    })
                })
                .collect();
            barrier.wait();
            let t0 = Instant::now();
            for h in handles {
                h.join().map_err(|_| "worker panicked")??;
            }
            Ok(t0.elapsed().as_secs_f64())
        })?;
        let mut conn = self.conn()?;
        let (status, done) = (
            status_of(&mut conn, id)?,
            steps_in(&mut conn, id, StepStatus::Completed)?,
        );
        if status != ExecutionStatus::Completed || done as usize != shape.steps() {
            return Err(format!(
                "the {} execution ended {status:?} with {done} of {} steps completed",
                shape.workflow_name(),
                shape.steps()
            )
            .into());
        }
        Ok(secs)
    }
}
