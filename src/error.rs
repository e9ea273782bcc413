//! The crate's error type, for the operations where several failure kinds meet.
//!
//! Plain query functions return [`diesel::QueryResult`]; configuration, pool,
//! migration and admin operations return [`Result`]. No variant ever carries
//! the database password: URLs are stored redacted.

use std::time::Duration;

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong at the crate's edges.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A required environment variable is not set.
    #[error("{var} is not set; {hint}")]
    MissingEnv {
        /// The variable's name.
        var: &'static str,
        /// What to put in it.
        hint: &'static str,
    },

    /// An environment variable holds a value that cannot be used.
    #[error("{var} is invalid: expected {expected}, got {value:?}")]
    InvalidEnv {
        /// The variable's name.
        var: &'static str,
        /// What a valid value looks like.
        expected: &'static str,
        /// The value found (never a database URL).
        value: String,
    },

    /// The database URL cannot be parsed. The URL itself is not repeated.
    #[error("invalid database URL: {reason}")]
    InvalidDatabaseUrl {
        /// Why it was rejected.
        reason: String,
    },

    /// Connecting to PostgreSQL failed.
    #[error("cannot connect to {target}: {source}")]
    Connection {
        /// Redacted description of the target (host, port, database).
        target: String,
        /// The driver's error.
        #[source]
        source: diesel::ConnectionError,
    },

    /// The connection pool could not be built or could not hand out a connection.
    #[error("connection pool: {0}")]
    Pool(#[from] r2d2::Error),

    /// A query failed.
    #[error(transparent)]
    Query(#[from] diesel::result::Error),

    /// A migration failed to apply or revert; the migration's own transaction was rolled back.
    #[error("migration {version} failed: {message}")]
    Migration {
        /// Version of the failing migration.
        version: String,
        /// The error reported by PostgreSQL or the runner.
        message: String,
    },

    /// An applied migration's SQL differs from the one embedded in this build.
    #[error(
        "migration {version} was edited after it was applied (recorded checksum {recorded}, \
         embedded {embedded}); restore the file and add a new migration instead"
    )]
    MigrationChecksumMismatch {
        /// Version of the edited migration.
        version: String,
        /// Checksum recorded when it was applied.
        recorded: String,
        /// Checksum of the embedded SQL.
        embedded: String,
    },

    /// Pending migrations are older than the newest applied one (two branches merged).
    #[error(
        "pending migration(s) {} are older than the newest applied migration {newest_applied}; \
         review them and rerun with --allow-out-of-order",
        versions.join(", ")
    )]
    OutOfOrderMigrations {
        /// The out-of-order pending versions.
        versions: Vec<String>,
        /// The newest version already applied.
        newest_applied: String,
    },

    /// Another migrator held the advisory lock for longer than the timeout.
    #[error(
        "timed out after {waited:?} waiting for the migration lock held by {holder}; \
         is another deploy still migrating?"
    )]
    MigrationLockTimeout {
        /// How long we waited.
        waited: Duration,
        /// Who holds the lock (application, pid, since), as far as PostgreSQL tells.
        holder: String,
    },

    /// A destructive admin operation was refused by a guard rule; nothing was changed.
    #[error("refused by rule {}: {message}", rule.name())]
    ProtectedEnvironment {
        /// The rule that fired.
        rule: crate::admin::GuardRule,
        /// What was found and what to do.
        message: String,
    },

    /// A seed file could not be read or parsed; nothing was written.
    #[error("seed file {file}: {message}")]
    InvalidSeed {
        /// The file (or embedded name) at fault.
        file: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

impl Error {
    /// The diesel error under this one, if it is a query error.
    pub fn as_query_error(&self) -> Option<&diesel::result::Error> {
        match self {
            Error::Query(e) => Some(e),
            _ => None,
        }
    }
}
