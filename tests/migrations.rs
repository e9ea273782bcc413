//! The migrator against a real PostgreSQL: idempotence, concurrency,
//! checksums, drift, out-of-order and the environment stamp.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use workflow_db::migrate::{self, MigrationEvent, Migrator};
use workflow_db::testing::TestDatabase;
use workflow_db::{Environment, Error, catalog};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

fn migrator(db: &TestDatabase) -> Migrator {
    Migrator::new(db.url().clone()).environment(Environment::Test)
}

fn total() -> i64 {
    migrate::sources().len() as i64
}

#[test]
fn fresh_migrate_matches_the_committed_catalog_and_second_run_changes_nothing() {
    let db = TestDatabase::empty();
    let applied = migrator(&db).run(|_| {}).unwrap();
    assert_eq!(applied.len() as i64, total());
    let mut conn = db.connect();
    let first = catalog::snapshot(&mut conn).unwrap();
    assert_eq!(
        first,
        catalog::expected(),
        "src/catalog.snapshot is stale: run bin/schema"
    );
    let bookkeeping = "SELECT count(*) AS n FROM __workflow_db_migrations";
    assert_eq!(count(&mut conn, bookkeeping), total());

    let mut events = Vec::new();
    let again = migrator(&db).run(|e| events.push(e.clone())).unwrap();
    assert!(again.is_empty());
    assert!(events.is_empty(), "fast path takes no lock: {events:?}");
    assert_eq!(catalog::snapshot(&mut conn).unwrap(), first);
    assert!(migrator(&db).check().unwrap().is_clean());
}

#[test]
fn all_migrations_revert_and_reapply_to_the_same_catalog() {
    use diesel_migrations::MigrationHarness;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let before = catalog::snapshot(&mut conn).unwrap();
    conn.revert_all_migrations(migrate::MIGRATIONS).unwrap();
    assert!(
        catalog::snapshot(&mut conn).unwrap().is_empty(),
        "down.sql left objects behind"
    );
    conn.run_pending_migrations(migrate::MIGRATIONS).unwrap();
    assert_eq!(catalog::snapshot(&mut conn).unwrap(), before);
}

#[test]
fn eight_concurrent_migrators_apply_each_migration_once() {
    let db = TestDatabase::empty();
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (m, barrier) = (migrator(&db), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                m.run(|_| {}).map(|applied| applied.len())
            })
        })
        .collect();
    let applied: Vec<usize> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(applied.iter().sum::<usize>() as i64, total(), "{applied:?}");
    let mut conn = db.connect();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM __diesel_schema_migrations"
        ),
        total()
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(DISTINCT version) AS n FROM __workflow_db_migrations"
        ),
        total()
    );
}

#[test]
fn a_waiting_migrator_reports_the_holder_and_times_out() {
    let db = TestDatabase::empty();
    let mut holder = db.connect();
    holder
        .batch_execute("SET application_name = 'deploy-42'; SELECT pg_advisory_lock(1464222786, 1)")
        .unwrap();
    let mut events = Vec::new();
    let err = migrator(&db)
        .lock_timeout(Duration::from_millis(300))
        .run(|e| events.push(e.clone()))
        .unwrap_err();
    assert!(
        matches!(&err, Error::MigrationLockTimeout { holder, .. } if holder.contains("deploy-42")),
        "{err}"
    );
    assert!(err.to_string().contains("deploy-42"));
    assert!(
        matches!(&events[..], [MigrationEvent::WaitingForLock { holder }] if holder.contains("deploy-42"))
    );
    let mut conn = db.connect();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'"
        ),
        0
    );
}

#[test]
fn an_edited_migration_is_refused_by_version_before_anything_runs() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let version = migrate::sources()[1].version;
    conn.batch_execute(&format!(
        "UPDATE __workflow_db_migrations SET checksum = 'edited' WHERE version = '{version}';
         DELETE FROM __diesel_schema_migrations WHERE version = (SELECT max(version) FROM __diesel_schema_migrations)"
    ))
    .unwrap();
    let catalog_before = catalog::snapshot(&mut conn).unwrap();
    let err = migrator(&db).run(|_| {}).unwrap_err();
    assert!(
        matches!(&err, Error::MigrationChecksumMismatch { version: v, .. } if v == version),
        "{err}"
    );
    assert!(err.to_string().contains(version));
    assert_eq!(
        catalog::snapshot(&mut conn).unwrap(),
        catalog_before,
        "nothing ran"
    );
    assert_eq!(
        migrator(&db).check().unwrap().edited,
        vec![version.to_owned()]
    );
}

#[test]
fn check_reports_a_hand_added_index_and_a_changed_column() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    conn.batch_execute(
        "CREATE INDEX executions_error_idx ON executions (error);
         ALTER TABLE execution_steps ALTER COLUMN node_id TYPE varchar(100)",
    )
    .unwrap();
    let report = migrator(&db).check().unwrap();
    assert!(!report.is_clean());
    assert!(report.pending.is_empty());
    let drift = report.drift.join("\n");
    assert!(
        drift.contains("+ index CREATE INDEX executions_error_idx"),
        "{drift}"
    );
    assert!(
        drift.contains("+ column execution_steps.node_id character varying(100) not null"),
        "{drift}"
    );
    assert!(
        drift.contains("- column execution_steps.node_id text not null"),
        "{drift}"
    );
}

#[test]
fn out_of_order_and_unknown_migrations_are_reported() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let second = migrate::sources()[1].version;
    // As if a branch merged an older migration that this database never ran.
    conn.batch_execute(&format!(
        "DELETE FROM __diesel_schema_migrations WHERE version = '{second}';
         DELETE FROM __workflow_db_migrations WHERE version = '{second}';
         DROP TABLE workflows CASCADE;
         INSERT INTO __diesel_schema_migrations (version) VALUES ('29990101000000')"
    ))
    .unwrap();
    let report = migrator(&db).check().unwrap();
    assert_eq!(report.pending, vec![second.to_owned()]);
    assert_eq!(report.out_of_order, vec![second.to_owned()]);
    assert_eq!(report.unknown_applied, vec!["29990101000000".to_owned()]);

    let err = migrator(&db).run(|_| {}).unwrap_err();
    assert!(
        matches!(&err, Error::OutOfOrderMigrations { versions, .. } if versions == &[second.to_owned()])
    );
    assert!(err.to_string().contains("--allow-out-of-order"));

    let mut events = Vec::new();
    let applied = migrator(&db)
        .allow_out_of_order(true)
        .run(|e| events.push(e.clone()))
        .unwrap();
    assert_eq!(
        applied
            .iter()
            .map(|m| m.version.as_str())
            .collect::<Vec<_>>(),
        [second]
    );
    assert!(events.contains(&MigrationEvent::UnknownApplied {
        version: "29990101000000".into()
    }));
}

#[test]
fn a_failing_migration_rolls_back_and_releases_the_lock() {
    let db = TestDatabase::empty();
    let mut conn = db.connect();
    // Make the second migration fail: its table already exists.
    conn.batch_execute("CREATE TABLE workflows (id int)")
        .unwrap();
    let err = migrator(&db).run(|_| {}).unwrap_err();
    let second = migrate::sources()[1].version;
    assert!(
        matches!(&err, Error::Migration { version, .. } if version == second),
        "{err}"
    );
    let locks = "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    assert_eq!(count(&mut conn, locks), 0);
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM __diesel_schema_migrations"
        ),
        1
    );
    // The lock is free: a second attempt fails on the same migration, not on the lock.
    let err = migrator(&db)
        .lock_timeout(Duration::from_millis(200))
        .run(|_| {})
        .unwrap_err();
    assert!(matches!(err, Error::Migration { .. }), "{err}");
}

#[derive(QueryableByName)]
struct Stamp {
    #[diesel(sql_type = Text)]
    value: String,
}

#[test]
fn the_environment_stamp_is_raised_to_production_and_never_lowered() {
    let db = TestDatabase::empty();
    let stamp = |conn: &mut PgConnection| {
        diesel::sql_query("SELECT value FROM __workflow_db_metadata WHERE key = 'environment'")
            .get_result::<Stamp>(conn)
            .unwrap()
            .value
    };
    Migrator::new(db.url().clone()).run(|_| {}).unwrap();
    let mut conn = db.connect();
    assert_eq!(stamp(&mut conn), "development");
    Migrator::new(db.url().clone())
        .environment(Environment::Production)
        .run(|_| {})
        .unwrap();
    assert_eq!(stamp(&mut conn), "production");
    let mut events = Vec::new();
    Migrator::new(db.url().clone())
        .environment(Environment::Development)
        .run(|e| events.push(e.clone()))
        .unwrap();
    assert_eq!(stamp(&mut conn), "production");
    assert!(
        matches!(&events[..], [MigrationEvent::StampKept { stamp, .. }] if stamp == "production")
    );
}

#[test]
fn an_invalid_index_from_a_failed_concurrent_build_is_never_recorded_as_applied() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // Roll the unique idempotency index (a CONCURRENTLY migration) back, then
    // add rows that violate it, so that building it again fails half-way.
    let version = migrate::sources()
        .iter()
        .find(|s| s.up.contains("executions_workflow_id_idempotency_key_key"))
        .unwrap()
        .version;
    conn.batch_execute(&format!(
        "DROP INDEX executions_workflow_id_idempotency_key_key;
         DELETE FROM __diesel_schema_migrations WHERE version >= '{version}';
         DELETE FROM __workflow_db_migrations WHERE version >= '{version}';
         INSERT INTO workflows (id, name) VALUES ('00000000-0000-4000-8000-000000000001', 'w');
         INSERT INTO executions (workflow_id, idempotency_key)
         VALUES ('00000000-0000-4000-8000-000000000001', 'k'), ('00000000-0000-4000-8000-000000000001', 'k');"
    ))
    .unwrap();
    // Newer migrations are "pending" again but older than nothing: allow order.
    let err = migrator(&db)
        .allow_out_of_order(true)
        .run(|_| {})
        .unwrap_err();
    assert!(
        matches!(&err, Error::Migration { version: v, .. } if v == version),
        "{err}"
    );
    // The failed build left an INVALID index behind; the retry must not accept it.
    let err = migrator(&db)
        .allow_out_of_order(true)
        .run(|_| {})
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("executions_workflow_id_idempotency_key_key") && msg.contains("INVALID"),
        "{msg}"
    );
    let recorded =
        format!("SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version = '{version}'");
    assert_eq!(count(&mut conn, &recorded), 0);
    assert!(
        catalog::snapshot(&mut conn)
            .unwrap()
            .iter()
            .any(|l| l.contains("executions_workflow_id_idempotency_key_key")
                && l.ends_with("(INVALID)"))
    );
}

#[test]
fn bookkeeping_is_found_whatever_the_search_path() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    conn.batch_execute(&format!(
        "CREATE SCHEMA app; ALTER DATABASE \"{}\" SET search_path = app",
        db.name()
    ))
    .unwrap();
    let url = db.url().with_default_param("options", "-csearch_path=app");
    let mut other = workflow_db::pool::connect(&url).unwrap();
    assert_eq!(
        migrate::environment_stamp(&mut other).unwrap().as_deref(),
        Some("test")
    );
    let applied = Migrator::new(url)
        .environment(Environment::Test)
        .run(|_| {})
        .unwrap();
    assert!(
        applied.is_empty(),
        "nothing is pending, whatever the search_path"
    );
}

/// Drops a database by name when the test ends, passed or not.
struct DropDatabase {
    admin: workflow_db::DatabaseUrl,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        if let Ok(mut conn) = workflow_db::pool::connect(&self.admin) {
            let _ = conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// `run_pending_migrations`, the call a service makes at boot, creates a
/// database that does not exist yet, as `db-migrate` does, then migrates
/// it; the next boot finds it there and does nothing.
#[test]
fn run_pending_migrations_creates_a_missing_database() {
    let admin = workflow_db::testing::server_url()
        .unwrap()
        .with_database("postgres");
    let name = workflow_db::testing::throwaway_name("test");
    let _cleanup = DropDatabase {
        admin: admin.clone(),
        name: name.clone(),
    };
    let mut server = workflow_db::pool::connect(&admin).unwrap();
    let exists = |conn: &mut PgConnection| {
        count(
            conn,
            &format!("SELECT count(*) AS n FROM pg_database WHERE datname = '{name}'"),
        ) == 1
    };
    assert!(!exists(&mut server), "{name} must not exist yet");
    let mut config = workflow_db::Config::new(admin.with_database(&name));
    config.environment = Environment::Test;

    let applied = workflow_db::run_pending_migrations(&config).unwrap();
    assert!(exists(&mut server), "{name} was not created");
    assert_eq!(applied.len() as i64, total());
    let mut conn = workflow_db::pool::connect(&config.database_url).unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM public.__diesel_schema_migrations"
        ),
        total()
    );
    assert_eq!(
        migrate::environment_stamp(&mut conn).unwrap().as_deref(),
        Some("test")
    );

    let again = workflow_db::run_pending_migrations(&config).unwrap();
    assert!(again.is_empty(), "second boot applied {again:?}");
}
