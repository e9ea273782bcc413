//! The `db-migrate` binary: exit codes, output, `--check`, `--json`, secrets.
#![cfg(feature = "cli")]

use std::process::{Command, Output};

use diesel::connection::SimpleConnection;
use workflow_db::testing::TestDatabase;

fn db_migrate(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_db-migrate"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("APP_ENV")
        .env_remove("RUST_ENV")
        .env_remove("NODE_ENV")
        .current_dir(std::env::temp_dir()) // no .env from the checkout
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn creates_migrates_then_has_nothing_to_do() {
    let server = TestDatabase::empty();
    // A database that does not exist yet, on the same server.
    let url = server
        .url()
        .with_database(&format!("{}_new", server.name()));
    let url = url.expose().to_owned();

    let check = db_migrate(&url, &["--check"]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "the database does not exist yet: {}",
        text(&check)
    );

    let first = db_migrate(&url, &[]);
    assert!(first.status.success(), "{}", text(&first));
    let out = text(&first);
    assert!(out.contains("created database"), "{out}");
    assert!(
        out.contains("applied 2026-11-23-000001_create_enums ("),
        "{out}"
    );
    assert!(out.contains("migration(s) applied"), "{out}");

    let second = db_migrate(&url, &[]);
    assert!(second.status.success());
    assert!(
        text(&second).contains("nothing to migrate, up to date"),
        "{}",
        text(&second)
    );
    assert!(db_migrate(&url, &["--check"]).status.success());

    let status = db_migrate(&url, &["--status", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&status.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total = workflow_db::migrate::sources().len();
    assert_eq!(lines.len(), total + 1);
    // The first line names the database looked at, like every other binary.
    assert_eq!(lines[0]["event"], "status");
    assert_eq!(lines[0]["applied"], total);
    assert_eq!(lines[0]["pending"], 0);
    let target = lines[0]["target"].as_str().unwrap();
    assert!(
        target.ends_with(&format!("database {}_new", server.name())),
        "{target}"
    );
    assert!(
        lines[1..]
            .iter()
            .all(|l| l["event"] == "migration" && l["applied"] == true)
    );
    let human = db_migrate(&url, &["--status"]);
    let first = String::from_utf8_lossy(&human.stdout);
    assert_eq!(
        first.lines().next().unwrap(),
        format!("{target}: {total} applied, 0 pending")
    );

    let mut admin = workflow_db::pool::connect(&server.url().with_database("postgres")).unwrap();
    admin
        .batch_execute(&format!(
            "DROP DATABASE \"{}_new\" WITH (FORCE)",
            server.name()
        ))
        .unwrap();
}

#[test]
fn check_fails_with_code_5_on_pending_migrations_and_drift() {
    let db = TestDatabase::empty();
    let url = db.url().expose().to_owned();
    let pending = db_migrate(&url, &["--check", "--json"]);
    assert_eq!(pending.status.code(), Some(5), "{}", text(&pending));
    let out = String::from_utf8_lossy(&pending.stdout);
    assert_eq!(
        out.lines()
            .filter(|l| l.contains(r#""event":"pending""#))
            .count(),
        workflow_db::migrate::sources().len()
    );
    assert!(db_migrate(&url, &[]).status.success());
    db.connect()
        .batch_execute("CREATE INDEX extra_idx ON workflows (name)")
        .unwrap();
    let drift = db_migrate(&url, &["--check"]);
    assert_eq!(drift.status.code(), Some(5));
    assert!(
        text(&drift).contains("drift: + index CREATE INDEX extra_idx"),
        "{}",
        text(&drift)
    );
}

#[test]
fn the_password_never_appears_in_output() {
    let secret = "pr0d-S3cret-pw";
    let db = TestDatabase::empty();
    let with_password = db
        .url()
        .expose()
        .replacen("postgres@", &format!("postgres:{secret}@"), 1);
    assert!(with_password.contains(secret));
    let unreachable = format!("postgres://postgres:{secret}@127.0.0.1:1/nowhere");
    for (url, args) in [
        (with_password.as_str(), &[][..]),
        (with_password.as_str(), &["--check"][..]),
        (with_password.as_str(), &["--status", "--json"][..]),
        (unreachable.as_str(), &[][..]),
        (unreachable.as_str(), &["--json"][..]),
        ("postgres://postgres:pr0d-S3cret-pw@[::1/broken", &[][..]),
    ] {
        let o = db_migrate(url, args);
        assert!(
            !text(&o).contains(secret),
            "password leaked by {args:?}: {}",
            text(&o)
        );
    }
    let failed = db_migrate(&unreachable, &[]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        text(&failed).contains("cannot connect to 127.0.0.1:1"),
        "{}",
        text(&failed)
    );
}

#[test]
fn a_connection_error_names_its_cause_once() {
    // libpq's "Connection refused" used to appear in the error's own message
    // and again as its source, so the binaries' chains printed it twice.
    let o = db_migrate("postgres://postgres@127.0.0.1:1/nowhere", &[]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        stderr.matches("Connection refused").count(),
        1,
        "the cause must appear exactly once: {stderr}"
    );
    assert!(
        stderr.starts_with("db-migrate: error: cannot connect to 127.0.0.1:1, database postgres: "),
        "{stderr}"
    );
}
