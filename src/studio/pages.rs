//! The routes: each handler reads what its page shows in one pool call,
//! turns it into plain strings (the `*Row` types) and renders its template.

use std::collections::HashMap;

use askama::Template;
use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveDate, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde::Deserialize;
use uuid::Uuid;

use super::{Studio, graph, live, view};
use crate::engine::{self, ExecutionFilter, Why};
use crate::enums::ExecutionStatus;
use crate::error::Error;
use crate::models::{Execution, ExecutionEvent, ExecutionStep, Queue, Schedule, Workflow};
use crate::ops;
use crate::schema::{execution_events, execution_steps, workflows};

/// Executions per page of the list.
const PAGE_SIZE: i64 = 50;
/// Counts on the overview stop here (`10,000+`).
const COUNT_CAP: i64 = 10_000;
/// Steps drawn and listed on an execution page.
const STEPS_MAX: i64 = 500;
/// Events listed on an execution page (the newest).
const EVENTS_MAX: usize = 200;
/// Workflows listed.
const WORKFLOWS_MAX: i64 = 500;

/// The longest a page's reads may take before they are cancelled.
const READ_TIMEOUT_SECONDS: u32 = 10;

/// The most "why" rows an execution page lists.
const WHY_MAX: usize = 50;

impl Studio {
    /// Runs a page's reads on the pool: one read-only transaction (one
    /// snapshot for the whole page) whose statements are cancelled after
    /// [`READ_TIMEOUT_SECONDS`].
    pub(super) async fn read<T, F>(&self, f: F) -> crate::Result<T>
    where
        F: FnOnce(&mut PgConnection) -> crate::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.inner
            .pool
            .run(move |conn| {
                conn.build_transaction().read_only().run(|conn| {
                    // Small reads: parallel workers only slow them (a
                    // filtered list read 25,821 rows for 51 with them).
                    conn.batch_execute(&format!(
                        "SET LOCAL statement_timeout = '{READ_TIMEOUT_SECONDS}s'; \
                         SET LOCAL max_parallel_workers_per_gather = 0"
                    ))?;
                    f(conn)
                })
            })
            .await
    }
}

pub(super) fn routes() -> Router<Studio> {
    Router::new()
        .route("/", get(overview))
        .route("/executions", get(executions))
        .route("/executions/{id}", get(execution))
        .route("/executions/{id}/live", get(live::stream))
        .route("/executions/{id}/{action}", post(action))
        .route("/steps/{id}", get(step))
        .route("/workflows", get(workflows_page))
        .route("/queues", get(queues))
        .route("/schedules", get(schedules))
        .route("/static/studio.css", get(css))
        .route("/static/studio.js", get(js))
        .fallback(not_found)
}

async fn not_found() -> PageError {
    PageError::new(StatusCode::NOT_FOUND, "no such page")
}

// ---------------------------------------------------------------- errors

tokio::task_local! {
    /// The studio's base path while a request is handled (set by the
    /// guard), so that an error page, built from an error alone, links
    /// within the studio.
    pub(super) static BASE: String;
}

/// A page that could not be shown, with the status it answers.
pub(super) struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        PageError {
            status,
            message: message.into(),
        }
    }
}

impl From<Error> for PageError {
    fn from(e: Error) -> Self {
        if let Error::Query(diesel::result::Error::DatabaseError(_, info)) = &e {
            if info.message().contains("statement timeout") {
                return PageError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "this page's reads took longer than {} s and were cancelled: \
                         narrow the filters (a status, a time range) and try again",
                        READ_TIMEOUT_SECONDS
                    ),
                );
            }
        }
        let status = match &e {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::InvalidId { .. } | Error::AmbiguousId { .. } => StatusCode::BAD_REQUEST,
            Error::IllegalTransition { .. } | Error::TransitionConflict { .. } => {
                StatusCode::CONFLICT
            }
            Error::Pool(_) | Error::Connection { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "studio page failed");
        }
        // The crate's errors never hold a password; mask URLs all the same.
        PageError::new(status, crate::config::redact_urls_in(&e.to_string()))
    }
}

impl From<diesel::result::Error> for PageError {
    fn from(e: diesel::result::Error) -> Self {
        PageError::from(Error::from(e))
    }
}

#[derive(Template)]
#[template(path = "error.html", config = "src/studio/askama.toml")]
struct ErrorPage<'a> {
    chrome: Chrome,
    status: u16,
    message: &'a str,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            chrome: Chrome::bare("Error"),
            status: self.status.as_u16(),
            message: &self.message,
        };
        let mut response = render(&page);
        *response.status_mut() = self.status;
        response
    }
}

type PageResult = Result<Response, PageError>;

fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "studio template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
        }
    }
}

// ---------------------------------------------------------------- chrome

/// What every page's frame needs: links, the title, the active tab.
pub(super) struct Chrome {
    pub base: String,
    pub title: String,
    pub tab: &'static str,
}

impl Chrome {
    fn new(studio: &Studio, title: impl Into<String>, tab: &'static str) -> Self {
        Chrome {
            base: studio.inner.base.clone(),
            title: title.into(),
            tab,
        }
    }

    /// For error pages, which know the studio only through [`BASE`].
    fn bare(title: &str) -> Self {
        Chrome {
            base: BASE.try_with(String::clone).unwrap_or_default(),
            title: title.to_owned(),
            tab: "",
        }
    }
}

// ---------------------------------------------------------------- overview

struct CountRow {
    status: &'static str,
    count: String,
}

/// One bar of the last hour's chart: a bucket of 5 minutes.
struct BarRow {
    label: String,
    completed: i64,
    failed: i64,
    cancelled: i64,
    x: i32,
    parts: Vec<BarPart>,
}

/// One status's part of a bar, stacked from the bottom (of 70 units).
struct BarPart {
    status: &'static str,
    y: i64,
    height: i64,
}

struct QueueRow {
    name: String,
    ready: String,
    running: String,
    limit: String,
    paused: bool,
}

struct StuckRow {
    execution_id: String,
    execution_short: String,
    what: String,
}

#[derive(Template)]
#[template(path = "overview.html", config = "src/studio/askama.toml")]
struct OverviewPage {
    chrome: Chrome,
    counts: Vec<CountRow>,
    bars: Vec<BarRow>,
    bars_width: i32,
    finished_total: String,
    queues: Vec<QueueRow>,
    stuck: Vec<StuckRow>,
}

const BUCKETS: i32 = 12;
const BUCKET_SECONDS: i32 = 300;

async fn overview(State(studio): State<Studio>) -> PageResult {
    let (counts, finished, queues, stuck) = studio
        .read(|conn| {
            let counts = ops::count_by_status_capped(conn, COUNT_CAP)?;
            let finished = ops::finished_recently(conn, BUCKETS * BUCKET_SECONDS, BUCKET_SECONDS)?;
            let queues = queue_rows(conn)?;
            let stuck = ops::stuck(conn, 10)?;
            Ok((counts, finished, queues, stuck))
        })
        .await?;
    let counts = counts
        .into_iter()
        .map(|(status, n)| CountRow {
            status: status.as_str(),
            count: view::capped(n, COUNT_CAP),
        })
        .collect();
    let mut by_bucket: HashMap<(i32, &str), i64> = HashMap::new();
    let mut total = 0;
    for f in &finished {
        by_bucket.insert((f.bucket, f.status.as_str()), f.executions);
        total += f.executions;
    }
    let max = (0..BUCKETS)
        .map(|b| {
            ["completed", "failed", "cancelled"]
                .iter()
                .map(|s| by_bucket.get(&(b, *s)).copied().unwrap_or(0))
                .sum::<i64>()
        })
        .max()
        .unwrap_or(0)
        .max(1);
    let bars = (0..BUCKETS)
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let n = |s: &str| by_bucket.get(&(b, s)).copied().unwrap_or(0);
            let mut bottom = 70;
            let parts = ["completed", "failed", "cancelled"]
                .into_iter()
                .filter(|s| n(s) > 0)
                .map(|status| {
                    let height = (n(status) * 66 / max).max(1);
                    bottom -= height;
                    BarPart {
                        status,
                        y: bottom,
                        height,
                    }
                })
                .collect();
            BarRow {
                label: format!(
                    "{}–{} min ago",
                    b * BUCKET_SECONDS / 60,
                    (b + 1) * BUCKET_SECONDS / 60
                ),
                completed: n("completed"),
                failed: n("failed"),
                cancelled: n("cancelled"),
                x: i as i32 * 30 + 3,
                parts,
            }
        })
        .collect();
    let mut stuck_rows: Vec<StuckRow> = stuck
        .expired_leases
        .iter()
        .map(|l| StuckRow {
            execution_id: l.execution_id.to_string(),
            execution_short: view::short(l.execution_id),
            what: format!(
                "step {} ran by {}: its lease expired at {}",
                l.node_id,
                l.worker.as_deref().unwrap_or("-"),
                view::time(l.locked_until)
            ),
        })
        .collect();
    stuck_rows.extend(stuck.stalled_executions.iter().map(|s| StuckRow {
        execution_id: s.execution_id.to_string(),
        execution_short: view::short(s.execution_id),
        what: format!(
            "running with {} pending step(s), none ready and nothing running",
            s.pending_steps
        ),
    }));
    Ok(render(&OverviewPage {
        chrome: Chrome::new(&studio, "Overview", "overview"),
        counts,
        bars,
        bars_width: BUCKETS * 30,
        finished_total: view::thousands(total),
        queues,
        stuck: stuck_rows,
    }))
}

/// Queues with ready and running steps, and the configured ones.
fn queue_rows(conn: &mut PgConnection) -> crate::Result<Vec<QueueRow>> {
    let ready: HashMap<String, i64> = engine::ready_steps_by_queue(conn)?.into_iter().collect();
    let running: HashMap<String, i64> = ops::running_steps_by_queue(conn)?.into_iter().collect();
    let configured: HashMap<String, Queue> = engine::list_queues(conn)?
        .into_iter()
        .map(|q| (q.name.clone(), q))
        .collect();
    let mut names: Vec<&String> = ready
        .keys()
        .chain(running.keys())
        .chain(configured.keys())
        .collect();
    names.sort();
    names.dedup();
    Ok(names
        .into_iter()
        .map(|name| {
            let q = configured.get(name);
            QueueRow {
                name: name.clone(),
                ready: view::thousands(ready.get(name).copied().unwrap_or(0)),
                running: view::thousands(running.get(name).copied().unwrap_or(0)),
                limit: q
                    .and_then(|q| q.max_running)
                    .map_or_else(|| "-".to_owned(), |m| m.to_string()),
                paused: q.is_some_and(|q| q.paused),
            }
        })
        .collect())
}

// ---------------------------------------------------------------- list

#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    workflow: Option<String>,
    status: Option<String>,
    user: Option<String>,
    queue: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<String>,
}

struct ExecutionRow {
    id: String,
    short: String,
    status: &'static str,
    workflow: String,
    user: String,
    started: String,
    took: String,
    error: String,
}

struct StatusOption {
    name: &'static str,
    selected: bool,
}

#[derive(Template)]
#[template(path = "executions.html", config = "src/studio/askama.toml")]
struct ExecutionsPage {
    chrome: Chrome,
    workflow: String,
    statuses: Vec<StatusOption>,
    user: String,
    queue: String,
    since: String,
    until: String,
    problem: Option<String>,
    rows: Vec<ExecutionRow>,
    next: Option<String>,
}

/// A time filter: RFC 3339, or a date (midnight UTC).
fn parse_time(field: &str, text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc());
        }
    }
    Err(format!(
        "{field}: {text:?} is not a time (2026-12-03 or 2026-12-03T10:00:00Z)"
    ))
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

async fn executions(State(studio): State<Studio>, Query(q): Query<ListQuery>) -> PageResult {
    let mut problems = Vec::new();
    let status = match non_empty(&q.status) {
        Some(s) => match ops::parse_execution_status(s) {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(e);
                None
            }
        },
        None => None,
    };
    let mut time = |field: &str, v: &Option<String>| {
        non_empty(v).and_then(|t| parse_time(field, t).map_err(|e| problems.push(e)).ok())
    };
    let since = time("since", &q.since);
    let until = time("until", &q.until);
    let workflow = non_empty(&q.workflow).map(str::to_owned);
    let filter = ExecutionFilter {
        statuses: status.into_iter().collect(),
        user_id: non_empty(&q.user).map(str::to_owned),
        started_from: since,
        started_before: until,
        queue: non_empty(&q.queue).map(str::to_owned),
        ..ExecutionFilter::default()
    };
    let after = non_empty(&q.after).map(str::to_owned);
    let bad_input = !problems.is_empty();
    let (page, names, workflow_problem) = studio
        .read(move |conn| {
            let mut filter = filter;
            if let Some(w) = &workflow {
                match ops::filter_by_workflow(conn, &mut filter, w) {
                    Ok(()) => {}
                    Err(e @ (Error::NotFound { .. } | Error::AmbiguousId { .. })) => {
                        return Ok((None, HashMap::new(), Some(e.to_string())));
                    }
                    Err(e) => return Err(e),
                }
            }
            if bad_input {
                return Ok((None, HashMap::new(), None));
            }
            let page = engine::list_executions(conn, &filter, after.as_deref(), PAGE_SIZE)?;
            let ids: Vec<Uuid> = page.executions.iter().map(|e| e.workflow_id).collect();
            let names = ops::workflow_names(conn, &ids)?;
            Ok((Some(page), names, None))
        })
        .await?;
    problems.extend(workflow_problem);
    let (rows, next) = match page {
        Some(page) => (
            page.executions
                .iter()
                .map(|e| execution_row(e, names.get(&e.workflow_id)))
                .collect(),
            page.next_cursor.map(|c| next_link(&studio, &q, &c)),
        ),
        None => (Vec::new(), None),
    };
    let keep = |v: &Option<String>| v.clone().unwrap_or_default();
    let page = ExecutionsPage {
        chrome: Chrome::new(&studio, "Executions", "executions"),
        workflow: keep(&q.workflow),
        statuses: ExecutionStatus::ALL
            .iter()
            .map(|s| StatusOption {
                name: s.as_str(),
                selected: status == Some(*s),
            })
            .collect(),
        user: keep(&q.user),
        queue: keep(&q.queue),
        since: keep(&q.since),
        until: keep(&q.until),
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
        rows,
        next,
    };
    let mut response = render(&page);
    if !problems.is_empty() {
        *response.status_mut() = StatusCode::BAD_REQUEST;
    }
    Ok(response)
}

fn execution_row(e: &Execution, workflow: Option<&String>) -> ExecutionRow {
    ExecutionRow {
        id: e.id.to_string(),
        short: view::short(e.id),
        status: e.status.as_str(),
        workflow: format!(
            "{} v{}",
            workflow.map_or("?", String::as_str),
            e.workflow_version
        ),
        user: e.user_id.clone().unwrap_or_else(|| "-".to_owned()),
        started: view::maybe_time(e.started_at),
        took: view::elapsed(e.started_at, e.completed_at),
        error: view::cut(e.error.as_deref().unwrap_or(""), view::LIST_TEXT_MAX),
    }
}

/// The list's URL with the same filters, after `cursor`.
fn next_link(studio: &Studio, q: &ListQuery, cursor: &str) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("workflow", &q.workflow),
        ("status", &q.status),
        ("user", &q.user),
        ("queue", &q.queue),
        ("since", &q.since),
        ("until", &q.until),
    ] {
        if let Some(v) = non_empty(v) {
            query.append_pair(k, v);
        }
    }
    query.append_pair("after", cursor);
    studio.link(&format!("/executions?{}", query.finish()))
}

// ---------------------------------------------------------------- execution

struct StepRow {
    id: String,
    node_id: String,
    node_type: String,
    queue: String,
    status: &'static str,
    attempt: i32,
    retries: String,
    started: String,
    took: String,
    error: String,
}

struct EventRow {
    at: String,
    what: String,
    from: String,
    to: String,
    worker: String,
    error: String,
}

struct WhyRow {
    node: String,
    reason: String,
    detail: String,
}

/// At most [`WHY_MAX`] reasons, as rows.
fn why_rows(why: &[Why]) -> Vec<WhyRow> {
    why.iter()
        .take(WHY_MAX)
        .map(|w| WhyRow {
            node: w.node_id.clone().unwrap_or_default(),
            reason: w.reason.clone(),
            detail: w.detail.clone(),
        })
        .collect()
}

struct ActionButton {
    name: &'static str,
    label: &'static str,
}

/// The part of an execution page that live updates replace.
#[derive(Template)]
#[template(path = "execution_live.html", config = "src/studio/askama.toml")]
pub(super) struct ExecutionLive {
    base: String,
    id: String,
    status: &'static str,
    workflow: String,
    workflow_id: String,
    user: String,
    started: String,
    completed: String,
    took: String,
    error: Option<String>,
    parent: Option<String>,
    rerun_of: Option<String>,
    actions: Vec<ActionButton>,
    csrf: String,
    why: Vec<WhyRow>,
    graph: String,
    steps_shown: usize,
    steps_total: i64,
    steps_cut: bool,
    steps: Vec<StepRow>,
    events: Vec<EventRow>,
    events_cut: bool,
}

#[derive(Template)]
#[template(path = "execution.html", config = "src/studio/askama.toml")]
struct ExecutionPage {
    chrome: Chrome,
    live_url: String,
    live: ExecutionLive,
    done: Option<String>,
}

/// What an execution page shows, read in one go.
pub(super) struct ExecutionData {
    execution: Execution,
    workflow: Option<String>,
    steps: Vec<ExecutionStep>,
    steps_total: i64,
    edges: Vec<ops::StepEdge>,
    events: Vec<ExecutionEvent>,
    why: Vec<Why>,
}

pub(super) fn load_execution(conn: &mut PgConnection, id: &str) -> crate::Result<ExecutionData> {
    let execution = ops::resolve_execution(conn, id)?;
    let names = ops::workflow_names(conn, &[execution.workflow_id])?;
    let steps: Vec<ExecutionStep> = execution_steps::table
        .filter(execution_steps::execution_id.eq(execution.id))
        .order((execution_steps::created_at, execution_steps::id))
        .limit(STEPS_MAX)
        .select(ExecutionStep::as_select())
        .load(conn)?;
    let steps_total = if (steps.len() as i64) < STEPS_MAX {
        steps.len() as i64
    } else {
        execution_steps::table
            .filter(execution_steps::execution_id.eq(execution.id))
            .count()
            .get_result(conn)?
    };
    let edges = ops::execution_edges(conn, execution.id)?;
    // The newest events, and one more to know whether there are others.
    let events: Vec<ExecutionEvent> = execution_events::table
        .filter(execution_events::execution_id.eq(execution.id))
        .order(execution_events::id.desc())
        .limit(EVENTS_MAX as i64 + 1)
        .select(ExecutionEvent::as_select())
        .load(conn)?;
    let why = if execution.status.is_final() {
        Vec::new()
    } else {
        engine::why_not_running(conn, execution.id)?
    };
    Ok(ExecutionData {
        workflow: names.get(&execution.workflow_id).cloned(),
        execution,
        steps,
        steps_total,
        edges,
        events,
        why,
    })
}

/// The actions that apply to an execution in `status`.
fn actions_for(status: ExecutionStatus) -> Vec<ActionButton> {
    use ExecutionStatus::*;
    let mut out = Vec::new();
    if matches!(status, Running) {
        out.push(ActionButton {
            name: "pause",
            label: "Pause",
        });
    }
    if matches!(status, Paused) {
        out.push(ActionButton {
            name: "resume",
            label: "Resume",
        });
    }
    if !status.is_final() {
        out.push(ActionButton {
            name: "cancel",
            label: "Cancel",
        });
    }
    if matches!(status, Failed | Cancelled) {
        out.push(ActionButton {
            name: "retry",
            label: "Retry failed steps",
        });
    }
    out
}

pub(super) fn execution_live(studio: &Studio, data: &ExecutionData) -> ExecutionLive {
    let e = &data.execution;
    let base = studio.inner.base.clone();
    let node_of: HashMap<Uuid, &str> = data
        .steps
        .iter()
        .map(|s| (s.id, s.node_id.as_str()))
        .collect();
    let events: Vec<EventRow> = data
        .events
        .iter()
        .take(EVENTS_MAX)
        .map(|ev| event_row(ev, ev.step_id.and_then(|s| node_of.get(&s).copied())))
        .collect();
    ExecutionLive {
        id: e.id.to_string(),
        status: e.status.as_str(),
        workflow: format!(
            "{} v{}",
            data.workflow.as_deref().unwrap_or("?"),
            e.workflow_version
        ),
        workflow_id: e.workflow_id.to_string(),
        user: e.user_id.clone().unwrap_or_else(|| "-".to_owned()),
        started: view::maybe_time(e.started_at),
        completed: view::maybe_time(e.completed_at),
        took: view::elapsed(e.started_at, e.completed_at),
        error: e.error.clone(),
        parent: e.parent_execution_id.map(|p| p.to_string()),
        rerun_of: e.rerun_of.map(|p| p.to_string()),
        actions: if studio.inner.actions {
            actions_for(e.status)
        } else {
            Vec::new()
        },
        csrf: studio.inner.csrf.clone(),
        why: why_rows(&data.why),
        graph: graph::render_svg(&data.steps, &data.edges, &base),
        steps_shown: data.steps.len(),
        steps_total: data.steps_total,
        steps_cut: (data.steps.len() as i64) < data.steps_total,
        steps: data.steps.iter().map(step_row).collect(),
        events_cut: data.events.len() > EVENTS_MAX,
        events,
        base,
    }
}

fn step_row(s: &ExecutionStep) -> StepRow {
    StepRow {
        id: s.id.to_string(),
        node_id: s.node_id.clone(),
        node_type: s.node_type.clone().unwrap_or_else(|| "-".to_owned()),
        queue: s.queue_name().to_owned(),
        status: s.status.as_str(),
        attempt: s.attempt,
        retries: format!("{}/{}", s.retry_count, s.max_retries),
        started: view::maybe_time(s.started_at),
        took: view::elapsed(s.started_at, s.completed_at),
        error: view::cut(s.error.as_deref().unwrap_or(""), view::LIST_TEXT_MAX),
    }
}

fn event_row(ev: &ExecutionEvent, node: Option<&str>) -> EventRow {
    let payload = ev.payload.clone().unwrap_or_default();
    let field = |k: &str| payload.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let node = field("node_id").or_else(|| node.map(str::to_owned));
    EventRow {
        at: format!("{}", ev.created_at.format("%Y-%m-%d %H:%M:%S%.3f")),
        what: node.map_or_else(|| "execution".to_owned(), |n| format!("step {n}")),
        from: ev.from_status.clone().unwrap_or_else(|| "(new)".to_owned()),
        to: ev.to_status.clone(),
        worker: field("worker")
            .or_else(|| field("locked_by"))
            .unwrap_or_default(),
        error: view::cut(&field("error").unwrap_or_default(), view::LIST_TEXT_MAX),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ExecutionQuery {
    done: Option<String>,
}

async fn execution(
    State(studio): State<Studio>,
    Path(id): Path<String>,
    Query(q): Query<ExecutionQuery>,
) -> PageResult {
    // The graph's layout and the render are CPU work: on the blocking
    // thread with the reads, not on the async runtime.
    let renderer = studio.clone();
    let (id, live) = studio
        .read(move |conn| {
            let data = load_execution(conn, &id)?;
            Ok((data.execution.id, execution_live(&renderer, &data)))
        })
        .await?;
    Ok(render(&ExecutionPage {
        chrome: Chrome::new(
            &studio,
            format!("Execution {}", view::short(id)),
            "executions",
        ),
        live_url: studio.link(&format!("/executions/{id}/live")),
        live,
        done: q
            .done
            .filter(|d| ["cancel", "pause", "resume", "retry"].contains(&d.as_str())),
    }))
}

// ---------------------------------------------------------------- actions

#[derive(Debug, Deserialize)]
struct ActionForm {
    csrf: String,
    confirm: Option<String>,
}

#[derive(Template)]
#[template(path = "confirm.html", config = "src/studio/askama.toml")]
struct ConfirmPage {
    chrome: Chrome,
    action: String,
    id: String,
    status: &'static str,
    csrf: String,
}

async fn action(
    State(studio): State<Studio>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
) -> PageResult {
    if !studio.inner.actions {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "actions are off: start the studio with --allow-actions to cancel, pause, resume or retry",
        ));
    }
    let csrf_ok = form
        .as_ref()
        .is_ok_and(|f| super::digest(&f.csrf) == super::digest(&studio.inner.csrf));
    let form = match form {
        Ok(Form(form)) if csrf_ok && super::same_origin(&headers) => form,
        _ => {
            return Err(PageError::new(
                StatusCode::FORBIDDEN,
                "this form is stale or did not come from this studio (CSRF check failed): reload the page and try again",
            ));
        }
    };
    let apply: fn(&mut PgConnection, Uuid) -> crate::Result<Execution> = match action.as_str() {
        "cancel" => engine::cancel,
        "pause" => engine::pause,
        "resume" => engine::resume,
        "retry" => engine::replay_execution,
        other => {
            return Err(PageError::new(
                StatusCode::NOT_FOUND,
                format!("no action {other:?} (cancel, pause, resume, retry)"),
            ));
        }
    };
    let confirmed = form.confirm.as_deref() == Some("yes");
    let execution = studio
        .inner
        .pool
        .run(move |conn| {
            let e = ops::resolve_execution(conn, &id)?;
            if confirmed { apply(conn, e.id) } else { Ok(e) }
        })
        .await?;
    if !confirmed {
        return Ok(render(&ConfirmPage {
            chrome: Chrome::new(&studio, format!("{action} execution?"), "executions"),
            action,
            id: execution.id.to_string(),
            status: execution.status.as_str(),
            csrf: studio.inner.csrf.clone(),
        }));
    }
    tracing::info!(execution_id = %execution.id, action = %action, "studio action");
    Ok(
        Redirect::to(&studio.link(&format!("/executions/{}?done={action}", execution.id)))
            .into_response(),
    )
}

// ---------------------------------------------------------------- step

struct AttemptRow {
    at: String,
    from: String,
    to: String,
    attempt: String,
    worker: String,
    error: String,
}

#[derive(Template)]
#[template(path = "step.html", config = "src/studio/askama.toml")]
struct StepPage {
    chrome: Chrome,
    /// What the execution page's table shows of it.
    step: StepRow,
    execution_id: String,
    reclaims: i32,
    priority: i32,
    concurrency_key: String,
    run_after: String,
    completed: String,
    lease: String,
    input: Option<String>,
    output: Option<String>,
    validation: Option<String>,
    error: Option<String>,
    why: Vec<WhyRow>,
    attempts: Vec<AttemptRow>,
}

async fn step(State(studio): State<Studio>, Path(id): Path<String>) -> PageResult {
    let (s, events, why) = studio
        .read(move |conn| {
            let s = ops::resolve_step(conn, &id)?;
            let events = ExecutionEvent::for_step(conn, s.id)?;
            let why = if s.status.is_final() {
                Vec::new()
            } else {
                engine::why_step_not_running(conn, s.id)?
            };
            Ok((s, events, why))
        })
        .await?;
    let attempts = events
        .iter()
        .map(|ev| {
            let row = event_row(ev, None);
            let attempt = ev
                .payload
                .as_ref()
                .and_then(|p| p.get("attempt"))
                .map_or_else(String::new, |a| a.to_string());
            AttemptRow {
                at: row.at,
                from: row.from,
                to: row.to,
                attempt,
                worker: row.worker,
                error: ev
                    .payload
                    .as_ref()
                    .and_then(|p| p.get("error"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_owned(),
            }
        })
        .collect();
    let page = StepPage {
        chrome: Chrome::new(&studio, format!("Step {}", s.node_id), "executions"),
        step: step_row(&s),
        execution_id: s.execution_id.to_string(),
        reclaims: s.reclaims,
        priority: s.priority,
        concurrency_key: s.concurrency_key.clone().unwrap_or_else(|| "-".to_owned()),
        run_after: view::time(s.run_after),
        completed: view::maybe_time(s.completed_at),
        lease: match (&s.locked_by, s.locked_until) {
            (Some(w), Some(t)) => format!("{w} until {}", view::time(t)),
            _ => "-".to_owned(),
        },
        input: s.input.as_ref().map(view::payload),
        output: s.output.as_ref().map(view::payload),
        validation: s.validation.as_ref().map(view::payload),
        error: s.error.clone(),
        why: why_rows(&why),
        attempts,
    };
    Ok(render(&page))
}

// ---------------------------------------------------------------- workflows, queues, schedules

struct WorkflowRow {
    id: String,
    short: String,
    name: String,
    version: i32,
    nodes: usize,
    description: String,
    created: String,
}

#[derive(Template)]
#[template(path = "workflows.html", config = "src/studio/askama.toml")]
struct WorkflowsPage {
    chrome: Chrome,
    rows: Vec<WorkflowRow>,
}

async fn workflows_page(State(studio): State<Studio>) -> PageResult {
    let rows: Vec<Workflow> = studio
        .read(|conn| {
            Ok(workflows::table
                .order((workflows::name, workflows::version.desc(), workflows::id))
                .limit(WORKFLOWS_MAX)
                .select(Workflow::as_select())
                .load(conn)?)
        })
        .await?;
    let rows = rows
        .iter()
        .map(|w| WorkflowRow {
            id: w.id.to_string(),
            short: view::short(w.id),
            name: w.name.clone(),
            version: w.version,
            nodes: w.nodes.as_array().map_or(0, Vec::len),
            description: view::cut(w.description.as_deref().unwrap_or(""), view::LIST_TEXT_MAX),
            created: view::time(w.created_at),
        })
        .collect();
    Ok(render(&WorkflowsPage {
        chrome: Chrome::new(&studio, "Workflows", "workflows"),
        rows,
    }))
}

struct LimitRow {
    key: String,
    max_running: i32,
}

#[derive(Template)]
#[template(path = "queues.html", config = "src/studio/askama.toml")]
struct QueuesPage {
    chrome: Chrome,
    queues: Vec<QueueRow>,
    limits: Vec<LimitRow>,
}

async fn queues(State(studio): State<Studio>) -> PageResult {
    let (queues, limits) = studio
        .read(|conn| {
            let queues = queue_rows(conn)?;
            let limits = engine::list_concurrency_limits(conn)?;
            Ok((queues, limits))
        })
        .await?;
    Ok(render(&QueuesPage {
        chrome: Chrome::new(&studio, "Queues", "queues"),
        queues,
        limits: limits
            .into_iter()
            .map(|l| LimitRow {
                key: l.key,
                max_running: l.max_running,
            })
            .collect(),
    }))
}

struct ScheduleRow {
    name: String,
    workflow: String,
    workflow_id: String,
    cron: String,
    time_zone: String,
    next: String,
    last: String,
    paused: bool,
    error: String,
}

#[derive(Template)]
#[template(path = "schedules.html", config = "src/studio/askama.toml")]
struct SchedulesPage {
    chrome: Chrome,
    rows: Vec<ScheduleRow>,
}

async fn schedules(State(studio): State<Studio>) -> PageResult {
    let (rows, names) = studio
        .read(|conn| {
            let rows: Vec<Schedule> = engine::list_schedules(conn, None)?;
            let ids: Vec<Uuid> = rows.iter().map(|s| s.workflow_id).collect();
            let names = ops::workflow_names(conn, &ids)?;
            Ok((rows, names))
        })
        .await?;
    let rows = rows
        .iter()
        .map(|s| ScheduleRow {
            name: s.name.clone(),
            workflow: names
                .get(&s.workflow_id)
                .cloned()
                .unwrap_or_else(|| "?".to_owned()),
            workflow_id: s.workflow_id.to_string(),
            cron: s.cron.clone(),
            time_zone: s.time_zone.clone(),
            next: view::time(s.next_fire_at),
            last: view::maybe_time(s.last_fired_at),
            paused: s.paused,
            error: view::cut(s.last_error.as_deref().unwrap_or(""), view::LIST_TEXT_MAX),
        })
        .collect();
    Ok(render(&SchedulesPage {
        chrome: Chrome::new(&studio, "Schedules", "schedules"),
        rows,
    }))
}

// ---------------------------------------------------------------- static files

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("assets/studio.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("assets/studio.js"),
    )
}
