#![cfg(feature = "cli")]
//! `db-ops` as operators and scripts run it, against a database with
//! executions in several states built through the engine API: exit codes,
//! `--json` shapes, filters and pages, short ids, the drawn graph, and that
//! a change refused for want of confirmation leaves the database as it was.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{PASSWORD, snapshot, url_with};
use serde_json::{Value, json};
use workflow_db::engine::{self, Backoff};
use workflow_db::testing::TestDatabase;
use workflow_db::{Edge, ExecutionStatus, NewExecution, NewWorkflow, Node, WorkflowGraph};

const OPS: &str = env!("CARGO_BIN_EXE_db-ops");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The stdout JSON lines.
    fn lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn events(&self, event: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["event"] == event)
            .collect()
    }
}

/// Runs `db-ops` with the database URL (holding a password) outside the
/// repository, without a terminal, and checks the password is not printed.
fn ops(url: &str, args: &[&str]) -> Run {
    let out = Command::new(OPS)
        .args(args)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .env_remove("NO_COLOR")
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    assert!(
        !run.stdout.contains(PASSWORD) && !run.stderr.contains(PASSWORD),
        "db-ops {args:?} printed the password:\n{}{}",
        run.stdout,
        run.stderr
    );
    run
}

fn ok(url: &str, args: &[&str]) -> Run {
    let r = ops(url, args);
    assert_eq!(r.code, 0, "db-ops {args:?}: {}{}", r.stdout, r.stderr);
    r
}

struct Fixture {
    db: TestDatabase,
    url: String,
    completed: uuid::Uuid,
    failed: uuid::Uuid,
    expired: uuid::Uuid,
    paused: uuid::Uuid,
    fresh: uuid::Uuid,
}

/// `fetch -> store`, `fetch -> audit`, each node its own queue, no retries.
/// Executions, oldest first: completed (user alice), failed at `store`
/// (bob), running with `fetch`'s lease expired (alice), paused (bob), and
/// running with `fetch` ready (carol).
fn fixture() -> Fixture {
    let db = TestDatabase::new();
    let conn = &mut db.connect();
    let node = |id: &str| Node::new(id, id).config(json!({ "max_retries": 0 }));
    let graph = WorkflowGraph {
        nodes: vec![node("fetch"), node("store"), node("audit")],
        edges: vec![Edge::new("fetch", "store"), Edge::new("fetch", "audit")],
    };
    let wf = NewWorkflow::from_graph("ops-flow", &graph)
        .create(conn)
        .unwrap();
    let start = |conn: &mut _, user: &str| {
        engine::start_execution(conn, &NewExecution::new(wf.id).user_id(user))
            .unwrap()
            .execution
            .id
    };
    let claim = |conn: &mut _, queue: &str, lease: Duration| {
        let steps = engine::claim_from(conn, "w1", &[queue.to_owned()], 10, lease).unwrap();
        assert_eq!(steps.len(), 1, "one {queue} step claimable");
        steps[0].lease().unwrap()
    };
    let lease = Duration::from_secs(60);

    let completed = start(conn, "alice");
    for q in ["fetch", "store", "audit"] {
        let l = claim(conn, q, lease);
        engine::complete_step(conn, &l, None).unwrap();
    }
    let failed = start(conn, "bob");
    let l = claim(conn, "fetch", lease);
    engine::complete_step(conn, &l, None).unwrap();
    let l = claim(conn, "store", lease);
    engine::fail_step(conn, &l, "disk full\nsecond line", &Backoff::default()).unwrap();

    let expired = start(conn, "alice");
    claim(conn, "fetch", Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(20));

    let paused = start(conn, "bob");
    engine::pause(conn, paused).unwrap();
    let fresh = start(conn, "carol");

    let status = |conn: &mut _, id| workflow_db::Execution::find(conn, id).unwrap().status;
    assert_eq!(status(conn, completed), ExecutionStatus::Completed);
    assert_eq!(status(conn, failed), ExecutionStatus::Failed);
    let url = url_with(&db, None, None);
    Fixture {
        db,
        url,
        completed,
        failed,
        expired,
        paused,
        fresh,
    }
}

fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn list_filters_pages_and_short_ids() {
    let f = fixture();
    let url = &f.url;
    let all = ok(url, &["--json", "list"]);
    let execs = all.events("execution");
    let newest_first: Vec<String> = [f.fresh, f.paused, f.expired, f.failed, f.completed]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ids(&execs), newest_first);
    for key in [
        "id",
        "workflow_id",
        "workflow",
        "workflow_version",
        "status",
        "user_id",
        "started_at",
        "completed_at",
        "error",
    ] {
        assert!(execs[0].get(key).is_some(), "missing {key}: {}", execs[0]);
    }
    assert_eq!(execs[0]["workflow"], "ops-flow");
    assert_eq!(
        all.events("page"),
        vec![json!({"event": "page", "count": 5, "next_cursor": null})]
    );

    // Pages of 2 continue without overlap or gap.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..5 {
        let mut args = vec!["--json", "list", "--limit", "2"];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        let r = ok(url, &args);
        seen.extend(ids(&r.events("execution")));
        after = r.events("page")[0]["next_cursor"]
            .as_str()
            .map(str::to_owned);
        if after.is_none() {
            break;
        }
    }
    assert_eq!(seen, newest_first);

    // Filters.
    let by =
        |args: &[&str]| ids(&ok(url, &[&["--json", "list"], args].concat()).events("execution"));
    assert_eq!(by(&["--status", "failed"]), vec![f.failed.to_string()]);
    assert_eq!(
        by(&["--status", "paused", "--status", "completed"]),
        vec![f.paused.to_string(), f.completed.to_string()]
    );
    assert_eq!(
        by(&["--user", "alice"]),
        vec![f.expired.to_string(), f.completed.to_string()]
    );
    assert_eq!(by(&["--workflow", "ops-flow"]).len(), 5);
    let wf_short = &execs[0]["workflow_id"].as_str().unwrap()[..13];
    assert_eq!(by(&["--workflow", wf_short]).len(), 5);
    let r = ops(url, &["list", "--workflow", "no-such-flow"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("workflow no-such-flow not found"),
        "{}",
        r.stderr
    );
    assert_eq!(by(&["--queue", "store"]).len(), 5);
    assert!(by(&["--queue", "nope"]).is_empty());
    assert!(by(&["--since", "2999-01-01T00:00:00Z"]).is_empty());
    assert_eq!(by(&["--until", "2999-01-01T00:00:00Z"]).len(), 5);
    // Human output: a header, one line per execution, the page line.
    let text = ok(url, &["list", "--status", "failed"]);
    assert_eq!(text.stdout.lines().count(), 3, "{}", text.stdout);
    assert!(
        text.stdout.contains("disk full second line"),
        "{}",
        text.stdout
    );
    // A bad status is a usage error.
    assert_eq!(ops(url, &["list", "--status", "bogus"]).code, 2);

    // Short ids: the printed one works; a prefix shared by several is ambiguous.
    let short = &execs[3]["id"].as_str().unwrap()[..18];
    let r = ok(url, &["--json", "show", short]);
    assert_eq!(r.events("execution")[0]["id"], f.failed.to_string());
    let all_ids: Vec<String> = [f.completed, f.failed, f.expired, f.paused, f.fresh]
        .iter()
        .map(|i| i.simple().to_string())
        .collect();
    let (a, b) = all_ids
        .iter()
        .flat_map(|a| all_ids.iter().filter(move |b| *b != a).map(move |b| (a, b)))
        .max_by_key(|(a, b)| a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count())
        .unwrap();
    let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    assert!(common >= 8, "executions created a minute apart?");
    let prefix = &a[..8];
    let r = ops(url, &["show", prefix]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("ambiguous"), "{}", r.stderr);
    let r = ops(url, &["--json", "show", prefix]);
    assert_eq!(r.code, 1);
    let err = &r.events("error")[0];
    assert!(err["message"].as_str().unwrap().contains("ambiguous"));
    assert_eq!(err["exit_code"], 1);
    let candidates = err["candidates"].as_array().unwrap();
    assert!(candidates.len() >= 2, "{err}");
    assert!(
        candidates
            .iter()
            .all(|c| c.as_str().unwrap().replace('-', "").starts_with(prefix))
    );
    // Unknown id: exit 1, named.
    let r = ops(url, &["show", "ffffffffffff"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
}

#[test]
fn show_events_why_counts_and_stuck() {
    let f = fixture();
    let url = &f.url;

    // show: fields, step table, graph; plain text without a terminal.
    let r = ok(url, &["show", &f.failed.to_string()]);
    assert!(!r.stdout.contains('\x1b'), "ANSI codes: {}", r.stdout);
    assert!(r.stdout.contains("status:    failed"), "{}", r.stdout);
    assert!(r.stdout.contains("NODE"), "{}", r.stdout);
    assert!(r.stdout.contains("disk full second line"), "{}", r.stdout);
    let graph: Vec<&str> = r
        .stdout
        .lines()
        .skip_while(|l| *l != "graph:")
        .skip(1)
        .collect();
    assert_eq!(graph.len(), 3, "{}", r.stdout);
    assert!(graph[0].contains("layer 0") && graph[0].contains("fetch [completed]"));
    assert!(graph[0].contains("-> audit, store"), "{}", graph[0]);
    assert!(graph[1].contains("layer 1") && graph[1].contains("audit [skipped]"));
    assert!(graph[2].contains("store [failed]"), "{}", graph[2]);

    let r = ok(url, &["--json", "show", &f.failed.to_string()]);
    assert_eq!(r.events("execution")[0]["status"], "failed");
    let steps = r.events("step");
    assert_eq!(steps.len(), 3);
    for key in [
        "id",
        "node_id",
        "node_type",
        "queue",
        "status",
        "attempt",
        "retry_count",
        "max_retries",
        "started_at",
        "completed_at",
        "error",
    ] {
        assert!(steps[0].get(key).is_some(), "missing {key}");
    }
    let edges: Vec<(String, String)> = r
        .events("edge")
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        edges,
        vec![
            ("fetch".into(), "audit".into()),
            ("fetch".into(), "store".into())
        ]
    );

    // events: the timeline with the worker and the error.
    let r = ok(url, &["--json", "events", &f.failed.to_string()]);
    let t = r.events("transition");
    assert!(
        t.iter().any(|e| e["node_id"] == "store"
            && e["from"] == "running"
            && e["to"] == "failed"
            && e["error"].as_str().is_some_and(|s| s.contains("disk full"))),
        "{t:?}"
    );
    assert!(
        t.iter()
            .any(|e| e["node_id"].is_null() && e["to"] == "failed")
    );
    assert!(t.iter().any(|e| e["worker"] == "w1"), "{t:?}");
    let text = ok(url, &["events", &f.failed.to_string()]);
    assert!(text.stdout.contains("step store"), "{}", text.stdout);
    assert!(text.stdout.contains("running -> failed"), "{}", text.stdout);

    // why: the steps of the expired one wait for their upstream fetch.
    let r = ok(url, &["--json", "why", &f.expired.to_string()]);
    let why = r.events("why");
    assert!(
        why.iter().any(|w| w["node_id"] == "store"
            && w["reason"] == "upstream"
            && w["detail"].as_str().unwrap().contains("fetch")),
        "{why:?}"
    );
    let store_step = ok(url, &["--json", "show", &f.expired.to_string()])
        .events("step")
        .into_iter()
        .find(|s| s["node_id"] == "store")
        .unwrap();
    let r = ok(
        url,
        &[
            "--json",
            "why",
            "--step",
            store_step["id"].as_str().unwrap(),
        ],
    );
    assert_eq!(r.events("why")[0]["reason"], "upstream");
    let r = ok(url, &["why", &f.completed.to_string()]);
    assert!(r.stdout.contains("finished"), "{}", r.stdout);

    // counts.
    let r = ok(url, &["--json", "counts"]);
    let by_status: Vec<(String, i64)> = r
        .events("executions")
        .iter()
        .map(|e| {
            (
                e["status"].as_str().unwrap().into(),
                e["count"].as_i64().unwrap(),
            )
        })
        .collect();
    for (status, n) in [
        ("running", 2),
        ("paused", 1),
        ("completed", 1),
        ("failed", 1),
    ] {
        assert!(by_status.contains(&(status.into(), n)), "{by_status:?}");
    }
    assert_eq!(
        r.events("ready_steps"),
        vec![json!({"event": "ready_steps", "queue": "fetch", "count": 1})]
    );
    assert_eq!(
        r.events("running_steps"),
        vec![json!({"event": "running_steps", "queue": "fetch", "count": 1})]
    );

    // stuck: the expired lease of fetch; no execution without a runnable step.
    let r = ok(url, &["--json", "stuck"]);
    let leases = r.events("expired_lease");
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0]["execution_id"], f.expired.to_string());
    assert_eq!(leases[0]["node_id"], "fetch");
    assert_eq!(leases[0]["worker"], "w1");
    assert!(r.events("stalled_execution").is_empty());
    assert_eq!(r.events("stuck")[0]["expired_leases"], 1);
    let text = ok(url, &["stuck"]);
    assert!(text.stdout.contains("expired lease"), "{}", text.stdout);
}

#[test]
fn changes_need_confirmation_and_apply_with_yes() {
    let f = fixture();
    let url = &f.url;
    let before = snapshot(&f.db);
    for (cmd, id) in [
        ("cancel", f.fresh),
        ("pause", f.fresh),
        ("resume", f.paused),
        ("retry", f.failed),
    ] {
        let r = ops(url, &[cmd, &id.to_string()]);
        assert_eq!(r.code, 4, "{cmd}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("--yes"), "{}", r.stderr);
        assert!(r.stderr.contains("nothing was changed"), "{}", r.stderr);
        let r = ops(url, &["--json", cmd, &id.to_string()]);
        assert_eq!(r.code, 4);
        assert_eq!(r.events("error")[0]["rule"], "not-confirmed");
    }
    assert_eq!(
        snapshot(&f.db),
        before,
        "a refused change changed the database"
    );

    let status = |id| {
        workflow_db::Execution::find(&mut f.db.connect(), id)
            .unwrap()
            .status
    };
    let r = ok(url, &["--json", "cancel", "--yes", &f.fresh.to_string()]);
    assert_eq!(
        r.events("cancel")[0],
        json!({"event": "cancel", "id": f.fresh.to_string(),
               "from": "running", "status": "cancelled"})
    );
    assert_eq!(status(f.fresh), ExecutionStatus::Cancelled);

    let r = ok(url, &["resume", "--yes", &f.paused.to_string()]);
    assert!(r.stdout.contains("paused -> running"), "{}", r.stdout);
    let r = ok(url, &["pause", "--yes", &f.paused.to_string()]);
    assert!(r.stdout.contains("running -> paused"), "{}", r.stdout);
    assert_eq!(status(f.paused), ExecutionStatus::Paused);

    // retry replays the failed execution: store and audit pending again.
    let r = ok(url, &["--json", "retry", "--yes", &f.failed.to_string()]);
    assert_eq!(r.events("retry")[0]["status"], "running");
    assert_eq!(status(f.failed), ExecutionStatus::Running);
    let steps = ok(url, &["--json", "show", &f.failed.to_string()]).events("step");
    for s in &steps {
        let want = if s["node_id"] == "fetch" {
            "completed"
        } else {
            "pending"
        };
        assert_eq!(s["status"], want, "{s}");
    }

    // An illegal change is an error (exit 1), not a confirmation matter.
    let r = ops(url, &["cancel", "--yes", &f.completed.to_string()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
}

/// Runs `db-ops` in a pseudo-terminal (util-linux `script`), typing `answer`.
fn in_pty(url: &str, args: &str, answer: &str, no_color: bool) -> (Option<i32>, String) {
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &format!("'{OPS}' {args}"), "/dev/null"])
        .current_dir(std::env::temp_dir())
        .env("DATABASE_URL", url)
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(answer.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains(PASSWORD), "{text}");
    (out.status.code(), text)
}

#[test]
fn on_a_terminal_changes_ask_and_show_is_coloured() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    }
    let f = fixture();
    let url = &f.url;
    let before = snapshot(&f.db);
    let cancel = format!("cancel {}", f.fresh);
    for answer in ["\n", "n\n", "whatever\n"] {
        let (code, text) = in_pty(url, &cancel, answer, false);
        assert_eq!(code, Some(4), "{text}");
        assert!(
            text.contains("[y/N]") && text.contains("not confirmed"),
            "{text}"
        );
        assert_eq!(snapshot(&f.db), before);
    }
    let (code, text) = in_pty(url, &cancel, "y\n", false);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("running -> cancelled"), "{text}");
    let status = workflow_db::Execution::find(&mut f.db.connect(), f.fresh)
        .unwrap()
        .status;
    assert_eq!(status, ExecutionStatus::Cancelled);

    // Colours on a terminal, unless NO_COLOR is set.
    let show = format!("show {}", f.failed);
    let (code, text) = in_pty(url, &show, "", false);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("\x1b[31mfailed\x1b[0m"), "{text}");
    let (_, text) = in_pty(url, &show, "", true);
    assert!(!text.contains('\x1b'), "{text}");
    assert!(text.contains("store [failed]"), "{text}");
}

#[test]
fn stuck_lists_a_running_execution_nothing_can_move() {
    use diesel::RunQueryDsl;
    let f = fixture();
    let conn = &mut f.db.connect();
    // Written by hand, as a bad fix or a bug would: a running execution whose
    // only step waits for an upstream step that does not exist.
    let wf = workflow_db::Execution::find(conn, f.fresh)
        .unwrap()
        .workflow_id;
    let stalled = NewExecution {
        status: ExecutionStatus::Running,
        ..NewExecution::new(wf)
    }
    .create(conn)
    .unwrap();
    diesel::sql_query(
        "INSERT INTO execution_steps (id, execution_id, node_id, upstream_pending) \
         VALUES (gen_random_uuid(), $1, 'orphan', 1)",
    )
    .bind::<diesel::sql_types::Uuid, _>(stalled.id)
    .execute(conn)
    .unwrap();
    let r = ok(&f.url, &["--json", "stuck"]);
    assert_eq!(
        r.events("stalled_execution"),
        vec![
            json!({"event": "stalled_execution", "execution_id": stalled.id.to_string(), "pending_steps": 1})
        ]
    );
    assert_eq!(r.events("stuck")[0]["stalled_executions"], 1);
    // The ready and the running ones are not listed.
    let text = ok(&f.url, &["stuck"]);
    assert!(text.stdout.contains("no runnable step"), "{}", text.stdout);
    assert!(!text.stdout.contains(&f.fresh.to_string()[..18]));
}

#[test]
fn timer_and_signal_waits_are_explained_and_not_stuck() {
    let f = fixture();
    let conn = &mut f.db.connect();
    let graph = WorkflowGraph {
        nodes: vec![
            Node::timer("nap", Duration::from_secs(3600)),
            Node::signal("approval", "approved"),
            Node::new("after", "task"),
        ],
        edges: vec![Edge::new("nap", "after"), Edge::new("approval", "after")],
    };
    let wf = NewWorkflow::from_graph("waits", &graph)
        .create(conn)
        .unwrap();
    let e = engine::start_execution(conn, &NewExecution::new(wf.id))
        .unwrap()
        .execution;
    let r = ok(&f.url, &["--json", "why", &e.id.to_string()[..18]]);
    let reasons: Vec<(String, String)> = r
        .events("why")
        .iter()
        .map(|w| {
            (
                w["node_id"].as_str().unwrap().to_owned(),
                w["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("nap", "timer"),
        ("approval", "signal"),
        ("after", "upstream"),
    ] {
        assert!(
            reasons.contains(&(want.0.into(), want.1.into())),
            "{reasons:?}"
        );
    }
    let r = ok(&f.url, &["--json", "stuck"]);
    assert!(r.events("stalled_execution").is_empty());
    let r = ok(&f.url, &["show", &e.id.to_string()]);
    assert!(
        r.stdout.contains("layer 0  approval [pending] -> after"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("layer 1  after"), "{}", r.stdout);
}

/// The ids a table prints can be pasted back, also for ids the crate did
/// not make: the seeded executions share long prefixes (an 18-character
/// prefix named six of them).
#[test]
fn printed_ids_are_unambiguous_for_seeded_data() {
    let db = common::seeded();
    let url = url_with(&db, None, None);
    let list = ok(&url, &["list", "--limit", "50"]);
    let printed: Vec<&str> = list
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|t| t.len() == 36)
        .collect();
    assert!(printed.len() >= 2, "{}", list.stdout);
    for id in printed {
        let shown = ok(&url, &["--json", "show", id]);
        assert_eq!(shown.events("execution")[0]["id"], id);
    }
}

/// `db-ops studio` refuses an address other hosts can reach without a
/// token (nothing listens), and otherwise says where it listens, serves
/// pages without the password in them, and stops on SIGTERM.
#[test]
fn studio_refuses_a_public_bind_without_a_token_and_serves_otherwise() {
    let db = TestDatabase::new();
    let url = url_with(&db, None, None);
    let r = ops(&url, &["studio", "--bind", "0.0.0.0:0"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("token") && r.stderr.contains("0.0.0.0:0"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("listening"), "{}", r.stdout);
    let r = ops(&url, &["--json", "studio", "--bind", "0.0.0.0:0"]);
    assert_eq!(r.lines()[0]["event"], "error", "{}", r.stdout);

    let mut child = Command::new(OPS)
        .args(["--json", "studio", "--bind", "127.0.0.1:0"])
        .env("DATABASE_URL", &url)
        .env_remove(workflow_db::studio::TOKEN_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let listening: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(listening["event"], "listening");
    assert_eq!(listening["actions"], false);
    let address = listening["url"].as_str().unwrap();
    let host = address
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let page = http_get(&host, "/executions");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("id=\"executions\""), "{page}");
    assert!(!page.contains(PASSWORD) && !page.contains("postgres://"));
    // SIGTERM: a graceful stop, said so.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("\"event\":\"stopped\""), "{rest}");
}

/// A plain HTTP/1.1 GET (connection closed after the answer).
fn http_get(host: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(host).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        socket,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    answer
}
