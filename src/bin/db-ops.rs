//! `db-ops`: inspect and steer executions from a terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use diesel::PgConnection;
use serde_json::json;
use workflow_db::cli::{self, CommonArgs, Reporter};
use workflow_db::engine::{self, ExecutionFilter};
use workflow_db::error::GuardRule;
use workflow_db::models::{Execution, ExecutionEvent, ExecutionStep};
use workflow_db::ops;
use workflow_db::runtime::AsyncPool;
use workflow_db::studio::{self, Studio, StudioOptions};
use workflow_db::{Config, DatabaseUrl, Error, ExecutionStatus};

/// Inspect and steer the executions on DATABASE_URL: list, show (steps and
/// graph), events, why, cancel, pause, resume, retry, counts, stuck. Ids may
/// be short (a unique prefix of at least 8 hex digits). Changes ask for
/// confirmation on a terminal; scripts pass --yes (without a terminal and
/// without --yes nothing is changed, exit 4).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Executions, newest first, one keyset page at a time.
    List(ListArgs),
    /// One execution: its fields, its steps as a table and its graph.
    Show {
        /// Execution id (or short id).
        id: String,
    },
    /// The execution's event timeline (every status transition).
    Events {
        /// Execution id (or short id).
        id: String,
    },
    /// What an execution (or, with --step, one step) waits for.
    Why {
        /// Execution id (or short id).
        #[arg(required_unless_present = "step", conflicts_with = "step")]
        id: Option<String>,
        /// A step id (or short id) instead of an execution.
        #[arg(long, value_name = "STEP")]
        step: Option<String>,
    },
    /// Cancel an execution that is not final (its pending steps are skipped).
    Cancel(ChangeArgs),
    /// Pause a running execution (no step of it is claimed until resume).
    Pause(ChangeArgs),
    /// Resume a paused execution.
    Resume(ChangeArgs),
    /// Replay a failed or cancelled execution: its failed and skipped steps run again.
    Retry(ChangeArgs),
    /// Executions by status, ready and running steps by queue.
    Counts,
    /// The web dashboard: overview, executions, graphs, steps, queues,
    /// schedules, live updates (127.0.0.1:4000 unless --bind says otherwise).
    Studio(StudioArgs),
    /// Running steps whose lease expired, running executions with no runnable step.
    Stuck {
        /// List at most this many of each kind.
        #[arg(long, default_value_t = 100, value_name = "N",
              value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
}

#[derive(clap::Args, Debug)]
struct ListArgs {
    /// Executions per page (at most 1000).
    #[arg(long, default_value_t = 20, value_name = "N",
          value_parser = clap::value_parser!(i64).range(1..=1000))]
    limit: i64,
    /// Continue after this cursor (printed at the end of the previous page).
    #[arg(long, value_name = "CURSOR")]
    after: Option<String>,
    /// Only executions of this workflow (id, short id or name).
    #[arg(long, value_name = "WORKFLOW")]
    workflow: Option<String>,
    /// Only executions with this status (repeatable).
    #[arg(long, value_name = "STATUS", value_parser = ops::parse_execution_status)]
    status: Vec<ExecutionStatus>,
    /// Only executions started by this user.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Only executions started at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    since: Option<DateTime<Utc>>,
    /// Only executions started before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    until: Option<DateTime<Utc>>,
    /// Only executions with a step on this queue.
    #[arg(long, value_name = "QUEUE")]
    queue: Option<String>,
}

#[derive(clap::Args, Debug)]
struct StudioArgs {
    /// Address to listen on (port 0 picks a free port). An address other
    /// hosts can reach needs an access token.
    #[arg(long, default_value = "127.0.0.1:4000", value_name = "ADDR")]
    bind: SocketAddr,
    /// Offer cancel, pause, resume and retry (each asks for confirmation).
    #[arg(long)]
    allow_actions: bool,
    /// Require this access token on every request (prefer the environment
    /// variable: a command line is visible to other users of the host).
    #[arg(long, env = studio::TOKEN_ENV, hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
}

#[derive(clap::Args, Debug)]
struct ChangeArgs {
    /// Execution id (or short id).
    id: String,
    /// Do it without asking (required without a terminal).
    #[arg(long)]
    yes: bool,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    let out = args.common.reporter();
    out.finish("db-ops", run(&args, out))
}

fn run(args: &Args, out: Reporter) -> anyhow::Result<ExitCode> {
    let url = args.common.url()?;
    if let Command::Studio(studio) = &args.command {
        run_studio(url, studio, out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let conn = &mut workflow_db::pool::connect_as(&url, "workflow-db-ops")?;
    let text = !args.common.json;
    match &args.command {
        Command::List(list) => run_list(conn, out, text, list)?,
        Command::Show { id } => run_show(conn, out, text, id)?,
        Command::Events { id } => run_events(conn, out, id)?,
        Command::Why { id, step } => run_why(conn, out, id.as_deref(), step.as_deref())?,
        Command::Cancel(c) => change(conn, out, c, "cancel", engine::cancel)?,
        Command::Pause(c) => change(conn, out, c, "pause", engine::pause)?,
        Command::Resume(c) => change(conn, out, c, "resume", engine::resume)?,
        Command::Retry(c) => change(conn, out, c, "retry", engine::replay_execution)?,
        Command::Counts => run_counts(conn, out)?,
        Command::Stuck { limit } => run_stuck(conn, out, *limit)?,
        Command::Studio(_) => unreachable!("served above"),
    }
    Ok(ExitCode::SUCCESS)
}

fn execution_fields(e: &Execution, workflow: Option<&str>) -> serde_json::Value {
    json!({
        "id": e.id,
        "workflow_id": e.workflow_id,
        "workflow": workflow,
        "workflow_version": e.workflow_version,
        "status": e.status.as_str(),
        "user_id": e.user_id,
        "started_at": e.started_at,
        "completed_at": e.completed_at,
        "error": e.error,
    })
}

fn run_list(
    conn: &mut PgConnection,
    out: Reporter,
    text: bool,
    args: &ListArgs,
) -> anyhow::Result<()> {
    let mut filter = ExecutionFilter {
        statuses: args.status.clone(),
        user_id: args.user.clone(),
        started_from: args.since,
        started_before: args.until,
        queue: args.queue.clone(),
        ..ExecutionFilter::default()
    };
    if let Some(w) = &args.workflow {
        ops::filter_by_workflow(conn, &mut filter, w)?;
    }
    let page = engine::list_executions(conn, &filter, args.after.as_deref(), args.limit)?;
    let ids: Vec<_> = page.executions.iter().map(|e| e.workflow_id).collect();
    let names = ops::workflow_names(conn, &ids)?;
    if text {
        println!(
            "{:<36}  {:<9}  {:<20}  {:<19}  {:<12}  ERROR",
            "ID", "STATUS", "WORKFLOW", "STARTED", "USER"
        );
    }
    for e in &page.executions {
        let name = names.get(&e.workflow_id).map(String::as_str);
        let human = format!(
            "{:<36}  {:<9}  {:<20}  {:<19}  {:<12}  {}",
            e.id,
            e.status.as_str(),
            format!("{} v{}", name.unwrap_or("?"), e.workflow_version),
            e.started_at
                .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
            e.user_id.as_deref().unwrap_or("-"),
            ops::one_line(e.error.as_deref().unwrap_or(""), ops::ERROR_WIDTH),
        );
        out.event("execution", human.trim_end(), execution_fields(e, name));
    }
    let human = match &page.next_cursor {
        Some(c) => format!(
            "{} execution(s); next page: --after {c}",
            page.executions.len()
        ),
        None => format!("{} execution(s); last page", page.executions.len()),
    };
    out.event(
        "page",
        human,
        json!({ "count": page.executions.len(), "next_cursor": page.next_cursor }),
    );
    Ok(())
}

fn step_fields(s: &ExecutionStep) -> serde_json::Value {
    json!({
        "id": s.id,
        "node_id": s.node_id,
        "node_type": s.node_type,
        "queue": s.queue_name(),
        "status": s.status.as_str(),
        "attempt": s.attempt,
        "retry_count": s.retry_count,
        "max_retries": s.max_retries,
        "started_at": s.started_at,
        "completed_at": s.completed_at,
        "locked_by": s.locked_by,
        "locked_until": s.locked_until,
        "error": s.error,
    })
}

fn run_show(conn: &mut PgConnection, out: Reporter, text: bool, id: &str) -> anyhow::Result<()> {
    let e = ops::resolve_execution(conn, id)?;
    let names = ops::workflow_names(conn, &[e.workflow_id])?;
    let name = names.get(&e.workflow_id).map(String::as_str);
    let steps = ExecutionStep::list_for_execution(conn, e.id)?;
    let edges = ops::execution_edges(conn, e.id)?;
    let colour = ops::use_colour(std::io::stdout().is_terminal());
    let human = format!(
        "execution {}\n  status:    {}\n  workflow:  {} v{} ({})\n  user:      {}\n  started:   {}\n  completed: {}{}",
        e.id,
        ops::paint(e.status.as_str(), colour),
        name.unwrap_or("?"),
        e.workflow_version,
        e.workflow_id,
        e.user_id.as_deref().unwrap_or("-"),
        e.started_at.map_or("-".into(), |t| t.to_rfc3339()),
        e.completed_at.map_or("-".into(), |t| t.to_rfc3339()),
        e.error.as_deref().map_or(String::new(), |err| format!(
            "\n  error:     {}",
            err.replace('\n', "\n             ")
        )),
    );
    out.event("execution", human, execution_fields(&e, name));
    if text {
        println!();
        for line in ops::step_table(&steps) {
            println!("{line}");
        }
        println!();
        println!("graph:");
        for line in ops::draw_graph(&steps, &edges, colour) {
            println!("  {line}");
        }
    } else {
        for s in &steps {
            out.event("step", "", step_fields(s));
        }
        for edge in &edges {
            out.event("edge", "", json!(edge));
        }
    }
    Ok(())
}

fn run_events(conn: &mut PgConnection, out: Reporter, id: &str) -> anyhow::Result<()> {
    let e = ops::resolve_execution(conn, id)?;
    let steps = ExecutionStep::list_for_execution(conn, e.id)?;
    let node_of: std::collections::HashMap<_, _> =
        steps.iter().map(|s| (s.id, s.node_id.as_str())).collect();
    for ev in ExecutionEvent::for_execution(conn, e.id)? {
        let payload = ev.payload.clone().unwrap_or_default();
        let field = |k: &str| payload.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let node = field("node_id").or_else(|| {
            ev.step_id
                .and_then(|s| node_of.get(&s).map(|n| (*n).to_owned()))
        });
        let worker = field("worker").or_else(|| field("locked_by"));
        let error = field("error");
        let what = match &node {
            Some(n) => format!("step {n}"),
            None => "execution".to_owned(),
        };
        let human = format!(
            "{}  {:<20} {} -> {}{}{}",
            ev.created_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            what,
            ev.from_status.as_deref().unwrap_or("(new)"),
            ev.to_status,
            worker
                .as_deref()
                .map_or(String::new(), |w| format!("  worker {w}")),
            error.as_deref().map_or(String::new(), |e| format!(
                "  error: {}",
                e.replace('\n', " ")
            )),
        );
        out.event(
            "transition",
            human,
            json!({
                "time": ev.created_at,
                "execution_id": ev.execution_id,
                "step_id": ev.step_id,
                "node_id": node,
                "from": ev.from_status,
                "to": ev.to_status,
                "worker": worker,
                "error": error,
            }),
        );
    }
    Ok(())
}

fn run_why(
    conn: &mut PgConnection,
    out: Reporter,
    id: Option<&str>,
    step: Option<&str>,
) -> anyhow::Result<()> {
    let rows = match (id, step) {
        (_, Some(step)) => {
            let s = ops::resolve_step(conn, step)?;
            engine::why_step_not_running(conn, s.id)?
        }
        (Some(id), None) => {
            let e = ops::resolve_execution(conn, id)?;
            engine::why_not_running(conn, e.id)?
        }
        (None, None) => anyhow::bail!("an execution id or --step is required"),
    };
    for w in rows {
        let human = match &w.node_id {
            Some(n) => format!("{n}: {} ({})", w.reason, w.detail),
            None => format!("{} ({})", w.reason, w.detail),
        };
        out.event("why", human, json!(w));
    }
    Ok(())
}

/// Asks on the terminal; anything but `y`/`yes` is a no.
fn confirm(question: &str) -> anyhow::Result<bool> {
    let mut err = std::io::stderr();
    write!(err, "{question} [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

fn change(
    conn: &mut PgConnection,
    out: Reporter,
    args: &ChangeArgs,
    action: &str,
    apply: fn(&mut PgConnection, uuid::Uuid) -> workflow_db::Result<Execution>,
) -> anyhow::Result<()> {
    let e = ops::resolve_execution(conn, &args.id)?;
    if !args.yes {
        let question = format!("{action} execution {} ({})?", e.id, e.status.as_str());
        let confirmed = std::io::stdin().is_terminal() && confirm(&question)?;
        if !confirmed {
            return Err(Error::ProtectedEnvironment {
                rule: GuardRule::NotConfirmed,
                message: format!(
                    "{action} of execution {} not confirmed (answer y on a terminal, or pass --yes); nothing was changed",
                    e.id
                ),
            }
            .into());
        }
    }
    let before = e.status;
    let after = apply(conn, e.id)?;
    out.event(
        action,
        format!(
            "{action}: execution {} {} -> {}",
            after.id,
            before.as_str(),
            after.status.as_str()
        ),
        json!({
            "id": after.id,
            "from": before.as_str(),
            "status": after.status.as_str(),
        }),
    );
    Ok(())
}

fn run_counts(conn: &mut PgConnection, out: Reporter) -> anyhow::Result<()> {
    for (status, count) in engine::count_by_status(conn, None)? {
        out.event(
            "executions",
            format!("executions {:<10} {count}", status.as_str()),
            json!({ "status": status.as_str(), "count": count }),
        );
    }
    for (queue, steps) in engine::ready_steps_by_queue(conn)? {
        out.event(
            "ready_steps",
            format!("ready steps   {queue:<20} {steps}"),
            json!({ "queue": queue, "count": steps }),
        );
    }
    for (queue, steps) in ops::running_steps_by_queue(conn)? {
        out.event(
            "running_steps",
            format!("running steps {queue:<20} {steps}"),
            json!({ "queue": queue, "count": steps }),
        );
    }
    Ok(())
}

fn run_stuck(conn: &mut PgConnection, out: Reporter, limit: i64) -> anyhow::Result<()> {
    let stuck = ops::stuck(conn, limit)?;
    for l in &stuck.expired_leases {
        out.event(
            "expired_lease",
            format!(
                "expired lease: step {} ({}) of execution {}, worker {}, expired {}",
                l.step_id,
                l.node_id,
                l.execution_id,
                l.worker.as_deref().unwrap_or("-"),
                l.locked_until.to_rfc3339()
            ),
            json!(l),
        );
    }
    for s in &stuck.stalled_executions {
        out.event(
            "stalled_execution",
            format!(
                "no runnable step: execution {} is running with {} pending step(s), none of them ready and nothing running",
                s.execution_id,
                s.pending_steps
            ),
            json!(s),
        );
    }
    out.event(
        "stuck",
        format!(
            "{} expired lease(s), {} execution(s) with no runnable step",
            stuck.expired_leases.len(),
            stuck.stalled_executions.len()
        ),
        json!({
            "expired_leases": stuck.expired_leases.len(),
            "stalled_executions": stuck.stalled_executions.len(),
        }),
    );
    Ok(())
}

fn run_studio(url: DatabaseUrl, args: &StudioArgs, out: Reporter) -> anyhow::Result<()> {
    studio::check_bind(&args.bind, args.token.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let config = Config::new(url.clone());
        let pool = AsyncPool::from_config(&config).await?;
        let listener = tokio::net::TcpListener::bind(args.bind)
            .await
            .map_err(|source| Error::Io {
                context: format!("listening on {}", args.bind),
                source,
            })?;
        let address = format!("http://{}/", listener.local_addr()?);
        let mut options = StudioOptions::default();
        options.actions = args.allow_actions;
        options.token = args.token.clone();
        let studio = Studio::new(pool, options);
        let live = match studio.start_live(&url).await {
            Ok(()) => true,
            Err(e) => {
                out.warn(
                    "live_off",
                    format!("studio: pages will not update by themselves: {e}"),
                    json!({ "reason": e.to_string() }),
                );
                false
            }
        };
        let shutdown = async {
            // Ctrl-C or SIGTERM; if the handler cannot be installed, run on.
            let ctrl_c = async {
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            #[cfg(unix)]
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let term = std::future::pending::<()>();
            tokio::select! {
                () = ctrl_c => {}
                () = term => {}
            }
        };
        let serving = studio::serve(studio, listener, shutdown);
        out.event(
            "listening",
            format!(
                "studio listening on {address}{}",
                if args.allow_actions {
                    " (actions on)"
                } else {
                    ""
                }
            ),
            json!({ "url": address, "actions": args.allow_actions, "live": live }),
        );
        serving.await?;
        out.event("stopped", "studio stopped", json!({}));
        anyhow::Ok(())
    })
}
