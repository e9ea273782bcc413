//! The guard, reset, nuke and seeding through the library, against a real PostgreSQL.

mod common;

use common::{PASSWORD, seeded, snapshot, stamp};
use diesel::connection::SimpleConnection;
use workflow_db::admin::{
    self, Confirmation, GuardOptions, GuardRule, Operation, ServerFacts, production_url_reason,
};
use workflow_db::migrate::Migrator;
use workflow_db::seed::{self, SeedSet, SeedSource};
use workflow_db::testing::TestDatabase;
use workflow_db::{DatabaseUrl, Environment, Error};

fn url(s: &str) -> DatabaseUrl {
    DatabaseUrl::parse(s).unwrap()
}

fn rule_of(result: workflow_db::Result<impl std::fmt::Debug>) -> (GuardRule, String) {
    match result {
        Err(Error::ProtectedEnvironment { rule, message }) => (rule, message),
        other => panic!("expected a guard refusal, got {other:?}"),
    }
}

fn no_env() -> GuardOptions {
    GuardOptions::from_lookup(|_| None)
}

// ---- rule 3: the URL rule list (pure) ----

#[test]
fn production_looking_urls_are_recognised() {
    for (u, expect) in [
        ("postgres://app@db.prod.internal/app", "host"),
        ("postgres://app@10.0.0.5/app_production", "database"),
        ("postgres://prod_admin@localhost/app", "user"),
        (
            "postgres://app@mydb.abc123.eu-west-1.rds.amazonaws.com/app",
            "host",
        ),
        ("postgres://app@example.com/app", ".com"),
        ("postgres://app@x.postgres.database.azure.com/app", ".com"),
        (
            "postgres://app@ep-cool-1234.eu-central-1.aws.neon.tech/app",
            "neon",
        ),
        ("postgres://app@db.abcd.supabase.co/app", "supabase"),
        (
            "postgres:///app?host=/cloudsql/project:region:instance",
            "cloudsql",
        ),
        ("postgres://app@localhost/app?host=PROD-DB.corp", "host"),
        (
            "postgres://app@localhost/app?dbname=billing_prod",
            "database",
        ),
        ("postgres://app@localhost/app?user=readonly_prod", "user"),
        ("postgres://app@[2001:db8::1]/app_prod", "database"),
    ] {
        let reason = production_url_reason(&url(u)).unwrap_or_else(|| panic!("{u} not flagged"));
        assert!(
            reason.to_lowercase().contains(expect),
            "{u}: reason {reason:?} should mention {expect}"
        );
    }
}

#[test]
fn development_urls_and_passwords_containing_prod_are_not_production() {
    for u in [
        "postgres://postgres:s3cretPRODpw@127.0.0.1:5432/workflow_db",
        "postgres://app:production@localhost/app_dev",
        "postgres://app@localhost/app?password=prod",
        "postgres://app@[::1]:5433/app_test",
        "postgres:///workflow_db?host=/var/run/postgresql",
        "postgresql://app@db.internal.example/app",
    ] {
        assert_eq!(production_url_reason(&url(u)), None, "{u}");
    }
}

#[test]
fn remote_servers_need_allow_remote() {
    let remote = url("postgres://app:pw@db.internal.example/app");
    let (rule, message) = rule_of(admin::check_url(&remote, &no_env(), Operation::Reset));
    assert_eq!(rule, GuardRule::RemoteServer);
    assert!(message.contains("--allow-remote") && message.contains("db.internal.example"));
    let allowed = GuardOptions {
        allow_remote: true,
        ..no_env()
    };
    admin::check_url(&remote, &allowed, Operation::Reset).unwrap();
    for local in [
        "postgres://app@localhost/app",
        "postgres://app@127.0.0.2/app",
        "postgres://app@[::1]/app",
        "postgres:///app",
        "postgres://app@ignored/app?host=/tmp",
    ] {
        admin::check_url(&url(local), &no_env(), Operation::Nuke).unwrap();
    }
}

#[test]
fn hostaddr_and_service_decide_whether_the_server_is_remote() {
    // libpq connects to hostaddr, whatever the host name says.
    let tunnelled = url("postgres://app@localhost/app?hostaddr=203.0.113.5");
    let (rule, message) = rule_of(admin::check_url(&tunnelled, &no_env(), Operation::Reset));
    assert_eq!(rule, GuardRule::RemoteServer);
    assert!(message.contains("203.0.113.5"), "{message}");
    admin::check_url(
        &url("postgres://app@db.internal.example/app?hostaddr=127.0.0.1"),
        &no_env(),
        Operation::Reset,
    )
    .unwrap();
    // A service's server is unknown: remote unless allowed.
    let service = url("postgres://app@localhost/app?service=scratch");
    let (rule, message) = rule_of(admin::check_url(&service, &no_env(), Operation::Nuke));
    assert_eq!(rule, GuardRule::RemoteServer);
    assert!(message.contains("service scratch"), "{message}");
    let allowed = GuardOptions {
        allow_remote: true,
        ..no_env()
    };
    admin::check_url(&service, &allowed, Operation::Nuke).unwrap();
    // Rule 3 sees the host name behind a hostaddr and a service's name.
    for (u, needle) in [
        (
            "postgres://app@db.prod.internal/app?hostaddr=127.0.0.1",
            "db.prod.internal",
        ),
        (
            "postgres://app@localhost/app?service=billing_prod",
            "billing_prod",
        ),
    ] {
        let (rule, message) = rule_of(admin::check_url(&url(u), &allowed, Operation::Nuke));
        assert_eq!(rule, GuardRule::UrlLooksLikeProduction, "{u}");
        assert!(message.contains(needle), "{message}");
    }
}

#[test]
fn rule_3_comes_before_rule_4_and_has_a_named_override() {
    let u = url("postgres://app@db.example.com/app");
    let (rule, message) = rule_of(admin::check_url(&u, &no_env(), Operation::Nuke));
    assert_eq!(rule, GuardRule::UrlLooksLikeProduction);
    assert!(
        message.contains("--allow-production-looking-url"),
        "{message}"
    );
    let overridden = GuardOptions {
        allow_production_looking_url: true,
        ..no_env()
    };
    let (rule, _) = rule_of(admin::check_url(&u, &overridden, Operation::Nuke));
    assert_eq!(rule, GuardRule::RemoteServer);
}

// ---- rule 1 and the order of rules ----

#[test]
fn production_environment_variables_refuse_case_insensitively() {
    for var in ["APP_ENV", "RUST_ENV", "NODE_ENV"] {
        for value in ["production", "PRODUCTION", " Production "] {
            let options = GuardOptions::from_lookup(|v| (v == var).then(|| value.to_owned()));
            let (rule, message) = rule_of(admin::check_environment(&options, Operation::Reset));
            assert_eq!(rule, GuardRule::EnvironmentIsProduction);
            assert!(message.contains(var), "{message}");
        }
    }
    let staging = GuardOptions::from_lookup(|v| (v == "APP_ENV").then(|| "staging".to_owned()));
    admin::check_environment(&staging, Operation::Reset).unwrap();
}

#[test]
fn rule_1_fires_before_connecting_even_to_an_unreachable_production_url() {
    let options = GuardOptions::from_lookup(|v| (v == "NODE_ENV").then(|| "production".into()));
    let u = url("postgres://app:pw@db.prod.example.com:1/app");
    let (rule, _) = rule_of(admin::prepare(Operation::Nuke, &u, &options));
    assert_eq!(rule, GuardRule::EnvironmentIsProduction);
}

#[test]
fn rules_3_and_4_refuse_without_a_reachable_server() {
    // Port 1 on loopback refuses connections: the static rule still names itself.
    let u = url("postgres://prod_user@127.0.0.1:1/app");
    let (rule, _) = rule_of(admin::prepare(Operation::Reset, &u, &no_env()));
    assert_eq!(rule, GuardRule::UrlLooksLikeProduction);
}

// ---- rule 2 ----

#[test]
fn a_production_stamp_refuses_even_in_development_and_keeps_everything() {
    let db = seeded();
    let mut conn = db.connect();
    admin::set_environment_stamp(&mut conn, &Environment::Production, db.name()).unwrap();
    let before = snapshot(&db);
    let dev = GuardOptions::from_lookup(|v| (v == "APP_ENV").then(|| "development".into()));
    for op in [Operation::Reset, Operation::Nuke] {
        let (rule, message) = rule_of(admin::prepare(op, db.url(), &dev));
        assert_eq!(rule, GuardRule::DatabaseIsProduction);
        assert!(
            message.contains("db-env set development --confirm"),
            "{message}"
        );
    }
    assert_eq!(snapshot(&db), before);
    // db-migrate in development keeps the production stamp.
    Migrator::new(db.url().clone())
        .environment(Environment::Development)
        .run(|_| {})
        .unwrap();
    assert_eq!(stamp(&db).as_deref(), Some("production"));
}

#[test]
fn changing_the_stamp_is_bound_to_the_database_name() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    admin::set_environment_stamp(&mut conn, &Environment::Production, db.name()).unwrap();
    let (rule, _) = rule_of(admin::set_environment_stamp(
        &mut conn,
        &Environment::Development,
        "some_other_db",
    ));
    assert_eq!(rule, GuardRule::NotConfirmed);
    assert_eq!(stamp(&db).as_deref(), Some("production"));
    let before =
        admin::set_environment_stamp(&mut conn, &Environment::Development, db.name()).unwrap();
    assert_eq!(before.as_deref(), Some("production"));
    assert_eq!(stamp(&db).as_deref(), Some("development"));
}

// ---- rule 5 ----

#[test]
fn facts_read_after_connecting_must_match_the_url() {
    let a = TestDatabase::new();
    let b = TestDatabase::new();
    // Connected to b while the URL names a: the database differs.
    let facts = admin::server_facts(&mut b.connect()).unwrap();
    assert!(
        facts.server_addr.is_some(),
        "TCP connection: inet_server_addr() is set"
    );
    let (rule, message) = rule_of(admin::check_facts(a.url(), &facts, &no_env()));
    assert_eq!(rule, GuardRule::ConnectedTargetMismatch);
    assert!(
        message.contains(a.name()) && message.contains(b.name()),
        "{message}"
    );
    admin::check_facts(b.url(), &facts, &allow_remote()).unwrap();

    let tcp = url("postgres://postgres@127.0.0.1:5432/app");
    let fact = |port: Option<i32>, user: &str| ServerFacts {
        database: "app".into(),
        user: user.into(),
        tcp_port: port,
        port_setting: 5432,
        server_addr: port.map(|_| "127.0.0.1".to_owned()),
    };
    admin::check_facts(&tcp, &fact(Some(5432), "postgres"), &no_env()).unwrap();
    for (facts, needle) in [
        (fact(Some(6543), "postgres"), "inet_server_port"),
        (fact(None, "postgres"), "unix-socket"),
        (fact(Some(5432), "someone_else"), "session_user"),
    ] {
        let (rule, message) = rule_of(admin::check_facts(&tcp, &facts, &no_env()));
        assert_eq!(rule, GuardRule::ConnectedTargetMismatch);
        assert!(message.contains(needle), "{message}");
    }
    let socket = url("postgres:///app?host=/var/run/postgresql");
    let (rule, message) = rule_of(admin::check_facts(
        &socket,
        &fact(Some(5432), "postgres"),
        &no_env(),
    ));
    assert_eq!(rule, GuardRule::ConnectedTargetMismatch);
    assert!(message.contains("inet_server_addr"), "{message}");
    admin::check_facts(&socket, &fact(None, "postgres"), &no_env()).unwrap();
}

fn allow_remote() -> GuardOptions {
    GuardOptions {
        allow_remote: true,
        ..no_env()
    }
}

#[test]
fn a_loopback_url_reaching_a_server_on_another_address_is_a_mismatch() {
    let facts = |addr: &str| ServerFacts {
        database: "app".into(),
        user: "postgres".into(),
        tcp_port: Some(5432),
        port_setting: 5432,
        server_addr: Some(addr.into()),
    };
    // An SSH tunnel or port mapping: localhost on this side, 10.0.4.7 on the server's.
    for loopback in [
        "postgres://postgres@localhost:5432/app",
        "postgres://postgres@127.0.0.1:5432/app",
        "postgres://postgres@[::1]:5432/app",
        "postgres://postgres@db.example.net:5432/app?hostaddr=127.0.0.1",
    ] {
        for remote in ["10.0.4.7", "203.0.113.5", "2001:db8::5", "::ffff:10.0.4.7"] {
            let (rule, message) = rule_of(admin::check_facts(
                &url(loopback),
                &facts(remote),
                &no_env(),
            ));
            assert_eq!(
                rule,
                GuardRule::ConnectedTargetMismatch,
                "{loopback} {remote}"
            );
            assert!(
                message.contains("inet_server_addr") && message.contains(remote),
                "{message}"
            );
            // --allow-remote accepts a server that may be remote (Docker behind a published port).
            admin::check_facts(&url(loopback), &facts(remote), &allow_remote()).unwrap();
        }
        for local in ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"] {
            admin::check_facts(&url(loopback), &facts(local), &no_env()).unwrap();
        }
    }
    // A remote URL already needed --allow-remote (rule 4); its address is not compared.
    admin::check_facts(
        &url("postgres://postgres@db.example.net:5432/app"),
        &facts("10.0.4.7"),
        &no_env(),
    )
    .unwrap();
    // A unix-socket URL that reached a TCP server is a mismatch whatever the address.
    let (rule, _) = rule_of(admin::check_facts(
        &url("postgres:///app?host=/tmp&port=5432"),
        &facts("127.0.0.1"),
        &allow_remote(),
    ));
    assert_eq!(rule, GuardRule::ConnectedTargetMismatch);
}

// ---- confirmation through an injected reader ----

fn interactive(answer: &str) -> (Vec<u8>, Vec<u8>) {
    (answer.as_bytes().to_vec(), Vec::new())
}

#[test]
fn interactive_confirmation_defaults_to_no() {
    let db = seeded();
    let before = snapshot(&db);
    for answer in ["", "\n", "y\n", "yes\n", "YES\n", "other_db\n"] {
        let prepared = admin::prepare(Operation::Reset, db.url(), &no_env()).unwrap();
        let (input, mut output) = interactive(answer);
        let (rule, message) = rule_of(prepared.confirm(Confirmation::Interactive {
            input: &mut input.as_slice(),
            output: &mut output,
        }));
        assert_eq!(rule, GuardRule::NotConfirmed, "answer {answer:?}");
        assert!(message.contains("cancelled"), "{message}");
        let prompt = String::from_utf8(output).unwrap();
        assert!(
            prompt.contains(db.name()) && prompt.contains("[No]"),
            "{prompt}"
        );
        assert_eq!(admin::exit_code(&prepared_error(&rule, &message)), 4);
    }
    assert_eq!(snapshot(&db), before);
}

fn prepared_error(rule: &GuardRule, message: &str) -> Error {
    Error::ProtectedEnvironment {
        rule: *rule,
        message: message.to_owned(),
    }
}

#[test]
fn typing_the_database_name_confirms() {
    let db = seeded();
    let prepared = admin::prepare(Operation::Reset, db.url(), &no_env()).unwrap();
    let (input, mut output) = interactive(&format!("{}\n", db.name()));
    let plan = prepared
        .confirm(Confirmation::Interactive {
            input: &mut input.as_slice(),
            output: &mut output,
        })
        .unwrap()
        .execute()
        .unwrap();
    assert!(
        plan.tables
            .iter()
            .any(|t| t.table == "workflows" && t.rows == 2)
    );
    let counts = common::row_counts(&mut db.connect());
    assert!(
        counts
            .iter()
            .filter(|t| !t.table.starts_with("__"))
            .all(|t| t.rows == 0)
    );
}

#[test]
fn the_confirm_flag_must_name_the_database() {
    let db = seeded();
    let before = snapshot(&db);
    for flag in [None, Some("postgres"), Some("")] {
        let prepared = admin::prepare(Operation::Nuke, db.url(), &no_env()).unwrap();
        let (rule, _) = rule_of(prepared.confirm(Confirmation::Flag(flag)));
        assert_eq!(rule, GuardRule::NotConfirmed);
    }
    assert_eq!(snapshot(&db), before);
}

// ---- reset and nuke ----

#[test]
fn reset_empties_every_application_table_and_keeps_schema_bookkeeping_and_stamp() {
    let db = seeded();
    // A table added later (by another migration) is emptied too, identities restart.
    db.connect()
        .batch_execute(
            "CREATE TABLE later_table (n bigint GENERATED ALWAYS AS IDENTITY, note text); \
             INSERT INTO later_table (note) VALUES ('a'), ('b');",
        )
        .unwrap();
    let before = snapshot(&db);
    let stamp_before = stamp(&db);
    let prepared = admin::prepare(Operation::Reset, db.url(), &no_env()).unwrap();
    let plan = prepared.plan().clone();
    assert_eq!(
        plan.tables
            .iter()
            .map(|t| t.table.as_str())
            .collect::<Vec<_>>(),
        [
            "concurrency_limits",
            "event_feed_cursors",
            "execution_events",
            "execution_signals",
            "execution_steps",
            "executions",
            "later_table",
            "queues",
            "schedules",
            "workflows"
        ]
    );
    assert!(!plan.to_string().contains(PASSWORD));
    prepared
        .confirm(Confirmation::Flag(Some(db.name())))
        .unwrap()
        .execute()
        .unwrap();
    let after = snapshot(&db);
    assert_eq!(after.schema, before.schema);
    for t in &after.rows {
        if t.table.starts_with("__") {
            assert!(before.rows.contains(t), "bookkeeping {t:?} changed");
            assert!(t.rows > 0);
        } else {
            assert_eq!(t.rows, 0, "{} not emptied", t.table);
        }
    }
    assert_eq!(stamp(&db), stamp_before);
    let mut conn = db.connect();
    conn.batch_execute("INSERT INTO later_table (note) VALUES ('c')")
        .unwrap();
    let first: Vec<common::TableCount> = diesel::RunQueryDsl::load(
        diesel::sql_query("SELECT 'later_table' AS table, n AS rows FROM later_table"),
        &mut conn,
    )
    .unwrap();
    assert_eq!(first[0].rows, 1, "RESTART IDENTITY");
}

#[test]
fn reset_refuses_to_empty_a_table_of_another_schema_that_references_public() {
    let db = seeded();
    // A table outside `public` referencing `public.workflows`: TRUNCATE without
    // CASCADE fails instead of silently emptying it as well.
    db.connect()
        .batch_execute(
            "CREATE SCHEMA reporting; \
             CREATE TABLE reporting.favourites (workflow_id uuid REFERENCES public.workflows (id)); \
             INSERT INTO reporting.favourites SELECT id FROM public.workflows;",
        )
        .unwrap();
    let before = snapshot(&db);
    let favourites = |db: &TestDatabase| -> i64 {
        let rows: Vec<common::TableCount> = diesel::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT 'favourites' AS table, count(*) AS rows FROM reporting.favourites",
            ),
            &mut db.connect(),
        )
        .unwrap();
        rows[0].rows
    };
    let kept = favourites(&db);
    assert!(kept > 0);
    let result = admin::prepare(Operation::Reset, db.url(), &no_env())
        .unwrap()
        .confirm(Confirmation::Flag(Some(db.name())))
        .unwrap()
        .execute();
    let err = result.unwrap_err();
    assert!(
        !matches!(err, Error::ProtectedEnvironment { .. }),
        "a database error, not a guard refusal: {err}"
    );
    assert!(err.to_string().contains("foreign key"), "{err}");
    assert_eq!(
        snapshot(&db).rows,
        before.rows,
        "nothing in public was emptied"
    );
    assert_eq!(favourites(&db), kept, "the other schema was not emptied");

    // Without the foreign reference the reset goes through.
    db.connect()
        .batch_execute("DROP SCHEMA reporting CASCADE")
        .unwrap();
    admin::prepare(Operation::Reset, db.url(), &no_env())
        .unwrap()
        .confirm(Confirmation::Flag(Some(db.name())))
        .unwrap()
        .execute()
        .unwrap();
    assert!(
        snapshot(&db)
            .rows
            .iter()
            .all(|t| t.table.starts_with("__") || t.rows == 0)
    );
}

#[test]
fn nuke_then_migrate_gives_the_schema_of_a_fresh_migrate() {
    let fresh = TestDatabase::new();
    let db = seeded();
    let prepared = admin::prepare(Operation::Nuke, db.url(), &no_env()).unwrap();
    let plan = prepared.plan().clone();
    assert!(
        plan.tables
            .iter()
            .any(|t| t.table == "__diesel_schema_migrations")
    );
    assert!(
        plan.other_objects
            .contains(&"type execution_status".to_owned())
    );
    assert!(
        plan.other_objects
            .contains(&"function workflow_db_set_updated_at()".to_owned())
    );
    prepared
        .confirm(Confirmation::Flag(Some(db.name())))
        .unwrap()
        .execute()
        .unwrap();
    assert!(common::row_counts(&mut db.connect()).is_empty());
    let empty_schema = common::pg_dump(&db, "--schema-only");
    assert!(!empty_schema.contains("CREATE TYPE"), "{empty_schema}");
    assert!(!empty_schema.contains("CREATE FUNCTION"), "{empty_schema}");
    assert_eq!(stamp(&db), None);

    Migrator::new(db.url().clone())
        .environment(Environment::Test)
        .run(|_| {})
        .unwrap();
    assert_eq!(
        common::pg_dump(&db, "--schema-only"),
        common::pg_dump(&fresh, "--schema-only")
    );
    assert_eq!(stamp(&db).as_deref(), Some("test"));
}

// ---- seeding ----

#[test]
fn seeding_twice_leaves_the_database_identical() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let first = seed::seed(&mut conn, &seed::embedded()).unwrap();
    let count = |name: &str| {
        first
            .tables
            .iter()
            .find(|t| t.table == name)
            .unwrap()
            .inserted
    };
    assert!(count("workflows") >= 2 && count("executions") >= 3 && count("execution_steps") >= 6);
    assert!(first.tables.iter().all(|t| t.present == 0));
    let dump = common::pg_dump(&db, "--data-only");
    let second = seed::seed(&mut conn, &seed::embedded()).unwrap();
    assert_eq!(second.inserted(), 0);
    for (a, b) in first.tables.iter().zip(&second.tables) {
        assert_eq!(a.inserted, b.present, "{}", a.table);
    }
    assert_eq!(common::pg_dump(&db, "--data-only"), dump);
}

#[test]
fn seeds_cover_every_state_and_the_embedded_list_matches_the_folder() {
    let mut files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/seeds"))
        .unwrap()
        .map(|e| format!("seeds/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".json"))
        .collect();
    files.sort();
    let embedded: Vec<String> = seed::embedded().into_iter().map(|s| s.name).collect();
    assert_eq!(embedded, files, "add new seed files to seed::EMBEDDED");

    let db = TestDatabase::new();
    let mut conn = db.connect();
    seed::seed(&mut conn, &seed::embedded()).unwrap();
    let states: Vec<common::TableCount> = diesel::RunQueryDsl::load(
        diesel::sql_query(
            "SELECT 'execution:' || status AS table, count(*) AS rows FROM executions GROUP BY 1 \
             UNION ALL SELECT 'step:' || status, count(*) FROM execution_steps GROUP BY 1",
        ),
        &mut conn,
    )
    .unwrap();
    for state in [
        "execution:running",
        "execution:completed",
        "execution:failed",
        "step:pending",
        "step:running",
        "step:completed",
        "step:failed",
        "step:skipped",
    ] {
        assert!(
            states.iter().any(|s| s.table == state),
            "no {state} in the seeds"
        );
    }
}

fn source(name: &str, json: &str) -> SeedSource {
    SeedSource {
        name: name.to_owned(),
        json: json.to_owned().into(),
    }
}

/// `(node_id, upstream_pending, downstream)` of an execution's steps, by node id.
fn dependencies(db: &TestDatabase, execution: &str) -> Vec<(String, i32, Vec<String>)> {
    use diesel::prelude::*;
    use workflow_db::schema::execution_steps as s;
    let rows: Vec<(String, i32, Vec<Option<String>>)> = s::table
        .filter(s::execution_id.eq(uuid::Uuid::parse_str(execution).unwrap()))
        .order(s::node_id)
        .select((s::node_id, s::upstream_pending, s::downstream))
        .load(&mut db.connect())
        .unwrap();
    rows.into_iter()
        .map(|(node, up, down)| {
            let mut down: Vec<String> = down.into_iter().flatten().collect();
            down.sort();
            (node, up, down)
        })
        .collect()
}

#[test]
fn seeded_steps_carry_the_dependency_columns_of_their_workflow_graph() {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // The running order ORD-1002: validate completed, charge running, reserve pending.
    let db = seeded();
    assert_eq!(
        dependencies(&db, "0193a1c0-0001-7000-8000-000000000002"),
        [
            ("charge".to_owned(), 0, strings(&["ship"])),
            ("reserve".to_owned(), 0, strings(&["ship"])),
            ("validate".to_owned(), 0, strings(&["charge", "reserve"])),
        ]
    );

    // Edges listed downstream-first; b waits for a (completed: not counted),
    // c waits for b and d (pending, and not seeded at all).
    let json = r#"{
      "workflows": [{"id": "0193a1c0-0000-7000-8000-0000000000cc", "name": "Chain",
        "nodes": [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d"}],
        "edges": [{"source": "b", "target": "c"}, {"source": "d", "target": "c"}, {"source": "a", "target": "b"}]}],
      "executions": [{"id": "0193a1c0-0001-7000-8000-0000000000cc",
        "workflow_id": "0193a1c0-0000-7000-8000-0000000000cc", "status": "running"}],
      "execution_steps": [
        {"id": "0193a1c0-0002-7000-8000-0000000000c3", "execution_id": "0193a1c0-0001-7000-8000-0000000000cc", "node_id": "c", "status": "pending"},
        {"id": "0193a1c0-0002-7000-8000-0000000000c2", "execution_id": "0193a1c0-0001-7000-8000-0000000000cc", "node_id": "b", "status": "pending"},
        {"id": "0193a1c0-0002-7000-8000-0000000000c1", "execution_id": "0193a1c0-0001-7000-8000-0000000000cc", "node_id": "a", "status": "completed"}
      ]}"#;
    let db = TestDatabase::new();
    let report = seed::seed(&mut db.connect(), &[source("chain.json", json)]).unwrap();
    assert_eq!(report.inserted(), 5);
    let execution = "0193a1c0-0001-7000-8000-0000000000cc";
    assert_eq!(
        dependencies(&db, execution),
        [
            ("a".to_owned(), 0, strings(&["b"])),
            ("b".to_owned(), 0, strings(&["c"])),
            ("c".to_owned(), 2, Vec::new()),
        ]
    );
    // Seeding again changes nothing (ON CONFLICT DO NOTHING).
    let again = seed::seed(&mut db.connect(), &[source("chain.json", json)]).unwrap();
    assert_eq!(again.inserted(), 0);
    // Completing b unblocks c by one (the database trigger follows `downstream`).
    db.connect()
        .batch_execute(
            "UPDATE execution_steps SET status = 'running', locked_by = 't', \
             locked_until = now() + interval '1 minute' WHERE node_id = 'b'; \
             UPDATE execution_steps SET status = 'completed' WHERE node_id = 'b';",
        )
        .unwrap();
    assert_eq!(
        dependencies(&db, execution)[2],
        ("c".to_owned(), 1, Vec::new())
    );
}

fn seed_error(sources: &[SeedSource]) -> (String, String) {
    match SeedSet::parse(sources) {
        Err(Error::InvalidSeed { file, message }) => (file, message),
        other => panic!("expected InvalidSeed, got {other:?}"),
    }
}

#[test]
fn a_malformed_seed_names_the_file_and_the_field() {
    let wf = r#"{"id": "0193a1c0-0000-7000-8000-0000000000aa", "name": "W", "nodes": [{"id": "a"}], "edges": []}"#;
    for (json, field) in [
        (r#"{"workflows": [{"id": 5}]}"#.to_owned(), "workflows[0].id"),
        (r#"{"workflows": [{"id": "0193a1c0-0000-7000-8000-0000000000aa", "nme": "x"}]}"#.to_owned(), "nme"),
        (r#"{"workflows": [{"id": "0193a1c0-0000-7000-8000-0000000000aa", "nodes": [], "edges": []}]}"#.to_owned(), "name"),
        (r#"{"workflow": []}"#.to_owned(), "workflow"),
        (format!(r#"{{"workflows": [{wf}], "executions": [{{"id": "0193a1c0-0001-7000-8000-0000000000aa", "workflow_id": "0193a1c0-0000-7000-8000-0000000000aa", "status": "bogus"}}]}}"#), "executions[0].status"),
        (format!(r#"{{"workflows": [{wf}], "executions": [{{"id": "0193a1c0-0001-7000-8000-0000000000aa", "workflow_id": "0193a1c0-0000-7000-8000-0000000000ff", "status": "pending"}}]}}"#), "executions[0].workflow_id"),
        (format!(r#"{{"workflows": [{wf}, {wf}]}}"#), "workflows[1].id"),
        (r#"{"workflows": [{"id": "0193a1c0-0000-7000-8000-0000000000aa", "name": "W", "nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "zz"}]}]}"#.to_owned(), "workflows[0].edges[0].target"),
        (r#"{"workflows": [{"id": "0193a1c0-0000-7000-8000-0000000000aa", "name": "W", "nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "a"}]}]}"#.to_owned(), "workflows[0].edges[0]"),
        (r#"{"workflows": [{"id": "0193a1c0-0000-7000-8000-0000000000aa", "name": "W", "nodes": [{"id": "a"}, {"id": "b"}], "edges": [{"source": "a", "target": "b"}, {"source": "a", "target": "b"}]}]}"#.to_owned(), "workflows[0].edges[1]"),
        ("{ not json".to_owned(), "line 1"),
    ] {
        let (file, message) = seed_error(&[source("seeds/01_ok.json", "{}"), source("seeds/02_bad.json", &json)]);
        assert_eq!(file, "seeds/02_bad.json", "{json}");
        assert!(message.contains(field), "{json}: message {message:?} should name {field}");
    }
}

#[test]
fn a_seed_that_fails_in_the_database_writes_nothing() {
    let db = TestDatabase::new();
    let before = snapshot(&db);
    // Valid on its own, but the second workflow's step collides with a unique key.
    let json = r#"{
      "workflows": [{"id": "0193a1c0-0000-7000-8000-0000000000aa", "name": "W", "nodes": [{"id": "a"}], "edges": []}],
      "executions": [{"id": "0193a1c0-0001-7000-8000-0000000000aa", "workflow_id": "0193a1c0-0000-7000-8000-0000000000aa", "status": "running"}],
      "execution_steps": [
        {"id": "0193a1c0-0002-7000-8000-0000000000a1", "execution_id": "0193a1c0-0001-7000-8000-0000000000aa", "node_id": "a", "status": "running"},
        {"id": "0193a1c0-0002-7000-8000-0000000000a2", "execution_id": "0193a1c0-0001-7000-8000-0000000000aa", "node_id": "a", "status": "pending"}
      ]}"#;
    let result = seed::seed(&mut db.connect(), &[source("dup.json", json)]);
    assert!(result.is_err(), "{result:?}");
    assert_eq!(snapshot(&db), before);
}

#[test]
fn urls_in_free_text_are_masked() {
    use workflow_db::config::redact_urls_in;
    let text = format!(
        "error: unexpected argument 'postgres://u:{PASSWORD}@127.0.0.1:5432/db' found; \
         also postgresql://a:b@c@[::1]/x and postgres://h/db?user=u&password={PASSWORD}&sslmode=require"
    );
    let masked = redact_urls_in(&text);
    assert!(
        !masked.contains(PASSWORD) && !masked.contains(":b@c@"),
        "{masked}"
    );
    assert!(
        masked.contains("postgres://u:***@127.0.0.1:5432/db'"),
        "{masked}"
    );
    assert!(masked.contains("password=***&sslmode=require"), "{masked}");
    assert_eq!(
        redact_urls_in("postgres://user@host/db"),
        "postgres://user@host/db"
    );
}

#[test]
fn a_seeded_running_step_holds_an_expired_lease_and_is_reclaimed() {
    let db = seeded();
    let mut conn = db.connect();
    let running = |conn: &mut diesel::PgConnection| {
        workflow_db::ExecutionStep::list(conn, None, 1000)
            .unwrap()
            .into_iter()
            .filter(|s| s.status == workflow_db::StepStatus::Running)
            .collect::<Vec<_>>()
    };
    let before = running(&mut conn);
    assert!(!before.is_empty(), "the seeds have running steps");
    let reclaimed = workflow_db::engine::reclaim_expired(&mut conn, 100).unwrap();
    let mut reclaimed: Vec<_> = reclaimed.iter().map(|s| s.id).collect();
    let mut expected: Vec<_> = before.iter().map(|s| s.id).collect();
    reclaimed.sort();
    expected.sort();
    assert_eq!(reclaimed, expected);
    assert!(running(&mut conn).is_empty());
}
