//! A seeded, randomized concurrency torture of the engine (feature
//! `test-utils`): several threads, each with its own connection, run random
//! engine operations against one database for a bounded time — start
//! executions of random DAGs (chains, diamonds, wide fan-out/fan-in, layered,
//! some of ~200 nodes) and sub-executions, claim, complete (one by one and in
//! batches), fail with backoff, heartbeat, crash (claim and walk away from a
//! short lease), reclaim, pause, resume, cancel and prune — with random
//! `pg_sleep`s inside multi-statement transactions so that interleavings vary.
//! Flow control is in the mix: executions start with random priorities, a
//! concurrency key from a small set (`KEYS`: two limited at setup, one
//! not), now and then a delayed start or a dedup key; some nodes run on a
//! queue of their own (`QUEUES`: one limited at setup, both paused and
//! resumed now and then), some override the priority; claims take any
//! queue ([`engine::claim_steps`]) or named ones ([`engine::claim_from`]);
//! one thread raises (never lowers) the limits; delayed starts are started
//! by [`engine::start_due_executions`] and throttled steps admitted by
//! [`engine::rebalance_concurrency_keys`] as operations of their own.
//!
//! Timers and signals are in the mix too: some workflows have timer nodes
//! (0 to 50 ms, now and then a `timer_until` in the past, and workflows made
//! on the fly with a `timer_until` up to 200 ms in the past or the future)
//! and signal nodes (one in three with a timeout of 20 to 300 ms), as roots
//! and in the middle of DAGs, two of them sometimes waiting for the same
//! name. Due waits are fired by [`engine::fire_due_waits`] from a thread of
//! their own (a maintenance leader) and from the workers now and then (also
//! in a slow transaction, as several leaders would); a signal-sender thread
//! and the workers send signals ([`engine::send_signal`]) to executions
//! with signal nodes: mostly to a step that waits, sometimes before the step
//! is reached, twice, to a name no step will take, inside a transaction that
//! pauses the execution, and to executions seen final, where
//! [`Error::SignalRefused`] is expected (counted, like a signal to an
//! execution that finished meanwhile). A sampler checks four times a second,
//! in one statement, that every ready wait step is armed (a timer has a
//! `wake_at`; a signal wait with a signal in its mailbox is due). Triggers
//! log every status change of a wait step and every signal sent and
//! delivered, and at the end the logs are checked (the executions pruned
//! meanwhile included): each completed signal step took exactly one signal,
//! of its execution and name, and its output is that signal's payload; no
//! signal was delivered twice; every completed timer fired when due and not
//! before its upstream steps finished plus its delay (or its time); every
//! timed-out signal wait failed after its deadline, which its error names;
//! each wait step went `pending -> running -> completed|failed` under
//! [`engine::WAITS_WORKER`], or was skipped (its execution cancelled or
//! failed first), which the history of the executions left at the end
//! shows too; and what the reports of `fire_due_waits` and `send_signal`
//! counted is what the logs hold. The report's [`WaitSummary`] has the counts
//! (timers fired, signals sent, delivered, refused, timed out) and
//! [`WaitSummary::missing`] names the kinds a run did not exercise.
//!
//! Then it drains (resumes every paused queue and execution, restores the
//! setup limits for a moment, then lifts them, starts what is due, fires
//! due waits, signals the steps still waiting without timeout, claims and
//! completes until nothing is left) and checks that every execution is
//! final and that
//! [`check_invariants`](crate::engine::check_invariants) finds nothing (no
//! error, and no throttled step with a free slot after a final rebalance).
//!
//! Expected refusals ([`Error::LeaseLost`], [`Error::TransitionConflict`],
//! [`Error::IllegalTransition`], [`Error::NotFound`], a sub-execution whose
//! parent was pruned, a signal refused by a final execution) are counted;
//! any other error (a deadlock, a serialization failure, a trigger's
//! exception, a statement timeout) fails the run (the deadlocks and
//! serialization failures of wait operations are also counted apart). While the threads run, a checker thread runs the invariant
//! checker every few seconds (each batch sees one snapshot, so a committed
//! state must already be consistent), a sampler thread counts ten times a
//! second, in one statement, the running steps of every configured queue
//! (against its limit and its counter) and the running and admitted steps of
//! every limited key (against its limit), and delete triggers installed in the
//! database record any execution deleted while unfinished and any step
//! deleted while running under a live lease.
//!
//! All random choices come from one seed ([`TortureConfig::seed`]), so a run
//! is reproducible as far as the operations each thread picks (the
//! interleavings depend on timing). Used by `tests/torture.rs` (bounded, in
//! CI) and `examples/torture.rs` (long runs):
//!
//! ```no_run
//! use workflow_db::testing::TestDatabase;
//! use workflow_db::torture::{self, TortureConfig};
//!
//! let db = TestDatabase::new();
//! let config = TortureConfig::from_env(); // TORTURE_SEED, TORTURE_SECONDS, TORTURE_THREADS
//! let report = torture::run(db.url(), &config)?;
//! assert!(report.passed(), "{report}");
//! # Ok::<(), workflow_db::Error>(())
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Double, Integer, Nullable, Text, Uuid as SqlUuid};
use serde_json::json;
use uuid::Uuid;

use crate::config::DatabaseUrl;
use crate::engine::{self, Backoff, CheckOptions, InvariantKind, InvariantReport, Violation};
use crate::error::{Error, Result};
use crate::graph::{Edge, Node, WorkflowGraph};
use crate::models::{ExecutionStep, Lease, NewExecution, NewWorkflow};

mod waits;

pub use waits::{WaitChecked, WaitCounts, WaitSummary};

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TortureConfig {
    /// The seed of every random choice.
    pub seed: u64,
    /// Worker threads, each with its own connection (default 4).
    pub threads: usize,
    /// How long the threads run random operations (default 40 s).
    pub duration: Duration,
    /// How long the drain may take before the run is declared stuck (default 60 s).
    pub drain_timeout: Duration,
    /// How often the checker thread checks the invariants while the threads
    /// run (default every 3 s); `None`: only at the end.
    pub check_every: Option<Duration>,
    /// No new executions while this many are running or paused (default 150).
    pub max_live_executions: i64,
    /// Also run transactions that break the engine's lock order (default
    /// false): claim and then finish steps in one transaction, and finish
    /// steps of several executions in random order in one transaction. The
    /// engine does not promise these cannot deadlock (see `docs/engine.md`),
    /// and any session may be chosen as the victim, so with this set every
    /// deadlock counts as an expected refusal; the invariants still must hold.
    pub cross_execution: bool,
    /// Print progress lines on stderr.
    pub verbose: bool,
}

impl Default for TortureConfig {
    fn default() -> Self {
        TortureConfig {
            seed: seed_from_clock(),
            threads: 4,
            duration: Duration::from_secs(40),
            drain_timeout: Duration::from_secs(60),
            check_every: Some(Duration::from_secs(3)),
            max_live_executions: 150,
            cross_execution: false,
            verbose: false,
        }
    }
}

impl TortureConfig {
    /// The defaults, overridden by `TORTURE_SEED`, `TORTURE_SECONDS`,
    /// `TORTURE_THREADS` and `TORTURE_CROSS` (1: [`TortureConfig::cross_execution`])
    /// where set (and parsable).
    pub fn from_env() -> Self {
        let mut config = TortureConfig::default();
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(seed) = var("TORTURE_SEED") {
            config.seed = seed;
        }
        if let Some(secs) = var("TORTURE_SECONDS") {
            config.duration = Duration::from_secs(secs);
        }
        if let Some(threads) = var("TORTURE_THREADS") {
            config.threads = (threads as usize).max(1);
        }
        if let Some(cross) = var("TORTURE_CROSS") {
            config.cross_execution = cross != 0;
        }
        config
    }
}

fn seed_from_clock() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    // Short enough to type back, still different every run.
    SplitMix(nanos ^ u64::from(std::process::id())).next() % 1_000_000_000
}

/// An error that fails the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// When, from the start of the run.
    pub at: Duration,
    /// Which thread (`usize::MAX` for the drain, `usize::MAX - 1` for the
    /// thread firing due waits, `usize::MAX - 2` for the signal sender).
    pub thread: usize,
    /// The operation that failed.
    pub op: &'static str,
    /// The error, with its SQLSTATE class where PostgreSQL gave one.
    pub error: String,
}

/// A kind of broken invariant the checker thread saw while the threads ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// When it was first seen, from the start of the run.
    pub at: Duration,
    /// What was broken.
    pub kind: InvariantKind,
    /// The most violations of this kind seen in one check.
    pub max_count: u64,
    /// The first violation seen.
    pub example: Violation,
}

/// What a delete trigger recorded: an execution deleted while unfinished, or
/// a step deleted while running under a live lease.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct AuditRow {
    /// `unfinished execution deleted` or `running step with a live lease deleted`.
    #[diesel(sql_type = Text)]
    pub what: String,
    /// The execution.
    #[diesel(sql_type = SqlUuid)]
    pub execution_id: Uuid,
    /// The step, for a step.
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub step_id: Option<Uuid>,
    /// Its status when deleted.
    #[diesel(sql_type = Text)]
    pub status: String,
}

/// The outcome of [`run`].
#[derive(Debug, Clone)]
pub struct TortureReport {
    /// The configuration it ran with (the seed reproduces it).
    pub config: TortureConfig,
    /// How long the threads actually ran.
    pub ran_for: Duration,
    /// Operations attempted, by name.
    pub ops: BTreeMap<&'static str, u64>,
    /// Expected refusals, by `op: kind`.
    pub expected: BTreeMap<String, u64>,
    /// The first unexpected errors (at most 100), in time order.
    pub failures: Vec<Failure>,
    /// How many unexpected errors there were in all.
    pub failure_count: u64,
    /// Broken invariants seen while the threads ran, by first detection.
    pub detections: Vec<Detection>,
    /// Checks run while the threads ran.
    pub checks_during_run: u64,
    /// Samples of the queues' and keys' running steps taken while the
    /// threads ran (each one statement, compared with the limits and
    /// counters in the same snapshot; a breach is a [`Detection`]).
    pub samples_during_run: u64,
    /// How long the drain took, and whether it ended with every execution final.
    pub drain: Duration,
    /// Whether the drain ended with every execution final.
    pub drained: bool,
    /// Executions by status at the end.
    pub statuses: BTreeMap<String, i64>,
    /// Up to 10 executions that are not final at the end.
    pub unfinished: Vec<(Uuid, String)>,
    /// The invariant check after the drain.
    pub final_check: InvariantReport,
    /// What the delete triggers recorded (the first 100 rows).
    pub audit: Vec<AuditRow>,
    /// Timers and signals: what was done, and what was wrong with them
    /// while the threads ran and in the logs at the end.
    pub waits: WaitSummary,
}

impl TortureReport {
    /// Nothing unexpected: no error, no broken invariant during or after the
    /// run, every execution final, no throttled step left with a free slot
    /// after the final rebalance (a warning elsewhere), nothing deleted that
    /// was in use, nothing wrong with a timer or a signal
    /// ([`WaitSummary::violations`]).
    pub fn passed(&self) -> bool {
        self.failure_count == 0
            && self.detections.is_empty()
            && self.drained
            && self.final_check.is_clean()
            && self.final_check.count(InvariantKind::ThrottledWithFreeSlot) == 0
            && self.audit.is_empty()
            && self.waits.violation_count == 0
    }

    /// The time of the first failure of any kind (error or broken invariant
    /// seen while running); `None` when there was none or it was found only
    /// after the drain.
    pub fn first_failure(&self) -> Option<Duration> {
        let error = self.failures.first().map(|f| f.at);
        let detection = self.detections.iter().map(|d| d.at).min();
        match (error, detection) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl fmt::Display for TortureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "torture seed {} ({} threads, {:.1} s of operations, drain {:.1} s): {}",
            c.seed,
            c.threads,
            self.ran_for.as_secs_f64(),
            self.drain.as_secs_f64(),
            if self.passed() { "PASSED" } else { "FAILED" }
        )?;
        if let Some(at) = self.first_failure() {
            writeln!(f, "first failure after {:.1} s", at.as_secs_f64())?;
        }
        let total: u64 = self.ops.values().sum();
        write!(f, "operations ({total}):")?;
        for (op, n) in &self.ops {
            write!(f, " {op} {n},")?;
        }
        writeln!(f)?;
        write!(f, "expected refusals:")?;
        for (what, n) in &self.expected {
            write!(f, " {what} {n},")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "unexpected errors: {} (first {} listed)",
            self.failure_count,
            self.failures.len().min(20)
        )?;
        for e in self.failures.iter().take(20) {
            writeln!(
                f,
                "  {:>7.2} s thread {} {}: {}",
                e.at.as_secs_f64(),
                thread_name(e.thread),
                e.op,
                e.error
            )?;
        }
        writeln!(
            f,
            "broken invariants seen while running ({} checks, {} limit samples): {}",
            self.checks_during_run,
            self.samples_during_run,
            self.detections.len()
        )?;
        for d in &self.detections {
            writeln!(
                f,
                "  {:>7.2} s {} (up to {} at once), e.g. {}",
                d.at.as_secs_f64(),
                d.kind,
                d.max_count,
                d.example
            )?;
        }
        write!(f, "executions at the end:")?;
        for (status, n) in &self.statuses {
            write!(f, " {status} {n},")?;
        }
        writeln!(f)?;
        if !self.drained {
            writeln!(f, "the drain did not finish; not final:")?;
            for (id, status) in &self.unfinished {
                writeln!(f, "  {id} {status}")?;
            }
        }
        writeln!(f, "final check: {}", self.final_check)?;
        // A few of each kind (the list is in kind order, so the first kind
        // would hide the others).
        for kind in self.final_check.counts.keys() {
            for v in self
                .final_check
                .violations
                .iter()
                .filter(|v| v.kind == *kind)
                .take(3)
            {
                writeln!(f, "  {v}")?;
            }
        }
        writeln!(
            f,
            "deleted while in use: {}{}",
            self.audit.len(),
            if self.audit.len() == AUDIT_LIMIT {
                " or more"
            } else {
                ""
            }
        )?;
        for a in self.audit.iter().take(10) {
            writeln!(
                f,
                "  {} execution {} step {:?} ({})",
                a.what, a.execution_id, a.step_id, a.status
            )?;
        }
        write!(f, "{}", self.waits)
    }
}

fn thread_name(thread: usize) -> String {
    match thread {
        usize::MAX => "drain".into(),
        waits::LEADER => "waits-leader".into(),
        waits::SENDER => "signal-sender".into(),
        _ => thread.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Randomness.

/// splitmix64: small, fast, good enough, and the same on every platform.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len() as u64) as usize)
        }
    }

    /// An index chosen by weight.
    fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut x = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

// ---------------------------------------------------------------------------
// Flow control.

/// The concurrency keys executions start with: the first [`LIMITED_KEYS`]
/// get a limit of 1 to 3 at setup (raised now and then, up to
/// [`KEY_LIMIT_CAP`], by thread 0 only, so that no limit is ever lowered
/// while the threads run), the last none.
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const LIMITED_KEYS: usize = 2;
const KEY_LIMIT_CAP: i32 = 5;

/// The queues some nodes name in `config.queue` (the others run on their
/// node type's, [`NODE_TYPE`]): the first gets a limit of 2 to 4 running
/// steps at setup (raised now and then up to [`QUEUE_LIMIT_CAP`] by thread
/// 0), the second none; both are paused and resumed now and then.
const QUEUES: [&str; 2] = ["qa", "qb"];
const LIMITED_QUEUE: &str = QUEUES[0];
const QUEUE_LIMIT_CAP: i32 = 6;

/// Every node's type, so the queue of a node without `config.queue`.
const NODE_TYPE: &str = "task";

// ---------------------------------------------------------------------------
// Workflows.

fn node(rng: &mut SplitMix, id: String) -> Node {
    // Retry budgets 0..=3; 0 makes the first failure fail the execution.
    let mut config = json!({ "max_retries": rng.below(4) });
    // Flow control: some nodes run on a queue of their own, a few override
    // their execution's priority.
    match rng.below(100) {
        0..12 => config["queue"] = json!(QUEUES[0]),
        12..22 => config["queue"] = json!(QUEUES[1]),
        _ => {}
    }
    if rng.chance(10) {
        config["priority"] = json!(rng.range(0, 4) as i64 - 1);
    }
    Node::new(id, NODE_TYPE).config(config)
}

/// A layered DAG: `layers` layers of `min_width..=max_width` nodes, every
/// node after the first layer depending on 1..=`fan_in` nodes of the
/// previous one.
fn layered(
    rng: &mut SplitMix,
    layers: u64,
    (min_width, max_width): (u64, u64),
    fan_in: u64,
) -> WorkflowGraph {
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    let mut previous: Vec<String> = Vec::new();
    for l in 0..layers {
        let w = rng.range(min_width, max_width);
        let mut current = Vec::new();
        for i in 0..w {
            let id = format!("l{l}n{i}");
            nodes.push(node(rng, id.clone()));
            if !previous.is_empty() {
                let k = rng.range(1, fan_in.min(previous.len() as u64));
                let mut parents: Vec<&String> = Vec::new();
                while (parents.len() as u64) < k {
                    if let Some(p) = rng.pick(&previous) {
                        if !parents.contains(&p) {
                            parents.push(p);
                        }
                    }
                }
                for p in parents {
                    edges.push(Edge::new(p.clone(), id.clone()));
                }
            }
            current.push(id);
        }
        previous = current;
    }
    WorkflowGraph { nodes, edges }
}

fn chain(rng: &mut SplitMix, n: u64) -> WorkflowGraph {
    let nodes: Vec<Node> = (0..n).map(|i| node(rng, format!("c{i}"))).collect();
    let edges = (1..n)
        .map(|i| Edge::new(format!("c{}", i - 1), format!("c{i}")))
        .collect();
    WorkflowGraph { nodes, edges }
}

/// `root -> k middle nodes -> sink`.
fn fan(rng: &mut SplitMix, k: u64) -> WorkflowGraph {
    let mut nodes = vec![node(rng, "root".into()), node(rng, "sink".into())];
    let mut edges = Vec::new();
    for i in 0..k {
        let id = format!("m{i}");
        nodes.push(node(rng, id.clone()));
        edges.push(Edge::new("root", id.clone()));
        edges.push(Edge::new(id, "sink"));
    }
    WorkflowGraph { nodes, edges }
}

/// Workflows with how often each is started.
type Weighted = Vec<(Uuid, u64)>;

/// The workflows of a run, with how often each is started, and the ones
/// with signal nodes. Timers and signal waits ([`waits`]) are sprinkled
/// over some of the shapes (roots and middle nodes alike), and some shapes
/// are made of them.
fn workflows(conn: &mut PgConnection, rng: &mut SplitMix) -> Result<(Weighted, HashSet<Uuid>)> {
    let mut shapes: Vec<(&str, WorkflowGraph, u64)> =
        vec![("single", chain(rng, 1), 4), ("diamond", fan(rng, 2), 10)];
    for i in 0..3 {
        let n = rng.range(2, 8);
        let g = chain(rng, n);
        let g = if i < 2 {
            waits::with_waits(rng, g, 10, 6)
        } else {
            g
        };
        shapes.push(("chain", g, 8));
        let k = rng.range(5, 40);
        let g = fan(rng, k);
        let g = if i == 0 {
            waits::with_waits(rng, g, 5, 3)
        } else {
            g
        };
        shapes.push(("fan", g, 4));
        let (layers, width) = (rng.range(3, 6), rng.range(2, 6));
        let g = layered(rng, layers, (1, width), 3);
        let g = if i < 2 {
            waits::with_waits(rng, g, 8, 4)
        } else {
            g
        };
        shapes.push(("layered", g, 8));
    }
    // About 200 nodes: 10 layers of 16 to 24.
    for i in 0..2 {
        let g = layered(rng, 10, (16, 24), 2);
        let g = if i == 0 {
            waits::with_waits(rng, g, 2, 1)
        } else {
            g
        };
        shapes.push(("large", g, 1));
    }
    shapes.extend(waits::shapes(rng, node));
    let mut out = Vec::new();
    let mut with_signals = HashSet::new();
    for (name, graph, weight) in shapes {
        let wf = NewWorkflow::from_graph(name, &graph).create(conn)?;
        out.push((wf.id, weight));
        if !waits::signal_names(&graph).is_empty() {
            with_signals.insert(wf.id);
        }
    }
    Ok((out, with_signals))
}

// ---------------------------------------------------------------------------
// The run.

struct Shared {
    url: DatabaseUrl,
    config: TortureConfig,
    start: Instant,
    stop: AtomicBool,
    /// Executions started (a bounded sample, newest last).
    known: Mutex<Vec<Uuid>>,
    /// Executions paused by someone, for resumes to aim at.
    paused: Mutex<Vec<Uuid>>,
    workflows: Vec<(Uuid, u64)>,
    /// Set when too many executions are live: no new ones.
    throttled: AtomicBool,
    crash_counter: AtomicUsize,
    /// The limits set at setup (the drain restores them): of the limited
    /// keys, and of [`LIMITED_QUEUE`].
    key_limits: Vec<(&'static str, i32)>,
    queue_limit: i32,
    /// The workflows with signal nodes.
    signal_workflows: HashSet<Uuid>,
    /// Executions of those (a bounded sample, newest last; the final ones
    /// leave it when the sender sees them).
    signal_executions: Mutex<Vec<Uuid>>,
    /// Numbers the signals' payloads (unique in the run).
    signal_seq: AtomicU64,
    /// What was done with timers and signals (what committed).
    waits: Mutex<WaitCounts>,
    /// Wait violations seen while running: the first 100, and how many.
    wait_violations: Mutex<(Vec<String>, u64)>,
    /// The wait sampler's samples and the largest lateness it saw.
    wait_samples: Mutex<(u64, Duration)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const KNOWN_CAP: usize = 4000;

impl Shared {
    fn remember(&self, id: Uuid) {
        let mut known = lock(&self.known);
        if known.len() >= KNOWN_CAP {
            known.drain(..KNOWN_CAP / 4);
        }
        known.push(id);
    }

    /// A recently started execution, mostly (the live ones are there).
    fn some_execution(&self, rng: &mut SplitMix) -> Option<Uuid> {
        let known = lock(&self.known);
        if known.is_empty() {
            return None;
        }
        let n = known.len() as u64;
        let i = if rng.chance(80) {
            n - 1 - rng.below(n.min(150))
        } else {
            rng.below(n)
        };
        known.get(i as usize).copied()
    }

    fn some_paused(&self, rng: &mut SplitMix) -> Option<Uuid> {
        let mut paused = lock(&self.paused);
        if paused.is_empty() {
            return None;
        }
        let i = rng.below(paused.len() as u64) as usize;
        Some(paused.swap_remove(i))
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A lease this thread holds (or thinks it does).
#[derive(Debug, Clone)]
struct Held {
    lease: Lease,
    execution: Uuid,
}

impl Held {
    /// A step this thread just claimed.
    fn of(step: &ExecutionStep) -> Held {
        Held {
            lease: lease_of(step),
            execution: step.execution_id,
        }
    }
}

/// The lease of a step returned by a claim.
fn lease_of(step: &ExecutionStep) -> Lease {
    step.lease()
        .expect("a claimed step is running under its worker")
}

#[derive(Default)]
struct Tally {
    ops: BTreeMap<&'static str, u64>,
    expected: BTreeMap<String, u64>,
    failures: Vec<Failure>,
    failure_count: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (k, v) in other.ops {
            *self.ops.entry(k).or_default() += v;
        }
        for (k, v) in other.expected {
            *self.expected.entry(k).or_default() += v;
        }
        self.failures.extend(other.failures);
        self.failure_count += other.failure_count;
    }

    /// Counts an operation's outcome: fine, expected refusal, or failure.
    fn record(&mut self, shared: &Shared, thread: usize, op: &'static str, result: Result<()>) {
        *self.ops.entry(op).or_default() += 1;
        let Err(e) = result else { return };
        waits::count_retryable(shared, op, &e);
        // With transactions outside the lock order, any session may be the
        // victim of a deadlock one of them caused: all are tolerated then.
        let kind = expected(&e)
            .or_else(|| (shared.config.cross_execution && is_deadlock(&e)).then_some("deadlock"));
        match kind {
            Some(kind) => *self.expected.entry(format!("{op}: {kind}")).or_default() += 1,
            None => {
                self.failure_count += 1;
                if self.failures.len() < 100 {
                    let failure = Failure {
                        at: shared.elapsed(),
                        thread,
                        op,
                        error: describe(&e),
                    };
                    if shared.config.verbose {
                        eprintln!(
                            "torture: {:.2} s thread {} {op}: UNEXPECTED {}",
                            failure.at.as_secs_f64(),
                            thread_name(thread),
                            failure.error
                        );
                    }
                    self.failures.push(failure);
                }
            }
        }
    }
}

/// The name of an expected refusal, or `None` for a failure.
fn expected(e: &Error) -> Option<&'static str> {
    match e {
        Error::LeaseLost { .. } => Some("lease lost"),
        Error::TransitionConflict { .. } => Some("transition conflict"),
        Error::IllegalTransition { .. } => Some("illegal transition"),
        Error::NotFound { .. } => Some("not found"),
        // A signal to an execution that was final by then.
        Error::SignalRefused { reason, .. } if reason.contains("takes no more signals") => {
            Some("signal refused")
        }
        // A sub-execution whose parent was pruned meanwhile.
        Error::Query(DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, info))
            if info.constraint_name() == Some("executions_parent_execution_id_fkey") =>
        {
            Some("parent pruned")
        }
        _ => None,
    }
}

fn is_deadlock(e: &Error) -> bool {
    e.sqlstate() == Some(crate::error::sqlstate::DEADLOCK_DETECTED)
}

/// An error as one line, with the database's details where it gave them.
fn describe(e: &Error) -> String {
    if let Error::Query(DieselError::DatabaseError(kind, info)) = e {
        let mut s = format!("{kind:?}: {}", info.message());
        if let Some(d) = info.details() {
            s.push_str(&format!(" (DETAIL: {d})"));
        }
        if let Some(c) = info.constraint_name() {
            s.push_str(&format!(" (constraint {c})"));
        }
        return s;
    }
    e.to_string()
}

fn connect(shared: &Shared) -> Result<PgConnection> {
    let mut conn = crate::pool::connect_as(&shared.url, "workflow-db-torture")?;
    // A statement stuck behind a lock for this long is a failure, not a hang.
    conn.batch_execute("SET statement_timeout = '60s'")?;
    // Diagnosing a deadlock: the server log then names the tuples each
    // waiter waited for (needs a superuser, as the test server's is).
    if std::env::var_os("TORTURE_LOG_LOCK_WAITS").is_some() {
        conn.batch_execute("SET log_lock_waits = on")?;
    }
    Ok(conn)
}

/// `pg_sleep` of a few milliseconds, between the statements of a transaction.
fn nap(conn: &mut PgConnection, rng: &mut SplitMix) -> Result<()> {
    let secs = rng.range(1, 8) as f64 / 1000.0;
    diesel::sql_query("SELECT pg_sleep($1)")
        .bind::<Double, _>(secs)
        .execute(conn)?;
    Ok(())
}

/// Rows of `torture_audit` the report holds at most.
const AUDIT_LIMIT: usize = 100;

/// Records deletes of executions that are not final and of steps running
/// under a live lease (what prune must never do).
const AUDIT: &str = "
CREATE TABLE torture_audit (
    what text NOT NULL, execution_id uuid NOT NULL, step_id uuid, status text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION torture_audit_execution_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status NOT IN ('completed', 'failed', 'cancelled') THEN
        INSERT INTO torture_audit (what, execution_id, status)
        VALUES ('unfinished execution deleted', OLD.id, OLD.status::text);
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER torture_audit BEFORE DELETE ON executions
    FOR EACH ROW EXECUTE FUNCTION torture_audit_execution_delete();
CREATE FUNCTION torture_audit_step_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'running' AND OLD.locked_until > clock_timestamp() THEN
        INSERT INTO torture_audit (what, execution_id, step_id, status)
        VALUES ('running step with a live lease deleted', OLD.execution_id, OLD.id, OLD.status::text);
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER torture_audit BEFORE DELETE ON execution_steps
    FOR EACH ROW EXECUTE FUNCTION torture_audit_step_delete();
";

/// Runs the torture against the (migrated, preferably empty) database at
/// `url` and reports what happened. It adds a table `torture_audit` and
/// delete triggers to the database: use a throwaway one
/// ([`crate::testing::TestDatabase`]). Errors only when the run cannot be
/// set up or finished (no connection); what the engine does wrong is in the
/// report ([`TortureReport::passed`]).
pub fn run(url: &DatabaseUrl, config: &TortureConfig) -> Result<TortureReport> {
    let mut rng = SplitMix(config.seed);
    let shared_url = url.clone();
    let mut setup = crate::pool::connect_as(url, "workflow-db-torture")?;
    setup.batch_execute(AUDIT)?;
    setup.batch_execute(waits::WAIT_LOG)?;
    let (workflows, signal_workflows) = workflows(&mut setup, &mut rng)?;
    // Flow control: limits on the first keys and the first queue.
    let mut key_limits = Vec::new();
    for key in &KEYS[..LIMITED_KEYS] {
        let limit = rng.range(1, 3) as i32;
        engine::set_concurrency_limit(&mut setup, key, limit)?;
        key_limits.push((*key, limit));
    }
    let queue_limit = rng.range(2, 4) as i32;
    engine::set_queue_limit(&mut setup, LIMITED_QUEUE, Some(queue_limit))?;
    let shared = Arc::new(Shared {
        url: shared_url,
        config: config.clone(),
        start: Instant::now(),
        stop: AtomicBool::new(false),
        known: Mutex::new(Vec::new()),
        paused: Mutex::new(Vec::new()),
        workflows,
        throttled: AtomicBool::new(false),
        crash_counter: AtomicUsize::new(0),
        key_limits,
        queue_limit,
        signal_workflows,
        signal_executions: Mutex::new(Vec::new()),
        signal_seq: AtomicU64::new(0),
        waits: Mutex::new(WaitCounts::default()),
        wait_violations: Mutex::new((Vec::new(), 0)),
        wait_samples: Mutex::new((0, Duration::ZERO)),
    });

    let mut workers = Vec::new();
    for t in 0..config.threads.max(1) {
        let shared = Arc::clone(&shared);
        let seed =
            SplitMix(config.seed ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407)).next();
        workers.push(thread::spawn(move || worker(&shared, t, seed)));
    }
    let checker = config.check_every.map(|every| {
        let shared = Arc::clone(&shared);
        thread::spawn(move || check_while_running(&shared, every))
    });
    let sampler = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || sample_limits_while_running(&shared, Duration::from_millis(100)))
    };
    // Timers and signals: a maintenance leader firing due waits (the
    // workers fire them too, now and then), a signal sender, a sampler of
    // the armed waits.
    let mut wait_threads = Vec::new();
    for (which, salt) in [(waits::LEADER, 0x1EAD_u64), (waits::SENDER, 0x5E4D)] {
        let shared = Arc::clone(&shared);
        let seed = SplitMix(config.seed ^ salt.wrapping_mul(0x9E37_79B9)).next();
        wait_threads.push(thread::spawn(move || {
            if which == waits::LEADER {
                waits::leader(&shared, seed)
            } else {
                waits::sender(&shared, seed)
            }
        }));
    }
    let wait_sampler = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || waits::sample_while_running(&shared, Duration::from_millis(250)))
    };

    let deadline = shared.start + config.duration;
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100).min(deadline - Instant::now()));
        if config.verbose && shared.start.elapsed().as_millis() % 5000 < 100 {
            eprintln!(
                "torture: {:.0} s, {} executions started",
                shared.elapsed().as_secs_f64(),
                lock(&shared.known).len()
            );
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    let mut tally = Tally::default();
    for w in workers.into_iter().chain(wait_threads) {
        match w.join() {
            Ok(t) => tally.merge(t),
            Err(_) => {
                tally.failure_count += 1;
                tally.failures.push(Failure {
                    at: shared.elapsed(),
                    thread: 0,
                    op: "thread",
                    error: "a worker thread panicked".into(),
                });
            }
        }
    }
    let (detections, checks_during_run) = match checker.map(|c| c.join()) {
        Some(Ok(found)) => found,
        Some(Err(_)) => (Vec::new(), 0),
        None => (Vec::new(), 0),
    };
    let (sampled, samples_during_run) = sampler.join().unwrap_or_default();
    *lock(&shared.wait_samples) = wait_sampler.join().unwrap_or_default();
    let detections = merge_detections(detections, sampled);
    let ran_for = shared.elapsed();
    if config.verbose {
        eprintln!(
            "torture: stopped after {:.1} s; draining",
            ran_for.as_secs_f64()
        );
    }

    let drain_start = Instant::now();
    let drained = drain(&shared, &mut setup, &mut tally)?;
    let drain_time = drain_start.elapsed();

    let statuses: BTreeMap<String, i64> = diesel::sql_query(
        "SELECT status::text AS what, count(*) AS n FROM executions GROUP BY status",
    )
    .load::<Counted>(&mut setup)?
    .into_iter()
    .map(|c| (c.what, c.n))
    .collect();
    let unfinished: Vec<(Uuid, String)> = diesel::sql_query(
        "SELECT id, status::text AS what FROM executions \
         WHERE status NOT IN ('completed', 'failed', 'cancelled') ORDER BY id LIMIT 10",
    )
    .load::<IdStatus>(&mut setup)?
    .into_iter()
    .map(|r| (r.id, r.what))
    .collect();
    // What the maintenance loop would do before the check: admit throttled
    // steps into free slots (none should be left waiting, all being final).
    let rebalanced = engine::rebalance_concurrency_keys(&mut setup).map_err(Error::from);
    tally.record(&shared, usize::MAX, "drain_rebalance", rebalanced.map(drop));
    let options = CheckOptions {
        max_per_kind: 100,
        ..CheckOptions::default()
    };
    let final_check = engine::check_invariants(&mut setup, &options)?;
    let audit: Vec<AuditRow> = diesel::sql_query(
        "SELECT what, execution_id, step_id, status FROM torture_audit ORDER BY at LIMIT $1",
    )
    .bind::<BigInt, _>(AUDIT_LIMIT as i64)
    .load(&mut setup)?;
    let waits = waits::check(&shared, &mut setup)?;

    tally.failures.sort_by_key(|f| f.at);
    Ok(TortureReport {
        config: config.clone(),
        ran_for,
        ops: tally.ops,
        expected: tally.expected,
        failures: tally.failures,
        failure_count: tally.failure_count,
        detections,
        checks_during_run,
        samples_during_run,
        drain: drain_time,
        drained: drained && unfinished.is_empty(),
        statuses,
        unfinished,
        final_check,
        audit,
        waits,
    })
}

#[derive(QueryableByName)]
struct Counted {
    #[diesel(sql_type = Text)]
    what: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct IdStatus {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    what: String,
}

/// The operations, with their weights. Every multi-statement transaction
/// here follows the engine's lock order: it ends attempts of steps of ONE
/// execution and only then changes that execution (complete then pause,
/// complete then resume, complete then cancel, ...), with naps in between.
const OPS: &[(&str, u64)] = &[
    ("start", 8),
    ("sub_start", 3),
    ("claim", 9),
    ("claim_from", 6),
    ("complete", 12),
    ("complete_batch", 8),
    ("fail", 6),
    ("heartbeat", 4),
    ("crash", 3),
    ("reclaim", 4),
    ("pause", 3),
    ("resume", 5),
    ("cancel", 2),
    ("prune", 1),
    ("tx_complete_pause", 3),
    ("tx_pause_then_slow_complete", 3),
    ("tx_complete_resume", 3),
    ("tx_fail_and_complete", 3),
    ("tx_complete_cancel", 1),
    ("tx_reclaim_claim", 1),
    ("tx_pause_resume", 1),
    ("start_due", 2),
    ("rebalance", 1),
    ("queue_pause", 1),
    ("queue_resume", 2),
    ("raise_key_limit", 1),
    ("raise_queue_limit", 1),
    ("tx_queue_pause_resume", 1),
    ("fire_waits", 3),
    ("tx_fire_waits_slow", 1),
    ("signal", 3),
    ("tx_signal_slow", 1),
    ("tx_pause_signal", 1),
    ("start_until", 1),
];

/// With [`TortureConfig::cross_execution`]: transactions outside the lock order.
const CROSS_OPS: &[(&str, u64)] = &[
    ("tx_claim_finish", 2),
    ("tx_finish_two_executions", 2),
    ("tx_complete_fire_waits", 1),
];

const WORKER: &str = "w";

fn worker(shared: &Shared, thread: usize, seed: u64) -> Tally {
    let mut tally = Tally::default();
    let mut conn = match connect(shared) {
        Ok(c) => c,
        Err(e) => {
            tally.record(shared, thread, "connect", Err(e));
            return tally;
        }
    };
    let mut rng = SplitMix(seed);
    let me = format!("{WORKER}{thread}");
    let mut held: Vec<Held> = Vec::new();
    let ops: Vec<(&'static str, u64)> = if shared.config.cross_execution {
        OPS.iter().chain(CROSS_OPS).copied().collect()
    } else {
        OPS.to_vec()
    };
    let weights: Vec<u64> = ops.iter().map(|(_, w)| *w).collect();
    let trace = std::env::var_os("TORTURE_TRACE_OPS").is_some();
    let mut n: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        if thread == 0 && n % 50 == 0 {
            let live = live_executions(&mut conn).unwrap_or(0);
            shared
                .throttled
                .store(live >= shared.config.max_live_executions, Ordering::Relaxed);
        }
        let mut op = ops[rng.weighted(&weights)].0;
        // Keep the held list short: finish work instead of taking more.
        if held.len() > 48 && matches!(op, "claim" | "claim_from" | "tx_claim_finish") {
            op = "complete_batch";
        }
        // Only thread 0 changes limits (read, then raise): no race between
        // two raisers can lower one.
        if thread != 0 && matches!(op, "raise_key_limit" | "raise_queue_limit") {
            op = "rebalance";
        }
        if trace {
            // Diagnosing: pg_stat_activity.application_name names the operation.
            let _ = diesel::sql_query("SELECT set_config('application_name', $1, false)")
                .bind::<Text, _>(format!("workflow-db-torture:{thread}:{op}"))
                .execute(&mut conn);
        }
        let result = step(shared, &mut conn, &mut rng, &me, &mut held, op);
        // A connection broken by a failure is replaced.
        if result.is_err() && diesel::sql_query("SELECT 1").execute(&mut conn).is_err() {
            if let Ok(c) = connect(shared) {
                conn = c;
            }
        }
        tally.record(shared, thread, op, result);
    }
    tally
}

fn live_executions(conn: &mut PgConnection) -> Result<i64> {
    Ok(diesel::sql_query(
        "SELECT 'live' AS what, count(*) AS n FROM executions WHERE status IN ('running', 'paused')",
    )
    .get_result::<Counted>(conn)?
    .n)
}

/// A lease for a claim: short enough that some expire while held.
fn lease(rng: &mut SplitMix) -> Duration {
    rng.millis(300, 3000)
}

fn backoff(rng: &mut SplitMix) -> Backoff {
    Backoff {
        base: rng.millis(1, 10),
        max: Duration::from_millis(30),
    }
}

fn take(rng: &mut SplitMix, held: &mut Vec<Held>) -> Option<Held> {
    if held.is_empty() {
        return None;
    }
    let i = rng.below(held.len() as u64) as usize;
    Some(held.swap_remove(i))
}

fn claim(
    conn: &mut PgConnection,
    rng: &mut SplitMix,
    me: &str,
    held: &mut Vec<Held>,
) -> Result<()> {
    let n = rng.range(1, 16) as i64;
    let l = lease(rng);
    let claimed = engine::claim_steps(conn, me, n, l)?;
    held.extend(claimed.iter().map(Held::of));
    Ok(())
}

fn start(shared: &Shared, conn: &mut PgConnection, rng: &mut SplitMix, parent: bool) -> Result<()> {
    if shared.throttled.load(Ordering::Relaxed) {
        return Ok(());
    }
    let weights: Vec<u64> = shared.workflows.iter().map(|(_, w)| *w).collect();
    let wf = shared.workflows[rng.weighted(&weights)].0;
    let mut new = NewExecution::new(wf).user_id("torture");
    if parent {
        match shared.some_execution(rng) {
            Some(p) => new = new.parent(p),
            None => return Ok(()),
        }
    }
    if rng.chance(15) {
        new = new.idempotency_key(format!("k{}", rng.below(50)));
    }
    // Flow control: a priority of -1 to 3, mostly a concurrency key, now and
    // then a delayed start (a few hundred ms ahead) or a dedup key (while
    // unfinished, or for a window).
    new = new.priority(rng.range(0, 4) as i32 - 1);
    if rng.chance(70) {
        if let Some(key) = rng.pick(&KEYS) {
            new = new.concurrency_key(*key);
        }
    }
    if rng.chance(8) {
        new = new.start_after(Utc::now() + rng.millis(100, 800));
    }
    if rng.chance(10) {
        let key = format!("d{}", rng.below(10));
        new = if rng.chance(50) {
            new.dedup_key(key)
        } else {
            new.dedup_window(key, rng.millis(50, 2000))
        };
    }
    let started = engine::start_execution(conn, &new)?;
    if started.created {
        shared.remember(started.execution.id);
        shared.remember_signal_execution(wf, started.execution.id);
    }
    Ok(())
}

/// One operation.
fn step(
    shared: &Shared,
    conn: &mut PgConnection,
    rng: &mut SplitMix,
    me: &str,
    held: &mut Vec<Held>,
    op: &'static str,
) -> Result<()> {
    if waits::WAIT_OPS.contains(&op) {
        return waits::step(shared, conn, rng, op, held);
    }
    match op {
        "start" => start(shared, conn, rng, false),
        "sub_start" => start(shared, conn, rng, true),
        "claim" => claim(conn, rng, me, held),
        "claim_from" => {
            // Some of the queues: the limited one, the other, the node type's.
            let all = [QUEUES[0], QUEUES[1], NODE_TYPE];
            let mut names: Vec<String> = all
                .iter()
                .filter(|_| rng.chance(50))
                .map(|q| (*q).to_owned())
                .collect();
            if names.is_empty() {
                names.push(all[rng.below(all.len() as u64) as usize].to_owned());
            }
            let n = rng.range(1, 16) as i64;
            let l = lease(rng);
            let claimed = engine::claim_from(conn, me, &names, n, l)?;
            held.extend(claimed.iter().map(Held::of));
            Ok(())
        }
        "start_due" => {
            let n = rng.range(1, 50) as i64;
            engine::start_due_executions(conn, n)?;
            Ok(())
        }
        "rebalance" => {
            engine::rebalance_concurrency_keys(conn)?;
            Ok(())
        }
        "queue_pause" => {
            let q = QUEUES[rng.below(QUEUES.len() as u64) as usize];
            engine::pause_queue(conn, q).map(drop)
        }
        "queue_resume" => {
            let q = QUEUES[rng.below(QUEUES.len() as u64) as usize];
            engine::resume_queue(conn, q).map(drop)
        }
        "raise_key_limit" => {
            // Thread 0 only: raise by one (up to the cap) or keep.
            let key = KEYS[rng.below(LIMITED_KEYS as u64) as usize];
            let by = rng.below(2) as i32;
            let current = engine::list_concurrency_limits(conn)?
                .into_iter()
                .find(|l| l.key == key)
                .map_or(1, |l| l.max_running);
            engine::set_concurrency_limit(conn, key, (current + by).min(KEY_LIMIT_CAP).max(current))
                .map(drop)
        }
        "raise_queue_limit" => {
            let by = rng.below(2) as i32;
            let current = engine::list_queues(conn)?
                .into_iter()
                .find(|q| q.name == LIMITED_QUEUE)
                .and_then(|q| q.max_running)
                .unwrap_or(shared.queue_limit);
            engine::set_queue_limit(
                conn,
                LIMITED_QUEUE,
                Some((current + by).min(QUEUE_LIMIT_CAP).max(current)),
            )
            .map(drop)
        }
        "tx_queue_pause_resume" => {
            // The queue's row stays locked meanwhile: claims of it wait.
            let q = QUEUES[rng.below(QUEUES.len() as u64) as usize];
            conn.transaction(|c| {
                engine::pause_queue(c, q)?;
                nap(c, rng)?;
                engine::resume_queue(c, q)?;
                nap(c, rng)
            })
        }
        "complete" => match take(rng, held) {
            Some(h) => engine::complete_step(conn, &h.lease, Some(&json!({"ok": true}))).map(drop),
            None => Ok(()),
        },
        "complete_batch" => {
            let k = rng.range(1, 16) as usize;
            let batch: Vec<Held> = (0..k).filter_map(|_| take(rng, held)).collect();
            if batch.is_empty() {
                return Ok(());
            }
            let items: Vec<(Lease, Option<serde_json::Value>)> = batch
                .iter()
                .map(|h| (h.lease.clone(), Some(json!({"batch": true}))))
                .collect();
            match engine::complete_steps(conn, &items) {
                Ok(_) => Ok(()),
                // All or nothing: one lost lease refuses the batch; finish
                // the others one by one (their own refusals are expected).
                Err(e) if expected(&e).is_some() => {
                    for h in &batch {
                        match engine::complete_step(conn, &h.lease, None) {
                            Err(e) if expected(&e).is_none() => return Err(e),
                            _ => {}
                        }
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        "fail" => match take(rng, held) {
            Some(h) => {
                engine::fail_step(conn, &h.lease, "torture failure", &backoff(rng)).map(drop)
            }
            None => Ok(()),
        },
        "heartbeat" => {
            if held.is_empty() {
                return Ok(());
            }
            let leases: Vec<Lease> = held.iter().map(|h| h.lease.clone()).collect();
            let kept = engine::heartbeat(conn, &leases, lease(rng))?;
            held.retain(|h| kept.contains(&h.lease.step_id));
            Ok(())
        }
        "crash" => {
            // Claim under a throw-away worker id and a short lease, and walk away.
            let n = shared.crash_counter.fetch_add(1, Ordering::Relaxed);
            let k = rng.range(1, 4) as i64;
            let l = rng.millis(100, 800);
            engine::claim_steps(conn, &format!("{me}-crashed-{n}"), k, l)?;
            Ok(())
        }
        "reclaim" => {
            let n = rng.range(1, 64) as i64;
            engine::reclaim_expired(conn, n)?;
            Ok(())
        }
        "pause" => match shared.some_execution(rng) {
            Some(id) => {
                engine::pause(conn, id)?;
                lock(&shared.paused).push(id);
                Ok(())
            }
            None => Ok(()),
        },
        "resume" => {
            let id = if rng.chance(80) {
                shared.some_paused(rng)
            } else {
                shared.some_execution(rng)
            };
            match id {
                Some(id) => engine::resume(conn, id).map(drop),
                None => Ok(()),
            }
        }
        "cancel" => match shared.some_execution(rng) {
            Some(id) => engine::cancel(conn, id).map(drop),
            None => Ok(()),
        },
        "prune" => {
            // "Old" is anything final before now.
            let batch = rng.range(10, 200) as i64;
            engine::prune_executions(conn, Utc::now(), batch)?;
            Ok(())
        }
        "tx_complete_pause" => {
            // Complete a step and pause its execution in one transaction.
            let Some(h) = take(rng, held) else {
                return Ok(());
            };
            conn.transaction(|c| {
                nap(c, rng)?;
                engine::complete_step(c, &h.lease, None)?;
                nap(c, rng)?;
                engine::pause(c, h.execution)?;
                nap(c, rng)
            })?;
            lock(&shared.paused).push(h.execution);
            Ok(())
        }
        "tx_pause_then_slow_complete" => {
            // Issue 10's first defect: the execution is paused, then its step
            // completes in a slow transaction while others resume it.
            let Some(h) = take(rng, held) else {
                return Ok(());
            };
            if engine::pause(conn, h.execution).is_ok() {
                lock(&shared.paused).push(h.execution);
            }
            conn.transaction(|c| {
                nap(c, rng)?;
                engine::complete_step(c, &h.lease, None)?;
                nap(c, rng)?;
                nap(c, rng)
            })
        }
        "tx_complete_resume" => {
            // A completion and a resume of its execution in one transaction.
            let Some(h) = take(rng, held) else {
                return Ok(());
            };
            conn.transaction(|c| {
                engine::complete_step(c, &h.lease, None)?;
                nap(c, rng)?;
                match engine::resume(c, h.execution) {
                    Err(e) if expected(&e).is_none() => return Err(e),
                    _ => {}
                }
                nap(c, rng)
            })
        }
        "tx_fail_and_complete" => {
            // Retry (or fail) one step and complete another of the same
            // execution in one transaction (issue 10, defect 3).
            let Some(a) = take(rng, held) else {
                return Ok(());
            };
            let b = held
                .iter()
                .position(|h| h.execution == a.execution)
                .map(|i| held.swap_remove(i));
            let bo = backoff(rng);
            conn.transaction(|c| {
                engine::fail_step(c, &a.lease, "torture failure", &bo)?;
                nap(c, rng)?;
                if let Some(b) = b {
                    engine::complete_step(c, &b.lease, None)?;
                }
                nap(c, rng)
            })
        }
        "tx_finish_two_executions" => {
            // Outside the lock order: steps of two executions, in random order.
            let (Some(a), Some(b)) = (take(rng, held), take(rng, held)) else {
                return Ok(());
            };
            let bo = backoff(rng);
            conn.transaction(|c| {
                engine::complete_step(c, &a.lease, None)?;
                nap(c, rng)?;
                engine::fail_step(c, &b.lease, "torture failure", &bo)?;
                nap(c, rng)
            })
        }
        "tx_claim_finish" => {
            // Outside the lock order: claim, then complete some and fail some,
            // in one transaction (the claimed rows stay locked meanwhile).
            let n = rng.range(1, 8) as i64;
            let l = lease(rng);
            let bo = backoff(rng);
            conn.transaction(|c| {
                let claimed = engine::claim_steps(c, me, n, l)?;
                nap(c, rng)?;
                for s in claimed {
                    match rng.below(3) {
                        0 => {
                            engine::complete_step(c, &lease_of(&s), None)?;
                        }
                        1 => {
                            engine::fail_step(c, &lease_of(&s), "torture failure", &bo)?;
                        }
                        _ => held.push(Held::of(&s)),
                    }
                }
                nap(c, rng)
            })
        }
        "tx_complete_cancel" => {
            let Some(h) = take(rng, held) else {
                return Ok(());
            };
            conn.transaction(|c| {
                engine::complete_step(c, &h.lease, None)?;
                nap(c, rng)?;
                match engine::cancel(c, h.execution) {
                    Err(e) if expected(&e).is_none() => return Err(e),
                    _ => {}
                }
                nap(c, rng)
            })
        }
        "tx_reclaim_claim" => {
            let l = lease(rng);
            conn.transaction(|c| {
                engine::reclaim_expired(c, 16)?;
                nap(c, rng)?;
                let claimed = engine::claim_steps(c, me, 4, l)?;
                held.extend(claimed.iter().map(Held::of));
                nap(c, rng)
            })
        }
        "tx_pause_resume" => match shared.some_execution(rng) {
            Some(id) => conn.transaction(|c| {
                engine::pause(c, id)?;
                nap(c, rng)?;
                engine::resume(c, id)?;
                nap(c, rng)
            }),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Checks the invariants every `every` while the workers run; returns the
/// kinds found (first detection each) and how many checks ran.
fn check_while_running(shared: &Shared, every: Duration) -> (Vec<Detection>, u64) {
    let mut found: BTreeMap<InvariantKind, Detection> = BTreeMap::new();
    let mut checks = 0;
    let Ok(mut conn) = connect(shared) else {
        return (Vec::new(), 0);
    };
    let options = CheckOptions {
        max_per_kind: 5,
        ..CheckOptions::default()
    };
    loop {
        let until = Instant::now() + every;
        while Instant::now() < until {
            if shared.stop.load(Ordering::Relaxed) {
                let mut list: Vec<Detection> = found.into_values().collect();
                list.sort_by_key(|d| d.at);
                return (list, checks);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let Ok(report) = engine::check_invariants(&mut conn, &options) else {
            continue;
        };
        checks += 1;
        let at = shared.elapsed();
        for (kind, count) in &report.counts {
            if kind.severity() != crate::engine::Severity::Error {
                continue;
            }
            if let Some(example) = report.violations.iter().find(|x| x.kind == *kind) {
                detected(shared, &mut found, at, *count, example);
            }
        }
    }
}

/// Records a broken invariant seen while running: the first detection of
/// its kind, or a higher count for a kind already seen.
fn detected(
    shared: &Shared,
    found: &mut BTreeMap<InvariantKind, Detection>,
    at: Duration,
    count: u64,
    example: &Violation,
) {
    match found.entry(example.kind) {
        std::collections::btree_map::Entry::Occupied(mut o) => {
            let d = o.get_mut();
            d.max_count = d.max_count.max(count);
        }
        std::collections::btree_map::Entry::Vacant(v) => {
            if shared.config.verbose {
                eprintln!(
                    "torture: {:.2} s BROKEN {count} x {example}",
                    at.as_secs_f64()
                );
            }
            v.insert(Detection {
                at,
                kind: example.kind,
                max_count: count,
                example: example.clone(),
            });
        }
    }
}

/// One configured queue or limited key as the sampler counts it.
#[derive(QueryableByName)]
struct LimitSample {
    /// `queue` or `key`.
    #[diesel(sql_type = Text)]
    what: String,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Nullable<Integer>)]
    max_running: Option<i32>,
    /// Running steps (of a queue, or of a key).
    #[diesel(sql_type = BigInt)]
    running: i64,
    /// Admitted steps of a key (ready, not throttled); 0 for a queue.
    #[diesel(sql_type = BigInt)]
    admitted: i64,
    /// A queue's `running` counter.
    #[diesel(sql_type = Nullable<Integer>)]
    counter: Option<i32>,
    /// An execution with a running step of it, if any.
    #[diesel(sql_type = Nullable<SqlUuid>)]
    example: Option<Uuid>,
}

/// Every configured queue (running steps, counter, limit) and limited key
/// (running and admitted steps, limit), counted in ONE statement, so one
/// snapshot: a committed state must be within every limit (limits are only
/// raised while the threads run) and every counter exact.
const LIMIT_SAMPLE: &str = "\
SELECT 'queue' AS what, q.name, q.max_running, r.running, 0::bigint AS admitted,
       q.running AS counter, r.example
  FROM queues q
 CROSS JOIN LATERAL (
       SELECT count(*) AS running, (array_agg(s.execution_id))[1] AS example
         FROM execution_steps s
        WHERE s.status = 'running' AND workflow_db_step_queue(s.queue, s.node_type) = q.name) r
UNION ALL
SELECT 'key', c.key, c.max_running, r.running, r.admitted, NULL, r.example
  FROM concurrency_limits c
 CROSS JOIN LATERAL (
       SELECT count(*) FILTER (WHERE s.status = 'running') AS running,
              count(*) FILTER (WHERE s.status = 'pending' AND s.upstream_pending = 0
                                 AND NOT s.parked AND NOT s.throttled) AS admitted,
              (array_agg(s.execution_id) FILTER (WHERE s.status = 'running'))[1] AS example
         FROM execution_steps s
        WHERE s.concurrency_key = c.key AND s.status IN ('pending', 'running')) r";

/// Samples the running steps of the queues and keys every `every` while the
/// workers run ([`LIMIT_SAMPLE`]): a queue with more running steps than its
/// limit ([`InvariantKind::QueueOverLimit`]) or a counter that differs from
/// them ([`InvariantKind::QueueCounterMismatch`]), a key with more running
/// and admitted steps than its limit
/// ([`InvariantKind::ConcurrencyKeyOverLimit`]) is a detection. Returns
/// them (first detection each) and how many samples were taken.
fn sample_limits_while_running(shared: &Shared, every: Duration) -> (Vec<Detection>, u64) {
    let mut found: BTreeMap<InvariantKind, Detection> = BTreeMap::new();
    let mut samples = 0;
    let Ok(mut conn) = connect(shared) else {
        return (Vec::new(), 0);
    };
    let nil = Uuid::nil();
    while !shared.stop.load(Ordering::Relaxed) {
        thread::sleep(every);
        let Ok(rows) = diesel::sql_query(LIMIT_SAMPLE).load::<LimitSample>(&mut conn) else {
            continue;
        };
        samples += 1;
        let at = shared.elapsed();
        for r in rows {
            let mut broken = Vec::new();
            match (r.what.as_str(), r.max_running) {
                ("queue", limit) => {
                    if limit.is_some_and(|m| r.running > i64::from(m)) {
                        broken.push((
                            InvariantKind::QueueOverLimit,
                            r.running,
                            format!(
                                "sampler: queue {}: {} running steps > max_running {}",
                                r.name,
                                r.running,
                                limit.unwrap_or_default()
                            ),
                        ));
                    }
                    if r.counter.map(i64::from) != Some(r.running) {
                        broken.push((
                            InvariantKind::QueueCounterMismatch,
                            1,
                            format!(
                                "sampler: queue {}: running counter {:?}, running steps {}",
                                r.name, r.counter, r.running
                            ),
                        ));
                    }
                }
                (_, Some(limit)) if r.running + r.admitted > i64::from(limit) => {
                    broken.push((
                        InvariantKind::ConcurrencyKeyOverLimit,
                        r.running + r.admitted,
                        format!(
                            "sampler: key {}: {} running + {} admitted > max_running {limit}",
                            r.name, r.running, r.admitted
                        ),
                    ));
                }
                _ => {}
            }
            for (kind, count, detail) in broken {
                let example = Violation {
                    kind,
                    execution_id: r.example.unwrap_or(nil),
                    step_id: None,
                    detail,
                };
                detected(shared, &mut found, at, count.max(0) as u64, &example);
            }
        }
    }
    let mut list: Vec<Detection> = found.into_values().collect();
    list.sort_by_key(|d| d.at);
    (list, samples)
}

/// The detections of the checker and of the sampler as one list, by first
/// detection (a kind both saw: the earlier, with the larger count).
fn merge_detections(a: Vec<Detection>, b: Vec<Detection>) -> Vec<Detection> {
    let mut by_kind: BTreeMap<InvariantKind, Detection> = BTreeMap::new();
    for d in a.into_iter().chain(b) {
        match by_kind.entry(d.kind) {
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let max_count = o.get().max_count.max(d.max_count);
                if d.at < o.get().at {
                    o.insert(d);
                }
                o.get_mut().max_count = max_count;
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(d);
            }
        }
    }
    let mut list: Vec<Detection> = by_kind.into_values().collect();
    list.sort_by_key(|d| d.at);
    list
}

/// Resumes every paused queue and restores the limits set at setup (a
/// lowering where the threads raised them: the keys' and queue's running
/// steps may be above them for a while, which the final check, run when
/// nothing runs any more, does not see), then resumes everything paused,
/// starts what is due, admits throttled steps, claims and completes until
/// every execution is final or nothing moves any more (or the drain times
/// out); after [`DRAIN_AT_SETUP_LIMITS`] it raises the limits out of the
/// way ([`DRAIN_LIMIT`]), so that a limit of 1 does not make the drain
/// one step per round. Returns whether every execution ended final.
fn drain(shared: &Shared, conn: &mut PgConnection, tally: &mut Tally) -> Result<bool> {
    const DRAIN: usize = usize::MAX;
    let started = Instant::now();
    let deadline = started + shared.config.drain_timeout;
    let mut idle_since: Option<Instant> = None;
    let mut relaxed = false;
    let queues = engine::list_queues(conn)?;
    for q in queues.iter().filter(|q| q.paused) {
        let result = engine::resume_queue(conn, &q.name).map(drop);
        tally.record(shared, DRAIN, "drain_queue_resume", result);
    }
    for (key, limit) in &shared.key_limits {
        let result = engine::set_concurrency_limit(conn, key, *limit).map(drop);
        tally.record(shared, DRAIN, "drain_limit", result);
    }
    let result = engine::set_queue_limit(conn, LIMITED_QUEUE, Some(shared.queue_limit)).map(drop);
    tally.record(shared, DRAIN, "drain_limit", result);
    loop {
        if !relaxed && started.elapsed() > DRAIN_AT_SETUP_LIMITS {
            relaxed = true;
            for (key, _) in &shared.key_limits {
                let result = engine::set_concurrency_limit(conn, key, DRAIN_LIMIT).map(drop);
                tally.record(shared, DRAIN, "drain_limit", result);
            }
            let result = engine::set_queue_limit(conn, LIMITED_QUEUE, Some(DRAIN_LIMIT)).map(drop);
            tally.record(shared, DRAIN, "drain_limit", result);
        }
        // Paused executions, and pending ones without a delayed start (a
        // delayed one may not start before its time: start_due_executions
        // starts it below once it is due).
        let paused: Vec<IdStatus> = diesel::sql_query(
            "SELECT id, status::text AS what FROM executions \
             WHERE status = 'paused' OR (status = 'pending' AND start_after IS NULL)",
        )
        .load(conn)?;
        for p in paused {
            let result = if p.what == "paused" {
                engine::resume(conn, p.id).map(drop)
            } else {
                engine::transition_execution(
                    conn,
                    p.id,
                    crate::ExecutionStatus::Pending,
                    crate::ExecutionStatus::Running,
                )
                .map(drop)
            };
            tally.record(shared, DRAIN, "drain_resume", result);
        }
        let due = engine::start_due_executions(conn, 1000).map_err(Error::from);
        tally.record(shared, DRAIN, "drain_start_due", due.map(drop));
        // The maintenance loop's admission of throttled steps whose slot
        // freed while another transaction held them.
        let rebalanced = engine::rebalance_concurrency_keys(conn).map_err(Error::from);
        tally.record(shared, DRAIN, "drain_rebalance", rebalanced.map(drop));
        // Timers and signal waits: fire what is due, signal the steps
        // waiting without timeout.
        let waited = waits::drain(shared, conn, tally)?;
        let reclaimed = engine::reclaim_expired(conn, 1000).map_err(Error::from);
        let reclaimed = match reclaimed {
            Ok(r) => r.len(),
            Err(e) => {
                tally.record(shared, DRAIN, "drain_reclaim", Err(e));
                0
            }
        };
        let claimed = match engine::claim_steps(conn, "drain", 1000, Duration::from_secs(60)) {
            Ok(c) => c,
            Err(e) => {
                tally.record(shared, DRAIN, "drain_claim", Err(e.into()));
                Vec::new()
            }
        };
        for chunk in claimed.chunks(100) {
            let items: Vec<(Lease, Option<serde_json::Value>)> =
                chunk.iter().map(|s| (lease_of(s), None)).collect();
            let result = engine::complete_steps(conn, &items).map(drop);
            tally.record(shared, DRAIN, "drain_complete", result);
        }
        let live = diesel::sql_query(
            "SELECT 'live' AS what, count(*) AS n FROM executions \
             WHERE status NOT IN ('completed', 'failed', 'cancelled')",
        )
        .get_result::<Counted>(conn)?
        .n;
        if live == 0 {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        if claimed.is_empty() && reclaimed == 0 && waited == 0 {
            // Waiting for leases to expire or backoffs to pass is fine; with
            // nothing running or pending for a few seconds, it is stuck.
            let waiting = diesel::sql_query(
                "SELECT 'waiting' AS what, count(*) AS n FROM execution_steps s \
                 JOIN executions e ON e.id = s.execution_id \
                 WHERE e.status NOT IN ('completed', 'failed', 'cancelled') \
                   AND s.status IN ('running', 'pending')",
            )
            .get_result::<Counted>(conn)?
            .n;
            let since = *idle_since.get_or_insert_with(Instant::now);
            if waiting == 0 && since.elapsed() > Duration::from_secs(3) {
                return Ok(false);
            }
            thread::sleep(Duration::from_millis(50));
        } else {
            idle_since = None;
        }
    }
}

/// How long the drain runs under the limits set at setup.
const DRAIN_AT_SETUP_LIMITS: Duration = Duration::from_secs(2);

/// The limits of the rest of the drain.
const DRAIN_LIMIT: i32 = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_choices() {
        let mut a = SplitMix(42);
        let mut b = SplitMix(42);
        let xs: Vec<u64> = (0..5).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next()).collect();
        assert_eq!(xs, ys);
        assert_ne!(SplitMix(43).next(), xs[0]);
    }

    #[test]
    fn generated_graphs_are_valid() {
        let mut rng = SplitMix(7);
        for _ in 0..20 {
            let (layers, width) = (rng.range(3, 6), rng.range(2, 6));
            layered(&mut rng, layers, (1, width), 3).validate().unwrap();
            let n = rng.range(1, 8);
            chain(&mut rng, n).validate().unwrap();
            let k = rng.range(2, 40);
            fan(&mut rng, k).validate().unwrap();
        }
        let big = layered(&mut rng, 10, (16, 24), 2);
        big.validate().unwrap();
        assert!((160..=240).contains(&big.nodes.len()));
    }

    #[test]
    fn weighted_choice_respects_zero_weights() {
        let mut rng = SplitMix(1);
        for _ in 0..100 {
            assert_eq!(rng.weighted(&[0, 5, 0]), 1);
        }
    }
}
