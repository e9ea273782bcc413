//! Claiming steps with the engine API: W2 claim+complete (a queue of
//! independent pending steps; with `--limit` also w2.sql and w2_single.sql),
//! W6 engine loop (executions of the 10-node chain driven to the end by
//! workers) and the claim-latency growth with 10k and 1M pending steps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use workflow_db::models::bulk::{self, CopyExecution, CopyStep};
use workflow_db::schema::executions;
use workflow_db::{ExecutionStatus, ExecutionStep, Lease, NewExecution, StepStatus, engine};

use crate::Res;
use crate::data::{
    NODES, Rng, USERS, WORKFLOWS, execution_data, now_nanos, step_output, w5_execution, w5_step,
    workflow_id,
};
use crate::db::{Bench, connect};
use crate::report::{Better, scale_label};

pub const LEASE: Duration = Duration::from_secs(60);

/// `complete_steps` batches retried after a deadlock since the last
/// [`take_deadlock_retries`] (the engine orders its locks so that there
/// should be none).
static DEADLOCK_RETRIES: AtomicU64 = AtomicU64::new(0);

/// The deadlock retries since the last call; a note in the report when
/// there were any during `figure`.
pub fn take_deadlock_retries(b: &mut Bench, figure: &str) {
    let n = DEADLOCK_RETRIES.swap(0, Ordering::Relaxed);
    if n > 0 {
        eprintln!("  {n} complete_steps batch(es) retried after a deadlock");
        b.report.notes.push(format!(
            "{figure}: {n} complete_steps batch(es) retried after a deadlock"
        ));
    }
}

/// The name of the unbatched W2 figure at `workers` workers.
pub fn w2_single_name(workers: usize) -> String {
    format!(
        "W2 claim+complete, {} (engine: claim_steps 1 + complete_step)",
        workers_label(workers)
    )
}

/// The name of the batched W2 figure at `workers` workers and batch size `batch`.
pub fn w2_batched_name(workers: usize, batch: i64) -> String {
    format!(
        "W2 claim+complete, {} (engine: claim_steps {batch} per statement, complete_steps {batch} per statement)",
        workers_label(workers)
    )
}

/// The limit's w2_pool.sql, but with running executions (the engine claims
/// only steps of running executions): 10,000 executions x 10 independent
/// pending steps = 100,000 claimable steps.
const W2_POOL_RUNNING: &[&str] = &[
    "TRUNCATE executions CASCADE",
    "INSERT INTO executions (id, workflow_id, status, user_id, data)
     SELECT md5('pool-' || i)::uuid,
            ('00000000-0000-4000-8000-' || lpad((i % 100)::text, 12, '0'))::uuid,
            'running', 'user-' || ((i / 6) % 100),
            jsonb_build_object('trigger', 'api', 'requestId', 'req-' || i,
              'input', jsonb_build_object('orderId', 'ord-' || i, 'amount', 1234.5, 'currency', 'EUR',
                'customer', jsonb_build_object('id', 'cus-' || i, 'email', 'user' || i || '@example.com')),
              'tags', jsonb_build_array('bench', 'workflow'), 'priority', 3)
     FROM generate_series(0, 9999) i",
    "INSERT INTO execution_steps (execution_id, node_id, status, input)
     SELECT md5('pool-' || (j / 10))::uuid, 'node-' || (j % 10), 'pending',
            jsonb_build_object('nodeId', 'node-' || (j % 10),
              'params', jsonb_build_object('url', 'https://api.example.com/v1/step', 'method', 'POST', 'retries', 3))
     FROM generate_series(0, 99999) j",
    "VACUUM ANALYZE executions, execution_steps",
    "CHECKPOINT",
];

/// The lease a claim returned with `step`.
fn lease_of(step: &ExecutionStep) -> Lease {
    step.lease().expect("a claimed step is leased")
}

/// Claims up to `n` steps in one statement and completes them: one by one
/// (autocommit) when `n` is 1, else in one transaction (sorted by execution;
/// retried on deadlock, counted in [`DEADLOCK_RETRIES`]). Returns how many
/// steps were completed.
pub fn complete_batch(conn: &mut PgConnection, worker: &str, n: i64, rng: &mut Rng) -> Res<u64> {
    let mut steps = engine::claim_steps(conn, worker, n, LEASE)?;
    if steps.is_empty() {
        return Ok(0);
    }
    let output = step_output(rng.below(1_000_000_000), 0);
    if steps.len() == 1 {
        engine::complete_step(conn, &lease_of(&steps[0]), Some(&output))?;
        return Ok(1);
    }
    steps.sort_by_key(|s| (s.execution_id, s.id));
    let batch: Vec<(Lease, Option<serde_json::Value>)> = steps
        .iter()
        .map(|s| (lease_of(s), Some(output.clone())))
        .collect();
    let mut attempt = 0;
    loop {
        let r = engine::complete_steps(conn, &batch).map(|_| ());
        match r {
            Ok(()) => return Ok(steps.len() as u64),
            Err(e) if attempt < 5 && e.to_string().contains("deadlock") => {
                DEADLOCK_RETRIES.fetch_add(1, Ordering::Relaxed);
                attempt += 1
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether an execution is still pending or running.
pub fn any_unfinished(conn: &mut PgConnection) -> Res<bool> {
    Ok(diesel::select(diesel::dsl::exists(executions::table.filter(
        executions::status.eq_any([ExecutionStatus::Pending, ExecutionStatus::Running]),
    )))
    .get_result(conn)?)
}

/// The claim sizes of W6 (and of WORKER): 1 (claim 1 + complete 1), then
/// every `--batch` (a `--batch 1` is that same first figure).
pub fn claim_sizes(batches: &[i64]) -> Vec<i64> {
    std::iter::once(1)
        .chain(batches.iter().copied().filter(|&b| b != 1))
        .collect()
}

/// The name of the W6 figure at `workers` workers, claiming `batch` steps
/// per statement, over `n` executions.
pub fn w6_name(workers: usize, batch: i64, n: u64) -> String {
    let how = if batch == 1 {
        "claim 1 + complete 1".to_owned()
    } else {
        format!("claim {batch} per statement, complete_steps {batch} per statement")
    };
    format!(
        "W6 engine loop, {}, {how} ({n} executions of the 10-node chain)",
        workers_label(workers)
    )
}

pub fn workers_label(workers: usize) -> String {
    if workers == 1 {
        "1 worker".to_owned()
    } else {
        format!("{workers} workers")
    }
}

impl Bench {
    pub fn w2_pool_running(&self) -> Res<()> {
        for stmt in W2_POOL_RUNNING {
            self.sql(stmt)?;
        }
        Ok(())
    }

    pub fn w2(&mut self, rep: usize) -> Res<()> {
        eprintln!("W2 claim+complete (rep {rep})");
        for workers in [1usize, 4] {
            let w = workers_label(workers);
            let single = w2_single_name(workers);
            self.w2_pool_running()?;
            let v = self.throughput(
                workers,
                |_, c| Ok(format!("w2-{c}")),
                |conn, worker, rng| complete_batch(conn, worker, 1, rng),
            )?;
            self.report.ours(&single, "steps/s", Better::Higher, v);
            let batches = self.args.batches.clone();
            for &batch in &batches {
                let batched = w2_batched_name(workers, batch);
                self.w2_pool_running()?;
                let v = self.throughput(
                    workers,
                    |_, c| Ok(format!("w2b-{c}")),
                    |conn, worker, rng| complete_batch(conn, worker, batch, rng),
                )?;
                self.report.ours(&batched, "steps/s", Better::Higher, v);
                take_deadlock_retries(self, &batched);
                self.report.pair(&batched, &single);
            }
            if self.args.limit {
                for (script, label) in [
                    (
                        "w2.sql",
                        "SELECT FOR UPDATE SKIP LOCKED + UPDATE, then UPDATE",
                    ),
                    (
                        "w2_single.sql",
                        "UPDATE..WHERE id=(SELECT..SKIP LOCKED), then UPDATE",
                    ),
                ] {
                    self.w2_pool()?;
                    let v = self.pgbench_tput(script, workers)?;
                    let name = format!("W2 claim+complete, {w} ({script}: {label})");
                    self.report.lim(&name, "steps/s", Better::Higher, v);
                    self.report.pair(&single, &name);
                    for &batch in &batches {
                        self.report.pair(&w2_batched_name(workers, batch), &name);
                    }
                }
            }
        }
        Ok(())
    }

    /// Latency of claiming one step with 10k and with 1M pending steps (the
    /// W5 rows, all running/pending) in the table.
    pub fn claim_growth(&mut self, rep: usize) -> Res<()> {
        eprintln!("claim latency growth (rep {rep})");
        for pending in [10_000u64, 1_000_000] {
            self.load_ready_steps(pending)?;
            self.sql("VACUUM ANALYZE executions, execution_steps")?;
            self.sql("CHECKPOINT")?;
            let name = format!(
                "W2 claim latency, {} pending steps (engine::claim_steps 1)",
                scale_label(pending).trim_start_matches('@')
            );
            let lat = self.latency(|conn, _| {
                let s = engine::claim_steps(conn, "growth", 1, LEASE)?;
                if s.len() != 1 {
                    return Err("claim found nothing".into());
                }
                Ok(())
            })?;
            self.report.latency(&name, lat, false);
        }
        Ok(())
    }

    /// No executions but `steps / 10` running ones of 10 independent
    /// pending steps each (the W5 rows, loaded with COPY): `steps` ready steps.
    pub fn load_ready_steps(&self, steps: u64) -> Res<()> {
        self.reset_runs()?;
        let scale = self.args.executions;
        let mut conn = self.conn()?;
        bulk::copy_executions(
            &mut conn,
            (0..steps / NODES as u64).map(|i| CopyExecution {
                status: ExecutionStatus::Running,
                ..w5_execution(i, scale)
            }),
        )?;
        bulk::copy_steps(
            &mut conn,
            (0..steps).map(|j| CopyStep {
                status: StepStatus::Pending,
                output: None,
                error: None,
                retry_count: 0,
                started_at: None,
                completed_at: None,
                ..w5_step(j, scale)
            }),
        )?;
        Ok(())
    }

    /// W6's starting point: no executions but `n` of the 10-node chain
    /// started (`engine::start_execution`), vacuumed and analysed.
    pub fn w6_executions(&self, n: u64) -> Res<()> {
        self.reset_runs()?;
        let mut conn = self.conn()?;
        for i in 0..n {
            engine::start_execution(
                &mut conn,
                &NewExecution::new(workflow_id(i % WORKFLOWS))
                    .user_id(format!("user-{}", i % USERS))
                    .data(execution_data(i)),
            )?;
        }
        self.sql("VACUUM ANALYZE executions, execution_steps")
    }

    pub fn w6(&mut self, rep: usize) -> Res<()> {
        eprintln!("W6 engine loop (rep {rep})");
        let n = self.args.w6_executions;
        for batch in claim_sizes(&self.args.batches) {
            for workers in [1usize, 4] {
                self.w6_executions(n)?;
                let t0 = Instant::now();
                std::thread::scope(|s| -> Res<()> {
                    let handles: Vec<_> = (0..workers)
                        .map(|c| {
                            let url = &self.url;
                            s.spawn(move || -> Res<()> {
                                let mut conn = connect(url)?;
                                let worker = format!("w6-{c}");
                                let mut rng = Rng(now_nanos() ^ c as u64);
                                loop {
                                    let k = complete_batch(&mut conn, &worker, batch, &mut rng)?;
                                    if k == 0 {
                                        if !any_unfinished(&mut conn)? {
                                            return Ok(());
                                        }
                                        std::thread::sleep(Duration::from_micros(100));
                                    }
                                }
                            })
                        })
                        .collect();
                    for h in handles {
                        h.join().map_err(|_| "worker panicked")??;
                    }
                    Ok(())
                })?;
                let secs = t0.elapsed().as_secs_f64();
                let (done, steps) = (
                    self.count("executions WHERE status = 'completed'")?,
                    self.count("execution_steps WHERE status = 'completed'")?,
                );
                if done as u64 != n || steps as u64 != n * NODES as u64 {
                    return Err(format!(
                        "W6 ended with {done}/{n} executions and {steps} steps completed"
                    )
                    .into());
                }
                let name = w6_name(workers, batch, n);
                self.report.ours(
                    &name,
                    "steps/s",
                    Better::Higher,
                    (n * NODES as u64) as f64 / secs,
                );
                take_deadlock_retries(self, &name);
            }
        }
        let events = self.count("execution_events")?;
        eprintln!("  last W6 figure wrote {events} events");
        Ok(())
    }
}
