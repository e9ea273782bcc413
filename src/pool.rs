//! Connections: the r2d2 pool and single connections, both opened with the
//! crate's settings.
//!
//! Every connection the crate opens goes through this module, so every one
//! reports an `application_name` in `pg_stat_activity` (the URL's own, else
//! [`APPLICATION_NAME`] or the caller's name, such as the migrator's) and has
//! a libpq `connect_timeout` (the URL's own, else the configured one). Errors
//! name the target, never the password.
//!
//! Every one is also [prepared](prepare_connection) right after it opens: it
//! looks up the type oids of the crate's Postgres enums once, so that a
//! connection that breaks later reports a broken connection
//! ([`Error::is_connection_error`](crate::Error::is_connection_error)) and
//! not "Failed to find a type oid for `step_status`", and it warns once per
//! process (a `tracing` warning) when the server translates its messages,
//! which [`Error::sqlstate`](crate::Error::sqlstate) needs in English.

use std::sync::Once;
use std::time::Duration;

use diesel::pg::PgMetadataLookup;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PooledConnection};
use diesel::sql_types::{Bool, Text};

use crate::config::{Config, DEFAULT_CONNECT_TIMEOUT, DatabaseUrl};
use crate::error::{Error, Result};

/// A pool of PostgreSQL connections.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;
/// A connection checked out of a [`PgPool`]; derefs to `PgConnection`.
pub type PooledConn = PooledConnection<ConnectionManager<PgConnection>>;

/// The `application_name` connections report in `pg_stat_activity`, unless the URL sets one.
pub const APPLICATION_NAME: &str = "workflow-db";

/// Builds the pool: `pool_size` connections at most, idle ones above one closed
/// after `idle_timeout`, `connect_timeout` both for libpq's connect and for
/// waiting on a free connection. Connections set `application_name`.
///
/// Checkouts are not pinged (`test_on_check_out = false`): the benchmark
/// measured 31,032 checkouts/s with the ping against 4.25 M/s without (one
/// extra round trip on operations of one to four), and Diesel's manager
/// already discards a connection an error left broken, so a dead connection
/// costs the one query that fails instead of a ping on every checkout. (Not
/// quite always: Diesel 2.3 does not flag a connection that broke while a
/// statement was being prepared; [`ping`] it after a connection error.)
///
/// Each new connection is [prepared](prepare_connection) before the pool
/// hands it out.
///
/// Fails (without printing the password) when no connection can be opened
/// within `connect_timeout`.
pub fn build_pool(config: &Config) -> Result<PgPool> {
    let url = with_settings(
        &config.database_url,
        APPLICATION_NAME,
        config.connect_timeout,
    );
    let manager = ConnectionManager::<PgConnection>::new(url.expose());
    let pool = Pool::builder()
        .max_size(config.pool_size)
        .min_idle(Some(1))
        .idle_timeout(Some(config.idle_timeout))
        .connection_timeout(config.connect_timeout)
        .test_on_check_out(false)
        .connection_customizer(Box::new(Prepare))
        .build(manager)?;
    Ok(pool)
}

/// Opens one connection to `url` outside any pool (admin tools, seeding,
/// tests), as [`APPLICATION_NAME`] with the default connect timeout.
pub fn connect(url: &DatabaseUrl) -> Result<PgConnection> {
    connect_as(url, APPLICATION_NAME)
}

/// Opens one connection to `url` reporting `application_name` (unless the
/// URL sets one), so that whoever looks at `pg_stat_activity` (or waits for
/// a lock it holds) sees who it is. The error names the target, never the
/// password. The connection is [prepared](prepare_connection).
pub fn connect_as(url: &DatabaseUrl, application_name: &str) -> Result<PgConnection> {
    let url = with_settings(url, application_name, DEFAULT_CONNECT_TIMEOUT);
    let mut conn = PgConnection::establish(url.expose()).map_err(|source| Error::Connection {
        target: url.target(),
        source: redact_connection_error(source, &url),
    })?;
    prepare_connection(&mut conn)?;
    Ok(conn)
}

/// The crate's Postgres enums, as Diesel looks them up (by name, through
/// the `search_path`).
const ENUM_TYPES: [&str; 2] = ["execution_status", "step_status"];

/// Prepares a connection the crate did not open itself (the crate's own
/// [`connect`], [`connect_as`] and [`build_pool`] do this already): caches the
/// type oids of the crate's enums in it, and checks the server's message
/// language. One round trip, three where the database is migrated.
///
/// **Why.** Diesel looks a custom type's oid up by name the first time a
/// query binds a value of it (a status filter, a status update) and keeps
/// it for the connection's life. When that lookup fails, Diesel drops the
/// reason and the query fails with "Failed to find a type oid for
/// `step_status`" (a `SerializationError`), whatever happened: so the first
/// status query after a connection broke would report a missing type
/// instead of the broken connection. With the oids cached, that query is
/// sent, and fails as a broken connection does.
///
/// In a database without the crate's types (not migrated yet) nothing is
/// cached and nothing fails; Diesel then looks them up on first use as
/// usual. The oids stay cached for the connection's life: a connection that
/// outlives a `DROP TYPE` of the crate's enums (reverting every migration,
/// `db-reset`) must be reopened before it binds a status, as with Diesel's
/// own cache.
///
/// **Message language.** [`Error::sqlstate`](crate::Error::sqlstate)
/// recognises deadlocks and lock timeouts by PostgreSQL's English message
/// (Diesel does not keep the SQLSTATE). When the server's `lc_messages`
/// names another language, this logs one `tracing` warning per process;
/// set `lc_messages` to `C` or an English locale in the server's
/// configuration, or for the role (`ALTER ROLE .. SET lc_messages = 'C'`,
/// as a superuser: the setting is superuser-only, so the crate cannot set it
/// on its connections).
pub fn prepare_connection(conn: &mut PgConnection) -> QueryResult<()> {
    #[derive(QueryableByName)]
    struct Facts {
        #[diesel(sql_type = Bool)]
        execution_status: bool,
        #[diesel(sql_type = Bool)]
        step_status: bool,
        #[diesel(sql_type = Text)]
        lc_messages: String,
    }
    let facts: Facts = diesel::sql_query(
        "SELECT to_regtype('execution_status') IS NOT NULL AS execution_status, \
                to_regtype('step_status') IS NOT NULL AS step_status, \
                current_setting('lc_messages') AS lc_messages",
    )
    .get_result(conn)?;
    if !messages_are_english(&facts.lc_messages) {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                lc_messages = %facts.lc_messages,
                "PostgreSQL may send translated messages: Error::sqlstate() and \
                 Error::is_retryable() will not recognise deadlocks and lock timeouts; \
                 set lc_messages to 'C' on the server or for the role"
            );
        });
    }
    for (name, exists) in ENUM_TYPES
        .into_iter()
        .zip([facts.execution_status, facts.step_status])
    {
        if exists && conn.lookup_type(name, None).oid().is_err() {
            // Diesel dropped the reason: a round trip reports a broken
            // connection; otherwise Diesel looks the type up again on first use.
            ping(conn)?;
        }
    }
    Ok(())
}

/// Checks that the connection still works, with one round trip (`SELECT 1`
/// as a simple query), and makes sure a broken one is known to be broken.
///
/// Call it on a pooled connection after an operation on it failed with
/// [`Error::is_connection_error`](crate::Error::is_connection_error), before
/// returning it to the pool. The pool discards a connection Diesel flags as
/// broken, but Diesel 2.3 does not flag one that broke while a statement
/// was being prepared (the first run of a Diesel DSL query on that
/// connection): the pool would hand that dead connection out again, and the
/// next operation would fail with "no connection to the server". A failed
/// simple query always flags it.
pub fn ping(conn: &mut PgConnection) -> QueryResult<()> {
    diesel::connection::SimpleConnection::batch_execute(conn, "SELECT 1")
}

/// Whether PostgreSQL sends its messages in English under this
/// `lc_messages` (`C`, `POSIX`, `en_*`; empty means the server's
/// environment, which cannot be told and is not warned about).
fn messages_are_english(lc_messages: &str) -> bool {
    let lc = lc_messages.trim();
    lc.is_empty()
        || lc == "C"
        || lc == "POSIX"
        || lc.starts_with("C.")
        || lc.starts_with("en_")
        || lc.starts_with("en.")
        || lc == "en"
        || lc.starts_with("English")
}

/// [`prepare_connection`] for every connection the pool opens.
#[derive(Debug, Clone, Copy)]
struct Prepare;

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for Prepare {
    fn on_acquire(&self, conn: &mut PgConnection) -> std::result::Result<(), diesel::r2d2::Error> {
        prepare_connection(conn).map_err(diesel::r2d2::Error::QueryError)
    }
}

/// `url` with the crate's connection settings where the URL has none.
fn with_settings(
    url: &DatabaseUrl,
    application_name: &str,
    connect_timeout: Duration,
) -> DatabaseUrl {
    url.with_default_param("application_name", application_name)
        .with_default_param(
            "connect_timeout",
            &connect_timeout.as_secs().max(1).to_string(),
        )
}

fn redact_connection_error(
    e: diesel::ConnectionError,
    url: &DatabaseUrl,
) -> diesel::ConnectionError {
    // libpq does not echo passwords, but a malformed URL error may echo the input.
    match e {
        diesel::ConnectionError::InvalidConnectionUrl(msg) if url.has_password() => {
            diesel::ConnectionError::InvalidConnectionUrl(
                msg.replace(url.expose(), &url.redacted()),
            )
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::messages_are_english;

    #[test]
    fn english_message_locales_are_told_from_others() {
        for lc in [
            "",
            "C",
            "POSIX",
            "C.UTF-8",
            "en_US.UTF-8",
            "en_GB.utf8",
            "English_United States.1252",
        ] {
            assert!(messages_are_english(lc), "{lc:?}");
        }
        for lc in [
            "de_DE.UTF-8",
            "fr_FR.utf8",
            "ja_JP.UTF-8",
            "German_Germany.1252",
        ] {
            assert!(!messages_are_english(lc), "{lc:?}");
        }
    }
}
