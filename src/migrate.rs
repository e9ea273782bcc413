//! Embedded migrations, applied safely from many instances at once.
//!
//! [`Migrator::run`] is what an engine service calls at boot (or use the
//! shortcut [`run_pending_migrations`]). It:
//!
//! 1. opens one dedicated connection (never a pooled one, so the advisory lock
//!    cannot leak into application code and is released when it closes);
//! 2. reads what is applied and verifies the checksum of every applied
//!    migration against the SQL embedded in this build: an edited migration is
//!    refused before anything runs;
//! 3. returns at once when nothing is pending (no lock taken: the fast path of
//!    every boot but the first after a deploy);
//! 4. otherwise takes a PostgreSQL advisory lock, waiting at most
//!    `lock_timeout` and reporting who holds it, re-reads the state (another
//!    instance may have done the work meanwhile), and applies each pending
//!    migration in its own transaction together with its checksum record;
//! 5. stamps the environment it ran in into the database (see
//!    [`crate::admin`]); a `production` stamp is never lowered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::migration::{Migration, MigrationSource};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamptz};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use sha2::{Digest, Sha256};

use crate::config::{DatabaseUrl, Environment};
use crate::error::{Error, Result};
use crate::pool::{connect, connect_as};

/// The migrations in `migrations/`, compiled into the crate.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Advisory lock keys `(namespace, id)`: the namespace is "WFDB" in ASCII.
pub(crate) const LOCK_NAMESPACE: i32 = 0x5746_4442;
/// The migration lock, taken on the target database. (Ids in this
/// namespace: 1 migrations, 2 the test template (`testing`), 3 the
/// maintenance leader (`runtime::maintenance`).)
pub(crate) const MIGRATION_LOCK: i32 = 1;

/// Default time to wait for another migrator to finish.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(300);

/// `application_name` of the migrator's connection, shown to whoever waits for its lock.
pub const MIGRATOR_APPLICATION_NAME: &str = "workflow-db-migrate";

/// The SQL of one embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct MigrationSql {
    /// Diesel's version (the directory name's date and number).
    pub version: &'static str,
    /// The directory name.
    pub name: &'static str,
    /// `up.sql`.
    pub up: &'static str,
    /// `down.sql`.
    pub down: &'static str,
}
include!(concat!(env!("OUT_DIR"), "/migration_sources.rs"));

/// Every embedded migration's SQL, oldest first.
pub fn sources() -> &'static [MigrationSql] {
    SOURCES
}

impl MigrationSql {
    /// The checksum recorded when this migration is applied.
    pub fn checksum(&self) -> String {
        checksum(self.up)
    }
}

/// SHA-256 (hex) of a migration's SQL with line endings normalised to LF, so a
/// checkout with CRLF line endings verifies the same.
pub fn checksum(sql: &str) -> String {
    let normalised = sql.replace("\r\n", "\n");
    let digest = Sha256::digest(normalised.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// One migration applied by a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its version.
    pub version: String,
    /// Its directory name.
    pub name: String,
    /// How long it took.
    pub duration: Duration,
}

/// What a migrator reports while it works, for the binary to print.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationEvent {
    /// Another session holds the migration lock; we wait.
    WaitingForLock {
        /// Who holds it (application, pid, since).
        holder: String,
    },
    /// The migration lock is ours.
    LockAcquired,
    /// A migration is about to run.
    Applying {
        /// Its version.
        version: String,
        /// Its directory name.
        name: String,
    },
    /// A migration was applied.
    Applied(AppliedMigration),
    /// The database records an applied migration this build does not know
    /// (applied by a newer build, or removed from `migrations/`).
    UnknownApplied {
        /// Its version.
        version: String,
    },
    /// The database's environment stamp was written or raised.
    Stamped {
        /// The stamp before (None: there was none).
        from: Option<String>,
        /// The stamp now.
        to: String,
    },
    /// The database is stamped with a higher environment than ours and keeps it.
    StampKept {
        /// The stamp in the database.
        stamp: String,
        /// Our environment.
        ours: String,
    },
}

/// Applied or pending state of one migration, for `db-migrate --status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MigrationStatus {
    /// Its version.
    pub version: String,
    /// Its directory name (None for an applied version this build does not know).
    pub name: Option<String>,
    /// Whether it is applied.
    pub applied: bool,
    /// When it was applied.
    pub applied_at: Option<DateTime<Utc>>,
    /// How long it took, in milliseconds (recorded by this crate's migrator).
    pub duration_ms: Option<i64>,
    /// Whether its recorded checksum matches the embedded SQL (None: not recorded).
    pub checksum_ok: Option<bool>,
}

/// Runs the embedded migrations against one database.
#[derive(Debug, Clone)]
pub struct Migrator {
    url: DatabaseUrl,
    environment: Environment,
    lock_timeout: Duration,
    ddl_lock_timeout: Duration,
    allow_out_of_order: bool,
}

/// Default `lock_timeout` of the statements inside migrations.
pub const DEFAULT_DDL_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the database of `config` when it does not exist, then applies
/// the pending migrations, stamping its environment: the call an engine
/// service makes at boot, doing what `db-migrate` does.
///
/// When the database exists this costs one connection more than
/// [`Migrator::run`]. When it does not, it is created from the server's
/// `postgres` database (or `template1`), which needs a role allowed to
/// create databases; without that right the error is PostgreSQL's
/// refusal. See [`create_database_if_missing`].
///
/// ```no_run
/// let config = workflow_db::Config::from_env()?;
/// let applied = workflow_db::run_pending_migrations(&config)?;
/// println!("{} migration(s) applied", applied.len());
/// # Ok::<(), workflow_db::Error>(())
/// ```
pub fn run_pending_migrations(config: &crate::Config) -> Result<Vec<AppliedMigration>> {
    ensure_database(&config.database_url)?;
    Migrator::new(config.database_url.clone())
        .environment(config.environment.clone())
        .run(|event| tracing::info!(?event, "migration"))
}

/// Makes sure the database of `url` exists: connects to it, and only when
/// that fails tries [`create_database_if_missing`] (so the boot of a
/// service whose database exists never needs the `postgres` database nor
/// the right to create one). Whatever the reason of the first failure, the
/// database being there afterwards settles it; otherwise the more telling
/// error is returned: the creation's (no right to create databases), or the
/// first connection's when the server could not be reached at all.
fn ensure_database(url: &DatabaseUrl) -> Result<()> {
    let Err(first) = connect(url) else {
        return Ok(());
    };
    match create_database_if_missing(url) {
        Ok(true) => {
            tracing::info!(target = %url.target(), "created database");
            Ok(())
        }
        // It exists (perhaps created meanwhile by another instance): the
        // migrator reports whatever prevents connecting to it.
        Ok(false) => Ok(()),
        Err(Error::Connection { .. }) => Err(first),
        Err(e) => Err(e),
    }
}

#[derive(QueryableByName)]
struct Applied {
    #[diesel(sql_type = Text)]
    version: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    run_on: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    checksum: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    duration_ms: Option<i64>,
}

#[derive(QueryableByName)]
struct OptText {
    #[diesel(sql_type = Nullable<Text>)]
    value: Option<String>,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    value: bool,
}

/// What the database records about migrations.
struct State {
    bookkeeping: bool,
    applied: BTreeMap<String, Applied>,
    stamp: Option<String>,
}

pub(crate) const BOOKKEEPING_SQL: &str = "
CREATE TABLE IF NOT EXISTS public.__workflow_db_migrations (
    version     text        PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms bigint      NOT NULL
);
COMMENT ON TABLE public.__workflow_db_migrations IS 'workflow-db migrator: checksum and duration of each applied migration.';
CREATE TABLE IF NOT EXISTS public.__workflow_db_metadata (
    key        text        PRIMARY KEY,
    value      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE public.__workflow_db_metadata IS 'workflow-db: facts the database remembers about itself, such as the environment it belongs to.';
";

fn read_state(conn: &mut PgConnection) -> Result<State> {
    let exists = |conn: &mut PgConnection, table: &str| -> QueryResult<bool> {
        diesel::sql_query("SELECT to_regclass($1) IS NOT NULL AS value")
            .bind::<Text, _>(table)
            .get_result::<Flag>(conn)
            .map(|f| f.value)
    };
    let diesel_table = exists(conn, "public.__diesel_schema_migrations")?;
    let bookkeeping = exists(conn, "public.__workflow_db_migrations")?
        && exists(conn, "public.__workflow_db_metadata")?;
    let applied: Vec<Applied> = match (diesel_table, bookkeeping) {
        (false, _) => Vec::new(),
        (true, false) => diesel::sql_query(
            "SELECT version::text AS version, run_on::timestamptz AS run_on, \
             NULL::text AS checksum, NULL::bigint AS duration_ms FROM public.__diesel_schema_migrations",
        )
        .load(conn)?,
        (true, true) => diesel::sql_query(
            "SELECT d.version::text AS version, d.run_on::timestamptz AS run_on, w.checksum, w.duration_ms \
             FROM public.__diesel_schema_migrations d LEFT JOIN public.__workflow_db_migrations w ON w.version = d.version",
        )
        .load(conn)?,
    };
    let stamp = if bookkeeping {
        diesel::sql_query(
            "SELECT value FROM public.__workflow_db_metadata WHERE key = 'environment'",
        )
        .get_result::<OptText>(conn)
        .optional()?
        .and_then(|r| r.value)
    } else {
        None
    };
    Ok(State {
        bookkeeping,
        applied: applied
            .into_iter()
            .map(|a| (a.version.clone(), a))
            .collect(),
        stamp,
    })
}

/// Reads the environment stamp of the database (None when it has none).
pub fn environment_stamp(conn: &mut PgConnection) -> Result<Option<String>> {
    Ok(read_state(conn)?.stamp)
}

impl State {
    fn verify_checksums(&self) -> Result<()> {
        for source in SOURCES {
            if let Some(Applied {
                checksum: Some(recorded),
                ..
            }) = self.applied.get(source.version)
            {
                let embedded = source.checksum();
                if *recorded != embedded {
                    return Err(Error::MigrationChecksumMismatch {
                        version: source.version.to_owned(),
                        recorded: recorded.clone(),
                        embedded,
                    });
                }
            }
        }
        Ok(())
    }

    fn pending(&self) -> Vec<&'static MigrationSql> {
        SOURCES
            .iter()
            .filter(|s| !self.applied.contains_key(s.version))
            .collect()
    }

    fn unknown_applied(&self) -> Vec<String> {
        self.applied
            .keys()
            .filter(|v| !SOURCES.iter().any(|s| s.version == v.as_str()))
            .cloned()
            .collect()
    }

    fn out_of_order(&self) -> Result<()> {
        let Some(newest) = self.applied.keys().max() else {
            return Ok(());
        };
        let versions: Vec<String> = self
            .pending()
            .iter()
            .filter(|s| s.version < newest.as_str())
            .map(|s| s.version.to_owned())
            .collect();
        if versions.is_empty() {
            Ok(())
        } else {
            Err(Error::OutOfOrderMigrations {
                versions,
                newest_applied: newest.clone(),
            })
        }
    }

    /// The stamp to write, if any: none yet, or ours is production and the stamp is not.
    fn stamp_change(&self, ours: &Environment) -> Option<String> {
        match &self.stamp {
            None => Some(ours.as_str().to_owned()),
            Some(s) if ours.is_production() && !Environment::from_name(s).is_production() => {
                Some(ours.as_str().to_owned())
            }
            Some(_) => None,
        }
    }
}

impl Migrator {
    /// A migrator for the database at `url`, in the development environment,
    /// waiting at most [`DEFAULT_LOCK_TIMEOUT`] for the lock.
    pub fn new(url: DatabaseUrl) -> Self {
        Migrator {
            url,
            environment: Environment::Development,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            ddl_lock_timeout: DEFAULT_DDL_LOCK_TIMEOUT,
            allow_out_of_order: false,
        }
    }

    /// The environment to stamp into the database.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = environment;
        self
    }

    /// How long to wait for another migrator's lock before giving up.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// PostgreSQL `lock_timeout` for the statements of each migration: a
    /// migration that waits longer for a table lock fails (and is rolled back)
    /// instead of queueing every query of the live service behind it.
    pub fn ddl_lock_timeout(mut self, timeout: Duration) -> Self {
        self.ddl_lock_timeout = timeout;
        self
    }

    /// Apply pending migrations older than the newest applied one (two
    /// branches merged) instead of refusing.
    pub fn allow_out_of_order(mut self, allow: bool) -> Self {
        self.allow_out_of_order = allow;
        self
    }

    /// The database this migrator works on.
    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    /// Opens the migrator's dedicated connection.
    pub fn connect(&self) -> Result<PgConnection> {
        connect_as(&self.url, MIGRATOR_APPLICATION_NAME)
    }

    /// Applies every pending migration (see the module docs), reporting
    /// progress to `on_event`. Returns the migrations applied, oldest first;
    /// empty when there was nothing to do.
    pub fn run(&self, mut on_event: impl FnMut(&MigrationEvent)) -> Result<Vec<AppliedMigration>> {
        let mut conn = self.connect()?;
        let state = read_state(&mut conn)?;
        state.verify_checksums()?;
        for version in state.unknown_applied() {
            on_event(&MigrationEvent::UnknownApplied { version });
        }
        if !self.allow_out_of_order {
            state.out_of_order()?;
        }
        let pending = state.pending();
        let stamp_change = state.stamp_change(&self.environment);
        if pending.is_empty() && state.bookkeeping && stamp_change.is_none() {
            self.report_kept_stamp(&state, &mut on_event);
            return Ok(Vec::new());
        }

        self.lock(&mut conn, &mut on_event)?;
        let result = self.run_locked(&mut conn, &mut on_event);
        // Closing the connection would release the lock too; unlock explicitly
        // so a caller keeping nothing open sees it free at once.
        let _ = diesel::sql_query("SELECT pg_advisory_unlock($1, $2)")
            .bind::<Integer, _>(LOCK_NAMESPACE)
            .bind::<Integer, _>(MIGRATION_LOCK)
            .execute(&mut conn);
        result
    }

    fn report_kept_stamp(&self, state: &State, on_event: &mut impl FnMut(&MigrationEvent)) {
        if let Some(stamp) = &state.stamp {
            if stamp != self.environment.as_str() {
                on_event(&MigrationEvent::StampKept {
                    stamp: stamp.clone(),
                    ours: self.environment.as_str().to_owned(),
                });
            }
        }
    }

    fn lock(
        &self,
        conn: &mut PgConnection,
        on_event: &mut impl FnMut(&MigrationEvent),
    ) -> Result<()> {
        let start = Instant::now();
        let mut reported: Option<String> = None;
        loop {
            let got = diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS value")
                .bind::<Integer, _>(LOCK_NAMESPACE)
                .bind::<Integer, _>(MIGRATION_LOCK)
                .get_result::<Flag>(conn)?
                .value;
            if got {
                on_event(&MigrationEvent::LockAcquired);
                return Ok(());
            }
            let holder = lock_holder(conn)?.unwrap_or_else(|| "another session".into());
            if start.elapsed() >= self.lock_timeout {
                return Err(Error::MigrationLockTimeout {
                    waited: start.elapsed(),
                    holder,
                });
            }
            if reported.as_ref() != Some(&holder) {
                on_event(&MigrationEvent::WaitingForLock {
                    holder: holder.clone(),
                });
                reported = Some(holder);
            }
            std::thread::sleep(Duration::from_millis(50).min(self.lock_timeout));
        }
    }

    fn run_locked(
        &self,
        conn: &mut PgConnection,
        on_event: &mut impl FnMut(&MigrationEvent),
    ) -> Result<Vec<AppliedMigration>> {
        conn.batch_execute(BOOKKEEPING_SQL)?;
        diesel::migration::MigrationConnection::setup(conn)?;
        conn.batch_execute(&format!(
            "SET lock_timeout = {}",
            self.ddl_lock_timeout.as_millis().max(1)
        ))?;
        // Another instance may have migrated while we waited: decide again.
        let state = read_state(conn)?;
        state.verify_checksums()?;
        if !self.allow_out_of_order {
            state.out_of_order()?;
        }
        // Backfill checksums of migrations applied by other tools (diesel CLI).
        for source in SOURCES {
            if matches!(
                state.applied.get(source.version),
                Some(Applied { checksum: None, .. })
            ) {
                record(conn, source, None)?;
            }
        }
        let embedded =
            MigrationSource::<Pg>::migrations(&MIGRATIONS).map_err(|e| Error::Migration {
                version: "(embedded)".into(),
                message: e.to_string(),
            })?;
        let mut applied = Vec::new();
        for source in state.pending() {
            let migration = embedded
                .iter()
                .find(|m| m.name().version().to_string() == source.version)
                .ok_or_else(|| Error::Migration {
                    version: source.version.into(),
                    message: "embedded by build.rs but not by diesel (missing up.sql?)".into(),
                })?;
            on_event(&MigrationEvent::Applying {
                version: source.version.into(),
                name: source.name.into(),
            });
            let start = Instant::now();
            let fail = |e: &dyn std::fmt::Display| Error::Migration {
                version: source.version.into(),
                message: e.to_string(),
            };
            if migration.metadata().run_in_transaction() {
                conn.transaction::<_, Error, _>(|conn| {
                    conn.run_migration(migration).map_err(|e| fail(&e))?;
                    record(conn, source, Some(start.elapsed()))
                })?;
            } else {
                // A failed CREATE INDEX CONCURRENTLY leaves an INVALID index
                // that a retry's IF NOT EXISTS would silently accept: refuse
                // to run (or record) while one exists.
                refuse_invalid_indexes(conn, source.version)?;
                conn.run_migration(migration).map_err(|e| fail(&e))?;
                refuse_invalid_indexes(conn, source.version)?;
                record(conn, source, Some(start.elapsed()))?;
            }
            let done = AppliedMigration {
                version: source.version.into(),
                name: source.name.into(),
                duration: start.elapsed(),
            };
            on_event(&MigrationEvent::Applied(done.clone()));
            applied.push(done);
        }
        if let Some(to) = state.stamp_change(&self.environment) {
            write_stamp(conn, &to)?;
            on_event(&MigrationEvent::Stamped {
                from: state.stamp.clone(),
                to,
            });
        } else {
            self.report_kept_stamp(&state, on_event);
        }
        Ok(applied)
    }

    /// Every migration, embedded or applied, with its state.
    pub fn status(&self) -> Result<Vec<MigrationStatus>> {
        let mut conn = self.connect()?;
        let state = read_state(&mut conn)?;
        let mut out: Vec<MigrationStatus> = SOURCES
            .iter()
            .map(|s| {
                let applied = state.applied.get(s.version);
                MigrationStatus {
                    version: s.version.into(),
                    name: Some(s.name.into()),
                    applied: applied.is_some(),
                    applied_at: applied.and_then(|a| a.run_on),
                    duration_ms: applied.and_then(|a| a.duration_ms),
                    checksum_ok: applied
                        .and_then(|a| a.checksum.as_ref())
                        .map(|c| *c == s.checksum()),
                }
            })
            .collect();
        for version in state.unknown_applied() {
            let a = &state.applied[&version];
            out.push(MigrationStatus {
                version: version.clone(),
                name: None,
                applied: true,
                applied_at: a.run_on,
                duration_ms: a.duration_ms,
                checksum_ok: None,
            });
        }
        out.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(out)
    }
}

fn record(conn: &mut PgConnection, source: &MigrationSql, took: Option<Duration>) -> Result<()> {
    diesel::sql_query(
        "INSERT INTO public.__workflow_db_migrations (version, name, checksum, duration_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (version) DO NOTHING",
    )
    .bind::<Text, _>(source.version)
    .bind::<Text, _>(source.name)
    .bind::<Text, _>(source.checksum())
    .bind::<BigInt, _>(took.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    .execute(conn)?;
    Ok(())
}

/// Writes the environment stamp. Callers decide whether lowering is allowed.
pub(crate) fn write_stamp(conn: &mut PgConnection, environment: &str) -> Result<()> {
    conn.batch_execute(BOOKKEEPING_SQL)?;
    diesel::sql_query(
        "INSERT INTO public.__workflow_db_metadata (key, value) VALUES ('environment', $1) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
    )
    .bind::<Text, _>(environment)
    .execute(conn)?;
    Ok(())
}

/// Fails, naming them, when `public` has indexes left INVALID by a failed
/// concurrent build.
fn refuse_invalid_indexes(conn: &mut PgConnection, version: &str) -> Result<()> {
    #[derive(QueryableByName)]
    struct Invalid {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let invalid: Vec<Invalid> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND NOT i.indisvalid ORDER BY 1",
    )
    .load(conn)?;
    if invalid.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = invalid.into_iter().map(|i| i.name).collect();
    Err(Error::Migration {
        version: version.to_owned(),
        message: format!(
            "index(es) {} are INVALID (a concurrent index build failed or was cancelled); fix the cause \
             (e.g. duplicate rows for a unique index), run DROP INDEX CONCURRENTLY on each, then migrate again",
            names.join(", ")
        ),
    })
}

/// Who holds the migration lock on this database, if anyone.
fn lock_holder(conn: &mut PgConnection) -> Result<Option<String>> {
    Ok(diesel::sql_query(
        "SELECT format('%s (pid %s, %s, connected since %s)', \
                coalesce(nullif(a.application_name, ''), 'unnamed client'), a.pid, \
                coalesce(host(a.client_addr), 'local socket'), date_trunc('second', a.backend_start)) AS value \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::oid AND l.objid = $2::oid \
           AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         LIMIT 1",
    )
    .bind::<Integer, _>(LOCK_NAMESPACE)
    .bind::<Integer, _>(MIGRATION_LOCK)
    .get_result::<OptText>(conn)
    .optional()?
    .and_then(|r| r.value))
}

/// Creates the database named in `url` if it does not exist, connecting to the
/// server's `postgres` database (or `template1`). Returns whether it was created.
pub fn create_database_if_missing(url: &DatabaseUrl) -> Result<bool> {
    let name = url.database();
    // The maintenance database; when both fail, the first error is the one to show.
    let mut admin = connect(&url.with_database("postgres"))
        .or_else(|first| connect(&url.with_database("template1")).map_err(|_| first))?;
    let exists =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS value")
            .bind::<Text, _>(&name)
            .get_result::<Flag>(&mut admin)?
            .value;
    if exists {
        return Ok(false);
    }
    match admin.batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name))) {
        Ok(()) => Ok(true),
        // Another migrator created it in the meantime: whatever the error's
        // wording (lc_messages) or kind, the database now being there settles it.
        Err(e @ diesel::result::Error::DatabaseError(..)) if connect(url).is_ok() => {
            tracing::debug!(error = %e, "database created concurrently");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Quotes an SQL identifier (doubles embedded quotes).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What `db-migrate --check` found; [`CheckReport::is_clean`] when nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Embedded migrations not applied yet.
    pub pending: Vec<String>,
    /// Pending migrations older than the newest applied one.
    pub out_of_order: Vec<String>,
    /// Applied migrations whose SQL was edited since.
    pub edited: Vec<String>,
    /// Applied migrations this build does not know.
    pub unknown_applied: Vec<String>,
    /// Catalog differences between the live database and a fresh migration
    /// (`+` only live, `-` missing live); compared only when nothing is pending.
    pub drift: Vec<String>,
}

impl CheckReport {
    /// Whether the database is exactly what the embedded migrations produce.
    pub fn is_clean(&self) -> bool {
        self.pending.is_empty()
            && self.edited.is_empty()
            && self.unknown_applied.is_empty()
            && self.drift.is_empty()
    }
}

impl Migrator {
    /// Compares the database with the embedded migrations without changing
    /// anything: pending, out-of-order, edited and unknown migrations, and the
    /// live catalog against [`crate::catalog::EXPECTED`].
    pub fn check(&self) -> Result<CheckReport> {
        let mut conn = self.connect()?;
        let state = read_state(&mut conn)?;
        let mut report = CheckReport {
            pending: state.pending().iter().map(|s| s.version.to_owned()).collect(),
            out_of_order: match state.out_of_order() {
                Err(Error::OutOfOrderMigrations { versions, .. }) => versions,
                _ => Vec::new(),
            },
            edited: SOURCES
                .iter()
                .filter(|s| {
                    matches!(state.applied.get(s.version), Some(Applied { checksum: Some(c), .. }) if *c != s.checksum())
                })
                .map(|s| s.version.to_owned())
                .collect(),
            unknown_applied: state.unknown_applied(),
            drift: Vec::new(),
        };
        if report.pending.is_empty() {
            let live = crate::catalog::snapshot(&mut conn)?;
            report.drift = crate::catalog::diff(&crate::catalog::expected(), &live);
        }
        Ok(report)
    }

    /// The live catalog snapshot of the database (see [`crate::catalog`]).
    pub fn catalog(&self) -> Result<Vec<String>> {
        crate::catalog::snapshot(&mut self.connect()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_crlf_but_not_content() {
        let lf = "CREATE TABLE t (id int);\nCOMMENT ON TABLE t IS 'x';\n";
        assert_eq!(checksum(lf), checksum(&lf.replace('\n', "\r\n")));
        assert_ne!(checksum(lf), checksum(&lf.replace("int", "bigint")));
        assert_eq!(checksum(lf).len(), 64);
    }

    #[test]
    fn sources_match_diesels_embedded_migrations() {
        let embedded = MigrationSource::<Pg>::migrations(&MIGRATIONS).unwrap();
        let versions: Vec<String> = embedded
            .iter()
            .map(|m| m.name().version().to_string())
            .collect();
        let ours: Vec<&str> = SOURCES.iter().map(|s| s.version).collect();
        assert_eq!(versions, ours);
        assert!(SOURCES.windows(2).all(|w| w[0].version < w[1].version));
    }
}
