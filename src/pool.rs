//! Connections: the r2d2 pool and single connections, both opened with the
//! crate's settings.
//!
//! Every connection the crate opens goes through this module, so every one
//! reports an `application_name` in `pg_stat_activity` (the URL's own, else
//! [`APPLICATION_NAME`] or the caller's name, such as the migrator's) and has
//! a libpq `connect_timeout` (the URL's own, else the configured one). Errors
//! name the target, never the password.

use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::{Connection, PgConnection};

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
/// costs the one query that fails instead of a ping on every checkout.
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
/// password.
pub fn connect_as(url: &DatabaseUrl, application_name: &str) -> Result<PgConnection> {
    let url = with_settings(url, application_name, DEFAULT_CONNECT_TIMEOUT);
    PgConnection::establish(url.expose()).map_err(|source| Error::Connection {
        target: url.target(),
        source: redact_connection_error(source, &url),
    })
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
