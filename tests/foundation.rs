//! Schema, models and the relational read, against a real PostgreSQL.

use diesel::prelude::*;
use diesel::sql_types::Text;
use serde_json::json;
use workflow_db::testing::TestDatabase;
use workflow_db::{
    Execution, ExecutionChanges, ExecutionStatus, ExecutionStep, ExecutionStepChanges,
    NewExecution, NewExecutionStep, NewWorkflow, StepStatus, Workflow, WorkflowChanges,
};

#[derive(QueryableByName)]
struct Label {
    #[diesel(sql_type = Text)]
    label: String,
}

fn enum_labels(conn: &mut PgConnection, type_name: &str) -> Vec<String> {
    diesel::sql_query(
        "SELECT e.enumlabel AS label FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid \
         WHERE t.typname = $1 ORDER BY e.enumsortorder",
    )
    .bind::<Text, _>(type_name)
    .load::<Label>(conn)
    .unwrap()
    .into_iter()
    .map(|l| l.label)
    .collect()
}

#[test]
fn enum_values_and_order_equal_the_rust_variants() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let rust: Vec<String> = ExecutionStatus::ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(enum_labels(&mut conn, "execution_status"), rust);
    let rust: Vec<String> = StepStatus::ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(enum_labels(&mut conn, "step_status"), rust);
    assert_eq!(
        rust,
        ["pending", "running", "completed", "failed", "skipped"]
    );
}

#[derive(QueryableByName, Debug)]
struct ForeignKey {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    on_delete: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    indexed: bool,
}

#[test]
fn every_foreign_key_cascades_and_is_indexed() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let fks: Vec<ForeignKey> = diesel::sql_query(
        "SELECT c.conname::text AS name, c.confdeltype::text AS on_delete,
                EXISTS (SELECT 1 FROM pg_index i
                        WHERE i.indrelid = c.conrelid
                          AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] = c.conkey) AS indexed
         FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE c.contype = 'f' AND n.nspname = 'public' AND c.conrelid::regclass::text NOT LIKE '\\_\\_%'",
    )
    .load(&mut conn)
    .unwrap();
    assert!(
        fks.len() >= 2,
        "expected the executions and steps foreign keys, got {fks:?}"
    );
    for fk in fks {
        // A re-run outlives the execution it re-ran: the link is cleared.
        let expected = if fk.name == "executions_rerun_of_fkey" {
            "n"
        } else {
            "c"
        };
        assert_eq!(
            fk.on_delete,
            expected,
            "{} must be ON DELETE {}",
            fk.name,
            if expected == "c" {
                "CASCADE"
            } else {
                "SET NULL"
            }
        );
        assert!(fk.indexed, "{} has no index led by its columns", fk.name);
    }
}

fn graph() -> (serde_json::Value, serde_json::Value) {
    (
        json!([{"id": "a", "type": "http", "config": {}}, {"id": "b", "type": "log", "config": {}}]),
        json!([{"source": "a", "target": "b"}]),
    )
}

#[test]
fn crud_round_trips_and_delete_cascades() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (nodes, edges) = graph();
    let wf = NewWorkflow::new("orders", nodes, edges)
        .description("ship orders")
        .create(&mut conn)
        .unwrap();
    assert_eq!(wf.id.get_version_num(), 7, "ids are UUIDv7");
    assert_eq!(Workflow::find(&mut conn, wf.id).unwrap(), wf);

    let renamed = Workflow::update(
        &mut conn,
        wf.id,
        &WorkflowChanges {
            name: Some("orders v2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(renamed.name, "orders v2");
    assert_eq!(renamed.description.as_deref(), Some("ship orders"));
    assert!(
        renamed.updated_at > wf.updated_at,
        "the trigger bumps updated_at"
    );
    assert_eq!(
        Workflow::update(&mut conn, wf.id, &WorkflowChanges::default()).unwrap(),
        renamed
    );

    let ex = NewExecution::new(wf.id)
        .user_id("u1")
        .data(json!({"x": 1}))
        .create(&mut conn)
        .unwrap();
    assert_eq!(ex.status, ExecutionStatus::Pending);
    let step = NewExecutionStep::new(ex.id, "a")
        .input(json!({"n": 1}))
        .create(&mut conn)
        .unwrap();
    let step = ExecutionStep::update(
        &mut conn,
        step.id,
        &ExecutionStepChanges {
            output: Some(Some(json!({"ok": true}))),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(step.output, Some(json!({"ok": true})));
    let ex = Execution::update(
        &mut conn,
        ex.id,
        &ExecutionChanges {
            error: Some(Some("boom".into())),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ex.error.as_deref(), Some("boom"));
    assert_eq!(
        Execution::list_for_workflow(&mut conn, wf.id, 10).unwrap(),
        vec![ex.clone()]
    );

    assert!(Workflow::delete(&mut conn, wf.id).unwrap());
    assert!(!Workflow::delete(&mut conn, wf.id).unwrap());
    assert_eq!(
        Execution::find(&mut conn, ex.id),
        Err(diesel::result::Error::NotFound)
    );
    assert_eq!(
        ExecutionStep::find(&mut conn, step.id),
        Err(diesel::result::Error::NotFound)
    );
}

#[test]
fn list_pages_cover_every_row_once() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (nodes, edges) = graph();
    let mut created: Vec<_> = (0..7)
        .map(|i| {
            NewWorkflow::new(format!("wf{i}"), nodes.clone(), edges.clone())
                .create(&mut conn)
                .unwrap()
                .id
        })
        .collect();
    created.sort();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = Workflow::list(&mut conn, after, 3).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        after = page.last().map(|w| w.id);
        seen.extend(page.into_iter().map(|w| w.id));
    }
    assert_eq!(seen, created);
}

#[test]
fn relational_read_returns_ten_newest_executions_with_their_steps_in_three_queries() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (nodes, edges) = graph();
    let wf = NewWorkflow::new("wf", nodes.clone(), edges.clone())
        .create(&mut conn)
        .unwrap();
    let other = NewWorkflow::new("other", nodes, edges)
        .create(&mut conn)
        .unwrap();
    NewExecution::new(other.id).create(&mut conn).unwrap();
    let base = chrono::Utc::now();
    let mut ids = Vec::new();
    for i in 0..13 {
        let ex = NewExecution::new(wf.id).create(&mut conn).unwrap();
        // Start times deliberately out of insertion order.
        let started = base - chrono::Duration::minutes(((i * 7) % 13) as i64);
        Execution::update(
            &mut conn,
            ex.id,
            &ExecutionChanges {
                started_at: Some(Some(started)),
                ..Default::default()
            },
        )
        .unwrap();
        for node in ["a", "b"] {
            NewExecutionStep::new(ex.id, node)
                .create(&mut conn)
                .unwrap();
        }
        ids.push((started, ex.id));
    }
    ids.sort_by_key(|k| std::cmp::Reverse(k.0));
    let expected: Vec<_> = ids.iter().take(10).map(|(_, id)| *id).collect();

    let nested = Workflow::with_recent_executions(&mut conn, wf.id, 10).unwrap();
    assert_eq!(nested.workflow.id, wf.id);
    let got: Vec<_> = nested.executions.iter().map(|e| e.execution.id).collect();
    assert_eq!(got, expected, "the 10 newest by started_at, newest first");
    for e in &nested.executions {
        let nodes: Vec<_> = e.steps.iter().map(|s| s.node_id.as_str()).collect();
        assert_eq!(nodes, ["a", "b"]);
        assert!(e.steps.iter().all(|s| s.execution_id == e.execution.id));
    }
    let json = serde_json::to_value(&nested).unwrap();
    assert_eq!(json["name"], "wf");
    assert_eq!(json["executions"][0]["steps"][0]["status"], "pending");

    // Constant number of queries: count statements through pg_stat_statements-free means,
    // by instrumenting the connection.
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = counter.clone();
    conn.set_instrumentation(move |event: diesel::connection::InstrumentationEvent<'_>| {
        if let diesel::connection::InstrumentationEvent::StartQuery { .. } = event {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    Workflow::with_recent_executions(&mut conn, wf.id, 10).unwrap();
    assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[test]
fn database_rejects_bad_rows() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (nodes, edges) = graph();
    let err = NewWorkflow::new("", nodes.clone(), edges.clone())
        .create(&mut conn)
        .unwrap_err();
    assert!(err.to_string().contains("check constraint"), "{err}");
    // NewWorkflow::create refuses this graph in Rust (InvalidGraph); the
    // database's own check catches writers that bypass the crate.
    let err = diesel::insert_into(workflow_db::schema::workflows::table)
        .values(&NewWorkflow::new("x", json!({"not": "an array"}), edges))
        .execute(&mut conn)
        .unwrap_err();
    assert!(err.to_string().contains("check constraint"), "{err}");
    let err = NewExecution::new(uuid::Uuid::now_v7())
        .create(&mut conn)
        .unwrap_err();
    assert!(err.to_string().contains("foreign key"), "{err}");
}

#[derive(QueryableByName)]
struct AppName {
    #[diesel(sql_type = Text)]
    name: String,
}

#[test]
fn pool_connections_report_the_application_name_and_respect_the_size() {
    let db = TestDatabase::new();
    let mut config = db.config();
    config.pool_size = 3;
    let pool = workflow_db::build_pool(&config).unwrap();
    assert_eq!(pool.max_size(), 3);
    let mut conn = pool.get().unwrap();
    let name: AppName = diesel::sql_query("SELECT current_setting('application_name') AS name")
        .get_result(&mut *conn)
        .unwrap();
    assert_eq!(name.name, workflow_db::pool::APPLICATION_NAME);
}

fn application_name(conn: &mut PgConnection) -> String {
    diesel::sql_query("SELECT current_setting('application_name') AS name")
        .get_result::<AppName>(conn)
        .unwrap()
        .name
}

#[test]
fn every_connection_the_crate_opens_names_itself() {
    let db = TestDatabase::new();
    assert_eq!(
        application_name(&mut workflow_db::pool::connect(db.url()).unwrap()),
        "workflow-db"
    );
    assert_eq!(application_name(&mut db.connect()), "workflow-db");
    let migrator = workflow_db::Migrator::new(db.url().clone());
    assert_eq!(
        application_name(&mut migrator.connect().unwrap()),
        workflow_db::migrate::MIGRATOR_APPLICATION_NAME
    );
    assert_eq!(
        application_name(&mut workflow_db::pool::connect_as(db.url(), "my-service").unwrap()),
        "my-service"
    );
    // The admin guard's read-only connection, seen from another session while it is open.
    let prepared = workflow_db::admin::prepare(
        workflow_db::admin::Operation::Reset,
        db.url(),
        &workflow_db::admin::GuardOptions::default(),
    )
    .unwrap();
    let names: Vec<AppName> = diesel::sql_query(
        "SELECT application_name AS name FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .load(&mut db.connect())
    .unwrap();
    assert!(
        names
            .iter()
            .any(|n| n.name == workflow_db::admin::ADMIN_APPLICATION_NAME),
        "{:?}",
        names.iter().map(|n| &n.name).collect::<Vec<_>>()
    );
    drop(prepared);
    // A name in the URL wins over the crate's default.
    let named = db
        .url()
        .with_default_param("application_name", "from-the-url");
    assert_eq!(
        application_name(&mut workflow_db::pool::connect(&named).unwrap()),
        "from-the-url"
    );
}

/// Throwaway databases a crashed run left (older than an hour) are swept by
/// the next test database, unless someone is still connected to them.
#[test]
fn stale_throwaway_databases_are_swept_unless_in_use() {
    let db = TestDatabase::new();
    let mut admin = workflow_db::pool::connect(&db.url().with_database("postgres")).unwrap();
    let two_hours_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 7200;
    let pid = std::process::id();
    let stale = format!("workflow_db_tmp_sweeptest_{two_hours_ago}_{pid}_1");
    let in_use = format!("workflow_db_tmp_sweeptest_{two_hours_ago}_{pid}_2");
    let recent = workflow_db::testing::throwaway_name("sweeptest");
    for name in [&stale, &recent] {
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .unwrap();
    }
    // Tests running alongside sweep too: one may drop `in_use` between its
    // creation and our connection (it is stale and nobody holds it yet).
    // Create it again until we hold it.
    let holder = (0..20)
        .find_map(|_| {
            diesel::sql_query(format!("CREATE DATABASE \"{in_use}\""))
                .execute(&mut admin)
                .unwrap();
            workflow_db::pool::connect(&db.url().with_database(&in_use)).ok()
        })
        .expect("a connection to the stale database we created");
    let _next = TestDatabase::new(); // sweeps
    let exists = |admin: &mut PgConnection, name: &str| {
        diesel::sql_query("SELECT datname AS name FROM pg_database WHERE datname = $1")
            .bind::<Text, _>(name)
            .load::<AppName>(admin)
            .unwrap()
            .len()
            == 1
    };
    assert!(!exists(&mut admin, &stale), "stale and unused: swept");
    assert!(exists(&mut admin, &in_use), "stale but connected: kept");
    assert!(exists(&mut admin, &recent), "recent: kept");
    drop(holder);
    for name in [&stale, &in_use, &recent] {
        diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut admin)
            .unwrap();
    }
}

#[test]
fn a_pool_to_a_dead_server_fails_fast_without_the_password() {
    let url =
        workflow_db::DatabaseUrl::parse("postgres://app:Sup3rSecret@127.0.0.1:1/none").unwrap();
    let mut config = workflow_db::Config::new(url);
    config.connect_timeout = std::time::Duration::from_secs(1);
    let err = workflow_db::build_pool(&config).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("Sup3rSecret"), "{err:?}");
}

/// Runs itself again in a child process with `APP_ENV=production` (the
/// environment cannot be changed safely inside a multi-threaded test).
#[test]
fn the_harness_refuses_to_run_in_production() {
    if std::env::var_os("WORKFLOW_DB_PROBE_PRODUCTION").is_some() {
        let err = TestDatabase::try_new().unwrap_err();
        assert!(
            matches!(err, workflow_db::Error::ProtectedEnvironment { .. }),
            "{err}"
        );
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_harness_refuses_to_run_in_production",
            "--nocapture",
        ])
        .env("WORKFLOW_DB_PROBE_PRODUCTION", "1")
        .env("APP_ENV", "production")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}
