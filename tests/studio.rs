#![cfg(feature = "studio")]
//! The web dashboard's router, in-process against a real PostgreSQL: every
//! page answers, hostile data stays inert text on every page, actions are
//! off unless enabled and then need the CSRF token and a confirmation (the
//! database checked each time), the access token, the security headers,
//! and a live update arriving after a step completes elsewhere.
//! (`tests/studio_browser.rs` drives the same pages in a real browser.)

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures_util::StreamExt;
use serde_json::json;
use tower::ServiceExt;
use workflow_db::engine::NewSchedule;
use workflow_db::engine::{self, Backoff};
use workflow_db::runtime::AsyncPool;
use workflow_db::studio::{self, Studio, StudioOptions};
use workflow_db::testing::TestDatabase;
use workflow_db::{Edge, ExecutionStatus, NewExecution, NewWorkflow, Node, WorkflowGraph};

const LEASE: Duration = common::LEASE;

/// Markup that would run if a page let it through as HTML.
const SCRIPT: &str = "<script>window.__pwned=1</script>";
const IMG: &str = "<img src=x onerror=\"window.__pwned=1\">";

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

async fn get(app: &Router, path: &str) -> Answer {
    send(app, Request::get(path).body(Body::empty()).unwrap()).await
}

async fn post(app: &Router, path: &str, form: &str) -> Answer {
    let request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))
        .unwrap();
    send(app, request).await
}

fn studio(db: &TestDatabase, actions: bool, token: Option<&str>) -> Studio {
    let mut options = StudioOptions::default();
    options.actions = actions;
    options.token = token.map(str::to_owned);
    Studio::new(AsyncPool::new(db.pool()), options)
}

/// The value of `name="csrf"` on a page.
fn csrf(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let at = page.find(marker).expect("a csrf field") + marker.len();
    page[at..at + 64].to_owned()
}

fn status_of(db: &TestDatabase, id: uuid::Uuid) -> ExecutionStatus {
    use diesel::prelude::*;
    workflow_db::schema::executions::table
        .find(id)
        .select(workflow_db::schema::executions::status)
        .first(&mut db.connect())
        .unwrap()
}

/// `a -> b`, `a -> c`: one execution running with `a` claimed.
fn running_execution(db: &TestDatabase) -> (uuid::Uuid, workflow_db::Lease) {
    let conn = &mut db.connect();
    let wf = common::workflow(conn, &["a", "b", "c"], &[("a", "b"), ("a", "c")]);
    let e = common::start(conn, &wf);
    let steps = engine::claim_steps(conn, "w", 1, LEASE).unwrap();
    (e.id, steps[0].lease().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_page_answers_and_links_what_it_lists() {
    let db = TestDatabase::new();
    let (id, lease) = running_execution(&db);
    let step = lease.step_id;
    let app = studio(&db, false, None).router();
    for path in [
        "/",
        "/executions",
        "/executions?status=running",
        "/workflows",
        "/queues",
        "/schedules",
        "/static/studio.css",
        "/static/studio.js",
    ] {
        let a = get(&app, path).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.body);
    }
    let list = get(&app, "/executions?status=running").await.body;
    assert!(
        list.contains(&format!("data-execution-id=\"{id}\"")),
        "{list}"
    );
    let page = get(&app, &format!("/executions/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(
        "id=\"execution-status\" class=\"badge status-running\" data-status=\"running\""
    ));
    assert!(page.body.contains(&format!("data-step-id=\"{step}\"")));
    assert!(page.body.contains(&format!("/executions/{id}/live")));
    // A short id works as the full one does.
    let short = &id.simple().to_string()[..12];
    assert_eq!(
        get(&app, &format!("/executions/{short}")).await.status,
        StatusCode::OK
    );
    let step_page = get(&app, &format!("/steps/{step}")).await;
    assert_eq!(step_page.status, StatusCode::OK);
    assert!(step_page.body.contains("id=\"attempts\""));
    // The overview counts it.
    let overview = get(&app, "/").await.body;
    assert!(
        overview.contains("data-status=\"running\" href=\"/executions?status=running\">1</a>"),
        "{overview}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_answer() {
    let db = TestDatabase::new();
    let app = studio(&db, false, None).router();
    let a = get(&app, "/executions?status=bogus").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("unknown status"), "{}", a.body);
    let a = get(&app, "/executions?since=yesterday").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("is not a time"), "{}", a.body);
    let a = get(&app, "/executions?workflow=no-such-workflow").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("not found"), "{}", a.body);
    let a = get(&app, "/executions?after=garbage").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let a = get(&app, &format!("/executions/{}", uuid::Uuid::now_v7())).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&app, "/executions/zz").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&app, "/steps/0123").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(get(&app, "/nowhere").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_pages_by_keyset_and_keeps_its_filters() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let wf = common::workflow(conn, &["a"], &[]);
    let mut ids = Vec::new();
    for _ in 0..55 {
        let e = engine::start_execution(conn, &NewExecution::new(wf.id).user_id("ann"))
            .unwrap()
            .execution;
        ids.push(e.id.to_string());
    }
    let app = studio(&db, false, None).router();
    let first = get(&app, "/executions?user=ann").await.body;
    assert_eq!(first.matches("data-execution-id=").count(), 50);
    let marker = "id=\"next-page\" href=\"";
    let at = first.find(marker).expect("a next page") + marker.len();
    let next = first[at..]
        .split('"')
        .next()
        .unwrap()
        .replace("&#38;", "&")
        .replace("&amp;", "&");
    assert!(next.contains("user=ann"), "{next}");
    let second = get(&app, &next).await.body;
    assert_eq!(second.matches("data-execution-id=").count(), 5);
    assert!(!second.contains("id=\"next-page\""));
    // Together the two pages list each execution once.
    for id in &ids {
        assert_eq!(
            first.matches(id.as_str()).count().min(1) + second.matches(id.as_str()).count().min(1),
            1,
            "{id}"
        );
    }
}

/// Markup in every field a page shows: workflow name and description,
/// node ids, user, queue, concurrency key, step error and output, signal
/// name, schedule name.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_data_stays_text_on_every_page() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let node = |id: &str| {
        Node::new(id, IMG).config(json!({ "max_retries": 0, "queue": format!("q{SCRIPT}") }))
    };
    let graph = WorkflowGraph {
        nodes: vec![
            node(&format!("fetch{IMG}")),
            node(&format!("store{SCRIPT}")),
            Node::signal(format!("wait{SCRIPT}"), format!("sig{IMG}")),
        ],
        edges: vec![
            Edge::new(format!("fetch{IMG}"), format!("store{SCRIPT}")),
            Edge::new(format!("fetch{IMG}"), format!("wait{SCRIPT}")),
        ],
    };
    let mut new = NewWorkflow::from_graph(SCRIPT, &graph);
    new.description = Some(IMG.to_owned());
    let wf = new.create(conn).unwrap();
    let started = engine::start_execution(
        conn,
        &NewExecution::new(wf.id)
            .user_id(SCRIPT)
            .concurrency_key(IMG)
            .data(json!({ "note": IMG })),
    )
    .unwrap()
    .execution;
    let queue = format!("q{SCRIPT}");
    let fetch = engine::claim_from(conn, "w", std::slice::from_ref(&queue), 1, LEASE).unwrap();
    engine::complete_step(
        conn,
        &fetch[0].lease().unwrap(),
        Some(&json!({ "html": SCRIPT })),
    )
    .unwrap();
    let store = engine::claim_from(conn, "w", &[queue], 1, LEASE).unwrap();
    engine::fail_step(
        conn,
        &store[0].lease().unwrap(),
        &format!("boom {IMG}"),
        &Backoff::default(),
    )
    .unwrap();
    engine::set_concurrency_limit(conn, SCRIPT, 2).unwrap();
    NewSchedule::new(SCRIPT, wf.id, "0 * * * *")
        .user_id(IMG)
        .create(conn)
        .unwrap();
    let steps = workflow_db::ExecutionStep::list_for_execution(conn, started.id).unwrap();

    let app = studio(&db, true, None).router();
    let mut paths = vec![
        "/".to_owned(),
        "/executions".to_owned(),
        format!("/executions?user={}", urlencode(SCRIPT)),
        format!("/executions?workflow={}", urlencode(SCRIPT)),
        format!("/executions?queue={}", urlencode(&format!("q{SCRIPT}"))),
        format!("/executions?status={}", urlencode(IMG)),
        format!("/executions/{}", started.id),
        "/workflows".to_owned(),
        "/queues".to_owned(),
        "/schedules".to_owned(),
    ];
    paths.extend(steps.iter().map(|s| format!("/steps/{}", s.id)));
    for path in &paths {
        let a = get(&app, path).await;
        assert!(
            a.status == StatusCode::OK || a.status == StatusCode::BAD_REQUEST,
            "{path}: {}",
            a.status
        );
        for raw in ["<script>window", "<img src=x", "onerror=\"window"] {
            assert!(
                !a.body.contains(raw),
                "{path} lets {raw:?} through:\n{}",
                a.body
            );
        }
        // The markup is there, as text (the overview lists no name here,
        // and a bad status is refused without echoing it in a list).
        if path != "/" && !path.contains("status=") {
            assert!(
                a.body.contains("&#60;script&#62;") || a.body.contains("&#60;img"),
                "{path} does not show the hostile text at all:\n{}",
                a.body
            );
        }
    }
    // The execution page shows the failed step's error and the graph's
    // nodes, escaped, and a confirmation page echoes nothing raw either.
    let page = get(&app, &format!("/executions/{}", started.id)).await.body;
    assert!(
        page.contains("boom &#60;img") || page.contains("boom &lt;img"),
        "{page}"
    );
    let token = csrf(&page);
    let confirm = post(
        &app,
        &format!("/executions/{}/cancel", started.id),
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(!confirm.body.contains("<script>window"));
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_are_off_unless_enabled() {
    let db = TestDatabase::new();
    let (id, _) = running_execution(&db);
    let app = studio(&db, false, None).router();
    let page = get(&app, &format!("/executions/{id}")).await.body;
    assert!(!page.contains("id=\"action-cancel\""));
    assert!(!page.contains("name=\"csrf\""));
    let before = common::snapshot(&db);
    let a = post(
        &app,
        &format!("/executions/{id}/cancel"),
        "csrf=x&confirm=yes",
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("--allow-actions"), "{}", a.body);
    assert_eq!(
        common::snapshot(&db),
        before,
        "a refused action changed the database"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_needs_the_csrf_token_and_a_confirmation() {
    let db = TestDatabase::new();
    let (id, _) = running_execution(&db);
    let app = studio(&db, true, None).router();
    let page = get(&app, &format!("/executions/{id}")).await.body;
    for action in ["pause", "cancel"] {
        assert!(
            page.contains(&format!("id=\"action-{action}\"")),
            "{action}"
        );
    }
    assert!(!page.contains("id=\"action-resume\""));
    let token = csrf(&page);
    let path = format!("/executions/{id}/cancel");
    let before = common::snapshot(&db);

    // A forged or stale token: refused, nothing changed.
    let a = post(&app, &path, "csrf=0000&confirm=yes").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("CSRF"));
    // The right token from another site: refused.
    let request = Request::post(&path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "cross-site")
        .body(Body::from(format!("csrf={token}&confirm=yes")))
        .unwrap();
    assert_eq!(send(&app, request).await.status, StatusCode::FORBIDDEN);
    // No confirmation yet: a page asking for it.
    let a = post(&app, &path, &format!("csrf={token}")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("id=\"confirm-yes\""));
    assert!(a.body.contains("name=\"confirm\" value=\"yes\""));
    assert_eq!(common::snapshot(&db), before, "asking changed the database");
    assert_eq!(status_of(&db, id), ExecutionStatus::Running);
    // Confirmed: done, and back to the execution.
    let a = post(&app, &path, &format!("csrf={token}&confirm=yes")).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(
        a.headers[header::LOCATION],
        format!("/executions/{id}?done=cancel").as_str()
    );
    assert_eq!(status_of(&db, id), ExecutionStatus::Cancelled);
    let page = get(&app, &format!("/executions/{id}?done=cancel"))
        .await
        .body;
    assert!(page.contains("data-status=\"cancelled\""));
    assert!(page.contains("id=\"action-retry\""));
    // Cancelling again is a conflict, said so.
    let a = post(&app, &path, &format!("csrf={token}&confirm=yes")).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.body);
    // An unknown action.
    let a = post(
        &app,
        &format!("/executions/{id}/explode"),
        &format!("csrf={token}&confirm=yes"),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_token_guards_every_path() {
    let db = TestDatabase::new();
    let app = studio(&db, false, Some("t0ken-123")).router();
    for path in ["/", "/executions", "/static/studio.js", "/nowhere"] {
        let a = get(&app, path).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(!a.body.contains("t0ken-123"));
    }
    let a = get(&app, "/?token=wrong").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let bearer = Request::get("/executions")
        .header(header::AUTHORIZATION, "Bearer t0ken-123")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, bearer).await.status, StatusCode::OK);
    // ?token= once: a cookie, and the same page without the token in its URL.
    let a = get(&app, "/executions?status=running&token=t0ken-123").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.headers[header::LOCATION], "/executions?status=running");
    let cookie = a.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let with_cookie = Request::get("/executions?status=running")
        .header(header::COOKIE, cookie.split(';').next().unwrap())
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, with_cookie).await.status, StatusCode::OK);
}

/// Mounted under a prefix, every link and form carries it.
#[tokio::test(flavor = "multi_thread")]
async fn a_studio_nested_under_a_path_links_under_it() {
    let db = TestDatabase::new();
    let (id, _) = running_execution(&db);
    let mut options = StudioOptions::default();
    options.actions = true;
    options.base_path = "/ops/studio/".to_owned();
    let studio = Studio::new(AsyncPool::new(db.pool()), options);
    let app = Router::new().nest("/ops/studio", studio.router());
    let list = get(&app, "/ops/studio/executions").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(
        list.body
            .contains(&format!("href=\"/ops/studio/executions/{id}\"")),
        "{}",
        list.body
    );
    assert!(list.body.contains("href=\"/ops/studio/static/studio.css\""));
    let page = get(&app, &format!("/ops/studio/executions/{id}"))
        .await
        .body;
    assert!(page.contains(&format!("action=\"/ops/studio/executions/{id}/cancel\"")));
    assert!(page.contains(&format!(
        "data-live-url=\"/ops/studio/executions/{id}/live\""
    )));
    for href in page.split("href=\"").skip(1) {
        assert!(
            href.starts_with("/ops/studio/"),
            "a link outside the prefix: {href:.60}"
        );
    }
}

#[test]
fn a_reachable_address_needs_a_token() {
    let local: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
    let v6_local: std::net::SocketAddr = "[::1]:4000".parse().unwrap();
    let any: std::net::SocketAddr = "0.0.0.0:4000".parse().unwrap();
    assert!(studio::check_bind(&local, None).is_ok());
    assert!(studio::check_bind(&v6_local, None).is_ok());
    let e = studio::check_bind(&any, None).unwrap_err().to_string();
    assert!(e.contains("token") && e.contains("0.0.0.0:4000"), "{e}");
    assert!(studio::check_bind(&any, Some("")).is_err());
    assert!(studio::check_bind(&any, Some("secret")).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_the_security_headers() {
    let db = TestDatabase::new();
    let app = studio(&db, false, None).router();
    for path in ["/", "/executions/zz", "/static/studio.js"] {
        let a = get(&app, path).await;
        let csp = a.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert_eq!(a.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(a.headers[header::X_FRAME_OPTIONS], "DENY");
    }
    // No page shows the connection string.
    let overview = get(&app, "/").await.body;
    assert!(!overview.contains(db.name()) && !overview.contains("postgres://"));
}

/// The live stream: an update right after subscribing (what changed since
/// the page was read), then one after a step completes on another
/// connection, both rendered once by the studio's notifier.
#[tokio::test(flavor = "multi_thread")]
async fn the_live_stream_pushes_a_change_made_elsewhere() {
    let db = TestDatabase::new();
    let (id, lease) = running_execution(&db);
    let studio = studio(&db, false, None);
    studio.start_live(db.url()).await.unwrap();
    let app = studio.router();
    let response = app
        .clone()
        .oneshot(
            Request::get(format!("/executions/{id}/live"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body().into_data_stream();
    let mut next_update = async || -> String {
        let mut text = String::new();
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
                .await
                .expect("an update within 10 s")
                .expect("the stream goes on")
                .unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("event: update") && text.ends_with("\n\n") {
                return text;
            }
        }
    };
    let first = next_update().await;
    assert!(
        first.contains(&format!(
            "data-step-id=\"{}\" data-status=\"running\"",
            lease.step_id
        )) || first.contains("data-status=\"running\""),
        "{first}"
    );
    let conn = &mut db.connect();
    engine::complete_step(conn, &lease, None).unwrap();
    let second = next_update().await;
    assert!(
        second.contains(&format!("data-step-id=\"{}\"", lease.step_id)),
        "{second}"
    );
    // The completed step's row in the steps table.
    let row = second
        .split("<tr data-step-id=")
        .find(|r| r.contains(&lease.step_id.to_string()))
        .unwrap();
    assert!(row.contains("data-status=\"completed\""), "{row}");
    studio.shutdown();
}

/// Without a token only requests addressed to this host are answered: a
/// page whose name was rebound to 127.0.0.1 (DNS rebinding) reads nothing
/// and changes nothing. With a token the token decides.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_only_local_host_names_are_answered() {
    let db = TestDatabase::new();
    let (id, _) = running_execution(&db);
    let app = studio(&db, true, None).router();
    let with_host = |path: &str, host: &str| {
        Request::get(path)
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap()
    };
    for host in [
        "localhost:4000",
        "127.0.0.1:4000",
        "[::1]:4000",
        "LOCALHOST",
    ] {
        let a = send(&app, with_host("/executions", host)).await;
        assert_eq!(a.status, StatusCode::OK, "{host}");
    }
    let a = send(
        &app,
        with_host(&format!("/executions/{id}"), "attacker.example:4000"),
    )
    .await;
    assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(!a.body.contains(&id.to_string()) && !a.body.contains("name=\"csrf\""));
    assert!(a.body.contains("localhost only"), "{}", a.body);
    // The same with a token: the token decides, not the name.
    let tokened = studio(&db, false, Some("tok")).router();
    let request = Request::get("/executions")
        .header(header::HOST, "studio.internal:4000")
        .header(header::AUTHORIZATION, "Bearer tok")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&tokened, request).await.status, StatusCode::OK);
    // And names a service allows.
    let mut options = StudioOptions::default();
    options.allowed_hosts = vec!["ops.internal".to_owned()];
    let allowed = Studio::new(AsyncPool::new(db.pool()), options).router();
    let a = send(&allowed, with_host("/executions", "OPS.internal:8080")).await;
    assert_eq!(a.status, StatusCode::OK);
}

/// A POST with the right token but from another origin, or without a form
/// at all, is refused like a wrong token; nothing changes.
#[tokio::test(flavor = "multi_thread")]
async fn an_action_from_another_origin_or_without_a_form_is_refused() {
    let db = TestDatabase::new();
    let (id, _) = running_execution(&db);
    let app = studio(&db, true, None).router();
    let token = csrf(&get(&app, &format!("/executions/{id}")).await.body);
    let path = format!("/executions/{id}/cancel");
    let before = common::snapshot(&db);
    let forged = |origin: &str, site: &str| {
        Request::post(&path)
            .header(header::HOST, "localhost:4000")
            .header(header::ORIGIN, origin)
            .header("sec-fetch-site", site)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={token}&confirm=yes")))
            .unwrap()
    };
    for (origin, site) in [
        ("http://evil.example", "cross-site"),
        ("http://localhost:5000", "same-site"),
        ("http://evil.example", "same-origin"),
    ] {
        let a = send(&app, forged(origin, site)).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{origin} {site}");
    }
    let a = post(&app, &path, "").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert!(a.body.contains("CSRF"));
    assert_eq!(common::snapshot(&db), before);
    // From the studio's own page: accepted.
    let a = send(&app, forged("http://localhost:4000", "same-origin")).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(status_of(&db, id), ExecutionStatus::Cancelled);
}

/// Error pages are the studio's pages, within its base path; a live
/// stream of an execution that does not exist is a 404, not an open
/// stream; `?token=` never redirects off the studio.
#[tokio::test(flavor = "multi_thread")]
async fn errors_stay_within_the_studio() {
    let db = TestDatabase::new();
    let mut options = StudioOptions::default();
    options.base_path = "/ops".to_owned();
    options.token = Some("tok".to_owned());
    let studio = Studio::new(AsyncPool::new(db.pool()), options);
    let app = Router::new().nest("/ops", studio.router());
    let auth = |path: &str| {
        Request::get(path)
            .header(header::AUTHORIZATION, "Bearer tok")
            .body(Body::empty())
            .unwrap()
    };
    let a = send(&app, auth("/ops/nowhere")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.body.contains("no such page"));
    assert!(
        a.body.contains("href=\"/ops/static/studio.css\""),
        "{}",
        a.body
    );
    let a = send(
        &app,
        auth(&format!("/ops/executions/{}", uuid::Uuid::now_v7())),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.body.contains("href=\"/ops/executions\""));
    let a = send(
        &app,
        auth(&format!("/ops/executions/{}/live", uuid::Uuid::now_v7())),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = get(&app, "/ops//evil.example/x?token=tok").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.headers[header::LOCATION], "/ops/evil.example/x");
}

/// A workflow name filters every version of that name.
#[tokio::test(flavor = "multi_thread")]
async fn the_workflow_filter_takes_a_name_across_versions() {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let v1 = common::workflow(conn, &["a"], &[]);
    let v2 = NewWorkflow::from_graph("test", &common::graph(&["a", "b"], &[("a", "b")]))
        .create(conn)
        .unwrap();
    let other = NewWorkflow::from_graph("other", &common::graph(&["a"], &[]))
        .create(conn)
        .unwrap();
    let e1 = common::start(conn, &v1);
    let e2 = common::start(conn, &v2);
    let e3 = common::start(conn, &other);
    let app = studio(&db, false, None).router();
    let list = get(&app, "/executions?workflow=test").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert!(list.body.contains(&e1.id.to_string()) && list.body.contains(&e2.id.to_string()));
    assert!(!list.body.contains(&e3.id.to_string()));
    let by_id = get(&app, &format!("/executions?workflow={}", v2.id))
        .await
        .body;
    assert!(by_id.contains(&e2.id.to_string()) && !by_id.contains(&e1.id.to_string()));
}
