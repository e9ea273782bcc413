//! The Postgres enums `execution_status` and `step_status`, and their legal transitions.
//!
//! The variant order equals the order of the labels in PostgreSQL (a test checks
//! it), so `Ord` on the Rust side agrees with `ORDER BY status` on the server.

use serde::{Deserialize, Serialize};

/// Lifecycle of a workflow execution (Postgres enum `execution_status`).
///
/// `Completed`, `Failed` and `Cancelled` are final.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    diesel_derive_enum::DbEnum,
)]
#[serde(rename_all = "snake_case")]
#[ExistingTypePath = "crate::schema::sql_types::ExecutionStatus"]
#[DbValueStyle = "snake_case"]
pub enum ExecutionStatus {
    /// Created, not started yet.
    Pending,
    /// Started; its steps are being claimed and run.
    Running,
    /// Stopped until resumed; no step is claimed meanwhile.
    Paused,
    /// Every step finished successfully (final).
    Completed,
    /// A step failed for good (final).
    Failed,
    /// Cancelled before it finished (final).
    Cancelled,
}

/// Lifecycle of one node run inside an execution (Postgres enum `step_status`).
///
/// `Completed`, `Failed` and `Skipped` are final.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    diesel_derive_enum::DbEnum,
)]
#[serde(rename_all = "snake_case")]
#[ExistingTypePath = "crate::schema::sql_types::StepStatus"]
#[DbValueStyle = "snake_case"]
pub enum StepStatus {
    /// Waiting to be claimed by a worker.
    Pending,
    /// Claimed by a worker and running.
    Running,
    /// Finished successfully (final).
    Completed,
    /// Failed with no retries left (final).
    Failed,
    /// Not run, e.g. because its execution was cancelled (final).
    Skipped,
}

impl ExecutionStatus {
    /// Every variant, in the order of the Postgres enum labels.
    pub const ALL: [ExecutionStatus; 6] = [
        Self::Pending,
        Self::Running,
        Self::Paused,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The label of this variant in PostgreSQL (and in JSON).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether no transition leaves this status.
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Whether `self -> to` is a legal transition.
    ///
    /// pending → running | cancelled; running → paused | completed | failed |
    /// cancelled; paused → running | cancelled; nothing leaves a final status.
    pub const fn can_transition_to(self, to: Self) -> bool {
        use ExecutionStatus::*;
        matches!(
            (self, to),
            (Pending, Running | Cancelled)
                | (Running, Paused | Completed | Failed | Cancelled)
                | (Paused, Running | Cancelled)
        )
    }

    /// Whether a replay ([`crate::engine::replay_execution`]) may move an
    /// execution `self -> to`: failed | cancelled → running. The database
    /// allows it only in a transaction that replays.
    pub const fn can_replay_to(self, to: Self) -> bool {
        use ExecutionStatus::*;
        matches!((self, to), (Failed | Cancelled, Running))
    }
}

impl StepStatus {
    /// Every variant, in the order of the Postgres enum labels.
    pub const ALL: [StepStatus; 5] = [
        Self::Pending,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Skipped,
    ];

    /// The label of this variant in PostgreSQL (and in JSON).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }

    /// Whether no transition leaves this status.
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Skipped)
    }

    /// Whether `self -> to` is a legal transition.
    ///
    /// pending → running | skipped; running → completed | failed | pending (a
    /// retry); nothing leaves a final status.
    pub const fn can_transition_to(self, to: Self) -> bool {
        use StepStatus::*;
        matches!(
            (self, to),
            (Pending, Running | Skipped) | (Running, Completed | Failed | Pending)
        )
    }

    /// Whether a replay ([`crate::engine::replay_execution`]) may move a
    /// step `self -> to`: failed | skipped → pending.
    pub const fn can_replay_to(self, to: Self) -> bool {
        use StepStatus::*;
        matches!((self, to), (Failed | Skipped, Pending))
    }
}

/// The status of either an execution or a step, for errors that concern both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "of", content = "status", rename_all = "snake_case")]
pub enum AnyStatus {
    /// An execution's status.
    Execution(ExecutionStatus),
    /// A step's status.
    Step(StepStatus),
}

impl AnyStatus {
    /// The label in PostgreSQL.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Execution(s) => s.as_str(),
            Self::Step(s) => s.as_str(),
        }
    }
}

impl From<ExecutionStatus> for AnyStatus {
    fn from(s: ExecutionStatus) -> Self {
        Self::Execution(s)
    }
}

impl From<StepStatus> for AnyStatus {
    fn from(s: StepStatus) -> Self {
        Self::Step(s)
    }
}

impl ExecutionStatus {
    /// The variant with this PostgreSQL label.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == label)
    }
}

impl StepStatus {
    /// The variant with this PostgreSQL label.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == label)
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(ExecutionStatus, StepStatus, AnyStatus);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_uses_the_postgres_labels() {
        for s in ExecutionStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in StepStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn final_statuses_have_no_way_out() {
        for from in ExecutionStatus::ALL.into_iter().filter(|s| s.is_final()) {
            assert!(
                ExecutionStatus::ALL
                    .iter()
                    .all(|&to| !from.can_transition_to(to))
            );
        }
        for from in StepStatus::ALL.into_iter().filter(|s| s.is_final()) {
            assert!(
                StepStatus::ALL
                    .iter()
                    .all(|&to| !from.can_transition_to(to))
            );
        }
        assert!(StepStatus::Running.can_transition_to(StepStatus::Pending));
        assert!(!ExecutionStatus::Pending.can_transition_to(ExecutionStatus::Completed));
    }
}
