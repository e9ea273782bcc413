//! [`Worker`]: runs the steps of the node types it has handlers for, with
//! leases kept alive, results reported in batches, retries with jitter, and a
//! graceful shutdown that hands unfinished work back.
//!
//! ```no_run
//! use std::time::Duration;
//! use serde_json::json;
//! use workflow_db::runtime::{AsyncPool, Worker, WorkerOptions};
//! use workflow_db::Config;
//!
//! # async fn demo() -> workflow_db::Result<()> {
//! let config = Config::from_env()?;
//! let pool = AsyncPool::from_config(&config).await?;
//! let worker = Worker::new(pool, WorkerOptions::default())
//!     .notifications(&config.database_url)
//!     .handle("http", |step| async move {
//!         let url = step.input().and_then(|i| i["url"].as_str()).unwrap_or_default().to_owned();
//!         // ... fetch `url`; `step.cancelled()` resolves if the lease is lost ...
//!         Ok(Some(json!({ "fetched": url })))
//!     })
//!     .spawn()
//!     .await?;
//! // ... on SIGTERM:
//! let report = worker.shutdown().await?;
//! println!("{} step(s) completed", report.completed);
//! # Ok(())
//! # }
//! ```
//!
//! # What a worker does
//!
//! - **Claims** only steps of the queues it serves ([`engine::claim_from`];
//!   by default the node types it has handlers for, which are the steps'
//!   queues unless a node sets `config.queue`: see
//!   [`WorkerOptions::queues`]), as many as it has free slots
//!   ([`WorkerOptions::concurrency`]), in one statement, highest priority
//!   first; the database holds back steps of paused or full queues and of
//!   concurrency keys at their limit.
//! - **Wakes** on the database's claimable notifications
//!   ([`crate::engine::Claimable`], when given a URL with
//!   [`Worker::notifications`]) for its queues, at the time of the next
//!   scheduled retry ([`engine::next_claimable_at`]), when a slot frees up
//!   after a full claim, and at the latest every
//!   [`WorkerOptions::poll_interval`] (a safety net: notifications are lost
//!   while the listener reconnects, and a reconnection triggers a claim).
//! - **Runs** each step's handler as its own tokio task, inside a tracing
//!   span `step` (step, execution, node, type, attempt; never payloads),
//!   with a [`StepContext`] that holds the step and a cancellation token.
//! - **Keeps leases alive**: every [`WorkerOptions::heartbeat_interval`] one
//!   statement extends the leases of every running handler. A lease the
//!   database no longer honours (expired and reclaimed, the step cancelled,
//!   pruned) cancels that handler's token, and its result is dropped: the
//!   step is someone else's now. So does a lease that could not be renewed
//!   before it expired (database unreachable).
//! - **Reports** results in batches: every completion ready at a moment goes
//!   in one [`engine::complete_steps`] statement; a failure is one
//!   [`engine::fail_step`] (the step's retry budget decides between a retry
//!   after the node type's [`RetryPolicy`] backoff and a failure for good).
//!   A handler that returns an error, panics or runs past its
//!   [`RetryPolicy::timeout`] is a failed attempt; the worker carries on.
//! - **Shuts down** gracefully ([`WorkerHandle::shutdown`]): no new claims;
//!   running handlers get until [`WorkerOptions::shutdown_timeout`] to finish
//!   (heartbeats and reports go on); then the rest are cancelled and their
//!   steps released to `pending` ([`engine::release_steps`]) without
//!   spending a retry, claimable at once by another worker.
//!
//! # Crashes
//!
//! A worker that dies without shutting down (kill -9, OOM, a lost host)
//! leaves its steps `running` under leases that stop being renewed. Once a
//! lease expires, [`crate::runtime::maintenance`] (or any call of
//! [`engine::reclaim_expired`]) sends the step back to `pending`; with the
//! default [`WorkerOptions::lease`] of 30 s and a maintenance interval of
//! 1 s, such a step runs again within about 31 s. A step's handler can
//! therefore run more than once (at least once, never concurrently with a
//! live lease): make handlers idempotent, or key their side effects on the
//! step id and [`StepContext::attempt`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use tokio::task::{Id as TaskId, JoinSet};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::notifier::{Notifier, NotifierEvent, NotifierOptions};
use super::pool::AsyncPool;
use crate::config::DatabaseUrl;
use crate::engine::{self, Backoff};
use crate::error::{Error, Result};
use crate::graph::is_reserved;
use crate::models::{ExecutionStep, Lease};

/// The error a handler returns: anything that converts into a boxed error
/// (`?` on most error types, `"message".into()`, `anyhow::Error::into()`).
/// Its `Display` (with its sources) becomes the step's `error`.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a handler returns: the step's output (stored as JSON), or why the
/// attempt failed.
pub type HandlerResult = std::result::Result<Option<Value>, HandlerError>;

type BoxedHandler =
    Arc<dyn Fn(StepContext) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>> + Send + Sync>;

/// The handler of a node type the worker has none for: the attempt fails
/// with an error that names the type and the worker's queues.
fn unhandled(node_type: &str, queues: &[String]) -> BoxedHandler {
    let message = format!(
        "no handler for node type {node_type:?} on this worker (it claims from queues {queues:?}): \
         register one, or route the node to another queue with config.queue"
    );
    Arc::new(move |_| {
        let message = message.clone();
        Box::pin(async move { Err(message.into()) })
    })
}

/// A unique worker id: `host-pid-xxxx` (host name, process id, four random
/// hex digits), so that two processes, or two workers of one process, never
/// share an id. A lease names its worker; the attempt number fences a
/// restarted process even if it reused an id, and the unique id keeps the
/// history readable (`execution_events.payload->>'worker'`).
pub fn worker_id() -> String {
    let host = gethostname::gethostname();
    let host = host.to_string_lossy();
    let host = if host.is_empty() { "host" } else { &host };
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// How a node type's failed attempts are retried: the step's retry budget
/// (`max_retries`, from the node's `config.max_retries`) says how many; this
/// says when, and how long an attempt may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay of retry `n`: `base * 2^n`, at most `max`.
    pub backoff: Backoff,
    /// Fraction of each delay taken off at random (0 = none, 0.5 = the
    /// delay is 50–100 % of the backoff): retries of many steps that failed
    /// together (an outage) spread out instead of coming back in step.
    pub jitter: f64,
    /// An attempt running longer is cancelled and counted as failed; `None`
    /// lets it run as long as its lease is renewed.
    pub timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    /// [`Backoff::default`] (1 s doubling up to 5 min), 50 % jitter, no timeout.
    fn default() -> Self {
        RetryPolicy {
            backoff: Backoff::default(),
            jitter: 0.5,
            timeout: None,
        }
    }
}

impl RetryPolicy {
    /// The backoff of one failure, jittered.
    fn jittered(&self) -> Backoff {
        let jitter = self.jitter.clamp(0.0, 1.0);
        let keep = 1.0 - jitter * fastrand::f64();
        Backoff {
            base: self.backoff.base.mul_f64(keep),
            max: self.backoff.max.mul_f64(keep),
        }
    }
}

/// Settings of a [`Worker`]; [`WorkerOptions::default`] then change fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// The worker's id, recorded on its leases and in the history (default
    /// `None`: a fresh [`worker_id`] per worker, so options cloned for
    /// several workers still give each its own id).
    pub id: Option<String>,
    /// Handlers running at once (default 10).
    pub concurrency: usize,
    /// Length of each lease (default 30 s). A step of a crashed worker is
    /// reclaimed at most this long (plus the maintenance interval) after its
    /// last heartbeat.
    pub lease: Duration,
    /// How often the leases of running handlers are renewed (default
    /// `None`: a third of the lease, so two heartbeats may fail before a
    /// lease is lost). Must be below the lease.
    pub heartbeat_interval: Option<Duration>,
    /// The longest a worker with free slots waits without a notification
    /// before it looks for work (default 5 s).
    pub poll_interval: Duration,
    /// How long [`WorkerHandle::shutdown`] lets running handlers finish
    /// before it releases their steps (default 30 s).
    pub shutdown_timeout: Duration,
    /// The queues the worker claims from (default empty: the node types it
    /// has handlers for, which are the steps' queues unless a node sets
    /// `config.queue`). A step claimed from these queues whose node type has
    /// no handler here fails its attempt with an error saying so.
    pub queues: Vec<String>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            id: None,
            concurrency: 10,
            lease: Duration::from_secs(30),
            heartbeat_interval: None,
            poll_interval: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            queues: Vec::new(),
        }
    }
}

/// [`WorkerOptions`] checked, with the defaults that depend on others filled in.
#[derive(Debug, Clone)]
struct Settings {
    id: String,
    concurrency: usize,
    lease: Duration,
    heartbeat_interval: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
}

impl WorkerOptions {
    fn settings(&self) -> Result<Settings> {
        let invalid =
            |option: &'static str, reason: String| Err(Error::InvalidOption { option, reason });
        let id = self.id.clone().unwrap_or_else(worker_id);
        if id.is_empty() {
            return invalid("WorkerOptions::id", "empty".into());
        }
        let max = crate::models::MAX_PAGE_SIZE;
        if self.concurrency == 0 || self.concurrency as i64 > max {
            return invalid(
                "WorkerOptions::concurrency",
                format!("{} is not in 1..={max}", self.concurrency),
            );
        }
        if self.lease < Duration::from_millis(100) {
            return invalid(
                "WorkerOptions::lease",
                format!("{:?} is shorter than 100ms", self.lease),
            );
        }
        let heartbeat_interval = self.heartbeat_interval.unwrap_or(self.lease / 3);
        if heartbeat_interval.is_zero() || heartbeat_interval >= self.lease {
            return invalid(
                "WorkerOptions::heartbeat_interval",
                format!(
                    "{heartbeat_interval:?} must be above zero and below the lease ({:?})",
                    self.lease
                ),
            );
        }
        if self.poll_interval.is_zero() {
            return invalid("WorkerOptions::poll_interval", "zero".into());
        }
        if self.queues.iter().any(String::is_empty) {
            return invalid("WorkerOptions::queues", "a queue name is empty".into());
        }
        if let Some(q) = self.queues.iter().find(|q| is_reserved(q)) {
            return invalid(
                "WorkerOptions::queues",
                format!(
                    "{q:?} is one of the engine's own queues (timers and signal waits, run by \
                     engine::fire_due_waits): no worker claims from it"
                ),
            );
        }
        Ok(Settings {
            id,
            concurrency: self.concurrency,
            lease: self.lease,
            heartbeat_interval,
            poll_interval: self.poll_interval,
            shutdown_timeout: self.shutdown_timeout,
        })
    }
}

/// What a handler gets: the claimed step, and a token cancelled when the
/// step is no longer this worker's (lease lost), when its attempt timed out,
/// or when a shutdown gave up waiting for it.
#[derive(Clone)]
pub struct StepContext {
    step: Arc<ExecutionStep>,
    lease: Lease,
    cancel: CancellationToken,
    pool: AsyncPool,
}

impl fmt::Debug for StepContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepContext")
            .field("step_id", &self.step.id)
            .field("node_id", &self.step.node_id)
            .field("attempt", &self.lease.attempt)
            .finish_non_exhaustive()
    }
}

impl StepContext {
    /// The step as claimed (status `running`).
    pub fn step(&self) -> &ExecutionStep {
        &self.step
    }

    /// The step's input.
    pub fn input(&self) -> Option<&Value> {
        self.step.input.as_ref()
    }

    /// The step's id.
    pub fn step_id(&self) -> Uuid {
        self.step.id
    }

    /// The step's execution.
    pub fn execution_id(&self) -> Uuid {
        self.step.execution_id
    }

    /// The run of the step (1 for the first; a retry or a reclaim counts
    /// up): with [`StepContext::step_id`], a key for idempotent side effects.
    pub fn attempt(&self) -> i32 {
        self.lease.attempt
    }

    /// The lease this run holds.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The token cancelled when this run should stop (see [`StepContext`]).
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Resolves when this run should stop; `select!` on it around long work.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Whether this run should stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The worker's pool, for what a handler reads or writes in the
    /// database (its execution's data, upstream outputs: see
    /// `ExecutionStep::list_for_execution`). The worker itself holds at
    /// most one connection at a time; size the pool for the handlers' use
    /// on top of that.
    pub fn pool(&self) -> &AsyncPool {
        &self.pool
    }
}

struct Registered {
    handler: BoxedHandler,
    policy: RetryPolicy,
}

/// A worker being configured: [`Worker::new`], handlers, then
/// [`Worker::spawn`] (or [`Worker::run`]). See the [module documentation](self).
pub struct Worker {
    pool: AsyncPool,
    options: WorkerOptions,
    url: Option<DatabaseUrl>,
    handlers: HashMap<String, Registered>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&String> = self.handlers.keys().collect();
        types.sort();
        f.debug_struct("Worker")
            .field("options", &self.options)
            .field("node_types", &types)
            .field("notifications", &self.url.is_some())
            .finish()
    }
}

impl Worker {
    /// A worker running its handlers' steps through `pool`.
    pub fn new(pool: AsyncPool, options: WorkerOptions) -> Worker {
        Worker {
            pool,
            options,
            url: None,
            handlers: HashMap::new(),
        }
    }

    /// Listens for the database's claimable notifications on a dedicated
    /// connection to `url` (a [`Notifier`]): work is picked up the moment it
    /// becomes claimable instead of at the next poll.
    pub fn notifications(mut self, url: &DatabaseUrl) -> Worker {
        self.url = Some(url.clone());
        self
    }

    /// Runs `handler` for the steps of `node_type`, with the default
    /// [`RetryPolicy`]. A second registration for a type replaces the first.
    pub fn handle<F, Fut>(self, node_type: impl Into<String>, handler: F) -> Worker
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.handle_with(node_type, RetryPolicy::default(), handler)
    }

    /// [`Worker::handle`] with a retry policy for this node type.
    pub fn handle_with<F, Fut>(
        mut self,
        node_type: impl Into<String>,
        policy: RetryPolicy,
        handler: F,
    ) -> Worker
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: BoxedHandler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers
            .insert(node_type.into(), Registered { handler, policy });
        self
    }

    /// Starts the worker on the current tokio runtime; the handle stops it.
    /// Fails, with nothing started, on invalid options or no handler
    /// ([`Error::InvalidOption`]) and when the notifications' connection
    /// cannot be opened ([`Error::Connection`]). After that, database errors
    /// are retried (and shown in [`WorkerHandle::health`]), never fatal.
    pub async fn spawn(self) -> Result<WorkerHandle> {
        let settings = self.options.settings()?;
        if self.handlers.is_empty() {
            return Err(Error::InvalidOption {
                option: "Worker::handle",
                reason: "the worker has no handler".into(),
            });
        }
        if let Some(t) = self.handlers.keys().find(|t| is_reserved(t)) {
            return Err(Error::InvalidOption {
                option: "Worker::handle",
                reason: format!(
                    "node type {t:?} is the engine's own (timers and signal waits run without \
                     a worker, by engine::fire_due_waits): no handler may take it"
                ),
            });
        }
        let notifier = match &self.url {
            // Claimable work only: transitions (and their catch-up) are not
            // a worker's business.
            Some(url) => Some(
                Notifier::connect_with(
                    url,
                    NotifierOptions {
                        transitions: false,
                        catch_up: false,
                        ..NotifierOptions::default()
                    },
                )
                .await?,
            ),
            None => None,
        };
        let stop = CancellationToken::new();
        let health = Arc::new(Mutex::new(Health {
            listening: notifier.is_some(),
            ..Health::default()
        }));
        let mut queues = if self.options.queues.is_empty() {
            self.handlers.keys().cloned().collect()
        } else {
            self.options.queues.clone()
        };
        queues.sort();
        queues.dedup();
        let id = settings.id.clone();
        let mut run = Run {
            pool: self.pool,
            options: settings,
            handlers: self.handlers,
            queues,
            notifier,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            leases: Arc::default(),
            done: Vec::new(),
            by_task: HashMap::new(),
            report: WorkerReport::default(),
            health: Arc::clone(&health),
            last_claim_full: false,
        };
        let token = stop.clone();
        let task = tokio::spawn(async move { Ok(run.main(token).await) });
        Ok(WorkerHandle {
            id,
            stop,
            health,
            task,
        })
    }

    /// Runs the worker until `shutdown` resolves, then shuts it down
    /// gracefully (see [`WorkerHandle::shutdown`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<WorkerReport> {
        let handle = self.spawn().await?;
        shutdown.await;
        handle.shutdown().await
    }
}

/// Counts of what a worker did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Steps claimed.
    pub claimed: u64,
    /// Steps completed.
    pub completed: u64,
    /// Failed attempts reported (a retry scheduled, or the step failed for good).
    pub failed: u64,
    /// Runs abandoned because the lease was lost (results dropped).
    pub lost: u64,
    /// Steps released back to `pending` at shutdown.
    pub released: u64,
}

impl std::ops::AddAssign for WorkerReport {
    fn add_assign(&mut self, other: WorkerReport) {
        self.claimed += other.claimed;
        self.completed += other.completed;
        self.failed += other.failed;
        self.lost += other.lost;
        self.released += other.released;
    }
}

impl std::iter::Sum for WorkerReport {
    fn sum<I: Iterator<Item = WorkerReport>>(iter: I) -> WorkerReport {
        iter.fold(WorkerReport::default(), |mut total, r| {
            total += r;
            total
        })
    }
}

/// A running worker's state, for a health endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerHealth {
    /// The worker's task is running.
    pub running: bool,
    /// Handlers running now.
    pub in_flight: usize,
    /// The worker listens for notifications (and is connected: false while
    /// its listener reconnects).
    pub listening: bool,
    /// Time since the last database call that succeeded (claim, heartbeat,
    /// report); `None` before the first.
    pub since_last_success: Option<Duration>,
    /// The last database error, until a later call succeeds.
    pub last_error: Option<String>,
}

impl WorkerHealth {
    /// Running, and the database answered within `max_silence` (the last
    /// call was not an error): what a readiness probe should check, with a
    /// `max_silence` of a few poll intervals.
    pub fn is_healthy(&self, max_silence: Duration) -> bool {
        self.running
            && self.last_error.is_none()
            && self.since_last_success.is_some_and(|d| d <= max_silence)
    }
}

#[derive(Debug, Default)]
struct Health {
    in_flight: usize,
    listening: bool,
    last_success: Option<Instant>,
    last_error: Option<String>,
}

/// A running [`Worker`]: stop it, or ask how it is.
#[derive(Debug)]
pub struct WorkerHandle {
    id: String,
    stop: CancellationToken,
    health: Arc<Mutex<Health>>,
    task: tokio::task::JoinHandle<Result<WorkerReport>>,
}

impl WorkerHandle {
    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The worker's health now.
    pub fn health(&self) -> WorkerHealth {
        let h = lock(&self.health);
        WorkerHealth {
            running: !self.task.is_finished(),
            in_flight: h.in_flight,
            listening: h.listening,
            since_last_success: h.last_success.map(|t| t.elapsed()),
            last_error: h.last_error.clone(),
        }
    }

    /// Stops claiming, lets running handlers finish until
    /// [`WorkerOptions::shutdown_timeout`], cancels and releases the rest,
    /// and returns what the worker did.
    pub async fn shutdown(self) -> Result<WorkerReport> {
        self.stop.cancel();
        self.stopped().await
    }

    /// Begins the graceful shutdown without waiting for it (to stop many
    /// workers at once: [`WorkerHandle::stop`] each, then
    /// [`WorkerHandle::wait`] each).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits for the worker to stop (after [`WorkerHandle::stop`]).
    pub async fn wait(self) -> Result<WorkerReport> {
        self.stopped().await
    }

    async fn stopped(self) -> Result<WorkerReport> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(super::pool::task_error(e)),
        }
    }
}

/// A run: its step and attempt (a step reclaimed and claimed again by the
/// same worker is another run, while the first may still be finishing).
type RunKey = (Uuid, i32);

/// The leases of the running handlers, shared by the main loop (which
/// adds and removes them) and the heartbeat task (which renews them, and
/// marks and cancels the lost ones).
type Leases = Arc<Mutex<HashMap<RunKey, Held>>>;

struct Held {
    lease: Lease,
    cancel: CancellationToken,
    /// When the lease expires unless renewed (as far as this worker knows).
    expires: Instant,
    /// The lease was lost: the run's result is dropped.
    lost: bool,
}

/// A run in progress, as the main loop sees it.
struct Running {
    node_type: String,
    started: Instant,
}

/// How a handler's task ended.
enum Outcome {
    Output(Option<Value>),
    Failed(String),
}

/// Locks a mutex, ignoring poisoning (the data are plain bookkeeping).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Renews the leases every `interval` until `stop`, on its own task: a
/// claim or a report that waits (a lock, a slow pool) never delays a
/// heartbeat. Returns how many leases it found lost.
async fn beat(
    pool: AsyncPool,
    leases: Leases,
    health: Arc<Mutex<Health>>,
    lease: Duration,
    interval: Duration,
    stop: CancellationToken,
) -> u64 {
    let mut lost_total = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return lost_total,
        }
        let held: Vec<Lease> = lock(&leases)
            .values()
            .filter(|h| !h.lost)
            .map(|h| h.lease.clone())
            .collect();
        if held.is_empty() {
            continue;
        }
        let sent = Instant::now();
        let asked = held.clone();
        let renewed = pool
            .run(move |c| Ok(engine::heartbeat(c, &asked, lease)?))
            .await;
        let mut lost = 0;
        {
            let mut table = lock(&leases);
            match &renewed {
                Ok(kept) => {
                    let kept: HashSet<Uuid> = kept.iter().copied().collect();
                    for l in &held {
                        let Some(h) = table.get_mut(&(l.step_id, l.attempt)) else {
                            continue; // finished meanwhile
                        };
                        if kept.contains(&l.step_id) {
                            h.expires = sent + lease;
                        } else if !h.lost {
                            tracing::warn!(step.id = %l.step_id, attempt = l.attempt, "lease lost; cancelling the handler");
                            h.lost = true;
                            h.cancel.cancel();
                            lost += 1;
                        }
                    }
                }
                Err(_) => {
                    // A lease that ran out while the database was
                    // unreachable is someone else's to run now.
                    let now = Instant::now();
                    for h in table.values_mut() {
                        if !h.lost && h.expires <= now {
                            h.lost = true;
                            h.cancel.cancel();
                            lost += 1;
                        }
                    }
                }
            }
        }
        match renewed {
            Ok(_) => note_success(&health),
            Err(error) => note_failure(&health, "heartbeat", &error),
        }
        if lost > 0 {
            lost_total += lost;
            metrics::counter!("workflow_db_leases_lost_total").increment(lost);
        }
    }
}

fn note_success(health: &Mutex<Health>) {
    let mut h = lock(health);
    h.last_success = Some(Instant::now());
    h.last_error = None;
}

fn note_failure(health: &Mutex<Health>, what: &str, error: &Error) {
    tracing::error!(%error, call = what, "worker: database call failed");
    metrics::counter!("workflow_db_worker_errors_total", "call" => what.to_owned()).increment(1);
    lock(health).last_error = Some(format!("{what}: {error}"));
}

/// How long a finished run waits for others to finish before its result
/// is reported: results come in batches, for at most this much latency.
const REPORT_LINGER: Duration = Duration::from_millis(2);

/// How often a report that failed on a deadlock or a serialization
/// failure is tried again.
const REPORT_ATTEMPTS: u32 = 3;

struct Run {
    pool: AsyncPool,
    options: Settings,
    handlers: HashMap<String, Registered>,
    /// The queues it claims from.
    queues: Vec<String>,
    notifier: Option<Notifier>,
    tasks: JoinSet<(RunKey, Outcome)>,
    running: HashMap<RunKey, Running>,
    leases: Leases,
    /// Finished runs not reported yet.
    done: Vec<(RunKey, Outcome)>,
    by_task: HashMap<TaskId, RunKey>,
    report: WorkerReport,
    health: Arc<Mutex<Health>>,
    /// The last claim filled every free slot: more may be waiting.
    last_claim_full: bool,
}

impl Run {
    async fn main(&mut self, stop: CancellationToken) -> WorkerReport {
        let worker = self.options.id.clone();
        tracing::info!(%worker, queues = ?self.queues, "worker started");
        let beats_stop = CancellationToken::new();
        let beats = tokio::spawn(beat(
            self.pool.clone(),
            Arc::clone(&self.leases),
            Arc::clone(&self.health),
            self.options.lease,
            self.options.heartbeat_interval,
            beats_stop.clone(),
        ));
        let mut wake = true; // look for work at once
        let mut next_look = Instant::now() + self.options.poll_interval;
        loop {
            // Claim when at least half the slots are free (or none runs):
            // under load, claims and reports then come in batches.
            let free = self.options.concurrency - self.running.len();
            if wake && (self.running.is_empty() || free >= self.options.concurrency.div_ceil(2)) {
                wake = false;
                next_look = self.claim().await;
            }
            let listening = self.notifier.is_some();
            tokio::select! {
                () = stop.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(joined);
                    self.linger().await;
                    self.report_ready().await;
                    // Slots freed after a full claim: there may be more.
                    wake |= self.last_claim_full;
                }
                event = recv(&mut self.notifier), if listening => {
                    wake |= self.notified(event, &mut next_look);
                    // Coalesce: whatever else arrived meanwhile, then one claim.
                    while let Some(event) = self.notifier.as_mut().and_then(Notifier::try_recv) {
                        wake |= self.notified(Some(event), &mut next_look);
                    }
                }
                () = sleep_until(next_look.into()) => {
                    wake = true;
                    next_look = Instant::now() + self.options.poll_interval;
                }
            }
        }
        self.shut_down().await;
        beats_stop.cancel();
        self.report.lost += beats.await.unwrap_or(0);
        tracing::info!(%worker, report = ?self.report, "worker stopped");
        self.report.clone()
    }

    /// Claims for the free slots and starts the handlers; returns when to
    /// look again if nothing more comes.
    async fn claim(&mut self) -> Instant {
        let free = self.options.concurrency - self.running.len();
        let (worker, queues, lease) = (
            self.options.id.clone(),
            self.queues.clone(),
            self.options.lease,
        );
        let started = Instant::now();
        let claimed = self
            .db("claim", move |c| {
                let steps = engine::claim_from(c, &worker, &queues, free as i64, lease)?;
                // Nothing (or not all) claimed: when is the next step due?
                // (A failure here must not lose the steps just claimed.)
                let next = if steps.len() < free {
                    engine::next_claimable_at(c, &queues).ok().flatten()
                } else {
                    None
                };
                Ok((steps, next))
            })
            .await;
        metrics::histogram!("workflow_db_claim_seconds").record(started.elapsed().as_secs_f64());
        let poll = Instant::now() + self.options.poll_interval;
        let Some((steps, next)) = claimed else {
            return poll; // logged; try again at the next poll
        };
        let full = steps.len() == free;
        self.last_claim_full = full;
        metrics::counter!("workflow_db_steps_claimed_total").increment(steps.len() as u64);
        self.report.claimed += steps.len() as u64;
        for step in steps {
            self.start(step, started);
        }
        if full {
            // More may be waiting: look again as soon as a slot frees up.
            return poll;
        }
        match next {
            None => poll,
            Some(at) => {
                let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                // Claimable now but not claimed: rows other workers were
                // taking (SKIP LOCKED). Look again shortly, not in a spin.
                let wait = wait.max(Duration::from_millis(10 + fastrand::u64(..20)));
                poll.min(Instant::now() + wait)
            }
        }
    }

    fn start(&mut self, step: ExecutionStep, claimed_at: Instant) {
        let Some(lease) = step.lease() else {
            return;
        };
        let node_type = step.node_type.clone().unwrap_or_default();
        let (handler, timeout) = match self.handlers.get(&node_type) {
            Some(registered) => (Arc::clone(&registered.handler), registered.policy.timeout),
            // A queue this worker serves holds a type it cannot run.
            None => (unhandled(&node_type, &self.queues), None),
        };
        let cancel = CancellationToken::new();
        let span = tracing::info_span!(
            "step",
            step.id = %step.id,
            execution.id = %step.execution_id,
            node.id = %step.node_id,
            node.r#type = %node_type,
            attempt = lease.attempt,
        );
        let key: RunKey = (step.id, lease.attempt);
        let ctx = StepContext {
            step: Arc::new(step),
            lease: lease.clone(),
            cancel: cancel.clone(),
            pool: self.pool.clone(),
        };
        let token = cancel.clone();
        let abort = self.tasks.spawn(
            async move {
                let run = handler(ctx);
                let outcome = match timeout {
                    None => run.await,
                    Some(limit) => match tokio::time::timeout(limit, run).await {
                        Ok(r) => r,
                        Err(_) => {
                            token.cancel();
                            Err(format!("timed out after {limit:?}").into())
                        }
                    },
                };
                let outcome = match outcome {
                    Ok(output) => Outcome::Output(output),
                    Err(e) => Outcome::Failed(super::notifier::chain(e.as_ref())),
                };
                (key, outcome)
            }
            .instrument(span),
        );
        self.by_task.insert(abort.id(), key);
        lock(&self.leases).insert(
            key,
            Held {
                lease,
                cancel,
                expires: claimed_at + self.options.lease,
                lost: false,
            },
        );
        self.running.insert(
            key,
            Running {
                node_type,
                started: Instant::now(),
            },
        );
        self.set_in_flight();
    }

    /// Records a finished task's outcome (reported by [`Run::report_ready`]).
    fn finished(
        &mut self,
        joined: std::result::Result<(TaskId, (RunKey, Outcome)), tokio::task::JoinError>,
    ) {
        let (key, outcome) = match joined {
            Ok((task, done)) => {
                self.by_task.remove(&task);
                done
            }
            Err(e) => {
                let Some(key) = self.by_task.remove(&e.id()) else {
                    return;
                };
                let reason = if e.is_panic() {
                    format!(
                        "the handler panicked: {}",
                        super::pool::panic_message(e.into_panic().as_ref())
                    )
                } else {
                    "the handler was cancelled".to_owned()
                };
                (key, Outcome::Failed(reason))
            }
        };
        self.done.push((key, outcome));
    }

    /// Collects the runs that finish within [`REPORT_LINGER`] of the first
    /// one, so that a batch claimed together is reported together.
    async fn linger(&mut self) {
        let until = tokio::time::sleep(REPORT_LINGER);
        tokio::pin!(until);
        while !self.tasks.is_empty() {
            tokio::select! {
                biased;
                Some(joined) = self.tasks.join_next_with_id() => self.finished(joined),
                () = &mut until => break,
            }
        }
    }

    /// Reports every finished run: the completions in one statement, each
    /// failure in its own. Runs whose lease was lost are dropped.
    async fn report_ready(&mut self) {
        while let Some(joined) = self.tasks.try_join_next_with_id() {
            self.finished(joined);
        }
        let mut completions: Vec<(Lease, Option<Value>, String)> = Vec::new();
        let mut failures: Vec<(Lease, String, Backoff, String)> = Vec::new();
        for (key, outcome) in std::mem::take(&mut self.done) {
            let Some(run) = self.running.remove(&key) else {
                continue;
            };
            let Some(held) = lock(&self.leases).remove(&key) else {
                continue;
            };
            metrics::histogram!("workflow_db_step_seconds", "node_type" => run.node_type.clone())
                .record(run.started.elapsed().as_secs_f64());
            if held.lost {
                continue; // counted when the lease was found lost
            }
            match outcome {
                Outcome::Output(output) => completions.push((held.lease, output, run.node_type)),
                Outcome::Failed(error) => {
                    let backoff = self
                        .handlers
                        .get(&run.node_type)
                        .map(|h| h.policy.jittered())
                        .unwrap_or_default();
                    tracing::info!(step.id = %key.0, attempt = key.1, %error, "step attempt failed");
                    failures.push((held.lease, error, backoff, run.node_type));
                }
            }
        }
        self.set_in_flight();
        if !completions.is_empty() {
            self.complete(completions).await;
        }
        if !failures.is_empty() {
            self.fail(failures).await;
        }
    }

    /// Completes a batch (lease, output, node type): one statement; a lease
    /// lost since (the batch is all or nothing) is taken out and the rest
    /// completed again; a deadlock or serialization failure is tried again.
    async fn complete(&mut self, mut batch: Vec<(Lease, Option<Value>, String)>) {
        let mut retries = 0;
        while !batch.is_empty() {
            let attempt: Vec<(Lease, Option<Value>)> = batch
                .iter()
                .map(|(l, o, _)| (l.clone(), o.clone()))
                .collect();
            let outcome = self
                .pool
                .run(move |c| match attempt.as_slice() {
                    // One statement in autocommit (a batch needs a transaction).
                    [(lease, output)] => {
                        engine::complete_step(c, lease, output.as_ref()).map(|_| 1)
                    }
                    _ => engine::complete_steps(c, &attempt).map(|done| done.len()),
                })
                .await;
            match outcome {
                Ok(n) => {
                    note_success(&self.health);
                    let mut by_type: HashMap<&str, u64> = HashMap::new();
                    for (_, _, node_type) in &batch {
                        *by_type.entry(node_type.as_str()).or_default() += 1;
                    }
                    for (t, k) in by_type {
                        metrics::counter!("workflow_db_steps_completed_total", "node_type" => t.to_owned())
                            .increment(k);
                    }
                    self.report.completed += n as u64;
                    return;
                }
                Err(Error::LeaseLost {
                    step_id, reason, ..
                }) => {
                    tracing::warn!(step.id = %step_id, %reason, "lease lost before the result was reported; result dropped");
                    self.lease_lost(1);
                    batch.retain(|(lease, _, _)| lease.step_id != step_id);
                }
                Err(error) if error.is_retryable() && retries < REPORT_ATTEMPTS => {
                    retries += 1;
                    tracing::debug!(%error, retries, "worker: completing again");
                    tokio::time::sleep(Duration::from_millis(5 + fastrand::u64(..20))).await;
                }
                Err(error) => {
                    // The leases run out and maintenance hands the steps
                    // out again: their results are lost, not their steps.
                    note_failure(&self.health, "complete", &error);
                    return;
                }
            }
        }
    }

    async fn fail(&mut self, failures: Vec<(Lease, String, Backoff, String)>) {
        let attempt: Vec<(Lease, String, Backoff)> = failures
            .iter()
            .map(|(l, e, b, _)| (l.clone(), e.clone(), *b))
            .collect();
        let outcome = self
            .pool
            .run(move |c| {
                let mut lost = 0u64;
                let mut reported = Vec::new();
                for (lease, error, backoff) in &attempt {
                    let mut tries = 0;
                    loop {
                        match engine::fail_step(c, lease, error, backoff) {
                            Ok(_) => reported.push(lease.step_id),
                            Err(Error::LeaseLost { .. }) => lost += 1,
                            Err(e) if e.is_retryable() && tries < REPORT_ATTEMPTS => {
                                tries += 1;
                                continue;
                            }
                            // What was reported stays reported.
                            Err(e) => return Ok((reported, lost, Some(e))),
                        }
                        break;
                    }
                }
                Ok((reported, lost, None))
            })
            .await;
        let (reported, lost, error) = match outcome {
            Ok(r) => r,
            Err(error) => (Vec::new(), 0, Some(error)),
        };
        match error {
            None => note_success(&self.health),
            Some(error) => note_failure(&self.health, "fail", &error),
        }
        self.lease_lost(lost);
        self.report.failed += reported.len() as u64;
        for (lease, _, _, node_type) in &failures {
            if reported.contains(&lease.step_id) {
                metrics::counter!("workflow_db_steps_failed_total", "node_type" => node_type.clone())
                    .increment(1);
            }
        }
    }

    /// Whether a notifier event calls for a claim now; a claimable retry
    /// in the future moves the next look earlier instead.
    fn notified(&mut self, event: Option<NotifierEvent>, next_look: &mut Instant) -> bool {
        match event {
            Some(NotifierEvent::Claimable(c)) => {
                let ours = self.queues.contains(&c.queue);
                if !ours {
                    return false;
                }
                let wait = (c.run_after - Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO);
                if wait.is_zero() {
                    return true;
                }
                *next_look = (*next_look).min(Instant::now() + wait);
                false
            }
            Some(NotifierEvent::Disconnected { reason }) => {
                tracing::warn!(%reason, "worker: notifications lost; polling until reconnected");
                lock(&self.health).listening = false;
                false
            }
            Some(NotifierEvent::Reconnected) => {
                lock(&self.health).listening = true;
                true // catch up on what became claimable meanwhile
            }
            Some(_) => false,
            None => {
                // The notifier's task ended: poll from now on.
                tracing::error!("worker: the notifier stopped; polling");
                self.notifier = None;
                lock(&self.health).listening = false;
                true
            }
        }
    }

    /// Graceful stop: wait for the running handlers until the deadline,
    /// reporting as they finish (the heartbeat task renews meanwhile); then
    /// release the rest and cancel their handlers.
    async fn shut_down(&mut self) {
        let deadline = Instant::now() + self.options.shutdown_timeout;
        tracing::info!(
            in_flight = self.running.len(),
            "worker stopping: no new claims"
        );
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(joined) = self.tasks.join_next_with_id() => {
                    self.finished(joined);
                    self.report_ready().await;
                }
                () = sleep_until(deadline.into()) => break,
            }
        }
        self.report_ready().await;
        if self.running.is_empty() {
            return;
        }
        // Past the deadline: hand the steps back first (a handler that never
        // yields must not keep them), then stop the handlers.
        let held: Vec<Held> = lock(&self.leases).drain().map(|(_, h)| h).collect();
        let leases: Vec<Lease> = held
            .iter()
            .filter(|h| !h.lost)
            .map(|h| h.lease.clone())
            .collect();
        for h in &held {
            h.cancel.cancel();
        }
        if !leases.is_empty() {
            match self
                .pool
                .run(move |c| engine::release_steps(c, &leases))
                .await
            {
                Ok(released) => {
                    self.report.released += released.len() as u64;
                    metrics::counter!("workflow_db_steps_released_total")
                        .increment(released.len() as u64);
                    tracing::info!(
                        released = released.len(),
                        "worker released its unfinished steps"
                    );
                }
                Err(error) => note_failure(&self.health, "release", &error),
            }
        }
        self.tasks.abort_all();
        let drained = tokio::time::timeout(Duration::from_secs(1), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "worker: some handlers did not stop when aborted (blocking code?); left running detached"
            );
            self.tasks.detach_all();
        }
        self.running.clear();
        self.done.clear();
        self.by_task.clear();
        self.set_in_flight();
    }

    /// Runs `f` on a pooled connection; an error is logged and recorded in
    /// the health, and `None` returned.
    async fn db<T: Send + 'static>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut diesel::PgConnection) -> Result<T> + Send + 'static,
    ) -> Option<T> {
        match self.pool.run(f).await {
            Ok(v) => {
                note_success(&self.health);
                Some(v)
            }
            Err(error) => {
                note_failure(&self.health, what, &error);
                None
            }
        }
    }

    fn lease_lost(&mut self, n: u64) {
        if n > 0 {
            self.report.lost += n;
            metrics::counter!("workflow_db_leases_lost_total").increment(n);
        }
    }

    fn set_in_flight(&self) {
        lock(&self.health).in_flight = self.running.len();
        metrics::gauge!("workflow_db_steps_in_flight").set(self.running.len() as f64);
    }
}

/// The notifier's next event (pending for ever without a notifier; the
/// `select!` guard keeps it from being polled then).
async fn recv(notifier: &mut Option<Notifier>) -> Option<NotifierEvent> {
    match notifier {
        Some(n) => n.recv().await,
        None => std::future::pending().await,
    }
}
