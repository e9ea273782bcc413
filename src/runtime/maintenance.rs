//! [`Maintenance`]: the periodic work an engine needs done once per
//! database, run by whichever service instance PostgreSQL elects.
//!
//! Start one in every instance of every service that uses the database; any
//! number of them can run. Exactly one at a time, the **leader**, does the
//! work; the others wait to take over:
//!
//! - **Reclaim expired leases**, every [`MaintenanceOptions::interval`]:
//!   `engine::reclaim_expired_with` in batches of
//!   [`MaintenanceOptions::reclaim_batch`] until a batch comes back short.
//!   A step whose worker died (a crash, `kill -9`, a lost network) goes back
//!   to `pending`, claimable at once, or fails, as
//!   [`MaintenanceOptions::reclaim_policy`] says (by default a crash does
//!   not spend one of the step's retries, and a step reclaimed more than
//!   [`engine::DEFAULT_MAX_RECLAIMS`] times fails: see [`ReclaimPolicy`]).
//! - **Prune old executions**, every [`MaintenanceOptions::prune_every`],
//!   only when a [`MaintenanceOptions::retention`] is set (none by
//!   default): `engine::prune_executions` deletes final executions
//!   (completed, failed, cancelled) that completed longer than the
//!   retention ago, with their steps and history. The cutoff is computed
//!   from the database's clock, not the service's.
//!
//! - **Fire due schedules**, every round, unless
//!   [`MaintenanceOptions::fire_schedules`] is off:
//!   `engine::fire_due_schedules_batch` at the database's clock, in batches
//!   of [`MaintenanceOptions::schedule_batch`] schedules until a batch
//!   comes back short. Each tick of a cron schedule starts one execution
//!   (see [`engine::schedule`]). A tick fires at the first round after it,
//!   so at most about one interval late.
//!
//! - **Run due timers and signal waits**, every round, unless
//!   [`MaintenanceOptions::fire_waits`] is off: `engine::fire_due_waits` in
//!   batches of [`MaintenanceOptions::wait_batch`] until a batch comes back
//!   short. A durable timer completes at the first round after its time (at
//!   most about one interval late); a signal sent before its step was
//!   reached is delivered at the first round after the step is; a signal
//!   wait fails at the first round after its timeout (see
//!   [`engine::wait`]).
//!
//! Later periodic work (partitions) belongs here too.
//!
//! # The interval against the lease length
//!
//! A step whose worker walked away is reclaimed at most **lease +
//! interval** after the worker's last heartbeat (plus the time a round
//! takes): the lease must run out, then the next round finds it. With the
//! default interval of 1 s and a 30 s lease, a lost step waits at most
//! about 31 s. When the leader died with the worker (one process, killed),
//! add the failover below: about one interval more. Shortening the interval below a second buys little against
//! leases of tens of seconds; each round of an idle engine is one indexed
//! query, so a short interval costs little either. Shorten the **lease**
//! (and heartbeat more often) to recover faster. The interval also bounds
//! failover: the instances that are not leader try to take over once per
//! interval.
//!
//! # Election: a session advisory lock on a dedicated connection
//!
//! The leader is the instance holding the session-level advisory lock
//! [`MAINTENANCE_LOCK`] (`pg_try_advisory_lock(1464222786, 3)`: namespace
//! `"WFDB"` in ASCII, id 3) in the database the pool connects to. Advisory
//! locks are per database: each database has its own leader.
//!
//! - **Why a lock and not a leader row with a TTL?** PostgreSQL itself
//!   releases a session lock when the session ends, however it ends:
//!   shutdown, crash, `kill -9`, a terminated backend, a dropped socket. No
//!   clock, no renewal, no expiry to tune.
//! - **Why a dedicated connection?** A session lock belongs to the
//!   connection that took it. On a pooled connection it would stay with
//!   whatever code gets that connection next, and would be released when
//!   the pool recycles it. So every instance keeps one connection of its
//!   own (tokio-postgres, like the [`Notifier`](super::Notifier)'s, named
//!   [`MAINTENANCE_APPLICATION_NAME`] in `pg_stat_activity`) that does
//!   nothing but hold or try the lock and answer a health check. The work
//!   itself runs through the [`AsyncPool`], one pooled connection at a
//!   time. The lock connection must reach
//!   PostgreSQL as a session of its own: not through a transaction-pooling
//!   PgBouncer.
//! - **Failover.** When the leader's session ends, PostgreSQL releases the
//!   lock at once and another instance takes it at its next round, within
//!   about one interval. An instance that lost leadership because its
//!   connection broke sits out three intervals before competing again, so
//!   that a healthy instance takes over first. A leader host that vanishes
//!   without closing its socket (power loss, a partition) is noticed by the
//!   server through TCP keepalives, which the lock connection sets to 10 s
//!   idle, then 3 probes 5 s apart: the lock is released about 25 s later.
//! - **Stepping down.** The leader checks its lock connection at every
//!   round (`SELECT 1`, answered within
//!   [`MaintenanceOptions::connect_timeout`]) and watches it between rounds:
//!   the moment the connection is lost, it stops the leader's work, reports
//!   it (a `tracing` event, the gauge, [`MaintenanceHandle::is_leader`])
//!   and competes again like any other instance.
//! - **Two leaders for a moment are harmless.** Leadership saves work; it
//!   does not protect the data. `reclaim_expired`, `prune_executions` and
//!   `fire_due_schedules` lock what they change and skip what others hold,
//!   so a leader that has not noticed its loss yet (a round in flight, a
//!   partitioned host) and the new one never reclaim or delete the same row
//!   twice, nor start a schedule's tick twice (the tick's idempotency key
//!   would refuse it even then).
//!
//! # Observability
//!
//! Through the `metrics` facade (the service installs the recorder):
//! counters `workflow_db_steps_reclaimed_total`,
//! `workflow_db_executions_pruned_total`,
//! `workflow_db_schedule_ticks_fired_total` (executions started by
//! schedules), `workflow_db_timers_fired_total`,
//! `workflow_db_signals_delivered_total` (by the maintenance loop; a
//! signal `engine::send_signal` delivers at once is not counted here),
//! `workflow_db_signal_timeouts_total`, `workflow_db_schedule_ticks_skipped_total` (missed ticks
//! dropped by a schedule's policy),
//! `workflow_db_schedules_paused_on_error_total` (schedules that could not
//! fire and were paused, with the reason in `schedules.last_error`),
//! `workflow_db_maintenance_errors_total` (failed attempts to connect,
//! lock, reclaim, prune or fire schedules, each logged and retried at a
//! later round), and the gauge
//! `workflow_db_maintenance_leader` (1 while this process leads, else 0; one
//! maintenance per process is assumed). `tracing`: a `maintenance` span
//! with the database name; leader acquired, lost and stepped down at
//! `info`, reclaimed steps, pruned executions and skipped schedule ticks at
//! `info`, fired ticks at `debug`, failures (and schedules paused because
//! they cannot fire) at `warn`. [`MaintenanceHandle::stats`] gives the same figures to a health
//! check.
//!
//! # Connection settings
//!
//! The lock connection reads the [`DatabaseUrl`] as the notifier does (see
//! [`notifier`](super::notifier): TLS is not supported yet, neither are
//! connection services). Give [`Maintenance::new`] the URL the pool was
//! built from: the election is per database, so the pool and the lock must
//! be on the same one (a different database *name* is detected and
//! refused; a different server with a database of the same name is not).
//!
//! ```no_run
//! use std::time::Duration;
//! use workflow_db::Config;
//! use workflow_db::runtime::{AsyncPool, Maintenance, MaintenanceOptions};
//!
//! # async fn demo() -> workflow_db::Result<()> {
//! let config = Config::from_env()?;
//! let pool = AsyncPool::from_config(&config).await?;
//! let mut options = MaintenanceOptions::default();
//! options.retention = Some(Duration::from_secs(30 * 24 * 3600));
//! let maintenance = Maintenance::new(pool, &config.database_url, options)?.spawn();
//! // ... serve ...
//! let stats = maintenance.shutdown().await?; // releases the lock at once
//! println!("reclaimed {} steps", stats.reclaimed);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Text, Timestamptz};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tracing::Instrument;

use super::notifier::{chain, dedicated_config};
use super::pool::{AsyncPool, TaskFailed};
use crate::config::{DEFAULT_CONNECT_TIMEOUT, DatabaseUrl};
use crate::engine::{self, ReclaimPolicy};
use crate::enums::StepStatus;
use crate::error::{Error, Result};

/// The `application_name` of the lock connection, unless the URL sets one.
pub const MAINTENANCE_APPLICATION_NAME: &str = "workflow-db maintenance";

/// The advisory lock whose holder is the maintenance leader of a database:
/// the two-key form `(namespace, id)`, namespace `"WFDB"` in ASCII
/// (1464222786, shared with the migration lock, id 1), id 3. In
/// `pg_locks` it shows as `locktype = 'advisory'`, `classid = 1464222786`,
/// `objid = 3`, `objsubid = 2`; who leads a database:
///
/// ```sql
/// SELECT a.pid, a.application_name, a.client_addr, a.backend_start
/// FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
/// WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 1464222786
///   AND l.objid = 3 AND l.objsubid = 2
///   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
/// ```
pub const MAINTENANCE_LOCK: (i32, i32) = (crate::migrate::LOCK_NAMESPACE, 3);

/// Default [`MaintenanceOptions::interval`].
pub const DEFAULT_MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// How long an instance that lost leadership through a broken connection
/// waits before competing again, in intervals.
const SIT_OUT_INTERVALS: u32 = 3;

/// Server-side TCP keepalives of the lock connection: a leader host that
/// vanished is noticed, and its lock released, after about
/// `idle + interval * count` = 25 s.
const KEEPALIVES: &str =
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3";

/// Settings of a [`Maintenance`]; [`MaintenanceOptions::default`], then
/// change fields. [`Maintenance::new`] checks them
/// ([`MaintenanceOptions::validate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaintenanceOptions {
    /// Time between two rounds (default 1 s; 10 ms to 1 hour): how often
    /// the leader reclaims expired leases, and how often the other
    /// instances try to become leader. A lost lease is reclaimed at most
    /// lease + interval after the last heartbeat (see the
    /// [module documentation](self)).
    pub interval: Duration,
    /// Steps reclaimed per statement (default 500; 1 to 10,000). A round
    /// repeats the statement until it reclaims fewer.
    pub reclaim_batch: i64,
    /// What a reclaim does with a step whose lease expired (default
    /// [`ReclaimPolicy::default`]: back to pending without spending a
    /// retry, failed after [`engine::DEFAULT_MAX_RECLAIMS`] reclaims;
    /// [`ReclaimPolicy::CountAsFailure`] spends a retry instead).
    pub reclaim_policy: ReclaimPolicy,
    /// Keep final executions this long after they completed, then delete
    /// them with their steps and history (default `None`: never prune).
    /// At least 1 second, at most 1,000 years.
    pub retention: Option<Duration>,
    /// Time between two prunes, when a retention is set (default 60 s;
    /// more than zero). Pruning happens in a leader's round, so its
    /// granularity is the interval; the first prune is at the first round
    /// of each leadership.
    pub prune_every: Duration,
    /// Executions deleted per transaction when pruning (default 100; 1 to
    /// 10,000).
    pub prune_batch: i64,
    /// Whether the leader fires due cron schedules every round (default
    /// true; see [`engine::schedule`]). Turn it off in services that must
    /// not start executions; another instance's maintenance fires them.
    pub fire_schedules: bool,
    /// Schedules fired per transaction (default 100; 1 to 10,000). A round
    /// repeats until a batch comes back short.
    pub schedule_batch: i64,
    /// Whether the leader runs due timers and signal waits every round
    /// (default true; see [`engine::wait`]). Without a maintenance loop
    /// that does, timers never fire: call `engine::fire_due_waits` yourself.
    pub fire_waits: bool,
    /// Wait steps run per transaction (default
    /// [`engine::DEFAULT_WAIT_BATCH`]; 1 to 10,000). A round repeats until
    /// a batch comes back short.
    pub wait_batch: i64,
    /// How often the leader publishes the queue depth, the gauge
    /// `workflow_db_ready_steps{queue}` (steps claimable now, from
    /// [`engine::ready_steps_by_queue`]; default 15 s; `None`: never).
    pub queue_depth_every: Option<Duration>,
    /// `application_name` of the lock connection unless the URL sets one
    /// (default [`MAINTENANCE_APPLICATION_NAME`]; not empty).
    pub application_name: String,
    /// Limit for opening the lock connection and for every answer on it
    /// (the lock attempt, the health check), unless the URL sets
    /// `connect_timeout` (default 10 s; more than zero).
    pub connect_timeout: Duration,
}

impl Default for MaintenanceOptions {
    fn default() -> Self {
        MaintenanceOptions {
            interval: DEFAULT_MAINTENANCE_INTERVAL,
            reclaim_batch: 500,
            reclaim_policy: ReclaimPolicy::default(),
            retention: None,
            prune_every: Duration::from_secs(60),
            prune_batch: 100,
            fire_schedules: true,
            schedule_batch: engine::DEFAULT_SCHEDULE_BATCH,
            fire_waits: true,
            wait_batch: engine::DEFAULT_WAIT_BATCH,
            queue_depth_every: Some(Duration::from_secs(15)),
            application_name: MAINTENANCE_APPLICATION_NAME.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Bounds of the options, checked by [`MaintenanceOptions::validate`].
const MIN_INTERVAL: Duration = Duration::from_millis(10);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
const MAX_BATCH: i64 = 10_000;
const MIN_RETENTION: Duration = Duration::from_secs(1);
const MAX_RETENTION: Duration = Duration::from_secs(1000 * 366 * 24 * 3600);

impl MaintenanceOptions {
    /// Checks every setting; the first one out of range is an
    /// [`Error::InvalidOption`] naming it, the value given and the range.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |option: &'static str, reason: String| Err(Error::InvalidOption { option, reason });
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&self.interval) {
            return invalid(
                "MaintenanceOptions::interval",
                format!(
                    "{:?} is out of range: between {MIN_INTERVAL:?} and {MAX_INTERVAL:?} (a lost lease is reclaimed at most lease + interval after its last heartbeat)",
                    self.interval
                ),
            );
        }
        for (option, batch) in [
            ("MaintenanceOptions::reclaim_batch", self.reclaim_batch),
            ("MaintenanceOptions::prune_batch", self.prune_batch),
            ("MaintenanceOptions::schedule_batch", self.schedule_batch),
            ("MaintenanceOptions::wait_batch", self.wait_batch),
        ] {
            if !(1..=MAX_BATCH).contains(&batch) {
                return invalid(
                    option,
                    format!("{batch} is out of range: between 1 and {MAX_BATCH}"),
                );
            }
        }
        if let Some(retention) = self
            .retention
            .filter(|r| !(MIN_RETENTION..=MAX_RETENTION).contains(r))
        {
            return invalid(
                "MaintenanceOptions::retention",
                format!(
                    "{retention:?} is out of range: at least {MIN_RETENTION:?} and at most 1,000 years (None keeps executions forever)"
                ),
            );
        }
        if self.prune_every.is_zero() {
            return invalid(
                "MaintenanceOptions::prune_every",
                "0s: it must be more than zero".to_owned(),
            );
        }
        if self.connect_timeout.is_zero() {
            return invalid(
                "MaintenanceOptions::connect_timeout",
                "0s: it must be more than zero".to_owned(),
            );
        }
        if self.application_name.trim().is_empty() {
            return invalid(
                "MaintenanceOptions::application_name",
                format!(
                    "{:?}: it must not be empty (it names the lock connection in pg_stat_activity)",
                    self.application_name
                ),
            );
        }
        if self.queue_depth_every.is_some_and(|d| d.is_zero()) {
            return invalid(
                "MaintenanceOptions::queue_depth_every",
                "zero; use None to turn the gauge off".into(),
            );
        }
        Ok(())
    }
}

/// What a [`Maintenance`] has done since it started
/// ([`MaintenanceHandle::stats`], and what [`Maintenance::run`] returns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaintenanceStats {
    /// Whether this instance leads now.
    pub leader: bool,
    /// Times this instance became leader.
    pub terms: u64,
    /// Rounds run, as leader or not.
    pub rounds: u64,
    /// Rounds run as leader (whose work was attempted).
    pub leader_rounds: u64,
    /// Steps reclaimed (back to pending, or failed when no retry was left).
    pub reclaimed: u64,
    /// Executions pruned (not counting sub-executions deleted with them).
    pub pruned: u64,
    /// Delayed executions started ([`engine::start_due_executions`]).
    pub started: u64,
    /// Executions started by schedules (one per tick fired).
    pub schedule_ticks_fired: u64,
    /// Timers completed.
    pub timers_fired: u64,
    /// Signals delivered to steps that became ready after the signal came.
    pub signals_delivered: u64,
    /// Signal waits failed at their timeout.
    pub signals_timed_out: u64,
    /// Failed attempts at anything (connecting, the lock, a reclaim, a
    /// prune, firing schedules), each logged at `warn` or `debug`.
    pub errors: u64,
}

/// The state a running maintenance shares with its handle.
#[derive(Debug, Default)]
struct Shared {
    leader: AtomicBool,
    terms: AtomicU64,
    rounds: AtomicU64,
    leader_rounds: AtomicU64,
    reclaimed: AtomicU64,
    pruned: AtomicU64,
    started: AtomicU64,
    schedule_ticks_fired: AtomicU64,
    timers_fired: AtomicU64,
    signals_delivered: AtomicU64,
    signals_timed_out: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn stats(&self) -> MaintenanceStats {
        MaintenanceStats {
            leader: self.leader.load(Ordering::Acquire),
            terms: self.terms.load(Ordering::Relaxed),
            rounds: self.rounds.load(Ordering::Relaxed),
            leader_rounds: self.leader_rounds.load(Ordering::Relaxed),
            reclaimed: self.reclaimed.load(Ordering::Relaxed),
            pruned: self.pruned.load(Ordering::Relaxed),
            started: self.started.load(Ordering::Relaxed),
            schedule_ticks_fired: self.schedule_ticks_fired.load(Ordering::Relaxed),
            timers_fired: self.timers_fired.load(Ordering::Relaxed),
            signals_delivered: self.signals_delivered.load(Ordering::Relaxed),
            signals_timed_out: self.signals_timed_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("workflow_db_maintenance_errors_total").increment(1);
    }
}

/// The maintenance loop of one service instance, ready to run (see the
/// [module documentation](self)). Build it with [`Maintenance::new`], then
/// either [`spawn`](Maintenance::spawn) it as a task and keep the
/// [`MaintenanceHandle`], or [`run`](Maintenance::run) it in a task of
/// your own until a shutdown future resolves.
pub struct Maintenance {
    pool: AsyncPool,
    config: tokio_postgres::Config,
    database: String,
    target: String,
    options: MaintenanceOptions,
    /// `options.connect_timeout`, or the URL's `connect_timeout`.
    timeout: Duration,
    retention: Option<TimeDelta>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maintenance")
            .field("target", &self.target)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Maintenance {
    /// Checks `options` ([`MaintenanceOptions::validate`]) and the lock
    /// connection's settings from `url` (the URL `pool` was built from),
    /// without connecting. Fails with [`Error::InvalidOption`] or
    /// [`Error::InvalidDatabaseUrl`] (never showing the password).
    pub fn new(pool: AsyncPool, url: &DatabaseUrl, options: MaintenanceOptions) -> Result<Self> {
        options.validate()?;
        let config = dedicated_config(url, &options.application_name, options.connect_timeout)?;
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(options.connect_timeout);
        let retention = match options.retention {
            Some(r) => Some(TimeDelta::from_std(r).map_err(|_| Error::InvalidOption {
                option: "MaintenanceOptions::retention",
                reason: format!("{r:?} is too long"),
            })?),
            None => None,
        };
        Ok(Maintenance {
            pool,
            config,
            database: url.database(),
            target: url.target(),
            options,
            timeout,
            retention,
            shared: Arc::default(),
        })
    }

    /// Runs the loop as a tokio task (call it inside a runtime). Stop it
    /// with [`MaintenanceHandle::shutdown`]; dropping the handle stops it
    /// too, in the background.
    pub fn spawn(self) -> MaintenanceHandle {
        let shared = Arc::clone(&self.shared);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            // A dropped sender is a shutdown too.
            let _ = stopped.await;
        }));
        MaintenanceHandle {
            shared,
            stop: Some(stop),
            task,
        }
    }

    /// Runs the loop in the caller's task until `shutdown` resolves, then
    /// releases the lock (`pg_advisory_unlock_all`, and closes the connection)
    /// and returns what it did.
    ///
    /// Connection failures are logged and retried at the next round, never
    /// returned. The one error is a configuration found wrong once
    /// connected: the pool and the URL name different databases
    /// ([`Error::InvalidOption`]); the loop stops at once, without leading.
    ///
    /// Dropping the future instead of resolving `shutdown` also ends the
    /// session, so PostgreSQL releases the lock; a database call in flight
    /// then runs to its end on its blocking thread (see [`AsyncPool::run`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<MaintenanceStats> {
        let span = tracing::info_span!("maintenance", database = %self.database);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(self, shutdown: impl Future<Output = ()>) -> Result<MaintenanceStats> {
        tokio::pin!(shutdown);
        let mut state = State {
            session: None,
            leader: Leader {
                shared: Arc::clone(&self.shared),
            },
            pool_checked: false,
            connect_failing: false,
            sit_out_until: None,
            last_prune: None,
            last_queue_depth: None,
            published_queues: Vec::new(),
        };
        metrics::gauge!("workflow_db_maintenance_leader").set(0.0);
        let mut ticks = tokio::time::interval(self.options.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tracing::debug!(target = %self.target, "maintenance started");
        let result = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                _ = ticks.tick() => {}
                reason = lost(&mut state.session) => {
                    state.session = None;
                    self.step_down(&mut state, &reason);
                    continue;
                }
            }
            let round = tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                r = self.round(&mut state) => r,
            };
            self.shared.rounds.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = round {
                break Err(e);
            }
        };
        self.release(&mut state).await;
        result.map(|()| self.shared.stats())
    }

    /// One round: make sure the lock connection lives, compete for the
    /// lock when not leader, do the leader's work when leader.
    async fn round(&self, state: &mut State) -> Result<()> {
        if state.leader.is() {
            let alive = match &state.session {
                Some(session) => session.check(self.timeout).await,
                None => Err("no lock connection".to_owned()),
            };
            if let Err(reason) = alive {
                state.session = None;
                self.step_down(state, &reason);
                return Ok(());
            }
        } else {
            if state
                .sit_out_until
                .is_some_and(|until| Instant::now() < until)
            {
                return Ok(());
            }
            if !self.compete(state).await? {
                return Ok(());
            }
        }
        self.shared.leader_rounds.fetch_add(1, Ordering::Relaxed);
        self.reclaim(state).await;
        self.flow_control(state).await;
        self.fire_schedules(state).await;
        self.fire_waits(state).await;
        self.prune(state).await;
        self.queue_depth(state).await;
        Ok(())
    }

    /// Tries to become leader; whether this instance now is.
    async fn compete(&self, state: &mut State) -> Result<bool> {
        if state.session.is_none() {
            match Session::open(&self.config, self.timeout).await {
                Ok(session) => {
                    if state.connect_failing {
                        tracing::info!(target = %self.target, "maintenance lock connection open again");
                    }
                    state.connect_failing = false;
                    state.session = Some(session);
                }
                Err(reason) => {
                    self.shared.error();
                    // Once per outage at warn: followers retry every interval.
                    if state.connect_failing {
                        tracing::debug!(target = %self.target, %reason, "maintenance lock connection still failing");
                    } else {
                        tracing::warn!(target = %self.target, %reason, "maintenance lock connection failed; retrying every interval");
                    }
                    state.connect_failing = true;
                    return Ok(false);
                }
            }
        }
        if !state.pool_checked {
            self.check_pool(state).await?;
            if !state.pool_checked {
                return Ok(false);
            }
        }
        let Some(session) = &state.session else {
            return Ok(false);
        };
        match session.try_lock(self.timeout).await {
            Ok(false) => Ok(false),
            Ok(true) => {
                state.leader.set(true);
                state.last_prune = None;
                self.shared.terms.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    backend_pid = session.pid,
                    application_name = %self.application_name(),
                    "maintenance leader acquired"
                );
                Ok(true)
            }
            Err(reason) => {
                self.shared.error();
                tracing::warn!(%reason, "maintenance lock attempt failed; reconnecting");
                state.session = None;
                Ok(false)
            }
        }
    }

    /// Compares the database the pool is connected to with the lock
    /// connection's, once: a mismatch would elect the leader of one
    /// database to maintain another.
    async fn check_pool(&self, state: &mut State) -> Result<()> {
        let Some(session) = &state.session else {
            return Ok(());
        };
        let pooled = self
            .pool
            .run(|c| {
                Ok(diesel::sql_query("SELECT current_database()::text AS name")
                    .get_result::<Name>(c)?
                    .name)
            })
            .await;
        match pooled {
            Ok(name) if name == session.database => {
                state.pool_checked = true;
                Ok(())
            }
            Ok(name) => {
                tracing::error!(
                    pool_database = %name,
                    lock_database = %session.database,
                    "maintenance: the pool and the URL name different databases; stopping"
                );
                Err(Error::InvalidOption {
                    option: "Maintenance::new",
                    reason: format!(
                        "the pool is connected to database {name:?} but the URL names {:?}: give the URL the pool was built from",
                        session.database
                    ),
                })
            }
            Err(error) => {
                self.shared.error();
                tracing::warn!(error = %chain(&error), "maintenance: the pool has no connection; retrying next round");
                Ok(())
            }
        }
    }

    /// Reclaims expired leases, batch after batch, until a batch is short.
    async fn reclaim(&self, state: &State) {
        let (batch, policy) = (self.options.reclaim_batch, self.options.reclaim_policy);
        let (mut requeued, mut failed) = (0u64, 0u64);
        loop {
            let steps = self
                .pool
                .run(move |c| engine::reclaim_expired_with(c, batch, policy).map_err(Into::into))
                .await;
            let steps = match steps {
                Ok(steps) => steps,
                Err(error) => {
                    self.shared.error();
                    tracing::warn!(error = %chain(&error), "maintenance: reclaiming expired leases failed; retrying next round");
                    break;
                }
            };
            let n = steps.len() as u64;
            let n_failed = steps
                .iter()
                .filter(|s| s.status == StepStatus::Failed)
                .count() as u64;
            failed += n_failed;
            requeued += n - n_failed;
            self.shared.reclaimed.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("workflow_db_steps_reclaimed_total").increment(n);
            // A short batch: nothing more has expired. A lost lock
            // connection: the next wait notices and steps down.
            if (steps.len() as i64) < batch || state.session.as_ref().is_none_or(Session::is_closed)
            {
                break;
            }
        }
        if requeued + failed > 0 {
            tracing::info!(
                requeued,
                failed,
                "maintenance reclaimed steps whose lease expired"
            );
        }
    }

    /// Starts the delayed executions that are due, batch after batch until
    /// a batch is short, and admits throttled steps into free slots of
    /// their concurrency keys (the trigger's SKIP LOCKED may leave one for
    /// this round).
    async fn flow_control(&self, state: &State) {
        let batch = self.options.reclaim_batch;
        loop {
            let started = self
                .pool
                .run(move |c| engine::start_due_executions(c, batch).map_err(Into::into))
                .await;
            let started = match started {
                Ok(started) => started,
                Err(error) => {
                    self.shared.error();
                    tracing::warn!(error = %chain(&error), "maintenance: starting delayed executions failed; retrying next round");
                    break;
                }
            };
            let n = started.len() as u64;
            self.shared.started.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("workflow_db_delayed_starts_total").increment(n);
            if n > 0 {
                tracing::info!(started = n, "maintenance started delayed executions");
            }
            if (started.len() as i64) < batch
                || state.session.as_ref().is_none_or(Session::is_closed)
            {
                break;
            }
        }
        if let Err(error) = self
            .pool
            .run(|c| engine::rebalance_concurrency_keys(c).map_err(Into::into))
            .await
        {
            self.shared.error();
            tracing::warn!(error = %chain(&error), "maintenance: rebalancing concurrency keys failed; retrying next round");
        }
    }

    /// Fires due schedules at the database's clock, batch after batch,
    /// until a batch is short.
    async fn fire_schedules(&self, state: &State) {
        if !self.options.fire_schedules {
            return;
        }
        let batch = self.options.schedule_batch;
        loop {
            let report = self
                .pool
                .run(move |c| {
                    // The database's clock, as every instance's.
                    let now = diesel::sql_query("SELECT statement_timestamp() AS now")
                        .get_result::<Now>(c)?
                        .now;
                    engine::fire_due_schedules_batch(c, now, batch)
                })
                .await;
            let report = match report {
                Ok(report) => report,
                Err(error) => {
                    self.shared.error();
                    tracing::warn!(error = %chain(&error), "maintenance: firing schedules failed; retrying next round");
                    break;
                }
            };
            let fired = report.fired.len() as u64;
            self.shared
                .schedule_ticks_fired
                .fetch_add(fired, Ordering::Relaxed);
            metrics::counter!("workflow_db_schedule_ticks_fired_total").increment(fired);
            metrics::counter!("workflow_db_schedule_ticks_skipped_total").increment(report.skipped);
            metrics::counter!("workflow_db_schedules_paused_on_error_total")
                .increment(report.paused.len() as u64);
            if fired > 0 {
                tracing::debug!(fired, "maintenance fired schedule ticks");
            }
            if (report.schedules as i64) < batch
                || state.session.as_ref().is_none_or(Session::is_closed)
            {
                break;
            }
        }
    }

    /// Runs the due timers and signal waits, batch after batch, until a
    /// batch is short.
    async fn fire_waits(&self, state: &State) {
        if !self.options.fire_waits {
            return;
        }
        let batch = self.options.wait_batch;
        loop {
            let report = self
                .pool
                .run(move |c| engine::fire_due_waits(c, batch))
                .await;
            let report = match report {
                Ok(report) => report,
                Err(error) => {
                    self.shared.error();
                    tracing::warn!(error = %chain(&error), "maintenance: running due timers and signal waits failed; retrying next round");
                    break;
                }
            };
            let shared = &self.shared;
            shared
                .timers_fired
                .fetch_add(report.timers_fired, Ordering::Relaxed);
            shared
                .signals_delivered
                .fetch_add(report.signals_delivered, Ordering::Relaxed);
            shared
                .signals_timed_out
                .fetch_add(report.signals_timed_out, Ordering::Relaxed);
            metrics::counter!("workflow_db_timers_fired_total").increment(report.timers_fired);
            metrics::counter!("workflow_db_signals_delivered_total")
                .increment(report.signals_delivered);
            metrics::counter!("workflow_db_signal_timeouts_total")
                .increment(report.signals_timed_out);
            if report.signals_timed_out > 0 {
                tracing::info!(
                    timed_out = report.signals_timed_out,
                    "maintenance failed signal waits at their timeout"
                );
            }
            if report.due > 0 {
                tracing::debug!(
                    timers = report.timers_fired,
                    signals = report.signals_delivered,
                    "maintenance ran due waits"
                );
            }
            if (report.due as i64) < batch || state.session.as_ref().is_none_or(Session::is_closed)
            {
                break;
            }
        }
    }

    /// Prunes final executions older than the retention, when one is set
    /// and `prune_every` has passed since the last prune.
    async fn prune(&self, state: &mut State) {
        let Some(retention) = self.retention else {
            return;
        };
        if state
            .last_prune
            .is_some_and(|at| at.elapsed() < self.options.prune_every)
        {
            return;
        }
        state.last_prune = Some(Instant::now());
        let batch = self.options.prune_batch;
        let pruned = self
            .pool
            .run(move |c| {
                // The database's clock, as the executions' completed_at.
                let now = diesel::sql_query("SELECT statement_timestamp() AS now")
                    .get_result::<Now>(c)?
                    .now;
                let Some(cutoff) = now.checked_sub_signed(retention) else {
                    return Ok(0);
                };
                Ok(engine::prune_executions(c, cutoff, batch)?)
            })
            .await;
        match pruned {
            Ok(n) => {
                self.shared.pruned.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("workflow_db_executions_pruned_total").increment(n);
                if n > 0 {
                    tracing::info!(
                        pruned = n,
                        retention = ?self.options.retention,
                        "maintenance pruned final executions past their retention"
                    );
                }
            }
            Err(error) => {
                self.shared.error();
                tracing::warn!(error = %chain(&error), "maintenance: pruning failed; retrying at the next prune");
            }
        }
    }

    /// Publishes the queue depth by node type, when due.
    async fn queue_depth(&self, state: &mut State) {
        let Some(every) = self.options.queue_depth_every else {
            return;
        };
        if state
            .last_queue_depth
            .is_some_and(|at| at.elapsed() < every)
        {
            return;
        }
        state.last_queue_depth = Some(Instant::now());
        match self
            .pool
            .run(|c| Ok(engine::ready_steps_by_queue(c)?))
            .await
        {
            Ok(depths) => {
                let mut queues = Vec::with_capacity(depths.len());
                for (queue, steps) in depths {
                    metrics::gauge!("workflow_db_ready_steps", "queue" => queue.clone())
                        .set(steps as f64);
                    queues.push(queue);
                }
                for gone in state
                    .published_queues
                    .iter()
                    .filter(|q| !queues.contains(q))
                {
                    metrics::gauge!("workflow_db_ready_steps", "queue" => gone.clone()).set(0.0);
                }
                state.published_queues = queues;
            }
            Err(error) => {
                self.shared.error();
                tracing::warn!(error = %chain(&error), "maintenance: reading the queue depth failed");
            }
        }
    }

    /// Leaves leadership after the lock connection was lost; competes
    /// again after a few intervals.
    fn step_down(&self, state: &mut State, reason: &str) {
        if state.leader.is() {
            state.leader.set(false);
            state.sit_out_until = Some(Instant::now() + self.options.interval * SIT_OUT_INTERVALS);
            tracing::info!(%reason, "maintenance leadership lost: the lock connection is gone; stepped down");
        } else {
            tracing::debug!(%reason, "maintenance lock connection lost");
        }
    }

    /// At shutdown: unlocks (when leader) and closes the lock connection.
    async fn release(&self, state: &mut State) {
        if let Some(session) = state.session.take() {
            // Unlock whether or not this instance knows it leads: a round
            // abandoned by the shutdown while its `pg_try_advisory_lock`
            // was in flight may hold the lock without having seen the
            // answer, and a closed connection releases it only when its
            // backend has exited, after `shutdown` returned. The
            // connection is this loop's own: it holds no other lock.
            let unlock = "SELECT pg_advisory_unlock_all()";
            if let Err(reason) = session.query(unlock, self.timeout).await {
                tracing::debug!(%reason, "maintenance unlock failed; closing the connection releases the lock");
            }
            session.close(self.timeout).await;
        }
        if state.leader.is() {
            state.leader.set(false);
            tracing::info!("maintenance leader stepped down: shutting down");
        }
        tracing::debug!("maintenance stopped");
    }

    fn application_name(&self) -> &str {
        self.config
            .get_application_name()
            .unwrap_or(&self.options.application_name)
    }
}

/// A running [`Maintenance`] ([`Maintenance::spawn`]). Dropping it stops
/// the maintenance in the background (the lock is released as the task
/// ends); [`MaintenanceHandle::shutdown`] waits for that.
#[derive(Debug)]
pub struct MaintenanceHandle {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<MaintenanceStats>>,
}

impl MaintenanceHandle {
    /// Whether this instance is the leader now (holds the lock and does the
    /// work).
    pub fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::Acquire)
    }

    /// What it has done so far.
    pub fn stats(&self) -> MaintenanceStats {
        self.shared.stats()
    }

    /// Whether the task has ended: only after a shutdown, or when
    /// [`Maintenance::run`] returned an error (which
    /// [`MaintenanceHandle::shutdown`] then returns).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the loop (a round in progress is abandoned), releases the
    /// lock (`pg_advisory_unlock_all`: also one an abandoned round's
    /// attempt took) and closes the connection, then returns the totals,
    /// or the error the loop stopped with. Another instance can take over
    /// as soon as this returns.
    pub async fn shutdown(mut self) -> Result<MaintenanceStats> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(task_failed(e)),
        }
    }
}

fn task_failed(e: tokio::task::JoinError) -> Error {
    let failed = match e.try_into_panic() {
        Ok(payload) => TaskFailed::Panicked {
            message: payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "<non-string panic payload>".to_owned()),
        },
        Err(_) => TaskFailed::Cancelled,
    };
    tracing::error!(error = %failed, "maintenance task failed");
    failed.into()
}

/// The loop's state between rounds.
struct State {
    session: Option<Session>,
    leader: Leader,
    /// Whether the pool was found on the lock connection's database.
    pool_checked: bool,
    /// Whether the last connection attempt failed (to log an outage once).
    connect_failing: bool,
    /// No lock attempt before then (after losing leadership).
    sit_out_until: Option<Instant>,
    last_prune: Option<Instant>,
    last_queue_depth: Option<Instant>,
    /// Node types published last time (a type whose queue emptied is set to 0).
    published_queues: Vec<String>,
}

/// Leadership as the handle and the gauge see it; dropping it (the loop
/// ended, or its future was dropped) reports "not leader".
struct Leader {
    shared: Arc<Shared>,
}

impl Leader {
    fn is(&self) -> bool {
        self.shared.leader.load(Ordering::Acquire)
    }

    fn set(&self, leader: bool) {
        self.shared.leader.store(leader, Ordering::Release);
        metrics::gauge!("workflow_db_maintenance_leader").set(if leader { 1.0 } else { 0.0 });
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.is() {
            self.set(false);
        }
    }
}

/// The lock connection: a tokio-postgres client whose connection is
/// driven by its own task.
struct Session {
    client: Client,
    connection: JoinHandle<std::result::Result<(), tokio_postgres::Error>>,
    /// The backend's pid, for the logs.
    pid: i32,
    /// `current_database()`.
    database: String,
}

impl Session {
    /// Connects, sets the keepalives and reads who it is, within `timeout`.
    async fn open(
        config: &tokio_postgres::Config,
        timeout: Duration,
    ) -> std::result::Result<Session, String> {
        let attempt = async {
            let (client, connection) = config.connect(NoTls).await.map_err(|e| chain(&e))?;
            let connection = tokio::spawn(connection);
            if let Err(e) = client.batch_execute(KEEPALIVES).await {
                // Not fatal: the server then relies on the OS's keepalives.
                tracing::debug!(error = %chain(&e), "maintenance: cannot set tcp keepalives");
            }
            let mut session = Session {
                client,
                connection,
                pid: 0,
                database: String::new(),
            };
            let row = first_row(
                &session
                    .client
                    .simple_query("SELECT pg_backend_pid(), current_database()")
                    .await
                    .map_err(|e| chain(&e))?,
            )
            .ok_or("no answer to SELECT pg_backend_pid()")?;
            session.pid = row.0.parse().unwrap_or_default();
            session.database = row.1;
            Ok(session)
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no connection within {timeout:?}")))
    }

    /// `pg_try_advisory_lock` on [`MAINTENANCE_LOCK`].
    async fn try_lock(&self, timeout: Duration) -> std::result::Result<bool, String> {
        let sql = format!(
            "SELECT pg_try_advisory_lock({}, {}), ''",
            MAINTENANCE_LOCK.0, MAINTENANCE_LOCK.1
        );
        let rows = self.query(&sql, timeout).await?;
        first_row(&rows)
            .map(|(got, _)| got == "t")
            .ok_or_else(|| "no answer to pg_try_advisory_lock".to_owned())
    }

    /// The health check: the session, and so the lock, is still there.
    async fn check(&self, timeout: Duration) -> std::result::Result<(), String> {
        if self.is_closed() {
            return Err("the lock connection is closed".to_owned());
        }
        self.query("SELECT 1", timeout).await.map(drop)
    }

    async fn query(
        &self,
        sql: &str,
        timeout: Duration,
    ) -> std::result::Result<Vec<SimpleQueryMessage>, String> {
        match tokio::time::timeout(timeout, self.client.simple_query(sql)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(chain(&e)),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed() || self.connection.is_finished()
    }

    /// Closes the connection (a Terminate message) and waits for it to end.
    async fn close(self, timeout: Duration) {
        let Session {
            client, connection, ..
        } = self;
        drop(client);
        if tokio::time::timeout(timeout, connection).await.is_err() {
            tracing::debug!("maintenance lock connection did not close in time");
        }
    }
}

/// Resolves when the lock connection (if any) ends, with why; never when
/// there is none. The caller must drop the session after it resolved.
async fn lost(session: &mut Option<Session>) -> String {
    match session {
        Some(session) => match (&mut session.connection).await {
            Ok(Ok(())) => "the server closed the connection".to_owned(),
            Ok(Err(e)) => chain(&e),
            Err(e) => format!("the connection task failed: {e}"),
        },
        None => std::future::pending().await,
    }
}

/// The first two columns of the first row, as text.
fn first_row(messages: &[SimpleQueryMessage]) -> Option<(String, String)> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some((
            row.get(0).unwrap_or_default().to_owned(),
            row.get(1).unwrap_or_default().to_owned(),
        )),
        _ => None,
    })
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Now {
    #[diesel(sql_type = Timestamptz)]
    now: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_the_lock_key_is_documented() {
        MaintenanceOptions::default().validate().unwrap();
        // The number the documentation gives for the namespace.
        assert_eq!(MAINTENANCE_LOCK, (1_464_222_786, 3));
        assert_eq!(
            MAINTENANCE_LOCK.0.to_be_bytes(),
            *b"WFDB",
            "namespace WFDB in ASCII"
        );
    }

    #[test]
    fn out_of_range_options_name_the_option() {
        type Spoil = fn(&mut MaintenanceOptions);
        let cases: [(&str, Spoil); 9] = [
            ("interval", |o| o.interval = Duration::ZERO),
            ("interval", |o| o.interval = Duration::from_secs(7200)),
            ("reclaim_batch", |o| o.reclaim_batch = 0),
            ("prune_batch", |o| o.prune_batch = -1),
            ("schedule_batch", |o| o.schedule_batch = 0),
            ("retention", |o| o.retention = Some(Duration::ZERO)),
            ("prune_every", |o| o.prune_every = Duration::ZERO),
            ("connect_timeout", |o| o.connect_timeout = Duration::ZERO),
            ("application_name", |o| o.application_name = " ".into()),
        ];
        for (field, spoil) in cases {
            let mut o = MaintenanceOptions::default();
            spoil(&mut o);
            match o.validate() {
                Err(Error::InvalidOption { option, reason }) => {
                    assert_eq!(option, format!("MaintenanceOptions::{field}"), "{reason}");
                }
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
