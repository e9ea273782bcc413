//! The engine workload (W1–W6) on this crate, optionally side by side with the
//! server-bound limit (pgbench `-M prepared` scripts of `PERF_LIMIT_DIR`), in
//! one process on one database. See `docs/bench.md`.
//!
//! ```text
//! cargo bench --bench workload -- [--only W1,W3] [--runs 3] [--executions 100000]
//!     [--duration 8] [--warmup 1] [--queries 1000] [--limit] [--keep]
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use serde_json::{Value, json};
use uuid::Uuid;
use workflow_db::engine;
use workflow_db::models::bulk::{self, CopyExecution, CopyStep};
use workflow_db::schema::{execution_steps, executions};
use workflow_db::{
    DatabaseUrl, Execution, ExecutionStatus, Migrator, NewExecution, NewExecutionStep, NewWorkflow,
    StepStatus, Workflow,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

const BENCH_DB: &str = "workflow_db_bench";
const WORKFLOWS: u64 = 100;
const NODES: usize = 10;
const USERS: u64 = 100;

// ---------------------------------------------------------------- arguments

#[derive(Debug, Clone)]
struct Args {
    only: Option<Vec<String>>,
    runs: usize,
    executions: u64,
    duration: f64,
    warmup: f64,
    queries: usize,
    limit: bool,
    keep: bool,
    database: String,
    w6_executions: u64,
    limit_dir: PathBuf,
}

const USAGE: &str = "\
usage: cargo bench --bench workload -- [options]
  --only W1,W3      run only these workloads (W1..W6, CLAIM, R2D2)
  --runs N          repetitions of every figure (default 3)
  --executions N    W5/W3/W4 data scale in executions (default 100000; steps = 10x)
  --duration SECS   length of each throughput measurement (default 8)
  --warmup SECS     warm-up before each throughput measurement (default 1)
  --queries N       sequential calls per latency figure (default 1000)
  --w6-executions N executions of the 10-node chain per W6 figure (default 200)
  --limit           also run the pgbench limit on the same database, print ratios
  --keep            keep the bench database afterwards
  --database NAME   name of the bench database (default workflow_db_bench)
env: DATABASE_URL (server; database name replaced by workflow_db_bench),
     PERF_LIMIT_DIR (default ../shared/perf-limit), PGBENCH, PSQL";

fn parse_args() -> Res<Args> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        only: None,
        runs: 3,
        executions: 100_000,
        duration: 8.0,
        warmup: 1.0,
        queries: 1000,
        limit: false,
        keep: false,
        database: BENCH_DB.to_owned(),
        w6_executions: 200,
        limit_dir: std::env::var_os("PERF_LIMIT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("../shared/perf-limit")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Res<String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}").into())
        };
        match key.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--only" => {
                a.only = Some(
                    value("--only")?
                        .split(',')
                        .map(|s| s.trim().to_uppercase())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            "--runs" => a.runs = value("--runs")?.parse()?,
            "--executions" => a.executions = value("--executions")?.parse()?,
            "--duration" => a.duration = value("--duration")?.parse()?,
            "--warmup" => a.warmup = value("--warmup")?.parse()?,
            "--queries" => a.queries = value("--queries")?.parse()?,
            "--limit" => a.limit = true,
            "--keep" => a.keep = true,
            "--database" => a.database = value("--database")?,
            "--w6-executions" => a.w6_executions = value("--w6-executions")?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if !a
        .database
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err("--database: letters, digits and _ only".into());
    }
    if a.runs == 0
        || a.executions == 0
        || a.queries == 0
        || a.w6_executions == 0
        || a.duration <= 0.0
    {
        return Err("--runs, --executions, --queries and --duration must be positive".into());
    }
    Ok(a)
}

impl Args {
    fn wants(&self, w: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == w))
    }
}

// ---------------------------------------------------------------- figures

#[derive(Debug, Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

#[derive(Debug)]
struct Figure {
    name: String,
    unit: &'static str,
    better: Better,
    limit: bool,
    values: Vec<f64>,
}

impl Figure {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.sorted()[0]
    }
    fn max(&self) -> f64 {
        *self.sorted().last().unwrap_or(&f64::NAN)
    }
}

/// A crate figure compared with a limit figure.
#[derive(Debug)]
struct Pair {
    ours: String,
    limit: String,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
    pairs: Vec<Pair>,
    notes: Vec<String>,
}

impl Report {
    fn record(&mut self, name: &str, unit: &'static str, better: Better, limit: bool, v: f64) {
        eprintln!(
            "  {}{name}: {} {unit}",
            if limit { "[limit] " } else { "" },
            fmt(v)
        );
        match self.figures.iter_mut().find(|f| f.name == name) {
            Some(f) => f.values.push(v),
            None => self.figures.push(Figure {
                name: name.to_owned(),
                unit,
                better,
                limit,
                values: vec![v],
            }),
        }
    }
    fn ours(&mut self, name: &str, unit: &'static str, better: Better, v: f64) {
        self.record(name, unit, better, false, v);
    }
    fn lim(&mut self, name: &str, unit: &'static str, better: Better, v: f64) {
        self.record(name, unit, better, true, v);
    }
    fn pair(&mut self, ours: &str, limit: &str) {
        if !self
            .pairs
            .iter()
            .any(|p| p.ours == ours && p.limit == limit)
        {
            self.pairs.push(Pair {
                ours: ours.to_owned(),
                limit: limit.to_owned(),
            });
        }
    }
    fn get(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }
    /// Speed ratio of the medians: > 1 means the crate is faster
    /// (throughput: crate/limit; latency and seconds: limit/crate).
    fn ratio(&self, p: &Pair) -> Option<f64> {
        let (a, b) = (self.get(&p.ours)?, self.get(&p.limit)?);
        Some(match a.better {
            Better::Higher => a.median() / b.median(),
            Better::Lower => b.median() / a.median(),
        })
    }
}

fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

// ---------------------------------------------------------------- data shapes (as the limit's SQL)

fn workflow_id(w: u64) -> Uuid {
    Uuid::parse_str(&format!("00000000-0000-4000-8000-{w:012}")).expect("valid uuid")
}

/// `data` of an execution: the same JSON as w1.sql / w2_pool.sql / w5_source.sql.
fn execution_data(n: u64) -> Value {
    json!({
        "trigger": "api",
        "requestId": format!("req-{n}"),
        "input": {
            "orderId": format!("ord-{n}"),
            "amount": 1234.5,
            "currency": "EUR",
            "customer": {"id": format!("cus-{n}"), "email": format!("user{n}@example.com")}
        },
        "tags": ["bench", "workflow"],
        "priority": 3
    })
}

fn step_input(k: usize) -> Value {
    json!({
        "nodeId": format!("node-{k}"),
        "params": {"url": "https://api.example.com/v1/step", "method": "POST", "retries": 3}
    })
}

fn step_output(n: u64, k: usize) -> Value {
    json!({
        "ok": true,
        "statusCode": 200,
        "result": {"id": format!("res-{n}-{k}"), "items": 12, "message": "done"},
        "durationMs": 42
    })
}

/// Small deterministic PRNG (splitmix64) for the random choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random-looking (version 4) uuid derived from `i`, like the limit's md5 ids.
fn hashed_uuid(salt: u64, i: u64) -> Uuid {
    let mut r = Rng(salt ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&r.next().to_le_bytes());
    b[8..].copy_from_slice(&r.next().to_le_bytes());
    uuid::Builder::from_random_bytes(b).into_uuid()
}

// ---------------------------------------------------------------- database

struct Bench {
    args: Args,
    url: DatabaseUrl,
    report: Report,
}

fn server_url() -> Res<DatabaseUrl> {
    let raw = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    // Like the limit (run.sh sets PGSSLMODE=disable): no TLS on a local TCP connection.
    Ok(DatabaseUrl::parse(&raw)?
        .with_default_param("sslmode", "disable")
        .with_default_param("application_name", "workflow-db-bench"))
}

fn connect(url: &DatabaseUrl) -> Res<PgConnection> {
    Ok(workflow_db::migrate::connect(url)?)
}

impl Bench {
    fn conn(&self) -> Res<PgConnection> {
        connect(&self.url)
    }

    fn recreate_database(&self) -> Res<()> {
        let mut admin = connect(&self.url.with_database("postgres"))?;
        let db = &self.args.database;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))?;
        admin.batch_execute(&format!("CREATE DATABASE {db}"))?;
        Migrator::new(self.url.clone()).run(|_| {})?;
        let mut conn = self.conn()?;
        let nodes: Vec<Value> = (0..NODES)
            .map(|k| json!({"id": format!("node-{k}"), "type": "task", "config": {"timeoutMs": 30000}}))
            .collect();
        let edges: Vec<Value> = (0..NODES - 1)
            .map(|k| json!({"source": format!("node-{k}"), "target": format!("node-{}", k + 1)}))
            .collect();
        for w in 0..WORKFLOWS {
            let mut wf = NewWorkflow::new(
                format!("wf-{w:03}"),
                Value::Array(nodes.clone()),
                Value::Array(edges.clone()),
            )
            .description(format!("Benchmark workflow {w}"));
            wf.id = workflow_id(w);
            wf.create(&mut conn)?;
        }
        Ok(())
    }

    fn drop_database(&self) -> Res<()> {
        let mut admin = connect(&self.url.with_database("postgres"))?;
        let db = &self.args.database;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))?;
        Ok(())
    }

    fn sql(&self, sql: &str) -> Res<()> {
        self.conn()?.batch_execute(sql)?;
        Ok(())
    }

    fn reset_runs(&self) -> Res<()> {
        self.sql("TRUNCATE executions CASCADE")?;
        self.sql("CHECKPOINT")
    }

    fn count(&self, table: &str) -> Res<i64> {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let n: N = diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
            .get_result(&mut self.conn()?)?;
        Ok(n.n)
    }

    // ------------------------------------------------------------ drivers

    /// Runs `op` on `clients` threads (one connection each) for the warm-up,
    /// then for `duration`; returns operations per second.
    fn throughput<S>(
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
                let url = self.url.clone();
                handles.push(s.spawn(move || -> Res<()> {
                    let conn = connect(&url);
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
    fn latency(
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

    // ------------------------------------------------------------ W1

    fn w1(&mut self, rep: usize) -> Res<()> {
        eprintln!("W1 start (rep {rep})");
        for clients in [1usize, 8] {
            let c = if clients == 1 {
                "1 client".to_owned()
            } else {
                format!("{clients} clients")
            };
            let models =
                format!("W1 start, {c} (models: BEGIN/INSERT/INSERT/COMMIT, no RETURNING)");
            let one = format!("W1 start, {c} (bulk::insert_execution_with_steps, 1 statement)");
            self.reset_runs()?;
            let v = self.throughput(
                clients,
                |_, _| Ok(()),
                |conn, _, rng| {
                    // The ids are the client's (UUIDv7): nothing to read back.
                    let (e, steps) = new_start(rng);
                    conn.transaction(|conn| {
                        diesel::insert_into(executions::table)
                            .values(&e)
                            .execute(conn)?;
                        diesel::insert_into(execution_steps::table)
                            .values(&steps)
                            .execute(conn)?;
                        diesel::QueryResult::Ok(())
                    })?;
                    Ok(1)
                },
            )?;
            self.report.ours(&models, "executions/s", Better::Higher, v);
            self.reset_runs()?;
            let v = self.throughput(
                clients,
                |_, _| Ok(()),
                |conn, _, rng| {
                    let (e, steps) = new_start(rng);
                    bulk::insert_execution_with_steps(conn, &e, &steps)?;
                    Ok(1)
                },
            )?;
            self.report.ours(&one, "executions/s", Better::Higher, v);
            // The engine's start: the execution, its steps from the graph
            // (dependency counters; no step input), pending -> running with
            // the start event and NOTIFY, in one transaction.
            let eng = format!(
                "W1 start, {c} (engine::start_execution: steps from the graph + event + NOTIFY)"
            );
            self.reset_runs()?;
            let v = self.throughput(
                clients,
                |_, _| Ok(()),
                |conn, _, rng| {
                    let (w, u, n) = (
                        rng.below(WORKFLOWS),
                        rng.below(USERS),
                        1 + rng.below(1_000_000_000),
                    );
                    engine::start_execution(
                        conn,
                        &NewExecution::new(workflow_id(w))
                            .user_id(format!("user-{u}"))
                            .data(execution_data(n)),
                    )?;
                    Ok(1)
                },
            )?;
            self.report.ours(&eng, "executions/s", Better::Higher, v);
            if self.args.limit {
                let l1 = format!("W1 start, {c} (w1.sql: BEGIN/INSERT/INSERT/COMMIT)");
                let l2 = format!("W1 start, {c} (w1_cte.sql: one CTE statement)");
                self.reset_runs()?;
                let v = self.pgbench_tput("w1.sql", clients)?;
                self.report.lim(&l1, "executions/s", Better::Higher, v);
                self.reset_runs()?;
                let v = self.pgbench_tput("w1_cte.sql", clients)?;
                self.report.lim(&l2, "executions/s", Better::Higher, v);
                self.report.pair(&models, &l1);
                self.report.pair(&one, &l1);
                self.report.pair(&one, &l2);
                self.report.pair(&eng, &l1);
                self.report.pair(&eng, &l2);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ W2 (engine API)

    fn w2_pool(&self) -> Res<()> {
        let pool = std::fs::read_to_string(self.args.limit_dir.join("sql/w2_pool.sql"))?;
        for stmt in pool.split(';').filter(|s| {
            !s.trim()
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with("--"))
        }) {
            self.sql(stmt)?;
        }
        self.sql("VACUUM ANALYZE executions, execution_steps")?;
        self.sql("CHECKPOINT")
    }

    // ------------------------------------------------------------ W5

    fn w5(&mut self, rep: usize) -> Res<()> {
        eprintln!("W5 bulk load (rep {rep})");
        let n = self.args.executions;
        let scale = scale_label(n);
        let ours = format!("W5 bulk load {scale} (bulk::copy_*, binary COPY, streamed)");
        let lim = format!("W5 bulk load {scale} (\\copy FROM CSV)");
        // W3/W4 need the data even when W5 itself is not asked for.
        let timed = self.args.wants("W5");
        if self.args.limit && timed {
            self.reset_runs()?;
            let v = self.limit_copy()?;
            self.report.lim(&lim, "s", Better::Lower, v);
            self.report.pair(&ours, &lim);
        }
        self.reset_runs()?;
        let mut conn = self.conn()?;
        let t0 = Instant::now();
        let e = bulk::copy_executions(&mut conn, (0..n).map(w5_execution))?;
        let s = bulk::copy_steps(&mut conn, (0..n * NODES as u64).map(w5_step))?;
        let secs = t0.elapsed().as_secs_f64();
        if e as u64 != n || s as u64 != n * NODES as u64 {
            return Err(format!("W5 loaded {e}/{s} rows, expected {n}/{}", n * 10).into());
        }
        if timed {
            self.report.ours(&ours, "s", Better::Lower, secs);
            let hwm = peak_rss_mb();
            self.report.ours(
                "W5 peak RSS of the bench process (VmHWM)",
                "MB",
                Better::Lower,
                hwm,
            );
        }
        if self.args.limit && rep == 1 && n <= 100_000 && timed {
            self.verify_w5()?;
        }
        self.sql("VACUUM ANALYZE")?;
        self.sql("CHECKPOINT")
    }

    /// Checks that the crate loaded exactly the rows of w5_source.sql (ids aside).
    fn verify_w5(&mut self) -> Res<()> {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.conn()?;
        conn.batch_execute("SET TimeZone = 'UTC'")?;
        let e: N = diesel::sql_query(
            "SELECT count(*) AS n FROM (
               SELECT workflow_id, status, user_id, data, error, started_at, completed_at FROM executions
               EXCEPT ALL
               SELECT workflow_id, status, user_id, data, error, started_at, completed_at FROM w5_exec_src) x",
        )
        .get_result(&mut conn)?;
        let s: N = diesel::sql_query(
            "SELECT count(*) AS n FROM (
               SELECT e.data->>'requestId', s.node_id, s.status, s.input, s.output, s.error,
                      s.retry_count, s.started_at, s.completed_at
               FROM execution_steps s JOIN executions e ON e.id = s.execution_id
               EXCEPT ALL
               SELECT x.data->>'requestId', v.node_id, v.status, v.input, v.output, v.error,
                      v.retry_count, v.started_at, v.completed_at
               FROM w5_step_src v JOIN w5_exec_src x ON x.id = v.execution_id) y",
        )
        .get_result(&mut conn)?;
        if e.n != 0 || s.n != 0 {
            return Err(format!(
                "W5 rows differ from w5_source.sql: {} executions, {} steps",
                e.n, s.n
            )
            .into());
        }
        eprintln!("  W5 rows verified equal to w5_source.sql (ids aside)");
        self.report.notes.push(
            "W5: the crate's rows were verified equal to w5_source.sql (EXCEPT ALL, ids aside)"
                .into(),
        );
        Ok(())
    }

    // ------------------------------------------------------------ W3 / W4

    fn w3(&mut self, rep: usize) -> Res<()> {
        eprintln!("W3 relational read (rep {rep})");
        let scale = scale_label(self.args.executions);
        let ours =
            format!("W3 relational read {scale} (Workflow::with_recent_executions, 3 queries)");
        let (p50, p99, mean) = self.latency(|conn, rng| {
            let w = Workflow::with_recent_executions(conn, workflow_id(rng.below(WORKFLOWS)), 10)?;
            if w.executions.len() != 10 {
                return Err(format!("W3 read {} executions", w.executions.len()).into());
            }
            Ok(())
        })?;
        self.record_latency(&ours, p50, p99, mean, false);
        if self.args.limit {
            for (script, label) in [
                ("w3_three.sql", "3 queries"),
                ("w3_json.sql", "1 statement, json_agg"),
                ("w3_lateral.sql", "1 statement, lateral joins"),
            ] {
                let lim = format!("W3 relational read {scale} ({script}: {label})");
                let (p50, p99, mean) = self.pgbench_latency(script)?;
                self.record_latency(&lim, p50, p99, mean, true);
                for p in ["p50", "p99"] {
                    self.report
                        .pair(&format!("{ours} {p}"), &format!("{lim} {p}"));
                }
            }
        }
        Ok(())
    }

    fn w4(&mut self, rep: usize) -> Res<()> {
        eprintln!("W4 filtered list (rep {rep})");
        let scale = scale_label(self.args.executions);
        let ours = format!("W4 filtered list {scale} (Diesel query builder)");
        let (p50, p99, mean) = self.latency(|conn, rng| {
            let status = ExecutionStatus::ALL[rng.below(6) as usize];
            let user = format!("user-{}", rng.below(USERS));
            let rows: Vec<Execution> = executions::table
                .filter(executions::status.eq(status))
                .filter(executions::user_id.eq(user))
                .order(executions::started_at.desc())
                .limit(50)
                .select(Execution::as_select())
                .load(conn)?;
            std::hint::black_box(rows);
            Ok(())
        })?;
        self.record_latency(&ours, p50, p99, mean, false);
        if self.args.limit {
            let lim = format!("W4 filtered list {scale} (w4.sql)");
            let (p50, p99, mean) = self.pgbench_latency("w4.sql")?;
            self.record_latency(&lim, p50, p99, mean, true);
            for p in ["p50", "p99"] {
                self.report
                    .pair(&format!("{ours} {p}"), &format!("{lim} {p}"));
            }
        }
        Ok(())
    }

    fn record_latency(&mut self, name: &str, p50: f64, p99: f64, mean: f64, limit: bool) {
        for (p, v) in [("p50", p50), ("p99", p99), ("mean", mean)] {
            self.report
                .record(&format!("{name} {p}"), "ms", Better::Lower, limit, v);
        }
    }

    // ------------------------------------------------------------ W6 (engine API)

    fn w2_pool_running(&self) -> Res<()> {
        for stmt in W2_POOL_RUNNING {
            self.sql(stmt)?;
        }
        Ok(())
    }

    fn w2(&mut self, rep: usize) -> Res<()> {
        eprintln!("W2 claim+complete (rep {rep})");
        for workers in [1usize, 4] {
            let w = if workers == 1 {
                "1 worker".to_owned()
            } else {
                format!("{workers} workers")
            };
            let single = format!("W2 claim+complete, {w} (engine: claim_steps 1 + complete_step)");
            let batched = format!(
                "W2 claim+complete, {w} (engine: claim_steps 10 per statement, complete_steps 10 per statement)"
            );
            self.w2_pool_running()?;
            let v = self.throughput(
                workers,
                |_, c| Ok(format!("w2-{c}")),
                |conn, worker, rng| complete_batch(conn, worker, 1, rng),
            )?;
            self.report.ours(&single, "steps/s", Better::Higher, v);
            self.w2_pool_running()?;
            let v = self.throughput(
                workers,
                |_, c| Ok(format!("w2b-{c}")),
                |conn, worker, rng| complete_batch(conn, worker, 10, rng),
            )?;
            self.report.ours(&batched, "steps/s", Better::Higher, v);
            self.report.pair(&batched, &single);
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
                    self.report.pair(&batched, &name);
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ claim latency growth

    fn claim_growth(&mut self, rep: usize) -> Res<()> {
        eprintln!("claim latency growth (rep {rep})");
        for pending in [10_000u64, 1_000_000] {
            self.reset_runs()?;
            let execs = pending / NODES as u64;
            let mut conn = self.conn()?;
            bulk::copy_executions(
                &mut conn,
                (0..execs).map(|i| CopyExecution {
                    status: ExecutionStatus::Running,
                    ..w5_execution(i)
                }),
            )?;
            bulk::copy_steps(
                &mut conn,
                (0..pending).map(|j| CopyStep {
                    status: StepStatus::Pending,
                    output: None,
                    error: None,
                    retry_count: 0,
                    started_at: None,
                    completed_at: None,
                    ..w5_step(j)
                }),
            )?;
            self.sql("VACUUM ANALYZE executions, execution_steps")?;
            self.sql("CHECKPOINT")?;
            let name = format!(
                "W2 claim latency, {} pending steps (engine::claim_steps 1)",
                scale_label(pending).trim_start_matches('@')
            );
            let (p50, p99, mean) = self.latency(|conn, _| {
                let s = engine::claim_steps(conn, "growth", 1, LEASE)?;
                if s.len() != 1 {
                    return Err("claim found nothing".into());
                }
                Ok(())
            })?;
            self.record_latency(&name, p50, p99, mean, false);
        }
        Ok(())
    }

    // ------------------------------------------------------------ W6

    fn w6(&mut self, rep: usize) -> Res<()> {
        eprintln!("W6 engine loop (rep {rep})");
        let n = self.args.w6_executions;
        for (batch, how) in [
            (1i64, "claim 1 + complete 1"),
            (
                10,
                "claim 10 per statement, complete_steps 10 per statement",
            ),
        ] {
            for workers in [1usize, 4] {
                let w = if workers == 1 {
                    "1 worker".to_owned()
                } else {
                    format!("{workers} workers")
                };
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
                self.sql("VACUUM ANALYZE executions, execution_steps")?;
                let t0 = Instant::now();
                std::thread::scope(|s| -> Res<()> {
                    let handles: Vec<_> = (0..workers)
                        .map(|c| {
                            let url = self.url.clone();
                            s.spawn(move || -> Res<()> {
                                let mut conn = connect(&url)?;
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
                let name =
                    format!("W6 engine loop, {w}, {how} ({n} executions of the 10-node chain)");
                self.report.ours(
                    &name,
                    "steps/s",
                    Better::Higher,
                    (n * NODES as u64) as f64 / secs,
                );
            }
        }
        let events = self.count("execution_events")?;
        eprintln!("  last W6 figure wrote {events} events");
        Ok(())
    }

    // ------------------------------------------------------------ r2d2

    fn r2d2(&mut self, rep: usize) -> Res<()> {
        eprintln!("r2d2 checkout (rep {rep})");
        for test in [true, false] {
            let manager = ConnectionManager::<PgConnection>::new(self.url.expose());
            let pool = Pool::builder()
                .max_size(1)
                .min_idle(Some(1))
                .test_on_check_out(test)
                .build(manager)?;
            drop(pool.get()?);
            let deadline = Instant::now() + Duration::from_secs_f64(self.args.duration.min(3.0));
            let t0 = Instant::now();
            let mut n = 0u64;
            while Instant::now() < deadline {
                for _ in 0..100 {
                    let c = pool.get()?;
                    std::hint::black_box(&c);
                }
                n += 100;
            }
            let v = n as f64 / t0.elapsed().as_secs_f64();
            self.report.ours(
                &format!("r2d2 checkout+return, test_on_check_out = {test}"),
                "checkouts/s",
                Better::Higher,
                v,
            );
        }
        Ok(())
    }

    // ------------------------------------------------------------ the limit (pgbench / psql)

    fn pgbench(&self) -> String {
        std::env::var("PGBENCH").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pgbench".into())
    }

    fn psql(&self) -> String {
        std::env::var("PSQL").unwrap_or_else(|_| {
            let p = "/usr/lib/postgresql/15/bin/psql";
            if Path::new(p).exists() { p } else { "psql" }.to_owned()
        })
    }

    fn run_tool(&self, mut cmd: Command) -> Res<String> {
        cmd.env("PGSSLMODE", "disable")
            .env("PGTZ", "UTC")
            .env("PGOPTIONS", "-c client_min_messages=warning");
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(format!(
                "{:?} failed: {}{}",
                cmd.get_program(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn pgbench_cmd(&self, script: &str, clients: usize) -> Command {
        let mut cmd = Command::new(self.pgbench());
        cmd.args(["-n", "-M", "prepared", "-c", &clients.to_string()])
            .args(["-j", if clients > 1 { "2" } else { "1" }])
            .arg("-f")
            .arg(self.args.limit_dir.join(script));
        cmd
    }

    fn pgbench_tput(&self, script: &str, clients: usize) -> Res<f64> {
        let mut warm = self.pgbench_cmd(script, clients);
        warm.args(["-T", &fmt_secs(self.args.warmup)])
            .arg(self.url.expose());
        self.run_tool(warm)?;
        let mut cmd = self.pgbench_cmd(script, clients);
        cmd.args(["-T", &fmt_secs(self.args.duration)])
            .arg(self.url.expose());
        let out = self.run_tool(cmd)?;
        let tps = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next())
            .ok_or_else(|| format!("no tps in pgbench output:\n{out}"))?;
        Ok(tps.parse()?)
    }

    fn pgbench_latency(&self, script: &str) -> Res<(f64, f64, f64)> {
        let dir = target_dir().join("workload-pgbench");
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)? {
            std::fs::remove_file(e?.path())?;
        }
        let mut warm = self.pgbench_cmd(script, 1);
        warm.args(["-t", "50"]).arg(self.url.expose());
        self.run_tool(warm)?;
        let prefix = dir.join("lat");
        let mut cmd = self.pgbench_cmd(script, 1);
        cmd.args(["-t", &self.args.queries.to_string(), "-l"])
            .arg(format!("--log-prefix={}", prefix.display()))
            .arg(self.url.expose());
        self.run_tool(cmd)?;
        let mut lat = Vec::new();
        for e in std::fs::read_dir(&dir)? {
            let text = std::fs::read_to_string(e?.path())?;
            for line in text.lines() {
                if let Some(us) = line.split_whitespace().nth(2) {
                    lat.push(us.parse::<f64>()? / 1000.0);
                }
            }
        }
        if lat.is_empty() {
            return Err(format!("pgbench wrote no latency log for {script}").into());
        }
        Ok(percentiles(lat))
    }

    /// The limit's W5: `\copy` of the CSV files generated from w5_source.sql.
    fn limit_copy(&self) -> Res<f64> {
        let dir = target_dir().join("workload-data");
        let n = self.args.executions;
        let (ecsv, scsv) = (
            dir.join(format!("executions-{n}.csv")),
            dir.join(format!("execution_steps-{n}.csv")),
        );
        if !ecsv.exists() || !scsv.exists() {
            eprintln!("  generating the W5 CSV files from w5_source.sql (not timed)");
            std::fs::create_dir_all(&dir)?;
            self.ensure_views()?;
            let mut cmd = Command::new(self.psql());
            cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url.expose()])
                .arg("-c")
                .arg(format!(
                    "\\copy (SELECT * FROM w5_exec_src) TO '{}' CSV",
                    ecsv.display()
                ))
                .arg("-c")
                .arg(format!(
                    "\\copy (SELECT * FROM w5_step_src) TO '{}' CSV",
                    scsv.display()
                ));
            self.run_tool(cmd)?;
        }
        let mut cmd = Command::new(self.psql());
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url.expose()])
            .arg("-c")
            .arg(format!(
                "\\copy executions (id, workflow_id, status, user_id, data, error, started_at, completed_at) FROM '{}' CSV",
                ecsv.display()
            ))
            .arg("-c")
            .arg(format!(
                "\\copy execution_steps (execution_id, node_id, status, input, output, error, retry_count, started_at, completed_at) FROM '{}' CSV",
                scsv.display()
            ));
        let t0 = Instant::now();
        self.run_tool(cmd)?;
        let secs = t0.elapsed().as_secs_f64();
        let (e, s) = (self.count("executions")?, self.count("execution_steps")?);
        if e as u64 != n || s as u64 != n * 10 {
            return Err(format!("limit W5 loaded {e}/{s} rows").into());
        }
        Ok(secs)
    }

    fn ensure_views(&self) -> Res<()> {
        // The deterministic W5 views, scaled when --executions is not 100000.
        let n = self.args.executions;
        let src = std::fs::read_to_string(self.args.limit_dir.join("sql/w5_source.sql"))?
            .replace(
                "generate_series(0, 99999)",
                &format!("generate_series(0, {})", n - 1),
            )
            .replace(
                "generate_series(0, 999999)",
                &format!("generate_series(0, {})", n * 10 - 1),
            )
            .replace("% 100000)", &format!("% {n})"));
        self.sql(&src)
    }
}

fn new_start(rng: &mut Rng) -> (NewExecution, Vec<NewExecutionStep>) {
    let (w, u, n) = (
        rng.below(WORKFLOWS),
        rng.below(USERS),
        1 + rng.below(1_000_000_000),
    );
    let e = NewExecution::new(workflow_id(w))
        .user_id(format!("user-{u}"))
        .data(execution_data(n));
    let steps = (0..NODES)
        .map(|k| NewExecutionStep::new(e.id, format!("node-{k}")).input(step_input(k)))
        .collect();
    (e, steps)
}

const LEASE: Duration = Duration::from_secs(60);

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

/// Claims up to `n` steps in one statement and completes them: one by one
/// (autocommit) when `n` is 1, else in one transaction (sorted by execution;
/// retried on deadlock). Returns how many steps were completed.
fn complete_batch(conn: &mut PgConnection, worker: &str, n: i64, rng: &mut Rng) -> Res<u64> {
    let mut steps = engine::claim_steps(conn, worker, n, LEASE)?;
    if steps.is_empty() {
        return Ok(0);
    }
    let output = step_output(rng.below(1_000_000_000), 0);
    if steps.len() == 1 {
        engine::complete_step(conn, steps[0].id, worker, Some(&output))?;
        return Ok(1);
    }
    steps.sort_by_key(|s| (s.execution_id, s.id));
    let batch: Vec<(uuid::Uuid, Option<serde_json::Value>)> =
        steps.iter().map(|s| (s.id, Some(output.clone()))).collect();
    let mut attempt = 0;
    loop {
        let r = engine::complete_steps(conn, worker, &batch).map(|_| ());
        match r {
            Ok(()) => return Ok(steps.len() as u64),
            Err(e) if attempt < 5 && e.to_string().contains("deadlock") => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

fn any_unfinished(conn: &mut PgConnection) -> Res<bool> {
    Ok(diesel::select(diesel::dsl::exists(executions::table.filter(
        executions::status.eq_any([ExecutionStatus::Pending, ExecutionStatus::Running]),
    )))
    .get_result(conn)?)
}

// ---------------------------------------------------------------- W5 rows (= w5_source.sql)

fn w5_started_at(i: u64, n: u64) -> DateTime<Utc> {
    let base = Utc
        .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date");
    base + chrono::Duration::seconds(((i * 7919) % n) as i64 * 25)
}

thread_local! {
    static W5_N: std::cell::Cell<u64> = const { std::cell::Cell::new(100_000) };
}

fn w5_execution(i: u64) -> CopyExecution {
    let status = ExecutionStatus::ALL[(i % 6) as usize];
    let ts = w5_started_at(i, W5_N.get());
    CopyExecution {
        id: hashed_uuid(0xE1, i),
        workflow_id: workflow_id(i % WORKFLOWS),
        status,
        user_id: Some(format!("user-{}", (i / 6) % USERS)),
        data: Some(execution_data(i)),
        error: (status == ExecutionStatus::Failed)
            .then(|| "step node-9 failed: timeout".to_owned()),
        started_at: Some(ts),
        completed_at: matches!(
            status,
            ExecutionStatus::Completed | ExecutionStatus::Failed | ExecutionStatus::Cancelled
        )
        .then(|| ts + chrono::Duration::seconds(60)),
    }
}

fn w5_step(j: u64) -> CopyStep {
    use ExecutionStatus as E;
    use StepStatus as S;
    let (i, k) = (j / 10, (j % 10) as usize);
    let st = ExecutionStatus::ALL[(i % 6) as usize];
    let ss = match st {
        E::Pending => S::Pending,
        E::Running if k < 5 => S::Completed,
        E::Running if k == 5 => S::Running,
        E::Running => S::Pending,
        E::Paused if k < 5 => S::Completed,
        E::Paused => S::Pending,
        E::Completed => S::Completed,
        E::Failed if k < 9 => S::Completed,
        E::Failed => S::Failed,
        E::Cancelled if k < 5 => S::Completed,
        E::Cancelled => S::Skipped,
    };
    let ts = w5_started_at(i, W5_N.get());
    let start = ts + chrono::Duration::seconds(5 * k as i64);
    CopyStep {
        id: hashed_uuid(0x57, j),
        execution_id: hashed_uuid(0xE1, i),
        node_id: format!("node-{k}"),
        status: ss,
        input: Some(step_input(k)),
        output: (ss == S::Completed).then(|| step_output(i, k)),
        error: (ss == S::Failed).then(|| "timeout".to_owned()),
        retry_count: if ss == S::Failed { 3 } else { 0 },
        started_at: (!matches!(ss, S::Pending | S::Skipped)).then_some(start),
        completed_at: matches!(ss, S::Completed | S::Failed)
            .then(|| start + chrono::Duration::seconds(4)),
    }
}

// ---------------------------------------------------------------- helpers

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn fmt_secs(s: f64) -> String {
    format!("{}", s.ceil().max(1.0) as u64)
}

fn scale_label(n: u64) -> String {
    if n % 1_000_000 == 0 {
        format!("@{}M", n / 1_000_000)
    } else if n % 1000 == 0 {
        format!("@{}k", n / 1000)
    } else {
        format!("@{n}")
    }
}

/// Nearest-rank percentiles (as run.sh computes them) and the mean.
fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let rank = |p: f64| v[((n as f64 * p / 100.0).ceil() as usize).clamp(1, n) - 1];
    (rank(50.0), rank(99.0), v.iter().sum::<f64>() / n as f64)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn server_version(url: &DatabaseUrl) -> String {
    #[derive(QueryableByName)]
    struct V {
        #[diesel(sql_type = diesel::sql_types::Text)]
        v: String,
    }
    connect(url)
        .ok()
        .and_then(|mut c| {
            diesel::sql_query("SELECT current_setting('server_version') AS v")
                .get_result::<V>(&mut c)
                .ok()
        })
        .map_or_else(|| "?".into(), |v| v.v)
}

// ---------------------------------------------------------------- output

fn print_and_save(b: &Bench, started: DateTime<Utc>) -> Res<()> {
    let r = &b.report;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nworkflow-db workload, {} UTC, {cores} cores, PostgreSQL {}, {} run(s), {} executions, {}s per throughput figure{}",
        started.format("%Y-%m-%d %H:%M"),
        server_version(&b.url),
        b.args.runs,
        b.args.executions,
        b.args.duration,
        if b.args.limit {
            ", with the pgbench limit"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "\n| figure | unit | median | min | max | runs |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for f in &r.figures {
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} | {} | {} |",
            if f.limit { "limit: " } else { "" },
            f.name,
            f.unit,
            fmt(f.median()),
            fmt(f.min()),
            fmt(f.max()),
            f.values.len()
        );
    }
    if !r.pairs.is_empty() {
        let _ = writeln!(
            out,
            "\nSpeed ratio crate vs limit (medians; > 1 = the crate is faster): \
             throughput crate/limit, latency and seconds limit/crate\n"
        );
        let _ = writeln!(out, "| crate figure | limit figure | ratio |");
        let _ = writeln!(out, "|---|---|---:|");
        for p in &r.pairs {
            if let Some(x) = r.ratio(p) {
                let _ = writeln!(out, "| {} | {} | {:.2} |", p.ours, p.limit, x);
            }
        }
    }
    for n in &r.notes {
        let _ = writeln!(out, "\nnote: {n}");
    }
    println!("{out}");

    let figures: Vec<Value> = r
        .figures
        .iter()
        .map(|f| {
            let mut o = json!({
                "name": if f.limit { format!("limit: {}", f.name) } else { f.name.clone() },
                "unit": f.unit,
                "median": f.median(),
                "min": f.min(),
                "max": f.max(),
                "runs": f.values.len(),
                "values": f.values,
                "source": if f.limit { "limit" } else { "crate" },
                "better": if f.better == Better::Higher { "higher" } else { "lower" },
            });
            let ratios: BTreeMap<String, f64> = r
                .pairs
                .iter()
                .filter(|p| p.ours == f.name)
                .filter_map(|p| Some((format!("limit: {}", p.limit), r.ratio(p)?)))
                .collect();
            if !ratios.is_empty() {
                o["speed_ratio_vs"] = json!(ratios);
            }
            o
        })
        .collect();
    let path = target_dir().join("workload.json");
    std::fs::create_dir_all(target_dir())?;
    std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
    std::fs::write(target_dir().join("workload.md"), &out)?;
    eprintln!("wrote {} and workload.md", path.display());
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = parse_args()?;
    if args.limit {
        let missing: Vec<&str> = [
            "w1.sql",
            "w1_cte.sql",
            "w2.sql",
            "w2_single.sql",
            "w3_three.sql",
            "w3_json.sql",
            "w3_lateral.sql",
            "w4.sql",
            "sql/w2_pool.sql",
            "sql/w5_source.sql",
        ]
        .into_iter()
        .filter(|f| !args.limit_dir.join(f).is_file())
        .collect();
        if !missing.is_empty() {
            return Err(format!(
                "--limit: the pgbench limit scripts are not in {} (missing {}); \
                 set PERF_LIMIT_DIR to the perf-limit directory",
                args.limit_dir.display(),
                missing.join(", ")
            )
            .into());
        }
        let pgbench = std::env::var("PGBENCH")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pgbench".into());
        if Command::new(&pgbench).arg("--version").output().is_err() {
            return Err(format!("--limit: pgbench not found at {pgbench}; set PGBENCH").into());
        }
    }
    W5_N.set(args.executions);
    let started = Utc::now();
    let url = server_url()?.with_database(&args.database);
    let mut b = Bench {
        args,
        url,
        report: Report::default(),
    };
    eprintln!(
        "creating database {} (dropped if present), migrating, seeding 100 workflows",
        b.args.database
    );
    b.recreate_database()?;
    if b.args.limit {
        b.ensure_views()?;
    }
    for rep in 1..=b.args.runs {
        if b.args.wants("W1") {
            b.w1(rep)?;
        }
        if b.args.wants("W2") {
            b.w2(rep)?;
        }
        if b.args.wants("W6") {
            b.w6(rep)?;
        }
        let needs_data = ["W5", "W3", "W4"].iter().any(|w| b.args.wants(w));
        if needs_data {
            b.w5(rep)?;
        }
        if b.args.wants("W3") {
            b.w3(rep)?;
        }
        if b.args.wants("W4") {
            b.w4(rep)?;
        }
        if b.args.wants("CLAIM") {
            b.claim_growth(rep)?;
        }
        if b.args.wants("R2D2") {
            b.r2d2(rep)?;
        }
    }
    print_and_save(&b, started)?;
    if !b.args.keep {
        b.drop_database()?;
    }
    Ok(())
}
