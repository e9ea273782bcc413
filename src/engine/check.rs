//! The invariant checker: reads the engine's tables and reports, by execution
//! and step, every state the triggers promise can never be committed.
//!
//! It only reads. Each batch of executions (keyset pages by id) is checked in
//! one `REPEATABLE READ READ ONLY` transaction, so all the queries of a batch
//! see one snapshot (a concurrent writer cannot make two queries disagree)
//! and nothing can be written; it is safe on a live production database.
//! Every invariant is one set-based query per batch over the batch's id range
//! (the primary key and the `execution_id`-led indexes serve it), never a
//! query per row, so a million executions take minutes.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Nullable, Text, Uuid as SqlUuid};
use serde::Serialize;
use uuid::Uuid;

use crate::enums::{ExecutionStatus, StepStatus};
use crate::error::Result;

/// One kind of broken invariant. The names ([`InvariantKind::name`]) are
/// stable: the `db-check` binary prints them and scripts may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum InvariantKind {
    /// A running step without a lease (`locked_by` or `locked_until` NULL).
    RunningWithoutLease,
    /// A running step whose lease expired longer ago than the grace period
    /// and that nobody reclaimed (a warning: `reclaim_expired` recovers it).
    ExpiredLease,
    /// A step that is not running holds a lease (`locked_by` or `locked_until` set).
    LeaseWhileNotRunning,
    /// A pending step's `upstream_pending` differs from its unfinished upstream steps.
    UpstreamPendingMismatch,
    /// A step ran (running, completed, failed) before its upstream steps were done.
    RanBeforeUpstream,
    /// A step's `downstream` names a node without a step in the execution (a warning).
    DanglingDownstream,
    /// A pending step under a final execution.
    PendingUnderFinalExecution,
    /// A completed execution with pending or running steps.
    CompletedWithUnfinishedSteps,
    /// A completed execution with a failed step.
    CompletedWithFailedStep,
    /// A running execution with a failed step (it should have failed).
    RunningWithFailedStep,
    /// A running execution whose steps are all completed or skipped (it should have completed).
    RunningWithAllStepsFinal,
    /// A step that is not pending under an execution that never started.
    StepStartedUnderPendingExecution,
    /// A step's events are not a chain of legal transitions ending in its status.
    StepEventChain,
    /// An execution's own events are not a chain of legal transitions ending in its status.
    ExecutionEventChain,
    /// A final execution without `completed_at`.
    ExecutionCompletedAtMissing,
    /// A completed, failed or skipped step without `completed_at`.
    StepCompletedAtMissing,
    /// A pending step whose `parked` flag disagrees with its (not final)
    /// execution's status. Checked only when the column exists.
    ParkedMismatch,
    /// A concurrency key with more steps running or admitted than its
    /// limit. (Also reported after a limit was lowered below the steps
    /// running at that moment, until they finish.) Checked, like the other
    /// flow-control kinds, only when the flow-control columns exist.
    ConcurrencyKeyOverLimit,
    /// A throttled ready step whose key has no limit: nothing will ever
    /// admit it.
    ThrottledWithoutLimit,
    /// A throttled ready step whose key has a free slot (a warning: the
    /// maintenance loop's `rebalance_concurrency_keys` admits it).
    ThrottledWithFreeSlot,
    /// A queue whose `running` counter differs from its running steps.
    QueueCounterMismatch,
    /// A queue with more running steps than its limit (also after a limit
    /// was lowered, until they finish).
    QueueOverLimit,
    /// A pending execution whose delayed start is overdue by more than the
    /// grace period (a warning: is the maintenance loop running?).
    DelayedStartOverdue,
    /// A ready timer step without `wake_at`: `fire_due_waits` never takes
    /// it. Checked, like the other wait kinds, only when the wait columns
    /// (migration 000039) exist.
    TimerUnarmed,
    /// A ready wait step (timer or signal) of a running execution whose
    /// `wake_at` passed longer ago than the grace period (a warning: is the
    /// maintenance loop running `fire_due_waits`?).
    WaitOverdue,
    /// An undelivered signal while a ready step of its execution waits for
    /// its name and is not woken (`wake_at` NULL or ahead).
    SignalUndelivered,
    /// A delivered signal whose step is not a completed step of the same
    /// execution waiting for the signal's name. (Found from the steps, by
    /// `delivered_to`: a signal delivered to a step that no longer exists,
    /// possible only with the foreign-key triggers off, is not seen.)
    SignalDeliveryMismatch,
    /// A completed signal step to which no signal was delivered.
    SignalStepWithoutSignal,
}

/// How bad a violation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Broken data: the engine can no longer make progress, or history lies.
    Error,
    /// Not broken, but worth a look (maintenance is not running).
    Warning,
}

impl Severity {
    /// `"error"` or `"warning"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

impl InvariantKind {
    /// Every kind, in report order.
    pub const ALL: [InvariantKind; 28] = [
        Self::RunningWithoutLease,
        Self::ExpiredLease,
        Self::LeaseWhileNotRunning,
        Self::UpstreamPendingMismatch,
        Self::RanBeforeUpstream,
        Self::DanglingDownstream,
        Self::PendingUnderFinalExecution,
        Self::CompletedWithUnfinishedSteps,
        Self::CompletedWithFailedStep,
        Self::RunningWithFailedStep,
        Self::RunningWithAllStepsFinal,
        Self::StepStartedUnderPendingExecution,
        Self::StepEventChain,
        Self::ExecutionEventChain,
        Self::ExecutionCompletedAtMissing,
        Self::StepCompletedAtMissing,
        Self::ParkedMismatch,
        Self::ConcurrencyKeyOverLimit,
        Self::ThrottledWithoutLimit,
        Self::ThrottledWithFreeSlot,
        Self::QueueCounterMismatch,
        Self::QueueOverLimit,
        Self::DelayedStartOverdue,
        Self::TimerUnarmed,
        Self::WaitOverdue,
        Self::SignalUndelivered,
        Self::SignalDeliveryMismatch,
        Self::SignalStepWithoutSignal,
    ];

    /// The stable snake_case name (as in JSON).
    pub const fn name(self) -> &'static str {
        match self {
            Self::RunningWithoutLease => "running_without_lease",
            Self::ExpiredLease => "expired_lease",
            Self::LeaseWhileNotRunning => "lease_while_not_running",
            Self::UpstreamPendingMismatch => "upstream_pending_mismatch",
            Self::RanBeforeUpstream => "ran_before_upstream",
            Self::DanglingDownstream => "dangling_downstream",
            Self::PendingUnderFinalExecution => "pending_under_final_execution",
            Self::CompletedWithUnfinishedSteps => "completed_with_unfinished_steps",
            Self::CompletedWithFailedStep => "completed_with_failed_step",
            Self::RunningWithFailedStep => "running_with_failed_step",
            Self::RunningWithAllStepsFinal => "running_with_all_steps_final",
            Self::StepStartedUnderPendingExecution => "step_started_under_pending_execution",
            Self::StepEventChain => "step_event_chain",
            Self::ExecutionEventChain => "execution_event_chain",
            Self::ExecutionCompletedAtMissing => "execution_completed_at_missing",
            Self::StepCompletedAtMissing => "step_completed_at_missing",
            Self::ParkedMismatch => "parked_mismatch",
            Self::ConcurrencyKeyOverLimit => "concurrency_key_over_limit",
            Self::ThrottledWithoutLimit => "throttled_without_limit",
            Self::ThrottledWithFreeSlot => "throttled_with_free_slot",
            Self::QueueCounterMismatch => "queue_counter_mismatch",
            Self::QueueOverLimit => "queue_over_limit",
            Self::DelayedStartOverdue => "delayed_start_overdue",
            Self::TimerUnarmed => "timer_unarmed",
            Self::WaitOverdue => "wait_overdue",
            Self::SignalUndelivered => "signal_undelivered",
            Self::SignalDeliveryMismatch => "signal_delivery_mismatch",
            Self::SignalStepWithoutSignal => "signal_step_without_signal",
        }
    }

    /// The kind named `name` (as [`InvariantKind::name`] prints it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// What the invariant says, in one line.
    pub const fn explanation(self) -> &'static str {
        match self {
            Self::RunningWithoutLease => {
                "a running step has no lease (locked_by or locked_until is NULL): nobody can finish it and reclaim_expired never recovers it"
            }
            Self::ExpiredLease => {
                "a running step's lease expired longer ago than the grace period and it was not reclaimed: is reclaim_expired running?"
            }
            Self::LeaseWhileNotRunning => {
                "a step that is not running holds a lease (locked_by or locked_until set): a stale holder could report on a later attempt"
            }
            Self::UpstreamPendingMismatch => {
                "a pending step's upstream_pending differs from the number of its upstream steps (whose downstream names it) that are not completed or skipped"
            }
            Self::RanBeforeUpstream => {
                "a step ran (running, completed or failed) while an upstream step was not completed or skipped, or with upstream_pending > 0"
            }
            Self::DanglingDownstream => {
                "a step's downstream names a node that has no step in the same execution (the engine starts one step per node, so the rows were written by hand): that dependency is ignored"
            }
            Self::PendingUnderFinalExecution => {
                "a pending step under a completed, failed or cancelled execution: nothing will ever claim or skip it"
            }
            Self::CompletedWithUnfinishedSteps => {
                "a completed execution still has pending or running steps"
            }
            Self::CompletedWithFailedStep => {
                "a completed execution has a failed step: it should have failed"
            }
            Self::RunningWithFailedStep => {
                "a running execution has a step that failed for good: it should have failed"
            }
            Self::RunningWithAllStepsFinal => {
                "a running execution whose steps are all completed or skipped: it should have completed (stuck for ever)"
            }
            Self::StepStartedUnderPendingExecution => {
                "a step of an execution that never started (pending) is not pending"
            }
            Self::StepEventChain => {
                "a step's events (by id) are not a contiguous chain of legal transitions ending in the step's current status"
            }
            Self::ExecutionEventChain => {
                "an execution's own events (step_id NULL, by id) are not a contiguous chain of legal transitions ending in its current status"
            }
            Self::ExecutionCompletedAtMissing => {
                "a completed, failed or cancelled execution has no completed_at"
            }
            Self::StepCompletedAtMissing => {
                "a completed, failed or skipped step has no completed_at"
            }
            Self::ParkedMismatch => {
                "a pending step's parked flag differs from (its execution is not running), under a pending, running or paused execution: it is claimable while it must not be, or never claimed"
            }
            Self::ConcurrencyKeyOverLimit => {
                "a concurrency key has more steps running or admitted (ready, not throttled) than its max_running (expected for a while after the limit was lowered)"
            }
            Self::ThrottledWithoutLimit => {
                "a ready step is throttled but its concurrency key has no limit: nothing will ever admit it"
            }
            Self::ThrottledWithFreeSlot => {
                "a ready step is throttled although its concurrency key has a free slot: rebalance_concurrency_keys (run by the maintenance loop) admits it"
            }
            Self::QueueCounterMismatch => {
                "a queue's running counter differs from the number of its running steps: its limit is enforced against a wrong count"
            }
            Self::QueueOverLimit => {
                "a queue has more running steps than its max_running (expected for a while after the limit was lowered)"
            }
            Self::DelayedStartOverdue => {
                "a pending execution's start_after passed longer ago than the grace period and it was not started: is the maintenance loop (start_due_executions) running?"
            }
            Self::TimerUnarmed => {
                "a ready timer step (pending, upstream done) has no wake_at, so engine::fire_due_waits never fires it and its execution waits for ever (row written with the triggers off?): set its wake_at (its wait_until, or now() to fire it at the next maintenance round)"
            }
            Self::WaitOverdue => {
                "a ready timer or signal wait of a running execution was due (wake_at) longer ago than the grace period and nothing ran it: is the maintenance loop (engine::fire_due_waits) running? It fires once maintenance runs again"
            }
            Self::SignalUndelivered => {
                "an undelivered signal waits while a ready step of its execution waits for that name, but the step is not woken (wake_at NULL or ahead): the signal is never delivered, or only at the wait's timeout, which then fails the step (signal inserted with the triggers off?); set the step's wake_at to now() and the maintenance loop (engine::fire_due_waits) delivers it"
            }
            Self::SignalDeliveryMismatch => {
                "a signal is recorded as delivered (delivered_to) to a step that is not a completed step of the signal's execution waiting for that name (other execution, other or no signal name, or not completed): the record of who took which signal is wrong (rows written by hand or with the triggers off); compare engine::list_signals with the step before changing either"
            }
            Self::SignalStepWithoutSignal => {
                "a completed signal step (workflow_db.signal) took no signal (no execution_signals row has delivered_to = the step): it completed without its signal, so its output is no signal's payload (written by hand or with the triggers off); find the signal it should have taken with engine::list_signals"
            }
        }
    }

    /// [`Severity::Warning`] for [`InvariantKind::ExpiredLease`],
    /// [`InvariantKind::ThrottledWithFreeSlot`],
    /// [`InvariantKind::DelayedStartOverdue`] and
    /// [`InvariantKind::WaitOverdue`] (maintenance recovers them) and
    /// [`InvariantKind::DanglingDownstream`] (rows written by hand; nothing
    /// waits for the missing step), else [`Severity::Error`].
    pub const fn severity(self) -> Severity {
        match self {
            Self::ExpiredLease
            | Self::DanglingDownstream
            | Self::ThrottledWithFreeSlot
            | Self::DelayedStartOverdue
            | Self::WaitOverdue => Severity::Warning,
            _ => Severity::Error,
        }
    }
}

impl fmt::Display for InvariantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken invariant, where it was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// What is broken.
    pub kind: InvariantKind,
    /// The execution concerned.
    pub execution_id: Uuid,
    /// The step concerned, when it is about one step.
    pub step_id: Option<Uuid>,
    /// The facts, e.g. `pending step b: upstream_pending 0, but 1 of its 2 upstream steps are unfinished`.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} execution {}", self.kind, self.execution_id)?;
        if let Some(step) = self.step_id {
            write!(f, " step {step}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Options of [`check_invariants`]; `CheckOptions::default()` then set fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckOptions {
    /// Executions per batch (one read-only transaction each); default 10,000.
    pub batch_size: i64,
    /// How many violations of each kind the report lists (the counts per
    /// kind are always complete); default 1,000.
    pub max_per_kind: usize,
    /// Report running steps whose lease expired more than this long ago as
    /// [`InvariantKind::ExpiredLease`] warnings, and delayed starts and
    /// waits due more than this long ago as
    /// [`InvariantKind::DelayedStartOverdue`] and
    /// [`InvariantKind::WaitOverdue`] warnings; `None` skips these checks.
    /// Default 5 minutes.
    pub expired_lease_grace: Option<Duration>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            batch_size: 10_000,
            max_per_kind: 1_000,
            expired_lease_grace: Some(Duration::from_secs(300)),
        }
    }
}

/// What [`check_invariants`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InvariantReport {
    /// Executions checked.
    pub executions: u64,
    /// Steps checked.
    pub steps: u64,
    /// Read-only transactions used (batches of executions).
    pub batches: u64,
    /// Whether the `parked` column exists, so [`InvariantKind::ParkedMismatch`] was checked.
    pub parked_checked: bool,
    /// The first [`CheckOptions::max_per_kind`] violations of each kind, by
    /// batch, kind and execution id.
    pub violations: Vec<Violation>,
    /// How many violations of each kind were found in all (kinds with none are absent).
    pub counts: BTreeMap<InvariantKind, u64>,
}

impl InvariantReport {
    /// No error-level violation (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.errors() == 0
    }

    /// Error-level violations found in all.
    pub fn errors(&self) -> u64 {
        self.count_where(Severity::Error)
    }

    /// Warning-level violations found in all.
    pub fn warnings(&self) -> u64 {
        self.count_where(Severity::Warning)
    }

    /// All violations found (listed or not).
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Whether more violations were found than [`InvariantReport::violations`] lists.
    pub fn truncated(&self) -> bool {
        self.total() > self.violations.len() as u64
    }

    /// How many violations of `kind` were found.
    pub fn count(&self, kind: InvariantKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    fn count_where(&self, severity: Severity) -> u64 {
        self.counts
            .iter()
            .filter(|(k, _)| k.severity() == severity)
            .map(|(_, n)| n)
            .sum()
    }
}

impl fmt::Display for InvariantReport {
    /// A summary line, then one line per kind found.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} executions, {} steps: {} errors, {} warnings",
            self.executions,
            self.steps,
            self.errors(),
            self.warnings()
        )?;
        for (kind, n) in &self.counts {
            write!(f, "\n  {kind}: {n}")?;
        }
        Ok(())
    }
}

/// Progress of a running check, after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckProgress {
    /// Batches done.
    pub batches: u64,
    /// Executions checked so far.
    pub executions: u64,
    /// Steps checked so far.
    pub steps: u64,
    /// Violations found so far.
    pub violations: u64,
}

/// Checks every execution and step against the engine's invariants
/// ([`InvariantKind`]) and reports what is broken. Reads only: each batch of
/// [`CheckOptions::batch_size`] executions (in id order) is one
/// `REPEATABLE READ READ ONLY` transaction, with one set-based query per
/// invariant. Call it outside a transaction (it opens its own).
///
/// Executions inserted during the check into an id range already checked
/// are not seen; rows changed between batches are seen as they are when
/// their batch runs.
#[tracing::instrument(skip_all, fields(batch_size = options.batch_size))]
pub fn check_invariants(
    conn: &mut PgConnection,
    options: &CheckOptions,
) -> Result<InvariantReport> {
    check_invariants_with_progress(conn, options, |_| {})
}

/// [`check_invariants`], calling `progress` after each batch.
pub fn check_invariants_with_progress(
    conn: &mut PgConnection,
    options: &CheckOptions,
    mut progress: impl FnMut(&CheckProgress),
) -> Result<InvariantReport> {
    let batch_size = options.batch_size.max(1);
    let parked = conn
        .build_transaction()
        .read_only()
        .run(|conn| has_column(conn, "execution_steps", "parked"))?;
    let flow = conn
        .build_transaction()
        .read_only()
        .run(|conn| has_column(conn, "execution_steps", "throttled"))?;
    let waits = conn
        .build_transaction()
        .read_only()
        .run(|conn| has_column(conn, "execution_steps", "wake_at"))?;
    let checks = checks(options, parked, flow, waits);
    let mut report = InvariantReport {
        parked_checked: parked,
        ..InvariantReport::default()
    };
    let mut after: Option<Uuid> = None;
    loop {
        let done = conn
            .build_transaction()
            .repeatable_read()
            .read_only()
            .run(|conn| -> Result<bool> {
                let Some(bounds) = next_batch(conn, after, batch_size)? else {
                    return Ok(true);
                };
                report.batches += 1;
                report.executions += bounds.executions as u64;
                report.steps += diesel::sql_query(
                    "SELECT count(*) AS n FROM execution_steps WHERE execution_id BETWEEN $1 AND $2",
                )
                .bind::<SqlUuid, _>(bounds.first)
                .bind::<SqlUuid, _>(bounds.last)
                .get_result::<Count>(conn)?
                .n as u64;
                let first = report.batches == 1;
                for check in checks.iter().filter(|c| first || !c.global) {
                    run_check(conn, check, &bounds, options.max_per_kind, &mut report)?;
                }
                after = Some(bounds.last);
                Ok(bounds.executions < batch_size)
            })?;
        progress(&CheckProgress {
            batches: report.batches,
            executions: report.executions,
            steps: report.steps,
            violations: report.total(),
        });
        if done {
            return Ok(report);
        }
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    found: bool,
}

fn has_column(conn: &mut PgConnection, table: &str, column: &str) -> QueryResult<bool> {
    Ok(diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2) AS found",
    )
    .bind::<Text, _>(table)
    .bind::<Text, _>(column)
    .get_result::<Exists>(conn)?
    .found)
}

/// The id range of one batch (both ends included).
struct Bounds {
    first: Uuid,
    last: Uuid,
    executions: i64,
}

#[derive(QueryableByName)]
struct BoundsRow {
    #[diesel(sql_type = Nullable<SqlUuid>)]
    first: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    last: Option<Uuid>,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn next_batch(
    conn: &mut PgConnection,
    after: Option<Uuid>,
    batch_size: i64,
) -> QueryResult<Option<Bounds>> {
    // (uuid has no min/max aggregate before PostgreSQL 18.)
    const PAGE: &str = "WITH b AS (SELECT id FROM executions {after} ORDER BY id LIMIT $1) \
        SELECT (SELECT id FROM b ORDER BY id LIMIT 1) AS first, \
               (SELECT id FROM b ORDER BY id DESC LIMIT 1) AS last, \
               (SELECT count(*) FROM b) AS n";
    let row: BoundsRow = match after {
        None => diesel::sql_query(PAGE.replace("{after}", ""))
            .bind::<BigInt, _>(batch_size)
            .get_result(conn)?,
        Some(after) => diesel::sql_query(PAGE.replace("{after}", "WHERE id > $2"))
            .bind::<BigInt, _>(batch_size)
            .bind::<SqlUuid, _>(after)
            .get_result(conn)?,
    };
    Ok(match (row.first, row.last) {
        (Some(first), Some(last)) => Some(Bounds {
            first,
            last,
            executions: row.n,
        }),
        _ => None,
    })
}

/// One invariant's query. `$1`/`$2` are the batch's first and last execution
/// id; `extra` says what `$4` is. The query yields `execution_id`, `step_id`
/// and `detail`.
struct Check {
    kind: InvariantKind,
    sql: String,
    extra: Extra,
    /// About rows of no execution in particular (queues, keys): run once,
    /// with the first batch.
    global: bool,
}

enum Extra {
    None,
    Seconds(f64),
    Pairs(Vec<String>),
}

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = SqlUuid)]
    execution_id: Uuid,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    step_id: Option<Uuid>,
    #[diesel(sql_type = Text)]
    detail: String,
    #[diesel(sql_type = BigInt)]
    total: i64,
}

fn run_check(
    conn: &mut PgConnection,
    check: &Check,
    bounds: &Bounds,
    cap: usize,
    report: &mut InvariantReport,
) -> QueryResult<()> {
    // Rows beyond what the report still lists are counted, not fetched;
    // one row is always fetched, for the count.
    let listed = report
        .violations
        .iter()
        .filter(|v| v.kind == check.kind)
        .count();
    let room = cap.saturating_sub(listed);
    let sql = format!(
        "SELECT v.execution_id, v.step_id, v.detail, count(*) OVER () AS total FROM ({}) v \
         ORDER BY v.execution_id, v.step_id NULLS FIRST, v.detail LIMIT $3",
        check.sql
    );
    let query = diesel::sql_query(sql)
        .into_boxed()
        .bind::<SqlUuid, _>(bounds.first)
        .bind::<SqlUuid, _>(bounds.last)
        .bind::<BigInt, _>(room.max(1) as i64);
    let rows: Vec<Found> = match &check.extra {
        Extra::None => query.load(conn)?,
        Extra::Seconds(s) => query.bind::<Double, _>(*s).load(conn)?,
        Extra::Pairs(p) => query.bind::<Array<Text>, _>(p).load(conn)?,
    };
    let Some(total) = rows.first().map(|r| r.total as u64) else {
        return Ok(());
    };
    *report.counts.entry(check.kind).or_default() += total;
    for row in rows.into_iter().take(room) {
        report.violations.push(Violation {
            kind: check.kind,
            execution_id: row.execution_id,
            step_id: row.step_id,
            detail: row.detail,
        });
    }
    Ok(())
}

/// `from>to` for every legal transition, as the event-chain queries compare them.
fn legal_pairs<S: Copy, I: IntoIterator<Item = S> + Clone>(
    all: I,
    label: fn(S) -> &'static str,
    legal: fn(S, S) -> bool,
) -> Vec<String> {
    let mut pairs = Vec::new();
    for from in all.clone() {
        for to in all.clone() {
            if legal(from, to) {
                pairs.push(format!("{}>{}", label(from), label(to)));
            }
        }
    }
    pairs
}

/// The steps of the batch.
const STEPS: &str = "execution_steps s WHERE s.execution_id BETWEEN $1 AND $2";

/// Each upstream relation of the batch's steps: for a step's node, how many
/// steps name it downstream, and how many of those are not done.
const UPSTREAM: &str = "\
    WITH s AS (SELECT id, execution_id, node_id, status, upstream_pending, downstream \
               FROM execution_steps WHERE execution_id BETWEEN $1 AND $2), \
    up AS (SELECT s.execution_id, d.node_id, count(DISTINCT s.id) AS upstream, \
                  count(DISTINCT s.id) FILTER (WHERE s.status NOT IN ('completed', 'skipped')) AS unfinished \
           FROM s CROSS JOIN LATERAL unnest(s.downstream) AS d(node_id) GROUP BY 1, 2) ";

/// The event chains of the batch: `$4` holds the legal `from>to` pairs;
/// `{who}` is `step_id` or `execution_id`, `{filter}` selects the events,
/// `{table}`/`{owner}` the batch's rows they end in (joined as a set, by hash).
const CHAIN: &str = "\
    WITH ev AS (SELECT v.id, v.execution_id, v.step_id, v.from_status, v.to_status, \
                       lag(v.to_status) OVER w AS prev_to, lag(v.id) OVER w AS prev_id, \
                       lead(v.id) OVER w AS next_id \
                FROM execution_events v \
                WHERE v.execution_id BETWEEN $1 AND $2 AND {filter} \
                WINDOW w AS (PARTITION BY v.{who} ORDER BY v.id)), \
         x AS (SELECT id, status FROM {table} WHERE {owner} BETWEEN $1 AND $2) \
    SELECT ev.execution_id, {step_id} AS step_id, CASE \
        WHEN ev.from_status IS NULL OR NOT ((ev.from_status || '>' || ev.to_status) = ANY ($4)) \
            THEN format('event %s records an illegal transition %s -> %s', ev.id, \
                        coalesce(ev.from_status, 'NULL'), ev.to_status) \
        WHEN ev.prev_id IS NOT NULL AND ev.from_status IS DISTINCT FROM ev.prev_to \
            THEN format('event %s starts from %s but the previous event %s ended in %s', \
                        ev.id, ev.from_status, ev.prev_id, ev.prev_to) \
        ELSE format('the last event %s ends in %s but the {what} is %s', ev.id, ev.to_status, x.status) \
        END AS detail \
    FROM ev JOIN x ON x.id = ev.{who} \
    WHERE ev.from_status IS NULL OR NOT ((ev.from_status || '>' || ev.to_status) = ANY ($4)) \
       OR (ev.prev_id IS NOT NULL AND ev.from_status IS DISTINCT FROM ev.prev_to) \
       OR (ev.next_id IS NULL AND ev.to_status <> x.status::text)";

fn checks(options: &CheckOptions, parked: bool, flow: bool, waits: bool) -> Vec<Check> {
    use InvariantKind as K;
    let plain = |kind, sql: &str| Check {
        kind,
        sql: sql.to_owned(),
        extra: Extra::None,
        global: false,
    };
    // History may hold replays (engine::replay_execution) besides ordinary transitions.
    let step_pairs = legal_pairs(StepStatus::ALL, StepStatus::as_str, |a, b| {
        a.can_transition_to(b) || a.can_replay_to(b)
    });
    let execution_pairs = legal_pairs(ExecutionStatus::ALL, ExecutionStatus::as_str, |a, b| {
        a.can_transition_to(b) || a.can_replay_to(b)
    });
    let mut checks = vec![plain(
        K::RunningWithoutLease,
        &format!(
            "SELECT s.execution_id, s.id AS step_id, \
             format('running step %s: locked_by %s, locked_until %s', s.node_id, \
                    quote_nullable(s.locked_by), quote_nullable(s.locked_until)) AS detail \
             FROM {STEPS} AND s.status = 'running' AND (s.locked_by IS NULL OR s.locked_until IS NULL)"
        ),
    )];
    if let Some(grace) = options.expired_lease_grace {
        checks.push(Check {
            kind: K::ExpiredLease,
            sql: format!(
                "SELECT s.execution_id, s.id AS step_id, \
                 format('running step %s: the lease of %s expired at %s (%s ago)', s.node_id, \
                        s.locked_by, s.locked_until, date_trunc('second', now() - s.locked_until)) AS detail \
                 FROM {STEPS} AND s.status = 'running' \
                   AND s.locked_until < now() - make_interval(secs => $4)"
            ),
            extra: Extra::Seconds(grace.as_secs_f64()),
            global: false,
        });
    }
    checks.extend([
        plain(
            K::LeaseWhileNotRunning,
            &format!(
                "SELECT s.execution_id, s.id AS step_id, \
                 format('%s step %s: locked_by %s, locked_until %s', s.status, s.node_id, \
                        quote_nullable(s.locked_by), quote_nullable(s.locked_until)) AS detail \
                 FROM {STEPS} AND s.status <> 'running' \
                   AND (s.locked_by IS NOT NULL OR s.locked_until IS NOT NULL)"
            ),
        ),
        plain(
            K::UpstreamPendingMismatch,
            &format!(
                "{UPSTREAM} SELECT t.execution_id, t.id AS step_id, \
                 format('pending step %s: upstream_pending %s, but %s of its %s upstream steps are unfinished', \
                        t.node_id, t.upstream_pending, coalesce(up.unfinished, 0), coalesce(up.upstream, 0)) AS detail \
                 FROM s t LEFT JOIN up ON up.execution_id = t.execution_id AND up.node_id = t.node_id \
                 WHERE t.status = 'pending' AND t.upstream_pending <> coalesce(up.unfinished, 0)"
            ),
        ),
        plain(
            K::RanBeforeUpstream,
            &format!(
                "{UPSTREAM} SELECT t.execution_id, t.id AS step_id, \
                 format('%s step %s: upstream_pending %s, %s of its %s upstream steps are unfinished', \
                        t.status, t.node_id, t.upstream_pending, coalesce(up.unfinished, 0), \
                        coalesce(up.upstream, 0)) AS detail \
                 FROM s t LEFT JOIN up ON up.execution_id = t.execution_id AND up.node_id = t.node_id \
                 WHERE t.status IN ('running', 'completed', 'failed') \
                   AND (t.upstream_pending <> 0 OR coalesce(up.unfinished, 0) > 0)"
            ),
        ),
        plain(
            K::DanglingDownstream,
            // An anti-join within the batch (a hash join), not a probe per edge.
            "WITH s AS (SELECT id, execution_id, node_id, downstream FROM execution_steps \
                        WHERE execution_id BETWEEN $1 AND $2) \
             SELECT s.execution_id, s.id AS step_id, \
             format('step %s: downstream node %s has no step in the execution', s.node_id, d.node_id) AS detail \
             FROM s CROSS JOIN LATERAL unnest(s.downstream) AS d(node_id) \
             LEFT JOIN s t ON t.execution_id = s.execution_id AND t.node_id = d.node_id \
             WHERE t.id IS NULL",
        ),
        plain(
            K::PendingUnderFinalExecution,
            "SELECT s.execution_id, s.id AS step_id, \
             format('step %s is pending under a %s execution', s.node_id, e.status) AS detail \
             FROM executions e JOIN execution_steps s ON s.execution_id = e.id \
             WHERE e.id BETWEEN $1 AND $2 AND e.status IN ('completed', 'failed', 'cancelled') \
               AND s.status = 'pending'",
        ),
        plain(
            K::CompletedWithUnfinishedSteps,
            "SELECT e.id AS execution_id, NULL::uuid AS step_id, \
             format('completed execution has %s pending and %s running steps', \
                    count(*) FILTER (WHERE s.status = 'pending'), \
                    count(*) FILTER (WHERE s.status = 'running')) AS detail \
             FROM executions e JOIN execution_steps s ON s.execution_id = e.id \
             WHERE e.id BETWEEN $1 AND $2 AND e.status = 'completed' \
               AND s.status IN ('pending', 'running') \
             GROUP BY e.id",
        ),
        plain(
            K::CompletedWithFailedStep,
            "SELECT s.execution_id, s.id AS step_id, \
             format('step %s failed (%s) under a completed execution', s.node_id, \
                    coalesce(s.error, 'no error message')) AS detail \
             FROM executions e JOIN execution_steps s ON s.execution_id = e.id \
             WHERE e.id BETWEEN $1 AND $2 AND e.status = 'completed' AND s.status = 'failed'",
        ),
        plain(
            K::RunningWithFailedStep,
            "SELECT s.execution_id, s.id AS step_id, \
             format('step %s failed (%s) but its execution is still running', s.node_id, \
                    coalesce(s.error, 'no error message')) AS detail \
             FROM executions e JOIN execution_steps s ON s.execution_id = e.id \
             WHERE e.id BETWEEN $1 AND $2 AND e.status = 'running' AND s.status = 'failed'",
        ),
        plain(
            K::RunningWithAllStepsFinal,
            "SELECT e.id AS execution_id, NULL::uuid AS step_id, \
             format('running execution whose %s steps are all final (%s completed, %s skipped), last change %s', \
                    count(*), count(*) FILTER (WHERE s.status = 'completed'), \
                    count(*) FILTER (WHERE s.status = 'skipped'), max(s.updated_at)) AS detail \
             FROM executions e JOIN execution_steps s ON s.execution_id = e.id \
             WHERE e.id BETWEEN $1 AND $2 AND e.status = 'running' \
             GROUP BY e.id HAVING bool_and(s.status IN ('completed', 'skipped'))",
        ),
        plain(
            K::StepStartedUnderPendingExecution,
            "SELECT s.execution_id, s.id AS step_id, \
             format('step %s is %s but its execution never started (pending)', s.node_id, s.status) AS detail \
             FROM executions e JOIN execution_steps s ON s.execution_id = e.id \
             WHERE e.id BETWEEN $1 AND $2 AND e.status = 'pending' AND s.status <> 'pending'",
        ),
        Check {
            kind: K::StepEventChain,
            sql: CHAIN
                .replace("{filter}", "v.step_id IS NOT NULL")
                .replace("{who}", "step_id")
                .replace("{step_id}", "ev.step_id")
                .replace("{what}", "step")
                .replace("{table}", "execution_steps")
                .replace("{owner}", "execution_id"),
            extra: Extra::Pairs(step_pairs),
            global: false,
        },
        Check {
            kind: K::ExecutionEventChain,
            sql: CHAIN
                .replace("{filter}", "v.step_id IS NULL")
                .replace("{who}", "execution_id")
                .replace("{step_id}", "NULL::uuid")
                .replace("{what}", "execution")
                .replace("{table}", "executions")
                .replace("{owner}", "id"),
            extra: Extra::Pairs(execution_pairs),
            global: false,
        },
        plain(
            K::ExecutionCompletedAtMissing,
            "SELECT e.id AS execution_id, NULL::uuid AS step_id, \
             format('%s execution without completed_at', e.status) AS detail \
             FROM executions e WHERE e.id BETWEEN $1 AND $2 \
               AND e.status IN ('completed', 'failed', 'cancelled') AND e.completed_at IS NULL",
        ),
        plain(
            K::StepCompletedAtMissing,
            &format!(
                "SELECT s.execution_id, s.id AS step_id, \
                 format('%s step %s without completed_at', s.status, s.node_id) AS detail \
                 FROM {STEPS} AND s.status IN ('completed', 'failed', 'skipped') AND s.completed_at IS NULL"
            ),
        ),
    ]);
    if parked {
        checks.push(plain(
            K::ParkedMismatch,
            "SELECT s.execution_id, s.id AS step_id, \
             format('pending step %s has parked = %s under a %s execution', s.node_id, s.parked, e.status) AS detail \
             FROM executions e JOIN execution_steps s ON s.execution_id = e.id \
             WHERE e.id BETWEEN $1 AND $2 AND s.status = 'pending' \
               AND e.status IN ('pending', 'running', 'paused') \
               AND s.parked IS DISTINCT FROM (e.status <> 'running')",
        ));
    }
    if flow {
        checks.extend(flow_checks(options));
    }
    if waits {
        checks.extend(wait_checks(options));
    }
    checks
}

/// The ready steps of the batch that are throttled.
const THROTTLED: &str = "execution_steps s WHERE s.execution_id BETWEEN $1 AND $2 \
    AND s.throttled AND s.status = 'pending' AND s.upstream_pending = 0 AND NOT s.parked";

/// Per limited key: its limit, running and admitted steps.
const KEY_USE: &str = "\
    (SELECT c.key, c.max_running, \
            (SELECT count(*) FROM execution_steps r \
              WHERE r.concurrency_key = c.key AND r.status = 'running') AS running, \
            (SELECT count(*) FROM execution_steps a \
              WHERE a.concurrency_key = c.key AND a.status = 'pending' AND a.upstream_pending = 0 \
                AND NOT a.parked AND NOT a.throttled) AS admitted \
       FROM concurrency_limits c) k";

/// Checks of queues, keys and delayed starts (migration 000025).
fn flow_checks(options: &CheckOptions) -> Vec<Check> {
    use InvariantKind as K;
    let global = |kind, sql: String| Check {
        kind,
        sql,
        extra: Extra::None,
        global: true,
    };
    let batch = |kind, sql: String| Check {
        kind,
        sql,
        extra: Extra::None,
        global: false,
    };
    // Global rows name an execution with a step concerned, or the nil id.
    let nil = "'00000000-0000-0000-0000-000000000000'::uuid";
    let mut checks = vec![
        global(
            K::ConcurrencyKeyOverLimit,
            format!(
                "SELECT coalesce((SELECT r.execution_id FROM execution_steps r \
                                   WHERE r.concurrency_key = k.key AND r.status = 'running' LIMIT 1), {nil}) \
                          AS execution_id, NULL::uuid AS step_id, \
                 format('key %s: %s running + %s admitted > max_running %s', \
                        k.key, k.running, k.admitted, k.max_running) AS detail \
                 FROM {KEY_USE} WHERE k.running + k.admitted > k.max_running"
            ),
        ),
        batch(
            K::ThrottledWithoutLimit,
            format!(
                "SELECT s.execution_id, s.id AS step_id, \
                 format('step %s is throttled but key %s has no limit', s.node_id, \
                        quote_nullable(s.concurrency_key)) AS detail \
                 FROM {THROTTLED} \
                   AND NOT EXISTS (SELECT 1 FROM concurrency_limits c WHERE c.key = s.concurrency_key)"
            ),
        ),
        batch(
            K::ThrottledWithFreeSlot,
            format!(
                "SELECT s.execution_id, s.id AS step_id, \
                 format('step %s is throttled but key %s has %s running + %s admitted of %s', \
                        s.node_id, k.key, k.running, k.admitted, k.max_running) AS detail \
                 FROM (SELECT s.* FROM {THROTTLED}) s JOIN {KEY_USE} ON k.key = s.concurrency_key \
                 WHERE k.running + k.admitted < k.max_running"
            ),
        ),
        global(
            K::QueueCounterMismatch,
            format!(
                "SELECT {nil} AS execution_id, NULL::uuid AS step_id, \
                 format('queue %s: running counter %s, running steps %s', q.name, q.running, \
                        (SELECT count(*) FROM execution_steps r WHERE r.status = 'running' \
                            AND workflow_db_step_queue(r.queue, r.node_type) = q.name)) AS detail \
                 FROM queues q \
                 WHERE q.running <> (SELECT count(*) FROM execution_steps r WHERE r.status = 'running' \
                                       AND workflow_db_step_queue(r.queue, r.node_type) = q.name)"
            ),
        ),
        global(
            K::QueueOverLimit,
            format!(
                "SELECT {nil} AS execution_id, NULL::uuid AS step_id, \
                 format('queue %s: %s running steps > max_running %s', q.name, r.n, q.max_running) \
                     AS detail \
                 FROM queues q CROSS JOIN LATERAL \
                      (SELECT count(*) AS n FROM execution_steps s WHERE s.status = 'running' \
                          AND workflow_db_step_queue(s.queue, s.node_type) = q.name) r \
                 WHERE r.n > q.max_running"
            ),
        ),
    ];
    if let Some(grace) = options.expired_lease_grace {
        checks.push(Check {
            kind: K::DelayedStartOverdue,
            sql: "SELECT e.id AS execution_id, NULL::uuid AS step_id, \
                  format('pending execution due at %s (%s ago)', e.start_after, \
                         date_trunc('second', now() - e.start_after)) AS detail \
                  FROM executions e WHERE e.id BETWEEN $1 AND $2 AND e.status = 'pending' \
                    AND e.start_after < now() - make_interval(secs => $4)"
                .to_owned(),
            extra: Extra::Seconds(grace.as_secs_f64()),
            global: false,
        });
    }
    checks
}

/// The batch's ready steps (pending, upstream done); `{STEPS}` with more.
const READY: &str = "execution_steps s WHERE s.execution_id BETWEEN $1 AND $2 \
    AND s.status = 'pending' AND s.upstream_pending = 0";

/// Checks of timers and signals (migration 000039).
fn wait_checks(options: &CheckOptions) -> Vec<Check> {
    use InvariantKind as K;
    let batch = |kind, sql: String| Check {
        kind,
        sql,
        extra: Extra::None,
        global: false,
    };
    let mut checks = vec![batch(
        K::TimerUnarmed,
        format!(
            "SELECT s.execution_id, s.id AS step_id, \
             format('ready timer step %s has no wake_at (wait_seconds %s, wait_until %s)', s.node_id, \
                    quote_nullable(s.wait_seconds), quote_nullable(s.wait_until)) AS detail \
             FROM {READY} AND s.node_type = 'workflow_db.timer' AND s.wake_at IS NULL"
        ),
    )];
    if let Some(grace) = options.expired_lease_grace {
        // Its predicate implies that of execution_steps_wake_idx.
        checks.push(Check {
            kind: K::WaitOverdue,
            sql: format!(
                "SELECT s.execution_id, s.id AS step_id, \
                 format('ready %s step %s was due at %s (%s ago)', s.node_type, s.node_id, s.wake_at, \
                        date_trunc('second', now() - s.wake_at)) AS detail \
                 FROM {READY} AND NOT s.parked \
                   AND s.node_type IN ('workflow_db.timer', 'workflow_db.signal') \
                   AND s.wake_at < now() - make_interval(secs => $4)"
            ),
            extra: Extra::Seconds(grace.as_secs_f64()),
            global: false,
        });
    }
    checks.extend([
        // The batch's undelivered signals (execution_signals_undelivered_idx)
        // by waiting step. statement_timestamp(), not now(): a signal whose
        // trigger woke the step just before this transaction's snapshot has
        // a wake_at after the transaction's start.
        batch(
            K::SignalUndelivered,
            "SELECT s.execution_id, s.id AS step_id, \
             format('step %s waits for signal %L (wake_at %s), but %s undelivered signal(s) of that name wait, \
                     the oldest %s sent at %s', s.node_id, s.wait_signal, quote_nullable(s.wake_at), count(*), \
                    (array_agg(g.id ORDER BY g.sent_at, g.id))[1], min(g.sent_at)) AS detail \
             FROM execution_signals g \
             JOIN execution_steps s ON s.execution_id = g.execution_id AND s.wait_signal = g.name \
             WHERE g.execution_id BETWEEN $1 AND $2 AND g.delivered_to IS NULL \
               AND s.status = 'pending' AND s.upstream_pending = 0 \
               AND (s.wake_at IS NULL OR s.wake_at > statement_timestamp()) \
             GROUP BY s.execution_id, s.id, s.node_id, s.wait_signal, s.wake_at"
                .to_owned(),
        ),
        // From the batch's steps to the signals delivered to them, one probe
        // of execution_signals_delivered_to_key per step: delivered signals
        // have no index by execution, and a hash join would read the whole
        // table once per batch (the planner prefers it while the table is
        // small; OFFSET 0 keeps the subquery, and so the probes, as they
        // are). Named by the signal's execution.
        batch(
            K::SignalDeliveryMismatch,
            "SELECT g.execution_id, s.id AS step_id, \
             format('signal %s %L was delivered at %s to %s step %s (%s, waits for %s) of execution %s', \
                    g.id, g.name, g.delivered_at, s.status, s.node_id, quote_nullable(s.node_type), \
                    quote_nullable(s.wait_signal), s.execution_id) AS detail \
             FROM execution_steps s \
             CROSS JOIN LATERAL (SELECT g.id, g.execution_id, g.name, g.delivered_at FROM execution_signals g \
                                 WHERE g.delivered_to = s.id OFFSET 0) g \
             WHERE s.execution_id BETWEEN $1 AND $2 \
               AND (g.execution_id <> s.execution_id OR s.wait_signal IS DISTINCT FROM g.name \
                    OR s.status <> 'completed')"
                .to_owned(),
        ),
        // A probe of execution_signals_delivered_to_key per completed signal
        // step of the batch (OFFSET 0: not a hash anti-join over the table).
        batch(
            K::SignalStepWithoutSignal,
            format!(
                "SELECT s.execution_id, s.id AS step_id, \
                 format('completed signal step %s (waits for %s) took no signal', s.node_id, \
                        quote_nullable(s.wait_signal)) AS detail \
                 FROM {STEPS} AND s.node_type = 'workflow_db.signal' AND s.status = 'completed' \
                   AND NOT EXISTS (SELECT 1 FROM execution_signals g WHERE g.delivered_to = s.id OFFSET 0)"
            ),
        ),
    ]);
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_unique_names_that_parse_back() {
        let mut names: Vec<&str> = InvariantKind::ALL.iter().map(|k| k.name()).collect();
        for kind in InvariantKind::ALL {
            assert_eq!(InvariantKind::from_name(kind.name()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.name())
            );
            assert!(!kind.explanation().is_empty());
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), InvariantKind::ALL.len());
    }

    #[test]
    fn wait_kinds_are_errors_but_an_overdue_wait() {
        use InvariantKind as K;
        for kind in [
            K::TimerUnarmed,
            K::SignalUndelivered,
            K::SignalDeliveryMismatch,
            K::SignalStepWithoutSignal,
        ] {
            assert_eq!(kind.severity(), Severity::Error, "{kind}");
        }
        assert_eq!(K::WaitOverdue.severity(), Severity::Warning);
        assert_eq!(K::from_name("wait_overdue"), Some(K::WaitOverdue));
        // Without a grace, the overdue-wait check is not run; the others are.
        let mut options = CheckOptions::default();
        let kinds =
            |o: &CheckOptions| -> Vec<K> { wait_checks(o).iter().map(|c| c.kind).collect() };
        assert_eq!(kinds(&options).len(), 5);
        options.expired_lease_grace = None;
        assert!(!kinds(&options).contains(&K::WaitOverdue));
        assert_eq!(kinds(&options).len(), 4);
    }

    #[test]
    fn legal_pairs_follow_the_state_machines() {
        let steps = legal_pairs(StepStatus::ALL, StepStatus::as_str, |a, b| {
            a.can_transition_to(b)
        });
        assert!(steps.contains(&"running>pending".to_owned()));
        assert!(!steps.contains(&"completed>running".to_owned()));
        assert_eq!(steps.len(), 5);
    }

    #[test]
    fn a_report_with_warnings_only_is_clean() {
        let mut report = InvariantReport::default();
        report.counts.insert(InvariantKind::ExpiredLease, 2);
        assert!(report.is_clean());
        assert_eq!((report.errors(), report.warnings()), (0, 2));
        report
            .counts
            .insert(InvariantKind::RunningWithAllStepsFinal, 1);
        assert!(!report.is_clean());
        assert!(report.truncated());
    }
}
