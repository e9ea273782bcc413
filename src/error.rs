//! The crate's error type, for the operations where several failure kinds meet.
//!
//! Plain query functions return [`diesel::QueryResult`]; configuration, pool,
//! migration and admin operations return [`Result`]. No variant ever carries
//! the database password: URLs are stored redacted.

use std::fmt;
use std::time::Duration;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use serde::Serialize;
use uuid::Uuid;

use crate::enums::{AnyStatus, ExecutionStatus, StepStatus};

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

    /// Connecting to PostgreSQL failed. The driver's error is the
    /// [`source`](std::error::Error::source), not repeated in this message, so
    /// an error chain (`{:#}` in anyhow, `tracing`'s error chains) shows it once.
    #[error("cannot connect to {target}")]
    Connection {
        /// Redacted description of the target (host, port, database).
        target: String,
        /// The driver's error.
        #[source]
        source: diesel::ConnectionError,
    },

    /// The connection pool could not be built or could not hand out a
    /// connection; r2d2's error is the [`source`](std::error::Error::source).
    #[error("the connection pool has no connection to give")]
    Pool(#[from] r2d2::Error),

    /// A query failed.
    #[error(transparent)]
    Query(diesel::result::Error),

    /// A workflow graph was refused; nothing was written.
    #[error("invalid workflow graph: {reason}")]
    InvalidGraph {
        /// What is wrong, naming the node or edge.
        reason: String,
    },

    /// The state machine forbids this transition (checked in Rust, and by
    /// PostgreSQL's trigger whoever writes).
    #[error("illegal transition {from} -> {to}")]
    IllegalTransition {
        /// The status the row has.
        from: AnyStatus,
        /// The status asked for.
        to: AnyStatus,
    },

    /// The row changed since it was read: another writer's transition won the
    /// race. Nothing was applied.
    #[error("transition conflict on {id}: expected status {expected}, found {actual}")]
    TransitionConflict {
        /// The execution or step.
        id: Uuid,
        /// The status the caller's transition started from.
        expected: AnyStatus,
        /// The status the row has now.
        actual: AnyStatus,
    },

    /// A closure given to `runtime::AsyncPool::run` returned no result: it
    /// panicked (its connection was discarded, so an open transaction was
    /// rolled back) or the runtime dropped it before it ran.
    #[cfg(feature = "runtime")]
    #[error(transparent)]
    Task(crate::runtime::TaskFailed),

    /// "This step is no longer yours": a heartbeat, completion, failure or
    /// release presented a [`crate::Lease`] the database no longer honours,
    /// whatever the reason (`reason`). Stop working on the step; nothing
    /// was changed.
    #[error(
        "step {step_id} is no longer leased to worker {worker:?} (attempt {attempt}): {reason}"
    )]
    LeaseLost {
        /// The step.
        step_id: Uuid,
        /// The worker that presented the lease.
        worker: String,
        /// The attempt the lease was for.
        attempt: i32,
        /// Why the lease is no longer honoured.
        reason: LeaseLostReason,
    },

    /// A step was asked to move `pending -> running` by hand. Only a claim
    /// (`engine::claim_steps`) starts a step, because only a claim gives it
    /// the lease a worker reports under and `reclaim_expired` recovers; a
    /// running step without one could never finish. Nothing was changed.
    #[error("step {step_id} cannot be set running by hand: claim it (engine::claim_steps)")]
    RunRequiresClaim {
        /// The step.
        step_id: Uuid,
    },

    /// An optimistic update named a version that is no longer current.
    #[error("workflow {id} is at version {actual}, not {expected}; reload and retry")]
    VersionConflict {
        /// The workflow.
        id: Uuid,
        /// The version the caller read.
        expected: i32,
        /// The current version.
        actual: i32,
    },

    /// A short id matches more than one row.
    #[error("id prefix {prefix} is ambiguous: {}", candidates.iter().map(Uuid::to_string).collect::<Vec<_>>().join(", "))]
    AmbiguousId {
        /// The prefix looked up.
        prefix: String,
        /// The matching ids (at most a handful).
        candidates: Vec<Uuid>,
    },

    /// A short id or cursor is malformed.
    #[error("invalid {what} {input:?}: {reason}")]
    InvalidId {
        /// What was parsed (`"id prefix"`, `"cursor"`).
        what: &'static str,
        /// The input.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// No row has this id.
    #[error("{entity} {id} not found")]
    NotFound {
        /// `"workflow"`, `"execution"` or `"step"`.
        entity: &'static str,
        /// The id or prefix looked up.
        id: String,
    },

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
        rule: GuardRule,
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

    /// A socket of the crate's own could not be opened or served (the
    /// studio's listening address, say).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the address.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A setting given in code is out of range (a zero interval, a batch of
    /// zero, ...); nothing was started.
    #[error("invalid {option}: {reason}")]
    InvalidOption {
        /// The setting, as `Type::field` (`"MaintenanceOptions::interval"`).
        option: &'static str,
        /// What is wrong: the value given and what a valid one looks like.
        reason: String,
    },

    /// A schedule was refused before anything was written: its cron
    /// expression does not parse (or never fires), its time zone is not an
    /// IANA name, or its name or catch-up limit is out of range.
    #[error("invalid schedule {field} {value:?}: {reason}")]
    InvalidSchedule {
        /// `"cron"`, `"time_zone"`, `"name"` or `"missed_ticks"`.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong (the cron parser's message for a cron expression).
        reason: String,
    },

    /// A signal was refused and nothing was written: its execution is
    /// final (it can no longer wait for one), or its name is empty or
    /// longer than [`crate::graph::MAX_SIGNAL_NAME_LEN`] characters.
    #[error("signal {name:?} for execution {execution_id} refused: {reason}")]
    SignalRefused {
        /// The execution it was sent to.
        execution_id: Uuid,
        /// The signal's name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Constraint names the status triggers report (`RAISE .. USING CONSTRAINT`).
const EXECUTION_TRANSITION: &str = "executions_status_transition";
const STEP_TRANSITION: &str = "execution_steps_status_transition";

impl From<DieselError> for Error {
    /// Maps the state-machine triggers' refusal (a `check_violation` naming
    /// the transition constraint, `DETAIL: from -> to`) to
    /// [`Error::IllegalTransition`]; every other error is [`Error::Query`].
    fn from(e: DieselError) -> Self {
        if let DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, info) = &e {
            let parsed = info.details().and_then(|d| d.split_once(" -> "));
            let transition = match (info.constraint_name(), parsed) {
                (Some(EXECUTION_TRANSITION), Some((from, to))) => ExecutionStatus::from_label(from)
                    .zip(ExecutionStatus::from_label(to))
                    .map(|(f, t)| (f.into(), t.into())),
                (Some(STEP_TRANSITION), Some((from, to))) => StepStatus::from_label(from)
                    .zip(StepStatus::from_label(to))
                    .map(|(f, t)| (f.into(), t.into())),
                _ => None,
            };
            if let Some((from, to)) = transition {
                return Error::IllegalTransition { from, to };
            }
        }
        Error::Query(e)
    }
}

impl Error {
    /// The diesel error under this one, if it is a query error.
    pub fn as_query_error(&self) -> Option<&diesel::result::Error> {
        match self {
            Error::Query(e) => Some(e),
            _ => None,
        }
    }

    /// The PostgreSQL SQLSTATE of a failed query, as far as it can be told
    /// (see [`sqlstate`] for the codes and how each is recognised).
    ///
    /// Diesel 2.3 does not keep the SQLSTATE: its PostgreSQL backend reads it
    /// only to choose a [`DatabaseErrorKind`], and the error information it
    /// hands out has no accessor for it and cannot be downcast. So the code
    /// is derived:
    ///
    /// - from the kind, where Diesel maps exactly one SQLSTATE to it
    ///   (`UniqueViolation` is 23505, `SerializationFailure` 40001, ...);
    /// - for errors Diesel calls `Unknown` (or `ClosedConnection`), from
    ///   PostgreSQL's fixed primary message: `deadlock detected` is 40P01,
    ///   `canceling statement due to lock timeout` and `could not obtain
    ///   lock on ...` (`NOWAIT`) are 55P03, `canceling statement due to
    ///   statement timeout` / `... due to user request` are 57014, `current
    ///   transaction is aborted, ...` is 25P02, `terminating connection due
    ///   to administrator command` is 57P01. Messages are matched only in
    ///   English: where the server's `lc_messages` translates them, these
    ///   codes are `None` (and [`is_retryable`](Self::is_retryable) false).
    ///   The crate's connections warn once (through `tracing`) when they
    ///   find a non-English `lc_messages` (see [`crate::pool`]).
    ///
    /// `None` for every other error: another SQLSTATE, a connection that
    /// broke without a message naming the cause, and the variants that are
    /// not query errors ([`Error::IllegalTransition`] is the trigger's
    /// check violation, already decoded). A
    /// [`RollbackErrorOnCommit`](diesel::result::Error::RollbackErrorOnCommit)
    /// reports its commit error's code.
    pub fn sqlstate(&self) -> Option<&'static str> {
        self.as_query_error().and_then(diesel_sqlstate)
    }

    /// Whether running the same transaction again, from its start, is safe
    /// and expected to succeed: PostgreSQL rolled it back because of
    /// concurrent transactions, not because of what it does.
    ///
    /// True for a deadlock (40P01), a serialization failure (40001) and a
    /// lock wait that timed out or was refused by `NOWAIT` (55P03); see
    /// [`sqlstate`](Self::sqlstate) for how each is recognised. Retry the
    /// whole transaction (the caller's own `conn.transaction(..)` if the
    /// operation ran in one, not the failed statement), with a short
    /// jittered backoff, a few times.
    ///
    /// False for everything else, and notably for:
    /// - [`Error::LeaseLost`]: the step is no longer this worker's; retrying
    ///   cannot make it so. Stop working on it.
    /// - connection errors ([`is_connection_error`](Self::is_connection_error)):
    ///   when a connection breaks after a statement was sent, and above all
    ///   during `COMMIT`, whether the transaction took effect is unknown.
    ///   Retry on a new connection only an operation that is idempotent or
    ///   whose effect can be checked first (the engine's lease-fenced
    ///   reports are: a repeated one is refused with `LeaseLost`).
    /// - a statement timeout or cancel (57014): the same statement would
    ///   most likely time out again.
    /// - constraint violations, [`Error::IllegalTransition`],
    ///   [`Error::TransitionConflict`], [`Error::VersionConflict`]: the same
    ///   transaction would fail the same way; re-read and decide again.
    pub fn is_retryable(&self) -> bool {
        !self.is_connection_error()
            && matches!(
                self.sqlstate(),
                Some(sqlstate::DEADLOCK_DETECTED)
                    | Some(sqlstate::SERIALIZATION_FAILURE)
                    | Some(sqlstate::LOCK_NOT_AVAILABLE)
            )
    }

    /// Whether the failure is the connection's, not the operation's: no
    /// connection could be opened ([`Error::Connection`]) or checked out
    /// ([`Error::Pool`]), or the connection broke under the operation
    /// (Diesel's `ClosedConnection`, a `BrokenTransactionManager`, or
    /// libpq's English "no connection to the server", "server closed the
    /// connection unexpectedly", ... that Diesel reports as
    /// `UnableToSendCommand`: an administrator's `pg_terminate_backend`, a
    /// server restart, a network failure). Reopen a single connection; call
    /// [`crate::pool::ping`] on a pooled one before returning it, so that the
    /// pool surely discards it (Diesel 2.3 does not flag a connection that
    /// broke while a statement was being prepared, and the pool would hand
    /// it out again).
    ///
    /// When the connection broke after the statement was sent, the outcome
    /// is unknown (see [`is_retryable`](Self::is_retryable), which is false
    /// here). Diesel detects a broken connection on a best-effort basis; the
    /// crate's connections look up the types of their enums when they open
    /// (see [`crate::pool`]), so that the first query binding a status after
    /// the connection broke reports the broken connection rather than
    /// "Failed to find a type oid".
    pub fn is_connection_error(&self) -> bool {
        match self {
            Error::Connection { .. } | Error::Pool(_) => true,
            Error::Query(e) => diesel_is_connection_error(e),
            _ => false,
        }
    }
}

/// The SQLSTATE codes [`Error::sqlstate`] reports, with PostgreSQL's
/// condition names. Compare with them rather than with string literals.
pub mod sqlstate {
    /// `unique_violation` (Diesel's `UniqueViolation`).
    pub const UNIQUE_VIOLATION: &str = "23505";
    /// `foreign_key_violation` (Diesel's `ForeignKeyViolation`).
    pub const FOREIGN_KEY_VIOLATION: &str = "23503";
    /// `not_null_violation` (Diesel's `NotNullViolation`).
    pub const NOT_NULL_VIOLATION: &str = "23502";
    /// `check_violation` (Diesel's `CheckViolation`).
    pub const CHECK_VIOLATION: &str = "23514";
    /// `restrict_violation` (Diesel's `RestrictViolation`).
    pub const RESTRICT_VIOLATION: &str = "23001";
    /// `exclusion_violation` (Diesel's `ExclusionViolation`).
    pub const EXCLUSION_VIOLATION: &str = "23P01";
    /// `read_only_sql_transaction` (Diesel's `ReadOnlyTransaction`).
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    /// `in_failed_sql_transaction`: an earlier statement of the transaction
    /// failed (English message `current transaction is aborted, ...`).
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    /// `serialization_failure` (Diesel's `SerializationFailure`). Retryable.
    pub const SERIALIZATION_FAILURE: &str = "40001";
    /// `deadlock_detected` (English message `deadlock detected`). Retryable.
    pub const DEADLOCK_DETECTED: &str = "40P01";
    /// `lock_not_available`: `lock_timeout` expired or `NOWAIT` found the
    /// row or table locked (English messages `canceling statement due to
    /// lock timeout`, `could not obtain lock on ...`). Retryable.
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// `query_canceled`: `statement_timeout` expired or the statement was
    /// cancelled (English messages `canceling statement due to statement
    /// timeout` / `... due to user request`). Not retryable.
    pub const QUERY_CANCELED: &str = "57014";
    /// `admin_shutdown`: the backend was terminated (English message
    /// `terminating connection due to administrator command`; often not
    /// seen, when the socket closes before the message is read).
    pub const ADMIN_SHUTDOWN: &str = "57P01";
}

/// PostgreSQL's primary messages for the codes Diesel reports as
/// `Unknown`, in English (`lc_messages` C or en): (message, whether it is a
/// prefix followed by an object name, SQLSTATE).
const KNOWN_MESSAGES: &[(&str, bool, &str)] = &[
    ("deadlock detected", false, sqlstate::DEADLOCK_DETECTED),
    (
        "canceling statement due to lock timeout",
        false,
        sqlstate::LOCK_NOT_AVAILABLE,
    ),
    (
        "could not obtain lock on row in relation ",
        true,
        sqlstate::LOCK_NOT_AVAILABLE,
    ),
    (
        "could not obtain lock on relation ",
        true,
        sqlstate::LOCK_NOT_AVAILABLE,
    ),
    (
        "canceling statement due to statement timeout",
        false,
        sqlstate::QUERY_CANCELED,
    ),
    (
        "canceling statement due to user request",
        false,
        sqlstate::QUERY_CANCELED,
    ),
    (
        "current transaction is aborted, commands ignored until end of transaction block",
        false,
        sqlstate::IN_FAILED_SQL_TRANSACTION,
    ),
    (
        "terminating connection due to administrator command",
        false,
        sqlstate::ADMIN_SHUTDOWN,
    ),
];

fn sqlstate_from_message(message: &str) -> Option<&'static str> {
    let message = message.trim_end();
    KNOWN_MESSAGES
        .iter()
        .find(|(text, prefix, _)| {
            if *prefix {
                message.starts_with(text)
            } else {
                message == *text
            }
        })
        .map(|&(_, _, code)| code)
}

/// See [`Error::sqlstate`].
fn diesel_sqlstate(e: &DieselError) -> Option<&'static str> {
    match e {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::UniqueViolation => Some(sqlstate::UNIQUE_VIOLATION),
            DatabaseErrorKind::ForeignKeyViolation => Some(sqlstate::FOREIGN_KEY_VIOLATION),
            DatabaseErrorKind::NotNullViolation => Some(sqlstate::NOT_NULL_VIOLATION),
            DatabaseErrorKind::CheckViolation => Some(sqlstate::CHECK_VIOLATION),
            DatabaseErrorKind::RestrictViolation => Some(sqlstate::RESTRICT_VIOLATION),
            DatabaseErrorKind::ExclusionViolation => Some(sqlstate::EXCLUSION_VIOLATION),
            DatabaseErrorKind::ReadOnlyTransaction => Some(sqlstate::READ_ONLY_SQL_TRANSACTION),
            DatabaseErrorKind::SerializationFailure => Some(sqlstate::SERIALIZATION_FAILURE),
            // A client-side failure to send: no SQLSTATE.
            DatabaseErrorKind::UnableToSendCommand => None,
            // `Unknown`, `ClosedConnection` and kinds added later.
            _ => sqlstate_from_message(info.message()),
        },
        DieselError::RollbackErrorOnCommit { commit_error, .. } => diesel_sqlstate(commit_error),
        _ => None,
    }
}

/// What libpq says when the connection is gone (client-side messages, in
/// the client process's locale: English unless the program calls
/// `setlocale`, which Rust programs do not by default).
const LIBPQ_CONNECTION_LOST: &[&str] = &[
    "no connection to the server",
    "server closed the connection unexpectedly",
    "SSL connection has been closed unexpectedly",
    "SSL SYSCALL error: ",
    "could not send data to server: ",
    "could not receive data from server: ",
    "write to server failed",
    "connection not open",
];

/// See [`Error::is_connection_error`].
fn diesel_is_connection_error(e: &DieselError) -> bool {
    match e {
        DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
        | DieselError::BrokenTransactionManager => true,
        // Diesel reports a statement libpq could not send as
        // `UnableToSendCommand`, whether the connection is gone ("no
        // connection to the server") or the statement is at fault (too many
        // bind parameters): only the former is matched.
        DieselError::DatabaseError(_, info) => {
            let message = info.message();
            LIBPQ_CONNECTION_LOST.iter().any(|m| message.contains(m))
                || sqlstate_from_message(message) == Some(sqlstate::ADMIN_SHUTDOWN)
        }
        DieselError::RollbackErrorOnCommit {
            rollback_error,
            commit_error,
        } => diesel_is_connection_error(rollback_error) || diesel_is_connection_error(commit_error),
        _ => false,
    }
}

/// Why a [`Error::LeaseLost`] lease is no longer honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LeaseLostReason {
    /// The lease expired (the step may be reclaimed and started again at any
    /// moment, even before `reclaim_expired` runs).
    #[error("the lease expired")]
    Expired,
    /// The step is in another run (a later attempt, another worker) or back
    /// to pending: it was reclaimed, released, or never leased to this worker.
    #[error("the step was taken over or sent back to pending")]
    Superseded,
    /// The step already ended with this status (reported by someone else,
    /// skipped by a cancel, or reported twice).
    #[error("the step is already {0}")]
    Finished(crate::enums::StepStatus),
    /// The step no longer exists (its execution was pruned or deleted).
    #[error("the step was deleted")]
    Deleted,
}

/// The guard rule that refused a destructive command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GuardRule {
    /// `APP_ENV`, `RUST_ENV` or `NODE_ENV` says production.
    EnvironmentIsProduction,
    /// The database is stamped production.
    DatabaseIsProduction,
    /// The URL looks like a production server.
    UrlLooksLikeProduction,
    /// The server is not on loopback or a unix socket and `--allow-remote` was not given.
    RemoteServer,
    /// What the server reports after connecting disagrees with the URL.
    ConnectedTargetMismatch,
    /// The confirmation was missing, wrong, or declined.
    NotConfirmed,
}

impl GuardRule {
    /// The rule's stable name, as printed and documented.
    pub const fn name(self) -> &'static str {
        match self {
            GuardRule::EnvironmentIsProduction => "environment-is-production",
            GuardRule::DatabaseIsProduction => "database-is-production",
            GuardRule::UrlLooksLikeProduction => "url-looks-like-production",
            GuardRule::RemoteServer => "remote-server",
            GuardRule::ConnectedTargetMismatch => "connected-target-mismatch",
            GuardRule::NotConfirmed => "not-confirmed",
        }
    }
}

impl GuardRule {
    /// The rule's number in the documentation (1 to 5; 6 for the confirmation).
    pub const fn number(self) -> u8 {
        match self {
            GuardRule::EnvironmentIsProduction => 1,
            GuardRule::DatabaseIsProduction => 2,
            GuardRule::UrlLooksLikeProduction => 3,
            GuardRule::RemoteServer => 4,
            GuardRule::ConnectedTargetMismatch => 5,
            GuardRule::NotConfirmed => 6,
        }
    }
}

impl fmt::Display for GuardRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::Query(DieselError::DatabaseError(
            kind,
            Box::new(message.to_owned()),
        ))
    }

    #[test]
    fn codes_come_from_the_kind_or_the_english_message() {
        let unique = db(DatabaseErrorKind::UniqueViolation, "anything");
        assert_eq!(unique.sqlstate(), Some(sqlstate::UNIQUE_VIOLATION));
        let deadlock = db(DatabaseErrorKind::Unknown, "deadlock detected");
        assert_eq!(deadlock.sqlstate(), Some(sqlstate::DEADLOCK_DETECTED));
        assert!(deadlock.is_retryable());
        let nowait = db(
            DatabaseErrorKind::Unknown,
            "could not obtain lock on row in relation \"executions\"",
        );
        assert_eq!(nowait.sqlstate(), Some(sqlstate::LOCK_NOT_AVAILABLE));
        // Translated (lc_messages = de): not recognised, so not retried.
        let german = db(
            DatabaseErrorKind::Unknown,
            "Verklemmung (Deadlock) entdeckt",
        );
        assert_eq!(german.sqlstate(), None);
        assert!(!german.is_retryable());
        // A message merely containing the text is not the server's.
        let other = db(
            DatabaseErrorKind::Unknown,
            "deadlock detected in my trigger",
        );
        assert_eq!(other.sqlstate(), None);
    }

    #[test]
    fn a_commit_that_failed_reports_its_own_code() {
        let e = Error::Query(DieselError::RollbackErrorOnCommit {
            rollback_error: Box::new(DieselError::BrokenTransactionManager),
            commit_error: Box::new(DieselError::DatabaseError(
                DatabaseErrorKind::SerializationFailure,
                Box::new("could not serialize access".to_owned()),
            )),
        });
        assert_eq!(e.sqlstate(), Some(sqlstate::SERIALIZATION_FAILURE));
        // The rollback failed too: the connection is not to be trusted.
        assert!(e.is_connection_error());
        assert!(!e.is_retryable());
    }

    #[test]
    fn only_a_lost_connection_counts_as_a_connection_error() {
        let gone = db(
            DatabaseErrorKind::UnableToSendCommand,
            "no connection to the server\n",
        );
        assert!(gone.is_connection_error());
        let too_many = db(
            DatabaseErrorKind::UnableToSendCommand,
            "number of parameters must be between 0 and 65535\n",
        );
        assert!(!too_many.is_connection_error());
        assert!(db(DatabaseErrorKind::ClosedConnection, "").is_connection_error());
        assert!(Error::Query(DieselError::BrokenTransactionManager).is_connection_error());
        assert!(!Error::Query(DieselError::NotFound).is_connection_error());
    }
}
