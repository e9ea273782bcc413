//! The benchmark's database and its drivers: [`Bench`] owns a throwaway
//! database (`workflow_db::testing`, dropped at the end unless `--keep`),
//! opens the benchmark's connections and measures throughput (many clients
//! for a fixed time) and latency (sequential calls).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use workflow_db::testing::TestDatabase;
use workflow_db::{DatabaseUrl, NewWorkflow};

use crate::Res;
use crate::args::Args;
use crate::data::{Rng, WORKFLOWS, now_nanos, workflow_graph, workflow_id};
use crate::report::{Report, percentiles};

/// The `application_name` of every connection the benchmark opens (its
/// pgbench and psql runs included).
const APPLICATION_NAME: &str = "workflow-db-bench";

pub struct Bench {
    /// The tokio multi-thread runtime of the async figures (ASYNC, WORKER),
    /// built on first use ([`Bench::runtime`]). First field, so it is shut
    /// down (its tasks and their connections dropped) before the database.
    rt: OnceLock<Arc<tokio::runtime::Runtime>>,
    pub args: Args,
    /// The throwaway database everything runs on.
    pub db: TestDatabase,
    /// Its URL as the benchmark connects: no TLS on a local TCP connection,
    /// like the limit (run.sh sets PGSSLMODE=disable), and the benchmark's
    /// `application_name`. pgbench and psql get this URL too.
    pub url: DatabaseUrl,
    pub report: Report,
}

/// Opens one connection as the benchmark.
pub fn connect(url: &DatabaseUrl) -> Res<PgConnection> {
    Ok(workflow_db::pool::connect_as(url, APPLICATION_NAME)?)
}

/// `SELECT count(*) FROM <from>` on `conn`.
pub fn count_on(conn: &mut PgConnection, from: &str) -> Res<i64> {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let n: N = diesel::sql_query(format!("SELECT count(*) AS n FROM {from}")).get_result(conn)?;
    Ok(n.n)
}

impl Bench {
    /// A fresh migrated throwaway database (`workflow_db_tmp_bench_..`) on
    /// the server of TEST_DATABASE_URL / DATABASE_URL, seeded with the 100
    /// workflows of seed_workflows.sql.
    pub fn new(args: Args) -> Res<Bench> {
        let db = TestDatabase::throwaway("bench")?;
        let url = db
            .url()
            .with_default_param("sslmode", "disable")
            .with_default_param("application_name", APPLICATION_NAME);
        let b = Bench {
            rt: OnceLock::new(),
            args,
            db,
            url,
            report: Report::default(),
        };
        b.seed()?;
        Ok(b)
    }

    fn seed(&self) -> Res<()> {
        let mut conn = self.conn()?;
        let (nodes, edges) = workflow_graph();
        for w in 0..WORKFLOWS {
            let mut wf = NewWorkflow::new(format!("wf-{w:03}"), nodes.clone(), edges.clone())
                .description(format!("Benchmark workflow {w}"));
            wf.id = workflow_id(w);
            wf.create(&mut conn)?;
        }
        Ok(())
    }

    /// The tokio multi-thread runtime (default worker threads: one per
    /// core) that the async figures share, built on first use.
    pub fn runtime(&self) -> Res<Arc<tokio::runtime::Runtime>> {
        if let Some(rt) = self.rt.get() {
            return Ok(Arc::clone(rt));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        Ok(Arc::clone(self.rt.get_or_init(|| Arc::new(rt))))
    }

    pub fn conn(&self) -> Res<PgConnection> {
        connect(&self.url)
    }

    /// Runs `sql` (one or more statements) on a new connection.
    pub fn sql(&self, sql: &str) -> Res<()> {
        self.conn()?.batch_execute(sql)?;
        Ok(())
    }

    /// Empties executions (and so steps and events) and checkpoints, so that
    /// every figure starts from the seeded workflows alone.
    pub fn reset_runs(&self) -> Res<()> {
        self.sql("TRUNCATE executions CASCADE")?;
        self.sql("CHECKPOINT")
    }

    /// `SELECT count(*) FROM <from>` on a new connection.
    pub fn count(&self, from: &str) -> Res<i64> {
        count_on(&mut self.conn()?, from)
    }

    /// The server's version, `?` when it cannot be read.
    pub fn server_version(&self) -> String {
        #[derive(QueryableByName)]
        struct V {
            #[diesel(sql_type = diesel::sql_types::Text)]
            v: String,
        }
        self.conn()
            .ok()
            .and_then(|mut c| {
                diesel::sql_query("SELECT current_setting('server_version') AS v")
                    .get_result::<V>(&mut c)
                    .ok()
            })
            .map_or_else(|| "?".into(), |v| v.v)
    }

    // ------------------------------------------------------------ drivers

    /// Runs `op` on `clients` threads (one connection each) for the warm-up,
    /// then for `duration`; returns operations per second. `op` returns how
    /// many operations it did; 0 means nothing is left (the client stops).
    pub fn throughput<S>(
        &self,
        clients: usize,
        setup: impl Fn(&mut PgConnection, usize) -> Res<S> + Sync,
        op: impl Fn(&mut PgConnection, &mut S, &mut Rng) -> Res<u64> + Sync,
    ) -> Res<f64> {
        let measuring = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let done = AtomicU64::new(0);
        let barrier = Barrier::new(clients + 1);
        let mut elapsed = Duration::ZERO;
        std::thread::scope(|s| -> Res<()> {
            let mut handles = Vec::new();
            for c in 0..clients {
                let (measuring, stop, done, barrier, setup, op) =
                    (&measuring, &stop, &done, &barrier, &setup, &op);
                let url = &self.url;
                handles.push(s.spawn(move || -> Res<()> {
                    let conn = connect(url);
                    let state = conn.and_then(|mut conn| {
                        let state = setup(&mut conn, c)?;
                        Ok((conn, state))
                    });
                    barrier.wait();
                    let (mut conn, mut state) = state?;
                    let mut rng = Rng(0x5EED ^ ((c as u64) << 32) ^ now_nanos());
                    while !stop.load(Ordering::Relaxed) {
                        let n = op(&mut conn, &mut state, &mut rng)?;
                        if n == 0 {
                            // Nothing left to do (queue drained).
                            break;
                        }
                        if measuring.load(Ordering::Relaxed) {
                            done.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                }));
            }
            barrier.wait();
            std::thread::sleep(Duration::from_secs_f64(self.args.warmup));
            measuring.store(true, Ordering::Relaxed);
            let t0 = Instant::now();
            let deadline = t0 + Duration::from_secs_f64(self.args.duration);
            while Instant::now() < deadline && handles.iter().any(|h| !h.is_finished()) {
                std::thread::sleep(Duration::from_millis(5));
            }
            elapsed = t0.elapsed();
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                h.join().map_err(|_| "worker panicked")??;
            }
            Ok(())
        })?;
        Ok(done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
    }

    /// `queries` sequential calls after 50 warm-up calls; (p50, p99, mean) in ms.
    pub fn latency(
        &self,
        mut op: impl FnMut(&mut PgConnection, &mut Rng) -> Res<()>,
    ) -> Res<(f64, f64, f64)> {
        let mut conn = self.conn()?;
        let mut rng = Rng(now_nanos());
        for _ in 0..50 {
            op(&mut conn, &mut rng)?;
        }
        let mut lat = Vec::with_capacity(self.args.queries);
        for _ in 0..self.args.queries {
            let t = Instant::now();
            op(&mut conn, &mut rng)?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(percentiles(lat))
    }
}
