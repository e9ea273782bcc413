#![cfg(feature = "cli")]
//! The shell scripts of `bin/` as a developer runs them: `bin/reset` and
//! `bin/setup`, on this build's binaries (`WORKFLOW_DB_BIN_DIR`, so no cargo
//! build inside a test) and from a copy of `bin/` in a temporary directory
//! (so the checkout's `.env` is neither read nor written).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{seeded, snapshot};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use workflow_db::testing::TestDatabase;

/// A copy of the repository's `bin/` under a temporary root.
struct Scripts {
    root: tempfile::TempDir,
}

impl Scripts {
    fn new() -> Scripts {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("bin");
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), bin.join(entry.file_name())).unwrap();
        }
        Scripts { root }
    }

    /// Runs `bin/<script>` without a terminal, against `url`.
    fn run(&self, script: &str, url: &str, args: &[&str]) -> Run {
        let mut cmd = Command::new(self.root.path().join("bin").join(script));
        cmd.args(args)
            .current_dir(self.root.path())
            .stdin(Stdio::null())
            .env("DATABASE_URL", url)
            .env("WORKFLOW_DB_BIN_DIR", bin_dir());
        for var in ["APP_ENV", "RUST_ENV", "NODE_ENV"] {
            cmd.env_remove(var);
        }
        let out = cmd.output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Where cargo put this build's `db-*` binaries.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_db-reset"))
        .parent()
        .unwrap()
        .to_owned()
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(db: &TestDatabase, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(&mut db.connect())
        .unwrap()
        .n
}

fn public_tables(db: &TestDatabase) -> i64 {
    count(
        db,
        "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'",
    )
}

#[test]
fn bin_reset_dry_run_shows_the_plan_and_changes_nothing() {
    // It used to fail: the script passed --dry-run to db-reset a second time.
    let db = seeded();
    let before = snapshot(&db);
    let r = Scripts::new().run("reset", db.url().expose(), &["--dry-run"]);
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stdout.contains("tables to empty"), "{r}");
    assert!(r.stdout.contains("dry run"), "{r}");
    assert_eq!(
        r.stdout.matches(&format!("database {}", db.name())).count(),
        1,
        "the target is printed once: {r}"
    );
    assert_eq!(snapshot(&db), before);
}

#[test]
fn bin_reset_without_a_terminal_refuses_before_migrating() {
    // An unmigrated database: the old script ran db-migrate before db-reset
    // refused for lack of confirmation, so tables appeared.
    let db = TestDatabase::empty();
    let before = snapshot(&db);
    let r = Scripts::new().run("reset", db.url().expose(), &[]);
    assert_eq!(r.code, 4, "{r}");
    assert!(r.stderr.contains("refused by rule not-confirmed"), "{r}");
    assert!(
        r.stderr
            .contains(&format!("pass --confirm {} to confirm", db.name())),
        "{r}"
    );
    assert_eq!(public_tables(&db), 0, "nothing was migrated: {r}");
    assert_eq!(snapshot(&db), before);
}

#[test]
fn bin_reset_confirmed_empties_migrates_and_reseeds() {
    let db = TestDatabase::empty();
    let r = Scripts::new().run("reset", db.url().expose(), &["--confirm", db.name()]);
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stdout.contains("migration(s) applied"), "{r}");
    assert!(r.stdout.contains("seeded"), "{r}");
    assert!(count(&db, "SELECT count(*) AS n FROM workflows") > 0);

    // Again, on the seeded database, with flags repeated: rows go and come back.
    let seeded_executions = count(&db, "SELECT count(*) AS n FROM executions");
    let mut conn = db.connect();
    let workflow = &workflow_db::Workflow::list(&mut conn, None, 1).unwrap()[0];
    workflow_db::NewExecution::new(workflow.id)
        .create(&mut conn)
        .unwrap();
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM executions"),
        seeded_executions + 1
    );
    let r = Scripts::new().run(
        "reset",
        db.url().expose(),
        &["--confirm", db.name(), "--seed"],
    );
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stdout.contains("nothing to migrate"), "{r}");
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM executions"),
        seeded_executions
    );
}

#[test]
fn bin_setup_says_when_it_reuses_a_database_that_holds_data() {
    let db = seeded();
    let workflows = count(&db, "SELECT count(*) AS n FROM workflows");
    let executions = count(&db, "SELECT count(*) AS n FROM executions");
    let scripts = Scripts::new();
    let r = scripts.run("setup", db.url().expose(), &[]);
    assert_eq!(r.code, 0, "{r}");
    assert!(
        r.stderr.contains(&format!(
            "it already holds {workflows} workflow(s) and {executions} execution(s)"
        )),
        "{r}"
    );
    assert!(r.stderr.contains("bin/reset empties it"), "{r}");
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM executions"),
        executions,
        "kept"
    );
    // setup wrote .env in its own root, not in the checkout.
    assert!(scripts.root.path().join(".env").is_file());

    // A fresh database: nothing to say.
    let fresh = TestDatabase::empty();
    let r = scripts.run("setup", fresh.url().expose(), &[]);
    assert_eq!(r.code, 0, "{r}");
    assert!(!r.stderr.contains("already holds"), "{r}");
    assert!(public_tables(&fresh) > 0);
}
