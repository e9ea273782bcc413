#![cfg(feature = "cli")]
//! `db-ops studio` in a real browser (headless chromium through
//! chromedriver): the pages of the HTML contract on data built with the
//! engine API, the live execution page, the guarded actions, markup in every
//! user-controlled string, and a screenshot of an execution
//! (`$CARGO_TARGET_DIR/studio/execution.png`; with `UPDATE_SCREENSHOT=1` also
//! `docs/studio-execution.png`). Needs chromium and chromedriver: see
//! `tests/common/browser.rs`.

mod common;

use std::collections::BTreeMap;

use common::browser::{Browser, Studio, artifact_dir, open};
use common::{LEASE, snapshot};
use diesel::PgConnection;
use fantoccini::Locator;
use serde_json::{Value, json};
use uuid::Uuid;
use workflow_db::engine::{self, Backoff};
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Edge, Execution, ExecutionStatus, ExecutionStep, Lease, NewExecution, NewWorkflow, Node,
    Workflow, WorkflowGraph,
};

/// A task node in its own queue (named after the node, so that a test
/// claims exactly it), without retries.
fn task(id: &str) -> Node {
    Node::new(id, "task").config(json!({ "queue": id, "max_retries": 0 }))
}

fn create(
    conn: &mut PgConnection,
    name: &str,
    nodes: Vec<Node>,
    edges: &[(&str, &str)],
) -> Workflow {
    let graph = WorkflowGraph {
        nodes,
        edges: edges.iter().map(|(s, t)| Edge::new(*s, *t)).collect(),
    };
    NewWorkflow::from_graph(name, &graph).create(conn).unwrap()
}

fn start(conn: &mut PgConnection, wf: &Workflow, user: &str) -> Uuid {
    engine::start_execution(conn, &NewExecution::new(wf.id).user_id(user))
        .unwrap()
        .execution
        .id
}

/// Claims the one ready step of `queue`.
fn claim(conn: &mut PgConnection, queue: &str) -> Lease {
    let steps = engine::claim_from(conn, "browser-test", &[queue.to_owned()], 10, LEASE).unwrap();
    assert_eq!(steps.len(), 1, "one {queue} step claimable");
    steps[0].lease().unwrap()
}

fn complete(conn: &mut PgConnection, queue: &str) {
    let lease = claim(conn, queue);
    engine::complete_step(conn, &lease, None).unwrap();
}

fn fail(conn: &mut PgConnection, queue: &str, error: &str) {
    let lease = claim(conn, queue);
    engine::fail_step(conn, &lease, error, &Backoff::default()).unwrap();
}

fn status(conn: &mut PgConnection, id: Uuid) -> ExecutionStatus {
    Execution::find(conn, id).unwrap().status
}

fn steps(conn: &mut PgConnection, id: Uuid) -> Vec<ExecutionStep> {
    ExecutionStep::list_for_execution(conn, id).unwrap()
}

/// `node_id -> status` of an execution's steps, as the database has them.
fn step_statuses(conn: &mut PgConnection, id: Uuid) -> BTreeMap<String, String> {
    steps(conn, id)
        .into_iter()
        .map(|s| (s.node_id, s.status.as_str().to_owned()))
        .collect()
}

/// One `g.node` of the page's `svg.graph`: its `data-step-id`,
/// `data-node-id`, `data-status` and `class` (`None` when missing).
#[derive(Debug, serde::Deserialize)]
struct GraphNode {
    step: Option<String>,
    node: Option<String>,
    status: Option<String>,
    class: Option<String>,
}

/// The graph's nodes, read in one script (a live update cannot stale them).
async fn graph_nodes(b: &Browser) -> Vec<GraphNode> {
    let v = b
        .js(
            "return [...document.querySelectorAll('svg.graph g.node')].map(n => ({
               step: n.getAttribute('data-step-id'), node: n.getAttribute('data-node-id'),
               status: n.getAttribute('data-status'), class: n.getAttribute('class') }));",
        )
        .await;
    serde_json::from_value(v).unwrap()
}

/// `data-node-id -> data-status` of the graph's nodes in the page.
async fn graph_statuses(b: &Browser) -> BTreeMap<String, String> {
    let missing = || "(missing)".to_owned();
    graph_nodes(b)
        .await
        .into_iter()
        .map(|n| {
            (
                n.node.unwrap_or_else(missing),
                n.status.unwrap_or_else(missing),
            )
        })
        .collect()
}

/// `data-execution-id -> data-status` of the rows of `#executions`.
async fn rows(b: &Browser) -> BTreeMap<String, String> {
    let v = b
        .js(
            "return [...document.querySelectorAll('#executions tr[data-execution-id]')]
               .map(r => [r.getAttribute('data-execution-id'), r.getAttribute('data-status')]);",
        )
        .await;
    serde_json::from_value::<Vec<(String, String)>>(v)
        .unwrap()
        .into_iter()
        .collect()
}

fn expect(pairs: &[(Uuid, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(id, s)| (id.to_string(), (*s).to_owned()))
        .collect()
}

/// Sets a field of `#filters` as a user would: picks the option of a
/// select, types into an input.
async fn fill(b: &Browser, name: &str, value: &str) {
    let field = b.wait_for(&format!("#filters [name={name}]")).await;
    if field
        .tag_name()
        .await
        .unwrap()
        .eq_ignore_ascii_case("select")
    {
        field
            .select_by_value(value)
            .await
            .unwrap_or_else(|e| panic!("no option {value:?} in select {name}: {e}"));
    } else {
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }
}

/// Waits until the page has loaded and no script of it ran markup taken
/// from the data (which would set `window.__pwned`).
async fn assert_not_pwned(b: &Browser, page: &str) {
    b.wait_until("document.readyState === 'complete'").await;
    let clean = b.js("return window.__pwned === undefined;").await;
    assert_eq!(clean, Value::Bool(true), "markup ran on {page}");
}

/// The browser setup alone (no studio): when this fails, the others fail
/// for want of chromium or chromedriver, not because of the studio.
#[tokio::test(flavor = "multi_thread")]
async fn the_browser_runs() {
    let b = Browser::start().await;
    b.goto("data:text/html,<p id=greeting>hello</p>").await;
    let p = b.wait_for("#greeting").await;
    assert_eq!(p.text().await.unwrap(), "hello");
    b.wait_until("document.readyState === 'complete'").await;
    assert!(b.screenshot().await.starts_with(b"\x89PNG"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_mode_prints_the_listening_event() {
    let db = TestDatabase::new();
    let studio = Studio::start_with(&db, &["--json"], &[]);
    let line: Value = serde_json::from_str(&studio.first_line).unwrap();
    assert_eq!(line["event"], "listening");
    assert_eq!(line["url"], format!("{}/", studio.base));
    let (code, body) = studio.request("GET", "/", None).await;
    assert_eq!(code, 200, "{body}");
}

/// (a) The overview counts executions per status and links to the list.
#[tokio::test(flavor = "multi_thread")]
async fn overview_counts_executions_by_status() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = create(conn, "counted", vec![task("count-a")], &[]);
    let completed = start(conn, &wf, "alice");
    complete(conn, "count-a");
    let failed = start(conn, &wf, "alice");
    fail(conn, "count-a", "boom");
    let running = [start(conn, &wf, "bob"), start(conn, &wf, "bob")];
    assert_eq!(status(conn, completed), ExecutionStatus::Completed);
    assert_eq!(status(conn, failed), ExecutionStatus::Failed);

    let (studio, b) = open(&db, &[]).await;
    b.goto(&studio.at("/")).await;
    b.wait_for("#counts a.count[data-status=running]").await;
    for (s, n) in [
        ("pending", 0),
        ("running", 2),
        ("paused", 0),
        ("completed", 1),
        ("failed", 1),
        ("cancelled", 0),
    ] {
        let link = b
            .client()
            .find(Locator::Css(&format!("#counts a.count[data-status={s}]")))
            .await
            .unwrap_or_else(|e| panic!("no count of {s}: {e}"));
        assert_eq!(link.text().await.unwrap().trim(), n.to_string(), "{s}");
        assert_eq!(
            link.attr("href").await.unwrap().as_deref(),
            Some(format!("/executions?status={s}").as_str())
        );
    }
    b.click("#counts a.count[data-status=running]").await;
    b.wait_for_page("/executions?status=running").await;
    b.wait_for("#executions").await;
    assert_eq!(
        rows(&b).await,
        expect(&[(running[0], "running"), (running[1], "running")])
    );
}

/// (b) The list filters by status and by workflow through its form, and
/// links each row to its execution.
#[tokio::test(flavor = "multi_thread")]
async fn list_filters_and_links_to_executions() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let alpha = create(conn, "alpha", vec![task("alpha-task")], &[]);
    let beta = create(conn, "beta", vec![task("beta-task")], &[]);
    start(conn, &alpha, "alice");
    complete(conn, "alpha-task");
    let alpha_failed = start(conn, &alpha, "alice");
    fail(conn, "alpha-task", "nope");
    let alpha_running = start(conn, &alpha, "bob");
    let beta_failed = start(conn, &beta, "carol");
    fail(conn, "beta-task", "nope");
    let beta_running = start(conn, &beta, "carol");

    let (studio, b) = open(&db, &[]).await;
    b.goto(&studio.at("/executions")).await;
    b.wait_for("#executions tr[data-execution-id]").await;
    assert_eq!(rows(&b).await.len(), 5);

    fill(&b, "status", "failed").await;
    b.click("#filters-apply").await;
    b.wait_until("document.readyState === 'complete' && location.search.includes('status=failed')")
        .await;
    b.wait_for("#executions").await;
    assert_eq!(
        rows(&b).await,
        expect(&[(alpha_failed, "failed"), (beta_failed, "failed")])
    );

    b.goto(&studio.at("/executions")).await;
    fill(&b, "workflow", "beta").await;
    b.click("#filters-apply").await;
    b.wait_until("document.readyState === 'complete' && location.search.includes('workflow=beta')")
        .await;
    b.wait_for("#executions").await;
    let shown = rows(&b).await;
    assert_eq!(
        shown,
        expect(&[(beta_failed, "failed"), (beta_running, "running")])
    );
    assert!(!shown.contains_key(&alpha_running.to_string()));

    let link = b
        .wait_for(&format!(
            "#executions tr[data-execution-id='{beta_running}'] a.execution-link"
        ))
        .await;
    assert_eq!(
        link.attr("href").await.unwrap(),
        Some(format!("/executions/{beta_running}"))
    );
    link.click().await.unwrap();
    b.wait_for_page(&format!("/executions/{beta_running}"))
        .await;
    b.wait_for("#execution-status[data-status=running]").await;
}

/// (b) A filtered list pages with `#next-page`, keeping its filter.
#[tokio::test(flavor = "multi_thread")]
async fn list_pages_keep_the_filter() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = create(conn, "paged", vec![task("paged-task")], &[]);
    for _ in 0..3 {
        start(conn, &wf, "alice");
        fail(conn, "paged-task", "nope");
    }
    let running: Vec<Uuid> = (0..55).map(|_| start(conn, &wf, "bob")).collect();

    let (studio, b) = open(&db, &[]).await;
    b.goto(&studio.at("/executions?status=running")).await;
    b.wait_for("#executions tr[data-execution-id]").await;
    let first = rows(&b).await;
    assert_eq!(first.len(), 50, "a page of 50");
    b.click("#next-page").await;
    b.wait_until("document.readyState === 'complete' && location.search.includes('after=')")
        .await;
    b.wait_for("#executions").await;
    let second = rows(&b).await;
    assert_eq!(second.len(), 5, "the rest");
    assert!(b.all("#next-page").await.is_empty(), "the last page");
    let mut seen: Vec<String> = first.keys().chain(second.keys()).cloned().collect();
    seen.sort();
    let mut want: Vec<String> = running.iter().map(Uuid::to_string).collect();
    want.sort();
    assert_eq!(seen, want, "every running execution once, no failed one");
}

/// (c) The execution page draws one node per step, with its status.
#[tokio::test(flavor = "multi_thread")]
async fn execution_graph_shows_each_step_status() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = create(
        conn,
        "diamond",
        vec![task("a"), task("b"), task("c"), task("d")],
        &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    );
    let id = start(conn, &wf, "alice");
    complete(conn, "a");
    claim(conn, "c");
    fail(conn, "b", "b broke");
    let want = step_statuses(conn, id);
    assert_eq!(want["a"], "completed");
    assert_eq!(want["b"], "failed");
    assert_eq!(want["c"], "running");
    assert_eq!(
        want["d"], "skipped",
        "a failed execution skips its pending steps"
    );

    let (studio, b) = open(&db, &[]).await;
    b.goto(&studio.at(&format!("/executions/{id}"))).await;
    b.wait_for("#live svg.graph g.node").await;
    assert_eq!(graph_statuses(&b).await, want);
    let nodes = graph_nodes(&b).await;
    assert_eq!(nodes.len(), 4, "{nodes:?}");
    for step in steps(conn, id) {
        let node = nodes
            .iter()
            .find(|n| n.step.as_deref() == Some(step.id.to_string().as_str()))
            .unwrap_or_else(|| panic!("no node of step {} in {nodes:?}", step.id));
        assert_eq!(
            node.node.as_deref(),
            Some(step.node_id.as_str()),
            "{node:?}"
        );
        let class = format!("status-{}", step.status.as_str());
        assert!(
            node.class
                .as_deref()
                .is_some_and(|c| c.split_whitespace().any(|c| c == class)),
            "{node:?} has class {class}"
        );
    }
    b.wait_for("#execution-status[data-status=failed]").await;
    b.wait_for("#steps").await;
}

/// (g) A screenshot of an execution of eight steps in mixed states: an
/// artifact, and the README's picture with `UPDATE_SCREENSHOT=1`.
#[tokio::test(flavor = "multi_thread")]
async fn screenshot_of_an_execution() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = create(
        conn,
        "nightly-report",
        vec![
            task("fetch"),
            task("parse"),
            task("thumbnails"),
            task("validate"),
            task("enrich"),
            Node::signal("approval", "approved"),
            task("publish"),
            task("notify"),
        ],
        &[
            ("fetch", "parse"),
            ("fetch", "thumbnails"),
            ("parse", "validate"),
            ("parse", "enrich"),
            ("validate", "approval"),
            ("enrich", "publish"),
            ("approval", "publish"),
            ("thumbnails", "publish"),
            ("publish", "notify"),
        ],
    );
    let id = start(conn, &wf, "reporting");
    complete(conn, "fetch");
    complete(conn, "parse");
    complete(conn, "validate");
    claim(conn, "thumbnails");
    claim(conn, "enrich");
    let want = step_statuses(conn, id);

    let (studio, b) = open(&db, &[]).await;
    b.goto(&studio.at(&format!("/executions/{id}"))).await;
    b.wait_until("document.querySelectorAll('svg.graph g.node').length === 8")
        .await;
    // The whole page (up to 3000 pixels high) in the picture.
    let height = b
        .js("return document.documentElement.scrollHeight;")
        .await
        .as_u64()
        .unwrap_or(1000)
        .clamp(1000, 3000);
    b.client()
        .set_window_size(1400, u32::try_from(height).unwrap())
        .await
        .unwrap();
    // The artifact first: it shows what went wrong when the page is wrong.
    let png = b.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(artifact_dir().join("execution.png"), &png).unwrap();
    assert_eq!(graph_statuses(&b).await, want);
    if std::env::var_os("UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::write(docs.join("studio-execution.png"), &png).unwrap();
    }
}

/// (d) The execution page follows the execution live: a step completed by
/// someone else shows without a reload.
#[tokio::test(flavor = "multi_thread")]
async fn execution_page_updates_live() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = create(
        conn,
        "live",
        vec![task("first"), task("second")],
        &[("first", "second")],
    );
    let id = start(conn, &wf, "alice");
    let lease = claim(conn, "first");
    // Nodes are found by step id (the node ids are checked by the other tests).
    let node = |step: Uuid, status: &str| {
        format!("svg.graph g.node[data-step-id='{step}'][data-status={status}]")
    };
    let (first, second) = (lease.step_id, steps(conn, id)[1].id);

    let (studio, b) = open(&db, &[]).await;
    b.goto(&studio.at(&format!("/executions/{id}"))).await;
    b.wait_for("#live[data-live-state=open]").await;
    b.wait_for(&node(first, "running")).await;
    b.wait_for(&node(second, "pending")).await;
    // Gone if the page were loaded again.
    b.js("window.__same_page = true; return null;").await;

    let mut other = db.connect();
    engine::complete_step(&mut other, &lease, Some(&json!({ "rows": 3 }))).unwrap();
    b.wait_for(&node(first, "completed")).await;
    assert_eq!(
        b.js("return window.__same_page === true;").await,
        Value::Bool(true),
        "updated without a reload"
    );

    // And again: the stream stays open after an update.
    complete(&mut other, "second");
    b.wait_for(&node(second, "completed")).await;
    b.wait_for("#execution-status[data-status=completed]").await;
    assert_eq!(
        b.js("return window.__same_page === true;").await,
        Value::Bool(true),
        "updated without a reload"
    );
}

/// (e) With `--allow-actions`, cancelling asks for a confirmation, then
/// cancels.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_action_confirms_then_cancels() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = create(conn, "cancellable", vec![task("work")], &[]);
    let id = start(conn, &wf, "alice");

    let (studio, b) = open(&db, &["--allow-actions"]).await;
    let page = format!("/executions/{id}");
    b.goto(&studio.at(&page)).await;
    b.wait_for("#execution-status[data-status=running]").await;
    b.wait_for("#live[data-live-state=open]").await;
    b.click("#action-cancel").await;
    b.wait_for("#confirm #confirm-yes").await;
    assert_eq!(
        status(conn, id),
        ExecutionStatus::Running,
        "nothing happens before the confirmation"
    );
    b.click("#confirm-yes").await;
    b.wait_for_page(&page).await;
    b.wait_for("#execution-status[data-status=cancelled]").await;
    assert_eq!(status(conn, id), ExecutionStatus::Cancelled);
}

/// (e) Without `--allow-actions` there is no action button, and a POST made
/// by hand is refused without touching the database.
#[tokio::test(flavor = "multi_thread")]
async fn actions_are_refused_without_the_flag() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = create(conn, "guarded", vec![task("work")], &[]);
    let id = start(conn, &wf, "alice");

    let (studio, b) = open(&db, &[]).await;
    b.goto(&studio.at(&format!("/executions/{id}"))).await;
    b.wait_for("#execution-status[data-status=running]").await;
    assert!(b.all("#action-cancel").await.is_empty());
    assert!(b.all("form[method=post]").await.is_empty());

    let before = snapshot(&db);
    // Forms as a script would make them: the confirmation's fields with a
    // guessed token, without the confirmation, and no fields at all.
    let mut answers = Vec::new();
    for form in ["csrf=guessed&confirm=yes", "csrf=guessed", ""] {
        let (code, body) = studio
            .request("POST", &format!("/executions/{id}/cancel"), Some(form))
            .await;
        answers.push((form, code, body));
    }
    assert_eq!(snapshot(&db), before, "the database is unchanged");
    assert_eq!(status(conn, id), ExecutionStatus::Running);
    for (form, code, body) in answers {
        assert_eq!(code, 403, "POST {form:?} refused as forbidden: {body}");
    }
}

/// (f) Markup in every string the data control shows as text on every page
/// and never runs.
#[tokio::test(flavor = "multi_thread")]
async fn markup_in_data_is_shown_as_text() {
    const WORKFLOW: &str = "<script>window.__pwned=1</script>";
    const NODE: &str = "<img src=x onerror=\"window.__pwned=1\">";
    const NODE_ATTR: &str = "\"><img src=x onerror=window.__pwned=1>";
    const USER: &str = "<svg onload=\"window.__pwned=1\"></svg>";
    const ERROR: &str = "</pre><script>window.__pwned=1</script>";
    const OUTPUT: &str = "<img src=x onerror=window.__pwned=1>";
    const QUEUE: &str = "<details open ontoggle=window.__pwned=1>";
    const SIGNAL: &str = "<style onload=window.__pwned=1></style>";

    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = create(
        conn,
        WORKFLOW,
        vec![
            Node::new(NODE, "task").config(json!({ "queue": QUEUE, "max_retries": 0 })),
            Node::new(NODE_ATTR, "task").config(json!({ "queue": "second", "max_retries": 0 })),
            Node::signal("approval", SIGNAL),
        ],
        &[(NODE, NODE_ATTR)],
    );
    engine::set_queue_limit(conn, QUEUE, Some(5)).unwrap();
    let failed = start(conn, &wf, USER);
    engine::send_signal(conn, failed, SIGNAL, Some(&json!({ "note": OUTPUT }))).unwrap();
    let lease = claim(conn, QUEUE);
    engine::complete_step(conn, &lease, Some(&json!({ "html": OUTPUT }))).unwrap();
    fail(conn, "second", ERROR);
    assert_eq!(status(conn, failed), ExecutionStatus::Failed);
    let running = start(conn, &wf, USER);
    let step = |node: &str| {
        steps(&mut db.connect(), failed)
            .into_iter()
            .find(|s| s.node_id == node)
            .unwrap()
            .id
    };

    let (studio, b) = open(&db, &["--allow-actions"]).await;
    let text_has = |text: &str, want: &str, page: &str| {
        assert!(
            text.contains(want),
            "{page} shows {want:?} as text:\n{text}"
        );
    };

    b.goto(&studio.at("/")).await;
    assert_not_pwned(&b, "/").await;

    b.goto(&studio.at("/executions")).await;
    assert_not_pwned(&b, "/executions").await;
    let text = b.text().await;
    text_has(&text, WORKFLOW, "/executions");
    text_has(&text, USER, "/executions");

    // Filter values come back into the form.
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("workflow", NODE_ATTR)
        .append_pair("user", WORKFLOW)
        .append_pair("queue", NODE)
        .finish();
    b.goto(&studio.at(&format!("/executions?{query}"))).await;
    assert_not_pwned(&b, "/executions?(markup)").await;

    // The graph's node ids are checked last (the other checks do not need
    // the drawing).
    let mut graphs = Vec::new();
    for id in [failed, running] {
        let page = format!("/executions/{id}");
        b.goto(&studio.at(&page)).await;
        b.wait_for("#live svg.graph").await;
        assert_not_pwned(&b, &page).await;
        let ids: Vec<Option<String>> = graph_nodes(&b).await.into_iter().map(|n| n.node).collect();
        let drawn = b
            .js("return document.querySelector('svg.graph').textContent;")
            .await;
        graphs.push((page.clone(), ids, drawn));
        let steps_text = b.text_of("#steps").await;
        text_has(&steps_text, NODE, &page);
        text_has(&steps_text, NODE_ATTR, &page);
        let text = b.text().await;
        text_has(&text, WORKFLOW, &page);
        text_has(&text, USER, &page);
        if id == running {
            // Its `approval` step waits: "why it is not done yet" names the signal.
            text_has(&text, SIGNAL, &page);
        }
    }

    let page = format!("/steps/{}", step(NODE));
    b.goto(&studio.at(&page)).await;
    assert_not_pwned(&b, &page).await;
    let output = b.text_of("#step-output").await;
    text_has(&output, OUTPUT, &page);
    text_has(&b.text().await, NODE, &page);

    let page = format!("/steps/{}", step(NODE_ATTR));
    b.goto(&studio.at(&page)).await;
    assert_not_pwned(&b, &page).await;
    let error = b.text_of("#step-error").await;
    assert_eq!(error.trim(), ERROR, "{page}");

    // The wait step that took the signal (its payload is its output).
    let page = format!("/steps/{}", step("approval"));
    b.goto(&studio.at(&page)).await;
    assert_not_pwned(&b, &page).await;
    text_has(&b.text_of("#step-output").await, OUTPUT, &page);

    b.goto(&studio.at("/workflows")).await;
    assert_not_pwned(&b, "/workflows").await;
    let text = b.text_of("#workflows").await;
    text_has(&text, WORKFLOW, "/workflows");

    b.goto(&studio.at("/queues")).await;
    assert_not_pwned(&b, "/queues").await;
    let text = b.text_of("#queues").await;
    text_has(&text, QUEUE, "/queues");

    b.goto(&studio.at("/schedules")).await;
    assert_not_pwned(&b, "/schedules").await;

    for (page, ids, drawn) in graphs {
        for node in [NODE, NODE_ATTR] {
            assert!(
                ids.iter().any(|i| i.as_deref() == Some(node)),
                "{page}: a graph node has data-node-id {node:?}: {ids:?}"
            );
            assert!(
                drawn.as_str().is_some_and(|t| t.contains(node)),
                "{page}: the graph shows {node:?} as text: {drawn}"
            );
        }
    }
}
