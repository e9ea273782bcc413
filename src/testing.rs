//! A fresh, migrated database per test (feature `test-utils`), and the
//! crate's one scheme for throwaway databases.
//!
//! The first [`TestDatabase::new`] on a server builds a template database
//! migrated with this build's migrations (named after their checksum, so a
//! changed migration gets a new template); every test database is a
//! `CREATE DATABASE .. TEMPLATE .. STRATEGY FILE_COPY` clone of it (a few
//! milliseconds) and is dropped when the value is dropped. Tests therefore run
//! in parallel, each on its own database.
//!
//! **Throwaway databases.** Everything in this repository that makes a
//! database only to drop it again (the tests, the benchmark, the migration
//! gate's scratch databases in `bin/check-schema`) names it
//! `workflow_db_tmp_<purpose>_<unix seconds>_<pid>_<n>` ([`throwaway_name`];
//! purposes `test`, `bench`, `gate`) and drops it when done. Whatever a
//! crashed run left behind is swept by the next [`TestDatabase`] creation on
//! the server: a throwaway database older than an hour that nobody is
//! connected to (a plain `DROP DATABASE`, which PostgreSQL refuses while a
//! session is connected, so a long benchmark is never swept from under
//! itself).
//!
//! The server comes from `TEST_DATABASE_URL`, else `DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/postgres`. This module reads the
//! process environment only; load `.env` in your tests if you use one.
//!
//! ```no_run
//! let db = workflow_db::testing::TestDatabase::new();
//! let mut conn = db.connect();
//! let workflows = workflow_db::Workflow::list(&mut conn, None, 10)?;
//! assert!(workflows.is_empty());
//! # Ok::<(), diesel::result::Error>(())
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};

use crate::config::{Config, DatabaseUrl, Environment};
use crate::error::{GuardRule, Result};
use crate::migrate::{self, LOCK_NAMESPACE, Migrator, quote_ident};
use crate::pool::{PgPool, build_pool, connect};

/// Prefix of every throwaway database's name (see [`throwaway_name`]).
pub const THROWAWAY_PREFIX: &str = "workflow_db_tmp_";
const TEMPLATE_PREFIX: &str = "workflow_db_template_";
const TEMPLATE_LOCK: i32 = 2;
const STALE_AFTER_SECS: u64 = 3600;
const LOCAL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The name of a new throwaway database:
/// `workflow_db_tmp_<purpose>_<unix seconds>_<pid>_<n>`, unique on a server
/// for this process. `purpose` says who made it (`test`, `bench`, ...): ASCII
/// lower-case letters and digits only, so that the name parses back.
///
/// ```
/// let name = workflow_db::testing::throwaway_name("bench");
/// assert!(name.starts_with("workflow_db_tmp_bench_"));
/// ```
pub fn throwaway_name(purpose: &str) -> String {
    debug_assert!(
        !purpose.is_empty()
            && purpose
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "purpose must be [a-z0-9]+"
    );
    format!(
        "{THROWAWAY_PREFIX}{purpose}_{}_{}_{}",
        unix_now(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A database of its own for one test (or benchmark), dropped on `Drop`.
#[derive(Debug)]
pub struct TestDatabase {
    url: DatabaseUrl,
    admin: DatabaseUrl,
    name: String,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    datname: String,
}

/// The server the tests use: `TEST_DATABASE_URL`, `DATABASE_URL` or the local default.
pub fn server_url() -> Result<DatabaseUrl> {
    let raw = std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| LOCAL_DEFAULT.to_owned());
    DatabaseUrl::parse(&raw)
}

fn hint(e: &crate::Error) -> &'static str {
    match e {
        crate::Error::Connection { .. } => {
            "\nNo PostgreSQL answers: start one with `bin/dev-db` (it prints a URL) \
             and export TEST_DATABASE_URL or DATABASE_URL."
        }
        _ => "",
    }
}

fn template_name() -> String {
    let all: String = migrate::sources().iter().map(|s| s.checksum()).collect();
    format!("{TEMPLATE_PREFIX}{}", &migrate::checksum(&all)[..16])
}

impl TestDatabase {
    /// A fresh migrated database. Panics, saying how to start a server, when none answers.
    pub fn new() -> TestDatabase {
        match Self::try_new() {
            Ok(db) => db,
            Err(e) => panic!("cannot create a test database: {}{}", chain(&e), hint(&e)),
        }
    }

    /// A fresh migrated database, or the error that prevented it.
    pub fn try_new() -> Result<TestDatabase> {
        Self::create("test", true)
    }

    /// A fresh, empty database (no migrations applied), for testing migrations themselves.
    pub fn empty() -> TestDatabase {
        match Self::create("test", false) {
            Ok(db) => db,
            Err(e) => panic!("cannot create a test database: {}{}", chain(&e), hint(&e)),
        }
    }

    /// A fresh migrated throwaway database for another `purpose` than a
    /// test (`"bench"`, ...), named and swept like the tests' (see the module
    /// docs).
    pub fn throwaway(purpose: &str) -> Result<TestDatabase> {
        Self::create(purpose, true)
    }

    fn create(purpose: &str, migrated: bool) -> Result<TestDatabase> {
        // The harness creates and force-drops databases: never where the
        // environment says production.
        let environment = Environment::from_lookup(|var| std::env::var(var).ok());
        if environment.is_production() {
            return Err(crate::Error::ProtectedEnvironment {
                rule: GuardRule::EnvironmentIsProduction,
                message: "the test harness creates and drops databases; it does not run where \
                          APP_ENV, RUST_ENV or NODE_ENV says production"
                    .into(),
            });
        }
        let admin = server_url()?.with_database("postgres");
        let mut conn = connect(&admin)?;
        sweep_stale(&mut conn)?;
        let name = throwaway_name(purpose);
        if migrated {
            let template = ensure_template(&mut conn, &admin)?;
            clone_database(&mut conn, &template, &name)?;
        } else {
            conn.batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))?;
        }
        Ok(TestDatabase {
            url: admin.with_database(&name),
            admin,
            name,
        })
    }

    /// Keeps the database instead of dropping it (to inspect it after a
    /// benchmark, say) and returns its name. It is still a throwaway
    /// database: once it is an hour old and nobody is connected, the next
    /// [`TestDatabase`] on the server sweeps it.
    pub fn keep(self) -> String {
        let this = std::mem::ManuallyDrop::new(self);
        this.name.clone()
    }

    /// The database's URL.
    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to the database. Panics if it cannot connect.
    pub fn connect(&self) -> PgConnection {
        match connect(&self.url) {
            Ok(conn) => conn,
            Err(e) => panic!(
                "cannot connect to test database {}: {}",
                self.name,
                chain(&e)
            ),
        }
    }

    /// A configuration pointing at the database, in the test environment.
    pub fn config(&self) -> Config {
        let mut config = Config::new(self.url.clone());
        config.environment = Environment::Test;
        config
    }

    /// A pool of connections to the database. Panics if it cannot connect.
    pub fn pool(&self) -> PgPool {
        match build_pool(&self.config()) {
            Ok(pool) => pool,
            Err(e) => panic!(
                "cannot build a pool for test database {}: {}",
                self.name,
                chain(&e)
            ),
        }
    }
}

impl Default for TestDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut conn) = connect(&self.admin) {
            let _ = conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&self.name)
            ));
        }
    }
}

/// Builds the template for this build's migrations once per server, under an
/// advisory lock so that parallel test processes build it once.
fn ensure_template(conn: &mut PgConnection, admin: &DatabaseUrl) -> Result<String> {
    let template = template_name();
    if database_exists(conn, &template)? {
        return Ok(template);
    }
    diesel::sql_query("SELECT pg_advisory_lock($1, $2)")
        .bind::<Integer, _>(LOCK_NAMESPACE)
        .bind::<Integer, _>(TEMPLATE_LOCK)
        .execute(conn)?;
    let result = (|| {
        if database_exists(conn, &template)? {
            return Ok(());
        }
        // Build under another name and rename: a template that exists is complete.
        let building = format!("{template}_building");
        conn.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&building)
        ))?;
        conn.batch_execute(&format!("CREATE DATABASE {}", quote_ident(&building)))?;
        Migrator::new(admin.with_database(&building))
            .environment(Environment::Test)
            .run(|_| {})?;
        conn.batch_execute(&format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(&building),
            quote_ident(&template)
        ))?;
        Ok(())
    })();
    diesel::sql_query("SELECT pg_advisory_unlock($1, $2)")
        .bind::<Integer, _>(LOCK_NAMESPACE)
        .bind::<Integer, _>(TEMPLATE_LOCK)
        .execute(conn)?;
    result.map(|()| template)
}

fn clone_database(conn: &mut PgConnection, template: &str, name: &str) -> Result<()> {
    let sql = format!(
        "CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY",
        quote_ident(name),
        quote_ident(template)
    );
    // Cloning fails while another session is connected to the template; that
    // is rare (only the builder connects) and brief, so retry a little.
    let mut attempt = 0;
    loop {
        match conn.batch_execute(&sql) {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 50 && e.to_string().contains("being accessed by other users") => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn database_exists(conn: &mut PgConnection, name: &str) -> Result<bool> {
    Ok(
        diesel::sql_query("SELECT datname FROM pg_database WHERE datname = $1")
            .bind::<Text, _>(name)
            .load::<Name>(conn)?
            .len()
            == 1,
    )
}

/// Drops throwaway databases left by crashed runs: older than
/// [`STALE_AFTER_SECS`] (their name carries their creation time) and nobody
/// connected (a plain `DROP DATABASE` fails while anyone is, and that failure
/// is ignored: the owner is alive).
fn sweep_stale(conn: &mut PgConnection) -> Result<()> {
    let now = unix_now();
    let names: Vec<Name> =
        diesel::sql_query("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind::<Text, _>(THROWAWAY_PREFIX)
            .load(conn)?;
    for Name { datname } in names {
        if created_at(&datname).is_some_and(|t| t + STALE_AFTER_SECS < now) {
            let _ = conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {}",
                quote_ident(&datname)
            ));
        }
    }
    Ok(())
}

/// The creation time in a [`throwaway_name`].
fn created_at(name: &str) -> Option<u64> {
    let mut fields = name.strip_prefix(THROWAWAY_PREFIX)?.split('_');
    let _purpose = fields.next()?;
    fields.next()?.parse().ok()
}

/// An error with its sources, `: `-separated (what anyhow's `{:#}` prints).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throwaway_names_parse_back_and_are_unique() {
        let a = throwaway_name("bench");
        let b = throwaway_name("bench");
        assert_ne!(a, b);
        assert!(
            a.len() <= 63,
            "PostgreSQL truncates names beyond 63 bytes: {a}"
        );
        let t = created_at(&a).unwrap();
        assert!(t.abs_diff(unix_now()) < 60);
        assert_eq!(
            created_at("workflow_db_tmp_gate_1700000000_42_0"),
            Some(1_700_000_000)
        );
        assert_eq!(created_at("workflow_db_bench"), None);
        assert_eq!(created_at("workflow_db_tmp_gate_x_42_0"), None);
    }
}
