//! ASYNC: W2 claim+complete through the async face
//! (`workflow_db::runtime::AsyncPool`, feature `runtime`) from a tokio
//! multi-thread runtime, at the worker counts and batch sizes of the sync
//! W2 figures, each paired with its sync figure so the report prints
//! async/sync (run `--only W2,ASYNC`).
//!
//! A worker is a tokio task on a pool of `workers` connections. Each cycle
//! is two `AsyncPool::run` calls, as a real worker makes them around its
//! handler: the claim (`claim_steps n`), then the report (`complete_step`
//! for one step, `complete_steps n` in one statement for a batch, retried
//! on deadlock like the sync figures). So each step pays two hand-offs to
//! the blocking pool per cycle, where the sync W2 pays none. A latency
//! figure measures that hand-off alone (a closure that does nothing).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use workflow_db::runtime::AsyncPool;
use workflow_db::{Config, Lease, engine};

use crate::Res;
use crate::claim::{LEASE, w2_batched_name, w2_single_name, workers_label};
use crate::data::{Rng, now_nanos, step_output};
use crate::db::Bench;
use crate::report::{Better, percentiles};

/// The unbatched async figure at `workers` workers.
pub fn async_single_name(workers: usize) -> String {
    format!(
        "W2 claim+complete, {} (async face: AsyncPool::run claim_steps 1, then run complete_step)",
        workers_label(workers)
    )
}

/// The batched async figure at `workers` workers and batch size `batch`.
pub fn async_batched_name(workers: usize, batch: i64) -> String {
    format!(
        "W2 claim+complete, {} (async face: AsyncPool::run claim_steps {batch}, then run complete_steps {batch})",
        workers_label(workers)
    )
}

/// One worker cycle through the pool: claim up to `n` steps, then complete
/// them. Returns how many steps were completed (0: the queue is empty).
async fn cycle(pool: &AsyncPool, worker: &Arc<str>, n: i64, rng: &mut Rng) -> Res<u64> {
    let w = Arc::clone(worker);
    let mut steps = pool
        .run(move |c| Ok(engine::claim_steps(c, &w, n, LEASE)?))
        .await?;
    if steps.is_empty() {
        return Ok(0);
    }
    let output = step_output(rng.below(1_000_000_000), 0);
    let done = steps.len() as u64;
    if steps.len() == 1 {
        let lease = steps[0].lease().ok_or("a claimed step has no lease")?;
        pool.run(move |c| engine::complete_step(c, &lease, Some(&output)))
            .await?;
        return Ok(1);
    }
    steps.sort_by_key(|s| (s.execution_id, s.id));
    let batch: Vec<(Lease, Option<serde_json::Value>)> = steps
        .iter()
        .map(|s| {
            Ok((
                s.lease().ok_or("a claimed step has no lease")?,
                Some(output.clone()),
            ))
        })
        .collect::<Res<_>>()?;
    // Retried on deadlock like the sync figures (the engine orders its
    // locks so that there should be none); the retries are counted.
    let retries = pool
        .run(move |c| {
            let mut attempt = 0u64;
            loop {
                match engine::complete_steps(c, &batch) {
                    Ok(_) => return Ok(attempt),
                    Err(e) if attempt < 5 && e.to_string().contains("deadlock") => attempt += 1,
                    Err(e) => return Err(e),
                }
            }
        })
        .await?;
    DEADLOCK_RETRIES.fetch_add(retries, Ordering::Relaxed);
    Ok(done)
}

static DEADLOCK_RETRIES: AtomicU64 = AtomicU64::new(0);

impl Bench {
    pub fn async_face(&mut self, rep: usize) -> Res<()> {
        eprintln!("ASYNC W2 claim+complete through AsyncPool (rep {rep})");
        let rt = self.runtime()?;
        self.hand_off(&rt)?;
        for workers in [1usize, 4] {
            let sync = w2_single_name(workers);
            let name = async_single_name(workers);
            self.w2_pool_running()?;
            let v = self.async_throughput(&rt, workers, 1)?;
            self.report.ours(&name, "steps/s", Better::Higher, v);
            self.report.pair(&name, &sync);
            for batch in self.args.batches.clone() {
                let name = async_batched_name(workers, batch);
                self.w2_pool_running()?;
                let v = self.async_throughput(&rt, workers, batch)?;
                self.report.ours(&name, "steps/s", Better::Higher, v);
                self.report.pair(&name, &w2_batched_name(workers, batch));
                let n = DEADLOCK_RETRIES.swap(0, Ordering::Relaxed);
                if n > 0 {
                    self.report.notes.push(format!(
                        "{name}: {n} complete_steps batch(es) retried after a deadlock"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The cost of the async face alone: `--queries` sequential
    /// `AsyncPool::run` calls of a closure that does nothing (a permit, a
    /// hand-off to the blocking pool, an r2d2 checkout without ping, the way
    /// back), after 50 warm-up calls.
    fn hand_off(&mut self, rt: &tokio::runtime::Runtime) -> Res<()> {
        let mut config = Config::new(self.url.clone());
        config.pool_size = 1;
        let queries = self.args.queries;
        let lat = rt.block_on(async move {
            let pool = AsyncPool::from_config(&config).await?;
            for _ in 0..50 {
                pool.run(|_| Ok(())).await?;
            }
            let mut lat = Vec::with_capacity(queries);
            for _ in 0..queries {
                let t = Instant::now();
                pool.run(|_| Ok(())).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Res::Ok(percentiles(lat))
        })?;
        self.report.latency(
            "AsyncPool::run hand-off alone (closure does nothing, 1 task)",
            lat,
            false,
        );
        Ok(())
    }

    /// [`Bench::throughput`] for the async face: `workers` tasks on `rt`
    /// sharing an [`AsyncPool`] of `workers` connections, each running
    /// [`cycle`] until the queue is empty or the time is up, after the
    /// warm-up; steps per second.
    fn async_throughput(&self, rt: &tokio::runtime::Runtime, workers: usize, n: i64) -> Res<f64> {
        let mut config = Config::new(self.url.clone());
        config.pool_size = workers as u32;
        let (warmup, duration) = (self.args.warmup, self.args.duration);
        rt.block_on(async move {
            let pool = AsyncPool::from_config(&config).await?;
            let measuring = Arc::new(AtomicBool::new(false));
            let stop = Arc::new(AtomicBool::new(false));
            let done = Arc::new(AtomicU64::new(0));
            let tasks: Vec<_> = (0..workers)
                .map(|c| {
                    let (pool, measuring, stop, done) = (
                        pool.clone(),
                        Arc::clone(&measuring),
                        Arc::clone(&stop),
                        Arc::clone(&done),
                    );
                    tokio::spawn(async move {
                        let worker: Arc<str> = format!("async-{c}").into();
                        let mut rng = Rng(0xA5EED ^ ((c as u64) << 32) ^ now_nanos());
                        while !stop.load(Ordering::Relaxed) {
                            let k = cycle(&pool, &worker, n, &mut rng).await?;
                            if k == 0 {
                                break;
                            }
                            if measuring.load(Ordering::Relaxed) {
                                done.fetch_add(k, Ordering::Relaxed);
                            }
                        }
                        Res::Ok(())
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
            measuring.store(true, Ordering::Relaxed);
            let t0 = Instant::now();
            let deadline = t0 + Duration::from_secs_f64(duration);
            while Instant::now() < deadline && tasks.iter().any(|t| !t.is_finished()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let elapsed = t0.elapsed();
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await??;
            }
            Ok(done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
        })
    }
}
