//! A complete engine service on `workflow_db::runtime`: the shape a real
//! service takes, with a demo workload instead of real work.
//!
//! ```text
//! cargo run --example engine --features runtime -- --executions 200 --workers 4
//! ```
//!
//! Against `DATABASE_URL` (from the environment or `.env`), it
//!
//! 1. migrates the database (creating it when missing), as every instance
//!    of a service may do at boot;
//! 2. creates the workflow `engine-example-diamond` (or reuses it by name):
//!    `fetch` (type `http`) -> `parse` and `enrich` -> `store` (type `sql`),
//!    every node with `config.max_retries = 3`;
//! 3. starts one [`Maintenance`] (which reclaims the steps of dead workers)
//!    and `--workers` [`Worker`]s with a handler per node type; some
//!    handlers fail their first attempts on purpose, so retries happen;
//! 4. starts `--executions` executions of the workflow;
//! 5. works until **every** execution in the database is final, those that
//!    an earlier run left behind (killed with `kill -9`, say) included;
//! 6. shuts the workers and maintenance down gracefully (also on SIGINT or
//!    SIGTERM), runs the invariant checker and prints a one-line summary.
//!
//! It exits 0 only when every execution completed and the checker found
//! nothing; 1 otherwise (a failed execution, a violation, `--timeout-secs`
//! passed, interrupted, an error); 2 on a usage error. `bin/crash-test`
//! kills it mid-run and runs it again with `--no-start` to prove that the
//! restart finishes the work and that no step completes twice.
//!
//! Options:
//!
//! ```text
//! --executions N               executions to start (default 200)
//! --workers K                  workers in this process (default 4)
//! --concurrency C              handlers running at once per worker (default 8)
//! --step-ms MS                 average time a handler works (default 40)
//! --lease-ms MS                lease of a claimed step (default 30000)
//! --maintenance-interval-ms MS time between maintenance rounds (default 1000)
//! --timeout-secs S             give up when not done by then (default 600)
//! --no-start                   start nothing: only finish what the database holds
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use workflow_db::engine::{self, Backoff, CheckOptions};
use workflow_db::runtime::{
    AsyncPool, HandlerError, HandlerResult, Maintenance, MaintenanceOptions, RetryPolicy,
    StepContext, Worker, WorkerOptions, WorkerReport,
};
use workflow_db::schema::{execution_steps, workflows};
use workflow_db::{
    Config, Edge, ExecutionStatus, NewExecution, NewWorkflow, Node, StepStatus, Workflow,
    WorkflowChanges, WorkflowGraph, run_pending_migrations,
};

/// The workflow this service runs, found again by name at every start.
const WORKFLOW: &str = "engine-example-diamond";

const USAGE: &str = "usage: engine [--executions N] [--workers K] [--concurrency C] [--step-ms MS] \
                     [--lease-ms MS] [--maintenance-interval-ms MS] [--timeout-secs S] [--no-start]";

/// The command line.
#[derive(Debug, Clone)]
struct Args {
    executions: u64,
    workers: usize,
    concurrency: usize,
    step: Duration,
    lease: Duration,
    maintenance_interval: Duration,
    timeout: Duration,
    no_start: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("engine: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Binaries load `.env`; the library never does.
    let _ = dotenvy::dotenv();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            // The crate's errors never contain the database password.
            eprintln!("engine: {}", error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The service; whether everything completed and the checker is clean.
async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let began = Instant::now();
    let mut config = Config::from_env()?;
    // Each worker makes its database calls (claim, heartbeat, report) one
    // at a time, so it holds at most one pooled connection; the `sql`
    // handler reads through the pool too, and so do maintenance and the
    // progress queries below. Waiting for a connection is cheap (a queue
    // of futures), running out of them for minutes is not.
    config.pool_size = config.pool_size.max(2 * args.workers as u32 + 2);

    // Safe from many instances at once (an advisory lock), and a no-op when
    // nothing is pending. Blocking, but nothing else runs yet.
    let applied = run_pending_migrations(&config)?;
    let pool = AsyncPool::from_config(&config).await?;
    let (workflow, created) = pool.run(diamond_workflow).await?;
    eprintln!(
        "engine: {} ({} migration(s) applied); workflow {WORKFLOW} {} ({}), version {}",
        config.database_url.target(), // host, port and database: never the password
        applied.len(),
        workflow.id,
        if created { "created" } else { "reused" },
        workflow.version,
    );

    // SIGINT or SIGTERM: stop starting and waiting, shut down gracefully
    // (listening from now on: the workers below hold leases).
    let (signalled, mut signal) = tokio::sync::watch::channel(None);
    tokio::spawn(async move { signalled.send(Some(shutdown_signal().await)) });
    let interrupted =
        |signal: &tokio::sync::watch::Receiver<Option<&'static str>>| *signal.borrow();

    // One maintenance per process: every instance runs one, PostgreSQL
    // elects the leader that reclaims expired leases. A step whose worker
    // died is claimable again at most lease + interval after its last
    // heartbeat.
    let mut maintenance_options = MaintenanceOptions::default();
    maintenance_options.interval = args.maintenance_interval;
    let maintenance =
        Maintenance::new(pool.clone(), &config.database_url, maintenance_options)?.spawn();

    let mut workers = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        let mut options = WorkerOptions::default(); // a unique id: host-pid-xxxx
        options.concurrency = args.concurrency;
        options.lease = args.lease; // heartbeats every third of it
        // Handlers take milliseconds: a shutdown that waits longer is stuck.
        options.shutdown_timeout = Duration::from_secs(10);
        let worker = with_handlers(Worker::new(pool.clone(), options), &pool, args.step)
            // Claim the moment a step becomes claimable, not at the next poll.
            .notifications(&config.database_url)
            .spawn()
            .await?;
        workers.push(worker);
    }
    eprintln!(
        "engine: {} worker(s) x {} slots, lease {:?}, maintenance every {:?}",
        args.workers, args.concurrency, args.lease, args.maintenance_interval
    );

    // Start the executions while the workers already run, as a service
    // whose API accepts work does: 50 starts per transaction.
    let mut started = 0;
    while !args.no_start && started < args.executions && interrupted(&signal).is_none() {
        let n = (args.executions - started).min(50);
        let id = workflow.id;
        pool.run(move |c| {
            c.transaction(|c| {
                for _ in 0..n {
                    engine::start_execution(c, &NewExecution::new(id).user_id("engine-example"))?;
                }
                Ok(())
            })
        })
        .await?;
        started += n;
    }
    if !args.no_start {
        eprintln!("engine: started {started} execution(s)");
    }

    // Work until every execution in the database is final: ours, and those
    // a killed run left behind (maintenance hands their steps out again
    // once their leases expire).
    let deadline = Instant::now() + args.timeout;
    let mut next_progress = Instant::now();
    let mut timed_out = false;
    while interrupted(&signal).is_none() {
        let (by_status, running) = pool
            .run(|c| {
                let by_status = engine::count_by_status(c, None)?;
                let running = execution_steps::table
                    .filter(execution_steps::status.eq(StepStatus::Running))
                    .count()
                    .get_result::<i64>(c)?;
                Ok((by_status, running))
            })
            .await?;
        let total: i64 = by_status.iter().map(|(_, n)| n).sum();
        let open: i64 = by_status
            .iter()
            .filter(|(s, _)| !s.is_final())
            .map(|(_, n)| n)
            .sum();
        if open == 0 {
            break;
        }
        if Instant::now() >= next_progress {
            eprintln!(
                "engine: {} of {total} execution(s) final, {running} step(s) running",
                total - open
            );
            next_progress = Instant::now() + Duration::from_secs(2);
        }
        // A worker whose task ended (it could not connect its listener,
        // say) would never claim again: stop instead of waiting for ever.
        if let Some(dead) = workers.iter().find(|w| !w.health().running) {
            eprintln!("engine: worker {} stopped on its own", dead.id());
            break;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "engine: {open} execution(s) still not final after {:?}",
                args.timeout
            );
            timed_out = true;
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = signal.changed() => {}
        }
    }
    let interrupted = interrupted(&signal);
    if let Some(name) = interrupted {
        eprintln!("engine: {name}: shutting down");
    }

    // Graceful shutdown, all workers at once: no new claims, running
    // handlers finish (or are released back to pending without spending a
    // retry), then maintenance gives up the leadership at once.
    let mut shutdowns = JoinSet::new();
    for worker in workers {
        shutdowns.spawn(worker.shutdown());
    }
    let mut report = WorkerReport::default();
    let mut worker_errors = 0;
    while let Some(joined) = shutdowns.join_next().await {
        match joined? {
            Ok(r) => {
                report.claimed += r.claimed;
                report.completed += r.completed;
                report.failed += r.failed;
                report.lost += r.lost;
                report.released += r.released;
            }
            Err(error) => {
                worker_errors += 1;
                eprintln!("engine: a worker failed: {}", error_chain(&error));
            }
        }
    }
    let maintenance = maintenance.shutdown().await?;

    // What the database says, not what this process believes.
    let (by_status, steps, invariants) = pool
        .run(|c| {
            let by_status = engine::count_by_status(c, None)?;
            let steps = execution_steps::table.count().get_result::<i64>(c)?;
            let invariants = engine::check_invariants(c, &CheckOptions::default())?;
            Ok((by_status, steps, invariants))
        })
        .await?;
    let count = |status: ExecutionStatus| {
        by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    };
    let total: i64 = by_status.iter().map(|(_, n)| n).sum();
    let completed = count(ExecutionStatus::Completed);
    let failed = count(ExecutionStatus::Failed);
    let ok = completed == total
        && invariants.is_clean()
        && interrupted.is_none()
        && !timed_out
        && worker_errors == 0;
    for violation in invariants.violations.iter().take(20) {
        eprintln!("engine: invariant: {violation}");
    }
    println!(
        "engine: {}: {total} executions ({completed} completed, {failed} failed, {} other), \
         {steps} steps; this run: {} claimed, {} completed, {} failed attempts, {} released, \
         {} lost, {} reclaimed; {:.1} s; invariants {}",
        if ok { "ok" } else { "FAILED" },
        total - completed - failed,
        report.claimed,
        report.completed,
        report.failed,
        report.released,
        report.lost,
        maintenance.reclaimed,
        began.elapsed().as_secs_f64(),
        if invariants.is_clean() {
            format!("clean ({} warnings)", invariants.warnings())
        } else {
            format!("BROKEN ({} errors)", invariants.errors())
        },
    );
    Ok(ok)
}

/// The diamond `fetch -> (parse, enrich) -> store`, created the first time
/// and found by name afterwards (the oldest of that name: two instances
/// booting at once may both create it, which does no harm). A stored graph
/// that differs from this one is updated, which bumps its version;
/// running executions keep the version they started with.
fn diamond_workflow(conn: &mut PgConnection) -> workflow_db::Result<(Workflow, bool)> {
    // `max_retries`: each step may fail three times before it fails its
    // execution for good. (The handlers see their step, not its node's
    // config; a real service would keep its settings there and read them.)
    let node =
        |id: &str, node_type: &str| Node::new(id, node_type).config(json!({ "max_retries": 3 }));
    let graph = WorkflowGraph {
        nodes: vec![
            node("fetch", "http"),
            node("parse", "parse"),
            node("enrich", "enrich"),
            node("store", "sql"),
        ],
        edges: vec![
            Edge::new("fetch", "parse"),
            Edge::new("fetch", "enrich"),
            Edge::new("parse", "store"),
            Edge::new("enrich", "store"),
        ],
    };
    let existing = workflows::table
        .filter(workflows::name.eq(WORKFLOW))
        .order((workflows::created_at, workflows::id))
        .select(Workflow::as_select())
        .first(conn)
        .optional()?;
    match existing {
        None => Ok((
            NewWorkflow::from_graph(WORKFLOW, &graph).create(conn)?,
            true,
        )),
        Some(workflow) if workflow.graph()? == graph => Ok((workflow, false)),
        Some(workflow) => {
            let changes = WorkflowChanges {
                nodes: Some(graph.nodes_json()),
                edges: Some(graph.edges_json()),
                ..WorkflowChanges::default()
            };
            Ok((Workflow::update(conn, workflow.id, &changes)?, false))
        }
    }
}

/// The handlers, one per node type. Each pretends to work for about
/// `step` and fails some attempts on purpose.
fn with_handlers(worker: Worker, pool: &AsyncPool, step: Duration) -> Worker {
    // Short backoffs so that the demo's retries come back within a second
    // (the default is 1 s doubling up to 5 min); a timeout makes a hung
    // attempt a failed one instead of a step held for ever.
    let policy = RetryPolicy {
        backoff: Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(5),
        },
        jitter: 0.5,
        timeout: Some(Duration::from_secs(30)),
    };
    let pool = pool.clone();
    worker
        .handle_with("http", policy, move |ctx| fetch(ctx, step))
        .handle_with("parse", policy, move |ctx| parse(ctx, step))
        .handle_with("enrich", policy, move |ctx| enrich(ctx, step))
        .handle_with("sql", policy, move |ctx| store(ctx, pool.clone(), step))
}

/// `http`: the first attempt of one step in five fails (a flaky upstream).
async fn fetch(ctx: StepContext, step: Duration) -> HandlerResult {
    work(&ctx, step * 2).await?;
    fail_early_attempts(&ctx, 5, 1, "upstream answered 503")?;
    Ok(Some(
        json!({ "status": 200, "bytes": 1_000 + id_hash(&ctx) % 9_000 }),
    ))
}

/// `parse`: the first attempt of one step in five fails.
async fn parse(ctx: StepContext, step: Duration) -> HandlerResult {
    work(&ctx, step / 2).await?;
    fail_early_attempts(&ctx, 5, 1, "malformed record")?;
    Ok(Some(json!({ "records": 1 + id_hash(&ctx) % 50 })))
}

/// `enrich`: one step in seven fails twice before it succeeds (still
/// within its three retries).
async fn enrich(ctx: StepContext, step: Duration) -> HandlerResult {
    work(&ctx, step).await?;
    fail_early_attempts(&ctx, 7, 2, "rate limited")?;
    Ok(Some(
        json!({ "score": (id_hash(&ctx) % 100) as f64 / 100.0 }),
    ))
}

/// `sql`: reads what `parse` and `enrich` produced (a handler gets its own
/// step only; anything else it reads through the pool), "stores" it.
async fn store(ctx: StepContext, pool: AsyncPool, step: Duration) -> HandlerResult {
    let execution = ctx.execution_id();
    let upstream: Vec<(String, Option<Value>)> = pool
        .run(move |c| {
            Ok(execution_steps::table
                .filter(execution_steps::execution_id.eq(execution))
                .filter(execution_steps::node_id.eq_any(["parse", "enrich"]))
                .select((execution_steps::node_id, execution_steps::output))
                .load(c)?)
        })
        .await?;
    let output = |node: &str| {
        upstream
            .iter()
            .find(|(id, _)| id == node)
            .and_then(|(_, output)| output.clone())
            .unwrap_or(Value::Null)
    };
    let (records, score) = (
        output("parse")["records"].clone(),
        output("enrich")["score"].clone(),
    );
    work(&ctx, step).await?;
    fail_early_attempts(&ctx, 5, 1, "deadlock detected (simulated)")?;
    // Handlers run at least once (a crash re-runs them): a real store keys
    // its write on the step id, e.g. INSERT .. ON CONFLICT (step_id) DO NOTHING.
    Ok(Some(
        json!({ "stored": records, "score": score, "key": ctx.step_id() }),
    ))
}

/// Sleeps about `mean` (50-150 %, fixed per step), or gives up when the
/// run is cancelled (lease lost, timed out, shutdown gave up waiting).
async fn work(ctx: &StepContext, mean: Duration) -> Result<(), HandlerError> {
    let time = mean * (50 + (id_hash(ctx) % 101) as u32) / 100;
    tokio::select! {
        () = tokio::time::sleep(time) => Ok(()),
        () = ctx.cancelled() => Err("cancelled: lease lost or shutting down".into()),
    }
}

/// Fails attempts `1..=attempts` of one step in `one_in` (chosen by its
/// id, so the same steps fail whichever worker or process runs them). An
/// attempt after a crash counts too: a step reclaimed from a killed worker
/// may skip its planned failure.
fn fail_early_attempts(
    ctx: &StepContext,
    one_in: u64,
    attempts: i32,
    error: &'static str,
) -> Result<(), HandlerError> {
    if id_hash(ctx) % one_in == 0 && ctx.attempt() <= attempts {
        return Err(format!("{error} (attempt {}, planned)", ctx.attempt()).into());
    }
    Ok(())
}

/// A number fixed per step: the random low bits of its UUIDv7.
fn id_hash(ctx: &StepContext) -> u64 {
    ctx.step_id().as_u64_pair().1
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what `kill`, systemd and
/// Kubernetes send to stop a service) with the signal's name.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// `--name value` options; `Ok(None)` for `--help`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        executions: 200,
        workers: 4,
        concurrency: 8,
        step: Duration::from_millis(40),
        lease: Duration::from_millis(30_000),
        maintenance_interval: Duration::from_millis(1_000),
        timeout: Duration::from_secs(600),
        no_start: false,
    };
    while let Some(arg) = args.next() {
        let mut number = |min: u64| -> Result<u64, String> {
            let value = args.next().ok_or(format!("{arg} needs a value"))?;
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= min)
                .ok_or(format!(
                    "{arg}: expected a whole number of at least {min}, got {value:?}"
                ))
        };
        match arg.as_str() {
            "--executions" => parsed.executions = number(0)?,
            "--workers" => parsed.workers = number(1)? as usize,
            "--concurrency" => parsed.concurrency = number(1)? as usize,
            "--step-ms" => parsed.step = Duration::from_millis(number(0)?),
            "--lease-ms" => parsed.lease = Duration::from_millis(number(100)?),
            "--maintenance-interval-ms" => {
                parsed.maintenance_interval = Duration::from_millis(number(10)?)
            }
            "--timeout-secs" => parsed.timeout = Duration::from_secs(number(1)?),
            "--no-start" => parsed.no_start = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(parsed))
}

/// An error with its sources, `a: b: c`.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
