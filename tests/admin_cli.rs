#![cfg(feature = "cli")]
//! The admin binaries as users and CI run them: exit codes, messages, and
//! that a refused command leaves the database exactly as it was.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{PASSWORD, seeded, snapshot, stamp, url_with};
use workflow_db::testing::TestDatabase;

const RESET: &str = env!("CARGO_BIN_EXE_db-reset");
const NUKE: &str = env!("CARGO_BIN_EXE_db-nuke");
const SEED: &str = env!("CARGO_BIN_EXE_db-seed");
const ENV: &str = env!("CARGO_BIN_EXE_db-env");
const MIGRATE: &str = env!("CARGO_BIN_EXE_db-migrate");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs a binary outside the repository (no .env), without a terminal,
/// with no APP_ENV/RUST_ENV/NODE_ENV/DATABASE_URL unless given.
fn run(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null());
    for var in ["APP_ENV", "RUST_ENV", "NODE_ENV", "DATABASE_URL"] {
        cmd.env_remove(var);
    }
    let out = cmd.envs(envs.iter().copied()).output().unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    assert!(
        !run.output().contains(PASSWORD),
        "{bin} {args:?} printed the password:\n{}",
        run.output()
    );
    run
}

/// The assertions of every refusal: exit code, the rule named, nothing changed.
fn assert_refused(
    db: &TestDatabase,
    bin: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    code: i32,
    rule: &str,
) -> Run {
    let before = snapshot(db);
    let r = run(bin, args, envs);
    assert_eq!(r.code, code, "{bin} {args:?}: {}", r.output());
    assert!(
        r.stderr.contains(&format!("refused by rule {rule}")),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("--") || r.stderr.contains("unset") || r.stderr.contains("db-env"),
        "the message must say what to do: {}",
        r.stderr
    );
    assert_eq!(snapshot(db), before, "{bin} {args:?} changed the database");
    r
}

#[test]
fn rule_1_production_environment_refuses_both_commands() {
    let db = seeded();
    let url = url_with(&db, None, None);
    for bin in [RESET, NUKE] {
        for var in ["APP_ENV", "RUST_ENV", "NODE_ENV"] {
            let r = assert_refused(
                &db,
                bin,
                &[
                    "--database-url",
                    &url,
                    "--confirm",
                    db.name(),
                    "--allow-remote",
                    "--allow-production-looking-url",
                ],
                &[(var, "Production")],
                3,
                "environment-is-production",
            );
            assert!(r.stderr.contains(var), "{}", r.stderr);
        }
    }
}

#[test]
fn rule_2_production_stamp_refuses_even_in_development() {
    let db = seeded();
    admin_stamp(&db, "production");
    let url = url_with(&db, None, None);
    for bin in [RESET, NUKE] {
        let r = assert_refused(
            &db,
            bin,
            &[
                "--database-url",
                &url,
                "--confirm",
                db.name(),
                "--allow-remote",
                "--allow-production-looking-url",
            ],
            &[("APP_ENV", "development")],
            3,
            "database-is-production",
        );
        assert!(r.stderr.contains("db-env set development"), "{}", r.stderr);
        // --dry-run runs the guard too.
        assert_refused(
            &db,
            bin,
            &["--database-url", &url, "--dry-run"],
            &[],
            3,
            "database-is-production",
        );
    }
    // db-migrate in development keeps the stamp.
    assert_eq!(
        run(
            MIGRATE,
            &["--database-url", &url],
            &[("APP_ENV", "development")]
        )
        .code,
        0
    );
    assert_eq!(stamp(&db).as_deref(), Some("production"));
}

fn admin_stamp(db: &TestDatabase, env: &str) {
    let url = url_with(db, None, None);
    let r = run(
        ENV,
        &["--database-url", &url, "set", env, "--confirm", db.name()],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.output());
}

#[test]
fn rule_3_production_looking_url_refuses_and_a_prod_password_does_not_matter() {
    let db = seeded();
    let url = url_with(&db, None, Some("prod_admin"));
    for bin in [RESET, NUKE] {
        let r = assert_refused(
            &db,
            bin,
            &["--database-url", &url, "--confirm", db.name()],
            &[],
            3,
            "url-looks-like-production",
        );
        assert!(
            r.stderr.contains("prod_admin") && r.stderr.contains("--allow-production-looking-url")
        );
    }
    // The password of url_with contains PROD: the local URL passes the guard.
    let ok = run(
        RESET,
        &["--database-url", &url_with(&db, None, None), "--dry-run"],
        &[],
    );
    assert_eq!(ok.code, 0, "{}", ok.output());
}

#[test]
fn rule_4_remote_server_needs_allow_remote() {
    let db = seeded();
    // 0.0.0.0 reaches the local server but is not a loopback address.
    let url = url_with(&db, Some("0.0.0.0"), None);
    for bin in [RESET, NUKE] {
        let r = assert_refused(
            &db,
            bin,
            &["--database-url", &url, "--confirm", db.name()],
            &[],
            3,
            "remote-server",
        );
        assert!(r.stderr.contains("--allow-remote"));
    }
    let r = run(
        RESET,
        &[
            "--database-url",
            &url,
            "--confirm",
            db.name(),
            "--allow-remote",
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.output());
    assert!(
        common::row_counts(&mut db.connect())
            .iter()
            .all(|t| t.table.starts_with("__") || t.rows == 0)
    );
}

#[test]
fn rule_4_follows_hostaddr_pghostaddr_and_pgservice_as_libpq_does() {
    let db = seeded();
    // The URL says 127.0.0.1, but libpq connects to hostaddr / PGHOSTADDR
    // (0.0.0.0 reaches the local server without being a loopback address).
    let loopback = url_with(&db, None, None);
    let sep = if loopback.contains('?') { '&' } else { '?' };
    let with_hostaddr = format!("{loopback}{sep}hostaddr=0.0.0.0");
    for (url, envs) in [
        (&with_hostaddr, &[][..]),
        (&loopback, &[("PGHOSTADDR", "0.0.0.0")][..]),
        // A service's server is unknown (this one is not even defined).
        (
            &loopback,
            &[("PGSERVICE", "workflow_db_no_such_service")][..],
        ),
    ] {
        let r = assert_refused(
            &db,
            RESET,
            &["--database-url", url, "--confirm", db.name()],
            envs,
            3,
            "remote-server",
        );
        assert!(r.stderr.contains("--allow-remote"), "{}", r.stderr);
    }
    let r = run(
        RESET,
        &[
            "--database-url",
            &loopback,
            "--confirm",
            db.name(),
            "--allow-remote",
        ],
        &[("PGHOSTADDR", "0.0.0.0")],
    );
    assert_eq!(r.code, 0, "{}", r.output());
}

#[test]
fn without_a_terminal_the_confirm_flag_is_required_and_must_match() {
    let db = seeded();
    let url = url_with(&db, None, None);
    for bin in [RESET, NUKE] {
        let r = assert_refused(&db, bin, &["--database-url", &url], &[], 4, "not-confirmed");
        assert!(
            r.stderr.contains(&format!("--confirm {}", db.name())),
            "{}",
            r.stderr
        );
        assert_refused(
            &db,
            bin,
            &["--database-url", &url, "--confirm", "postgres"],
            &[],
            4,
            "not-confirmed",
        );
    }
}

#[test]
fn dry_run_prints_target_and_row_counts_and_changes_nothing() {
    let db = seeded();
    let url = url_with(&db, None, None);
    let before = snapshot(&db);
    let r = run(RESET, &["--database-url", &url, "--dry-run"], &[]);
    assert_eq!(r.code, 0, "{}", r.output());
    assert!(
        r.stdout.contains(&format!("database {}", db.name())) && r.stdout.contains("127.0.0.1")
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains("workflows") && l.contains(" 2 rows")),
        "{}",
        r.stdout
    );
    let n = run(NUKE, &["--database-url", &url, "--dry-run"], &[]);
    assert_eq!(n.code, 0, "{}", n.output());
    assert!(
        n.stdout.contains("__diesel_schema_migrations") && n.stdout.contains("type step_status")
    );
    assert_eq!(snapshot(&db), before);
}

#[test]
fn reset_with_seed_keeps_bookkeeping_and_stamp_and_reseeds() {
    let db = seeded();
    let seeded_rows = common::row_counts(&mut db.connect());
    let schema = common::pg_dump(&db, "--schema-only");
    let stamp_before = stamp(&db);
    let url = url_with(&db, None, None);
    let r = run(
        RESET,
        &["--database-url", &url, "--confirm", db.name(), "--seed"],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.output());
    assert!(r.stdout.contains("emptied 9 table(s)"), "{}", r.stdout);
    assert_eq!(common::row_counts(&mut db.connect()), seeded_rows);
    assert_eq!(common::pg_dump(&db, "--schema-only"), schema);
    assert_eq!(stamp(&db), stamp_before);
}

#[test]
fn nuke_then_db_migrate_rebuilds_the_fresh_schema() {
    let fresh = TestDatabase::new();
    let db = seeded();
    let url = url_with(&db, None, None);
    let r = run(NUKE, &["--database-url", &url, "--confirm", db.name()], &[]);
    assert_eq!(r.code, 0, "{}", r.output());
    assert!(common::row_counts(&mut db.connect()).is_empty());
    let m = run(MIGRATE, &["--database-url", &url], &[("APP_ENV", "test")]);
    assert_eq!(m.code, 0, "{}", m.output());
    assert_eq!(
        common::pg_dump(&db, "--schema-only"),
        common::pg_dump(&fresh, "--schema-only")
    );
}

#[test]
fn db_seed_is_idempotent_and_reports_counts() {
    let db = TestDatabase::new();
    let url = url_with(&db, None, None);
    let first = run(
        SEED,
        &["--database-url", &url],
        &[("APP_ENV", "production")],
    );
    assert_eq!(first.code, 0, "{}", first.output());
    assert!(first.stdout.contains("0 already present"));
    let dump = common::pg_dump(&db, "--data-only");
    let second = run(SEED, &["--database-url", &url], &[]);
    assert_eq!(second.code, 0, "{}", second.output());
    assert!(
        second.stdout.contains("0 row(s) inserted"),
        "{}",
        second.stdout
    );
    assert!(
        second
            .stdout
            .lines()
            .any(|l| l.starts_with("workflows") && l.contains("2 already present"))
    );
    assert_eq!(common::pg_dump(&db, "--data-only"), dump);
}

#[test]
fn db_seed_with_a_malformed_file_names_it_and_writes_nothing() {
    let db = TestDatabase::new();
    let dir = std::env::temp_dir().join(format!("workflow_db_seed_{}", db.name()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("01_good.json"),
        include_str!("../seeds/01_order_fulfilment.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("02_bad.json"),
        r#"{"workflows": [{"id": "0193a1c0-0000-7000-8000-0000000000bb", "name": "x", "nodes": "oops", "edges": []}]}"#,
    )
    .unwrap();
    let before = snapshot(&db);
    let url = url_with(&db, None, None);
    let r = run(
        SEED,
        &["--database-url", &url, "--dir", dir.to_str().unwrap()],
        &[],
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(r.code, 1, "{}", r.output());
    assert!(
        r.stderr.contains("02_bad.json") && r.stderr.contains("workflows[0].nodes"),
        "{}",
        r.stderr
    );
    assert_eq!(snapshot(&db), before);
}

#[test]
fn db_env_shows_and_changes_the_stamp_only_by_name() {
    let db = TestDatabase::new();
    let url = url_with(&db, None, None);
    let show = run(ENV, &["--database-url", &url, "show"], &[]);
    assert!(
        show.stdout.contains("environment stamp test"),
        "{}",
        show.output()
    );
    let wrong = run(
        ENV,
        &[
            "--database-url",
            &url,
            "set",
            "development",
            "--confirm",
            "nope",
        ],
        &[],
    );
    assert_eq!(wrong.code, 4, "{}", wrong.output());
    assert_eq!(stamp(&db).as_deref(), Some("test"));
    let missing = run(ENV, &["--database-url", &url, "set", "development"], &[]);
    assert_eq!(missing.code, 2, "{}", missing.output());
    admin_stamp(&db, "production");
    assert_eq!(stamp(&db).as_deref(), Some("production"));
}

#[test]
fn the_password_appears_in_no_output_on_success_or_failure() {
    // `run` asserts it for every call of every test; here the failure paths.
    let db = TestDatabase::new();
    let url = url_with(&db, None, None);
    let missing_db = url.replace(db.name(), "workflow_db_no_such_database");
    for bin in [RESET, NUKE, SEED, ENV, MIGRATE] {
        let args: &[&str] = if bin == ENV { &["show"] } else { &[] };
        // Connection failure (the database does not exist): via flag and via DATABASE_URL.
        let mut with_flag = vec!["--database-url", missing_db.as_str()];
        with_flag.extend(args);
        if bin == MIGRATE {
            with_flag.push("--check");
        }
        let r = run(bin, &with_flag, &[]);
        assert_ne!(r.code, 0, "{bin}: {}", r.output());
        let mut check = args.to_vec();
        if bin == MIGRATE {
            check.push("--status");
        }
        let r = run(bin, &check, &[("DATABASE_URL", &missing_db)]);
        assert_ne!(r.code, 0, "{bin}: {}", r.output());
        // A usage error echoing the URL given as a positional argument.
        let r = run(bin, &[url.as_str()], &[]);
        assert_eq!(r.code, 2, "{bin}: {}", r.output());
        assert!(r.stderr.contains("***"), "{bin}: {}", r.stderr);
    }
    // A malformed URL with a password.
    let r = run(
        RESET,
        &["--database-url", &format!("postgres://u:{PASSWORD}@[::1/x")],
        &[],
    );
    assert_eq!(r.code, 1, "{}", r.output());
}

#[test]
fn json_lines_on_every_binary_including_refusals() {
    let db = TestDatabase::new();
    let url = url_with(&db, None, None);
    let name = db.name().to_owned();
    let cases: [(&str, Vec<&str>, i32, &str); 6] = [
        (SEED, vec!["--json"], 0, "done"),
        (RESET, vec!["--json", "--dry-run"], 0, "dry_run"),
        (RESET, vec!["--json", "--confirm", "wrong"], 4, "error"),
        (NUKE, vec!["--json", "--dry-run"], 0, "dry_run"),
        (ENV, vec!["--json", "show"], 0, "stamp"),
        (MIGRATE, vec!["--json", "--check"], 0, "check"),
    ];
    for (bin, args, code, last_event) in cases {
        let r = run(bin, &args, &[("DATABASE_URL", &url)]);
        assert_eq!(r.code, code, "{bin} {args:?}: {}", r.output());
        let lines: Vec<serde_json::Value> = r
            .stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{bin}: not JSON ({e}): {l}"))
            })
            .collect();
        assert_eq!(
            lines.last().unwrap()["event"],
            last_event,
            "{bin} {args:?}: {}",
            r.stdout
        );
    }
    let refused = run(
        RESET,
        &["--json", "--confirm", &name],
        &[("DATABASE_URL", &url), ("APP_ENV", "production")],
    );
    assert_eq!(refused.code, 3);
    let error: serde_json::Value =
        serde_json::from_str(refused.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(error["event"], "error");
    assert_eq!(error["rule"], "environment-is-production");
    assert_eq!(error["exit_code"], 3);
}

/// A real pseudo-terminal through util-linux `script`, when installed
/// (the library tests cover the same prompt through an injected reader).
#[test]
fn interactive_confirmation_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    }
    let db = seeded();
    let url = url_with(&db, None, None);
    let in_pty = |answer: &str| {
        let mut child = Command::new("script")
            .args([
                "-qec",
                &format!("'{RESET}' --database-url '{url}'"),
                "/dev/null",
            ])
            .current_dir(std::env::temp_dir())
            .env_remove("APP_ENV")
            .env_remove("RUST_ENV")
            .env_remove("NODE_ENV")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
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
    };
    let before = snapshot(&db);
    for answer in ["\n", "yes\n", "y\n"] {
        let (code, text) = in_pty(answer);
        assert_eq!(code, Some(4), "{text}");
        assert!(
            text.contains("[No]") && text.contains("cancelled"),
            "{text}"
        );
        assert_eq!(snapshot(&db), before);
    }
    let (code, text) = in_pty(&format!("{}\n", db.name()));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        common::row_counts(&mut db.connect())
            .iter()
            .all(|t| t.table.starts_with("__") || t.rows == 0)
    );
}
