//! Timers and signals in the torture: wait nodes in the workflows, the
//! operations that fire and send them, the thread of a maintenance leader
//! firing due waits, the thread sending signals, their part of the drain,
//! and the end-of-run checks of what every wait step did.
//!
//! What each wait step did is recorded by triggers the torture installs in
//! its throwaway database ([`WAIT_LOG`]): every status change of a wait
//! step, with the clock time and, when it starts, when its upstream steps
//! finished; every signal sent and every change of a signal's delivery. The
//! checks read these logs, so they cover the executions pruned during the
//! run as well; the event histories are checked for the executions left at
//! the end.

use std::fmt;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use chrono::Utc;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Double, Integer, Nullable, Text, Uuid as SqlUuid};
use serde_json::json;
use uuid::Uuid;

use super::{Shared, SplitMix, Tally, connect, lock, nap};
use crate::engine::{self, SIGNAL_NODE_TYPE, WAITS_WORKER, WaitReport};
use crate::error::{Error, Result};
use crate::graph::{Edge, Node, WorkflowGraph};
use crate::models::{NewExecution, NewWorkflow};

/// The signal names of the signal nodes (a workflow may have several nodes
/// waiting for the same name: they share its mailbox).
pub(super) const SIGNAL_NAMES: [&str; 3] = ["go", "approve", "data"];

/// The thread of the maintenance leader firing due waits, in failures.
pub(super) const LEADER: usize = usize::MAX - 1;
/// The thread sending signals, in failures.
pub(super) const SENDER: usize = usize::MAX - 2;

/// The operations on timers and signals (their retryable errors are
/// counted apart, [`WaitCounts::retryable_deadlock`]).
pub(super) const WAIT_OPS: &[&str] = &[
    "fire_waits",
    "tx_fire_waits_slow",
    "signal",
    "tx_signal_slow",
    "tx_pause_signal",
    "start_until",
    "tx_complete_fire_waits",
    "leader_fire_waits",
    "sender_signal",
    "drain_fire_waits",
    "drain_signal",
];

// ---------------------------------------------------------------------------
// Counts.

/// What the torture did with timers and signals (all threads and the drain;
/// only what committed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitCounts {
    /// [`engine::fire_due_waits`] calls.
    pub fire_calls: u64,
    /// Of which by the leader thread.
    pub leader_fire_calls: u64,
    /// Timers completed (the reports of `fire_due_waits` and `send_signal`).
    pub timers_fired: u64,
    /// Signals stored by [`engine::send_signal`].
    pub signals_sent: u64,
    /// Of which sent while the steps waiting for the name were not ready yet.
    pub sent_before_ready: u64,
    /// Of which a second signal of the same name right after the first.
    pub sent_twice: u64,
    /// Of which sent to a name whose steps were all final already.
    pub sent_unawaited: u64,
    /// Of which sent by the drain (to steps waiting without timeout).
    pub sent_by_drain: u64,
    /// Sent signals that their own `send_signal` delivered at once.
    pub delivered_at_send: u64,
    /// Deliveries in the reports of `send_signal` (its own signal, or one kept).
    pub delivered_by_send: u64,
    /// Deliveries in the reports of `fire_due_waits` (signals kept until
    /// their step was ready, or sent while its execution was paused).
    pub delivered_by_fire: u64,
    /// Signal waits failed at their timeout.
    pub timed_out: u64,
    /// Signals refused ([`Error::SignalRefused`]: the execution was final).
    pub refused: u64,
    /// Of which sent on purpose to an execution seen final.
    pub refused_on_purpose: u64,
    /// Executions started of a workflow made on the fly with a
    /// `timer_until` in the past.
    pub until_past: u64,
    /// ... or in the future.
    pub until_future: u64,
    /// Deadlocks in wait operations (tolerated only with
    /// [`super::TortureConfig::cross_execution`], like any deadlock).
    pub retryable_deadlock: u64,
    /// Serialization failures in wait operations (never tolerated).
    pub retryable_serialization: u64,
}

impl WaitCounts {
    fn add(&mut self, o: &WaitCounts) {
        self.fire_calls += o.fire_calls;
        self.leader_fire_calls += o.leader_fire_calls;
        self.timers_fired += o.timers_fired;
        self.signals_sent += o.signals_sent;
        self.sent_before_ready += o.sent_before_ready;
        self.sent_twice += o.sent_twice;
        self.sent_unawaited += o.sent_unawaited;
        self.sent_by_drain += o.sent_by_drain;
        self.delivered_at_send += o.delivered_at_send;
        self.delivered_by_send += o.delivered_by_send;
        self.delivered_by_fire += o.delivered_by_fire;
        self.timed_out += o.timed_out;
        self.refused += o.refused;
        self.refused_on_purpose += o.refused_on_purpose;
        self.until_past += o.until_past;
        self.until_future += o.until_future;
        self.retryable_deadlock += o.retryable_deadlock;
        self.retryable_serialization += o.retryable_serialization;
    }

    /// Signals delivered (by `send_signal` and by `fire_due_waits`).
    pub fn delivered(&self) -> u64 {
        self.delivered_by_send + self.delivered_by_fire
    }

    fn report(&mut self, r: &WaitReport, by_send: bool) {
        self.timers_fired += r.timers_fired;
        self.timed_out += r.signals_timed_out;
        if by_send {
            self.delivered_by_send += r.signals_delivered;
        } else {
            self.fire_calls += 1;
            self.delivered_by_fire += r.signals_delivered;
        }
    }
}

/// How many wait steps the end-of-run checks looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitChecked {
    /// Completed timers.
    pub timers: u64,
    /// Completed signal steps.
    pub signals_completed: u64,
    /// Signal steps failed at their timeout.
    pub signals_timed_out: u64,
    /// Wait steps skipped (their execution was cancelled or failed first).
    pub skipped: u64,
    /// Deliveries.
    pub deliveries: u64,
    /// Wait steps of the executions left at the end whose event history was
    /// compared.
    pub histories: u64,
}

/// Timers and signals in a run: what was done, what the checks found.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct WaitSummary {
    /// What the threads and the drain did.
    pub counts: WaitCounts,
    /// What the end-of-run checks looked at.
    pub checked: WaitChecked,
    /// Signals still undelivered at the end (sent twice, after the step, or
    /// to a branch that was not reached): kept, as the mailbox promises.
    pub undelivered_at_end: u64,
    /// Samples of the armed waits taken while the threads ran.
    pub samples: u64,
    /// The longest a due wait step of a running execution was seen waiting
    /// for `fire_due_waits` (information: a loaded machine is slow).
    pub max_lateness: Duration,
    /// What was wrong (the first 100), during the run or at its end.
    pub violations: Vec<String>,
    /// How many things were wrong in all.
    pub violation_count: u64,
}

impl WaitSummary {
    /// The kinds of wait activity a run of normal length (20 s or more)
    /// must show and this one did not: the run did not prove that waits
    /// were exercised.
    pub fn missing(&self) -> Vec<&'static str> {
        let c = &self.counts;
        let k = &self.checked;
        [
            ("timers fired", c.timers_fired),
            ("fire_due_waits calls by the leader", c.leader_fire_calls),
            ("signals sent", c.signals_sent),
            (
                "signals sent before their step was ready",
                c.sent_before_ready,
            ),
            ("signals sent twice", c.sent_twice),
            (
                "signals delivered at once by send_signal",
                c.delivered_at_send,
            ),
            ("signals delivered by fire_due_waits", c.delivered_by_fire),
            ("signals refused", c.refused),
            ("signal waits timed out", c.timed_out),
            ("timer_until executions", c.until_past + c.until_future),
            ("timers checked", k.timers),
            ("completed signal steps checked", k.signals_completed),
            ("timed-out signal steps checked", k.signals_timed_out),
            ("wait step histories checked", k.histories),
        ]
        .into_iter()
        .filter(|(_, n)| *n == 0)
        .map(|(what, _)| what)
        .collect()
    }
}

impl fmt::Display for WaitSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "waits: timers fired {}; signals sent {} ({} before their step was ready, {} twice, \
             {} with no step left to take them, {} by the drain), delivered {} ({} at once, {} \
             by send_signal in all, {} by fire_due_waits), refused {} ({} on purpose), timed out \
             {}, undelivered at the end {}; fire_due_waits calls {} ({} by the leader); \
             timer_until executions {} past, {} future; retryable errors in wait operations: \
             {} deadlocks, {} serialization failures",
            c.timers_fired,
            c.signals_sent,
            c.sent_before_ready,
            c.sent_twice,
            c.sent_unawaited,
            c.sent_by_drain,
            c.delivered(),
            c.delivered_at_send,
            c.delivered_by_send,
            c.delivered_by_fire,
            c.refused,
            c.refused_on_purpose,
            c.timed_out,
            self.undelivered_at_end,
            c.fire_calls,
            c.leader_fire_calls,
            c.until_past,
            c.until_future,
            c.retryable_deadlock,
            c.retryable_serialization,
        )?;
        let k = &self.checked;
        writeln!(
            f,
            "wait checks: {} timers, {} completed and {} timed-out signal steps, {} skipped, \
             {} deliveries, {} histories of steps left at the end; {} armed-wait samples (a due \
             wait waited at most {:.0} ms); violations: {}",
            k.timers,
            k.signals_completed,
            k.signals_timed_out,
            k.skipped,
            k.deliveries,
            k.histories,
            self.samples,
            self.max_lateness.as_secs_f64() * 1000.0,
            self.violation_count
        )?;
        for v in self.violations.iter().take(40) {
            writeln!(f, "  {v}")?;
        }
        let missing = self.missing();
        if !missing.is_empty() {
            writeln!(f, "waits not exercised: {}", missing.join(", "))?;
        }
        Ok(())
    }
}

/// Violations a run keeps (the count goes on).
const VIOLATION_LIMIT: usize = 100;

impl Shared {
    /// Adds what committed to the run's wait counts.
    pub(super) fn count_waits(&self, c: &WaitCounts) {
        lock(&self.waits).add(c);
    }

    /// Records something wrong with a wait, seen while the threads ran.
    pub(super) fn wait_violation(&self, what: String) {
        let line = format!("{:.2} s: {what}", self.elapsed().as_secs_f64());
        if self.config.verbose {
            eprintln!("torture: WAIT {line}");
        }
        let mut v = lock(&self.wait_violations);
        v.1 += 1;
        if v.0.len() < VIOLATION_LIMIT {
            v.0.push(line);
        }
    }

    /// An execution started with signal nodes, mostly a recent one.
    fn some_signal_execution(&self, rng: &mut SplitMix) -> Option<Uuid> {
        let list = lock(&self.signal_executions);
        if list.is_empty() {
            return None;
        }
        let n = list.len() as u64;
        let i = if rng.chance(70) {
            n - 1 - rng.below(n.min(100))
        } else {
            rng.below(n)
        };
        list.get(i as usize).copied()
    }

    fn forget_signal_execution(&self, id: Uuid) {
        lock(&self.signal_executions).retain(|x| *x != id);
    }

    /// Remembers an execution of a workflow with signal nodes.
    pub(super) fn remember_signal_execution(&self, workflow: Uuid, id: Uuid) {
        if !self.signal_workflows.contains(&workflow) {
            return;
        }
        let mut list = lock(&self.signal_executions);
        if list.len() >= SIGNAL_EXECUTIONS_CAP {
            list.drain(..SIGNAL_EXECUTIONS_CAP / 4);
        }
        list.push(id);
    }
}

const SIGNAL_EXECUTIONS_CAP: usize = 3000;

/// Counts a wait operation's retryable error (a deadlock or a
/// serialization failure) apart; whether it fails the run is decided as for
/// any operation.
pub(super) fn count_retryable(shared: &Shared, op: &str, e: &Error) {
    if !WAIT_OPS.contains(&op) {
        return;
    }
    let mut c = WaitCounts::default();
    match e.sqlstate() {
        Some(crate::error::sqlstate::DEADLOCK_DETECTED) => c.retryable_deadlock = 1,
        Some(crate::error::sqlstate::SERIALIZATION_FAILURE) => c.retryable_serialization = 1,
        _ => return,
    }
    shared.count_waits(&c);
}

// ---------------------------------------------------------------------------
// Workflows.

/// A timer of 0 to 50 ms, now and then (one in ten) a `timer_until` up to a
/// second in the past (the workflows are made at setup: the executions
/// start later, so it is due at once; [`start_until`] makes them on the fly).
fn timer(rng: &mut SplitMix, id: String) -> Node {
    if rng.chance(10) {
        Node::timer_until(id, Utc::now() - rng.millis(0, 1000))
    } else {
        Node::timer(id, rng.millis(0, 50))
    }
}

/// A signal wait for one of [`SIGNAL_NAMES`], one in three with a timeout of
/// 20 to 300 ms, the others without.
fn signal(rng: &mut SplitMix, id: String) -> Node {
    let name = SIGNAL_NAMES[rng.below(SIGNAL_NAMES.len() as u64) as usize];
    let node = Node::signal(id, name);
    if rng.chance(33) {
        node.with_timeout(rng.millis(20, 300))
    } else {
        node
    }
}

/// Turns about `timers`% of the graph's nodes into timers and `signals`% into
/// signal waits (ids and edges unchanged: roots and middle nodes alike).
pub(super) fn with_waits(
    rng: &mut SplitMix,
    mut graph: WorkflowGraph,
    timers: u64,
    signals: u64,
) -> WorkflowGraph {
    for node in &mut graph.nodes {
        let x = rng.below(100);
        if x < timers {
            *node = timer(rng, node.id.clone());
        } else if x < timers + signals {
            *node = signal(rng, node.id.clone());
        }
    }
    graph
}

/// The workflows made of waits (added to the run's shapes), with their
/// weights: a timer or a signal wait as the root, in the middle of a chain,
/// two signal waits of the same name side by side (they share the mailbox),
/// a signal wait after a timer.
pub(super) fn shapes(
    rng: &mut SplitMix,
    mut task: impl FnMut(&mut SplitMix, String) -> Node,
) -> Vec<(&'static str, WorkflowGraph, u64)> {
    let graph = |nodes: Vec<Node>, edges: &[(&str, &str)]| WorkflowGraph {
        nodes,
        edges: edges.iter().map(|(s, t)| Edge::new(*s, *t)).collect(),
    };
    let mut out = Vec::new();
    let nodes = vec![timer(rng, "t".into()), task(rng, "a".into())];
    out.push(("timer_root", graph(nodes, &[("t", "a")]), 3));
    let nodes = vec![signal(rng, "s".into())];
    out.push(("signal_only", graph(nodes, &[]), 2));
    let nodes = vec![
        signal(rng, "s".into()),
        task(rng, "a".into()),
        timer(rng, "t".into()),
    ];
    out.push(("signal_root", graph(nodes, &[("s", "a"), ("a", "t")]), 3));
    let nodes = vec![
        task(rng, "a".into()),
        timer(rng, "t".into()),
        task(rng, "b".into()),
    ];
    out.push(("timer_middle", graph(nodes, &[("a", "t"), ("t", "b")]), 3));
    let nodes = vec![
        task(rng, "a".into()),
        signal(rng, "s".into()),
        task(rng, "b".into()),
    ];
    out.push(("approval", graph(nodes, &[("a", "s"), ("s", "b")]), 3));
    // A signal wait with a timeout (the sender leaves half of those alone:
    // they time out).
    let name = SIGNAL_NAMES[rng.below(SIGNAL_NAMES.len() as u64) as usize];
    let nodes = vec![
        task(rng, "a".into()),
        Node::signal("s", name).with_timeout(rng.millis(20, 300)),
        task(rng, "b".into()),
    ];
    out.push(("deadline", graph(nodes, &[("a", "s"), ("s", "b")]), 2));
    // Two waits of one name: a signal is delivered to one step only, and a
    // step woken for a signal the other took waits on.
    let name = SIGNAL_NAMES[rng.below(SIGNAL_NAMES.len() as u64) as usize];
    let mut s2 = Node::signal("s2", name);
    if rng.chance(50) {
        s2 = s2.with_timeout(rng.millis(100, 300));
    }
    let nodes = vec![
        task(rng, "a".into()),
        Node::signal("s1", name),
        s2,
        timer(rng, "t".into()),
        task(rng, "b".into()),
    ];
    out.push((
        "twin_signals",
        graph(
            nodes,
            &[
                ("a", "s1"),
                ("a", "s2"),
                ("s1", "b"),
                ("s2", "t"),
                ("t", "b"),
            ],
        ),
        3,
    ));
    out
}

/// The signal names a graph's nodes wait for.
pub(super) fn signal_names(graph: &WorkflowGraph) -> Vec<String> {
    let mut names: Vec<String> = graph
        .nodes
        .iter()
        .filter(|n| n.r#type == SIGNAL_NODE_TYPE)
        .filter_map(|n| n.config.get("signal").and_then(|s| s.as_str()))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Makes a workflow with a `timer_until` up to 200 ms in the past or in the
/// future (a root, or between two tasks) and starts it.
fn start_until(
    shared: &Shared,
    conn: &mut PgConnection,
    rng: &mut SplitMix,
    c: &mut WaitCounts,
) -> Result<()> {
    if shared.throttled.load(Ordering::Relaxed) {
        return Ok(());
    }
    let offset = rng.range(0, 400) as i64 - 200;
    let at = Utc::now() + chrono::TimeDelta::milliseconds(offset);
    let timer = Node::timer_until("t", at);
    let graph = if rng.chance(50) {
        WorkflowGraph {
            nodes: vec![timer],
            edges: vec![],
        }
    } else {
        WorkflowGraph {
            nodes: vec![
                Node::new("a", super::NODE_TYPE),
                timer,
                Node::new("b", super::NODE_TYPE),
            ],
            edges: vec![Edge::new("a", "t"), Edge::new("t", "b")],
        }
    };
    let wf = NewWorkflow::from_graph("timer_until", &graph).create(conn)?;
    let mut new = NewExecution::new(wf.id).user_id("torture");
    if rng.chance(50) {
        if let Some(key) = rng.pick(&super::KEYS) {
            new = new.concurrency_key(*key);
        }
    }
    let started = engine::start_execution(conn, &new)?;
    shared.remember(started.execution.id);
    if offset < 0 {
        c.until_past += 1;
    } else {
        c.until_future += 1;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Operations.

/// A batch for `fire_due_waits`: now and then 1 to 3, else 4 to 50.
fn batch(rng: &mut SplitMix) -> i64 {
    (if rng.chance(30) {
        rng.range(1, 3)
    } else {
        rng.range(4, 50)
    }) as i64
}

/// `fire_due_waits` with a random batch, again while it fills it (at most
/// 5 times), each call its own transaction.
fn fire(conn: &mut PgConnection, rng: &mut SplitMix, c: &mut WaitCounts) -> Result<()> {
    let limit = batch(rng);
    for _ in 0..5 {
        let r = engine::fire_due_waits(conn, limit)?;
        c.report(&r, false);
        if r.due < limit as u64 {
            break;
        }
    }
    Ok(())
}

/// One `fire_due_waits` (inside a transaction of the caller: a second
/// batch in the same transaction would lock executions out of the engine's
/// order, after those of the first).
fn fire_once(conn: &mut PgConnection, rng: &mut SplitMix, c: &mut WaitCounts) -> Result<()> {
    let r = engine::fire_due_waits(conn, batch(rng))?;
    c.report(&r, false);
    Ok(())
}

#[derive(QueryableByName)]
struct SignalState {
    #[diesel(sql_type = Text)]
    execution_status: String,
    #[diesel(sql_type = Nullable<Text>)]
    name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    upstream_pending: Option<i32>,
    /// It has a timeout.
    #[diesel(sql_type = Bool)]
    timed: bool,
    /// Undelivered signals of its name.
    #[diesel(sql_type = BigInt)]
    kept: i64,
}

impl SignalState {
    fn pending(&self) -> bool {
        self.status.as_deref() == Some("pending")
    }

    fn ready(&self) -> bool {
        self.pending() && self.upstream_pending == Some(0)
    }
}

/// An execution's status and its signal steps, with the undelivered
/// signals of their names.
const SIGNAL_STATE: &str = "\
SELECT x.status::text AS execution_status, s.wait_signal AS name, s.status::text AS status,
       s.upstream_pending, s.wait_seconds IS NOT NULL AS timed,
       (SELECT count(*) FROM execution_signals g
         WHERE g.execution_id = x.id AND g.name = s.wait_signal AND g.delivered_to IS NULL) AS kept
  FROM executions x LEFT JOIN execution_steps s ON s.execution_id = x.id AND s.wait_signal IS NOT NULL
 WHERE x.id = $1";

fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled" | "skipped")
}

/// Sends a signal to an execution with signal nodes: mostly a name a ready
/// step waits for, else any of its names (before the step is reached, or
/// after it is done); now and then twice; and now and then to an execution
/// seen final, where it must be refused.
fn send_some(
    shared: &Shared,
    conn: &mut PgConnection,
    rng: &mut SplitMix,
    c: &mut WaitCounts,
) -> Result<()> {
    let Some(id) = shared.some_signal_execution(rng) else {
        return Ok(());
    };
    let state: Vec<SignalState> = diesel::sql_query(SIGNAL_STATE)
        .bind::<SqlUuid, _>(id)
        .load(conn)?;
    let Some(first) = state.first() else {
        // Pruned.
        shared.forget_signal_execution(id);
        return Ok(());
    };
    let names: Vec<&str> = state.iter().filter_map(|s| s.name.as_deref()).collect();
    let Some(any) = rng.pick(&names).copied() else {
        return Ok(());
    };
    if is_final(&first.execution_status) {
        shared.forget_signal_execution(id);
        if !rng.chance(30) {
            return Ok(());
        }
        let status = first.execution_status.clone();
        return match send(shared, conn, rng, id, any, c) {
            Ok(()) => {
                shared.wait_violation(format!(
                    "send_signal({any:?}) to execution {id}, {status}, was accepted"
                ));
                Ok(())
            }
            Err(e) => {
                if matches!(e, Error::SignalRefused { .. }) {
                    c.refused_on_purpose += 1;
                }
                Err(e)
            }
        };
    }
    // A ready step with nothing in its mailbox: mostly signalled (one with
    // a timeout only half of the times: the others time out). Else a step
    // not reached yet whose mailbox is short of a signal: signalled early,
    // half of the times. Else, now and then, any name (a signal no step
    // may take: kept for ever).
    let pending_of = |name: &str| {
        state
            .iter()
            .filter(|s| s.name.as_deref() == Some(name) && s.pending())
            .count() as i64
    };
    let needy: Vec<&SignalState> = state.iter().filter(|s| s.ready() && s.kept == 0).collect();
    let early: Vec<&str> = state
        .iter()
        .filter(|s| s.pending() && !s.ready())
        .filter(|s| s.name.as_deref().is_some_and(|n| s.kept < pending_of(n)))
        .filter_map(|s| s.name.as_deref())
        .collect();
    let name = match (rng.pick(&needy), rng.pick(&early)) {
        (Some(s), _) if rng.chance(85) => {
            if s.timed && rng.chance(50) {
                return Ok(());
            }
            s.name.as_deref().unwrap_or(any)
        }
        (_, Some(n)) if rng.chance(50) => {
            c.sent_before_ready += 1;
            n
        }
        _ if rng.chance(10) => {
            if pending_of(any) == 0 {
                c.sent_unawaited += 1;
            }
            any
        }
        _ => return Ok(()),
    };
    send(shared, conn, rng, id, name, c)?;
    if rng.chance(15) {
        c.sent_twice += 1;
        send(shared, conn, rng, id, name, c)?;
    }
    Ok(())
}

/// One `send_signal` with a payload unique in the run (now and then none).
fn send(
    shared: &Shared,
    conn: &mut PgConnection,
    rng: &mut SplitMix,
    id: Uuid,
    name: &str,
    c: &mut WaitCounts,
) -> Result<()> {
    let n = shared.signal_seq.fetch_add(1, Ordering::Relaxed);
    let payload = (!rng.chance(5)).then(|| json!({"signal": n, "execution": id, "name": name}));
    match engine::send_signal(conn, id, name, payload.as_ref()) {
        Ok(sent) => {
            let s = &sent.signal;
            if s.execution_id != id || s.name != name || s.payload != payload {
                shared.wait_violation(format!(
                    "send_signal({name:?}, {payload:?}) to {id} stored {s:?}"
                ));
            }
            c.signals_sent += 1;
            if s.delivered_to.is_some() {
                c.delivered_at_send += 1;
            }
            c.report(&sent.report, true);
            Ok(())
        }
        Err(e) => {
            if matches!(e, Error::SignalRefused { .. }) {
                c.refused += 1;
            }
            Err(e)
        }
    }
}

/// The wait operations of the worker threads.
pub(super) fn step(
    shared: &Shared,
    conn: &mut PgConnection,
    rng: &mut SplitMix,
    op: &'static str,
    held: &mut Vec<super::Held>,
) -> Result<()> {
    let mut c = WaitCounts::default();
    let result = match op {
        "fire_waits" => fire(conn, rng, &mut c),
        "signal" => send_some(shared, conn, rng, &mut c),
        "start_until" => start_until(shared, conn, rng, &mut c),
        "tx_fire_waits_slow" => {
            // A slow maintenance leader: the executions and steps it took
            // stay locked while others pause, cancel, complete and send.
            let mut inner = WaitCounts::default();
            let r = conn.transaction(|t| {
                nap(t, rng)?;
                fire_once(t, rng, &mut inner)?;
                nap(t, rng)?;
                nap(t, rng)
            });
            if r.is_ok() {
                c.add(&inner);
            }
            r
        }
        "tx_signal_slow" => {
            // The execution stays locked after the signal went in.
            let mut inner = WaitCounts::default();
            let r = conn.transaction(|t| {
                nap(t, rng)?;
                send_some(shared, t, rng, &mut inner)?;
                nap(t, rng)
            });
            if r.is_ok() {
                c.add(&inner);
            }
            r
        }
        "tx_pause_signal" => {
            // Pause, then signal: the signal is stored and its step woken,
            // but a paused execution's steps wait for the resume.
            let Some(id) = shared.some_signal_execution(rng) else {
                return Ok(());
            };
            let name = SIGNAL_NAMES[rng.below(SIGNAL_NAMES.len() as u64) as usize];
            let mut inner = WaitCounts::default();
            let r = conn.transaction(|t| {
                engine::pause(t, id)?;
                nap(t, rng)?;
                send(shared, t, rng, id, name, &mut inner)?;
                nap(t, rng)
            });
            if r.is_ok() {
                c.add(&inner);
                lock(&shared.paused).push(id);
            }
            r
        }
        "tx_complete_fire_waits" => {
            // Outside the lock order (cross-execution only): a step of one
            // execution ends, then due waits of any execution fire.
            let Some(h) = super::take(rng, held) else {
                return Ok(());
            };
            let mut inner = WaitCounts::default();
            let r = conn.transaction(|t| {
                engine::complete_step(t, &h.lease, None)?;
                nap(t, rng)?;
                fire_once(t, rng, &mut inner)?;
                nap(t, rng)
            });
            if r.is_ok() {
                c.add(&inner);
            }
            r
        }
        _ => Ok(()),
    };
    // What committed (each send and fire outside a transaction of the
    // torture's own commits by itself, also when a later one failed).
    shared.count_waits(&c);
    result
}

/// The maintenance leader's part: `fire_due_waits` until nothing is due,
/// every 2 to 25 ms, while the threads run.
pub(super) fn leader(shared: &Shared, seed: u64) -> Tally {
    let mut tally = Tally::default();
    let mut conn = match connect(shared) {
        Ok(c) => c,
        Err(e) => {
            tally.record(shared, LEADER, "connect", Err(e));
            return tally;
        }
    };
    let mut rng = SplitMix(seed);
    while !shared.stop.load(Ordering::Relaxed) {
        let mut c = WaitCounts::default();
        let limit = rng.range(5, 100) as i64;
        let result: Result<()> = (|| {
            loop {
                let r = engine::fire_due_waits(&mut conn, limit)?;
                c.report(&r, false);
                c.leader_fire_calls += 1;
                if r.due < limit as u64 {
                    return Ok(());
                }
            }
        })();
        shared.count_waits(&c);
        tally.record(shared, LEADER, "leader_fire_waits", result);
        thread::sleep(rng.millis(2, 25));
    }
    tally
}

/// The signal sender: [`send_some`] every 1 to 10 ms while the threads run.
pub(super) fn sender(shared: &Shared, seed: u64) -> Tally {
    let mut tally = Tally::default();
    let mut conn = match connect(shared) {
        Ok(c) => c,
        Err(e) => {
            tally.record(shared, SENDER, "connect", Err(e));
            return tally;
        }
    };
    let mut rng = SplitMix(seed);
    while !shared.stop.load(Ordering::Relaxed) {
        let mut c = WaitCounts::default();
        let result = send_some(shared, &mut conn, &mut rng, &mut c);
        shared.count_waits(&c);
        if result.is_err() && diesel::sql_query("SELECT 1").execute(&mut conn).is_err() {
            if let Ok(fresh) = connect(shared) {
                conn = fresh;
            }
        }
        tally.record(shared, SENDER, "sender_signal", result);
        thread::sleep(rng.millis(1, 10));
    }
    tally
}

// ---------------------------------------------------------------------------
// The sampler.

#[derive(QueryableByName)]
struct BadWait {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    detail: String,
}

/// Ready wait steps that are not armed as they must be, in one snapshot: a
/// timer without `wake_at`, a signal wait with an undelivered signal of its
/// name that is not due (the sender wakes the ready steps, a step becoming
/// ready looks at the mailbox, both under the execution's lock).
const WAIT_SAMPLE: &str = "\
SELECT s.id, format('%s step %s (%s) of execution %s (%s) is ready but %s', s.node_type, s.node_id, s.id,
              s.execution_id, x.status,
              CASE WHEN s.wait_signal IS NULL THEN 'not armed (wake_at NULL)'
                   ELSE format('not due (wake_at %s) while signal %L waits in its mailbox',
                               coalesce(s.wake_at::text, 'NULL'), s.wait_signal) END) AS detail
  FROM execution_steps s JOIN executions x ON x.id = s.execution_id
 WHERE s.node_type IN ('workflow_db.timer', 'workflow_db.signal')
   AND s.status = 'pending' AND s.upstream_pending = 0
   AND ((s.wait_signal IS NULL AND s.wake_at IS NULL)
        OR (s.wait_signal IS NOT NULL AND (s.wake_at IS NULL OR s.wake_at > statement_timestamp())
            AND EXISTS (SELECT 1 FROM execution_signals g
                         WHERE g.execution_id = s.execution_id AND g.name = s.wait_signal
                           AND g.delivered_to IS NULL)))
 LIMIT 5";

#[derive(QueryableByName)]
struct Lateness {
    #[diesel(sql_type = Nullable<Double>)]
    seconds: Option<f64>,
}

/// How late the most overdue wait step of a running execution is: since
/// it was due, since it became ready (a timer_until's time may have passed
/// long before), or since its execution last started running (a wait due
/// while its execution was paused waits for the resume), whichever is last.
const LATENESS: &str = "\
SELECT extract(epoch FROM statement_timestamp() - min(greatest(
           s.wake_at, s.created_at,
           (SELECT max(u.completed_at) FROM execution_steps u
             WHERE u.execution_id = s.execution_id AND s.node_id = ANY (u.downstream)),
           (SELECT max(e.created_at) FROM execution_events e
             WHERE e.execution_id = s.execution_id AND e.step_id IS NULL AND e.to_status = 'running'))))::float8
       AS seconds
  FROM execution_steps s JOIN executions x ON x.id = s.execution_id
 WHERE s.status = 'pending' AND s.upstream_pending = 0 AND NOT s.parked
   AND s.wake_at <= statement_timestamp() AND x.status = 'running'";

/// Samples the armed waits every `every` while the threads run
/// ([`WAIT_SAMPLE`]: a breach is a violation, once per step) and how late
/// due waits are.
/// Returns how many samples were taken and the largest lateness seen.
pub(super) fn sample_while_running(shared: &Shared, every: Duration) -> (u64, Duration) {
    let mut samples = 0;
    let mut max_late = Duration::ZERO;
    let mut seen = std::collections::HashSet::new();
    let Ok(mut conn) = connect(shared) else {
        return (0, max_late);
    };
    while !shared.stop.load(Ordering::Relaxed) {
        thread::sleep(every);
        let Ok(rows) = diesel::sql_query(WAIT_SAMPLE).load::<BadWait>(&mut conn) else {
            continue;
        };
        samples += 1;
        for r in rows.into_iter().filter(|r| seen.insert(r.id)) {
            shared.wait_violation(format!("sampler: {}", r.detail));
        }
        if let Ok(Lateness { seconds: Some(s) }) =
            diesel::sql_query(LATENESS).get_result::<Lateness>(&mut conn)
        {
            max_late = max_late.max(Duration::from_secs_f64(s.max(0.0)));
        }
    }
    (samples, max_late)
}

// ---------------------------------------------------------------------------
// The drain.

#[derive(QueryableByName)]
struct Waiting {
    #[diesel(sql_type = SqlUuid)]
    execution_id: Uuid,
    #[diesel(sql_type = Text)]
    name: String,
}

/// The drain's part: fires what is due until nothing is, and sends a signal
/// to every ready step waiting without timeout and with nothing in its
/// mailbox (the ones with a timeout time out). Returns how many waits
/// moved (fired, delivered, timed out, or signalled).
pub(super) fn drain(shared: &Shared, conn: &mut PgConnection, tally: &mut Tally) -> Result<u64> {
    const DRAIN: usize = usize::MAX;
    const BATCH: i64 = 500;
    let mut c = WaitCounts::default();
    let mut moved = 0;
    loop {
        match engine::fire_due_waits(conn, BATCH) {
            Ok(r) => {
                c.report(&r, false);
                moved += r.timers_fired + r.signals_delivered + r.signals_timed_out;
                tally.record(shared, DRAIN, "drain_fire_waits", Ok(()));
                if r.due < BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tally.record(shared, DRAIN, "drain_fire_waits", Err(e));
                break;
            }
        }
    }
    let waiting: Vec<Waiting> = diesel::sql_query(
        "SELECT DISTINCT s.execution_id, s.wait_signal AS name FROM execution_steps s \
         JOIN executions x ON x.id = s.execution_id \
         WHERE s.wait_signal IS NOT NULL AND s.status = 'pending' AND s.upstream_pending = 0 \
           AND s.wake_at IS NULL AND x.status IN ('pending', 'running', 'paused')",
    )
    .load(conn)?;
    let mut rng = SplitMix(shared.config.seed ^ 0xD4A1_4000);
    for w in waiting {
        let mut one = WaitCounts::default();
        let result = send(shared, conn, &mut rng, w.execution_id, &w.name, &mut one);
        if result.is_ok() {
            one.sent_by_drain += 1;
            moved += 1;
        }
        c.add(&one);
        tally.record(shared, DRAIN, "drain_signal", result);
    }
    shared.count_waits(&c);
    Ok(moved)
}

// ---------------------------------------------------------------------------
// The logs and the end-of-run checks.

/// The logs of what wait steps and signals did, kept by triggers (a row
/// written by a transaction that rolls back goes with it): every status
/// change of a wait step, with the clock time, the worker (as the history
/// names it) and, when it starts, when its upstream steps finished (a root:
/// its creation or its execution's delayed start, whichever is later) and
/// how many were not completed; every signal sent and every change of a
/// signal's delivery.
pub(super) const WAIT_LOG: &str = "
CREATE TABLE torture_wait_log (
    id bigserial PRIMARY KEY,
    step_id uuid NOT NULL, execution_id uuid NOT NULL, node_id text NOT NULL, node_type text NOT NULL,
    from_status text NOT NULL, to_status text NOT NULL, worker text, output jsonb, error text,
    wait_delay interval, wait_until timestamptz, wake_at timestamptz, wait_signal text,
    upstream_done timestamptz, upstream_open bigint,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION torture_wait_log_step() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    done timestamptz;
    open bigint;
    n bigint;
BEGIN
    IF NEW.status = 'running' THEN
        SELECT max(u.completed_at), count(*) FILTER (WHERE u.status <> 'completed'), count(*)
          INTO done, open, n
          FROM execution_steps u
         WHERE u.execution_id = NEW.execution_id AND NEW.node_id = ANY (u.downstream);
        IF n = 0 THEN
            SELECT greatest(NEW.created_at, x.start_after) INTO done
              FROM executions x WHERE x.id = NEW.execution_id;
        END IF;
    END IF;
    INSERT INTO torture_wait_log (step_id, execution_id, node_id, node_type, from_status, to_status,
                                  worker, output, error, wait_delay, wait_until, wake_at, wait_signal,
                                  upstream_done, upstream_open)
    VALUES (NEW.id, NEW.execution_id, NEW.node_id, NEW.node_type, OLD.status::text, NEW.status::text,
            coalesce(NEW.locked_by, OLD.locked_by), NEW.output, NEW.error, NEW.wait_seconds * interval '1 second',
            NEW.wait_until, NEW.wake_at, NEW.wait_signal, done, open);
    RETURN NULL;
END $$;
CREATE TRIGGER torture_wait_log AFTER UPDATE OF status ON execution_steps
    FOR EACH ROW WHEN (NEW.node_type IN ('workflow_db.timer', 'workflow_db.signal')
                       AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION torture_wait_log_step();
CREATE TABLE torture_signal_log (
    id bigserial PRIMARY KEY, what text NOT NULL,
    signal_id uuid NOT NULL, execution_id uuid NOT NULL, name text NOT NULL, payload jsonb,
    old_delivered_to uuid, delivered_to uuid,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION torture_signal_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO torture_signal_log (what, signal_id, execution_id, name, payload, old_delivered_to, delivered_to)
    VALUES (CASE TG_OP WHEN 'INSERT' THEN 'sent' ELSE 'delivered' END, NEW.id, NEW.execution_id,
            NEW.name, NEW.payload, CASE TG_OP WHEN 'UPDATE' THEN OLD.delivered_to END, NEW.delivered_to);
    RETURN NULL;
END $$;
CREATE TRIGGER torture_signal_sent AFTER INSERT ON execution_signals
    FOR EACH ROW EXECUTE FUNCTION torture_signal_log();
CREATE TRIGGER torture_signal_delivered AFTER UPDATE OF delivered_to ON execution_signals
    FOR EACH ROW WHEN (OLD.delivered_to IS DISTINCT FROM NEW.delivered_to)
    EXECUTE FUNCTION torture_signal_log();
CREATE VIEW torture_wait_runs AS
SELECT r.step_id, r.execution_id, r.node_id, r.node_type, r.wait_signal, r.wait_delay,
       r.wait_until AS armed_until, r.wake_at AS armed_wake, r.upstream_done, r.upstream_open,
       f.to_status, f.output, f.error, f.at AS finished
  FROM torture_wait_log r
  JOIN torture_wait_log f ON f.step_id = r.step_id AND f.from_status = 'running'
 WHERE r.to_status = 'running';
";

/// The transitions a wait step's history may show: run by the engine and
/// completed (or failed: a signal wait's timeout), or skipped when its
/// execution was cancelled or failed first.
fn completed_history() -> String {
    format!("pending->running@{WAITS_WORKER}, running->completed@{WAITS_WORKER}")
}

fn failed_history() -> String {
    format!("pending->running@{WAITS_WORKER}, running->failed@{WAITS_WORKER}")
}

const SKIPPED_HISTORY: &str = "pending->skipped@-";

/// The checks: each query returns what is wrong, one row each
/// (`$1`: the history of a completed wait step, `$2`: of a failed one,
/// `$3`: of a skipped one).
const CHECKS: &[(&str, &str)] = &[
    (
        "transitions",
        "SELECT format('%s step %s (%s) of execution %s: transitions %s', node_type, node_id,
                       step_id, execution_id, seq)
           FROM (SELECT step_id, execution_id, node_id, node_type,
                        string_agg(format('%s->%s@%s', from_status, to_status, coalesce(worker, '-')),
                                   ', ' ORDER BY id) AS seq
                   FROM torture_wait_log GROUP BY 1, 2, 3, 4) q
          WHERE NOT (seq IN ($1, $3) OR (seq = $2 AND node_type = 'workflow_db.signal'))",
    ),
    (
        "ran before its upstream",
        "SELECT format('%s step %s (%s) of execution %s started with %s upstream step(s) not completed',
                       node_type, node_id, step_id, execution_id, upstream_open)
           FROM torture_wait_runs WHERE upstream_open > 0",
    ),
    (
        "signals per completed signal step",
        "SELECT format('signal step %s (%s) of execution %s, waiting for %L, completed with %s signal(s) delivered to it',
                       r.node_id, r.step_id, r.execution_id, r.wait_signal, count(d.id))
           FROM torture_wait_runs r
           LEFT JOIN torture_signal_log d ON d.what = 'delivered' AND d.delivered_to = r.step_id
          WHERE r.node_type = 'workflow_db.signal' AND r.to_status = 'completed'
          GROUP BY r.step_id, r.node_id, r.execution_id, r.wait_signal
         HAVING count(d.id) <> 1",
    ),
    (
        "output of a signal step",
        "SELECT format('signal step %s (%s) of execution %s: output %s, but the signal delivered to it (%s) carries %s',
                       r.node_id, r.step_id, r.execution_id, coalesce(r.output::text, 'NULL'), d.signal_id,
                       coalesce(d.payload::text, 'NULL'))
           FROM torture_wait_runs r
           JOIN torture_signal_log d ON d.what = 'delivered' AND d.delivered_to = r.step_id
          WHERE r.to_status = 'completed' AND r.output IS DISTINCT FROM d.payload",
    ),
    (
        "deliveries",
        "SELECT format('signal %s (%L to execution %s) delivered to %s: %s', d.signal_id, d.name,
                       d.execution_id, coalesce(d.delivered_to::text, 'nobody'),
                       CASE WHEN d.old_delivered_to IS NOT NULL
                                THEN format('it had been delivered to %s', d.old_delivered_to)
                            WHEN d.delivered_to IS NULL THEN 'undelivered again'
                            WHEN r.step_id IS NULL THEN 'not a completed signal step'
                            WHEN r.execution_id <> d.execution_id
                                THEN format('a step of execution %s', r.execution_id)
                            ELSE format('a step waiting for %L', r.wait_signal) END)
           FROM torture_signal_log d
           LEFT JOIN torture_wait_runs r ON r.step_id = d.delivered_to AND r.to_status = 'completed'
                                        AND r.node_type = 'workflow_db.signal'
          WHERE d.what = 'delivered'
            AND (d.old_delivered_to IS NOT NULL OR d.delivered_to IS NULL OR r.step_id IS NULL
                 OR r.execution_id <> d.execution_id OR r.wait_signal IS DISTINCT FROM d.name)",
    ),
    (
        "signal delivered more than once",
        "SELECT format('signal %s delivered %s times', signal_id, count(*))
           FROM torture_signal_log WHERE what = 'delivered' GROUP BY signal_id HAVING count(*) > 1",
    ),
    (
        "signal delivered as sent",
        "SELECT format('signal %s delivered (%L to %s, payload %s) but sent %s', d.signal_id, d.name,
                       d.execution_id, coalesce(d.payload::text, 'NULL'),
                       coalesce(format('%L to %s, payload %s', s.name, s.execution_id,
                                       coalesce(s.payload::text, 'NULL')), 'never'))
           FROM torture_signal_log d
           LEFT JOIN torture_signal_log s ON s.what = 'sent' AND s.signal_id = d.signal_id
          WHERE d.what = 'delivered'
            AND (s.id IS NULL OR s.name <> d.name OR s.execution_id <> d.execution_id
                 OR s.payload IS DISTINCT FROM d.payload)",
    ),
    (
        "timed-out signal waits",
        "SELECT format('signal step %s (%s) of execution %s failed with %L: %s', node_id, step_id,
                       execution_id, error, why)
           FROM (SELECT r.*, CASE
                   WHEN r.wait_delay IS NULL THEN 'it had no timeout'
                   WHEN r.armed_until IS NULL THEN 'no deadline was armed'
                   WHEN r.error IS NULL OR r.error !~ '^signal \".*\" not received by \\d{4}-\\d\\d-\\d\\dT[0-9:.]+(Z|[+-]\\d\\d:\\d\\d)$'
                       THEN 'not the timeout''s error'
                   WHEN substring(r.error FROM ' not received by (\\S+)$')::timestamptz <> r.armed_until
                       THEN format('the error names another deadline than the armed one, %s', r.armed_until)
                   WHEN r.finished < r.armed_until
                       THEN format('it failed at %s, before its deadline %s', r.finished, r.armed_until)
                   WHEN r.armed_until < r.upstream_done + r.wait_delay - interval '1 millisecond'
                       THEN format('its deadline %s is earlier than its upstream finished (%s) + its timeout %s',
                                   r.armed_until, r.upstream_done, r.wait_delay)
                   WHEN EXISTS (SELECT 1 FROM torture_signal_log d
                                 WHERE d.what = 'delivered' AND d.delivered_to = r.step_id)
                       THEN 'a signal was delivered to it'
                 END AS why
                   FROM torture_wait_runs r
                  WHERE r.node_type = 'workflow_db.signal' AND r.to_status = 'failed') q
          WHERE why IS NOT NULL",
    ),
    (
        "completed timers",
        "SELECT format('timer %s (%s) of execution %s (output %s): %s', node_id, step_id, execution_id,
                       coalesce(output::text, 'NULL'), why)
           FROM (SELECT r.*, CASE
                   WHEN NOT (jsonb_typeof(r.output->'due_at') = 'string'
                             AND jsonb_typeof(r.output->'fired_at') = 'string')
                       THEN 'no due_at and fired_at'
                   WHEN (r.output->>'fired_at')::timestamptz < (r.output->>'due_at')::timestamptz
                       THEN 'fired before it was due'
                   WHEN r.finished < (r.output->>'due_at')::timestamptz
                       THEN format('completed at %s, before it was due', r.finished)
                   WHEN (r.output->>'due_at')::timestamptz IS DISTINCT FROM r.armed_wake
                       THEN format('due_at is not its armed wake_at %s', r.armed_wake)
                   WHEN r.wait_delay IS NOT NULL AND (r.output->>'due_at')::timestamptz
                            < r.upstream_done + r.wait_delay - interval '1 millisecond'
                       THEN format('due earlier than its upstream finished (%s) + its delay %s',
                                   r.upstream_done, r.wait_delay)
                   WHEN r.armed_until IS NOT NULL AND (r.output->>'due_at')::timestamptz
                            < r.armed_until - interval '1 millisecond'
                       THEN format('due earlier than its time %s', r.armed_until)
                   WHEN (r.output->>'fired_at')::timestamptz < r.upstream_done
                       THEN format('fired before its upstream finished (%s)', r.upstream_done)
                 END AS why
                   FROM torture_wait_runs r
                  WHERE r.node_type = 'workflow_db.timer' AND r.to_status = 'completed') q
          WHERE why IS NOT NULL",
    ),
    (
        "histories",
        "SELECT format('%s step %s (%s) of execution %s (%s): history %L, logged %L', node_type, node_id,
                       id, execution_id, execution_status, events, logged)
           FROM (SELECT s.id, s.execution_id, s.node_id, s.node_type, x.status::text AS execution_status,
                        coalesce(e.seq, '') AS events, coalesce(l.seq, '') AS logged
                   FROM execution_steps s JOIN executions x ON x.id = s.execution_id
                   LEFT JOIN (SELECT step_id, string_agg(format('%s->%s@%s', from_status, to_status,
                                                                coalesce(payload->>'worker', '-')),
                                                         ', ' ORDER BY id) AS seq
                                FROM execution_events WHERE step_id IS NOT NULL GROUP BY step_id) e
                          ON e.step_id = s.id
                   LEFT JOIN (SELECT step_id, string_agg(format('%s->%s@%s', from_status, to_status,
                                                                coalesce(worker, '-')),
                                                         ', ' ORDER BY id) AS seq
                                FROM torture_wait_log GROUP BY step_id) l
                          ON l.step_id = s.id
                  WHERE s.node_type IN ('workflow_db.timer', 'workflow_db.signal')) q
          WHERE events <> logged
             OR NOT (events IN ($1, $2)
                     OR (events = $3 AND execution_status IN ('cancelled', 'failed')))",
    ),
];

#[derive(QueryableByName)]
struct Checked {
    #[diesel(sql_type = BigInt)]
    timers: i64,
    #[diesel(sql_type = BigInt)]
    signals_completed: i64,
    #[diesel(sql_type = BigInt)]
    signals_timed_out: i64,
    #[diesel(sql_type = BigInt)]
    skipped: i64,
    #[diesel(sql_type = BigInt)]
    deliveries: i64,
    #[diesel(sql_type = BigInt)]
    sent: i64,
    #[diesel(sql_type = BigInt)]
    histories: i64,
    #[diesel(sql_type = BigInt)]
    undelivered: i64,
    #[diesel(sql_type = Bool)]
    unfinished: bool,
}

const CHECKED: &str = "\
SELECT (SELECT count(*) FROM torture_wait_runs
         WHERE node_type = 'workflow_db.timer' AND to_status = 'completed') AS timers,
       (SELECT count(*) FROM torture_wait_runs
         WHERE node_type = 'workflow_db.signal' AND to_status = 'completed') AS signals_completed,
       (SELECT count(*) FROM torture_wait_runs
         WHERE node_type = 'workflow_db.signal' AND to_status = 'failed') AS signals_timed_out,
       (SELECT count(*) FROM torture_wait_log WHERE to_status = 'skipped') AS skipped,
       (SELECT count(*) FROM torture_signal_log WHERE what = 'delivered') AS deliveries,
       (SELECT count(*) FROM torture_signal_log WHERE what = 'sent') AS sent,
       (SELECT count(*) FROM execution_steps
         WHERE node_type IN ('workflow_db.timer', 'workflow_db.signal')) AS histories,
       (SELECT count(*) FROM execution_signals WHERE delivered_to IS NULL) AS undelivered,
       EXISTS (SELECT 1 FROM execution_steps
                WHERE node_type IN ('workflow_db.timer', 'workflow_db.signal')
                  AND status IN ('pending', 'running')) AS unfinished";

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = Text)]
    detail: String,
    #[diesel(sql_type = BigInt)]
    total: i64,
}

/// Runs [`CHECKS`]: what each found (at most 3 each), with how many it
/// found in all on the first of its rows (0 on the others).
fn check_logs(conn: &mut PgConnection) -> Result<Vec<(&'static str, String, u64)>> {
    let (completed, failed) = (completed_history(), failed_history());
    let mut out = Vec::new();
    for (name, sql) in CHECKS {
        let found: Vec<Found> = diesel::sql_query(format!(
            "SELECT detail, count(*) OVER () AS total FROM ({sql}) AS v(detail) LIMIT 3"
        ))
        .bind::<Text, _>(&completed)
        .bind::<Text, _>(&failed)
        .bind::<Text, _>(SKIPPED_HISTORY)
        .load(conn)?;
        let total = found.first().map_or(0, |f| f.total as u64);
        for (i, f) in found.into_iter().enumerate() {
            out.push((*name, f.detail, u64::from(i == 0) * total));
        }
    }
    Ok(out)
}

/// The end-of-run checks of the waits (after the drain; see [`CHECKS`]),
/// and the counts of the threads against the logs: every timer fired,
/// signal delivered, wait timed out and signal sent that a report counted
/// is a committed transition in the logs, and the other way round.
pub(super) fn check(shared: &Shared, conn: &mut PgConnection) -> Result<WaitSummary> {
    let counts = *lock(&shared.waits);
    let (mut violations, mut violation_count) = {
        let v = lock(&shared.wait_violations);
        (v.0.clone(), v.1)
    };
    let mut add = |line: String, n: u64| {
        violation_count += n;
        if violations.len() < VIOLATION_LIMIT {
            violations.push(line);
        }
    };
    for (name, detail, total) in check_logs(conn)? {
        add(format!("end: {name}: {detail}"), total);
    }
    let k: Checked = diesel::sql_query(CHECKED).get_result(conn)?;
    let mut compare = |what: &str, reported: u64, logged: i64| {
        if reported != logged as u64 {
            add(
                format!("end: {what}: the reports count {reported}, the log {logged}"),
                1,
            );
        }
    };
    compare("timers fired", counts.timers_fired, k.timers);
    compare("signals delivered", counts.delivered(), k.deliveries);
    compare(
        "signal waits timed out",
        counts.timed_out,
        k.signals_timed_out,
    );
    compare("signals sent", counts.signals_sent, k.sent);
    if k.unfinished {
        add("end: wait steps still pending or running".into(), 1);
    }
    let (samples, max_lateness) = *lock(&shared.wait_samples);
    Ok(WaitSummary {
        counts,
        checked: WaitChecked {
            timers: k.timers as u64,
            signals_completed: k.signals_completed as u64,
            signals_timed_out: k.signals_timed_out as u64,
            skipped: k.skipped as u64,
            deliveries: k.deliveries as u64,
            histories: k.histories as u64,
        },
        undelivered_at_end: k.undelivered as u64,
        samples,
        max_lateness,
        violations,
        violation_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_shapes_are_valid_and_name_their_signals() {
        let mut rng = SplitMix(3);
        let task = |_: &mut SplitMix, id: String| Node::new(id, super::super::NODE_TYPE);
        for (name, graph, _) in shapes(&mut rng, task) {
            graph.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            let waits = graph.nodes.iter().filter(|n| n.is_wait()).count();
            assert!(waits > 0, "{name}");
        }
        let mut rng = SplitMix(5);
        let mut any_signal = false;
        for _ in 0..20 {
            let g = with_waits(&mut rng, super::super::chain(&mut SplitMix(9), 6), 20, 20);
            g.validate().unwrap();
            any_signal |= !signal_names(&g).is_empty();
        }
        assert!(any_signal);
    }

    /// The checks find what they look for: logs written by hand, each
    /// broken one way (and two right ones, which nothing reports).
    #[test]
    fn the_checks_see_broken_waits() {
        use diesel::connection::SimpleConnection;
        let db = crate::testing::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(WAIT_LOG).unwrap();
        let w = WAITS_WORKER;
        // step, node type, signal, delay (ms), final status, output, error,
        // wake (ms after the upstream finished), until (ms), at (ms),
        // upstream steps not completed.
        #[allow(clippy::type_complexity)]
        let steps: &[(
            &str,
            &str,
            Option<&str>,
            Option<i32>,
            &str,
            Option<&str>,
            Option<&str>,
            i32,
            Option<i32>,
            i32,
            i32,
        )] = &[
            // A timer fired right, a signal step completed right.
            (
                "1",
                "timer",
                None,
                Some(10),
                "completed",
                Some(
                    r#"{"due_at": "2030-01-01T00:00:00.010Z", "fired_at": "2030-01-01T00:00:00.011Z"}"#,
                ),
                None,
                10,
                None,
                12,
                0,
            ),
            (
                "2",
                "signal",
                Some("go"),
                None,
                "completed",
                Some(r#"{"n": 2}"#),
                None,
                0,
                None,
                3,
                0,
            ),
            // A timer due before its upstream finished + its delay.
            (
                "3",
                "timer",
                None,
                Some(10),
                "completed",
                Some(
                    r#"{"due_at": "2030-01-01T00:00:00.005Z", "fired_at": "2030-01-01T00:00:00.011Z"}"#,
                ),
                None,
                5,
                None,
                12,
                0,
            ),
            // A signal step whose output is not its signal's payload.
            (
                "4",
                "signal",
                Some("go"),
                None,
                "completed",
                Some(r#"{"n": 999}"#),
                None,
                0,
                None,
                3,
                0,
            ),
            // A signal step completed with no signal.
            (
                "5",
                "signal",
                Some("go"),
                None,
                "completed",
                Some("{}"),
                None,
                0,
                None,
                3,
                0,
            ),
            // A signal wait failed before its deadline.
            (
                "6",
                "signal",
                Some("go"),
                Some(100),
                "failed",
                None,
                Some("signal \"go\" not received by 2030-01-01T00:00:00.100+00:00"),
                100,
                Some(100),
                50,
                0,
            ),
            // A timer that failed.
            (
                "7",
                "timer",
                None,
                Some(10),
                "failed",
                None,
                Some("?"),
                10,
                None,
                12,
                0,
            ),
            // A timer that ran before its upstream was done.
            (
                "8",
                "timer",
                None,
                Some(0),
                "completed",
                Some(
                    r#"{"due_at": "2030-01-01T00:00:00Z", "fired_at": "2030-01-01T00:00:00.001Z"}"#,
                ),
                None,
                0,
                None,
                2,
                1,
            ),
        ];
        let id = |n: &str| format!("00000000-0000-0000-0000-{n:0>12}");
        for (n, kind, signal, delay, status, output, error, wake, until, at, open) in steps {
            let t = |ms: i32| {
                format!("timestamptz '2030-01-01 00:00:00+00' + interval '{ms} milliseconds'")
            };
            let q = |s: Option<&str>| {
                s.map_or("NULL".to_owned(), |s| {
                    format!("'{}'", s.replace('\'', "''"))
                })
            };
            let delay = delay.map_or("NULL".to_owned(), |d| {
                format!("interval '{d} milliseconds'")
            });
            let until = until.map_or("NULL".to_owned(), t);
            conn.batch_execute(&format!(
                "INSERT INTO torture_wait_log (step_id, execution_id, node_id, node_type, from_status,
                     to_status, worker, wait_delay, wait_until, wake_at, wait_signal, upstream_done,
                     upstream_open, at)
                 VALUES ('{s}', '{x}', 'n{n}', 'workflow_db.{kind}', 'pending', 'running', '{w}',
                         {delay}, {until}, {wake}, {signal}, {zero}, {open}, {zero});
                 INSERT INTO torture_wait_log (step_id, execution_id, node_id, node_type, from_status,
                     to_status, worker, output, error, wait_delay, wait_until, wake_at, wait_signal, at)
                 VALUES ('{s}', '{x}', 'n{n}', 'workflow_db.{kind}', 'running', '{status}', '{w}',
                         {output}, {error}, {delay}, {until}, {wake}, {signal}, {at});",
                s = id(n),
                x = id("99"),
                wake = t(*wake),
                signal = q(*signal),
                zero = t(0),
                output = q(*output),
                error = q(*error),
                at = t(*at),
            ))
            .unwrap();
        }
        // Signals: a right one (to step 2), one with another payload (to
        // step 4), one delivered twice (to 2 again, then to 4), one of
        // another execution (to 4).
        let signal = |g: &str, x: &str, payload: &str, old: Option<&str>, to: &str| {
            format!(
                "INSERT INTO torture_signal_log (what, signal_id, execution_id, name, payload)
                 VALUES ('sent', '{g}', '{x}', 'go', '{payload}');
                 INSERT INTO torture_signal_log (what, signal_id, execution_id, name, payload,
                     old_delivered_to, delivered_to)
                 VALUES ('delivered', '{g}', '{x}', 'go', '{payload}', {old}, '{to}');",
                g = id(g),
                x = id(x),
                old = old.map_or("NULL".to_owned(), |o| format!("'{}'", id(o))),
                to = id(to),
            )
        };
        conn.batch_execute(&signal("a1", "99", r#"{"n": 2}"#, None, "2"))
            .unwrap();
        conn.batch_execute(&signal("a2", "99", r#"{"n": 4}"#, None, "4"))
            .unwrap();
        conn.batch_execute(&format!(
            "INSERT INTO torture_signal_log (what, signal_id, execution_id, name, payload,
                 old_delivered_to, delivered_to)
             VALUES ('delivered', '{a2}', '{x}', 'go', '{{\"n\": 4}}', '{s4}', '{s2}')",
            a2 = id("a2"),
            x = id("99"),
            s4 = id("4"),
            s2 = id("2"),
        ))
        .unwrap();
        conn.batch_execute(&signal("a3", "98", r#"{"n": 4}"#, None, "4"))
            .unwrap();

        let found = check_logs(&mut conn).unwrap();
        let lines: Vec<String> = found.iter().map(|(n, d, _)| format!("{n}: {d}")).collect();
        let has = |check: &str, step: &str| {
            found
                .iter()
                .any(|(n, d, _)| *n == check && d.contains(&id(step)))
        };
        assert!(has("completed timers", "3"), "{lines:#?}");
        assert!(has("output of a signal step", "4"), "{lines:#?}");
        assert!(has("signals per completed signal step", "5"), "{lines:#?}");
        assert!(has("signals per completed signal step", "4"), "{lines:#?}");
        assert!(has("signals per completed signal step", "2"), "{lines:#?}");
        assert!(has("timed-out signal waits", "6"), "{lines:#?}");
        assert!(has("transitions", "7"), "{lines:#?}");
        assert!(has("ran before its upstream", "8"), "{lines:#?}");
        assert!(has("deliveries", "a2"), "{lines:#?}");
        assert!(has("deliveries", "a3"), "{lines:#?}");
        assert!(has("signal delivered more than once", "a2"), "{lines:#?}");
        assert!(
            !lines
                .iter()
                .any(|l| l.contains(&id("1")) || l.contains(&id("a1"))),
            "{lines:#?}"
        );
    }
}
