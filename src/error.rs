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
